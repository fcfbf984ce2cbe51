"""The CPU matrix-vector products behind quantized decode, measured side by side in one run: one
decode step's matmuls of the 124.7M Llama shape (12 layers x q, k, v, o, gate, up, down, plus the
32000-wide LM head), each way of computing x @ W that XLA offers for int8 / int4 weights, against
float32 `x @ W`. Weights are distinct arrays (as in a model), so they stream from memory.

  python experiments/quant_gemv.py                 # batch 1
  python experiments/quant_gemv.py --rows 4 32     # more rows of x

Prints ms per step's matmuls (median of --repeats, compile and warm-up apart), the weight bytes
read per second, and the ratio to float32 measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.quant_matmul import cpu, reference
from jaxinfer.kernels.quant_matmul.reference import quantize

LAYER = [(768, 768), (768, 256), (768, 256), (768, 768), (768, 2048), (768, 2048), (2048, 768)]
SHAPES = LAYER * 12 + [(768, 32000)]


def fused_reduce(x, q):
    """Convert, multiply and reduce in one fusion (XLA gives it to YNNPACK); the weight transposed
    [N, K] so the reduction runs along contiguous K (the [K, N] layout is 10x slower)."""
    wt = q.values  # stored transposed by `prepare`
    return jnp.sum(wt.astype(jnp.float32)[None] * x[:, None, :], axis=-1) * q.scales


METHODS = {
    "float32 x @ W": ("f32", lambda x, w: x @ w),
    "float32 cpu kernel (FFI)": ("f32", cpu.float_matmul),
    "int8 reference (dequantize, dot)": ("int8", reference.quant_matmul),
    "w8a8 reference (XLA int8 dot)": ("w8a8", reference.quant_matmul),
    "int8 fused convert-mul-reduce": ("int8T", fused_reduce),
    "int8 cpu kernel (FFI)": ("int8", cpu.quant_matmul),
    "w8a8 cpu kernel (FFI, VNNI)": ("w8a8", cpu.quant_matmul),
    "int4/g128 reference": ("int4", reference.quant_matmul),
    "int4/g128 cpu kernel (FFI)": ("int4", cpu.quant_matmul),
}


def prepare(form: str, w):
    if form == "f32":
        return jnp.asarray(w)
    if form == "int8T":
        q = quantize(jnp.asarray(w), 8)
        return reference.QuantArray(q.values.T, q.scales, 8, 0)
    if form == "w8a8":
        return dataclasses.replace(quantize(jnp.asarray(w), 8), act_bits=8)
    return quantize(jnp.asarray(w), 8) if form == "int8" else quantize(jnp.asarray(w), 4, 128)


def weight_bytes(ws) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ws))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in SHAPES]
    print(f"{jax.devices()[0].device_kind}; {len(SHAPES)} matmuls a step, {sum(k * n for k, n in SHAPES) / 1e6:.1f}M weights")
    for m in args.rows:
        xs = {k: jnp.asarray(rng.standard_normal((m, k), dtype=np.float32)) for k in (768, 2048)}
        base = None
        for name in args.methods:
            form, mm = METHODS[name]
            ws = [prepare(form, w) for w in weights]

            @jax.jit
            def step(ws, xs, mm=mm):
                return sum(mm(xs[w_k], w)[:, :4].sum() for w, (w_k, _) in zip(ws, SHAPES))

            step(ws, xs).block_until_ready()  # compile and warm up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step(ws, xs).block_until_ready()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            base = base or (t if name == "float32 x @ W" else None)
            ratio = f"{base / t:5.2f}x float32" if base else ""
            print(f"rows {m:3d}  {name:34s} {t * 1e3:8.2f} ms  {weight_bytes(ws) / t / 1e9:6.2f} GB/s  {ratio}",
                  flush=True)
            del ws


if __name__ == "__main__":
    main()
