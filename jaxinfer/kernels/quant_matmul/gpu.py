"""`x @ W` for quantized W as a Pallas GPU kernel (Triton backend; see paged_attention/gpu.py for
why not Mosaic GPU); `reference.py` is its specification.

Grid (M / bm, N / bn); each program loops over K. int8: x tile @ int8 tile widened to x's dtype,
the per-channel scale applied once at the end. int4: one group per iteration, out += scale_g *
(x_even_g @ low_nibbles_g + x_odd_g @ high_nibbles_g), with x's even/odd columns split outside.
Weights are read once, as int8 / packed bytes: at batch 1 the kernel moves half (int8) or a quarter
(int4) of the bytes a bf16 dot does.

W8A8 (`act_bits=8`): x quantized per row outside the kernel (`reference.quantize_activations`);
the loop dots int8 x int8 tiles (tensor cores' int8 MMA) into an int32 accumulator, and the row and
channel scales apply once at the end.

Constraints (checked by `unsupported`): float32 / bfloat16 / float16 activations, N a multiple of 16.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxinfer.kernels.quant_matmul.reference import QuantArray, check_features, check_w8a8, cost, quantize_activations


def unsupported(x, q: QuantArray) -> str | None:
    k, n = q.shape
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"activations must be float32, bfloat16 or float16, got {x.dtype}"
    if n % 16:
        return f"N must be a multiple of 16, got {n}"
    if q.bits == 8 and k % 16:
        return f"K must be a multiple of 16 for int8 weights, got {k}"
    if q.act_bits and k % 32:
        return f"K must be a multiple of 32 for W8A8 (int8 MMA), got {k}"
    return None


def _largest(size: int, choices) -> int:
    return next(c for c in choices if size % c == 0)


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, bk):
    bm, bn = o_ref.shape
    k = x_ref.shape[1]

    def body(i, acc):
        x = x_ref[:, pl.ds(i * bk, bk)]
        w = w_ref[pl.ds(i * bk, bk), :].astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = (acc * s_ref[...][None, :]).astype(o_ref.dtype)


def _w8a8_kernel(x_ref, xs_ref, w_ref, s_ref, o_ref, *, bk):
    bm, bn = o_ref.shape
    k = x_ref.shape[1]

    def body(i, acc):
        return acc + jnp.dot(x_ref[:, pl.ds(i * bk, bk)], w_ref[pl.ds(i * bk, bk), :], preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((bm, bn), jnp.int32))
    o_ref[...] = (acc.astype(jnp.float32) * xs_ref[...][:, None] * s_ref[...][None, :]).astype(o_ref.dtype)


def _int4_kernel(xe_ref, xo_ref, w_ref, s_ref, *rest):
    asymmetric = len(rest) == 2
    off_ref, o_ref = rest if asymmetric else (None, *rest)
    bm, bn = o_ref.shape
    half = xe_ref.shape[1] // s_ref.shape[0]  # packed rows per group

    def body(g, acc):
        cols = pl.ds(g * half, half)
        xe, xo = xe_ref[:, cols], xo_ref[:, cols]
        w = w_ref[cols, :].astype(jnp.int32)
        lo, hi = w & 0xF, (w >> 4) & 0xF
        if not asymmetric:
            lo, hi = lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)
        part = (jnp.dot(xe, lo.astype(xe.dtype), preferred_element_type=jnp.float32)
                + jnp.dot(xo, hi.astype(xo.dtype), preferred_element_type=jnp.float32))
        part = part * s_ref[g, :][None, :]
        if asymmetric:
            row_sums = jnp.sum(xe.astype(jnp.float32), axis=1) + jnp.sum(xo.astype(jnp.float32), axis=1)
            part = part + row_sums[:, None] * off_ref[g, :][None, :]
        return acc + part

    acc = jax.lax.fori_loop(0, s_ref.shape[0], body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def quant_matmul(x, q: QuantArray, *, interpret=False, block_n: int = 0, num_warps: int = 4, num_stages: int = 3):
    """The reference's contract: x [..., K] @ W -> [..., N] in x's dtype, float32 accumulation."""
    x = check_features(x, q)
    if why := unsupported(x, q):
        raise ValueError(f"matmul_impl 'gpu': {why}")
    lead, (k, n) = x.shape[:-1], q.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    check_w8a8(q)
    bm = min(64, max(16, 1 << (m - 1).bit_length()))
    mp = -(-m // bm) * bm
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    # Small M reads each weight once whatever the tiling: narrow N tiles give enough programs to
    # keep ~132 SMs streaming (>= 256 programs where N allows).
    bn = block_n or next((c for c in (128, 64, 32, 16) if n % c == 0 and (mp // bm) * (n // c) >= 256),
                         _largest(n, (16, 32, 64, 128)))
    grid = (mp // bm, n // bn)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out_spec = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
    out_shape = jax.ShapeDtypeStruct((mp, n), x.dtype)
    if q.act_bits:
        bk = _largest(k, tuple(c for c in (512, 256, 128, 64, 32) if c * bn <= 16384 or c == 32))
        xq, xs = quantize_activations(x2)
        out = pl.pallas_call(
            partial(_w8a8_kernel, bk=bk), grid=grid,
            in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((bm,), lambda i, j: (i,)),
                      pl.BlockSpec((k, bn), lambda i, j: (0, j)), pl.BlockSpec((None, bn), lambda i, j: (0, j))],
            out_specs=out_spec, out_shape=out_shape, compiler_params=params, interpret=interpret,
            cost_estimate=cost(xq, q), name="quant_matmul_w8a8_gpu")(xq, xs[:, 0], q.values, q.scales.astype(jnp.float32))
    elif q.bits == 8:
        bk = _largest(k, tuple(c for c in (512, 256, 128, 64, 32, 16) if c * bn <= 16384 or c == 16))
        out = pl.pallas_call(
            partial(_int8_kernel, bk=bk), grid=grid,
            in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                      pl.BlockSpec((None, bn), lambda i, j: (0, j))],
            out_specs=out_spec, out_shape=out_shape, compiler_params=params, interpret=interpret, cost_estimate=cost(x2, q),
            name="quant_matmul_int8_gpu")(x2, q.values, q.scales.astype(jnp.float32))
    else:
        groups = k // q.group_size
        per_group = pl.BlockSpec((groups, bn), lambda i, j: (0, j))
        in_specs = [pl.BlockSpec((bm, k // 2), lambda i, j: (i, 0)), pl.BlockSpec((bm, k // 2), lambda i, j: (i, 0)),
                    pl.BlockSpec((k // 2, bn), lambda i, j: (0, j)), per_group]
        args = [x2[:, 0::2], x2[:, 1::2], q.values, q.scales.astype(jnp.float32)]
        if q.offsets is not None:
            in_specs.append(per_group)
            args.append(q.offsets.astype(jnp.float32))
        out = pl.pallas_call(
            _int4_kernel, grid=grid, in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
            compiler_params=params, interpret=interpret, cost_estimate=cost(x2, q), name="quant_matmul_int4_gpu",
        )(*args)
    return out[:m].reshape(*lead, n)
