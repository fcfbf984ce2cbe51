"""HOST ONLY: serving metrics, one definition each, from completions and per-step records.

Definitions (all times in seconds on one clock):
- TTFT: first token time - arrival.
- TPOT: (last token time - first token time) / (output tokens - 1); requests with one token excluded.
- ITL: every gap between consecutive tokens of a request (pooled over requests).
- E2E: last token time - arrival.
- Queue: first scheduled - arrival.
- Throughput: tokens / (last token time of any request - first arrival); input = prompt tokens,
  output = generated tokens, total = both.
- KV pages used: pages with a reference after each step (mean, max); slot occupancy: live tokens /
  (pages used * page size), mean over steps.
- Prefix-cache hit rate: prompt tokens served from cached pages / prompt tokens.
- Host overhead per step: step wall time minus the time blocked reading tokens back, as a
  fraction of the step's wall time. With async scheduling the device runs the next step meanwhile,
  so this is time the host needs, not time the device idles, as long as it stays below 1.
- Goodput (given SLOs): requests whose TTFT <= bench.slo_ttft_s and TPOT <= bench.slo_tpot_s, per
  second of the run's wall time.

Roofline (`Footprint` of the model, `Machine` measured in the same run; `step_bound`):
- Bytes a step reads: every weight once, *except* the input embedding table, of which a step reads
  only the rows of its tokens (a tied table is read whole anyway, as the LM head); plus the live KV
  of every row (kv tokens x layers x 2 (K and V) x KV heads x head dim x bytes).
  Memory bound = bytes / measured read bandwidth.
- FLOPs of a step: 2 x (weights of the layers) x tokens + 2 x (LM head weights) x logit rows (the
  matmuls; attention's 4 x layers x heads x head dim x kv length per token is left out).
  Compute bound = FLOPs / measured matmul peak.
- A step's bound is the larger of the two (that one is "binding"); a run's bound is the sum over its
  steps; "% of bound" = bound time / measured time (100% = at the roofline).
- Cost: $ per 1M output tokens = price per device-hour x devices / 3600 / (output tokens/s) x 1e6,
  prices from one table (jaxinfer/presets/prices.yaml, each with its source and date). Other
  devices' costs are at *their* roofline for the same steps (spec-sheet bandwidth and peak): a
  lower bound on what the run would cost there, not a measurement.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PERCENTILES = (50, 90, 99)


def percentiles(values) -> dict[str, float]:
    v = np.asarray([x for x in values if x == x], np.float64)
    out = {f"p{p}": float(np.percentile(v, p)) if v.size else float("nan") for p in PERCENTILES}
    out["mean"] = float(v.mean()) if v.size else float("nan")
    return out


def request_latencies(c) -> dict[str, float | list[float]]:
    """TTFT, TPOT, E2E, queue and ITLs of one completion (NaN where undefined)."""
    t = c.token_times
    nan = float("nan")
    return {
        "ttft": t[0] - c.arrival if t else nan,
        "tpot": (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else nan,
        "e2e": t[-1] - c.arrival if t else nan,
        "queue": c.scheduled - c.arrival if c.scheduled is not None else nan,
        "itl": list(np.diff(t)) if len(t) > 1 else [],
    }


def summarize(completions, records=(), page_size: int | None = None, num_preemptions: int = 0) -> dict:
    """The metrics above for one run; `records` are the engine's StepRecords (may be empty)."""
    ok = [c for c in completions if c.error is None and c.token_times]
    lat = [request_latencies(c) for c in ok]
    start = min(c.arrival for c in ok) if ok else 0.0
    end = max(c.token_times[-1] for c in ok) if ok else 0.0
    wall = max(end - start, 1e-12)
    n_in = sum(len(c.prompt_tokens) for c in ok)
    n_out = sum(len(c.tokens) for c in ok)
    summary = {
        "num_requests": len(completions), "num_errors": sum(c.error is not None for c in completions),
        "wall_s": wall, "input_tokens": n_in, "output_tokens": n_out,
        "throughput_input_tok_s": n_in / wall, "throughput_output_tok_s": n_out / wall,
        "throughput_total_tok_s": (n_in + n_out) / wall,
        "ttft_s": percentiles(x["ttft"] for x in lat), "tpot_s": percentiles(x["tpot"] for x in lat),
        "itl_s": percentiles(g for x in lat for g in x["itl"]), "e2e_s": percentiles(x["e2e"] for x in lat),
        "queue_s": percentiles(x["queue"] for x in lat),
        "prefix_cache_hit_rate": sum(c.num_cached_tokens for c in ok) / max(n_in, 1),
        "preemptions": num_preemptions,
    }
    summary |= speculation(ok)
    if records:
        walls = np.array([r.end - r.start for r in records])
        host = walls - np.array([r.wait_s for r in records])
        pages = np.array([r.pages_used for r in records])
        summary |= {
            "num_steps": len(records), "step_s": percentiles(walls), "host_s_per_step": percentiles(host),
            "host_fraction_of_step": float(np.median(host / np.maximum(walls, 1e-12))),
            "kv_pages_used_mean": float(pages.mean()), "kv_pages_used_max": int(pages.max()),
        }
        if page_size:
            occ = [r.live_tokens / (r.pages_used * page_size) for r in records if r.pages_used]
            summary["kv_slot_occupancy_mean"] = float(np.mean(occ)) if occ else float("nan")
    return summary


