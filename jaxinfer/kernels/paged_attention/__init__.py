"""Paged attention: `reference` (jnp, the specification), `tpu` and `gpu` Pallas kernels, and the
dispatcher that picks one (see jaxinfer.kernels for the impl names)."""

from __future__ import annotations

from jaxinfer.kernels import select
from jaxinfer.kernels.paged_attention import gpu, reference, tpu
from jaxinfer.kernels.paged_attention.reference import quantize_pages

IMPLS = {"reference": reference.paged_attention, "tpu": tpu.paged_attention, "gpu": gpu.paged_attention}
UNSUPPORTED = {"tpu": tpu.unsupported, "gpu": gpu.unsupported}

__all__ = ["IMPLS", "paged_attention", "quantize_pages"]


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, q_positions, *, k_scales=None, v_scales=None,
                    sliding_window=None, soft_cap=None, impl: str = "auto"):
    """See reference.paged_attention for the contract."""
    name, extra = select("attention_impl", impl, UNSUPPORTED, q, k_pages, k_scales)
    return IMPLS[name](q, k_pages, v_pages, block_table, kv_lens, q_positions, k_scales=k_scales, v_scales=v_scales,
                       sliding_window=sliding_window, soft_cap=soft_cap, **extra)
