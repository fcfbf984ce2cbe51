"""Quantized matmul dispatcher: `impl` is "auto" (best available) or a name. Pallas TPU/GPU
kernels join IMPLS as they land (issue 5); `reference` is their specification."""

from __future__ import annotations

from jaxinfer.kernels.quant_matmul import reference
from jaxinfer.kernels.quant_matmul.reference import QuantArray, dequantize, quantize

IMPLS = {"reference": reference.quant_matmul}

__all__ = ["IMPLS", "QuantArray", "dequantize", "quant_matmul", "quantize"]


def quant_matmul(x, q: QuantArray, *, impl: str = "auto"):
    if impl == "auto":
        impl = "reference"
    if impl not in IMPLS:
        raise ValueError(f"matmul_impl '{impl}' is not available; choose from auto, {', '.join(IMPLS)}")
    return IMPLS[impl](x, q)
