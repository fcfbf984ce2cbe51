"""Quantized decode on the CPU reads the quantized bytes: the compiled Engine step and Generator
decode loop hold no float copy of a quantized weight (the reference path, which dequantizes, is
the control that the check can fail), and the `cpu` kernel gives the reference's tokens. The LM
head and the embedding table quantize too (their quality cost on the trained target:
test_reference_models.test_quantized_target_keeps_its_perplexity)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import EngineConfig, ModelConfig, SamplingConfig
from jaxinfer.engine import Engine
from jaxinfer.generate import Generator
from jaxinfer.models import init_model
from jaxinfer.models.quantize import float_weight_copies, quantize_model

# Sizes no other tensor of a step has, so a float array of a weight's shape is that weight.
CFG = ModelConfig(vocab_size=300, hidden_size=96, num_layers=2, num_q_heads=5, num_kv_heads=1, head_dim=32,
                  ffw_size=192, dtype="float32", scan_layers=False)
ENGINE = EngineConfig(page_size=8, max_num_seqs=4, max_model_len=64, num_pages=64, max_num_batched_tokens=16,
                      decode_row_buckets=(0, 2), prefill_row_buckets=(0, 1, 2), chunk_buckets=(16,))


@functools.cache
def base(scan_layers=False):
    return init_model(ModelConfig(**{**CFG.__dict__, "scan_layers": scan_layers}), 0)


@functools.cache
def quantized(quant, impl, head="none", embed=False, scan_layers=False):
    return quantize_model(base(scan_layers), quant, 32, impl, lm_head=head, embed=embed)


PROMPTS = [[5, 9, 17, 33, 2, 8], [7, 1, 4]]
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)


def engine_run(model):
    e = Engine(model, None, ENGINE, stop_ids=())
    return [c.tokens for c in e.generate(PROMPTS, GREEDY)], e


def generator_run(model):
    g = Generator(model)
    return g.generate(PROMPTS, GREEDY, stop_ids=()).tokens, g


@pytest.mark.parametrize("quant,head,scan", [("int8", "none", False), ("int4", "int8", True)])
def test_compiled_decode_reads_no_float_copy_of_a_quantized_weight(quant, head, scan):
    model = quantized(quant, "cpu", head, True, scan)
    got, engine = engine_run(model)
    step = engine.step_hlo()
    assert float_weight_copies(model, step) == []
    assert "JaxinferInt" in step  # the matmuls are the FFI kernel's custom calls
    tokens, gen = generator_run(model)
    assert float_weight_copies(model, gen.compiled_hlo()["decode"]) == []
    assert got == tokens
    ref = quantized(quant, "reference", head, True, scan)
    ref_tokens, ref_engine = engine_run(ref)
    assert ref_tokens == got  # the kernel's tokens are the reference's
    # The control: the reference dequantizes, in the engine's step and in the generator's program.
    assert float_weight_copies(ref, ref_engine.step_hlo())
    assert float_weight_copies(ref, generator_run(ref)[1].compiled_hlo()["decode"])


def test_w8a8_decodes_with_int8_dots_and_no_float_weight_copy():
    """W8A8 on CPU: auto runs the cpu kernel (int8 x int8 with int32 sums, VNNI where the CPU has
    it), the reference XLA's int8 dot; both read the int8 weights as they are and give the same
    tokens, and the engine (paged) agrees with the generator (dense)."""
    calls = {"auto": r"custom-call\([^)]*\), custom_call_target=\"JaxinferS8Matmul\"", "reference": r"dot\("}
    runs = {}
    for impl, op in calls.items():
        model = quantized("w8a8", impl)
        runs[impl], engine = engine_run(model)
        step = engine.step_hlo()
        assert float_weight_copies(model, step) == []
        int_dots = re.findall(r"= s32\[[\d,]*\]\{[\d,]*\} " + op, step)
        assert len(int_dots) >= 7 * CFG.num_layers, (impl, int_dots)  # every linear layer (wq wk wv wo gate up down)
    tokens, gen = generator_run(quantized("w8a8", "auto"))
    assert float_weight_copies(quantized("w8a8", "auto"), gen.compiled_hlo()["decode"]) == []
    assert runs["auto"] == tokens == runs["reference"]


def test_quantized_weights_are_stored_as_int8_and_packed_int4():
    m = quantized("int4", "cpu", "int8", True)
    p = m.params
    assert p["lm_head"][...].dtype == jnp.int8 and p["lm_head"][...].shape == (96, 300)
    assert p["lm_head_scale"][...].shape == (1, 300)
    assert p["embed"][...].dtype == jnp.int8 and p["embed_scale"][...].shape == (300, 1)
    assert p["wq"][0][...].dtype == jnp.uint8 and p["wq"][0][...].shape == (48, 160)  # two values a byte
    # A tied model's head becomes its own quantized copy of embed.T; the input table stays float.
    tied = init_model(ModelConfig(**{**CFG.__dict__, "tie_embeddings": True}), 0)
    tq = quantize_model(tied, "none", 32, "cpu", lm_head="int8")
    assert tq.params["embed"][...].dtype == jnp.float32 and tq.params["lm_head"][...].dtype == jnp.int8
    np.testing.assert_allclose(np.asarray(tq.params["lm_head"][...] * tq.params["lm_head_scale"][...]),
                               np.asarray(tied.params["embed"][...].T), atol=float(tq.params["lm_head_scale"][...].max()))


def test_bad_quantization_settings_name_the_fix():
    with pytest.raises(ValueError, match="model.quant_lm_head='int2' is not supported; use none, int8 or int4"):
        quantize_model(base(), "none", 32, "cpu", lm_head="int2")
    with pytest.raises(ValueError, match="quant_lm_head=int4 needs quant_group_size in 32, 64, 128; got 48"):
        quantize_model(base(), "none", 48, "cpu", lm_head="int4")
    tied = init_model(ModelConfig(**{**CFG.__dict__, "tie_embeddings": True}), 0)
    with pytest.raises(ValueError, match="quant_embed with tied embeddings.*set quant_lm_head: int8"):
        quantize_model(tied, "int8", 32, "cpu", embed=True)


def test_int4_quantizes_any_feature_count_by_padding_the_last_group():
    """hidden 96, heads x head_dim 160 and an FFN of 172 with groups of 64 (none divides): every
    layer quantizes (its last group padded), the CPU kernel gives the reference's tokens in the
    engine and in generate(), and the compiled step still reads no float copy of a weight."""
    odd = init_model(ModelConfig(**{**CFG.__dict__, "ffw_size": 172}), 0)
    model = quantize_model(odd, "int4", 64, "cpu", lm_head="int4")
    assert model.params["w_down"][0][...].shape == (96, 96)  # 172 rows padded to 192, two a byte
    assert model.params["w_up"][0][...].shape == (64, 172)  # 96 rows padded to 128
    got, engine = engine_run(model)
    assert float_weight_copies(model, engine.step_hlo()) == []
    assert generator_run(model)[0] == got
    assert engine_run(quantize_model(odd, "int4", 64, "reference", lm_head="int4"))[0] == got
