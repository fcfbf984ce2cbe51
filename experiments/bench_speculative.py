"""Speculative decoding on the shipped pair (reference/target + reference/draft): tokens/s of plain
decoding vs draft-model and n-gram speculation, next to Leviathan et al.'s predicted speedup.

    python -m experiments.bench_speculative [--ks 1,2,4,6] [--batches 1,8,32] [--json PATH]

All in one run on this machine: prompts are the openings of held-out stories from the training
grammar (experiments/corpus.py); every request generates --new-tokens tokens (EOS ignored).
Each engine is warmed up first (Engine.warmup: every step shape compiled; compile time reported
apart); times are medians of --repeats runs. c, the draft/target cost ratio, is measured as the
ratio of their plain decode step times at batch 1. Predicted speedup for per-token acceptance a
(drafts kept / drafts examined): (1 - a^(k+1)) / ((1 - a) (k c + 1)); n-gram proposals count c = 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax

from jaxinfer.checkpoint import load_model
from jaxinfer.config import EngineConfig, SamplingConfig, SpeculativeConfig
from jaxinfer.engine import Engine
from jaxinfer.metrics import speculation
from jaxinfer.tokenizer import load_tokenizer
from experiments.corpus import build_corpus

TARGET, DRAFT = "package:reference/target", "package:reference/draft"


def story_prompts(tok, num: int, length: int) -> list[list[int]]:
    _, val = build_corpus(seed=12345, num_stories=20 * num)  # another seed than training: unseen stories
    return [tok.encode(s)[:length] for s in val[:num]]


def engine_cfg(batch: int, method: str, k: int) -> EngineConfig:
    return EngineConfig(page_size=16, num_pages=batch * 16 + 16, max_model_len=256, max_num_seqs=batch,
                        max_num_batched_tokens=max(256, batch * (k + 1) + 128), decode_row_buckets=(0, batch),
                        prefill_row_buckets=(0, min(batch, 4)), chunk_buckets=(32,), fixed_table_width=True,
                        speculative=SpeculativeConfig(method=method, num_speculative_tokens=max(k, 1)))


def measure(target, draft, tok, prompts, method, k, temperature, repeats, new_tokens) -> dict:
    batch = len(prompts)
    e = Engine(target, tok, engine_cfg(batch, method, k), stop_ids=(), draft=draft if method == "draft" else None)
    warm = e.warmup()
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=temperature, seed=0)
    times, steps, hosts = [], [], []
    for _ in range(repeats + 1):  # the first run is a warm-up
        e.records.clear()
        t0 = time.perf_counter()
        done = e.generate(prompts, sampling)
        times.append(time.perf_counter() - t0)
        steps.append(statistics.median(r.end - r.start for r in e.records))
        hosts.append(statistics.median(r.end - r.start - r.wait_s for r in e.records))
    wall = statistics.median(times[1:])
    out = {"method": method, "k": k if method != "none" else 0, "batch": batch, "temperature": temperature,
           "tok_s": batch * new_tokens / wall, "wall_s": wall, "step_ms": 1e3 * statistics.median(steps[1:]),
           "host_ms": 1e3 * statistics.median(hosts[1:]), "num_steps": len(e.records),
           "compile_s": warm["compile_s"], "num_executables": warm["num_layouts"]}
    assert all(len(c.tokens) == new_tokens for c in done)
    spec = speculation(done)
    if spec:
        out |= {"acceptance": spec["spec_acceptance_rate"], "tokens_per_verify": spec["spec_mean_accepted_length"],
                "acceptance_by_position": spec["spec_acceptance_by_position"]}
    return out


def derive(row: dict, c: float) -> dict:
    """Adds to a speculative row a (per-token acceptance: accepted / examined, from its stored
    rates) and Leviathan's predicted speedup at that a, the measured c (0 for n-gram) and its k."""
    if "tokens_per_verify" in row:
        kept = row["tokens_per_verify"] - 1  # per verify step
        rejected = 1 - (row["acceptance_by_position"][-1] if row["acceptance_by_position"] else 0)
        row["a"] = kept / (kept + rejected) if kept + rejected else 1.0
        row["predicted"] = predicted(row["a"], c if row["method"] == "draft" else 0.0, row["k"])
    return row


def predicted(a: float, c: float, k: int) -> float:
    return (1 - a ** (k + 1)) / ((1 - a) * (k * c + 1)) if a < 1 else (k + 1) / (k * c + 1)


