"""What the roofline needs from the device side: a model's footprint (bytes a step reads, FLOPs it
computes) and the machine's read bandwidth and matmul peak, measured in the same run."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from jaxinfer.metrics import Footprint, Machine
from jaxinfer.models import Model


def footprint(model: Model, engine_cfg=None) -> Footprint:
    """Bytes and weights of one step of `model` (quantized weights counted as stored); the KV bytes
    of a token as the engine's pages store them (engine.kv_cache_dtype), or in the model dtype."""
    from jaxinfer.engine import page_bytes

    c = model.cfg
    p = model.params
    embed = p["embed"][...]
    row_scale = 4 if "embed_scale" in p else 0  # quant_embed: a float32 scale per int8 row
    separate_head = "lm_head" in p  # untied, or a quantized copy of a tied table (quant_lm_head)
    head_params = c.vocab_size * c.hidden_size
    table = embed.size * embed.dtype.itemsize + c.vocab_size * row_scale
    untied = table if separate_head else 0  # the input table is read a row per token, not streamed
    itemsize = jnp.dtype(c.dtype).itemsize  # a dense cache is kept in the model dtype
    layer_params = model.num_params - embed.size - (head_params if separate_head else 0)
    layer_params -= sum(p[n][...].size for n in ("lm_head_scale", "embed_scale") if n in p)
    return Footprint(streamed_bytes=model.param_bytes - untied,
                     embed_row_bytes=c.hidden_size * embed.dtype.itemsize + row_scale,
                     kv_bytes_per_token=(c.num_layers * 2 * c.num_kv_heads * c.head_dim * itemsize
                                         if engine_cfg is None else page_bytes(engine_cfg, model) // engine_cfg.page_size),
                     layer_params=layer_params, head_params=head_params)


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up and compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth(num_bytes: int, repeats: int = 5) -> dict:
    """Read bandwidth (a jitted sum over `num_bytes`: read-only, like weight streaming) and copy
    bandwidth (read + write, for reference), bytes/s, medians of `repeats`. Measured at the size a
    step streams: a model that fits the CPU's caches is read from them, not from DRAM."""
    read, copy = jax.jit(jnp.sum), jax.jit(lambda a: a * 1.0001)
    x = jnp.ones((max(num_bytes // 4, 1024),), jnp.float32)
    num_bytes = x.size * 4
    t_read = _median_s(lambda: read(x).block_until_ready(), repeats)
    t_copy = _median_s(lambda: copy(x).block_until_ready(), repeats)
    return {"read_bytes_per_s": num_bytes / t_read, "copy_bytes_per_s": 2 * num_bytes / t_copy,
            "bandwidth_buffer_bytes": num_bytes}


def matmul_peak(n: int, dtype: str, repeats: int = 5) -> dict:
    """FLOP/s of an n x n x n matmul in `dtype` (the practical compute peak), median of `repeats`."""
    matmul = jax.jit(jnp.matmul)
    a = jnp.ones((n, n), dtype)
    t = _median_s(lambda: matmul(a, a).block_until_ready(), repeats)
    return {"peak_flops_per_s": 2 * n**3 / t, "matmul_size": n, "matmul_dtype": str(jnp.dtype(dtype))}


def as_machine(m: dict) -> Machine:
    return Machine(m["read_bytes_per_s"], m["peak_flops_per_s"])
