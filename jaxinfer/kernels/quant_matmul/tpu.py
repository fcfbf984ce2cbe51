"""`x @ W` for quantized W as a Pallas TPU (Mosaic) kernel; `reference.py` is its specification.

int8: grid (M / bm, N / bn, K / bk), each step dots an x tile with the int8 tile widened to x's
dtype (exact), accumulating in float32 VMEM; the per-channel scale multiplies once at the end.

int4: the packed bytes are never interleaved back. Even-k and odd-k columns of x are split outside
the kernel (activations are small), so out = x_even @ low_nibbles + x_odd @ high_nibbles. The
reduction axis walks whole groups, `gb` groups a step, as a batched dot over the group axis whose
per-group results are scaled before they are summed: exactly the group-wise definition.

W8A8 (`act_bits=8`): x is quantized per row outside the kernel (`reference.quantize_activations`,
a cheap pass over the activations); the kernel dots int8 x int8 tiles on the MXU with an int32
VMEM accumulator and applies the row and channel scales once at the end.

Constraints (checked by `unsupported`): float32 / bfloat16 activations, N a multiple of 128 or at
most 128 wide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxinfer.kernels.quant_matmul.reference import QuantArray, check_features, check_w8a8, cost, quantize_activations


def unsupported(x, q: QuantArray) -> str | None:
    n = q.shape[1]
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        return f"activations must be float32 or bfloat16, got {x.dtype}"
    if n % 128 and n > 128:
        return f"N must be a multiple of 128 (or at most 128), got {n}"
    return None


def _tile(size: int, choices) -> int:
    """The largest choice dividing `size`, else the whole axis (a block may span a full dim)."""
    return next((c for c in choices if size % c == 0 and c <= size), size)


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, acc_ref):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    x = x_ref[...]
    acc_ref[...] += jnp.dot(x, w_ref[...].astype(x.dtype), preferred_element_type=jnp.float32)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _done():
        o_ref[...] = (acc_ref[...] * s_ref[...]).astype(o_ref.dtype)


def _w8a8_kernel(x_ref, xs_ref, w_ref, s_ref, o_ref, acc_ref):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.int32)

    acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.int32)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _done():
        o_ref[...] = (acc_ref[...].astype(jnp.float32) * xs_ref[...] * s_ref[...]).astype(o_ref.dtype)


def _nibbles(packed, signed):
    """uint8 [...] -> (low, high) int32, in [-8, 7] if `signed`, else [0, 15]."""
    w = packed.astype(jnp.int32)
    lo, hi = w & 0xF, (w >> 4) & 0xF
    if not signed:
        return lo, hi
    return lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)


def _int4_kernel(xe_ref, xo_ref, w_ref, s_ref, *rest):
    """out += sum_g s_g * (xe_g @ lo_g + xo_g @ hi_g) [+ offset_g * sum_k x_g (asymmetric)]."""
    asymmetric = len(rest) == 3
    off_ref, o_ref, acc_ref = rest if asymmetric else (None, *rest)
    @pl.when(pl.program_id(2) == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    xe, xo = xe_ref[...], xo_ref[...]  # [gb, bm, g / 2]
    lo, hi = _nibbles(w_ref[...], signed=not asymmetric)  # [gb, g / 2, bn]
    dims = (((2,), (1,)), ((0,), (0,)))  # contract k, batch over groups
    part = (jax.lax.dot_general(xe, lo.astype(xe.dtype), dims, preferred_element_type=jnp.float32)
            + jax.lax.dot_general(xo, hi.astype(xo.dtype), dims, preferred_element_type=jnp.float32))
    part = part * s_ref[...]  # [gb, bm, bn] * [gb, 1, bn]
    if asymmetric:
        row_sums = (jnp.sum(xe.astype(jnp.float32), axis=2, keepdims=True)
                    + jnp.sum(xo.astype(jnp.float32), axis=2, keepdims=True))  # [gb, bm, 1]
        part = part + row_sums * off_ref[...]
    acc_ref[...] += jnp.sum(part, axis=0)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _done():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def quant_matmul(x, q: QuantArray, *, interpret=False):
    """The reference's contract: x [..., K] @ W -> [..., N] in x's dtype, float32 accumulation."""
    x = check_features(x, q)
    if why := unsupported(x, q):
        raise ValueError(f"matmul_impl 'tpu': {why}")
    lead, (k, n) = x.shape[:-1], q.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    check_w8a8(q)
    sub = 32 if q.act_bits else 16 if x.dtype == jnp.bfloat16 else 8  # int8 tiles: 32 sublanes
    bm = min(256, -(-m // sub) * sub)
    mp = -(-m // bm) * bm
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    bn = _tile(n, (512, 256, 128))
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))
    scratch = [pltpu.VMEM((bm, bn), jnp.float32)]
    out_shape = jax.ShapeDtypeStruct((mp, n), x.dtype)
    if q.act_bits:
        bk = _tile(k, (1024, 512, 256, 128))
        xq, xs = quantize_activations(x2)
        out = pl.pallas_call(
            _w8a8_kernel, grid=(mp // bm, n // bn, k // bk),
            in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                      pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
                      pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
                      pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))],
            out_specs=out_spec, out_shape=out_shape, scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
            compiler_params=params, interpret=interpret, cost_estimate=cost(xq, q),
            name="quant_matmul_w8a8_tpu")(xq, xs, q.values, q.scales.astype(jnp.float32))
    elif q.bits == 8:
        bk = _tile(k, (1024, 512, 256, 128))
        out = pl.pallas_call(
            _int8_kernel, grid=(mp // bm, n // bn, k // bk),
            in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                      pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
                      pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))],
            out_specs=out_spec, out_shape=out_shape, scratch_shapes=scratch, compiler_params=params,
            interpret=interpret, cost_estimate=cost(x2, q), name="quant_matmul_int8_tpu")(x2, q.values, q.scales.astype(jnp.float32))
    else:
        g = q.group_size
        groups, half = k // g, g // 2
        gb = _tile(groups, tuple(c for c in (16, 8, 4, 2, 1) if c * g <= 1024))
        split = lambda xs: xs.reshape(mp, groups, half).transpose(1, 0, 2)  # noqa: E731  [G, M, g/2]
        per_group = pl.BlockSpec((gb, 1, bn), lambda i, j, kk: (kk, 0, j))
        in_specs = [pl.BlockSpec((gb, bm, half), lambda i, j, kk: (kk, i, 0)),
                    pl.BlockSpec((gb, bm, half), lambda i, j, kk: (kk, i, 0)),
                    pl.BlockSpec((gb, half, bn), lambda i, j, kk: (kk, 0, j)), per_group]
        args = [split(x2[:, 0::2]), split(x2[:, 1::2]), q.values.reshape(groups, half, n),
                q.scales.astype(jnp.float32).reshape(groups, 1, n)]
        if q.offsets is not None:
            in_specs.append(per_group)
            args.append(q.offsets.astype(jnp.float32).reshape(groups, 1, n))
        out = pl.pallas_call(
            _int4_kernel, grid=(mp // bm, n // bn, groups // gb), in_specs=in_specs,
            out_specs=out_spec, out_shape=out_shape, scratch_shapes=scratch, compiler_params=params,
            interpret=interpret, cost_estimate=cost(x2, q), name="quant_matmul_int4_tpu")(*args)
    return out[:m].reshape(*lead, n)
