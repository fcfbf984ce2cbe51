"""The quantized-matmul specification: int8 per channel and int4 group-wise weights round-trip
within half a quantization step, int4 packing is exact, and the reference equals x @ dequantize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.kernels.quant_matmul import dequantize, quant_matmul, quantize
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
        got = np.asarray(quant_matmul(x, q).astype(jnp.float32))
        assert got.shape == shape[:-1] + (40,)
        np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())


def test_bad_shapes_name_the_constraint():
    w = jnp.ones((96, 8))
    with pytest.raises(ValueError, match="int4 needs group_size in \\(32, 64, 128\\) dividing K=96; got 64"):
        quantize(w, 4, 64)
    with pytest.raises(ValueError, match="bits=3"):
        quantize(w, 3)
    with pytest.raises(ValueError, match="weight expects K=96"):
        quant_matmul(jnp.ones((1, 95)), quantize(w))
    with pytest.raises(ValueError, match="matmul_impl 'mosaic' is not available"):
        from jaxinfer.kernels.quant_matmul import quant_matmul as dispatch

        dispatch(jnp.ones((1, 96)), quantize(w), impl="mosaic")
