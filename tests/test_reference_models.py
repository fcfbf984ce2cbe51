"""The shipped reference pair (jaxinfer/reference): transformers' logits and greedy tokens on the
shipped folders (goldens from tests/fixtures/make_hf_fixtures.py), and quality invariants measured
here on held-out stories: target beats draft beats a unigram model; the draft agrees with the target."""

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.train_reference_models import TrainConfig, token_stream, unigram_ppl
from jaxinfer.corpus import build_corpus, windows
from jaxinfer.checkpoint import load_model, resolve_path
from jaxinfer.config import SamplingConfig, load_config
from jaxinfer.generate import Generator
from jaxinfer.tokenizer import load_tokenizer

GOLDENS = Path(__file__).parent / "fixtures" / "reference"
CONFIG = Path(__file__).parents[1] / "configs/experiments/reference_models.yaml"


@functools.cache
def shipped(name):
    folder = resolve_path(f"package:reference/{name}")
    return load_model(folder), load_tokenizer(folder)


def logits(model, ids):
    mod = model.bind()
    hidden, _ = mod(jnp.asarray([ids], jnp.int32), jnp.arange(len(ids), dtype=jnp.int32)[None])
    return np.asarray(mod.logits(hidden))[0]


@pytest.mark.parametrize("name", ["target", "draft"])
def test_shipped_models_match_transformers(name):
    model, tok = shipped(name)
    g = json.loads((GOLDENS / f"{name}.json").read_text())
    ref = np.load(GOLDENS / f"{name}_logits.npz")
    for i, (text, ids) in enumerate(zip(g["texts"], g["prompts"])):
        assert tok.encode(text) == ids
        assert np.abs(logits(model, ids) - ref[f"logits_{i}"]).max() < 1e-4
    assert Generator(model).generate(g["prompts"], SamplingConfig(max_new_tokens=32)).tokens == g["greedy"]


@functools.cache
def held_out():
    cfg = load_config(CONFIG, cls=TrainConfig)
    train_texts, val_texts = build_corpus(cfg.seed, cfg.num_stories, cfg.val_every)
    _, tok = shipped("target")
    seq = 128
    return windows(token_stream(tok.tok, train_texts), seq), windows(token_stream(tok.tok, val_texts[:100]), seq), cfg


def nll_and_argmax(model, batch):
    mod = model.bind()
    x = jnp.asarray(batch[:, :-1])
    hidden, _ = mod(x, jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape))
    lg = mod.logits(hidden)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(lg), jnp.asarray(batch[:, 1:, None]), -1).mean()
    return float(nll), np.asarray(lg.argmax(-1))


def test_target_beats_draft_beats_unigram_and_draft_agrees():
    train, val, cfg = held_out()
    t_nll, t_arg = nll_and_argmax(shipped("target")[0], val)
    d_nll, d_arg = nll_and_argmax(shipped("draft")[0], val)
    uni = unigram_ppl(train, val, cfg.vocab_size)
    assert math.exp(t_nll) < 0.9 * math.exp(d_nll) < 0.9 * uni
    assert (t_arg == d_arg).mean() >= 0.6


def test_quantized_target_keeps_its_perplexity():
    """Weight-only quantization of the trained target (layers, then also the LM head and the
    embedding rows) keeps its perplexity and its greedy predictions (measured perplexity, argmax agreement: float 2.867; int8 2.867, 99.7%; int4/g32 2.871,
    97.5%; int4/g128 2.871, 96.5%; asymmetric int4/g128 2.868, 97.4%)."""
    from jaxinfer.models.quantize import quantize_model

    _, val, _ = held_out()
    model = shipped("target")[0]
    f_nll, f_arg = nll_and_argmax(model, val)
    for quant, group, asym, ppl_cost, agree in [("int8", 128, False, 1.005, 0.99), ("int4", 32, False, 1.02, 0.95),
                                                ("int4", 128, False, 1.02, 0.95), ("int4", 128, True, 1.01, 0.96)]:
        q_nll, q_arg = nll_and_argmax(quantize_model(model, quant, group, asymmetric=asym), val)
        assert math.exp(q_nll) < ppl_cost * math.exp(f_nll), quant
        assert (q_arg == f_arg).mean() >= agree, quant
    # The LM head (a quantized copy of the tied table) and int8 embedding rows on top (measured: int8
    # head alone 2.867, 99.1%; int8 layers + int8 head + embedding 2.867, 98.9%; int4/g32 head 2.871,
    # 90.2%; int4/g128 layers + int8 head + embedding 2.871, 96.4%).
    for quant, group, head, embed, ppl_cost, agree in [("none", 128, "int8", False, 1.002, 0.985),
                                                       ("int8", 128, "int8", True, 1.002, 0.985),
                                                       ("none", 32, "int4", False, 1.005, 0.88),
                                                       ("int4", 128, "int8", True, 1.005, 0.95)]:
        q_nll, q_arg = nll_and_argmax(quantize_model(model, quant, group, lm_head=head, embed=embed), val)
        assert math.exp(q_nll) < ppl_cost * math.exp(f_nll), (quant, head, embed)
        assert (q_arg == f_arg).mean() >= agree, (quant, head, embed)
