"""Paged attention in plain jnp: the specification every backend kernel is tested against.

Row b's kv position s lives in page `block_table[b, s // C]` at offset `s % C`. Query t of row b
(at position `q_positions[b, t]`) sees kv position s iff s < kv_lens[b], s <= its position, and
s > its position - sliding_window. Slots past kv_lens may hold anything, NaN included (recycled
pages in debug mode): they are zeroed before use, so they can never leak into the output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange

MASKED = -1e30  # finite, so a row that sees nothing averages zeros instead of producing NaN


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, q_positions, *, sliding_window=None):
    """q [B, T, N, H]; k_pages, v_pages [K, P, C, H]; block_table [B, Pmax] int32;
    kv_lens [B] int32; q_positions [B, T] int32 -> [B, T, N, H] in q's dtype."""
    num_kv_heads, _, page_size, h = k_pages.shape
    s = block_table.shape[1] * page_size
    k = rearrange(k_pages[:, block_table], "k b p c h -> b (p c) k h")  # [B, S, K, H]
    v = rearrange(v_pages[:, block_table], "k b p c h -> b (p c) k h")
    kv_pos = jnp.arange(s, dtype=jnp.int32)
    valid = kv_pos[None, :] < kv_lens[:, None]  # [B, S]
    v = jnp.where(valid[:, :, None, None], v, 0)
    mask = valid[:, None, :] & (kv_pos[None, None, :] <= q_positions[:, :, None])  # [B, T, S]
    if sliding_window is not None:
        mask &= kv_pos[None, None, :] > q_positions[:, :, None] - sliding_window
    qg = rearrange(q, "b t (k g) h -> b t k g h", k=num_kv_heads)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores / math.sqrt(h), MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(q.dtype))
    return rearrange(out, "b t k g h -> b t (k g) h")
