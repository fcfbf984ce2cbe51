"""What the Pallas paged-attention kernels share: the query layout they work in.

Each (row, kv head) program owns the G = N // K query heads of that kv head for all T query slots,
as one [T * G, H] tile (row r = t * G + g), so a decode row with GQA still fills a matmul. The tile
is padded to `multiple` rows; padding rows get position -1, see nothing and come out as zeros.
"""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange
from jax.experimental import pallas as pl


def group_queries(q, q_positions, num_kv_heads: int, multiple: int):
    """q [B, T, N, H], q_positions [B, T] -> (q [B, K, R, H], positions [B, R], R) with R the padded T * G."""
    b, t, n, _ = q.shape
    g = n // num_kv_heads
    qg = rearrange(q, "b t (k g) h -> b k (t g) h", k=num_kv_heads)
    pos = jnp.repeat(q_positions, g, axis=1)  # [B, T * G], row t * G + g
    rows = -(-(t * g) // multiple) * multiple
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))
    pos = jnp.pad(pos, ((0, 0), (0, rows - t * g)), constant_values=-1)
    return qg, pos.astype(jnp.int32), rows


def kv_format_problem(q, k_pages, k_scales) -> str | None:
    """The KV page formats every kernel takes: float pages of q's dtype, or quantized pages (int8,
    fp8 e4m3) with scales (widened to q's dtype exactly, the scale applied after the dot)."""
    if k_scales is None and k_pages.dtype != q.dtype:
        return f"float KV pages must match the query dtype ({q.dtype}), got {k_pages.dtype}"
    if k_scales is not None and k_pages.dtype not in QUANTIZED_PAGES:
        return f"KV scales go with int8 or float8_e4m3fn pages, got {k_pages.dtype}"
    return None


QUANTIZED_PAGES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def cost(qg, k_pages, width: int, quantized: bool):
    """XLA's view of a kernel call (it cannot see inside): flops, exps and bytes for every page in the tables."""
    b, k, rows, h = qg.shape
    keys = b * k * width * k_pages.shape[2]
    kv_bytes = 2 * keys * h * k_pages.dtype.itemsize + (2 * keys * 4 if quantized else 0)
    return pl.CostEstimate(flops=4 * rows * keys * h, transcendentals=rows * keys,
                           bytes_accessed=2 * qg.size * qg.dtype.itemsize + kv_bytes)


def ungroup(out, t: int, n: int):
    """[B, K, R, H] -> [B, T, N, H] (drops the padding rows)."""
    k = out.shape[1]
    return rearrange(out[:, :, : t * (n // k)], "b k (t g) h -> b t (k g) h", t=t)
