"""Paged cache and the paged-attention reference: writes land where the block table says, padding
writes are dropped (never wrapped), stale or NaN slots never leak, and paged equals dense."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.cache import PagedKVCache
from jaxinfer.kernels.paged_attention import paged_attention
from jaxinfer.models.llama import attention


def test_write_lands_on_page_and_offset_and_drops_padding():
    cache = PagedKVCache.zeros(2, 2, 4, 3, 5, jnp.float32)  # L K P C H
    k = jnp.arange(3 * 2 * 5, dtype=jnp.float32).reshape(3, 2, 5) + 1
    slots = jnp.array([4, 11, 4 * 3])  # page 1 offset 1; page 3 offset 2; padding (P * C)
    out = cache.write(1, k, -k, slots)
    np.testing.assert_array_equal(out.k[1, :, 1, 1], k[0])
    np.testing.assert_array_equal(out.v[1, :, 3, 2], -k[1])
    assert float(jnp.abs(out.k).sum()) == float(jnp.abs(k[:2]).sum())  # padding went nowhere
    assert float(jnp.abs(out.k[0]).sum()) == 0


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_equals_dense_attention_with_shuffled_pages_and_nan_garbage(window):
    rng = np.random.default_rng(0)
    K, N, H, C, P = 2, 4, 8, 4, 16
    lens = [13, 1, 7]  # kv length of each row after this step
    T = 3  # the last T positions are this step's queries (row 1 has 1 real query)
    pages = rng.permutation(P)[: sum(-(-n // C) for n in lens)]
    k_pages = np.full((K, P, C, H), np.nan, np.float32)  # everything unwritten is NaN
    v_pages = np.full((K, P, C, H), np.nan, np.float32)
    pmax = 4
    table = np.zeros((len(lens), pmax), np.int32)
    dense_k, dense_v, used = [], [], 0
    for b, n in enumerate(lens):
        kb, vb = rng.standard_normal((2, n, K, H)).astype(np.float32)
        for s in range(n):
            page = pages[used + s // C]
            table[b, s // C] = page
            k_pages[:, page, s % C], v_pages[:, page, s % C] = kb[s], vb[s]
        used += -(-n // C)
        dense_k.append(np.pad(kb, ((0, 16 - n), (0, 0), (0, 0))))
        dense_v.append(np.pad(vb, ((0, 16 - n), (0, 0), (0, 0))))
    q = rng.standard_normal((len(lens), T, N, H)).astype(np.float32)
    qpos = np.stack([np.arange(n - T, n) for n in lens]).clip(0).astype(np.int32)
    got = paged_attention(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(table),
                          jnp.asarray(lens, dtype=jnp.int32), jnp.asarray(qpos), sliding_window=window)
    kv_pos = np.broadcast_to(np.arange(16), (len(lens), 16)).astype(np.int32)
    want = attention(jnp.asarray(q), jnp.asarray(np.stack(dense_k)), jnp.asarray(np.stack(dense_v)),
                     jnp.asarray(qpos), jnp.asarray(kv_pos), window)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_row_that_sees_nothing_gives_zeros_not_nan():
    k = jnp.full((1, 2, 4, 8), jnp.nan)
    out = paged_attention(jnp.ones((1, 2, 2, 8)), k, k, jnp.zeros((1, 2), jnp.int32), jnp.zeros(1, jnp.int32),
                          jnp.zeros((1, 2), jnp.int32))
    np.testing.assert_array_equal(np.asarray(out), 0)


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="attention_impl 'pallas_x' is not available"):
        paged_attention(jnp.ones((1, 1, 2, 8)), jnp.ones((1, 2, 4, 8)), jnp.ones((1, 2, 4, 8)),
                        jnp.zeros((1, 2), jnp.int32), jnp.ones(1, jnp.int32), jnp.zeros((1, 1), jnp.int32),
                        impl="pallas_x")
