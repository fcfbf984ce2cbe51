"""Batch-1 decode speed of the dense-KV `generate()` next to its weight-streaming bound.

    python -m experiments.bench_decode [--config configs/models/llama-110m.yaml] [--batch 1]

Each decode step must read every weight once, so tokens/s <= read bandwidth / weight bytes (per
row-step at batch 1). Bandwidth is measured in the same run (a jitted reduction over a buffer far
larger than the caches: read-only, like weight streaming; and a copy, for reference). Medians of
repeats; warm-up and compile time reported apart. Prints a table and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import SamplingConfig, load_config
from jaxinfer.generate import Generator
from jaxinfer.models import init_model
from jaxinfer.models.quantize import quantize_model


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(num_bytes: int, repeats: int) -> dict:
    """Read bandwidth (sum over the buffer) and copy bandwidth (read + write), bytes/s."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    read = jax.jit(lambda a: jnp.sum(a))
    copy = jax.jit(lambda a: a * 1.0001)
    t_read = median_seconds(lambda: read(x).block_until_ready(), repeats)
    t_copy = median_seconds(lambda: copy(x).block_until_ready(), repeats)
    return {"read_bytes_per_s": num_bytes / t_read, "copy_bytes_per_s": 2 * num_bytes / t_copy,
            "buffer_bytes": num_bytes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).parents[1] / "configs/models/llama-110m.yaml"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bandwidth-mb", type=int, default=1024)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.dtype=bfloat16")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    model = init_model(cfg.model, cfg.seed)
    if cfg.model.quant != "none":  # weight-only int8 / int4: the bound below uses the quantized bytes
        model = quantize_model(model, cfg.model.quant, cfg.model.quant_group_size, cfg.model.matmul_impl,
                               cfg.model.quant_asymmetric)
    jax.block_until_ready(model.params)
    init_s = time.perf_counter() - t0
    gen = Generator(model, cfg.decode)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.model.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)

    first = gen.generate(prompts, sampling)  # compiles; its timing is the warm-up run
    runs = [gen.generate(prompts, sampling).timing for _ in range(args.repeats)]
    decode_tps = statistics.median(t.num_decoded / t.decode_s for t in runs)
    prefill_s = statistics.median(t.prefill_s for t in runs)
    bw = memory_bandwidth(args.bandwidth_mb * 2**20, args.repeats)

    weight_bytes = model.param_bytes
    # Per decode step the weights are read once for the whole batch: the bound is on steps/s.
    bound_steps = bw["read_bytes_per_s"] / weight_bytes
    bound_tps = bound_steps * args.batch
    result = {
        "model": cfg.model.name, "dtype": cfg.model.dtype, "quant": cfg.model.quant, "num_params": model.num_params,
        "weight_bytes": weight_bytes, "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "init_s": init_s,
        "compile_s": first.timing.compile_s, "prefill_s_median": prefill_s,
        "decode_tokens_per_s_median": decode_tps, **bw,
        "weight_streaming_bound_tokens_per_s": bound_tps, "fraction_of_bound": decode_tps / bound_tps,
        "jax": jax.__version__, "device": str(jax.devices()[0].device_kind), "machine": platform.machine(),
        "num_cpus": jax.device_count(),
    }
    print(f"model {result['model']}: {model.num_params / 1e6:.1f}M params, {cfg.model.dtype}, quant {cfg.model.quant}, "
          f"weights {weight_bytes / 2**20:.0f} MiB; batch {args.batch}, prompt {args.prompt_len}, "
          f"new {args.new_tokens}, median of {args.repeats}")
    print(f"  compile (apart)          {first.timing.compile_s:8.2f} s")
    print(f"  prefill                  {prefill_s * 1e3:8.1f} ms")
    print(f"  memory read bandwidth    {bw['read_bytes_per_s'] / 1e9:8.2f} GB/s   (copy {bw['copy_bytes_per_s'] / 1e9:.2f} GB/s)")
    print(f"  weight-streaming bound   {bound_tps:8.1f} tok/s")
    print(f"  decode (measured)        {decode_tps:8.1f} tok/s   = {100 * decode_tps / bound_tps:.0f}% of the bound")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
