"""Paged attention on the CPU: an XLA FFI custom call (cpu.cc) that reads each row's pages in
place through its block table, with an online softmax, instead of the reference's gather of every
page into a [B, S, K, H] copy. Built with the quant_matmul kernels into one library on first use
(kernels/quant_matmul/cpu.py says how); `reference.py` is the specification.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.paged_attention.common import kv_format_problem
from jaxinfer.kernels.quant_matmul.cpu import TARGETS, platform_problem, register


def unsupported(q, k_pages, k_scales) -> str | None:
    """Why this kernel cannot take these inputs, or None: float32 queries, float32 pages (or int8 /
    fp8 e4m3 with scales), and a kernel that builds here."""
    if q.dtype != jnp.float32:
        return f"queries must be float32, got {q.dtype}"
    return kv_format_problem(q, k_pages, k_scales) or platform_problem()


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, q_positions, *, k_scales=None, v_scales=None,
                    sliding_window=None, soft_cap=None, layer=None):
    """See reference.paged_attention for the contract; with `layer` (an int or a traced int32), the
    pages and scales are the whole cache [L, K, P, C, H] and the kernel reads that layer in place."""
    register()
    if layer is None:
        k_pages, v_pages = k_pages[None], v_pages[None]
        k_scales, v_scales = (None, None) if k_scales is None else (k_scales[None], v_scales[None])
        layer = 0
    if k_scales is None:  # float pages: the scale arguments are unused
        k_scales = v_scales = jnp.zeros((1,), jnp.float32)
    call = jax.ffi.ffi_call(TARGETS["paged_attention"], jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q, k_pages, v_pages, k_scales.astype(jnp.float32), v_scales.astype(jnp.float32),
                block_table.astype(jnp.int32), kv_lens.astype(jnp.int32), q_positions.astype(jnp.int32),
                jnp.asarray(layer, jnp.int32).reshape(1),
                sliding_window=np.int64(sliding_window or 0), soft_cap=np.float32(soft_cap or 0.0))
