"""Paged attention as a Pallas TPU (Mosaic) kernel; `reference.py` is its specification.

Grid (B, K, NB): one program per (row, kv head) walks the row's block table `pages_per_block`
pages per step (the innermost, sequential axis), with an online softmax in VMEM scratch. The block
table and kv lengths are scalar-prefetched into SMEM; the pages stay in HBM and the kernel copies
them itself: one DMA per page into a double buffer, the next block's copies started before this
block's compute, so page DMAs overlap the math. Pages past a row's kv length are never copied, and
steps past its last block do nothing. One page per grid step (a BlockSpec per page) would spend
more time in per-step overhead than in moving 16-token pages.

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

from jaxinfer.kernels.paged_attention.common import cost, group_queries, kv_format_problem, ungroup
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
    return kv_format_problem(q, k_pages, k_scales)


def _kernel(tables_ref, lens_ref, q_ref, pos_ref, k_hbm, v_hbm, *rest, page_size, width, pages_per_block,
            sliding_window, soft_cap, quantized):
    if quantized:
        ks_hbm, vs_hbm, o_ref, k_buf, v_buf, ks_buf, vs_buf, sems, m_ref, l_ref, acc_ref = rest
    else:
        o_ref, k_buf, v_buf, sems, m_ref, l_ref, acc_ref = rest
        ks_hbm = vs_hbm = ks_buf = vs_buf = None
    b, head, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_len = lens_ref[b]
    row_pages = pl.cdiv(kv_len, page_size)
    num_blocks = pl.cdiv(row_pages, pages_per_block)
    sources = [(k_hbm, k_buf), (v_hbm, v_buf)] + ([(ks_hbm, ks_buf), (vs_hbm, vs_buf)] if quantized else [])

    def copies(block, slot):
        """(page number within the row, descriptor) for each DMA of `block` into buffer `slot`."""
        out = []
        for i in range(pages_per_block):
            n = block * pages_per_block + i
            page = tables_ref[b * width + jnp.minimum(n, width - 1)]
            for kind, (src, dst) in enumerate(sources):
                out.append((n, pltpu.make_async_copy(src.at[head, page], dst.at[slot, i], sems.at[slot, kind])))
        return out

    def start(block, slot):
        for n, copy in copies(block, slot):
            pl.when(n < row_pages)(copy.start)

    def wait(block, slot):
        for n, copy in copies(block, slot):
            pl.when(n < row_pages)(copy.wait)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        @pl.when(num_blocks > 0)
        def _first():
            start(0, 0)

    @pl.when(j < num_blocks)
    def _block():
        slot = j % 2

        @pl.when(j + 1 < num_blocks)
        def _prefetch():
            start(j + 1, 1 - slot)

        wait(j, slot)
        q = q_ref[...]  # [R, H]
        pos = pos_ref[...]  # [R, 1]
        rows = q.shape[0]
        for i in range(pages_per_block):
            first = (j * pages_per_block + i) * page_size

            @pl.when(first < kv_len)
            def _page():
                k = k_buf[slot, i].astype(q.dtype)  # [C, H] (int8 -> float is exact; the scale comes after the dot)
                s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                if quantized:
                    s = s * ks_buf[slot, i]  # [1, C]: one scale per kv position
                s = s * (1.0 / math.sqrt(q.shape[-1]))
                if soft_cap is not None:
                    s = soft_cap * jnp.tanh(s / soft_cap)
                kv_pos = first + jax.lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
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
                    p = p * vs_buf[slot, i]
                v_valid = (first + jax.lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)) < kv_len
                v = jnp.where(v_valid, v_buf[slot, i].astype(q.dtype), 0)  # the page's tail may hold anything
                pv = jnp.dot(p.astype(q.dtype), v, preferred_element_type=jnp.float32)
                acc_ref[...] = alpha * acc_ref[...] + pv

    @pl.when(j == pl.num_programs(2) - 1)
    def _done():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, q_positions, *, k_scales=None, v_scales=None,
                    sliding_window=None, soft_cap=None, interpret=False, pages_per_block: int = 0):
    """The reference's contract. `interpret`: False (Mosaic), True, or a `pltpu.InterpretParams`.
    `pages_per_block` (0: 128 positions' worth) tunes the kernel and does not change the result."""
    if why := unsupported(q, k_pages, k_scales):
        raise ValueError(f"attention_impl 'tpu': {why}")
    b, t, n, h = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    width = block_table.shape[1]
    qg, pos, rows = group_queries(q, q_positions, num_kv_heads, ROWS)
    quantized = k_scales is not None

    ppb = pages_per_block or max(1, min(width, 128 // page_size))
    steps = -(-width // ppb)
    q_spec = pl.BlockSpec((None, None, rows, h), lambda b_, k_, j_, *_: (b_, k_, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [q_spec, pl.BlockSpec((None, rows, 1), lambda b_, k_, j_, *_: (b_, 0, 0)), hbm, hbm]
    args = [qg, pos[:, :, None], k_pages, v_pages]
    scratch = [pltpu.VMEM((2, ppb, page_size, h), k_pages.dtype), pltpu.VMEM((2, ppb, page_size, h), v_pages.dtype)]
    if quantized:
        in_specs += [hbm, hbm]
        args += [k_scales[:, :, None, :].astype(jnp.float32), v_scales[:, :, None, :].astype(jnp.float32)]
        scratch += [pltpu.VMEM((2, ppb, 1, page_size), jnp.float32)] * 2
    scratch += [pltpu.SemaphoreType.DMA((2, 4 if quantized else 2)), pltpu.VMEM((rows, 1), jnp.float32),
                pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, h), jnp.float32)]
    kernel = functools.partial(_kernel, page_size=page_size, width=width, pages_per_block=ppb,
                               sliding_window=sliding_window, soft_cap=soft_cap, quantized=quantized)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, num_kv_heads, steps), in_specs=in_specs, out_specs=q_spec,
            scratch_shapes=scratch),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost(qg, k_pages, width, quantized),
        name="paged_attention_tpu",
    )(block_table.reshape(-1).astype(jnp.int32), kv_lens.astype(jnp.int32), *args)
    return ungroup(out, t, n)
