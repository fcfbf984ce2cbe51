"""The engine survives what users do to it: Ctrl-C at every await point, concurrent threads,
failed device steps, bad input, and thousands of requests, and still gives the dense baseline's
tokens afterwards with no page held."""

import dataclasses
import os
import signal
import threading
import time

import numpy as np
import pytest
from test_engine import BASE, CFG, GREEDY, assert_equals_dense, engine, model, prompts

from jaxinfer.config import SamplingConfig
from jaxinfer.engine import Engine, EngineBusy
from jaxinfer.generate import Generator
from jaxinfer.models import init_model
from jaxinfer.scheduler import UnknownRequest

PS = prompts([3, 17, 1, 40, 9, 33])


def assert_idle(e: Engine):
    """Nothing queued, running, in flight or held: every page's refcount is back to zero."""
    assert not e.has_work() and not e.scheduler.requests
    assert (e.scheduler.alloc.refcount == 0).all(), np.flatnonzero(e.scheduler.alloc.refcount)


def fail_on_call(obj, name, n, exc, monkeypatch):
    """Makes the n-th call of obj.name raise exc (before the real call)."""
    real, calls = getattr(obj, name), [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(obj, name, wrapped)


@pytest.mark.parametrize("point", ["schedule", "dispatch", "read", "update"])
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_interrupt_at_each_await_point_leaves_a_working_engine(point, n, async_scheduling, monkeypatch):
    e = engine(async_scheduling=async_scheduling)
    target = {"schedule": (e.scheduler, "schedule"), "dispatch": (e, "_dispatch"), "read": (e, "_read"),
              "update": (e.scheduler, "update")}[point]
    fail_on_call(*target, n, KeyboardInterrupt(), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        e.generate(PS, GREEDY)
    e.run_until_done()  # reads whatever was left in flight
    assert_idle(e)
    assert_equals_dense(e.generate(PS, GREEDY), PS)
    assert_idle(e)


@pytest.mark.parametrize("point", ["dispatch", "read"])
def test_interrupted_step_keeps_its_requests_queued(point, monkeypatch):
    """Stepping by hand: an interrupt loses nothing; the same requests finish correctly."""
    e = engine()
    ids = [e.add_request(p, GREEDY) for p in PS]
    for _ in range(3):
        e.step()
    fail_on_call(e, {"dispatch": "_dispatch", "read": "_read"}[point], 1, KeyboardInterrupt(), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        e.step()
    e.run_until_done()
    assert_equals_dense([e.completion(i) for i in ids], PS)
    assert_idle(e)


def test_real_sigint_during_generate():
    """SIGINT delivered by the OS at arbitrary moments (a timer thread) never wedges the engine."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)
    e = engine()
    e.generate(PS, GREEDY)  # compile first, so the interrupts land in steady-state steps
    interrupted = rounds = 0
    while interrupted < 3 and rounds < 3:  # timing on a loaded machine varies: up to three rounds
        rounds += 1
        for delay in (0.002, 0.01, 0.03, 0.05, 0.08, 0.13):
            timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            try:
                e.generate(PS, SamplingConfig(max_new_tokens=40))
                time.sleep(0.2)  # a late signal lands here, not in the next round
            except KeyboardInterrupt:
                interrupted += 1
            timer.join()
            e.run_until_done()
            assert_idle(e)
    assert interrupted >= 3, f"{interrupted} of {6 * rounds} SIGINTs raised KeyboardInterrupt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert_equals_dense(e.generate(PS, GREEDY), PS)


def test_failed_dispatch_requeues_and_failed_device_step_resets(monkeypatch):
    e = engine()
    fail_on_call(e, "_dispatch", 2, RuntimeError("dispatch failed"), monkeypatch)
    ids = [e.add_request(p, GREEDY) for p in PS]
    with pytest.raises(RuntimeError, match="dispatch failed"):
        e.run_until_done()
    fail_on_call(e, "_read", 3, RuntimeError("device step failed"), monkeypatch)
    with pytest.raises(RuntimeError, match="device step failed"):
        e.run_until_done()
    e.run_until_done()
    assert_equals_dense([e.completion(i) for i in ids], PS)
    assert_idle(e)


def test_a_second_stepping_thread_is_refused_and_the_first_is_unharmed(monkeypatch):
    e = engine()
    inside, release = threading.Event(), threading.Event()
    real = e._read

    def slow_read(*a):
        inside.set()
        release.wait(30)
        return real(*a)

    monkeypatch.setattr(e, "_read", slow_read)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", e.generate(PS, GREEDY)))
    worker.start()
    assert inside.wait(60)
    with pytest.raises(EngineBusy, match="one thread steps an engine"):
        e.step()
    with pytest.raises(EngineBusy):
        e.generate(PS[:1], GREEDY)
    monkeypatch.setattr(e, "_read", real)
    release.set()
    worker.join(120)
    assert_equals_dense(result["out"], PS)
    assert_idle(e)


def test_add_and_abort_from_other_threads_while_stepping():
    e = engine(num_pages=320, max_num_batched_tokens=128)
    ps = prompts([(5 * i) % 31 + 1 for i in range(24)], seed=9)
    ids: dict[int, str] = {}
    aborted = set()

    def client(k):
        for i in range(k, len(ps), 4):
            ids[i] = e.add_request(ps[i], GREEDY)
            if i % 3 == 0:
                e.abort(ids[i])
                aborted.add(i)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or e.has_work():
        e.step()
    for t in threads:
        t.join()
    done = {i: e.completion(r) for i, r in ids.items()}
    assert all(done[i].finish_reason == "abort" for i in aborted)
    kept = sorted(set(done) - aborted)
    assert_equals_dense([done[i] for i in kept], [ps[i] for i in kept])
    assert_idle(e)


def test_generate_validates_everything_before_queueing():
    e = engine()
    with pytest.raises(ValueError, match="6 prompts but 2 sampling configs"):
        e.generate(PS, [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="prompt 2: token id 5000 at position 1"):
        e.generate([PS[0], PS[1], [0, 5000, 7]], GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        e.generate(PS, [GREEDY] * 5 + [SamplingConfig(max_new_tokens=0)])
    assert_idle(e)
    assert_equals_dense(e.generate(PS, GREEDY), PS)


@pytest.mark.parametrize("bad", [[0, 5000, 7], [-1], [CFG.vocab_size]])
def test_token_ids_outside_the_vocabulary_are_rejected(bad):
    with pytest.raises(ValueError, match=f"token id {[i for i in bad if not 0 <= i < CFG.vocab_size][0]} at position"):
        engine().add_request(bad, GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Generator(model()).generate([bad], GREEDY)


def test_abort_of_an_unknown_id_says_what_happened():
    e = engine()
    with pytest.raises(UnknownRequest, match="no request with id 'nope': it was never added, or it finished"):
        e.abort("nope")
    rid = e.add_request(PS[0], GREEDY)
    e.run_until_done()
    e.completion(rid)
    with pytest.raises(KeyError, match="released"):
        e.completion(rid)


def test_thousands_of_requests_keep_memory_bounded():
    e = engine(max_finished_requests=50, max_step_records=40, max_num_batched_tokens=64)
    rng = np.random.default_rng(0)
    one = SamplingConfig(max_new_tokens=1)
    ids = [e.add_request(rng.integers(0, CFG.vocab_size, 1 + i % 3).tolist(), one) for i in range(3000)]
    e.run_until_done()
    assert len(e.scheduler.requests) == 50 and e.scheduler.num_dropped_unread == 2950
    assert len(e.records) == 40
    with pytest.raises(UnknownRequest, match="max_finished_requests=50"):
        e.completion(ids[0])
    assert len(e.completion(ids[-1]).tokens) == 1
    for _ in range(200):  # results read through generate are released at once
        e.generate([[1, 2]], one)
    assert len(e.scheduler.requests) == 49
    many = e.generate([[i % CFG.vocab_size] for i in range(120)], one)  # more than the cap in one call
    assert len(many) == 120 and all(len(c.tokens) == 1 for c in many)
    assert len(e.scheduler.requests) == 49


def test_closing_a_stream_early_aborts_its_requests():
    e = engine()
    stream = e.stream(PS, GREEDY)
    for _ in range(5):
        next(stream)
    stream.close()
    assert not any(r.status.value != "finished" for r in e.scheduler.running + list(e.scheduler.waiting))
    e.run_until_done()  # reads the step still in flight
    assert_idle(e)
    got: dict[str, list[int]] = {}
    for rid, tok in e.stream(PS, GREEDY):
        got.setdefault(rid, []).append(tok)
    assert_idle(e)
    from test_engine import dense

    assert sorted(got.values()) == sorted(dense(tuple(p), GREEDY) for p in PS)


# ---- nothing silently ignored ---------------------------------------------------------------------
SAMPLED = SamplingConfig(max_new_tokens=16, temperature=1.0)


def test_requests_get_fresh_seeds_recorded_for_repeats():
    e = engine()
    a, b = e.generate([PS[1], PS[1]], SAMPLED)
    assert a.seed != b.seed and a.tokens != b.tokens
    again = e.generate([PS[1]], SamplingConfig(max_new_tokens=16, temperature=1.0, seed=a.seed))[0]
    assert again.tokens == a.tokens
    res = Generator(model()).generate([PS[1]] * 3, SAMPLED)  # 3 rows: a bucket test_generate does not count
    assert len(set(res.seeds)) == 3 and res.tokens[0] != res.tokens[1]
    assert Generator(model()).generate([PS[1]], SamplingConfig(max_new_tokens=16, temperature=1.0,
                                                               seed=res.seeds[0])).tokens[0] == res.tokens[0]


def test_empty_and_non_string_stop_strings_are_rejected():
    for stop, match in [(("",), "empty stop string"), ("ab", "list of strings")]:
        with pytest.raises(ValueError, match=match):
            engine().add_request(PS[0], SamplingConfig(stop=stop))


def test_stop_strings_without_a_tokenizer_are_rejected_not_ignored():
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine().add_request(PS[0], SamplingConfig(stop=("x",)))
    with pytest.raises(ValueError, match="pass tokenizer= to generate"):
        Generator(model()).generate([PS[0]], SamplingConfig(stop=("x",)))


def test_generator_honours_stop_strings_like_the_engine():
    from jaxinfer.checkpoint import load_model
    from jaxinfer.tokenizer import load_tokenizer

    m, tok = load_model("package:reference/target"), load_tokenizer("package:reference/target")
    prompt = "One morning, Ada and Ben"
    free = Generator(m).generate([tok.encode(prompt)], SamplingConfig(max_new_tokens=48), tokenizer=tok)
    stop = free.texts[0][10:14]  # a string the greedy text reaches after some tokens
    cfg = SamplingConfig(max_new_tokens=48, stop=(stop,))
    res = Generator(m).generate([tok.encode(prompt)], cfg, tokenizer=tok)
    eng = Engine(m, tok, engine().cfg).generate([prompt], cfg)[0]
    assert res.finish_reasons == ["stop"] and eng.finish_reason == "stop"
    assert res.tokens[0] == eng.tokens and len(eng.tokens) < len(free.tokens[0])
    assert res.texts[0] == eng.text == free.texts[0][:10] and stop not in eng.text


def test_the_folder_stop_list_is_the_default_everywhere(tmp_path):
    import json
    import shutil

    from conftest import FIXTURES

    from jaxinfer.checkpoint import load_model, save_converted
    from jaxinfer.tokenizer import load_tokenizer

    folder = FIXTURES / "llama3"
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [1, 4]
    m, tok = load_model(folder), load_tokenizer(folder)
    assert m.cfg.stop_ids == (1, 4)
    assert set(Engine(m, tok, engine().cfg).default_stop_ids) == {1, 4, *tok.eos_ids}
    assert load_model(save_converted(m, tmp_path / "conv", source=folder)).cfg.stop_ids == (1, 4)
    # generate() stops on the folder's ids: a stop list of the first greedy token ends after one
    first = Generator(m).generate([[3, 5, 7]], SamplingConfig(max_new_tokens=8), stop_ids=()).tokens[0][0]
    other = tmp_path / "hf"
    shutil.copytree(folder, other)
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [first]}))
    res = Generator(load_model(other)).generate([[3, 5, 7]], SamplingConfig(max_new_tokens=8))
    assert res.tokens[0] == [first] and res.finish_reasons == ["stop"]


def test_a_request_that_fills_the_context_gets_every_token():
    """prompt + max_new_tokens == the model's context: every token comes back, engine and generate alike."""
    short = init_model(dataclasses.replace(CFG, max_position_embeddings=32), seed=1)
    p = prompts([20], seed=5)[0]
    c = Engine(short, None, dataclasses.replace(BASE, max_model_len=512)).generate([p], SamplingConfig(max_new_tokens=12))[0]
    assert c.finish_reason == "length" and len(c.tokens) == 12
    assert c.tokens == Generator(short).generate([p], SamplingConfig(max_new_tokens=12)).tokens[0]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Generator(short).generate([p], SamplingConfig(max_new_tokens=13))
