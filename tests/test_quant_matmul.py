"""The quantized-matmul specification: int8 per channel and int4 group-wise weights round-trip
within half a quantization step, int4 packing is exact, and the reference equals x @ dequantize."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.kernels.quant_matmul import dequantize, quant_matmul, quantize
from jaxinfer.kernels.quant_matmul import reference
from jaxinfer.kernels.quant_matmul.reference import unpack_int4


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 64), (4, 128)])
def test_round_trip_error_is_at_most_half_a_step(bits, group):
    w = jax.random.normal(jax.random.key(0), (256, 48)) * 0.05
    q = quantize(w, bits, group)
    assert q.shape == (256, 48)
    step = np.repeat(np.asarray(q.scales), group or 256, axis=0)  # [K, N] scale of each element
    err = np.abs(np.asarray(dequantize(q)) - np.asarray(w))
    assert (err <= step / 2 + 1e-7).all()
    assert q.values.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert q.values.shape[0] == (256 if bits == 8 else 128)  # int4: two values per byte


def test_asymmetric_int4_uses_the_groups_range():
    """Skewed weights (all positive): the offset form stays within half a step of a finer grid, and
    beats symmetric int4, which wastes its negative half."""
    w = jax.random.uniform(jax.random.key(3), (256, 40), minval=0.2, maxval=1.0)
    qa, qs = quantize(w, 4, 64, asymmetric=True), quantize(w, 4, 64)
    assert qa.offsets.shape == qa.scales.shape == (4, 40) and qa.values.dtype == jnp.uint8
    err_a = np.abs(np.asarray(dequantize(qa)) - np.asarray(w))
    assert (err_a <= np.repeat(np.asarray(qa.scales), 64, axis=0) / 2 + 1e-6).all()
    assert err_a.mean() < 0.6 * np.abs(np.asarray(dequantize(qs)) - np.asarray(w)).mean()
    with pytest.raises(ValueError, match="asymmetric quantization is int4 only"):
        quantize(w, 8, 0, asymmetric=True)


def test_int4_packing_is_exact_on_every_nibble():
    every_byte = np.arange(256, dtype=np.uint8).reshape(1, 256)
    signed = lambda n: np.where(n > 7, n.astype(np.int16) - 16, n).astype(np.int8)  # noqa: E731
    want = np.concatenate([signed(every_byte & 15), signed(every_byte >> 4)])  # row 0: even k, row 1: odd k
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(every_byte))), want)
    ints = np.tile(np.arange(-7, 8, dtype=np.int8), 5)[:64].reshape(64, 1)
    ints[::32] = 7  # every group's max |w| is 7 steps of 1/7
    q = quantize(jnp.asarray(ints, jnp.float32) / 7, 4, 32)
    np.testing.assert_array_equal(np.asarray(unpack_int4(q.values)), ints)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 64)])
def test_reference_equals_dense_dot_of_dequantized_weights(dtype, tol, bits, group):
    q = quantize(jax.random.normal(jax.random.key(1), (128, 40)), bits, group)
    for shape in [(1, 128), (3, 7, 128)]:  # one token, and a batch of sequences
        x = jax.random.normal(jax.random.key(2), shape).astype(dtype)
        want = np.asarray(x.astype(jnp.float32) @ dequantize(q))
        got = np.asarray(quant_matmul(x, q, impl="reference").astype(jnp.float32))
        assert got.shape == shape[:-1] + (40,)
        np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())


def test_w8a8_sums_int8_products_exactly_and_stays_near_the_float_dot():
    """W8A8: per-token int8 x (absmax / 127) times per-channel int8 W. The int32 sum is exact, so the
    result is the float dot of the two dequantized operands; both round by at most half a step."""
    w = jax.random.normal(jax.random.key(0), (256, 96)) * 0.05
    x = jax.random.normal(jax.random.key(1), (2, 3, 256)).at[0, 0].set(0.0)  # a zero row: scale 1
    q = dataclasses.replace(quantize(w, 8), act_bits=8)
    got = np.asarray(quant_matmul(x, q, impl="reference"))
    xq, xs = reference.quantize_activations(x.reshape(-1, 256))
    assert xq.dtype == jnp.int8 and np.abs(np.asarray(xq)).max() == 127
    both = (np.asarray(xq, np.float64) * np.asarray(xs)) @ (np.asarray(q.values, np.float64) * np.asarray(q.scales))
    np.testing.assert_allclose(got.reshape(-1, 96), both, rtol=1e-5, atol=1e-6)
    assert np.all(got[0, 0] == 0)
    exact = np.asarray(x @ w)
    err = np.abs(got - exact).max() / np.abs(exact).max()
    assert 1e-4 < err < 2e-2  # really quantized, and by about int8's resolution
    with pytest.raises(ValueError, match="W8A8 needs int8 per-channel weights, got bits=4"):
        quant_matmul(x, dataclasses.replace(quantize(w, 4, 32), act_bits=8), impl="reference")


@pytest.mark.parametrize("bits,group,asym,act_bits", [(8, 0, False, 0), (4, 32, False, 0), (4, 128, False, 0),
                                                    (4, 64, True, 0), (8, 0, False, 8)])
def test_cpu_kernel_equals_the_reference(bits, group, asym, act_bits):
    """The C++ FFI kernel against reference.quant_matmul: one row (decode), a few (speculative
    verify, small batches), more than a row tile, and N / K that are no multiple of the vector width
    or the column block; K split across threads (384 rows), a wide N (9000 > one block), and K not
    a multiple of 4 (W8A8's packed groups of four). W8A8 sums int8 products in int32 as the
    reference's dot does, so it must equal it exactly."""
    from jaxinfer.kernels.quant_matmul import cpu, reference

    assert cpu.unsupported(jnp.ones((1, 8)), quantize(jnp.ones((8, 8)))) is None, "the CPU kernel did not build"
    for (k, n) in [(384, 300), (128, 9000), (256, 7)] + ([(770, 45), (1030, 33)] if act_bits else []):
        q = dataclasses.replace(quantize(jax.random.normal(jax.random.key(k), (k, n)) * 0.1, bits, group, asym),
                                act_bits=act_bits)
        for m in (1, 3, 5, 37):
            x = jax.random.normal(jax.random.key(m), (m, k))
            want = np.asarray(reference.quant_matmul(x, q))
            got = np.asarray(jax.jit(cpu.quant_matmul)(x, q))
            if act_bits:
                np.testing.assert_array_equal(got, want, err_msg=f"{m}x{k}x{n}")
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=f"{m}x{k}x{n}")
    x3 = jax.random.normal(jax.random.key(9), (2, 3, 256))  # leading axes are flattened and restored
    q = quantize(jax.random.normal(jax.random.key(8), (256, 24)), bits, group, asym)
    np.testing.assert_allclose(np.asarray(cpu.quant_matmul(x3, q)), np.asarray(reference.quant_matmul(x3, q)),
                               rtol=1e-5, atol=1e-5)