def plot(report: dict, path: str | Path) -> None:
    """Speedup over plain decoding against k at batch 1 (measured and predicted), per method and temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["batch"] == 1 and r["method"] != "none"]
    temps = sorted({r["temperature"] for r in rows})
    fig, axes = plt.subplots(1, len(temps), figsize=(5 * len(temps), 3.6), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], temps):
        for method, color in (("draft", "tab:blue"), ("ngram", "tab:orange")):
            pts = sorted((r["k"], r["speedup"], r.get("predicted")) for r in rows if r["method"] == method and r["temperature"] == t)
            if pts:
                ks, got, pred = zip(*pts)
                ax.plot(ks, got, "o-", color=color, label=f"{method}: measured")
                ax.plot(ks, pred, "x--", color=color, alpha=0.6, label=f"{method}: predicted (a, c, k)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"batch 1, temperature {t}", xlabel="k (drafts per step)")
    axes[0][0].set_ylabel("tokens/s over plain decoding")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"speculative decoding on the shipped pair, {report['env']['device']} (c = {report['c']:.2f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,2,4,6")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--temperatures", default="0,0.8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scan-layers", choices=("true", "false"), default="false",
                    help="layers under lax.scan, or unrolled (default; faster on CPU: see ModelConfig.scan_layers)")
    ap.add_argument("--json", default="results/speculative/summary.json")
    ap.add_argument("--plot-only", metavar="SUMMARY", help="redraw the plot of an earlier run's summary.json")
    args = ap.parse_args(argv)
    if args.plot_only:
        report = json.loads(Path(args.plot_only).read_text())
        report["rows"] = [derive(r, report["c"]) for r in report["rows"]]
        plot(report, Path(args.plot_only).with_name("speedup.png"))
        return 0
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    scan = args.scan_layers == "true"
    target, draft = load_model(TARGET, scan_layers=scan), load_model(DRAFT, scan_layers=scan)
    tok = load_tokenizer(TARGET)
    prompts = story_prompts(tok, max(batches), args.prompt_len)
    run = lambda m, model, d, k, t, b: measure(model, d, tok, prompts[:b], m, k, t, args.repeats, args.new_tokens)  # noqa: E731
    rows = []
    # c: the draft's plain decode step time over the target's, batch 1.
    plain_target = run("none", target, None, 0, 0.0, 1)
    plain_draft = run("none", draft, None, 0, 0.0, 1)
    c = plain_draft["step_ms"] / plain_target["step_ms"]
    print(f"c = draft/target step time = {plain_draft['step_ms']:.3f} / {plain_target['step_ms']:.3f} ms = {c:.3f}")
    header = f"{'batch':>5} {'temp':>4} {'method':>6} {'k':>2} {'tok/s':>8} {'x plain':>7} {'predicted':>9} " \
             f"{'a':>6} {'tok/verify':>10} {'step ms':>7} {'host ms':>7} {'compile s':>9}"
    print(header)
    for b in batches:
        for t in temps:
            base = plain_target if (b, t) == (1, 0.0) else run("none", target, None, 0, t, b)
            combos = [("draft", k) for k in ks] + [("ngram", k) for k in ks] if b == 1 else \
                [("draft", k) for k in ks[-2:-1] or ks] + [("ngram", k) for k in ks[-2:-1] or ks]
            for r in [base] + [run(m, target, draft, k, t, b) for m, k in combos]:
                r["speedup"] = r["tok_s"] / base["tok_s"]
                rows.append(derive(r, c))
                print(f"{b:>5} {t:>4} {r['method']:>6} {r['k']:>2} {r['tok_s']:>8.1f} {r['speedup']:>7.2f} "
                      f"{r.get('predicted', float('nan')):>9.2f} {r.get('a', float('nan')):>6.3f} "
                      f"{r.get('tokens_per_verify', float('nan')):>10.2f} {r['step_ms']:>7.2f} {r['host_ms']:>7.2f} "
                      f"{r['compile_s']:>9.1f}", flush=True)
    report = {"c": c, "plain_target": plain_target, "plain_draft": plain_draft, "rows": rows, "args": vars(args),
              "env": {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "python": platform.python_version(),
                      "time": time.strftime("%Y-%m-%d %H:%M:%S")}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        plot(report, Path(args.json).with_name("speedup.png"))
        print(f"wrote {args.json} and speedup.png beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
