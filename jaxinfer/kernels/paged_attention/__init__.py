"""Paged attention dispatcher: `impl` is "auto" (best available for the backend) or a name."""

from __future__ import annotations

from jaxinfer.kernels.paged_attention import reference

IMPLS = {"reference": reference.paged_attention}


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, q_positions, *, sliding_window=None,
                    impl: str = "auto"):
    """See reference.paged_attention for the contract. Pallas kernels join IMPLS as they land."""
    if impl == "auto":
        impl = "reference"
    if impl not in IMPLS:
        raise ValueError(f"attention_impl '{impl}' is not available; choose from auto, {', '.join(IMPLS)}")
    return IMPLS[impl](q, k_pages, v_pages, block_table, kv_lens, q_positions, sliding_window=sliding_window)