def test_cpu_float_kernel_equals_xla_dot():
    """The float32 half of the cpu kernel (model.float_matmul) against XLA's dot, same shapes."""
    from jaxinfer.kernels.quant_matmul import cpu

    for (k, n) in [(384, 300), (128, 9000), (256, 7)]:
        w = jax.random.normal(jax.random.key(k), (k, n)) * 0.1
        for m in (1, 3, 5, 37):
            x = jax.random.normal(jax.random.key(m), (m, k))
            want = np.asarray(jnp.dot(x, w, precision="highest"))
            got = np.asarray(jax.jit(cpu.float_matmul)(x, w))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=f"{m}x{k}x{n}")


def _custom_calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count("JaxinferF32Matmul")


def test_float_matmul_auto_takes_the_kernel_for_a_few_float32_rows_only():
    from jaxinfer.kernels.quant_matmul import FLOAT_ROWS, float_matmul

    w = jnp.ones((64, 16))
    auto = lambda x, w: float_matmul(x, w)  # noqa: E731
    assert _custom_calls(auto, jnp.ones((1, 64)), w) == 1
    assert _custom_calls(auto, jnp.ones((2, FLOAT_ROWS // 2, 64)), w) == 1  # rows count across leading axes
    assert _custom_calls(auto, jnp.ones((FLOAT_ROWS + 1, 64)), w) == 0  # a prefill chunk: XLA's dot
    assert _custom_calls(auto, jnp.ones((1, 64), jnp.bfloat16), w.astype(jnp.bfloat16)) == 0
    assert _custom_calls(lambda x, w: float_matmul(x, w, impl="xla"), jnp.ones((1, 64)), w) == 0
    assert _custom_calls(lambda x, w: float_matmul(x, w, impl="cpu"), jnp.ones((FLOAT_ROWS + 1, 64)), w) == 1
    with pytest.raises(ValueError, match="model.float_matmul 'cpu': activations and weights must be float32"):
        float_matmul(jnp.ones((1, 64), jnp.bfloat16), w, impl="cpu")
    with pytest.raises(ValueError, match="model.float_matmul 'gpu' is not available; choose from auto, xla, cpu"):
        float_matmul(jnp.ones((1, 64)), w, impl="gpu")


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="x86-64 instruction-set levels")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])
def test_cpu_kernel_paths_for_other_instruction_sets(arch):
    """The AVX2 + FMA path and the plain loops (what an AVX2-only or other CPU builds), built with
    JAXINFER_KERNEL_ARCH in a fresh process, against the reference and XLA's dot."""
    import os
    import subprocess
    import sys

    script = """
import jax, jax.numpy as jnp, numpy as np
from jaxinfer.kernels.quant_matmul import cpu, reference, quantize
import dataclasses
for bits, group, asym, act in [(8, 0, False, 0), (4, 32, False, 0), (4, 64, True, 0), (0, 0, False, 0), (8, 0, False, 8)]:
    for m, k, n in [(1, 128, 40), (5, 256, 7), (37, 128, 300)]:
        x = jax.random.normal(jax.random.key(m), (m, k))
        w = jax.random.normal(jax.random.key(k + n), (k, n)) * 0.1
        if bits:
            q = dataclasses.replace(quantize(w, bits, group, asym), act_bits=act)
            want, got = reference.quant_matmul(x, q), jax.jit(cpu.quant_matmul)(x, q)
        else:
            want, got = jnp.dot(x, w, precision="highest"), jax.jit(cpu.float_matmul)(x, w)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
print("ok", cpu.build().name)
"""
    env = os.environ | {"JAXINFER_KERNEL_ARCH": arch, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_cpu_kernel_is_auto_on_cpu_for_float32_only():
    from jaxinfer.kernels import select
    from jaxinfer.kernels.quant_matmul import UNSUPPORTED

    q = quantize(jnp.ones((64, 16)))
    assert select("matmul_impl", "auto", UNSUPPORTED, jnp.ones((1, 64)), q)[0] == "cpu"
    assert select("matmul_impl", "auto", UNSUPPORTED, jnp.ones((1, 64), jnp.bfloat16), q)[0] == "reference"
    with pytest.raises(ValueError, match="matmul_impl 'cpu': activations must be float32, got bfloat16"):
        select("matmul_impl", "cpu", UNSUPPORTED, jnp.ones((1, 64), jnp.bfloat16), q)


def test_cpu_kernel_without_a_compiler_says_so(monkeypatch, tmp_path):
    from jaxinfer.kernels.quant_matmul import cpu

    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    cpu.build.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
            cpu.build()
    finally:
        cpu.build.cache_clear()


@pytest.mark.parametrize("k,group,asym", [(172, 32, False), (172, 128, True), (100, 64, False)])
def test_any_feature_count_gets_a_padded_last_group(k, group, asym):
    """K that no group size divides (an FFN of 172): the last group is padded with copies of the
    last row, so every real weight still round-trips within half a step of its group's scale, and
    x @ W over the K real features equals the dense dot; the reference, the CPU kernel and the
    dispatcher agree."""
    from jaxinfer.kernels.quant_matmul import cpu, reference

    w = jax.random.normal(jax.random.key(k), (k, 40)) * 0.05
    q = quantize(w, 4, group, asym)
    k_pad = -(-k // group) * group
    assert q.shape == (k_pad, 40) and q.values.shape == (k_pad // 2, 40) and q.scales.shape == (k_pad // group, 40)
    step = np.repeat(np.asarray(q.scales), group, axis=0)[:k]
    err = np.abs(np.asarray(dequantize(q))[:k] - np.asarray(w))
    assert (err <= step / 2 + 1e-6).all()
    x = jax.random.normal(jax.random.key(1), (3, k))
    want = np.asarray(x @ dequantize(q)[:k])
    for got in (reference.quant_matmul(x, q), cpu.quant_matmul(x, q), quant_matmul(x, q)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match=f"x has {k - group} features but the weight expects K={k_pad}"):
        quant_matmul(x[:, : k - group], q)


def test_bad_shapes_name_the_constraint():
    w = jnp.ones((96, 8))
    with pytest.raises(ValueError, match="int4 group_size=48: use one of 32, 64, 128"):
        quantize(w, 4, 48)
    with pytest.raises(ValueError, match="bits=3"):
        quantize(w, 3)
    with pytest.raises(ValueError, match="weight expects K=96"):
        quant_matmul(jnp.ones((1, 95)), quantize(w))
    with pytest.raises(ValueError, match="matmul_impl 'mosaic' is not available"):
        from jaxinfer.kernels.quant_matmul import quant_matmul as dispatch

        dispatch(jnp.ones((1, 96)), quantize(w), impl="mosaic")
