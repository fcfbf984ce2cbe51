"""Speculative decoding: greedy output identical to plain decoding (n-gram and draft model, mixed
batches, chunk sizes, prefix caching, preemption); the acceptance rule lossless in distribution
(a chi-square test against an exactly computable toy); accepted lengths as the formula says."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from test_engine import BASE, CFG, GREEDY, assert_equals_dense, model, prompts

from jaxinfer.config import ConfigError, EngineConfig, SamplingConfig, SpeculativeConfig, from_dict
from jaxinfer.drafters import ngram_propose
from jaxinfer.engine import Engine
from jaxinfer.models import Model
from jaxinfer.sampling import SamplingParams, verify
from jaxinfer.step import TRACES


@functools.cache
def noisy_draft(scale: float = 0.1) -> Model:
    """The target with noise on every weight: it agrees with the target often, not always."""
    m = model()
    leaves, treedef = jax.tree.flatten(m.params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return Model(m.cfg, m.graphdef, jax.tree.unflatten(treedef, noisy))


# Few shapes (each compile of a step with a draft model costs seconds on CPU).
SMALL = dict(max_num_seqs=8, max_model_len=64, decode_row_buckets=(0, 8), prefill_row_buckets=(0, 2),
             chunk_buckets=(16,), fixed_table_width=True)


def spec_engine(method, k=3, draft=None, **changes) -> Engine:
    spec = SpeculativeConfig(method=method, num_speculative_tokens=k)
    cfg = EngineConfig(**{**BASE.__dict__, **SMALL, "speculative": spec, **changes})
    return Engine(model(), None, cfg, draft=(draft or noisy_draft()) if method == "draft" else None)


def repetitive(lengths, seed=0):
    """Prompts that repeat themselves, so that n-gram lookups find matches."""
    return [(p * 4)[: 4 * len(p)] for p in prompts(lengths, seed)]


@pytest.mark.parametrize("method,changes", [
    ("ngram", {"chunk_buckets": (8,), "prefix_caching": False}),  # prefix caching on: the warm-up test
    ("draft", {"async_scheduling": False, "fixed_table_width": False}),
    ("draft", {"num_pages": 24, "debug_poison_freed_pages": True}),  # preempts; freed pages are NaN
])
def test_greedy_speculation_equals_plain_decoding(method, changes):
    ps = repetitive([3, 9, 1, 12, 5, 7])
    e = spec_engine(method, **changes)
    completions = e.generate(ps, GREEDY)
    assert_equals_dense(completions, ps)
    assert sum(c.num_accepted for c in completions) > 0, "no draft was ever accepted: nothing was verified"
    if changes.get("num_pages"):
        assert e.scheduler.num_preemptions > 0
    assert (e.scheduler.alloc.refcount == 0).all()


def test_speculative_rows_mix_with_sampled_and_plain_rows():
    """Sampled requests speculate too; a request given the same seed returns the same tokens
    whatever its batch; greedy requests beside them stay exact."""
    ps = repetitive([4, 6, 3, 8])
    hot = SamplingConfig(max_new_tokens=16, temperature=0.8, top_k=20, seed=11)
    configs = [GREEDY, hot, GREEDY, hot]
    both = spec_engine("draft").generate(ps, configs)
    assert_equals_dense([both[0], both[2]], [ps[0], ps[2]])
    alone = spec_engine("draft").generate([ps[1]], hot)[0]
    assert alone.tokens == both[1].tokens
    assert all(c.num_verify_steps > 0 for c in both)


def test_a_draft_equal_to_the_target_accepts_everything():
    ps = prompts([5, 40])  # 40: three prefill chunks, then the draft's KV comes from its own proposals
    cs = spec_engine("draft", k=3, draft=model()).generate(ps, GREEDY)
    assert_equals_dense(cs, ps)
    for c in cs:
        assert c.num_accepted == c.num_proposed > 0 and c.accepted_at == [c.num_verify_steps] * 3
        assert c.acceptance_rate == 1.0 and c.mean_accepted_length == 4.0


def test_no_recompiles_after_warmup_with_speculation_on():
    """A model of its own (executables are shared by engines over one model structure), so the
    count after warm-up is exact: one per reachable layout, and not one more under traffic."""
    from jaxinfer.models import init_model

    own = init_model(dataclasses.replace(CFG, num_layers=1), seed=4)
    e = Engine(own, None, EngineConfig(**{**BASE.__dict__, **SMALL, "speculative": SpeculativeConfig(
        method="ngram", num_speculative_tokens=2)}))
    assert e.num_executables == 0
    report = e.warmup()
    assert report["num_layouts"] == len(e.scheduler.layouts()) == 7  # decode x verify x prefill, less empty
    assert e.num_executables == 7
    traces = TRACES["step"]
    ps = repetitive([3, 11, 1, 12, 5, 7, 10, 2, 9])
    cs = e.generate(ps, [GREEDY, SamplingConfig(max_new_tokens=10, temperature=0.7)] * 4 + [GREEDY])
    assert all(c.error is None for c in cs) and sum(c.num_verify_steps for c in cs) > 0
    assert TRACES["step"] == traces and e.num_executables == 7, "a step compiled after warm-up"


def brute_force_ngram(tokens, k, lo, hi):
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[len(tokens) - n:]:
                follow = tokens[start + n:start + n + k]
                return follow + [follow[-1]] * (k - len(follow))
    return None


def test_ngram_proposals_equal_a_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        tokens = rng.integers(0, 4, rng.integers(1, 30)).tolist()
        lo = int(rng.integers(1, 4))
        hi = int(rng.integers(lo, 6))
        assert ngram_propose(tokens, 3, lo, hi) == brute_force_ngram(tokens, 3, lo, hi), (tokens, lo, hi)


def test_ngram_proposals():
    assert ngram_propose([1, 2, 3, 4, 1, 2], 3, 1, 3) == [3, 4, 1]
    assert ngram_propose([1, 2, 3, 1, 2, 3, 1, 2], 3, 1, 3) == [3, 1, 2]  # the most recent occurrence
    assert ngram_propose([5, 6, 5], 4, 1, 3) == [6, 5, 5, 5]  # short continuation: padded
    assert ngram_propose([1, 2, 3], 2, 1, 2) is None
    assert ngram_propose([7, 1, 2, 9, 2], 2, 2, 3) is None  # only a 1-gram matches; min is 2


@pytest.mark.parametrize("spec,match", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0: must be >= 1"),
    ({"method": "lookahead"}, "must be one of none, draft, ngram"),
    ({"method": "ngram", "ngram_min": 3, "ngram_max": 2}, "ngram_max=2: must be >= ngram_min=3"),
    ({"method": "ngram", "ngram_min": 0}, "ngram_min=0: must be >= 1"),
])
def test_bad_speculative_configs_say_what_is_wrong(spec, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(EngineConfig, {"speculative": spec})


def test_a_draft_must_match_the_target():
    cfg = dataclasses.replace(BASE, speculative=SpeculativeConfig(method="draft"))
    with pytest.raises(ValueError, match="needs a draft model"):
        Engine(model(), None, cfg)
    other = Model(dataclasses.replace(CFG, vocab_size=128), model().graphdef, model().params)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model(), None, cfg, draft=other)


def test_load_draft_checks_the_folder_and_the_tokenizer(tmp_path):
    import shutil
    from pathlib import Path

    from jaxinfer.checkpoint import CheckpointError, build, load_draft
    from jaxinfer.config import RunConfig, resolve_path

    def run_cfg(folder):
        spec = SpeculativeConfig(method="draft", draft_model=str(folder))
        return RunConfig(checkpoint="package:reference/target", engine=EngineConfig(speculative=spec))

    target, tok, _, _ = build(run_cfg("unused"))
    assert load_draft(run_cfg("package:reference/draft"), target, tok).cfg.vocab_size == target.cfg.vocab_size
    with pytest.raises(CheckpointError, match="no such folder"):
        load_draft(run_cfg(tmp_path / "missing"), target, tok)
    other = tmp_path / "draft-other-tokenizer"
    shutil.copytree(resolve_path("package:reference/draft"), other)
    shutil.copy(Path(__file__).parent / "fixtures/hf/llama2/tokenizer.json", other / "tokenizer.json")
    with pytest.raises(CheckpointError, match="another tokenizer than the target"):
        load_draft(run_cfg(other), target, tok)


# ---- the acceptance rule, in distribution ---------------------------------------------------------------
V, M, ROWS = 5, 3, 100_000  # vocabulary, continuation length, independent rows


def processed(logits, temperature, top_k=0, top_p=1.0):
    """numpy reference of the processed distribution (temperature, top-k, top-p) of each row."""
    x = logits / temperature
    order = np.argsort(-x, axis=-1)
    keep = np.zeros_like(x, bool)
    for r in range(x.shape[0]):
        top = order[r][: top_k or None]  # top-k first; top-p over the renormalized survivors (as HF)
        probs = np.exp(x[r, top] - x[r, top].max())
        probs /= probs.sum()
        mass = 0.0
        for rank, t in enumerate(top):
            if rank > 0 and mass >= top_p:
                break
            keep[r, t], mass = True, mass + probs[rank]
    probs = np.where(keep, np.exp(x - x.max(-1, keepdims=True)), 0.0)
    return probs / probs.sum(-1, keepdims=True)


def run_markov(target_logits, draft_probs, k, sampling, seed=0):
    """ROWS independent continuations of M tokens from token 0 of a Markov chain: each round the
    draft (rows of `draft_probs`, used as given) proposes k tokens, `verify` keeps a prefix."""
    rng = np.random.default_rng(seed)
    params = SamplingParams(*(np.full(ROWS, getattr(sampling, f), dt) for f, dt in
                              (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32),
                               ("min_p", np.float32))), seed=np.arange(ROWS, dtype=np.uint32) + seed * ROWS)
    fn = jax.jit(verify)
    out = [[] for _ in range(ROWS)]
    last = np.zeros(ROWS, np.int64)
    made = np.zeros(ROWS, np.int32)
    accepted = proposed = 0
    for _ in range(M):  # each round emits >= 1 token per row
        drafts = np.zeros((ROWS, k), np.int64)
        ctx = last
        for j in range(k):
            cdf = draft_probs[ctx].cumsum(-1)
            drafts[:, j] = np.minimum((rng.random((ROWS, 1)) > cdf).sum(-1), V - 1)
            ctx = drafts[:, j]
        chain = np.concatenate([last[:, None], drafts], axis=1)  # [ROWS, k+1]
        tokens, num_new, _ = fn(jnp.asarray(target_logits[chain], jnp.float32), jnp.asarray(drafts, jnp.int32),
                                jnp.asarray(draft_probs[chain[:, :k]], jnp.float32), params, jnp.asarray(made))
        tokens, num_new = np.asarray(tokens), np.asarray(num_new)
        accepted, proposed = accepted + int((num_new - 1).sum()), proposed + k * ROWS
        for r in range(ROWS):
            out[r].extend(tokens[r, :num_new[r]].tolist())
        last = tokens[np.arange(ROWS), num_new - 1]
        made = made + num_new
    return np.array([o[:M] for o in out]), accepted / proposed, np.asarray(made)


def chain_distribution(p):
    """Exact probability of each M-token continuation from token 0 under transition matrix p."""
    probs = np.zeros((V,) * M)
    for seq in np.ndindex(*(V,) * M):
        prev, pr = 0, 1.0
        for t in seq:
            pr, prev = pr * p[prev, t], t
        probs[seq] = pr
    return probs.ravel()


def chi_square_p(samples, expected_probs):
    codes = np.ravel_multi_index(samples.T, (V,) * M)
    observed = np.bincount(codes, minlength=V ** M)
    assert observed[expected_probs == 0].sum() == 0, "a continuation of probability 0 was sampled"
    live = expected_probs > 0
    return stats.chisquare(observed[live], expected_probs[live] * len(samples)).pvalue


LOGITS = np.random.default_rng(1).normal(0, 1.5, (V, V))
OTHER = np.random.default_rng(2).dirichlet(np.ones(V), V)  # a draft unlike the target
HOLES = OTHER * (np.arange(V)[None] % 2 == 0)  # q = 0 where p > 0
HOLES /= HOLES.sum(-1, keepdims=True)


@pytest.mark.parametrize("case,k,sampling,draft", [
    ("temperature", 3, SamplingConfig(temperature=0.8), "other"),
    ("top-k + top-p: p = 0 where q > 0", 3, SamplingConfig(temperature=1.0, top_k=3, top_p=0.8), "other"),
    ("q = 0 where p > 0", 2, SamplingConfig(temperature=1.2), "holes"),
    ("q = p: all accepted", 3, SamplingConfig(temperature=0.7, top_p=0.9), "same"),
    ("k = 1", 1, SamplingConfig(temperature=1.0, top_k=4), "other"),
])
def test_acceptance_is_lossless_in_distribution(case, k, sampling, draft):
    p = processed(LOGITS, sampling.temperature, sampling.top_k, sampling.top_p)
    q = {"other": OTHER, "holes": HOLES, "same": p}[draft]
    samples, rate, _ = run_markov(LOGITS, q, k, sampling)
    pvalue = chi_square_p(samples, chain_distribution(p))
    assert pvalue > 1e-3, f"{case}: chi-square p = {pvalue:.2e}"
    if draft == "same":  # float32 rounding of p against the float64 q may reject one in 10^4
        assert rate > 0.999


def test_accepted_length_matches_the_formula():
    """A context-free toy (the same p and q at every position): acceptance is i.i.d. with
    a = sum(min(p, q)), and the mean tokens per verify step must be (1 - a^(k+1)) / (1 - a)."""
    k, rows = 4, 100_000
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
    a = np.minimum(p, q).sum()
    rng = np.random.default_rng(0)
    drafts = (rng.random((rows, k, 1)) > q.cumsum()).sum(-1)
    params = SamplingParams(np.ones(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32),
                            np.zeros(rows, np.float32), np.arange(rows, dtype=np.uint32))
    _, num_new, _ = jax.jit(verify)(jnp.log(jnp.broadcast_to(p, (rows, k + 1, V))).astype(jnp.float32),
                                    jnp.asarray(drafts, jnp.int32), jnp.broadcast_to(q, (rows, k, V)).astype(jnp.float32),
                                    params, jnp.zeros(rows, jnp.int32))
    num_new = np.asarray(num_new)
    expected = (1 - a ** (k + 1)) / (1 - a)
    stderr = num_new.std() / np.sqrt(rows)
    assert abs(num_new.mean() - expected) < 4 * stderr, (num_new.mean(), expected)
    # the per-token acceptance measured from the positions actually tried
    tried = np.minimum(num_new, k)  # drafts examined: all accepted ones plus the rejected one
    measured_a = (num_new - 1).sum() / tried.sum()
    assert abs(measured_a - a) < 0.01 and abs((1 - measured_a ** (k + 1)) / (1 - measured_a) - num_new.mean()) < 0.05
