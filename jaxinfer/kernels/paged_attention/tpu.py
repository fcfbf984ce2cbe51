"""Paged attention as a Pallas TPU (Mosaic) kernel; `reference.py` is its specification.

Grid (B, K, W): one program per (row, kv head) walks the row's block table a page per step (the
innermost, sequential axis) with an online softmax in VMEM scratch. The block table and kv lengths
are scalar-prefetched into SMEM, so each step's index map DMAs exactly the page the table names;
steps past the row's last page repeat the last page index (Pallas skips a DMA whose block index is
unchanged) and skip their compute.

Constraints (checked by `unsupported`): head_dim a multiple of 8 (MXU contraction dim), page size a
multiple of 8 (sublanes), float32 / bfloat16 queries; float pages of q's dtype or int8 with scales.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxinfer.kernels.paged_attention.common import cost, group_queries, ungroup
from jaxinfer.kernels.paged_attention.reference import MASKED

ROWS = 8  # query tile rows are padded to the sublane count


def unsupported(q, k_pages, k_scales) -> str | None:
    """Why this kernel cannot take these inputs, or None."""
    h, c = q.shape[-1], k_pages.shape[2]
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        return f"queries must be float32 or bfloat16, got {q.dtype}"
    if h % 8:
        return f"head_dim must be a multiple of 8, got {h}"
    if c % 8:
        return f"page_size must be a multiple of 8, got {c}"
    if k_scales is None and k_pages.dtype != q.dtype:
        return f"float KV pages must match the query dtype ({q.dtype}), got {k_pages.dtype}"
    if k_scales is not None and k_pages.dtype != jnp.int8:
        return f"KV scales go with int8 pages, got {k_pages.dtype}"
    return None


def _kernel(tables_ref, lens_ref, q_ref, pos_ref, k_ref, v_ref, *rest, page_size, width, sliding_window,
            soft_cap, quantized):
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref, acc_ref = rest
    else:
        o_ref, m_ref, l_ref, acc_ref = rest
    b, j = pl.program_id(0), pl.program_id(2)
    kv_len = lens_ref[b]
    start = j * page_size

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(start < kv_len)
    def _page():
        q = q_ref[...]  # [R, H]
        k = k_ref[...].astype(q.dtype)  # [C, H] (int8 -> float is exact; the scale comes after the dot)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if quantized:
            s = s * ks_ref[...]  # [1, C]: one scale per kv position
        s = s * (1.0 / math.sqrt(q.shape[-1]))
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        rows = s.shape[0]
        kv_pos = start + jax.lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
        pos = pos_ref[...]  # [R, 1]
        mask = (kv_pos < kv_len) & (kv_pos <= pos)
        if sliding_window is not None:
            mask &= kv_pos > pos - sliding_window
        s = jnp.where(mask, s, MASKED)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_new
        if quantized:
            p = p * vs_ref[...]
        v_valid = (start + jax.lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)) < kv_len
        v = jnp.where(v_valid, v_ref[...].astype(q.dtype), 0)  # recycled slots may hold NaN
        pv = jnp.dot(p.astype(q.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + pv

    @pl.when(j == width - 1)
    def _done():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, q_positions, *, k_scales=None, v_scales=None,
                    sliding_window=None, soft_cap=None, interpret=False):
    """The reference's contract. `interpret`: False (Mosaic), True, or a `pltpu.InterpretParams`."""
    if why := unsupported(q, k_pages, k_scales):
        raise ValueError(f"attention_impl 'tpu': {why}")
    b, t, n, h = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    width, num_pages = block_table.shape[1], k_pages.shape[1]
    qg, pos, rows = group_queries(q, q_positions, num_kv_heads, ROWS)
    quantized = k_scales is not None

    def page_map(b_, k_, j_, tables, lens):
        last = jnp.maximum(pl.cdiv(lens[b_], page_size) - 1, 0)
        return k_, jnp.clip(tables[b_ * width + jnp.minimum(j_, last)], 0, num_pages - 1), 0, 0

    q_spec = pl.BlockSpec((None, None, rows, h), lambda b_, k_, j_, *_: (b_, k_, 0, 0))
    in_specs = [q_spec,
                pl.BlockSpec((None, rows, 1), lambda b_, k_, j_, *_: (b_, 0, 0)),
                pl.BlockSpec((None, None, page_size, h), page_map),
                pl.BlockSpec((None, None, page_size, h), page_map)]
    args = [qg, pos[:, :, None], k_pages, v_pages]
    if quantized:
        scale_spec = pl.BlockSpec((None, None, 1, page_size), page_map)
        in_specs += [scale_spec, scale_spec]
        args += [k_scales[:, :, None, :].astype(jnp.float32), v_scales[:, :, None, :].astype(jnp.float32)]
    kernel = functools.partial(_kernel, page_size=page_size, width=width, sliding_window=sliding_window,
                               soft_cap=soft_cap, quantized=quantized)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, num_kv_heads, width), in_specs=in_specs, out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, h), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost(qg, k_pages, width, quantized),
        name="paged_attention_tpu",
    )(block_table.reshape(-1).astype(jnp.int32), kv_lens.astype(jnp.int32), *args)
    return ungroup(out, t, n)
