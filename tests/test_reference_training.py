"""The reference-model training experiment: a few steps on a tiny config (so the path cannot rot),
resume from its checkpoint, export loadable by jaxinfer, and bad input stopped before training."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.train_reference_models import TrainConfig, check, main
from jaxinfer.checkpoint import load_model
from jaxinfer.config import ConfigError, SamplingConfig
from jaxinfer.generate import Generator
from jaxinfer.tokenizer import load_tokenizer

CONFIG = str(Path(__file__).parents[1] / "configs/experiments/reference_models.yaml")
TINY = ["num_stories=120", "vocab_size=400", "target.steps=3", "draft.steps=2", "target.warmup_steps=1",
        "draft.warmup_steps=1", "target.seq_len=32", "draft.seq_len=32", "target.batch_size=4", "draft.batch_size=4",
        "target.checkpoint_every=2", "ship_dir="]
for stage, (h, f) in {"target": (32, 64), "draft": (16, 32)}.items():
    TINY += [f"{stage}.model.vocab_size=400", f"{stage}.model.hidden_size={h}", f"{stage}.model.ffw_size={f}",
             f"{stage}.model.head_dim=8", f"{stage}.model.num_layers=1"]


def test_a_few_training_steps_resume_and_export(tmp_path, capsys):
    out = tmp_path / "run"
    first = main([CONFIG, *TINY, f"out_dir={out}"])
    assert first["target"]["val_tokens"] > 0 and np.isfinite(first["target"]["val_ppl"])
    assert (out / "loss_curves.png").stat().st_size > 0
    again = main([CONFIG, *TINY, f"out_dir={out}"])  # everything resumes from the last checkpoint
    assert "target: resumed at step 3" in capsys.readouterr().out
    assert again["target"]["val_ppl"] == pytest.approx(first["target"]["val_ppl"], rel=1e-6)
    model, tok = load_model(out / "draft"), load_tokenizer(out / "draft")
    assert json.loads((out / "draft" / "config.json").read_text())["model_type"] == "llama"
    ids = tok.encode("One morning, Ada")
    assert ids[0] == tok.bos_id
    assert len(Generator(model).generate([ids], SamplingConfig(max_new_tokens=5)).tokens[0]) == 5


@pytest.mark.parametrize("override,match", [
    ("corpus_file=/nonexistent.txt", "corpus_file '/nonexistent.txt' does not exist"),
    ("vocab_size=100", "vocab_size=100 must exceed the 3 special tokens"),
    ("draft.model.vocab_size=999", "draft.model.vocab_size=999 differs from vocab_size=400"),
    ("target.warmup_steps=5", "target.warmup_steps=5 must be in"),
])
def test_bad_input_stops_before_training(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        main([CONFIG, *TINY, f"out_dir={tmp_path}", override])
    assert not (tmp_path / "ckpt_target").exists()


def test_shipped_config_is_valid():
    from jaxinfer.config import load_config

    check(load_config(CONFIG, cls=TrainConfig))
