"""`jaxinfer bench`: an offline workload through one or more serving modes in one process,
printed as a metrics table and written as JSON (with the resolved config and versions)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from jaxinfer.config import BenchConfig, RunConfig, SamplingConfig, to_dict
from jaxinfer.engine import Engine
from jaxinfer.metrics import format_table, goodput, summarize
from jaxinfer.static import StaticBatcher

MODES = ("continuous", "static", "sequential")  # static: dense cache reserved for engine.max_model_len


def workload(b: BenchConfig, vocab_size: int) -> list[tuple[list[int], SamplingConfig, float]]:
    """(prompt ids, sampling, arrival offset in seconds) per request, deterministic from b.seed."""
    rng = np.random.default_rng(b.seed)
    draw = lambda lo, hi, n: rng.integers(lo, max(lo, hi) + 1, n)  # noqa: E731
    prompt_lens = draw(b.prompt_len, b.prompt_len_max, b.num_requests)
    output_lens = draw(b.output_len, b.output_len_max, b.num_requests)
    prefix = rng.integers(0, vocab_size, b.shared_prefix_len).tolist()
    gaps = rng.exponential(1.0 / b.arrival_rate, b.num_requests) if b.arrival_rate > 0 else np.zeros(b.num_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [(prefix + rng.integers(0, vocab_size, int(p)).tolist(),
             SamplingConfig(max_new_tokens=int(o), seed=b.seed + i), float(a))
            for i, (p, o, a) in enumerate(zip(prompt_lens, output_lens, arrivals))]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", leave=False)


def run_continuous(engine: Engine, reqs, desc: str = "continuous"):
    t0 = engine.clock()
    order = sorted(range(len(reqs)), key=lambda i: reqs[i][2])
    running, done, nxt = {}, {}, 0  # request id -> workload index; workload index -> completion
    with _progress(len(reqs), desc) as bar:
        while nxt < len(order) or engine.has_work():
            now = engine.clock() - t0
            while nxt < len(order) and reqs[order[nxt]][2] <= now:
                i = order[nxt]
                running[engine.add_request(reqs[i][0], reqs[i][1], stop_ids=(), arrival=t0 + reqs[i][2])] = i
                nxt += 1
            if engine.has_work():
                engine.step()
                for rid in [r for r in running if engine.scheduler.get(r).finish_reason]:
                    done[running.pop(rid)] = engine.completion(rid)
                    bar.update(1)
            else:
                time.sleep(max(0.0, reqs[order[nxt]][2] - (engine.clock() - t0)))
    for rid, i in running.items():  # finished at add (an error): never stepped
        done[i] = engine.completion(rid)
    return [done[i] for i in range(len(reqs))]


def run_mode(mode: str, model, cfg: RunConfig, reqs, draft=None):
    """-> (completions, summary, steps) of one mode over the workload (arrival offsets from now);
    steps: (tokens, rows, live kv tokens) of every step run, the roofline's input."""
    if mode == "continuous":
        engine = Engine(model, None, cfg.engine, draft=draft)
        done = run_continuous(engine, reqs)
        steps = [(r.num_tokens, r.num_rows, r.live_tokens) for r in engine.records]
        return done, summarize(done, engine.records, cfg.engine.page_size, engine.scheduler.num_preemptions), steps
    if mode in ("static", "sequential"):
        static = mode == "static"
        batcher = StaticBatcher(model, cfg.engine.max_num_seqs if static else 1, cfg.decode,
                                reserve_len=min(cfg.engine.max_model_len, model.cfg.max_position_embeddings) if static else None)
        t0 = batcher.clock()
        with _progress(len(reqs), mode) as bar:
            done = batcher.run([(p, s, t0 + a) for p, s, a in reqs], progress=bar)
        return done, summarize(done), batcher.steps
    raise ValueError(f"bench mode '{mode}' is unknown; choose from {', '.join(MODES)}")


