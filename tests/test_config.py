"""Config: YAML mirrors the dataclasses; overrides; unknown keys and bad types are named."""

from pathlib import Path

import pytest

from jaxinfer.config import (ConfigError, ModelConfig, RunConfig, dump_yaml, load_config, preset_path)

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")) +
                         [preset_path("default"), preset_path("random")], ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    from experiments.train_reference_models import TrainConfig

    import yaml

    if "experiment" in (yaml.safe_load(path.read_text()) or {}):  # an experiment: every run and its smoke version
        from jaxinfer.experiment.spec import load_experiment

        for smoke in (False, True):
            for run in load_experiment(path, smoke=smoke).runs:
                dumped = tmp_path / "resolved.yaml"
                dump_yaml(run.cfg, dumped)
                assert load_config(dumped) == run.cfg
        return
    cls = TrainConfig if path.name == "reference_models.yaml" else RunConfig
    cfg = load_config(path, cls=cls)
    dumped = tmp_path / "resolved.yaml"
    dump_yaml(cfg, dumped)
    assert load_config(dumped, cls=cls) == cfg


def test_dotted_overrides_and_types(tmp_path):
    cfg = load_config(preset_path("default"), ["model.num_layers=2", "sampling.temperature=1",
                                               "model.rope_scaling.rope_type=llama3", "checkpoint=null",
                                               "decode.batch_buckets=[1,4]", "model.sliding_window=8"])
    assert cfg.model.num_layers == 2
    assert cfg.sampling.temperature == 1.0 and isinstance(cfg.sampling.temperature, float)
    assert cfg.model.rope_scaling.rope_type == "llama3"
    assert cfg.decode.batch_buckets == (1, 4)
    assert cfg.model.sliding_window == 8
    assert load_config(None) == RunConfig()


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("model:\n  num_layer: 2\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'model\.num_layer' .*did you mean 'model\.num_layers'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"unknown key 'sampling\.temprature'.*'sampling\.temperature'"):
        load_config(None, ["sampling.temprature=0.5"])


@pytest.mark.parametrize("override,match", [
    ("model.num_layers=two", r"'model\.num_layers' expects int, got 'two' \(str\)"),
    ("model.num_layers=2.5", r"'model\.num_layers' expects int, got 2\.5"),
    ("model.tie_embeddings=3", r"'model\.tie_embeddings' expects bool"),
    ("model.hidden_size=true", r"'model\.hidden_size' expects int, got True"),
    ("decode.batch_buckets=4", r"'decode\.batch_buckets' expects a list of int"),
    ("model=3", r"'model' expects a mapping of ModelConfig fields"),
    ("num_layers", r"not of the form key=value"),
])
def test_bad_types_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_model_config_is_frozen_and_hashable():
    cfg = ModelConfig()
    with pytest.raises(Exception):
        cfg.num_layers = 3
    assert hash(cfg) == hash(ModelConfig())
