"""Sharded equals single-device: the engine on 8 simulated CPU devices, meshes (1,8), (2,4), (8,1)."""

import functools

import jax
import numpy as np
import pytest

from jaxinfer.config import EngineConfig, ModelConfig, SamplingConfig
from jaxinfer.engine import Engine
from jaxinfer.models import init_model
from jaxinfer.sharding import make_mesh, param_shardings, spec_for

CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_q_heads=8, num_kv_heads=4, head_dim=8,
                  ffw_size=128, max_position_embeddings=128, init_std=0.2)
ENGINE = EngineConfig(page_size=4, num_pages=64, max_model_len=64, chunk_buckets=(8, 16),
                      decode_row_buckets=(0, 1, 2, 4, 8), prefill_row_buckets=(0, 1, 2))


@functools.cache
def model():
    return init_model(CFG, seed=2)


def run(mesh):
    rng = np.random.default_rng(0)
    ps = [rng.integers(0, 256, n).tolist() for n in (5, 19, 11)]
    cfgs = [SamplingConfig(max_new_tokens=10), SamplingConfig(max_new_tokens=10, temperature=0.9, seed=4),
            SamplingConfig(max_new_tokens=10)]
    e = Engine(model(), None, EngineConfig(**{**ENGINE.__dict__, "mesh": mesh}))
    return [c.tokens for c in e.generate(ps, cfgs)], e


@pytest.mark.parametrize("mesh", [(1, 8), (2, 4), (8, 1)])
def test_mesh_gives_the_single_device_tokens(mesh):
    assert jax.device_count() == 8
    want, _ = run((1, 1))
    got, e = run(mesh)
    assert got == want
    assert e.cache.k.sharding.mesh.shape == {"data": mesh[0], "model": mesh[1]}
    if mesh[1] > 1:  # something really is split over `model`
        assert e.params["w_gate"][...].sharding.spec[2] == "model"


def test_indivisible_axes_stay_replicated():
    mesh = make_mesh(1, 8)
    assert spec_for((2, 4, 64), ("layers", "kv_heads", "embed"), mesh) == jax.sharding.PartitionSpec(None, None, None)
    shardings = param_shardings(model().params, mesh)
    assert shardings["wq"].spec == jax.sharding.PartitionSpec(None, None, "model", None)
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(4, 4)
