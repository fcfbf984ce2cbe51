"""HOST ONLY (matplotlib for the plots): `jaxinfer report` turns results folders into a Markdown table
per experiment, with the environment under it, plots, and the README's generated blocks.

A README block is `<!-- report: PATH -->` ... `<!-- /report -->`; `--readme` rewrites every block
from the summaries in PATH, `--check` fails when a block no longer matches them."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

# metric -> (header, format); values scaled by the format's own arithmetic (ms metrics are stored in s)
FORMATS = {
    "tok_s": ("tok/s", "{:.1f}"), "throughput_output_tok_s": ("output tok/s", "{:.1f}"),
    "throughput_total_tok_s": ("total tok/s", "{:.1f}"), "bound_tok_s": ("bound tok/s", "{:.1f}"),
    "pct_of_bound": ("% of bound", "{:.0f}%"), "binding": ("binding", "{}"), "usd_per_1m": ("$ / 1M tok", "{:.3g}"),
    "prefill_ms": ("prefill ms", "{:.1f}"), "step_ms": ("step ms", "{:.2f}"), "host_ms": ("host ms", "{:.2f}"),
    "compile_s": ("compile s", "{:.2f}"), "weight_mib": ("weights MiB", "{:.1f}"), "read_gb_s": ("read GB/s", "{:.1f}"),
    "peak_gflops": ("peak GFLOP/s", "{:.0f}"), "ppl": ("perplexity", "{:.3f}"), "ppl_ref": ("ppl (float)", "{:.3f}"),
    "kl": ("KL vs float", "{:.2e}"), "agreement": ("argmax agreement", "{:.1%}"),
    "kl_p99": ("KL p99", "{:.2e}"), "greedy_agreement": ("greedy agreement", "{:.1%}"),
    "gen_kl": ("KL along greedy", "{:.1e}"), "kv_bytes_per_token": ("KV B / token", "{:.0f}"),
    "spec_per_token_acceptance": ("a", "{:.2f}"), "spec_mean_accepted_length": ("tok / verify", "{:.2f}"),
    "predicted_speedup": ("predicted x", "{:.2f}"), "c": ("c", "{:.2f}"),
    "kv_slot_occupancy_mean": ("KV slot occupancy", "{:.2f}"), "kv_pages_used_max": ("KV pages max", "{:.0f}"),
    "prefix_cache_hit_rate": ("prefix hit rate", "{:.2f}"), "goodput_req_s": ("goodput req/s", "{:.2f}"),
    "slo_attainment": ("SLO met", "{:.0%}"), "preemptions": ("preemptions", "{:.0f}"),
    "temp_mib": ("temp MiB", "{:.1f}"), "gb_moved": ("GB moved", "{:.3f}"), "est_us": ("est. us", "{:.1f}"),
    "kernels": ("kernels", "{:.0f}"),
    "fits": ("fits HBM", "{}"), "hbm_used_gb": ("GB / chip", "{:.2f}"), "max_kv_tokens": ("max KV tokens", "{:,.0f}"),
    "gflops_chip": ("GFLOP / chip", "{:.1f}"), "gb_moved_chip": ("GB moved / chip", "{:.2f}"),
    "min_gb_chip": ("GB needed / chip", "{:.2f}"), "bound": ("bound by", "{}"),
    "floor_tok_s": ("tok/s at GB needed", "{:.0f}"), "published_tok_s": ("published tok/s", "{:.0f}"),
}
for _name in ("ttft", "tpot", "itl", "e2e", "queue", "step", "host"):
    for _p in ("mean", "p50", "p90", "p99"):
        _key = "host_s_per_step" if _name == "host" else f"{_name}_s"
        FORMATS[f"{_key}.{_p}"] = (f"{_name.upper() if _name not in ('step', 'host') else _name} {_p} ms", "ms")

DEFAULT_COLUMNS = {
    "decode": ("tok_s", "bound_tok_s", "pct_of_bound", "binding", "weight_mib", "usd_per_1m"),
    "serve": ("throughput_output_tok_s", "ttft_s.p50", "tpot_s.p50", "pct_of_bound", "binding", "usd_per_1m"),
    "quality": ("ppl", "kl", "agreement", "tok_s", "pct_of_bound", "weight_mib"),
    "speculative": ("tok_s", "spec_per_token_acceptance", "spec_mean_accepted_length", "predicted_speedup",
                    "pct_of_bound", "usd_per_1m"),
    "compile": ("compile_s", "temp_mib", "gb_moved", "est_us", "kernels"),
    "pods": ("fits", "hbm_used_gb", "max_kv_tokens", "gflops_chip", "gb_moved_chip", "min_gb_chip", "bound",
             "step_ms", "tok_s", "floor_tok_s", "published_tok_s"),
}
ROW_LABELS = ("mode", "decoder", "target", "case")  # labels a kind puts on its rows (a run may give several)
PRIMARY = {"decode": "tok_s", "serve": "throughput_output_tok_s", "speculative": "tok_s", "quality": "tok_s"}


def value(row: dict, key: str):
    """row[key], with 'a.b' reaching into a nested dict (ttft_s.p50)."""
    head, _, tail = key.partition(".")
    v = row.get(key, row.get(head))
    return v.get(tail) if tail and isinstance(v, dict) else v


def plotted(row: dict, key: str):
    """The value as the table shows it (milliseconds for latencies stored in seconds)."""
    v = value(row, key)
    return v * 1e3 if isinstance(v, (int, float)) and FORMATS.get(key, ("", ""))[1] == "ms" else v


def fmt(key: str, v) -> str:
    if v is None or isinstance(v, float) and math.isnan(v):
        return "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    if key == "est_us" and v < 0:  # the TPU compiler's "no estimate"
        return "-"
    header, form = FORMATS.get(key, (key, "{:.4g}" if isinstance(v, float) else "{}"))
    if form == "ms":
        return f"{v * 1e3:.1f}"
    return form.format(v)


def load(folder: str | Path) -> dict:
    """An experiment's record, its runs' summaries (in the experiment's run order) and envs."""
    folder = Path(folder)
    record_path = folder / "experiment.json"
    if not record_path.is_file():
        raise ValueError(f"'{folder}' holds no experiment.json: not a results folder of `jaxinfer run`")
    record = json.loads(record_path.read_text())
    runs = []
    for run_id in record["runs"]:
        s = folder / run_id / "summary.json"
        if s.is_file():
            env_path = folder / run_id / "env.json"
            runs.append(json.loads(s.read_text()) | {"env": json.loads(env_path.read_text()) if env_path.is_file() else {}})
    return {"record": record, "runs": runs, "folder": folder, "missing": len(record["runs"]) - len(runs)}


def table_rows(res: dict) -> tuple[list[str], list[dict]]:
    """(label columns, flat rows: labels + metrics) of a loaded results folder."""
    rows, label_keys = [], []
    for run in res["runs"]:
        for k in run["labels"]:
            if k not in label_keys:
                label_keys.append(k)
        for row in run["rows"]:
            for k in ROW_LABELS:
                if k in row and k not in label_keys:
                    label_keys.append(k)
            rows.append(dict(run["labels"]) | row)
    spec = res["record"]["spec"]
    baseline = spec.get("baseline")
    primary = spec.get("ratio_metric") or PRIMARY.get(res["record"]["kind"])
    if baseline and primary:
        for row in rows:
            match = [r for r in rows if r.get("variant") == baseline
                     and all(r.get(k) == row.get(k) for k in label_keys if k != "variant")]
            if match and value(match[0], primary):
                row[f"x {baseline}"] = value(row, primary) / value(match[0], primary)
    return label_keys, rows


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def env_line(res: dict) -> str:
    """One line per distinct environment of the runs: versions, device, CPU, git; the date and the
    machine limits measured (from the last run in that environment)."""
    seen = {}
    for run in res["runs"]:
        e = run["env"]
        if not e:
            continue
        git = e.get("git", {})
        sha = f"git {git['sha'][:10]}{' (dirty)' if git.get('dirty') else ''}" if git.get("sha") else "git -"
        key = (f"jax {e['jax']}, jaxlib {e['jaxlib']}, flax {e['flax']}, libtpu {e['libtpu'] or '-'}; "
               f"{e['device_kind']} x{e['num_devices']} ({e['platform']}), {e['cpu']}, {e['num_cpus']} CPUs; {sha}")
        # The last run's entry wins: its list holds every measurement made so far.
        bw = [f"{m['read_bytes_per_s'] / 1e9:.1f} GB/s over {m['bandwidth_buffer_bytes'] / 2**20:.0f} MiB"
              for m in e.get("machine", []) if "read_bytes_per_s" in m]
        peak = [f"{m['peak_flops_per_s'] / 1e9:.0f} GFLOP/s ({m['matmul_dtype']}, n={m['matmul_size']})"
                for m in e.get("machine", []) if "peak_flops_per_s" in m]
        limits = f"; measured read {', '.join(bw)}; matmul peak {', '.join(peak)}" if bw else ""
        seen[key] = f"{key}; {e['date'][:10]}{limits}"
    return "<br>\n".join(f"<sub>{x}</sub>" for x in seen.values())


def markdown(res: dict, link_base: str = ".", images: list[str] = ()) -> str:
    """The experiment's table, the environment under it, and its plots (paths under link_base)."""
    rec, spec = res["record"], res["record"]["spec"]
    labels, rows = table_rows(res)
    columns = list(spec.get("columns") or DEFAULT_COLUMNS[rec["kind"]])
    extra = [k for k in rows[0] if k.startswith("x ")] if rows else []
    ratio = spec.get("ratio_metric") or PRIMARY.get(rec["kind"], "")
    header = ([_short(k) for k in labels] + [FORMATS.get(k, (k,))[0] for k in columns]
              + [f"{FORMATS.get(ratio, (ratio,))[0]} / {k[2:]}" for k in extra])
    out = [f"**{rec['name']}**" + (f": {spec['description'].strip()}" if spec.get("description") else ""), ""]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for r in rows:
        cells = [fmt(k, value(r, k)) for k in labels] + [fmt(k, value(r, k)) for k in columns]
        cells += [f"{r[k]:.2f}x" if k in r else "-" for k in extra]
        out.append("| " + " | ".join(cells) + " |")
    if res["missing"]:
        out.append(f"\n{res['missing']} of {len(rec['runs'])} runs not done yet (rerun `jaxinfer run` to resume).")
    minutes = sum(r.get("wall_s", 0) for r in res["runs"]) / 60
    out += ["", f"<sub>`jaxinfer run {rec['file']}{' --smoke' if rec.get('smoke') else ''}`: {len(res['runs'])} runs, "
                f"{minutes:.1f} min; medians of {spec['repeats']} repeats</sub><br>", env_line(res)]
    for path in images:
        out += ["", f"![{rec['name']}]({link_base.rstrip('/')}/{path})"]
    return "\n".join(out)


def cost_table(res: dict) -> str:
    """$ per 1M output tokens at other devices' roofline for each row (a bound, not a measurement)."""
    labels, rows = table_rows(res)
    devices = sorted({k[len("usd_per_1m_at_bound["):-1] for r in rows for k in r if k.startswith("usd_per_1m_at_bound[")})
    if not devices:
        return ""
    out = ["| " + " | ".join([_short(k) for k in labels] + ["$ / 1M tok here"] + [f"{d} at bound" for d in devices]) + " |",
           "|" + "---|" * (len(labels) + 1 + len(devices))]
    for r in rows:
        out.append("| " + " | ".join([fmt(k, value(r, k)) for k in labels] + [fmt("usd_per_1m", r.get("usd_per_1m"))]
                                     + [fmt("usd_per_1m", r.get(f"usd_per_1m_at_bound[{d}]")) for d in devices]) + " |")
    return "\n".join(out)


def plot(res: dict, out_dir: Path) -> list[str]:
    """One PNG per plot spec (file names relative to out_dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, rows = table_rows(res)
    names = []
    for i, p in enumerate(res["record"]["spec"].get("plots", [])):
        sel = [r for r in rows if all(value(r, k) == v for k, v in p.get("where", {}).items())]
        series = p.get("series")
        groups = {}
        for r in sel:
            groups.setdefault(str(value(r, series)) if series else p["y"], []).append(r)
        fig, ax = plt.subplots(figsize=(6, 4))
        for j, (name, rs) in enumerate(groups.items()):
            color = f"C{j}"
            pts = sorted((plotted(r, p["x"]), plotted(r, p["y"]), value(r, "bound_tok_s")) for r in rs
                         if value(r, p["y"]) is not None)
            if not pts:
                continue
            xs, ys, bs = zip(*pts)
            numeric = all(isinstance(x, (int, float)) for x in xs)
            xs_plot = xs if numeric else [str(x) for x in xs]
            ax.plot(xs_plot, ys, "o-", color=color, label=name)
            if p.get("bounds") and all(b is not None for b in bs):
                ax.plot(xs_plot, bs, "--", color=color, alpha=0.6, label=f"{name}: roofline bound")
        ax.set(xlabel=_short(p["x"]), ylabel=FORMATS.get(p["y"], (p["y"],))[0],
               title=p.get("title") or f"{res['record']['name']}")
        if p.get("logx"):
            ax.set_xscale("log", base=2)
        if p.get("logy"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{res['record']['name']}{'' if i == 0 else f'_{i}'}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def report(folder: str | Path, write: bool = True) -> str:
    """Builds report.md (and the plots) in the results folder; returns the Markdown."""
    res = load(folder)
    images = plot(res, res["folder"]) if write and res["runs"] else []
    text = markdown(res, ".", images)
    costs = cost_table(res)
    if costs:
        text += "\n\n$ per 1M output tokens here and at other devices' roofline for the same steps (a bound, " \
                "prices in jaxinfer/presets/prices.yaml):\n\n" + costs
    if write:
        (res["folder"] / "report.md").write_text(text + "\n")
    return text


BLOCK = re.compile(r"(<!-- report: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /report -->)", re.S)


def index(folder: Path, link_base: str) -> str:
    """A table of the experiments under `folder`: runs, repeats, wall time of the whole run, date."""
    out = ["| experiment | kind | runs | repeats | full run (min) | date |", "|---|---|---|---|---|---|"]
    for sub in sorted(p for p in folder.iterdir() if (p / "experiment.json").is_file()):
        res = load(sub)
        rec = res["record"]
        minutes = sum(r.get("wall_s", 0) for r in res["runs"]) / 60
        dates = sorted(r["env"]["date"][:10] for r in res["runs"] if r["env"])
        out.append(f"| [{rec['name']}]({link_base.rstrip('/')}/{sub.name}/report.md) | {rec['kind']} | "
                   f"{len(res['runs'])} | {rec['spec']['repeats']} | {minutes:.1f} | {dates[-1] if dates else '-'} |")
    return "\n".join(out)


def readme_blocks(readme: str, root: Path) -> str:
    """The README with every report block regenerated from its results folder (no plots drawn:
    they are committed beside the summaries and linked); a folder of results folders renders
    their index."""
    def render(m):
        if not (root / m["path"] / "experiment.json").is_file() and (root / m["path"]).is_dir():
            return m[1] + index(root / m["path"], m["path"]) + "\n" + m[4]
        res = load(root / m["path"])
        images = sorted(p.name for p in (root / m["path"]).glob(f"{res['record']['name']}*.png"))
        return m[1] + markdown(res, m["path"], images) + "\n" + m[4]

    return BLOCK.sub(render, readme)
