"""What each experiment kind measures: `KINDS[kind](run, ctx) -> (rows, requests)`. A row is one
line of the results table (metrics by name, plus row labels such as `mode`); requests are the
per-request records written as JSONL. Warm-up and compile are always timed apart."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import numpy as np

from jaxinfer.config import RunConfig
from jaxinfer.metrics import request_latencies, roofline_columns, run_bound, speculation, usd_per_million


class Context:
    """What runs of one experiment share: loaded models (a few, by config), the machine's measured
    limits (once per dtype), the price table, and cached baselines."""

    def __init__(self, spec, prices: dict):
        self.spec, self.prices, self._models, self.cache = spec, prices, {}, {}

    def model(self, cfg: RunConfig):
        """(model, tokenizer, label) of cfg's checkpoint / random init and quantization, cached."""
        from jaxinfer.checkpoint import build

        key = (cfg.checkpoint, cfg.tokenizer, cfg.seed, cfg.model)
        if key not in self._models:
            if len(self._models) >= 3:
                self._models.pop(next(iter(self._models)))
            model, tok, _, label = build(cfg)
            self._models[key] = (model, tok, label)
        return self._models[key]

    def machine(self, dtype: str, streamed_bytes: int) -> dict:
        """Read bandwidth over a buffer the size of what a step streams (whole MiB, at most
        experiment.bandwidth_mb) and the matmul peak in `dtype`, each measured once per run of
        `jaxinfer run` and kept in every env.json."""
        from jaxinfer.experiment import machine

        mib = min(max(1, -(-streamed_bytes // 2**20)), self.spec.bandwidth_mb)
        if ("bandwidth", mib) not in self.cache:
            self.cache["bandwidth", mib] = machine.bandwidth(mib * 2**20)
        if ("peak", dtype) not in self.cache:
            self.cache["peak", dtype] = machine.matmul_peak(self.spec.matmul_size, dtype)
        return self.cache["bandwidth", mib] | self.cache["peak", dtype]

    def measurements(self) -> list[dict]:
        """Every bandwidth and peak measured so far by this process (written into env.json)."""
        return [v for k, v in self.cache.items() if isinstance(k, tuple) and k[0] in ("bandwidth", "peak")]


def device_price(prices: dict, device_kind: str) -> tuple[str | None, dict | None]:
    """The price entry whose `match` prefix is the longest prefix of device_kind."""
    hits = [p for p in prices.get("match", {}) if device_kind.startswith(p)]
    if not hits:
        return None, None
    name = prices["match"][max(hits, key=len)]
    return name, prices["devices"][name]


def perf(row: dict, model, cfg: RunConfig, ctx: Context, steps, measured_s: float, output_tokens: int,
         paged: bool = True) -> dict:
    """Adds the roofline and cost columns to a performance row: steps are (tokens, rows, kv tokens).
    `paged`: the run's KV lives in the engine's pages (engine.kv_cache_dtype), not a dense cache."""
    from jaxinfer.experiment.machine import as_machine, footprint
    from jaxinfer.metrics import Machine

    fp = footprint(model, cfg.engine if paged else None)
    m = ctx.machine(model.cfg.dtype, fp.streamed_bytes)
    bound = run_bound(fp, as_machine(m), steps)
    row |= roofline_columns(bound, measured_s, output_tokens)
    row |= {"read_gb_s": m["read_bytes_per_s"] / 1e9, "peak_gflops": m["peak_flops_per_s"] / 1e9,
            "bandwidth_buffer_mib": m["bandwidth_buffer_bytes"] / 2**20,
            "bytes_per_step": bound["bytes_read"] / max(len(steps), 1), "weight_mib": fp.streamed_bytes / 2**20}
    tok_s = output_tokens / measured_s if measured_s else float("nan")
    row |= price_here(tok_s, cfg, ctx)
    for other in ctx.prices.get("compare", []):
        d = ctx.prices["devices"][other]
        b = run_bound(fp, Machine(d["read_gb_s"] * 1e9, d["peak_tflops"] * 1e12), steps)
        row[f"usd_per_1m_at_bound[{other}]"] = usd_per_million(output_tokens / b["bound_s"], d["usd_per_hour"])
    return row


def _random_prompts(cfg: RunConfig, vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(cfg.bench.seed)
    return [rng.integers(0, vocab_size, cfg.bench.prompt_len).tolist() for _ in range(cfg.bench.num_requests)]


def _decode_speed(model, cfg: RunConfig, ctx: Context) -> dict:
    """Batch decode through the dense-cache generate(): bench.num_requests rows of bench.prompt_len
    random tokens, bench.output_len new tokens each (EOS ignored); medians of the repeats."""
    from jaxinfer.generate import Generator

    b = cfg.bench
    gen = Generator(model, cfg.decode)
    prompts = _random_prompts(cfg, model.cfg.vocab_size)
    sampling = dataclasses.replace(cfg.sampling, max_new_tokens=b.output_len, seed=b.seed, stop=())
    first = gen.generate(prompts, sampling, stop_ids=())  # compiles
    timings = [gen.generate(prompts, sampling, stop_ids=()).timing for _ in range(ctx.spec.repeats)]
    decode_s = statistics.median(t.decode_s for t in timings)
    num_decoded = timings[0].num_decoded
    batch = len(prompts)
    steps = [(batch, batch, batch * (b.prompt_len + 1 + i)) for i in range(num_decoded // batch)]
    row = {"batch": batch, "tok_s": num_decoded / decode_s, "prefill_ms": 1e3 * statistics.median(t.prefill_s for t in timings),
           "step_ms": 1e3 * decode_s / max(len(steps), 1), "compile_s": first.timing.compile_s,
           "tok_s_repeats": [t.num_decoded / t.decode_s for t in timings]}
    ctx.cache["greedy_tokens"] = list(first.tokens[0])  # what a peer's first row is compared with
    return perf(row, model, cfg, ctx, steps, decode_s, num_decoded, paged=False)


def _engine_decode_speed(model, tok, cfg: RunConfig, ctx: Context) -> dict:
    """The same workload as _decode_speed through the Engine (paged cache, host scheduler): after
    one warm-up pass, the time per decode step (TPOT) is the spacing of the decode-only steps'
    ends (the engine pipelines dispatch, so a step's own start-to-end is not its cost)."""
    from jaxinfer.engine import Engine

    b = cfg.bench
    prompts = _random_prompts(cfg, model.cfg.vocab_size)
    e = Engine(model, tok, cfg.engine, stop_ids=())
    sampling = dataclasses.replace(cfg.sampling, max_new_tokens=b.output_len, seed=b.seed, stop=())
    t0 = time.perf_counter()
    e.generate(prompts, sampling)  # warm-up: compiles the shapes this workload meets
    compile_s = time.perf_counter() - t0
    tpot, steps = [], []
    for _ in range(ctx.spec.repeats):
        e.records.clear()
        e.generate(prompts, sampling)
        decode = [r for r in e.records if r.num_tokens == r.num_rows]  # decode-only steps
        if len(decode) < 2:
            raise ValueError(f"the engine made {len(decode)} decode-only steps; raise bench.output_len")
        tpot.append((decode[-1].end - decode[0].end) / (len(decode) - 1))
        steps = [(r.num_tokens, r.num_rows, r.live_tokens) for r in decode]
    step_s = statistics.median(tpot)
    batch = len(prompts)
    row = {"batch": batch, "tok_s": batch / step_s, "step_ms": 1e3 * step_s, "compile_s": compile_s,
           "tok_s_repeats": [batch / t for t in tpot]}
    return perf(row, model, cfg, ctx, steps, step_s * len(steps), batch * len(steps))


def price_here(tok_s: float, cfg: RunConfig, ctx: Context) -> dict:
    """$ per 1M output tokens at `tok_s` on the device this run holds (prices.yaml)."""
    import jax

    device = jax.devices()[0]
    # Devices the run held: a CPU is priced per VM (simulated devices are one machine); else the mesh.
    num_devices = 1 if device.platform == "cpu" else math.prod(cfg.engine.mesh)
    name, own = device_price(ctx.prices, device.device_kind)
    return {"usd_per_1m": usd_per_million(tok_s, own["usd_per_hour"], num_devices) if own else float("nan"),
            "price_device": name}


def decode(run, ctx: Context):
    """Each of experiment.decoders, then each of experiment.peers (other engines on the same
    weights; their first row's greedy tokens are compared with the generator's when it ran)."""
    from jaxinfer.experiment import peers

    model, tok, label = ctx.model(run.cfg)
    ctx.cache.pop("greedy_tokens", None)
    rows = []
    for decoder in ctx.spec.decoders:
        if decoder == "generator":
            row = _decode_speed(model, run.cfg, ctx)
        else:
            row = _engine_decode_speed(model, tok, run.cfg, ctx)
        rows.append(row | {"model": label, "decoder": decoder})
    for peer in ctx.spec.peers:
        # No bound column: a peer's weights are in its own format (q8_0 and q4_0 carry a scale per
        # 32 weights), so jaxinfer's byte count is not theirs.
        row = peers.measure(peer, run.cfg, ctx, ctx.cache.get("greedy_tokens"))
        if row is None:
            print(f"{run.run_id}: peer {peer} has no {peers.precision(run.cfg)} path; not measured")
            continue
        rows.append(row | price_here(row["tok_s"], run.cfg, ctx)
                    | {"batch": run.cfg.bench.num_requests, "model": label, "decoder": peer})
    return rows, []


def _request_records(done, **labels) -> list[dict]:
    out = []
    for i, c in enumerate(done):
        lat = request_latencies(c)
        out.append(labels | {"index": i, "prompt_tokens": len(c.prompt_tokens), "output_tokens": len(c.tokens),
                             "finish": c.finish_reason, "error": c.error, "cached_tokens": c.num_cached_tokens,
                             "preemptions": c.num_preemptions, "seed": c.seed,
                             **{k: lat[k] for k in ("ttft", "tpot", "e2e", "queue")},
                             "verify_steps": c.num_verify_steps, "accepted": c.num_accepted})
    return out


def serve(run, ctx: Context):
    """Each mode of bench.modes over the bench workload: a warm-up pass of the same workload (its
    arrivals too, so the step shapes it compiles are those the repeats meet), then the repeats; the
    repeat with the median output throughput is reported (its spread beside it)."""
    from jaxinfer.bench import check_workload, run_mode, workload
    from jaxinfer.checkpoint import load_draft
    from jaxinfer.metrics import goodput

    cfg = run.cfg
    model, tok, label = ctx.model(cfg)
    draft = load_draft(cfg, model, tok)
    check_workload(cfg, model)
    reqs = workload(cfg.bench, model.cfg.vocab_size)
    rows, requests = [], []
    for mode in cfg.bench.modes:
        t0 = time.perf_counter()
        layouts = None
        if mode == "continuous" and ctx.spec.compile_all_shapes:  # executables are shared by engines over the model
            from jaxinfer.engine import Engine

            layouts = Engine(model, None, cfg.engine, draft=draft).warmup(progress=False)["num_layouts"]
        if cfg.bench.warmup:
            run_mode(mode, model, cfg, reqs, draft)
        warmup_s = time.perf_counter() - t0
        reps = [run_mode(mode, model, cfg, reqs, draft) for _ in range(ctx.spec.repeats)]
        order = sorted(range(len(reps)), key=lambda i: reps[i][1]["throughput_output_tok_s"])
        done, summary, steps = reps[order[len(order) // 2]]
        failed = [c for c in done if c.error is not None]
        if failed:
            raise ValueError(f"{mode}: {len(failed)} of {len(done)} requests failed (first: {failed[0].error}); "
                             "fix the experiment's engine or bench settings")
        b = cfg.bench
        summary |= goodput(done, summary["wall_s"], b.slo_ttft_s, b.slo_tpot_s)
        row = {"mode": mode, **summary, "warmup_s": warmup_s, "model": label, "num_layouts": layouts,
               "tok_s_repeats": [r[1]["throughput_output_tok_s"] for r in reps]}
        rows.append(perf(row, model, cfg, ctx, steps, summary["wall_s"], summary["output_tokens"]))
        requests += _request_records(done, mode=mode)
    return rows, requests


def held_out(tok, num_stories: int, length: int) -> np.ndarray:
    """[n, length + 1] windows of the reference corpus's validation stories (BOS + story + EOS,
    concatenated): the split the shipped models never trained on (experiments/reference_models.yaml:
    seed 0, every 20th story)."""
    from jaxinfer.corpus import build_corpus, windows

    _, val = build_corpus(0, 20 * num_stories, 20)
    eos = tok.eos_ids[0] if tok.eos_ids else None
    stream = np.fromiter((t for s in val for t in tok.encode(s) + ([eos] if eos is not None else [])), np.int32)
    return windows(stream, length)


def quality(run, ctx: Context):
    """The quality gate (jaxinfer.quality) against the float model: bytes, perplexity on held-out
    text, KL(float || this) per token (mean, p99) and top-1 agreement, through the paged attention
    with the run's KV dtype; greedy-continuation agreement through the Engine (experiment.greedy_tokens);
    and speed (experiment.speed)."""
    from jaxinfer import quality as q
    from jaxinfer.checkpoint import load_draft

    cfg, spec = run.cfg, ctx.spec
    model, tok, label = ctx.model(cfg)
    if "held_out" not in ctx.cache:  # one tokenization per experiment: every variant scores the same text
        ctx.cache["held_out"] = held_out(tok, spec.eval_stories, spec.eval_len)
        ctx.cache["greedy_prompts"] = story_prompts(tok, spec.greedy_prompts, spec.greedy_prompt_len)
    windows, prompts = ctx.cache["held_out"], ctx.cache["greedy_prompts"]
    ref_cfg = q.reference_config(cfg)
    key = ("quality_ref", ref_cfg.checkpoint, ref_cfg.model, ref_cfg.engine)
    if key not in ctx.cache:
        ctx.cache[key] = q.evaluate_reference(cfg, windows, prompts, spec.greedy_tokens, lambda c: ctx.model(c)[:2])
    draft = load_draft(cfg, model, tok)
    row = q.evaluate(cfg, model, tok, draft, windows, prompts, spec.greedy_tokens, ctx.cache[key]) | {"model": label}
    if spec.speed == "engine":
        speed, _ = _engine_speed(model, tok, cfg, ctx, draft)
        return [row | {k: v for k, v in speed.items() if k not in row}], []
    return [row | {k: v for k, v in _decode_speed(model, cfg, ctx).items() if k not in row}], []


def story_prompts(tok, num: int, length: int) -> list[list[int]]:
    """Openings of `num` stories the shipped models never saw (another corpus seed than training)."""
    from jaxinfer.corpus import build_corpus

    _, val = build_corpus(seed=12345, num_stories=20 * num)
    prompts = [tok.encode(s)[:length] for s in val[:num]]
    if min(map(len, prompts)) < length:
        raise ValueError(f"bench.prompt_len={length}: a story opening has only {min(map(len, prompts))} tokens; "
                         "use a shorter prompt length")
    return prompts


def _engine_speed(model, tok, cfg: RunConfig, ctx: Context, draft=None) -> tuple[dict, list]:
    """Engine.generate over bench.num_requests story openings (bench.prompt_len tokens), each
    making bench.output_len tokens (EOS ignored), after Engine.warmup and one warm-up pass."""
    from jaxinfer.engine import Engine

    b = cfg.bench
    prompts = story_prompts(tok, b.num_requests, b.prompt_len)
    e = Engine(model, tok, cfg.engine, stop_ids=(), draft=draft)
    # experiment.compile_all_shapes false: the warm-up pass compiles the shapes this (deterministic,
    # all-at-once) workload meets, and nothing else
    warm = e.warmup(progress=False) if ctx.spec.compile_all_shapes else {"compile_s": float("nan"), "num_layouts": 0}
    sampling = dataclasses.replace(cfg.sampling, max_new_tokens=b.output_len, seed=b.seed, stop=())
    walls, step_s, host_s, records = [], [], [], []
    for i in range(ctx.spec.repeats + 1):  # the first pass is a warm-up
        e.records.clear()
        t0 = time.perf_counter()
        done = e.generate(prompts, sampling)
        walls.append(time.perf_counter() - t0)
        failed = [c for c in done if c.error is not None]
        if failed:
            raise ValueError(f"{len(failed)} of {len(done)} requests failed (first: {failed[0].error}); "
                             "fix the experiment's engine or bench settings")
        step_s.append(statistics.median(r.end - r.start for r in e.records))
        host_s.append(statistics.median(r.end - r.start - r.wait_s for r in e.records))
        records.append([(r.num_tokens, r.num_rows, r.live_tokens) for r in e.records])
    med = 1 + sorted(range(ctx.spec.repeats), key=lambda i: walls[1 + i])[ctx.spec.repeats // 2]
    out_tokens = sum(len(c.tokens) for c in done)
    row = {"batch": len(prompts), "tok_s": out_tokens / walls[med], "wall_s": walls[med],
           "step_ms": 1e3 * step_s[med], "host_ms": 1e3 * host_s[med], "num_steps": len(records[med]),
           "compile_s": warm["compile_s"], "num_layouts": warm["num_layouts"],
           "tok_s_repeats": [out_tokens / w for w in walls[1:]]}
    row |= {k: v for k, v in speculation(done).items() if k.startswith("spec_")}
    return perf(row, model, cfg, ctx, records[med], walls[med], out_tokens), done


def predicted_speedup(a: float, c: float, k: int) -> float:
    """Leviathan et al. 2023: expected speedup at per-token acceptance a, cost ratio c, k drafts."""
    return (1 - a ** (k + 1)) / ((1 - a) * (k * c + 1)) if a < 1 else (k + 1) / (k * c + 1)


def _cost_ratio(cfg: RunConfig, ctx: Context) -> float:
    """c: the draft's plain step time over the target's, batch 1, measured once per experiment."""
    from jaxinfer.checkpoint import build

    key = ("c", cfg.engine.speculative.draft_model, cfg.model)
    if key not in ctx.cache:
        one = dataclasses.replace(cfg.bench, num_requests=1)
        plain = dataclasses.replace(cfg.engine, speculative=dataclasses.replace(cfg.engine.speculative, method="none"))
        times = []
        for ckpt in (cfg.checkpoint, cfg.engine.speculative.draft_model):
            c2 = dataclasses.replace(cfg, checkpoint=ckpt, bench=one, engine=plain)
            model, tok, _, _ = build(c2)
            times.append(_engine_speed(model, tok, c2, ctx)[0]["step_ms"])
        ctx.cache[key] = times[1] / times[0]
    return ctx.cache[key]


def speculative(run, ctx: Context):
    """The engine with engine.speculative as configured (method none is the plain baseline)."""
    from jaxinfer.checkpoint import load_draft

    cfg = run.cfg
    model, tok, label = ctx.model(cfg)
    draft = load_draft(cfg, model, tok)
    row, done = _engine_speed(model, tok, cfg, ctx, draft)
    spec = cfg.engine.speculative
    row |= {"method": spec.method, "k": spec.num_drafts, "model": label}
    if spec.method != "none" and "spec_per_token_acceptance" in row:
        c = _cost_ratio(cfg, ctx) if spec.method == "draft" else 0.0
        row |= {"c": c, "predicted_speedup": predicted_speedup(row["spec_per_token_acceptance"], c, spec.num_drafts)}
    return [row], _request_records(done)


def compile_proofs(run, ctx: Context):
    """TPU compiles (libtpu, abstract topologies) of the kernels and the step, and CUDA exports,
    with the compiler's memory and cost analyses: the proof that the code builds for hardware
    this machine lacks."""
    import jax

    spec = ctx.spec
    # Real compile times: the persistent compilation cache (on under `jaxinfer run`) stays out.
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return _compile_rows(spec)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)


def _compile_rows(spec):
    from jaxinfer import aot

    model_cfg = aot.default_model_cfg(spec.small_model)
    rows = []
    tpu = aot.tpu_cases(model_cfg)
    known = set(tpu) | set(aot.gpu_cases())
    unknown = [c for c in spec.cases if c not in known]
    bad_topo = [t for t in spec.topologies if t not in aot.TOPOLOGIES]
    if bad_topo:
        raise ValueError(f"experiment.topologies {bad_topo}: unknown; choose from {', '.join(aot.TOPOLOGIES)}")
    if unknown:
        raise ValueError(f"experiment.cases {unknown}: unknown; choose from {'; '.join(sorted(known))}")
    names = [n for n in tpu if not spec.cases or n in spec.cases]
    for topo in spec.topologies:
        for name in names:
            fn, args = tpu[name]
            r = aot.compile_tpu(fn, args, topo)
            est = r["optimal_seconds"]  # the compiler's estimate; negative where it has none
            rows.append({"target": r["topology"], "case": name, "compile_s": r["compile_s"],
                         "temp_mib": r["temp_bytes"] / 2**20, "gb_moved": (r["bytes_accessed"] or 0) / 1e9,
                         "est_us": est * 1e6 if est is not None and est >= 0 else None,
                         "kernels": r.pop("hlo").count("tpu_custom_call")})
    if spec.cuda:
        for name, (fn, args) in aot.gpu_cases().items():
            if spec.cases and name not in spec.cases:
                continue
            t0 = time.perf_counter()
            text = aot.export_cuda(fn, args).mlir_module()
            rows.append({"target": "cuda (H200, export)", "case": name, "compile_s": time.perf_counter() - t0,
                         "kernels": text.count("__gpu$xla.gpu.triton")})
    return rows, []


def pods(run, ctx: Context):
    """Full-size serving steps for TPU slices (compiled) and one H200 (lowered): per-chip memory
    and the roofline of XLA's cost analysis (jaxinfer.pods), one row per target and cell."""
    import jax
    from tqdm import tqdm

    from jaxinfer import pods as p

    spec = ctx.spec
    cells = [(t, 64, 2048, True) for t in spec.pod_targets]
    cells += [(t, b, c, False) for t in spec.pod_grid for c in spec.contexts for b in spec.batches]
    cache_was = jax.config.jax_enable_compilation_cache  # real compile times, as in compile_proofs
    jax.config.update("jax_enable_compilation_cache", False)
    rows = []
    try:
        for target, batch, context, memory in tqdm(cells, desc="pods", unit="step"):
            labels = {"target": target, "case": f"{'full size ' if memory else ''}B={batch} ctx={context}"}
            if not p.fits(target, batch, context):  # by size alone: nothing to compile
                rows.append(labels | {"fits": False})
                continue
            row = p.analyse(target, batch, context, memory=memory)
            rows.append(labels | {k: v for k, v in row.items() if k not in ("target",)})
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
    return rows, []


KINDS = {"decode": decode, "serve": serve, "quality": quality, "speculative": speculative, "compile": compile_proofs,
         "pods": pods}
