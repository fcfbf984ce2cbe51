"""jaxinfer.pods: the layer extrapolation equals the cost of the whole unrolled program, per-chip
memory covers the shardings' bytes, data-parallel meshes compile, the minimum bytes count the
embedding rows a step reads, and bad targets say what is wrong. A small model keeps compiles short;
the full-size numbers are the pods experiment's."""

import dataclasses

import pytest

from jaxinfer import pods
from jaxinfer.config import ModelConfig

TINY = ModelConfig(name="tiny", vocab_size=4096, hidden_size=256, num_layers=6, num_q_heads=8, num_kv_heads=4,
                   head_dim=32, ffw_size=512, dtype="bfloat16", scan_layers=True)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(pods.MODELS, "tiny", TINY)
    return TINY


@pytest.mark.parametrize("target", ["v5e-8:tiny:2x4", "h200:tiny:1x1"])
def test_layer_extrapolation_equals_the_unrolled_program(tiny, target):
    row = pods.analyse(target, 8, 256, memory=False)
    slice_, _, data, ways = pods.parse_target(target)
    mesh = pods._mesh(slice_, data, ways)
    whole = pods._cost(dataclasses.replace(tiny, scan_layers=False), 8, data, 256 // pods.PAGE_SIZE, row["kv_pages"],
                       mesh)
    assert row["gflops_chip"] * 1e9 == pytest.approx(whole["flops"], rel=0.005)
    assert row["gb_moved_chip"] * 1e9 == pytest.approx(whole["bytes accessed"], rel=0.005)
    assert row["step_ms"] > 0 and row["tok_s"] == pytest.approx(8 / (row["step_ms"] / 1e3))


def test_full_compile_memory_covers_the_sharded_weights_and_kv(tiny):
    row = pods.analyse("v5e-8:tiny:2x4", 8, 256)  # data 2: pages split over data, heads over model
    m = tiny
    kv_chip = 2 * m.num_layers * (m.num_kv_heads // 4) * (row["kv_pages"] // 2) * pods.PAGE_SIZE * m.head_dim * 2
    assert row["kv_gb_chip"] * 1e9 == kv_chip
    assert row["hbm_used_gb"] >= row["weights_gb_chip"] + row["kv_gb_chip"]
    assert row["fits"] and row["max_kv_tokens"] > row["kv_pages"] * pods.PAGE_SIZE


def test_minimum_bytes_count_embedding_rows_not_the_table():
    m = pods.MODELS["llama2-7b"]
    one, two = pods.min_bytes(m, 1, 1024, 1, 8), pods.min_bytes(m, 2, 1024, 1, 8)
    row = m.hidden_size * 2 / 8  # one more embedding row, on each of 8 chips
    kv = 1024 * pods.kv_bytes_per_token(m) / 8
    assert two - one == pytest.approx(row + kv)
    assert pods.fits("v5e-8:llama2-7b:1x8", 96, 2048) and not pods.fits("v5e-8:llama2-7b:1x8", 256, 8192)


@pytest.mark.parametrize("target,match", [
    ("v5e-8:llama3-8b", "write SLICE:MODEL:DATAxMODEL"),
    ("v9-8:llama3-8b:1x8", "slice 'v9-8' is unknown"),
    ("v5e-8:gpt2:1x8", "model 'gpt2' is unknown"),
])
def test_bad_targets_say_what_is_wrong(target, match):
    with pytest.raises(ValueError, match=match):
        pods.parse_target(target)


def test_a_mesh_the_heads_do_not_divide_is_refused(tiny):
    with pytest.raises(ValueError, match="does not divide the 8 query heads"):
        pods.analyse("v5e-8:tiny:1x3", 8, 256)
