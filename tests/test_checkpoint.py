"""Checkpoints: HF folders (single and sharded), orbax convert round trip, random init, clear errors."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import FIXTURES, golden
from safetensors.numpy import load_file, save_file

from jaxinfer.checkpoint import (CheckpointError, config_from_hf, load_model, save_converted, stop_ids)
from jaxinfer.config import ModelConfig, SamplingConfig, load_config
from jaxinfer.generate import Generator
from jaxinfer.models import abstract_params, init_model, logical_axes


def copy_fixture(tmp_path, family="llama2"):
    dst = tmp_path / family
    shutil.copytree(FIXTURES / family, dst)
    return dst


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_sharded_checkpoint_is_read_through_its_index():
    assert len(list((FIXTURES / "llama3").glob("model-*-of-*.safetensors"))) > 1
    m = load_model(FIXTURES / "llama3")
    assert m.cfg.rope_scaling.rope_type == "llama3" and m.cfg.rope_scaling.factor == 8.0
    assert m.cfg.rope_theta == 500000.0


def test_family_switches_from_hf_configs():
    cfgs = {f: load_model(FIXTURES / f).cfg for f in ["llama2_bias", "mistral", "qwen2", "qwen3"]}
    assert cfgs["llama2_bias"].qkv_bias and cfgs["llama2_bias"].o_bias
    assert cfgs["mistral"].sliding_window == 16
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].tie_embeddings and cfgs["qwen3"].head_dim == 32


def test_transformers_v4_style_config_fields():
    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 16, "rope_theta": 1234.0,
          "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = config_from_hf(hf)
    assert cfg.rope_theta == 1234.0 and cfg.rope_scaling.rope_type == "linear" and cfg.rope_scaling.factor == 2.0
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4


def test_convert_round_trip_gives_identical_params_and_tokens(tmp_path):
    from jaxinfer.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(FIXTURES / "qwen2"), str(out)]) == 0
    a, b = load_model(FIXTURES / "qwen2"), load_model(out)
    assert a.cfg == b.cfg
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    g = golden("qwen2")
    assert Generator(b).generate(g["prompts"][:1], SamplingConfig(max_new_tokens=32)).tokens == g["greedy"][:1]
    assert (out / "tokenizer.json").is_file()
    bf16 = load_model(out, "bfloat16")
    assert all(x.dtype == np.dtype("bfloat16") for x in jax.tree.leaves(bf16.params))


def test_stop_ids_from_generation_config():
    assert stop_ids(FIXTURES / "llama3") == (1, 4)
    assert stop_ids(FIXTURES / "llama2") == (2,)
    assert stop_ids(None) == ()


def test_random_init_at_real_shapes_and_logical_axes():
    cfg = load_config(FIXTURES.parents[2] / "configs/models/llama3-8b.yaml").model
    _, abstract = abstract_params(cfg)  # no allocation: shapes only
    n = sum(x.size for x in jax.tree.leaves(abstract))
    assert 8.0e9 < n < 8.1e9
    small = init_model(ModelConfig(init_std=0.05), seed=3)
    axes = logical_axes(small.params)
    for name, value in small.params.items():
        assert len(axes[name]) == value.ndim, name
    assert abs(float(np.std(np.asarray(small.params["wq"][...]))) - 0.05) < 0.005
    again = init_model(ModelConfig(init_std=0.05), seed=3)
    np.testing.assert_array_equal(np.asarray(small.params["wq"][...]), np.asarray(again.params["wq"][...]))


@pytest.mark.parametrize("change,match", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope scaling type 'yarn'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(intermediate_size=64), r"gives w_gate of shape \(2, 64, 128\), but config.json implies \(2, 64, 64\)"),
])
def test_unsupported_or_inconsistent_config_is_named(tmp_path, change, match):
    folder = copy_fixture(tmp_path)
    edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=match):
        load_model(folder)


def test_missing_things_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json' is missing"):
        load_model(folder)
    sharded = copy_fixture(tmp_path, "llama3")
    next(sharded.glob("model-00003-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="names shard\\(s\\) that are missing: model-00003"):
        load_model(sharded)


def test_missing_and_extra_tensors_are_named(tmp_path):
    folder = copy_fixture(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    extra = dict(tensors, **{"model.layers.0.mlp.extra_proj.weight": np.zeros((2, 2), np.float32)})
    save_file(extra, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not use.*extra_proj"):
        load_model(folder)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.layers.1.self_attn.k_proj.weight' is missing"):
        load_model(folder)
