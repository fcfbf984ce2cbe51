"""The engine against the dense generate() baseline: greedy tokens identical under every
scheduling condition; seeded sampling independent of the batch; recycled pages never read."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from jaxinfer.config import EngineConfig, ModelConfig, SamplingConfig
from jaxinfer.engine import Engine
from jaxinfer.generate import Generator
from jaxinfer.models import init_model
from jaxinfer.step import TRACES

CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16,
                  ffw_size=128, max_position_embeddings=256, init_std=0.2, sliding_window=None)
BASE = EngineConfig(page_size=4, num_pages=96, max_model_len=128, max_num_seqs=32, max_num_batched_tokens=64,
                    chunk_buckets=(8, 16, 32), prefill_row_buckets=(0, 1, 2, 4), decode_row_buckets=(0, 1, 2, 4, 8, 16, 32))


@functools.cache
def model():
    return init_model(CFG, seed=1)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


@functools.cache
def generator():
    return Generator(model())


@functools.cache
def dense(prompt: tuple, sampling: SamplingConfig):
    return generator().generate([list(prompt)], sampling).tokens[0]


def engine(**changes):
    return Engine(model(), None, EngineConfig(**{**BASE.__dict__, **changes}))


GREEDY = SamplingConfig(max_new_tokens=16)
LENGTHS = [3, 17, 1, 40, 9, 33, 5, 12]


def assert_equals_dense(completions, ps, sampling=GREEDY):
    for c, p in zip(completions, ps):
        assert c.error is None and c.tokens == dense(tuple(p), sampling), c.request_id


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_mixed_lengths_equal_dense(async_scheduling):
    ps = prompts(LENGTHS)
    assert_equals_dense(engine(async_scheduling=async_scheduling).generate(ps, GREEDY), ps)


@pytest.mark.parametrize("num_rows", [1, 2, 7, 32])
def test_concurrent_rows_equal_dense(num_rows):
    ps = prompts([(3 * i) % 29 + 1 for i in range(num_rows)], seed=num_rows)
    e = engine(max_num_batched_tokens=128, num_pages=320)
    out = e.generate(ps, GREEDY)
    assert_equals_dense(out, ps)
    assert max(r.num_rows for r in e.records) == num_rows


@pytest.mark.parametrize("chunk", [(8,), (8, 16), (16, 32)])
def test_every_chunk_size_equals_dense(chunk):
    ps = prompts([40, 23, 2])
    e = engine(chunk_buckets=chunk, max_num_batched_tokens=max(chunk))
    assert_equals_dense(e.generate(ps, GREEDY), ps)


def test_staggered_arrivals_equal_dense():
    ps = prompts(LENGTHS, seed=5)
    e = engine()
    ids = []
    for i, p in enumerate(ps):  # a new request every other step, while others decode
        ids.append(e.add_request(p, GREEDY))
        e.step()
        if i % 2:
            e.step()
    e.run_until_done()
    assert_equals_dense([e.completion(i) for i in ids], ps)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_shared_prefix_equals_dense_and_hits_the_cache(prefix_caching):
    shared = prompts([24], seed=9)[0]
    ps = [shared + tail for tail in prompts([5, 1, 9, 3], seed=10)]
    e = engine(prefix_caching=prefix_caching)
    first = e.generate(ps[:1], GREEDY)
    rest = e.generate(ps[1:], GREEDY)
    assert_equals_dense(first + rest, ps)
    cached = [c.num_cached_tokens for c in rest]
    assert cached == ([24] * 3 if prefix_caching else [0] * 3)


def test_preemption_happens_and_changes_nothing():
    ps = prompts([30, 25, 28, 20, 26], seed=3)
    e = engine(num_pages=24, max_model_len=64)  # 24 pages of 4: two requests of ~46 tokens at most
    out = e.generate(ps, GREEDY)
    assert e.scheduler.num_preemptions > 0
    assert any(c.num_preemptions for c in out)
    assert_equals_dense(out, ps)


def test_seeded_sampling_is_independent_of_the_batch():
    ps = prompts([6, 14, 3], seed=4)
    cfgs = [SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3)]
    together = engine().generate(ps, cfgs)
    for p, c, got in zip(ps, cfgs, together):
        assert engine().generate([p], c)[0].tokens == got.tokens == dense(tuple(p), c)


def test_poisoned_freed_pages_change_nothing():
    ps = prompts([30, 25, 28, 20, 26, 7, 19], seed=6)
    plain = engine(num_pages=24, max_model_len=64).generate(ps, GREEDY)
    e = engine(num_pages=24, max_model_len=64, debug_poison_freed_pages=True, prefix_caching=False)
    poisoned = e.generate(ps, GREEDY)
    assert e.scheduler.num_preemptions > 0
    assert [c.tokens for c in poisoned] == [c.tokens for c in plain]
    assert np.isnan(np.asarray(e.cache.k)).any()  # freed pages really hold NaN


def test_no_recompilation_after_warmup():
    ps = prompts(LENGTHS, seed=7)
    engine().generate(ps, GREEDY)
    before = TRACES["step"]
    engine().generate(prompts(LENGTHS, seed=8), GREEDY)
    assert TRACES["step"] == before


def test_stream_yields_every_token_in_order():
    ps = prompts([5, 9])
    e = engine()
    got = {}
    for rid, tok in e.stream(ps, GREEDY):
        got.setdefault(rid, []).append(tok)
    assert [got[r] for r in sorted(got)] == [dense(tuple(p), GREEDY) for p in ps]


def test_stop_ids_and_abort():
    p = prompts([7])[0]
    free = dense(tuple(p), GREEDY)
    e = engine()
    out = e.generate([p], GREEDY, stop_ids=(free[4],))[0]
    assert out.tokens == free[: free.index(free[4]) + 1] and out.finish_reason == "stop"
    rid = e.add_request(p, GREEDY)
    keep = e.add_request(prompts([5])[0], GREEDY)
    e.step()
    e.abort(rid)
    e.run_until_done()
    assert e.completion(rid).finish_reason == "abort"
    assert e.completion(keep).tokens == dense(tuple(prompts([5])[0]), GREEDY)
    with pytest.raises(KeyError, match="no request with id 'nope'"):
        e.abort("nope")


def test_bad_requests_get_error_results_and_others_run():
    e = engine(num_pages=8, max_model_len=128)  # 8 pages of 4 = 32 positions in the whole cache
    good = prompts([5])[0]
    out = e.generate([list(range(120)), list(range(30)), [], good], SamplingConfig(max_new_tokens=10))
    assert "exceeds the context limit of 128" in out[0].error
    assert "needs 10 KV pages of 4 positions but the cache has only 8" in out[1].error
    assert "empty prompt" in out[2].error
    assert out[3].error is None and out[3].tokens == dense(tuple(good), SamplingConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        e.add_request(good, SamplingConfig(max_new_tokens=0))
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"engine.num_pages={bad}: the KV cache needs at least one page"):
            Engine(model(), None, EngineConfig(num_pages=bad))
    with pytest.raises(ValueError, match="reports no memory limit; set engine.num_pages"):
        Engine(model(), None, EngineConfig(kv_memory_fraction=0.5))


def test_from_config_text_prompts_and_stop_strings():
    from jaxinfer.config import load_config, preset_path

    cfg = load_config(preset_path("default"), ["model.num_layers=1", "engine.max_model_len=128", "engine.page_size=8"])
    e = Engine.from_config(cfg)
    free = e.generate(["Hello"], SamplingConfig(max_new_tokens=24))[0]
    assert free.prompt_tokens == e.tokenizer.encode("Hello") and free.text == e.tokenizer.decode(free.tokens)
    ascii_run = next(free.text[i:i + 2] for i in range(len(free.text) - 1) if free.text[i:i + 2].isascii() and free.text[i:i + 2].isprintable())
    stopped = e.generate(["Hello"], SamplingConfig(max_new_tokens=24, stop=(ascii_run,)))[0]
    assert stopped.finish_reason == "stop" and ascii_run not in stopped.text
    assert free.text.startswith(stopped.text) and len(stopped.tokens) < len(free.tokens)


def test_unrolled_layers_engine_equals_dense():
    import dataclasses

    from jaxinfer.checkpoint import relayout

    unrolled = relayout(model(), False)
    ps = prompts([9, 21, 4], seed=11)
    e = Engine(unrolled, None, BASE)
    assert_equals_dense(e.generate(ps, GREEDY), ps)
    assert dataclasses.replace(unrolled.cfg, scan_layers=True) == model().cfg


# Interpreted kernels compile slowly: one bucket per row group (decode rows and prefill chunks still
# mix, the 40-token prompt spans three 16-token chunks) keeps the step shapes to a handful.
KERNEL_BUCKETS = {"page_size": 16, "chunk_buckets": (16,), "prefill_row_buckets": (0, 4), "decode_row_buckets": (0, 4)}


@pytest.mark.parametrize("impl", ["tpu_interpret", "gpu_interpret"])
def test_pallas_attention_kernels_give_the_reference_tokens(impl):
    """The whole engine (decode rows and prefill chunks, every layer) on the Pallas kernels, run by
    the interpreter: greedy tokens identical to attention_impl=reference and to dense generate()."""
    ps, sampling = prompts([3, 17, 40, 9]), SamplingConfig(max_new_tokens=8)
    want = engine(**KERNEL_BUCKETS, attention_impl="reference").generate(ps, sampling)
    got = engine(**KERNEL_BUCKETS, attention_impl=impl).generate(ps, sampling)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert_equals_dense(got, ps, sampling)


def test_pallas_attention_with_a_sliding_window_gives_the_dense_tokens():
    """A Mistral-style window (8 positions) shorter than the prompts, through the TPU kernel."""
    windowed = init_model(dataclasses.replace(CFG, sliding_window=8), seed=1)
    ps, sampling = prompts([3, 30, 19]), SamplingConfig(max_new_tokens=8)
    want = Generator(windowed).generate(ps, sampling).tokens
    cfg = EngineConfig(**{**BASE.__dict__, **KERNEL_BUCKETS, "attention_impl": "tpu_interpret"})
    assert [c.tokens for c in Engine(windowed, None, cfg).generate(ps, sampling)] == want


@functools.cache
def quantized(quant, impl):
    from jaxinfer.models.quantize import quantize_model

    return quantize_model(model(), quant.removesuffix("_asym"), 32, impl, asymmetric=quant.endswith("_asym"))


@pytest.mark.parametrize("quant", ["int8", "int4", "int4_asym"])
def test_quantized_weights_on_pallas_matmuls_give_the_reference_tokens(quant):
    """int8 / int4 weights: the engine on the Pallas quant_matmul kernels (interpreted), and on an
    8-device mesh, gives the tokens of matmul_impl=reference on one device."""
    ps, sampling = prompts([3, 17, 9]), SamplingConfig(max_new_tokens=6)
    cfg = EngineConfig(**{**BASE.__dict__, **KERNEL_BUCKETS})
    want = [c.tokens for c in Engine(quantized(quant, "reference"), None, cfg).generate(ps, sampling)]
    for impl in ["tpu_interpret", "gpu_interpret"]:
        assert [c.tokens for c in Engine(quantized(quant, impl), None, cfg).generate(ps, sampling)] == want, impl
    sharded = EngineConfig(**{**cfg.__dict__, "mesh": (2, 4)})
    assert [c.tokens for c in Engine(quantized(quant, "reference"), None, sharded).generate(ps, sampling)] == want
    dtypes = {x.dtype.name for x in jax.tree.leaves(quantized(quant, "reference").params)}
    assert {"int8" if quant == "int8" else "uint8", "float32"} == dtypes  # the matmuls really take quantized weights
