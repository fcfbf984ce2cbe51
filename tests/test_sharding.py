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


def dp_workload(n, seed):
    """n requests, half sharing an 8-token prefix (two pages), greedy and seeded alternately."""
    rng = np.random.default_rng(seed)
    shared = np.random.default_rng(0).integers(0, 256, 8).tolist()
    ps = [(shared if i % 2 else []) + rng.integers(0, 256, 1 + i % 7).tolist() for i in range(n)]
    cfgs = [SamplingConfig(max_new_tokens=8, temperature=0.8 if i % 3 else 0.0, seed=i) for i in range(n)]
    return ps, cfgs


def dp_engine(mesh, num_pages):
    return Engine(model(), None, EngineConfig(**{**ENGINE.__dict__, "mesh": mesh, "num_pages": num_pages}))


def drive(e):
    """Two waves: eight requests at once, then four more that reuse the first wave's prefix."""
    done, served = [], []
    for n, seed in ((8, 1), (4, 2)):
        ids = [e.add_request(p, c) for p, c in zip(*dp_workload(n, seed))]
        served.append([len(s.requests) for s in getattr(e.scheduler, "shards", [e.scheduler])])
        e.run_until_done()
        done += [e.completion(i) for i in ids]
    return done, served


def run_routed(mesh, num_pages):
    e = dp_engine(mesh, num_pages)
    return *drive(e), e


@pytest.mark.parametrize("mesh", [(2, 4), (4, 2)])
def test_data_parallel_shards_split_pages_and_requests_and_give_the_single_device_tokens(mesh):
    want, _, _ = run_routed((1, 1), 64)
    got, served, e = run_routed(mesh, 32)  # 32 / data pages per shard: requests preempt each other
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert all(c.error is None for c in got)
    assert served[0] == [8 // mesh[0]] * mesh[0], served  # the router balanced the load
    assert e.scheduler.num_preemptions > 0 and sum(c.num_cached_tokens for c in got[8:]) > 0
    # the cache's pages really are split over `data` (and KV heads over `model`)
    assert e.cache.k.sharding.spec[1:3] == ("model", "data")
    assert e.cache.k.addressable_shards[0].data.shape[2] == 32 // mesh[0]
    assert (e.scheduler.alloc.refcount == 0).all() and e.scheduler.alloc.num_pages == 32


def test_bad_meshes_say_what_is_wrong():
    with pytest.raises(ValueError, match="does not divide the 8 query heads.*1, 2, 4, 8"):
        Engine(model(), None, EngineConfig(**{**ENGINE.__dict__, "mesh": (1, 3)}))
    with pytest.raises(ValueError, match="num_pages=30 does not split over the mesh's 4 data shards.*28"):
        Engine(model(), None, EngineConfig(**{**ENGINE.__dict__, "mesh": (4, 2), "num_pages": 30}))
    with pytest.raises(ValueError, match=r"needs 9 devices; 8 are available"):
        make_mesh(3, 3)


def test_data_parallel_speculation_and_scoring_equal_one_device():
    """The draft model's cache and proposals split over `data` like the target's: greedy tokens
    equal plain decoding; prompt scores (sliced per shard) equal one full forward."""
    import test_scoring
    from test_speculative import GREEDY, assert_equals_dense, repetitive, spec_engine

    ps = repetitive([3, 9, 1, 12])
    e = spec_engine("draft", mesh=(2, 2), num_pages=48)
    done = e.generate(ps, GREEDY)
    assert_equals_dense(done, ps)
    assert sum(c.num_accepted for c in done) > 0
    scorer = Engine(test_scoring.model(), None, EngineConfig(**{**test_scoring.ENGINE.__dict__, "mesh": (2, 1)}))
    for p, scored in zip(ps, scorer.score(ps)):
        want = test_scoring.reference(p)
        np.testing.assert_allclose(scored.logprobs[1:], want[np.arange(len(p) - 1), p[1:]], atol=test_scoring.TOL)
