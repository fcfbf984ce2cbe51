"""Paged attention as a Pallas GPU kernel (Triton backend); `reference.py` is its specification.

Grid (B, K, S): one program per (row, kv head, split) walks its share of the row's block table,
`pages_per_block` pages per iteration (gathered through the table), with an online softmax in
registers; pages past the row's kv length are never loaded. The S splits (flash-decoding) keep the
GPU busy when B * K is small; their partial results are merged in jnp.

Why Triton and not Mosaic GPU: Mosaic GPU's bindings ship only in the CUDA plugin wheel, so a
Mosaic GPU kernel cannot be lowered on a CPU-only CI; the Triton backend lowers here for an
abstract H200 (see tests/test_kernel_compile.py) and runs on jax 0.11.2 on the lent GPU.

Constraints (checked by `unsupported`): head_dim and page_size powers of two >= 16 (tensor-core dot
and power-of-two tiles), float32 / bfloat16 / float16 queries, float pages of q's dtype or int8
with scales.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxinfer.kernels.paged_attention.common import cost, group_queries, kv_format_problem, ungroup
from jaxinfer.kernels.paged_attention.reference import MASKED

ROWS = 16  # tensor-core dots need >= 16 rows


def _pow2(x: int) -> bool:
    return x >= 16 and (x & (x - 1)) == 0


def unsupported(q, k_pages, k_scales) -> str | None:
    """Why this kernel cannot take these inputs, or None."""
    h, c = q.shape[-1], k_pages.shape[2]
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"queries must be float32, bfloat16 or float16, got {q.dtype}"
    if not _pow2(h):
        return f"head_dim must be a power of two >= 16, got {h}"
    if not _pow2(c):
        return f"page_size must be a power of two >= 16, got {c}"
    return kv_format_problem(q, k_pages, k_scales)


def _kernel(lens_ref, q_ref, pos_ref, table_ref, k_ref, v_ref, *rest, page_size, pages_per_block, pages_per_split,
            sliding_window, soft_cap, quantized):
    if quantized:
        ks_ref, vs_ref, acc_ref, m_ref, l_ref = rest
    else:
        acc_ref, m_ref, l_ref = rest
    b, split = pl.program_id(0), pl.program_id(2)
    kv_len = lens_ref[b]
    q = q_ref[...]  # [R, H]
    rows, h = q.shape
    pos = pos_ref[...]  # [R]
    block_k = pages_per_block * page_size
    first = split * pages_per_split
    last = jnp.minimum(pl.cdiv(kv_len, page_size), first + pages_per_split)
    num_blocks = pl.cdiv(jnp.maximum(last - first, 0), pages_per_block)

    def body(i, carry):
        acc, m, l = carry
        page0 = first + i * pages_per_block
        # The block's tail may run past the row's pages: those entries are masked, but must still be
        # in range (table padding is page 0; clip anything else rather than fault).
        pages = jnp.clip(table_ref[pl.ds(page0, pages_per_block)], 0, k_ref.shape[0] - 1)
        k = k_ref[pages].reshape(block_k, h).astype(q.dtype)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)  # [R, block_k]
        if quantized:
            s = s * ks_ref[pages].reshape(1, block_k)
        s = s * (1.0 / math.sqrt(h))
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = page0 * page_size + jnp.arange(block_k, dtype=jnp.int32)
        valid = kv_pos < kv_len
        mask = valid[None, :] & (kv_pos[None, :] <= pos[:, None])
        if sliding_window is not None:
            mask &= kv_pos[None, :] > pos[:, None] - sliding_window
        s = jnp.where(mask, s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        if quantized:
            p = p * vs_ref[pages].reshape(1, block_k)
        v = jnp.where(valid[:, None], v_ref[pages].reshape(block_k, h).astype(q.dtype), 0)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(q.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l

    init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, num_blocks, body, init)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, q_positions, *, k_scales=None, v_scales=None,
                    sliding_window=None, soft_cap=None, interpret=False, pages_per_block: int = 0, num_splits: int = 0,
                    num_warps: int = 4, num_stages: int = 2):
    """The reference's contract. `pages_per_block` (0: 128 positions' worth) and `num_splits`
    (0: enough programs for ~132 SMs) tune the kernel; neither changes the result."""
    if why := unsupported(q, k_pages, k_scales):
        raise ValueError(f"attention_impl 'gpu': {why}")
    b, t, n, h = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    width = block_table.shape[1]
    ppb = pages_per_block or max(1, 128 // page_size)
    ppb = min(ppb, 1 << (width - 1).bit_length())  # no bigger than the (power-of-two padded) table
    blocks = -(-width // ppb)
    splits = num_splits or max(1, min(blocks, -(-132 // (b * num_kv_heads))))
    pages_per_split = -(-blocks // splits) * ppb
    padded = splits * pages_per_split
    table = jnp.pad(block_table.astype(jnp.int32), ((0, 0), (0, padded - width)))  # padding: page 0, masked
    qg, pos, rows = group_queries(q, q_positions, num_kv_heads, ROWS)
    rows = max(rows, 1 << (rows - 1).bit_length())  # power-of-two tile
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - qg.shape[2]), (0, 0)))
    pos = jnp.pad(pos, ((0, 0), (0, rows - pos.shape[1])), constant_values=-1)
    quantized = k_scales is not None
    full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
    pages_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda b_, k_, s_: (k_, 0, 0, 0))
    in_specs = [full(kv_lens), pl.BlockSpec((None, None, rows, h), lambda b_, k_, s_: (b_, k_, 0, 0)),
                pl.BlockSpec((None, rows), lambda b_, k_, s_: (b_, 0)), pl.BlockSpec((None, padded), lambda b_, k_, s_: (b_, 0)),
                pages_spec, pages_spec]
    args = [kv_lens.astype(jnp.int32), qg, pos, table, k_pages, v_pages]
    if quantized:
        scale_spec = pl.BlockSpec((None, *k_scales.shape[1:]), lambda b_, k_, s_: (k_, 0, 0))
        in_specs += [scale_spec, scale_spec]
        args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
    part = lambda *shape: jax.ShapeDtypeStruct((b, num_kv_heads, splits, *shape), jnp.float32)  # noqa: E731
    kernel = functools.partial(_kernel, page_size=page_size, pages_per_block=ppb, pages_per_split=pages_per_split,
                               sliding_window=sliding_window, soft_cap=soft_cap, quantized=quantized)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, num_kv_heads, splits),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, None, rows, h), lambda b_, k_, s_: (b_, k_, s_, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b_, k_, s_: (b_, k_, s_, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b_, k_, s_: (b_, k_, s_, 0))],
        out_shape=[part(rows, h), part(rows), part(rows)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        cost_estimate=cost(qg, k_pages, padded, quantized),
        name="paged_attention_gpu",
    )(*args)
    # Merge the splits: each holds an unnormalised sum under its own running max.
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_all)  # [B, K, S, R]
    l_all = jnp.sum(w * l, axis=2)
    out = jnp.sum(w[..., None] * acc, axis=2) / jnp.where(l_all == 0, 1.0, l_all)[..., None]
    return ungroup(out.astype(q.dtype), t, n)
