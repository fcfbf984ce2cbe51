"""Prompt logprobs through the serving step (sampling.prompt_logprobs / top_logprobs) against the
log-softmax of one full forward of the model, and perplexity windows. Tolerance 2e-5: float32,
the same math in another order (paged attention over chunks vs one dense pass)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import EngineConfig, ModelConfig, SamplingConfig
from jaxinfer.engine import Engine
from jaxinfer.models import init_model
from jaxinfer.scoring import perplexity, windows
from jaxinfer.tokenizer import ByteTokenizer

CFG = ModelConfig(vocab_size=272, hidden_size=64, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16,
                  ffw_size=128, max_position_embeddings=256, init_std=0.2, sliding_window=None)
ENGINE = EngineConfig(page_size=4, num_pages=128, max_model_len=96, max_num_seqs=8, max_num_batched_tokens=48,
                      chunk_buckets=(8, 16), prefill_row_buckets=(0, 1, 2, 4), decode_row_buckets=(0, 1, 2, 4, 8),
                      max_top_logprobs=5)
TOL = 2e-5


@functools.cache
def model():
    return init_model(CFG, seed=3)


def reference(tokens) -> np.ndarray:
    """log_softmax of the model's logits over the whole sequence at once: [T, V]."""
    module = model().bind()
    hidden, _ = module(jnp.asarray([tokens], jnp.int32), jnp.arange(len(tokens), dtype=jnp.int32)[None])
    return np.asarray(jax.nn.log_softmax(module.logits(hidden[0]), axis=-1))


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lengths]


def test_prompt_logprobs_equal_the_full_forward_across_chunks_and_batches():
    """Prompts over several chunks (chunk 16, budget 48), scored beside plain requests in the same steps."""
    engine = Engine(model(), None, ENGINE)
    scored = prompts([37, 5, 20, 1])
    plain = prompts([30, 9], seed=1)
    want = SamplingConfig(max_new_tokens=3, prompt_logprobs=True, top_logprobs=4, logprobs=True)
    out = engine.generate(scored + plain, [want] * len(scored) + [SamplingConfig(max_new_tokens=6)] * len(plain))
    for p, c in zip(scored, out):
        ref = reference(p + c.tokens)
        assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(p)
        np.testing.assert_allclose(c.prompt_logprobs[1:], [ref[i - 1, p[i]] for i in range(1, len(p))], atol=TOL)
        for i in range(1, len(p)):
            ids, lps = zip(*c.prompt_top_logprobs[i])
            np.testing.assert_allclose(lps, np.sort(ref[i - 1])[::-1][:4], atol=TOL)
            assert ref[i - 1, list(ids)].tolist() == pytest.approx(list(lps), abs=TOL)
        # generated tokens: greedy picks the best alternative; their logprobs are the full forward's
        for j, (tok, top) in enumerate(zip(c.tokens, c.top_logprobs)):
            assert top[0][0] == tok and len(top) == 4
            assert c.logprobs[j] == pytest.approx(ref[len(p) - 1 + j, tok], abs=TOL)
    for c in out[len(scored):]:
        assert c.prompt_logprobs is None and c.top_logprobs is None


def test_a_scored_prompt_skips_the_prefix_cache_and_scores_the_same():
    engine = Engine(model(), None, ENGINE)
    p = prompts([33], seed=2)[0]
    first = engine.score([p])[0]
    engine.generate([p], SamplingConfig(max_new_tokens=2))  # leaves p's full pages in the prefix cache
    again = engine.score([p], top_logprobs=2)[0]
    assert again.logprobs == first.logprobs and all(t is not None and len(t) == 2 for t in again.top_logprobs[1:])
    assert not engine.has_work() and int((engine.scheduler.alloc.refcount > 0).sum()) == 0


def test_too_many_top_logprobs_is_refused_by_name():
    engine = Engine(model(), None, ENGINE)
    with pytest.raises(ValueError, match="engine.max_top_logprobs=5"):
        engine.generate([[1, 2]], SamplingConfig(top_logprobs=6))


@pytest.mark.parametrize("num_tokens,window,stride", [(10, 4, 3), (10, 4, 1), (9, 9, 8), (3, 2, 1), (50, 8, 5)])
def test_windows_score_every_token_after_the_first_once_with_context(num_tokens, window, stride):
    spans = windows(num_tokens, window, stride)
    scored = [p for start, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, num_tokens))
    assert all(end - start <= window and first > start for start, end, first in spans)


def test_perplexity_over_windows_equals_the_sum_of_full_forward_logprobs():
    engine = Engine(model(), ByteTokenizer(), ENGINE)
    text = "The quick brown fox jumps over the lazy dog, then rests; " * 3  # 172 tokens, 95 per window
    ids = ByteTokenizer().encode(text)
    got = perplexity(engine, text, progress=False)
    nll = 0.0
    for start, end, first in windows(len(ids), 95, 94):
        ref = reference(ids[start:end])
        nll -= sum(ref[p - start - 1, ids[p]] for p in range(first, end))
    assert got["num_scored"] == len(ids) - 1 and got["num_windows"] == 2
    assert got["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)


def test_jaxinfer_score_prints_the_perplexity_of_a_file(tmp_path, capsys):
    from jaxinfer.cli import main
    from jaxinfer.config import load_config

    (tmp_path / "tiny.yaml").write_text(
        "checkpoint: null\ntokenizer: byte\ncompilation_cache: null\n"
        "model: {vocab_size: 272, hidden_size: 64, num_layers: 2, num_q_heads: 4, num_kv_heads: 2, head_dim: 16,\n"
        "        ffw_size: 128, max_position_embeddings: 256, init_std: 0.2, dtype: float32}\n"
        "engine: {page_size: 4, num_pages: 128, max_model_len: 64, max_num_seqs: 8, max_num_batched_tokens: 48,\n"
        "         chunk_buckets: [16], prefill_row_buckets: [0, 1, 4], decode_row_buckets: [0, 1, 8]}\n")
    text = "A small text, scored in windows of the context. " * 3
    (tmp_path / "t.txt").write_text(text)
    assert main(["score", str(tmp_path / "t.txt"), "--config", str(tmp_path / "tiny.yaml"), "--window", "40"]) == 0
    out = capsys.readouterr().out
    want = perplexity(Engine.from_config(load_config(str(tmp_path / "tiny.yaml"))), text, window=40, progress=False)
    assert f"perplexity {want['perplexity']:.4f}" in out and f"{want['num_scored']} tokens scored" in out
    (tmp_path / "bad.txt").write_bytes(b"ok \xff")
    assert main(["score", str(tmp_path / "bad.txt"), "--config", str(tmp_path / "tiny.yaml")]) == 2
