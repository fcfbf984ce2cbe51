"""Paged attention in plain jnp: the specification every backend kernel is tested against.

One contract for a mixed batch: every row b holds T query slots (a decode row uses one, a prefill
chunk up to T; unused slots are padding whose output nobody reads) and its own kv length and
block table. Row b's kv position s lives in page `block_table[b, s // C]` at offset `s % C`.
Query t of row b (at position `q_positions[b, t]`) sees kv position s iff s < kv_lens[b],
s <= its position, and s > its position - sliding_window. Query head n reads kv head
n // (N // K) (GQA, as Hugging Face's repeat_kv). Scores are q.k / sqrt(H), then, with `soft_cap`,
cap * tanh(score / cap).

KV pages are float, or quantized (int8 or fp8 e4m3) with float32 scales
`[K, P, C]` (one per position and kv head): the value is stored * scale. Slots past kv_lens may hold anything, NaN included (recycled pages in
debug mode): they are zeroed before use, so they never leak into the output. A query that sees
nothing gets zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange

MASKED = -1e30  # finite, so a row that sees nothing averages zeros instead of producing NaN


def dequantize_pages(pages, scales, dtype):
    """quantized pages [K, ..., H] * scales [K, ...] -> dtype; float pages pass through (cast)."""
    if scales is None:
        return pages.astype(dtype)
    return (pages.astype(jnp.float32) * scales[..., None]).astype(dtype)


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, q_positions, *, k_scales=None, v_scales=None,
                    sliding_window=None, soft_cap=None):
    """q [B, T, N, H]; k_pages, v_pages [K, P, C, H] (float, or int8 with k_scales/v_scales [K, P, C]);
    block_table [B, W] int32; kv_lens [B] int32; q_positions [B, T] int32 -> [B, T, N, H] in q's dtype."""
    num_kv_heads, _, page_size, h = k_pages.shape
    s = block_table.shape[1] * page_size

    def gather(pages, scales):  # the rows' pages only, then dequantized: [B, S, K, H]
        return rearrange(dequantize_pages(pages[:, block_table], None if scales is None else scales[:, block_table],
                                          q.dtype), "k b p c h -> b (p c) k h")
    k, v = gather(k_pages, k_scales), gather(v_pages, v_scales)
    kv_pos = jnp.arange(s, dtype=jnp.int32)
    valid = kv_pos[None, :] < kv_lens[:, None]  # [B, S]
    v = jnp.where(valid[:, :, None, None], v, 0)
    mask = valid[:, None, :] & (kv_pos[None, None, :] <= q_positions[:, :, None])  # [B, T, S]
    if sliding_window is not None:
        mask &= kv_pos[None, None, :] > q_positions[:, :, None] - sliding_window
    qg = rearrange(q, "b t (k g) h -> b t k g h", k=num_kv_heads)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    scores = jnp.where(mask[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0).astype(q.dtype)  # a query that sees nothing: zeros
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return rearrange(out, "b t k g h -> b t (k g) h")


QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}  # largest magnitude stored


def quantize_pages(pages, dtype=jnp.int8):
    """float pages [..., H] (pages [K, P, C, H], or new rows [N, K, H]) -> (pages of `dtype`,
    float32 scales [...]): symmetric, per position and kv head (the KV format: int8, or fp8 e4m3
    the same with e4m3's range)."""
    qmax = QMAX[jnp.dtype(dtype)]
    x = pages.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scales = jnp.where(amax == 0, 1.0, amax / qmax)
    y = x / scales[..., None]
    if jnp.issubdtype(dtype, jnp.integer):
        y = jnp.clip(jnp.round(y), -qmax, qmax)
    return y.astype(dtype), scales
