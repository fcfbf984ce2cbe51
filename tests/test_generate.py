"""The dense-KV generate(): batched equals alone, sampling invariants, stops, buckets, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig, SamplingConfig
from jaxinfer.generate import TRACES, Generator
from jaxinfer.models import init_model
from jaxinfer.sampling import SamplingParams, allowed_logits, argmax, sample

CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16,
                  ffw_size=128, max_position_embeddings=256, init_std=0.2)


@functools.cache
def generator():
    return Generator(init_model(CFG, seed=1))


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


LENGTHS = [3, 17, 1, 40, 9]


def test_batched_greedy_rows_equal_alone():
    ps = prompts(LENGTHS)
    batched = generator().generate(ps, SamplingConfig(max_new_tokens=24))
    for p, got in zip(ps, batched.tokens):
        assert generator().generate([p], SamplingConfig(max_new_tokens=24)).tokens[0] == got
    assert all(len(t) == 24 for t in batched.tokens)


def test_batched_sampled_rows_equal_alone_with_mixed_configs():
    ps = prompts(LENGTHS, seed=1)
    cfgs = [SamplingConfig(max_new_tokens=n, temperature=t, top_k=k, top_p=p, min_p=m, seed=s)
            for n, t, k, p, m, s in [(20, 0.8, 0, 1.0, 0.0, 1), (7, 0.0, 0, 1.0, 0.0, 0), (20, 1.3, 20, 0.9, 0.0, 2),
                                     (13, 1.0, 0, 1.0, 0.1, 3), (20, 0.7, 5, 0.5, 0.05, 4)]]
    batched = generator().generate(ps, cfgs)
    assert [len(t) for t in batched.tokens] == [c.max_new_tokens for c in cfgs]
    for p, c, got in zip(ps, cfgs, batched.tokens):
        assert generator().generate([p], c).tokens[0] == got


def test_same_seed_same_tokens_other_seed_other_tokens():
    p = prompts([5])
    run = lambda seed: generator().generate(p, SamplingConfig(max_new_tokens=32, temperature=1.0, seed=seed)).tokens[0]  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_temperature_zero_is_greedy_whatever_the_filters():
    p = prompts([6, 11])
    greedy = generator().generate(p, SamplingConfig(max_new_tokens=16)).tokens
    filtered = generator().generate(p, SamplingConfig(max_new_tokens=16, temperature=0.0, top_k=3, top_p=0.5,
                                                       min_p=0.2, seed=9)).tokens
    assert filtered == greedy


def reference_allowed(logits, temperature, top_k, top_p, min_p):
    """numpy statement of the allowed set: top-k, then top-p (smallest prefix reaching p), then min-p."""
    x = logits / temperature
    order = np.argsort(-x, kind="stable")
    allowed = np.zeros(x.shape, bool)
    k = top_k if top_k > 0 else x.size
    kept = order[:k]
    probs = np.exp(x[kept] - x[kept].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    kept = kept[(before < top_p) | (np.arange(kept.size) == 0)]
    probs = np.exp(x[kept] - x[kept].max())
    probs /= probs.sum()
    kept = kept[probs >= min_p * probs.max()]
    allowed[kept] = True
    return allowed


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (12, 0.8, 0.05),
                                                (1, 1.0, 0.0), (0, 1e-6, 0.0), (0, 1.0, 1.0)])
def test_sampler_never_leaves_the_allowed_set(top_k, top_p, min_p):
    rng = np.random.default_rng(0)
    b, v, draws = 4, 64, 300
    logits = (rng.standard_normal((b, v)) * 3).astype(np.float32)
    temps = np.array([0.5, 1.0, 1.5, 3.0], np.float32)
    params = SamplingParams(temps, np.full(b, top_k, np.int32), np.full(b, top_p, np.float32),
                            np.full(b, min_p, np.float32), np.arange(b, dtype=np.uint32))
    want = np.stack([reference_allowed(logits[i], temps[i], top_k, top_p, min_p) for i in range(b)])
    np.testing.assert_array_equal(np.isfinite(np.asarray(allowed_logits(jnp.asarray(logits), params))), want)
    steps = jnp.arange(draws, dtype=jnp.int32)
    tokens, _ = jax.vmap(lambda s: sample(jnp.asarray(logits), params, jnp.full(b, s)))(steps)
    tokens = np.asarray(tokens)  # [draws, B]
    for i in range(b):
        assert want[i, tokens[:, i]].all()
        if want[i].sum() > 1:
            assert len(set(tokens[:, i])) > 1  # it does sample, not just argmax


def test_argmax_is_jnps_first_maximum():
    """sampling.argmax (two plain reductions) equals jnp.argmax: random rows, ties (the first
    index wins), -inf entries, a constant row, one column."""
    x = jax.random.normal(jax.random.key(0), (6, 5000))
    x = x.at[1, 7].set(9.0).at[1, 4000].set(9.0).at[2].set(-jnp.inf).at[2, 4999].set(0.0).at[3].set(1.5)
    x = x.at[4, :100].set(-jnp.inf)
    got = jax.jit(argmax)(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, axis=-1)))
    assert int(argmax(jnp.ones((1, 1)))[0]) == 0


def test_logprobs_are_the_models_log_softmax_of_the_chosen_tokens():
    m = generator().model
    p = prompts([9])[0]
    res = generator().generate([p], SamplingConfig(max_new_tokens=12, temperature=1.0, seed=3, logprobs=True))
    seq = p + res.tokens[0]
    mod = m.bind()
    hidden, _ = mod(jnp.asarray([seq]), jnp.arange(len(seq))[None])
    logp = np.asarray(jax.nn.log_softmax(mod.logits(hidden)[0], axis=-1))
    want = [logp[len(p) - 1 + i, t] for i, t in enumerate(res.tokens[0])]
    np.testing.assert_allclose(res.logprobs[0], want, atol=1e-4)


def test_stop_ids_end_only_their_row():
    ps = prompts([4, 12])
    free = generator().generate(ps, SamplingConfig(max_new_tokens=20)).tokens
    stop = free[0][5]
    first = free[0].index(stop)
    res = generator().generate(ps, SamplingConfig(max_new_tokens=20), stop_ids=(stop,))
    assert res.tokens[0] == free[0][: first + 1] and res.finish_reasons[0] == "stop"
    if stop not in free[1]:
        assert res.tokens[1] == free[1] and res.finish_reasons[1] == "length"


def test_no_recompilation_within_a_bucket():
    gen = Generator(generator().model)
    gen.generate(prompts([5, 9]), SamplingConfig(max_new_tokens=10))
    before = dict(TRACES)
    gen.generate(prompts([7, 2], seed=3), SamplingConfig(max_new_tokens=14, temperature=0.5, seed=4))
    gen.generate(prompts([12], seed=4) * 2, [SamplingConfig(max_new_tokens=3), SamplingConfig(max_new_tokens=16)])
    assert dict(TRACES) == before
    gen.generate(prompts([30, 2]), SamplingConfig(max_new_tokens=10))  # prompt bucket 32 > 16: one new trace each
    assert TRACES["prefill"] == before["prefill"] + 1 and TRACES["decode"] == before["decode"] + 1


@pytest.mark.parametrize("bad,match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=-3), "max_new_tokens=-3"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(min_p=1.5), "min_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
])
def test_bad_sampling_is_one_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        generator().generate(prompts([3]), SamplingConfig(**bad))


def test_prompt_longer_than_context_is_one_clear_error():
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        generator().generate(prompts([250]), SamplingConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generator().generate([[]], SamplingConfig())
