"""Quantized matmul: `reference` (dequantize, then dot: the specification), `tpu` and `gpu` Pallas
kernels, the `cpu` FFI kernel, and the dispatcher that picks one (see jaxinfer.kernels for the
impl names)."""

from __future__ import annotations

from jaxinfer.kernels import select
from jaxinfer.kernels.quant_matmul import cpu, gpu, reference, tpu
from jaxinfer.kernels.quant_matmul.reference import QuantArray, dequantize, quantize

IMPLS = {"reference": reference.quant_matmul, "tpu": tpu.quant_matmul, "gpu": gpu.quant_matmul,
         "cpu": cpu.quant_matmul}
UNSUPPORTED = {"tpu": tpu.unsupported, "gpu": gpu.unsupported, "cpu": cpu.unsupported}

__all__ = ["IMPLS", "QuantArray", "dequantize", "quant_matmul", "quantize"]


def quant_matmul(x, q: QuantArray, *, impl: str = "auto"):
    """x [..., K] @ W -> [..., N] in x's dtype (see reference.quant_matmul)."""
    name, extra = select("matmul_impl", impl, UNSUPPORTED, x, q)
    return IMPLS[name](x, q, **extra)
