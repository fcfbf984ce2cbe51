"""jaxinfer vs the logits, greedy tokens and tokenizer ids that `transformers` computed on the
committed fixture checkpoints (tests/fixtures/make_hf_fixtures.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, FIXTURES, golden, golden_logits

from flax import nnx

from jaxinfer.cache import DenseKVCache
from jaxinfer.checkpoint import load_model
from jaxinfer.config import SamplingConfig
from jaxinfer.generate import Generator
from jaxinfer.tokenizer import load_tokenizer

F32_TOL = 1e-4
# bf16 keeps 8 significand bits: unit roundoff u = 2**-8 relative. Weights, activations and the
# residual stream are each rounded, about a dozen roundings deep on the way to the logits, with
# errors partly cancelling: we allow 8u of the largest logit (measured: about 4u).
BF16_REL_TOL = 8 * 2.0**-8


@functools.cache
def model(family, dtype="float32"):
    return load_model(FIXTURES / family, dtype)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, tokens, positions, cache=None):
    mod = nnx.merge(graphdef, params)
    hidden, cache = mod(tokens, positions, cache)
    return mod.logits(hidden)[0], cache


def full_logits(m, ids):
    tokens = jnp.asarray([ids], jnp.int32)
    return np.asarray(forward(m.graphdef, m.params, tokens, jnp.arange(len(ids), dtype=jnp.int32)[None])[0])


def incremental_logits(m, ids, num_prefill):
    """Prefill `num_prefill` tokens into a dense cache, then feed the rest one at a time."""
    cfg = m.cfg
    cache = DenseKVCache.zeros(cfg.num_layers, 1, 128, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype))
    tokens = jnp.asarray([ids], jnp.int32)
    logits, cache = forward(m.graphdef, m.params, tokens[:, :num_prefill],
                            jnp.arange(num_prefill, dtype=jnp.int32)[None], cache)
    out = [logits]
    for t in range(num_prefill, len(ids)):
        logits, cache = forward(m.graphdef, m.params, tokens[:, t : t + 1], jnp.full((1, 1), t, jnp.int32), cache)
        out.append(logits)
    return np.concatenate([np.asarray(o) for o in out])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_logits_match_transformers(family):
    g = golden(family)
    for i, ids in enumerate(g["prompts"]):
        err = np.abs(full_logits(model(family), ids) - golden_logits(family, i)).max()
        assert err < F32_TOL, f"{family} prompt {i}: max |logits - transformers| = {err}"


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_32_decode_steps_match_full_forward(family):
    ids = golden(family)["prompts"][1]  # 47-48 tokens: prefill the rest, decode 32 (past Mistral's window of 16)
    inc = incremental_logits(model(family), ids, len(ids) - 32)
    assert np.abs(inc - full_logits(model(family), ids)).max() < F32_TOL
    assert np.abs(inc - golden_logits(family, 1)).max() < F32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_32_tokens_equal_transformers_generate(family):
    g = golden(family)
    gen = Generator(model(family))
    batched = gen.generate(g["prompts"], SamplingConfig(max_new_tokens=32), stop_ids=())  # raw greedy, as the golden
    assert batched.tokens == g["greedy"]
    assert batched.finish_reasons == ["length"] * len(g["prompts"])
    for ids, want in zip(g["prompts"], g["greedy"]):
        assert gen.generate([ids], SamplingConfig(max_new_tokens=32), stop_ids=()).tokens == [want]
    # By default a row ends at the folder's first EOS id (generation_config.json), token included.
    stops = model(family).cfg.stop_ids
    assert stops
    cut = [next((row[: i + 1] for i, t in enumerate(row) if t in stops), row) for row in g["greedy"]]
    default = gen.generate(g["prompts"], SamplingConfig(max_new_tokens=32))
    assert default.tokens == cut
    assert default.finish_reasons == ["stop" if row[-1] in stops else "length" for row in cut]


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_logits_within_tolerance(family):
    g = golden(family)
    for i, ids in enumerate(g["prompts"]):
        ref = golden_logits(family, i)
        got = full_logits(model(family, "bfloat16"), ids)
        tol = BF16_REL_TOL * np.abs(ref).max()
        assert np.abs(got - ref).max() < tol
        # Wherever transformers' top-1 beats its top-2 by more than twice the tolerance, bf16 agrees.
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * tol
        assert clear.sum() > 0
        np.testing.assert_array_equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    inc = incremental_logits(model(family, "bfloat16"), g["prompts"][1], len(g["prompts"][1]) - 32)
    assert np.abs(inc - golden_logits(family, 1)).max() < BF16_REL_TOL * np.abs(golden_logits(family, 1)).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_greedy_follows_transformers_until_a_near_tie(family):
    """bf16 may legitimately diverge at a step whose float32 top-2 gap is within bf16 error;
    before the first such step it must emit exactly transformers' tokens."""
    g = golden(family)
    ids, want = g["prompts"][0], g["greedy"][0]
    seq = full_logits(model(family), ids + want)[len(ids) - 1 : -1]  # float32, = transformers to 1e-5
    top2 = np.sort(seq, axis=-1)[:, -2:]
    tol = BF16_REL_TOL * np.abs(seq).max()
    near_tie = np.flatnonzero(top2[:, 1] - top2[:, 0] <= 2 * tol)
    n = int(near_tie[0]) if near_tie.size else len(want)
    got = Generator(model(family, "bfloat16")).generate([ids], SamplingConfig(max_new_tokens=32)).tokens[0]
    assert got[:n] == want[:n]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_ids_equal_autotokenizer(family):
    t = golden(family)["tokenizer"]
    tok = load_tokenizer(FIXTURES / family)
    for s, ids, plain, text in zip(t["strings"], t["ids"], t["ids_no_special"], t["decoded"]):
        assert tok.encode(s) == ids, s
        assert tok.encode(s, add_special_tokens=False) == plain, s
        assert tok.decode(plain, skip_special_tokens=False) == text
    assert tok.apply_chat_template(t["chat"], add_generation_prompt=True) == t["chat_text"]


@pytest.mark.live_hf
@pytest.mark.parametrize("family", FAMILIES)
def test_live_transformers_logits_and_greedy(family):
    import sys

    sys.path.insert(0, str(FIXTURES.parent))
    import hf_reference as ref

    hf = ref.load(FIXTURES / family)
    for ids in golden(family)["prompts"]:
        assert np.abs(full_logits(model(family), ids) - ref.reference_logits(hf, ids)).max() < F32_TOL
        want, _ = ref.reference_greedy(hf, ids, 32)
        assert Generator(model(family)).generate([ids], SamplingConfig(max_new_tokens=32)).tokens == [want]
    t = ref.reference_tokenization(FIXTURES / family)
    tok = load_tokenizer(FIXTURES / family)
    assert [tok.encode(s) for s in t["strings"]] == t["ids"]


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_unrolled_layer_layout_matches_transformers_too(family):
    from jaxinfer.checkpoint import relayout

    m = load_model(FIXTURES / family, scan_layers=False)
    assert not m.cfg.scan_layers and "layers" not in str(jax.tree.leaves(m.params)[0].shape)
    g = golden(family)
    for i, ids in enumerate(g["prompts"]):
        assert np.abs(full_logits(m, ids) - golden_logits(family, i)).max() < F32_TOL
    assert Generator(m).generate(g["prompts"], SamplingConfig(max_new_tokens=32)).tokens == g["greedy"]
    back = relayout(m, True)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(model(family).params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
