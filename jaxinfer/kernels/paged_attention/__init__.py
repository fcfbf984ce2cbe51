"""Paged attention: `reference` (jnp, the specification), `tpu` and `gpu` Pallas kernels, the `cpu`
FFI kernel, and the dispatcher that picks one (see jaxinfer.kernels for the impl names)."""

from __future__ import annotations

import jax

from jaxinfer.kernels import select
from jaxinfer.kernels.paged_attention import cpu, gpu, reference, tpu
from jaxinfer.kernels.paged_attention.reference import quantize_pages

IMPLS = {"reference": reference.paged_attention, "tpu": tpu.paged_attention, "gpu": gpu.paged_attention,
         "cpu": cpu.paged_attention}
UNSUPPORTED = {"tpu": tpu.unsupported, "gpu": gpu.unsupported, "cpu": cpu.unsupported}

__all__ = ["IMPLS", "paged_attention", "quantize_pages"]


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, q_positions, *, k_scales=None, v_scales=None,
                    sliding_window=None, soft_cap=None, layer=None, impl: str = "auto"):
    """See reference.paged_attention for the contract. With `layer`, the pages (and scales) are the
    whole cache, layer first ([L, K, P, C, H]), and attention reads that layer's: the cpu kernel
    indexes it in place (a custom call's operand is a buffer, so slicing it out would copy the
    layer's pages every step); the others get the slice."""
    def one(a):
        return None if a is None else jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    view = (k_pages, k_scales) if layer is None else (one(k_pages), one(k_scales))
    name, extra = select("attention_impl", impl, UNSUPPORTED, q, *view)
    if layer is not None and name == "cpu":
        extra = {"layer": layer}
    elif layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
        k_scales, v_scales = (None, None) if k_scales is None else (k_scales[layer], v_scales[layer])
    return IMPLS[name](q, k_pages, v_pages, block_table, kv_lens, q_positions, k_scales=k_scales, v_scales=v_scales,
                       sliding_window=sliding_window, soft_cap=soft_cap, **extra)
