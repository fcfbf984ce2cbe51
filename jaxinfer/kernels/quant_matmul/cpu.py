"""`x @ W` on the CPU: XLA FFI custom calls (cpu.cc) that read the int8 / packed int4 bytes every
call and never build a float copy of the weight (`reference.py` is the specification), and the
same kernels over float32 W (`float_matmul`). Up to 4 rows of x each weight vector is read once for
every row; above that each block of W is widened once into a float panel and multiplied with
register tiles of x (the GEMM micro-kernel of cpu.cc's blocked path). W8A8 (`act_bits=8`): the
kernel sums int8 x int8 in int32 (AVX-512 VNNI where the CPU has it) and nothing else; quantizing x
and the scales are the reference's own jnp, so the two agree bit for bit.

Why a custom call: XLA's CPU backend has no fast path for it. Its int8 x int8 -> int32 dot is a
scalar loop at M = 1, every library fusion (XNNPACK, YNNPACK, oneDNN) packs the weight on each call
or rejects M = 1, and the fused convert-multiply-reduce pays ~0.2 ms a call; the reference
dequantizes every weight every step (`experiments/quant_gemv.py` measures each of these).

cpu.cc is built on first use with the machine's C++ compiler (`CXX`, else c++ / g++ / clang++),
`-O3 -march=native` (`JAXINFER_KERNEL_ARCH` overrides native), against the XLA FFI headers that
jaxlib ships, into a cache folder keyed by the source, the flags, the compiler and jaxlib
(`JAXINFER_KERNEL_CACHE`, default ~/.cache/jaxinfer/kernels). With no compiler, `unsupported` says so and `auto` keeps the reference.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.quant_matmul.reference import QuantArray, check_features, check_w8a8, quantize_activations

SOURCE = Path(__file__).with_name("cpu.cc")
# Every CPU kernel builds into one library: this file's matmuls, paged attention, their shared header.
SOURCES = (SOURCE, SOURCE.parent.parent / "paged_attention" / "cpu.cc")
HEADERS = (SOURCE.parent.parent / "cpu_common.h",)
# JAXINFER_KERNEL_ARCH picks the -march target (default native: AVX-512 or AVX2 + FMA where the CPU
# has them); the tests build x86-64-v3 (AVX2) and x86-64 (plain loops) too, so every path is run.
FLAGS = ("-O3", f"-march={os.environ.get('JAXINFER_KERNEL_ARCH', 'native')}", "-std=c++17", "-shared", "-fPIC")
TARGETS = {"f32": "JaxinferF32Matmul", "int8": "JaxinferInt8Matmul", "int4": "JaxinferInt4Matmul", "int4_asym": "JaxinferInt4AsymMatmul",
           "s8": "JaxinferS8Matmul", "paged_attention": "JaxinferPagedAttention"}


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("JAXINFER_KERNEL_CACHE", Path.home() / ".cache" / "jaxinfer" / "kernels"))


@functools.cache
def build() -> Path:
    """Compiles cpu.cc once per (source, flags, compiler, jaxlib) and returns the shared library."""
    import jaxlib

    cxx = compiler()
    if cxx is None:
        raise RuntimeError("matmul_impl 'cpu' needs a C++ compiler (set CXX, or install g++); "
                           "use matmul_impl: reference meanwhile")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    texts = [f.read_text() for f in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, *FLAGS, cxx, *version, jaxlib.__version__]).encode())
    out = cache_dir() / f"jaxinfer_cpu_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    include = Path(jaxlib.__file__).parent / "include"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: safe under races
        part = Path(tmp) / out.name
        cmd = [cxx, *FLAGS, f"-I{include}", *map(str, SOURCES), "-o", str(part)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building the CPU kernels failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        os.replace(part, out)
    return out


@functools.cache
def register() -> None:
    import ctypes

    lib = ctypes.cdll.LoadLibrary(str(build()))
    for target in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")


@functools.cache
def _build_error() -> str | None:
    try:
        register()
    except (RuntimeError, OSError) as e:
        return str(e).splitlines()[0]
    return None


def platform_problem() -> str | None:
    """Why no CPU kernel runs here (the platform, then the build), or None."""
    return _unsupported(None)


def _unsupported(dtype_error: str | None) -> str | None:
    """Why the kernel cannot run here: the platform, the dtypes, then the build."""
    if sys.platform == "win32":
        return "the CPU kernel is built for Linux and macOS"
    return dtype_error or _build_error()


def unsupported(x, q: QuantArray) -> str | None:
    return _unsupported(None if x.dtype == jnp.float32 else f"activations must be float32, got {x.dtype}")


def float_unsupported(x, w) -> str | None:
    ok = x.dtype == jnp.float32 and w.dtype == jnp.float32
    return _unsupported(None if ok else f"activations and weights must be float32, got {x.dtype} and {w.dtype}")


def quant_matmul(x, q: QuantArray):
    """x [..., K] float32 @ W -> [..., N] float32."""
    x = check_features(x, q)
    register()
    k, n = q.shape
    x2 = x.reshape(-1, k)
    out = jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32)
    if q.act_bits:  # W8A8: the kernel sums int8 x int8 exactly; quantizing x and the scales are the reference's
        check_w8a8(q)
        xq, xs = quantize_activations(x2)
        acc = jax.ffi.ffi_call(TARGETS["s8"], jax.ShapeDtypeStruct((x2.shape[0], n), jnp.int32))(xq, q.values)
        y = acc.astype(jnp.float32) * xs * q.scales.astype(jnp.float32)
    elif q.bits == 8:
        y = jax.ffi.ffi_call(TARGETS["int8"], out)(x2, q.values, q.scales)
    elif q.offsets is None:
        y = jax.ffi.ffi_call(TARGETS["int4"], out)(x2, q.values, q.scales, group=np.int64(q.group_size))
    else:
        y = jax.ffi.ffi_call(TARGETS["int4_asym"], out)(x2, q.values, q.scales, q.offsets,
                                                          group=np.int64(q.group_size))
    return y.reshape(*x.shape[:-1], n)


def float_matmul(x, w):
    """x [..., K] float32 @ w [K, N] float32 -> [..., N] through the same streaming loops
    (`model.float_matmul`; the dispatcher is quant_matmul.float_matmul)."""
    register()
    k, n = w.shape
    x2 = x.reshape(-1, k)
    y = jax.ffi.ffi_call(TARGETS["f32"], jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32))(x2, w)
    return y.reshape(*x.shape[:-1], n)
