"""Pallas kernels, each beside the plain-jnp `reference` that is its specification.

Implementations are picked by name: `reference`, `tpu` (Pallas Mosaic TPU), `gpu` (Pallas GPU),
`cpu` (XLA FFI custom calls in C++, built on first use: quant_matmul and paged_attention),
`tpu_interpret` / `gpu_interpret` (the same kernels run by the Pallas interpreter: any backend,
slow, for tests), or `auto`: the kernel for this backend when it can take the inputs, else the
reference, with one log line saying why.
"""

from __future__ import annotations

import logging

import jax
from jax.experimental.pallas import tpu as pltpu

log = logging.getLogger("jaxinfer.kernels")
IMPL_NAMES = ("auto", "reference", "tpu", "gpu", "cpu", "tpu_interpret", "gpu_interpret")
_LOGGED: set[str] = set()


def log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning(message)


def select(what: str, impl: str, unsupported: dict, *args) -> tuple[str, dict]:
    """-> (kernel name: reference | tpu | gpu | cpu, extra kwargs) for `impl`.

    `unsupported[name](*args)` says why kernel `name` cannot take these inputs (or None). An explicit
    name that cannot take them raises, naming the constraint; `auto` falls back to the reference
    and logs it once."""
    if impl not in IMPL_NAMES:
        raise ValueError(f"{what} '{impl}' is not available; choose from {', '.join(IMPL_NAMES)}")
    if impl == "reference":
        return "reference", {}
    if impl == "auto":
        backend = jax.default_backend()
        name = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "cpu": "cpu"}.get(backend)
        if name not in unsupported:
            log_once(f"{what} auto: no kernel for the {backend} backend; using the jnp reference")
            return "reference", {}
        if why := unsupported[name](*args):
            log_once(f"{what} auto: the {name} kernel cannot take these inputs ({why}); using the jnp reference")
            return "reference", {}
        return name, {}
    name = impl.removesuffix("_interpret")
    if name not in unsupported:
        raise ValueError(f"{what} '{impl}' is not available for this op; choose from auto, reference, "
                         + ", ".join(sorted(unsupported)))
    if why := unsupported[name](*args):
        raise ValueError(f"{what} '{impl}': {why}")
    if impl == "tpu_interpret":
        return name, {"interpret": pltpu.InterpretParams()}
    return name, {"interpret": True} if impl == "gpu_interpret" else {}
