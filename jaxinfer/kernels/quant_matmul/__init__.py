"""Quantized matmul: `reference` (dequantize, then dot: the specification), `tpu` and `gpu` Pallas
kernels, the `cpu` FFI kernel, and the dispatcher that picks one (see jaxinfer.kernels for the
impl names)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxinfer.kernels import select
from jaxinfer.kernels.quant_matmul import cpu, gpu, reference, tpu
from jaxinfer.kernels.quant_matmul.reference import QuantArray, dequantize, quantize

IMPLS = {"reference": reference.quant_matmul, "tpu": tpu.quant_matmul, "gpu": gpu.quant_matmul,
         "cpu": cpu.quant_matmul}
UNSUPPORTED = {"tpu": tpu.unsupported, "gpu": gpu.unsupported, "cpu": cpu.unsupported}

__all__ = ["FLOAT_IMPLS", "IMPLS", "QuantArray", "dequantize", "float_matmul", "quant_matmul", "quantize"]

FLOAT_IMPLS = ("auto", "xla", "cpu")
# auto takes the cpu kernel up to this many rows of x. Up to 4 rows it streams W once for all of
# them; above, it multiplies register tiles against float panels of W (cpu.cc, the blocked path).
# Measured on the 2-core AMD EPYC: Engine batch-32 float32 TPOT 117-127 ms with the kernel vs
# 144-159 ms on XLA's dot, one process; `python experiments/quant_gemv.py --rows 8 32 64` (one
# step's 85 matmuls) 1.38x XLA at 8 rows, 1.18x at 32, 1.09x at 64, so prefill chunks stay on XLA.
FLOAT_ROWS = 32


def quant_matmul(x, q: QuantArray, *, impl: str = "auto"):
    """x [..., K] @ W -> [..., N] in x's dtype (see reference.quant_matmul)."""
    name, extra = select("matmul_impl", impl, UNSUPPORTED, x, q)
    return IMPLS[name](x, q, **extra)


def float_matmul(x, w, *, impl: str = "auto", preferred_element_type=None):
    """x [..., K] @ w [K, N] for float weights (`model.float_matmul`): `xla` is XLA's dot; `cpu`
    the FFI kernel (float32 only); `auto` the kernel on the CPU backend for float32 x and w and at
    most FLOAT_ROWS rows of x when it builds, else XLA's dot (with `preferred_element_type`)."""
    if impl not in FLOAT_IMPLS:
        raise ValueError(f"model.float_matmul '{impl}' is not available; choose from {', '.join(FLOAT_IMPLS)}")
    rows = math.prod(x.shape[:-1])
    if impl == "cpu" or (impl == "auto" and jax.default_backend() == "cpu" and rows <= FLOAT_ROWS):
        why = cpu.float_unsupported(x, w)
        if why is None:
            return cpu.float_matmul(x, w)
        if impl == "cpu":
            raise ValueError(f"model.float_matmul 'cpu': {why}")
    return jnp.einsum("...k,kn->...n", x, w, preferred_element_type=preferred_element_type)