def speculation(completions) -> dict:
    """Speculative decoding, over requests that verified drafts: drafts proposed and accepted, the
    acceptance rate (accepted / proposed), the per-token acceptance a (accepted / examined: the
    a of (1 - a^(k+1)) / (1 - a)), the mean tokens a verify step yields (accepted + 1) and, per
    draft position j, the fraction of verify steps that kept draft j."""
    spec = [c for c in completions if getattr(c, "num_verify_steps", 0)]
    if not spec:
        return {}
    proposed, accepted = sum(c.num_proposed for c in spec), sum(c.num_accepted for c in spec)
    steps = sum(c.num_verify_steps for c in spec)
    k = max(len(c.accepted_at) for c in spec)
    by_position = [sum(c.accepted_at[j] for c in spec if len(c.accepted_at) > j) / steps for j in range(k)]
    rejected = steps - sum(c.accepted_at[k - 1] for c in spec if len(c.accepted_at) == k)  # steps not all kept
    return {"spec_proposed": proposed, "spec_accepted": accepted, "spec_acceptance_rate": accepted / max(proposed, 1),
            # a of Leviathan et al.: P(a draft is kept | the ones before it were), from the drafts examined
            "spec_per_token_acceptance": accepted / max(accepted + rejected, 1),
            "spec_mean_accepted_length": (accepted + steps) / steps, "spec_verify_steps": steps,
            "spec_acceptance_by_position": by_position}


def format_table(results: dict[str, dict]) -> str:
    """One column per mode; rows are the headline metrics (ms for latencies)."""
    rows = [("requests", "num_requests", 1, "{:.0f}"), ("errors", "num_errors", 1, "{:.0f}"),
            ("wall s", "wall_s", 1, "{:.2f}"),
            ("output tok/s", "throughput_output_tok_s", 1, "{:.1f}"),
            ("total tok/s", "throughput_total_tok_s", 1, "{:.1f}")]
    for name in ("ttft", "tpot", "itl", "e2e", "queue"):
        for p in ("mean", "p50", "p90", "p99"):
            rows.append((f"{name.upper()} {p} ms", (f"{name}_s", p), 1e3, "{:.1f}"))
    rows += [("prefix hit rate", "prefix_cache_hit_rate", 1, "{:.2f}"), ("preemptions", "preemptions", 1, "{:.0f}"),
             ("steps", "num_steps", 1, "{:.0f}"), ("host ms/step p50", ("host_s_per_step", "p50"), 1e3, "{:.2f}"),
             ("step ms p50", ("step_s", "p50"), 1e3, "{:.2f}"), ("host / step", "host_fraction_of_step", 1, "{:.3f}"),
             ("KV pages max", "kv_pages_used_max", 1, "{:.0f}"), ("KV slot occupancy", "kv_slot_occupancy_mean", 1, "{:.2f}"),
             ("goodput req/s", "goodput_req_s", 1, "{:.2f}"), ("SLO attainment", "slo_attainment", 1, "{:.2f}"),
             ("drafts accepted", "spec_acceptance_rate", 1, "{:.3f}"),
             ("tokens / verify step", "spec_mean_accepted_length", 1, "{:.2f}")]
    modes = list(results)
    width = max(12, *(len(m) + 2 for m in modes))
    lines = [f"{'metric':<22}" + "".join(f"{m:>{width}}" for m in modes)]
    for label, key, scale, fmt in rows:
        cells = []
        for m in modes:
            v = results[m].get(key[0], {}).get(key[1]) if isinstance(key, tuple) else results[m].get(key)
            cells.append(f"{fmt.format(v * scale):>{width}}" if isinstance(v, (int, float)) and v == v else f"{'-':>{width}}")
        lines.append(f"{label:<22}" + "".join(cells))
    return "\n".join(lines)