def check_workload(cfg: RunConfig, model) -> None:
    """ValueError naming the setting when the workload cannot run as asked on this model."""
    b = cfg.bench
    for mode in b.modes:
        if mode not in MODES:
            raise ValueError(f"bench mode '{mode}' is unknown; choose from {', '.join(MODES)}")
    context = min(cfg.engine.max_model_len, model.cfg.max_position_embeddings)
    longest = b.shared_prefix_len + max(b.prompt_len, b.prompt_len_max) + max(b.output_len, b.output_len_max)
    if longest > context:
        raise ValueError(f"bench: shared prefix {b.shared_prefix_len} + prompt {max(b.prompt_len, b.prompt_len_max)} "
                         f"+ output {max(b.output_len, b.output_len_max)} = {longest} tokens exceeds the context of "
                         f"{context} (engine.max_model_len, capped by the model); shorten the workload")


def _bench_http(cfg: RunConfig, model, reqs, url: str, api_key, results: dict) -> dict | None:
    """Mode "http" into `results`; -> the p50 latency differences from "continuous" (seconds), if it ran."""
    from jaxinfer.serve.client import model_card, run_http

    card = model_card(url, api_key)
    if card.get("vocab_size", model.cfg.vocab_size) != model.cfg.vocab_size:
        raise ValueError(f"bench --url: the server's model has {card['vocab_size']} tokens but the config's "
                         f"{model.cfg.vocab_size}: give the server's config (--config) so both run one workload")
    if cfg.bench.warmup:
        t0 = time.perf_counter()
        run_http(url, reqs, api_key, "http warmup")
        warm = time.perf_counter() - t0
    done = run_http(url, reqs, api_key)
    errors = [d.error for d in done if d.error]
    if errors:
        print(f"bench --url: {len(errors)} of {len(done)} requests failed; the first: {errors[0]}")
    results["http"] = summarize(done) | {"warmup_s": warm if cfg.bench.warmup else float("nan")}
    if "continuous" not in results:
        return None
    return {f"{m.upper()} {'mean' if m == 'itl' else 'p50'}": results["http"][f"{m}_s"][stat] -
            results["continuous"][f"{m}_s"][stat] for m, stat in (("ttft", "p50"), ("tpot", "p50"), ("itl", "mean"))}


def bench(cfg: RunConfig, model, out: str | Path | None = None, draft=None, url: str | None = None,
          api_key: str | None = None) -> dict:
    """Runs every mode of cfg.bench on the same workload; prints the table; writes JSON.
    `draft`: the draft model when engine.speculative.method is draft (continuous mode uses it).
    `url`: also send the workload to a `jaxinfer serve` there (mode "http", timed by the client),
    and report its latency over the in-process continuous mode: the HTTP path's cost."""
    import jax

    check_workload(cfg, model)
    reqs = workload(cfg.bench, model.cfg.vocab_size)
    results, compile_s = {}, {}
    if cfg.bench.warmup_shapes and "continuous" in cfg.bench.modes:
        info = Engine(model, None, cfg.engine, draft=draft).warmup()  # compiled steps are shared by engines
        print(f"warmup: {info['num_layouts']} step shapes in {info['compile_s']:.1f} s", flush=True)
    for mode in cfg.bench.modes:
        if cfg.bench.warmup:
            t0 = time.perf_counter()
            run_mode(mode, model, cfg, reqs, draft)  # the same arrivals: the same step shapes compile
            compile_s[mode] = time.perf_counter() - t0
        done, results[mode], _ = run_mode(mode, model, cfg, reqs, draft)
        b = cfg.bench
        if b.slo_ttft_s or b.slo_tpot_s:
            results[mode] |= goodput(done, results[mode]["wall_s"], b.slo_ttft_s, b.slo_tpot_s)
        results[mode]["warmup_s"] = compile_s.get(mode, float("nan"))
    overhead = None
    if url:
        overhead = _bench_http(cfg, model, reqs, url, api_key, results)
    print(format_table(results))
    if overhead:
        print("HTTP over in-process (p50): " + ", ".join(f"{k} {v * 1e3:+.2f} ms" for k, v in overhead.items()))
    report = {"results": results, "http_overhead_s": overhead, "config": to_dict(cfg), "env": {
        "jax": jax.__version__, "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
        "python": platform.python_version(), "machine": platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))
    return report
