"""KV caches as pytrees. `DenseKVCache`: one slot per position per row, for the baseline `generate()`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
    """Slot s of row b holds position s of that row (rows are right-padded, positions start at 0)."""

    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]

    @classmethod
    def zeros(cls, num_layers, batch, max_len, num_kv_heads, head_dim, dtype) -> "DenseKVCache":
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, layer, k, v, positions) -> "DenseKVCache":
        """k, v: [B, T, K, H] at slots `positions` [B, T] of `layer`; slots past the end are dropped."""
        rows = jnp.arange(k.shape[0])[:, None]
        return DenseKVCache(self.k.at[layer, rows, positions].set(k.astype(self.k.dtype), mode="drop"),
                            self.v.at[layer, rows, positions].set(v.astype(self.v.dtype), mode="drop"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Pages of C positions; a request owns a list of pages (its block table). Layer first: one
    donated buffer; K second: sharded over KV heads on a `model` mesh axis."""

    k: jax.Array  # [L, K, P, C, H]
    v: jax.Array  # [L, K, P, C, H]

    @classmethod
    def zeros(cls, num_layers, num_kv_heads, num_pages, page_size, head_dim, dtype) -> "PagedKVCache":
        shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    def write(self, layer, k, v, slots) -> "PagedKVCache":
        """k, v: [N, K, H] for flat slots [N] (page * C + offset). Padding uses slot P * C, which
        lands on page P: out of range, dropped (an index of -1 would wrap onto the last page)."""
        page, offset = slots // self.page_size, slots % self.page_size
        return PagedKVCache(self.k.at[layer, :, page, offset].set(k.astype(self.k.dtype), mode="drop"),
                            self.v.at[layer, :, page, offset].set(v.astype(self.v.dtype), mode="drop"))

    def poison(self, pages) -> "PagedKVCache":
        """Fills `pages` [n] with NaN (debug: proves freed pages are never read); P drops padding."""
        return PagedKVCache(self.k.at[:, :, pages].set(jnp.nan, mode="drop"),
                            self.v.at[:, :, pages].set(jnp.nan, mode="drop"))
