"""Page accounting under random workloads, driven by a fake device step (no jax): no page owned
twice, refcounts equal owners, and after every workload each page is free or cached."""

import collections

import numpy as np
import pytest

from jaxinfer.config import EngineConfig, SamplingConfig
from jaxinfer.messages import StepOutput
from jaxinfer import scheduler as scheduler_module
from jaxinfer.scheduler import PageAllocator, PageKey, Scheduler, Status


def check_accounting(s: Scheduler):
    a = s.alloc
    owners = collections.Counter()
    for req in s.requests.values():
        assert len(set(req.pages)) == len(req.pages), f"request {req.id} holds a page twice"
        if req.status != Status.RUNNING:
            assert not req.pages, f"{req.status} request {req.id} holds pages"
        owners.update(req.pages)
    for page in range(a.num_pages):
        assert a.refcount[page] == owners[page], page
    free, lru = list(a.free), list(a.lru)
    assert len(set(free)) == len(free) and not set(free) & set(lru)
    held = {p for p in range(a.num_pages) if a.refcount[p] > 0}
    assert not held & (set(free) | set(lru))
    assert held | set(free) | set(lru) == set(range(a.num_pages)), "a page went missing"
    assert all(a.by_key[a.key_of[p]] == p for p in a.key_of)


def fake_step(plan, rng, vocab):
    rows = plan.layout.num_rows
    return (StepOutput.single(rng.integers(0, vocab, rows), rng.standard_normal(rows)),)


def run_workload(seed) -> Scheduler:
    rng = np.random.default_rng(seed)
    cfg = EngineConfig(page_size=int(rng.choice([2, 4, 8])), max_num_seqs=int(rng.integers(1, 9)),
                       max_num_batched_tokens=int(rng.integers(8, 64)), chunk_buckets=(4, 8, 16),
                       decode_row_buckets=(0, 1, 2, 4, 8), prefill_row_buckets=(0, 1, 2),
                       prefix_caching=bool(rng.integers(2)))
    num_pages = int(rng.integers(12, 40))
    s = Scheduler(cfg, num_pages, max_model_len=num_pages * cfg.page_size)
    vocab = 20
    prefixes = [rng.integers(0, vocab, int(rng.integers(1, 24))).tolist() for _ in range(3)]
    inflight = None
    for t in range(400):
        if rng.random() < 0.3 and t < 250:
            prompt = prefixes[rng.integers(3)] + rng.integers(0, vocab, int(rng.integers(0, 10))).tolist()
            s.add(prompt, SamplingConfig(max_new_tokens=int(rng.integers(1, 20))), stop_ids=(0,))
        if rng.random() < 0.05 and s.requests:
            s.abort(rng.choice(list(s.requests)))
        plan = s.schedule()
        if inflight is not None:  # async: the previous step's tokens arrive after the next plan
            s.update(inflight, *fake_step(inflight, rng, vocab))
        inflight = plan
        check_accounting(s)
        if t > 250 and not s.has_work() and inflight is None:
            break
    while s.has_work() or inflight is not None:
        plan = s.schedule()
        if inflight is not None:
            s.update(inflight, *fake_step(inflight, rng, vocab))
        inflight = plan
        check_accounting(s)
    assert all(r.status == Status.FINISHED for r in s.requests.values())
    assert (s.alloc.refcount == 0).all()
    assert len(s.alloc.free) + len(s.alloc.lru) == num_pages
    for r in s.requests.values():
        if r.finish_reason in ("stop", "length"):
            assert len(r.output) <= r.sampling.max_new_tokens
            assert r.finish_reason == "length" or r.output[-1] == 0
    return s


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_keep_page_accounting(seed):
    run_workload(seed)


def test_the_workloads_do_preempt_and_hit_the_prefix_cache():
    preempting, caching = run_workload(1), run_workload(4)
    assert preempting.num_preemptions > 0
    assert sum(r.num_cached_tokens for r in caching.requests.values()) > 0


def test_allocator_evicts_cached_pages_lru_only_when_free_runs_out():
    a = PageAllocator(3)
    p0, p1 = a.allocate(), a.allocate()
    key = PageKey(None, (1, 2))
    a.register(p0, key)
    a.release(p0)
    a.release(p1)
    assert list(a.lru) == [p0] and a.lookup(PageKey(None, (1, 2))) == p0 and a.refcount[p0] == 1
    a.release(p0)
    got = [a.allocate() for _ in range(3)]  # the two free pages first, then the cached one
    assert got[-1] == p0 and key not in a.by_key and a.allocate() is None
    with pytest.raises(AssertionError, match="released twice"):
        a.release(p1)
        a.release(p1)
        a.release(p1)


def test_prefix_hits_compare_tokens_not_only_hashes(monkeypatch):
    """Every page key hashes alike (a forced collision): only the same tokens may hit."""
    monkeypatch.setattr(scheduler_module, "page_hash", lambda parent, tokens: 0)
    s = Scheduler(EngineConfig(page_size=4, max_num_seqs=4, max_num_batched_tokens=64, chunk_buckets=(16,)),
                  num_pages=32, max_model_len=64)
    first = s.add(list(range(9)), SamplingConfig(max_new_tokens=1))
    plan = s.schedule()
    s.update(plan, StepOutput.single(np.zeros(8, np.int32), np.zeros(8, np.float32)))
    assert first.status == Status.FINISHED and len(s.alloc.by_key) == 2
    other = s.add(list(range(100, 109)), SamplingConfig(max_new_tokens=1))
    s.schedule()
    same = s.add(list(range(9)), SamplingConfig(max_new_tokens=1))
    s.schedule()
    assert other.num_cached_tokens == 0 and same.num_cached_tokens == 8


def test_layouts_count_the_shapes_a_configuration_reaches():
    from jaxinfer.config import SpeculativeConfig

    base = dict(page_size=4, max_model_len=128, max_num_seqs=32, max_num_batched_tokens=64, chunk_buckets=(8, 16, 32),
                prefill_row_buckets=(0, 1, 2, 4), decode_row_buckets=(0, 1, 2, 4, 8, 16, 32))
    count = lambda **kw: len(Scheduler(EngineConfig(**{**base, **kw}), 64, 128).layouts())  # noqa: E731
    assert count(fixed_table_width=True) * 6 == count(fixed_table_width=False)  # widths 1, 2, 4, 8, 16, 32 pages
    ngram = SpeculativeConfig(method="ngram", num_speculative_tokens=4)
    assert count(fixed_table_width=True, speculative=ngram) > 4 * count(fixed_table_width=True)
    few = count(fixed_table_width=True, speculative=ngram, verify_row_buckets=(0, 8))
    assert few <= 2 * count(fixed_table_width=True) + 1  # verify rows: none or 8 (+ the verify-only step)
    s = Scheduler(EngineConfig(**{**base, "fixed_table_width": True, "speculative": ngram, "verify_row_buckets": (0, 8)}),
                  64, 128)
    assert {lay.num_verify_rows for lay in s.layouts()} == {0, 8}
