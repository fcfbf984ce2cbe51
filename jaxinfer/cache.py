"""KV caches as pytrees. `DenseKVCache`: one slot per position per row, for the baseline `generate()`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.kernels.paged_attention.reference import quantize_pages


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


# engine.kv_cache_dtype values stored quantized -> the page dtype (the format: kernels.paged_attention)
QUANTIZED_KV = {"int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Pages of C positions; a request owns a list of pages (its block table). Layer first: one
    donated buffer; K second: sharded over KV heads on a `model` mesh axis. Quantized pages
    (engine.kv_cache_dtype int8 / fp8_e4m3) hold values and a float32 scale per position and kv
    head, written with the values (`write`); attention reads both."""

    k: jax.Array  # [L, K, P, C, H]
    v: jax.Array  # [L, K, P, C, H]
    k_scale: jax.Array | None = None  # [L, K, P, C] float32, quantized pages only
    v_scale: jax.Array | None = None

    @classmethod
    def zeros(cls, num_layers, num_kv_heads, num_pages, page_size, head_dim, dtype) -> "PagedKVCache":
        """dtype: a float dtype, or a name in QUANTIZED_KV (values plus scales)."""
        shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
        if isinstance(dtype, str) and dtype in QUANTIZED_KV:
            values = QUANTIZED_KV[dtype]  # four buffers (the step donates each)
            return cls(jnp.zeros(shape, values), jnp.zeros(shape, values), jnp.ones(shape[:-1], jnp.float32),
                       jnp.ones(shape[:-1], jnp.float32))
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes of the pool: values and scales."""
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))

    def write(self, layer, k, v, slots) -> "PagedKVCache":
        """k, v: [N, K, H] for flat slots [N] (page * C + offset). Padding uses slot P * C, which
        lands on page P: out of range, dropped (an index of -1 would wrap onto the last page)."""
        page, offset = slots // self.page_size, slots % self.page_size
        at = (layer, slice(None), page, offset)
        if not self.quantized:
            return PagedKVCache(self.k.at[at].set(k.astype(self.k.dtype), mode="drop"),
                                self.v.at[at].set(v.astype(self.v.dtype), mode="drop"))
        (kq, ks), (vq, vs) = quantize_pages(k, self.k.dtype), quantize_pages(v, self.v.dtype)
        return PagedKVCache(self.k.at[at].set(kq, mode="drop"), self.v.at[at].set(vq, mode="drop"),
                            self.k_scale.at[at].set(ks, mode="drop"), self.v_scale.at[at].set(vs, mode="drop"))

    def poison(self, pages) -> "PagedKVCache":
        """NaN into `pages` [n] (debug: proves freed pages are never read); P drops padding.
        Quantized pages get NaN scales, so their values read as NaN."""
        if self.quantized:
            return dataclasses.replace(self, k_scale=self.k_scale.at[:, :, pages].set(jnp.nan, mode="drop"),
                                       v_scale=self.v_scale.at[:, :, pages].set(jnp.nan, mode="drop"))
        return PagedKVCache(self.k.at[:, :, pages].set(jnp.nan, mode="drop"),
                            self.v.at[:, :, pages].set(jnp.nan, mode="drop"))
