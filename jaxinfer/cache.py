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