def goodput(completions, wall_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    """Requests meeting both SLOs (a limit of 0 is no limit), per second and as a fraction."""
    ok = [c for c in completions if c.error is None and c.token_times]
    lat = [request_latencies(c) for c in ok]
    met = sum((not slo_ttft_s or x["ttft"] <= slo_ttft_s) and (not slo_tpot_s or not x["tpot"] > slo_tpot_s)
              for x in lat)
    return {"goodput_req_s": met / max(wall_s, 1e-12), "slo_attainment": met / max(len(completions), 1)}


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What one step of a model reads and computes, in plain numbers (from `experiment.machine.footprint`)."""

    streamed_bytes: int  # weights read once per step: all but the input embedding table (unless tied)
    embed_row_bytes: int  # one row of the input embedding table (read per token)
    kv_bytes_per_token: int  # layers x 2 x KV heads x head dim x bytes: KV of one position
    layer_params: int  # matmul weights applied to every token
    head_params: int  # LM head (vocab x hidden): applied to rows that need logits


@dataclasses.dataclass(frozen=True)
class Machine:
    """Measured (or spec-sheet) limits: read bandwidth in bytes/s, matmul peak in FLOP/s."""

    read_bytes_per_s: float
    peak_flops_per_s: float


def step_bound(fp: Footprint, m: Machine, tokens: int, rows: int, kv_tokens: int) -> dict:
    """Memory and compute lower bounds (seconds) of one step of `tokens` tokens over `rows` rows
    (logit rows) reading `kv_tokens` live KV positions; the binding one is the larger."""
    num_bytes = fp.streamed_bytes + tokens * fp.embed_row_bytes + kv_tokens * fp.kv_bytes_per_token
    flops = 2 * fp.layer_params * tokens + 2 * fp.head_params * rows
    memory_s, compute_s = num_bytes / m.read_bytes_per_s, flops / m.peak_flops_per_s
    return {"bytes": num_bytes, "flops": flops, "memory_s": memory_s, "compute_s": compute_s,
            "bound_s": max(memory_s, compute_s), "binding": "memory" if memory_s >= compute_s else "compute"}


def run_bound(fp: Footprint, m: Machine, steps) -> dict:
    """Sums `step_bound` over `steps` (tokens, rows, kv_tokens) triples; binding = the larger total."""
    bounds = [step_bound(fp, m, *s) for s in steps]
    memory_s, compute_s = sum(b["memory_s"] for b in bounds), sum(b["compute_s"] for b in bounds)
    return {"bound_s": sum(b["bound_s"] for b in bounds), "memory_bound_s": memory_s, "compute_bound_s": compute_s,
            "bytes_read": sum(b["bytes"] for b in bounds), "flops": sum(b["flops"] for b in bounds),
            "binding": "memory" if memory_s >= compute_s else "compute"}


def roofline_columns(bound: dict, measured_s: float, output_tokens: int) -> dict:
    """The row's roofline columns: bound tokens/s, measured / bound (%), the binding limit."""
    return {"bound_tok_s": output_tokens / bound["bound_s"] if bound["bound_s"] else float("nan"),
            "pct_of_bound": 100 * bound["bound_s"] / measured_s if measured_s else float("nan"),
            "binding": bound["binding"], "memory_bound_s": bound["memory_bound_s"],
            "compute_bound_s": bound["compute_bound_s"]}


def usd_per_million(tokens_per_s: float, usd_per_hour: float, num_devices: int = 1) -> float:
    """$ per 1M tokens at `tokens_per_s` on `num_devices` devices of `usd_per_hour` each."""
    return usd_per_hour * num_devices / 3600 / tokens_per_s * 1e6 if tokens_per_s > 0 else float("nan")
