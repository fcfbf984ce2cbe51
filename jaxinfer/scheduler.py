"""HOST ONLY (no jax): requests, the page allocator with refcounts and a prefix cache, and the
policy that turns waiting and running requests into one step's plan under a token budget.

One token budget serves decodes, verify rows (speculative decoding: the last token and k drafts)
and prefill chunks alike (no separate phases). Prefix caching matches full pages by their tokens
chained to their prefix (`PageKey`); freed cached pages stay in an LRU until a new page is
needed. When pages run out, the most recently admitted running request is preempted by
recompute: its pages are freed, it goes back to the head of the queue, nothing it produced is lost.
A verify row appends 1..k+1 tokens; the positions of rejected drafts are simply overwritten later.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import math
import time

import numpy as np

from jaxinfer.config import EngineConfig, SamplingConfig
from jaxinfer.drafters import ngram_propose
from jaxinfer.messages import SAMPLING_FIELDS, Layout, RowPlan, Scores, StepOutput, StepPlan, empty_arrays

PAD_ROW = SamplingConfig(seed=0)  # what padding rows sample with (greedy; their tokens are dropped)


def validate(s: SamplingConfig) -> SamplingConfig:
    """Raises ValueError naming the field, the value and the allowed range."""

    def bad(field, why):
        raise ValueError(f"sampling.{field}={getattr(s, field)!r}: {why}")

    if not isinstance(s.max_new_tokens, int) or s.max_new_tokens <= 0:
        bad("max_new_tokens", "must be a positive integer (number of tokens to generate)")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        bad("temperature", "must be finite and >= 0 (0 means greedy)")
    if s.top_k < 0:
        bad("top_k", "must be >= 0 (0 disables top-k)")
    if not math.isfinite(s.top_p) or not 0 < s.top_p <= 1:
        bad("top_p", "must be in (0, 1] (1 disables top-p)")
    if not math.isfinite(s.min_p) or not 0 <= s.min_p <= 1:
        bad("min_p", "must be in [0, 1] (0 disables min-p)")
    if not isinstance(s.top_logprobs, int) or s.top_logprobs < 0:
        bad("top_logprobs", "must be an integer >= 0 (0: no alternatives)")
    if s.seed is not None and not 0 <= s.seed < 2**32:
        bad("seed", "must be in [0, 2**32), or None for a fresh seed per request")
    if isinstance(s.stop, str) or not all(isinstance(x, str) for x in s.stop):
        bad("stop", "must be a list of strings")
    if any(x == "" for x in s.stop):
        bad("stop", "an empty stop string would end every request after its first token; remove it")
    return s


def check_token_ids(ids, vocab_size: int, what: str = "prompt") -> list[int]:
    """The ids as ints, or ValueError naming the first id outside [0, vocab_size) and its position."""
    ids = [int(i) for i in ids]
    for pos, i in enumerate(ids):
        if not 0 <= i < vocab_size:
            raise ValueError(f"{what}: token id {i} at position {pos} is outside the vocabulary [0, {vocab_size}); "
                             "ids must come from this model's tokenizer")
    return ids


class UnknownRequest(KeyError):
    """An id the scheduler does not hold: never added, or finished and already released."""

    def __init__(self, request_id: str, max_finished: int):
        super().__init__(request_id)
        self.request_id, self.max_finished = request_id, max_finished

    def __str__(self) -> str:
        return (f"no request with id '{self.request_id}': it was never added, or it finished and was released "
                f"(a completion is released once read, and at most engine.max_finished_requests="
                f"{self.max_finished} unread finished requests are kept)")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """A request and everything the host knows of it. Times are `Scheduler.clock()` seconds."""

    id: str
    prompt: list[int]
    sampling: SamplingConfig
    stop_ids: tuple[int, ...] = ()
    arrival: float = 0.0
    output: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    pending: collections.deque = dataclasses.field(default_factory=collections.deque)  # (step_id, row) in flight
    num_computed: int = 0  # positions whose KV is (or is being) written
    pages: list[int] = dataclasses.field(default_factory=list)
    page_keys: list[PageKey] = dataclasses.field(default_factory=list)  # of full pages
    status: Status = Status.WAITING
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    scheduled_time: float | None = None  # first admission
    token_times: list[float] = dataclasses.field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    known: list[int] = dataclasses.field(default_factory=list)  # prompt + output, kept in step
    keep: bool = False  # its owner (Engine.generate/stream) releases it: never dropped unread
    # Speculative decoding: the draft model's proposals from step `drafts_step` (row `draft_row`).
    drafts: list[int] = dataclasses.field(default_factory=list)
    drafts_step: int = -1
    draft_row: int = -1
    num_verify_steps: int = 0
    num_proposed: int = 0
    num_accepted: int = 0
    accepted_at: list[int] = dataclasses.field(default_factory=list)  # [k]: drafts kept at position j
    # Scoring (sampling.prompt_logprobs / top_logprobs): per prompt position, its logprob given the
    # positions before (None at 0) and the top alternatives there [(id, logprob)]; per output token too.
    prompt_logprobs: list[float | None] = dataclasses.field(default_factory=list)
    prompt_top: list[list[tuple[int, float]] | None] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.known = self.prompt + self.output
        if self.sampling.prompt_logprobs and not self.prompt_logprobs:
            self.prompt_logprobs, self.prompt_top = [None] * len(self.prompt), [None] * len(self.prompt)

    @property
    def num_tokens(self) -> int:
        """Known tokens plus those sampled in flight."""
        return len(self.prompt) + len(self.output) + len(self.pending)

    @property
    def num_generated(self) -> int:
        return len(self.output) + len(self.pending)


class PageKey:
    """What a full page holds: its tokens and, through `parent`, every token before them. Hashed
    by the chain (cheap), compared token by token (exact): a 64-bit hash collision between two
    prefixes cannot hand one request another's KV."""

    __slots__ = ("parent", "tokens", "_hash")

    def __init__(self, parent: "PageKey | None", tokens: tuple[int, ...]):
        self.parent, self.tokens = parent, tokens
        self._hash = page_hash(parent._hash if parent is not None else 0, tokens)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        a, b = self, other
        while a is not b:  # walk both chains (iterative: prefixes can be thousands of pages)
            if a is None or b is None or a._hash != b._hash or a.tokens != b.tokens:
                return False
            a, b = a.parent, b.parent
        return True


def page_hash(parent_hash: int, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


class PageAllocator:
    """Pages with reference counts. A page whose count drops to 0 goes to the free list, or, if it
    holds a full page with a key, to an LRU of cached pages that prefix hits can revive."""

    def __init__(self, num_pages: int, prefix_caching: bool = True):
        self.num_pages = num_pages
        self.prefix_caching = prefix_caching
        self.refcount = np.zeros(num_pages, np.int32)
        self.free = collections.deque(range(num_pages))
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, refcount 0
        self.by_key: dict[PageKey, int] = {}
        self.key_of: dict[int, PageKey] = {}
        self.newly_freed: list[int] = []  # pages that went to the free list (debug poisoning)

    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.lru)

    def allocate(self) -> int | None:
        if self.free:
            page = self.free.popleft()
        elif self.lru:
            page, _ = self.lru.popitem(last=False)
            del self.by_key[self.key_of.pop(page)]
        else:
            return None
        self.refcount[page] = 1
        return page

    def release(self, page: int) -> None:
        assert self.refcount[page] > 0, f"page {page} released twice"
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            if page in self.key_of:
                self.lru[page] = None
            else:
                self.free.append(page)
                self.newly_freed.append(page)

    def lookup(self, key: PageKey) -> int | None:
        """The cached page holding `key`, now referenced once more; None on a miss."""
        page = self.by_key.get(key) if self.prefix_caching else None
        if page is not None:
            self.lru.pop(page, None)
            self.refcount[page] += 1
        return page

    def register(self, page: int, key: PageKey) -> None:
        if self.prefix_caching and key not in self.by_key and page not in self.key_of:
            self.by_key[key], self.key_of[page] = page, key


def bucket(n: int, buckets, what: str) -> int:
    """The smallest bucket >= n (buckets: any iterable of sizes)."""
    buckets = sorted(buckets)
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what}={n} exceeds the largest bucket {buckets[-1]}; add a larger one to the config's buckets")


class Scheduler:
    def __init__(self, cfg: EngineConfig, num_pages: int, max_model_len: int, clock=time.perf_counter):
        self.cfg = cfg
        self.page_size = cfg.page_size
        self.max_model_len = max_model_len
        self.max_pages_per_seq = -(-max_model_len // cfg.page_size)
        # Block tables: as wide as the context (engine.fixed_table_width), or as the step's longest
        # row needs in powers of two (the reference attention gathers every listed page).
        self.table_buckets = [self.max_pages_per_seq] if cfg.fixed_table_width else sorted(
            {min(2 ** i, self.max_pages_per_seq) for i in range(self.max_pages_per_seq.bit_length() + 1)})
        self.chunk_size = max(cfg.chunk_buckets)
        self.max_prefill_rows = max(cfg.prefill_row_buckets)
        self.max_rows = min(cfg.max_num_seqs, max(cfg.decode_row_buckets))  # all rows may be decodes
        self.num_drafts = cfg.speculative.num_drafts  # k (0: no speculation)
        self.verify_buckets = cfg.verify_row_buckets if cfg.verify_row_buckets is not None else cfg.decode_row_buckets
        self.max_verify_rows = max(self.verify_buckets)
        self.alloc = PageAllocator(num_pages, cfg.prefix_caching)
        self.clock = clock
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.step_ids = itertools.count()
        self.num_preemptions = 0
        self._ids = itertools.count()
        # Finished requests stay readable until released (Engine.completion reads and releases);
        # past engine.max_finished_requests unread ones, the oldest are dropped (a long-lived
        # server must not grow without bound) and remembered by count only.
        self.finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.num_dropped_unread = 0

    # ---- requests ---------------------------------------------------------------------------
    def add(self, prompt: list[int], sampling: SamplingConfig, stop_ids=(), request_id: str | None = None,
            arrival: float | None = None, keep: bool = False) -> Request:
        """Queues a request; one that can never run is returned finished with `error` set. `keep`:
        the caller will release it, so the cap on unread finished requests does not apply."""
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.requests:
            raise ValueError(f"request id '{rid}' is already in use")
        req = Request(rid, list(prompt), sampling.with_seed(), tuple(stop_ids),
                      self.clock() if arrival is None else arrival, keep=keep)
        self.requests[rid] = req
        need = len(prompt) + sampling.max_new_tokens
        pages = -(-need // self.page_size)
        if not prompt:
            self._fail(req, "empty prompt: give at least one token (e.g. BOS)")
        elif need > self.max_model_len:
            self._fail(req, f"prompt of {len(prompt)} tokens + max_new_tokens {sampling.max_new_tokens} = {need} "
                            f"exceeds the context limit of {self.max_model_len} (engine.max_model_len / model)")
        elif pages > self.alloc.num_pages:
            self._fail(req, f"needs {pages} KV pages of {self.page_size} positions but the cache has only "
                            f"{self.alloc.num_pages}: raise engine.num_pages or lower max_new_tokens")
        else:
            self.waiting.append(req)
        return req

    def _fail(self, req: Request, why: str) -> None:
        req.status, req.finish_reason, req.error = Status.FINISHED, "error", why
        self._retire(req)

    def _retire(self, req: Request) -> None:
        if req.keep:
            return
        self.finished[req.id] = None
        while len(self.finished) > self.cfg.max_finished_requests:
            rid, _ = self.finished.popitem(last=False)
            del self.requests[rid]
            self.num_dropped_unread += 1

    def get(self, request_id: str) -> Request:
        """The request, or UnknownRequest saying why it is not here."""
        req = self.requests.get(str(request_id))
        if req is None:
            raise UnknownRequest(str(request_id), self.cfg.max_finished_requests)
        return req

    def release(self, request_id: str) -> Request:
        """Forgets a finished request (its result has been read); returns it."""
        req = self.get(request_id)
        if req.status != Status.FINISHED:
            raise ValueError(f"request '{request_id}' is still {req.status.value}: only finished requests are released")
        del self.requests[req.id]
        self.finished.pop(req.id, None)
        return req

    def abort(self, request_id: str) -> Request:
        req = self.get(request_id)
        if req.status != Status.FINISHED:
            self._finish(req, "abort")
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, req: Request, reason: str) -> None:
        if req.status == Status.RUNNING:
            self.running.remove(req)
        elif req.status == Status.WAITING:
            self.waiting.remove(req)
        self._release(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        req.pending.clear()
        self._retire(req)

    def _release(self, req: Request) -> None:
        for page in reversed(req.pages):  # tail first: LRU evicts a prefix's end before its start
            self.alloc.release(page)
        req.pages, req.page_keys, req.num_computed, req.drafts = [], [], 0, []

    # ---- pages ------------------------------------------------------------------------------
    def _grow(self, req: Request, num_positions: int) -> bool:
        while len(req.pages) * self.page_size < num_positions:
            page = self.alloc.allocate()
            if page is None:
                return False
            req.pages.append(page)
        return True

    def _register_full_pages(self, req: Request) -> None:
        """Keys pages whose positions are all computed and whose tokens are all known."""
        c, known = self.page_size, req.known
        full = min(req.num_computed, len(known)) // c
        for i in range(len(req.page_keys), full):
            key = PageKey(req.page_keys[-1] if req.page_keys else None, tuple(known[i * c:(i + 1) * c]))
            req.page_keys.append(key)
            self.alloc.register(req.pages[i], key)

    def _prefix_hits(self, req: Request) -> None:
        """Points a fresh request's first pages at cached pages with the same token prefix."""
        c, known = self.page_size, req.known
        key = None
        if req.sampling.prompt_logprobs:  # a scored prompt is computed in full: cached pages carry no logits
            return
        for i in range((len(known) - 1) // c):  # at least one token is left to compute for logits
            key = PageKey(key, tuple(known[i * c:(i + 1) * c]))
            page = self.alloc.lookup(key)
            if page is None:
                break
            req.pages.append(page)
            req.page_keys.append(key)
        req.num_computed = len(req.pages) * c

    def requeue(self, plan: StepPlan) -> None:
        """Undoes a plan whose step never ran (its dispatch failed or was interrupted): every
        request it served goes back to the queue to recompute, keeping all it had produced."""
        for rp in plan.rows:
            req = self.requests.get(rp.request_id)
            if req is None:
                continue
            req.pending = collections.deque(p for p in req.pending if p[0] != plan.step_id)
            if req.status == Status.RUNNING:
                self._preempt(req, count=False)

    def reset(self) -> None:
        """Forgets every page (the device cache was lost): running requests recompute from the
        queue, pending tokens are dropped, the prefix cache starts empty."""
        for req in list(self.running):
            self._preempt(req, count=False)
        for req in self.requests.values():
            req.pending.clear()
        self.alloc = PageAllocator(self.alloc.num_pages, self.cfg.prefix_caching)

    def _preempt(self, victim: Request, count: bool = True) -> None:
        self.running.remove(victim)
        self._release(victim)
        victim.status = Status.WAITING
        victim.num_preemptions += count
        self.num_preemptions += count
        self.waiting.appendleft(victim)

    # ---- policy -----------------------------------------------------------------------------
    def _drafts_for(self, req: Request, step_id: int) -> list[int] | None:
        """k drafts to verify this step, or None (decode one token): the draft model's from the
        step just read, or an n-gram match; never past the context or the request's last token."""
        spec, k = self.cfg.speculative, self.num_drafts
        if (not k or req.pending or len(req.known) + k > self.max_model_len
                or req.sampling.max_new_tokens - req.num_generated < 2):
            return None
        if spec.method == "draft":
            return req.drafts if req.drafts and req.drafts_step == step_id - 1 else None
        return ngram_propose(req.known, k, spec.ngram_min, spec.ngram_max)

    def _room(self, req: Request, n: int, verify: bool) -> int:
        """Positions the row's pages must cover: its n tokens, and with a draft model the k
        proposals after its last new token (at most k + 1 past a verify row's start)."""
        need = req.num_computed + n
        if self.num_drafts and self.cfg.speculative.method == "draft":
            need = req.num_computed + (2 * self.num_drafts + 1 if verify else n + self.num_drafts)
        return min(need, self.max_pages_per_seq * self.page_size)

    def schedule(self) -> StepPlan | None:
        """Picks rows under the token budget: running requests first (decodes, verifies and
        continuing prefills, in admission order), then waiting ones (FCFS) while budget and pages last."""
        step_id, rows = self.pick()
        return self._plan(step_id, rows) if rows else None

    def pick(self) -> tuple[int, list[tuple[Request, int, list[int] | None]]]:
        """schedule()'s choice without the plan: (step id, [(request, tokens this step, drafts)])."""
        budget = self.cfg.max_num_batched_tokens
        step_id = next(self.step_ids)
        rows: list[tuple[Request, int, list[int] | None]] = []  # (request, tokens this step, drafts)
        num_prefill = num_verify = 0
        preempted = False
        for req in list(self.running):
            if req.status != Status.RUNNING or req.num_generated >= req.sampling.max_new_tokens:
                continue
            n = min(req.num_tokens - req.num_computed, budget, self.chunk_size)
            drafts = self._drafts_for(req, step_id) if n == 1 else None
            if drafts is not None and budget >= len(drafts) + 1 and num_verify < self.max_verify_rows:
                n = len(drafts) + 1
            else:
                drafts = None
            if n <= 0 or len(rows) >= self.max_rows or (n > 1 and not drafts and num_prefill >= self.max_prefill_rows):
                continue
            while not self._grow(req, self._room(req, n, drafts is not None)):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status != Status.RUNNING:
                continue
            rows.append((req, n, drafts))
            num_prefill += n > 1 and not drafts
            num_verify += drafts is not None
            budget -= n
        while self.waiting and not preempted and budget > 0 and len(rows) < self.max_rows:
            req = self.waiting[0]
            if req.pending:  # a preempted request's last token is still in flight
                break
            self._prefix_hits(req)
            n = min(len(req.known) - req.num_computed, budget, self.chunk_size)
            if (n > 1 and num_prefill >= self.max_prefill_rows) or not self._grow(req, self._room(req, n, False)):
                self._release(req)
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            if req.scheduled_time is None:
                req.scheduled_time = self.clock()
                req.num_cached_tokens = req.num_computed
            self.running.append(req)
            rows.append((req, n, None))
            num_prefill += n > 1
            budget -= n
        return step_id, rows

    def padding_plan(self, layout: Layout) -> StepPlan:
        """A plan of `layout` that computes nothing and writes nowhere (what warmup runs)."""
        return StepPlan(-1, layout, empty_arrays(layout, self.alloc.num_pages * self.page_size), [], 0, [])

    def layouts(self, scores: bool = False) -> list[Layout]:
        """Every step shape this configuration can reach (what Engine.warmup compiles): each row
        group's bucket, with the fewest real rows and tokens that land in it, must fit the row
        limit and the token budget together. `scores`: the scoring variant of each as well."""
        cfg, k = self.cfg, self.num_drafts

        def reachable(buckets, limit, low=1):  # (bucket, fewest real values in it) up to `limit`
            out, prev = [], 0
            for b in sorted(set(buckets)):
                if b and prev + 1 <= limit and max(prev + 1, low) <= b:
                    out.append((b, max(prev + 1, low)))
                prev = b
            return out

        rows, budget = self.max_rows, cfg.max_num_batched_tokens
        decode = [(0, 0)] + reachable(cfg.decode_row_buckets, rows)
        verify = [(0, 0)] + (reachable(self.verify_buckets, rows) if k else [])
        prefill = [(0, 0)] + reachable(cfg.prefill_row_buckets, min(rows, self.max_prefill_rows))
        chunks = reachable(cfg.chunk_buckets, min(self.chunk_size, budget), low=2)
        out = []
        for (bd, nd), (bv, nv), (bp, np_) in itertools.product(decode, verify, prefill):
            for tp, n in (chunks if bp else [(0, 0)]):
                real_rows, tokens = nd + nv + np_, nd + nv * (k + 1) + (max(np_ - 1, 0) * 2 + n if np_ else 0)
                if 0 < real_rows <= rows and tokens <= budget:
                    out += [Layout(bd, bv, bp, tp, w, k, sc) for w in self.table_buckets for sc in {False, scores}]
        return out

    @staticmethod
    def _groups(rows):
        decode = [r for r in rows if r[1] == 1]
        verify = [r for r in rows if r[2] is not None]
        return decode, verify, [r for r in rows if r[1] > 1 and r[2] is None]

    def layout_for(self, rows: list[tuple[Request, int, list[int] | None]]) -> Layout:
        """The smallest step shape (each group's bucket) that holds `rows`."""
        cfg = self.cfg
        decode, verify, prefill = self._groups(rows)
        tp = bucket(max(n for _, n, _ in prefill), cfg.chunk_buckets, "chunk") if prefill else 0
        return Layout(
            num_decode_rows=bucket(len(decode), cfg.decode_row_buckets, "decode rows"),
            num_verify_rows=bucket(len(verify), self.verify_buckets, "verify rows") if verify else 0,
            num_prefill_rows=bucket(len(prefill), cfg.prefill_row_buckets, "prefill rows"), chunk=tp,
            table_width=bucket(max((len(r.pages) for r, _, _ in rows), default=1), self.table_buckets, "pages per row"),
            num_drafts=self.num_drafts,
            scores=any(r.sampling.prompt_logprobs or r.sampling.top_logprobs for r, _, _ in rows))

    def _plan(self, step_id: int, rows: list[tuple[Request, int, list[int] | None]], layout: Layout | None = None
              ) -> StepPlan:
        """The plan of `rows` in `layout` (default: layout_for(rows); a larger one pads more)."""
        c = self.page_size
        decode, verify, prefill = self._groups(rows)
        layout = layout or self.layout_for(rows)
        a = empty_arrays(layout, pad_slot=self.alloc.num_pages * c)
        placed = []
        for group, members in zip(("decode", "verify", "prefill"), (decode, verify, prefill)):
            g = next((g for g in layout.groups if g.name == group), None)
            for j, (req, n, drafts) in enumerate(members):
                row, first = g.first_row + j, g.first_token + j * g.query_len
                placed.append(self._place(a, req, n, drafts, row, first, step_id))
        freed, self.alloc.newly_freed = self.alloc.newly_freed, []
        return StepPlan(step_id, layout, a, placed, sum(n for _, n, _ in rows), freed)

    def _place(self, a: dict, req: Request, n: int, drafts, row: int, first: int, step_id: int) -> RowPlan:
        """Writes one row's entries into the plan's arrays."""
        c = self.page_size
        start, known = req.num_computed, req.known
        pos = np.arange(start, start + n)
        a["positions"][first:first + n] = pos
        a["slots"][first:first + n] = np.asarray(req.pages)[pos // c] * c + pos % c
        have = max(0, min(n, len(known) - start))  # tokens known on the host
        a["tokens"][first:first + have] = known[start:start + have]
        if req.sampling.prompt_logprobs:  # score each prompt token against the position before it
            scored = pos[pos + 1 < len(req.prompt)]
            a["targets"][first:first + len(scored)] = np.asarray(req.prompt)[scored + 1]
        if drafts is not None:
            a["tokens"][first + 1:first + n] = drafts
            a["draft_src"][row] = req.draft_row if self.cfg.speculative.method == "draft" else -1
        elif have < n:  # only a decode row's one token can be in flight: last step sampled it
            a["prev_index"][first + have] = req.pending[-1][1]
        a["block_table"][row, : len(req.pages)] = req.pages
        a["num_row_pages"][row] = len(req.pages)
        a["kv_lens"][row] = start + n
        a["logits_index"][row] = first if drafts is not None else first + n - 1
        a["sample_step"][row] = req.num_generated
        for key in SAMPLING_FIELDS:
            a[key][row] = getattr(req.sampling, key)
        req.num_computed = start + n
        samples = drafts is not None or req.num_computed == req.num_tokens
        if samples:
            req.pending.append((step_id, row))
        return RowPlan(req.id, row, samples, 0 if drafts is None else len(drafts))

    def update(self, plan: StepPlan, out: StepOutput) -> list[Request]:
        """Takes a finished step's results (1..k+1 tokens per sampling row); returns the requests
        that got tokens."""
        now = self.clock()
        touched = []
        for rp in plan.rows:
            req = self.requests.get(rp.request_id)
            if req is None or req.status == Status.FINISHED:
                continue
            if out.scores is not None and req.sampling.prompt_logprobs:
                self._take_prompt_scores(req, plan, rp.row, out.scores)
            if not rp.samples:
                if req.status == Status.RUNNING:
                    self._register_full_pages(req)
                continue
            assert req.pending and req.pending[0] == (plan.step_id, rp.row), (req.id, req.pending, plan.step_id, rp.row)
            req.pending.popleft()
            n = int(out.num_new[rp.row])
            if rp.num_drafts:  # rejected drafts' positions are simply overwritten later
                req.num_computed -= rp.num_drafts + 1 - n
                req.num_verify_steps += 1
                req.num_proposed += rp.num_drafts
                req.num_accepted += n - 1
                req.accepted_at = (req.accepted_at or [0] * rp.num_drafts)
                for j in range(n - 1):
                    req.accepted_at[j] += 1
            if out.drafts is not None:
                req.drafts, req.drafts_step, req.draft_row = out.drafts[rp.row].tolist(), plan.step_id, rp.row
            touched.append(req)
            for j in range(n):
                top = None
                if out.scores is not None and req.sampling.top_logprobs:
                    top = self._top(out.scores, int(plan.arrays["logits_index"][rp.row]) + j, req.sampling.top_logprobs)
                self._append(req, int(out.tokens[rp.row, j]), float(out.logprobs[rp.row, j]), now, top)
                if req.status == Status.FINISHED:
                    break
            if req.status == Status.RUNNING and self.num_drafts:
                self._trim(req)
        return touched

    @staticmethod
    def _top(scores, index: int, n: int) -> list[tuple[int, float]]:
        return list(zip(scores.top_ids[index, :n].tolist(), scores.top_logprobs[index, :n].tolist()))

    def _take_prompt_scores(self, req: Request, plan: StepPlan, row: int, scores) -> None:
        """Copies a scored row's prompt logprobs (flat tokens with a target) into the request."""
        g = next(g for g in plan.layout.groups if g.first_row <= row < g.first_row + g.num_rows)
        first = g.first_token + (row - g.first_row) * g.query_len
        for i in range(first, first + g.query_len):
            if plan.arrays["targets"][i] >= 0:
                p = int(plan.arrays["positions"][i]) + 1
                req.prompt_logprobs[p] = float(scores.target_logprobs[i])
                req.prompt_top[p] = self._top(scores, i, req.sampling.top_logprobs)

    def _append(self, req: Request, tok: int, logprob: float, now: float, top=None) -> None:
        req.output.append(tok)
        req.known.append(tok)
        req.logprobs.append(logprob)
        if top is not None:
            req.top_logprobs.append(top)
        req.token_times.append(now)
        if req.status == Status.RUNNING:  # before finishing: its pages serve later prefixes
            self._register_full_pages(req)
        if tok in req.stop_ids:
            self._finish(req, "stop")
        elif len(req.output) >= req.sampling.max_new_tokens or len(req.known) >= self.max_model_len:
            self._finish(req, "length")

    def _trim(self, req: Request) -> None:
        """Frees pages wholly past what the next step reads: the known tokens and, with a draft
        model, the KV of the proposals it just made (the last known token and k - 1 drafts)."""
        ahead = self.num_drafts - 1 if self.cfg.speculative.method == "draft" else 0
        keep = -(-(len(req.known) + ahead) // self.page_size)
        while len(req.pages) > keep:
            self.alloc.release(req.pages.pop())

    def finish(self, request_id: str, reason: str) -> None:
        """Ends a request from outside the policy (e.g. a stop string matched by the engine)."""
        req = self.get(request_id)
        if req.status != Status.FINISHED:
            self._finish(req, reason)


class _Pages:
    """The shards' page allocators seen as one (what metrics read): refcounts by global page id."""

    def __init__(self, shards: list[Scheduler]):
        self._shards = shards

    @property
    def num_pages(self) -> int:
        return sum(s.alloc.num_pages for s in self._shards)

    @property
    def refcount(self) -> np.ndarray:
        return np.concatenate([s.alloc.refcount for s in self._shards])


class ShardedScheduler:
    """HOST ONLY. Data parallelism: one Scheduler per shard of the `data` mesh axis, each with its
    own pages (shard d owns global pages [d * P, (d + 1) * P)), token budget and row limits, and a
    router that sends a new request to the least-loaded shard (among those as loaded, the one
    holding the longest cached prefix of its prompt). Each step, every shard picks its rows; the
    step's layout is the union of theirs, so one executable serves all shards (step.py runs each
    shard's part as a step of its own). Request ids are unique over the shards; everything else
    speaks Scheduler's interface."""

    def __init__(self, cfg: EngineConfig, num_shards: int, pages_per_shard: int, max_model_len: int,
                 clock=time.perf_counter):
        self.cfg, self.clock = cfg, clock
        self.shards = [Scheduler(cfg, pages_per_shard, max_model_len, clock) for _ in range(num_shards)]
        self.pages_per_shard = pages_per_shard
        self.verify_buckets, self.max_rows = self.shards[0].verify_buckets, self.shards[0].max_rows
        self._ids = itertools.count()
        self.alloc = _Pages(self.shards)

    # ---- Scheduler's interface over the shards ----------------------------------------------
    @property
    def waiting(self) -> list[Request]:
        return [r for s in self.shards for r in s.waiting]

    @property
    def running(self) -> list[Request]:
        return [r for s in self.shards for r in s.running]

    @property
    def requests(self) -> collections.ChainMap:
        return collections.ChainMap(*(s.requests for s in self.shards))

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.shards)

    @property
    def num_dropped_unread(self) -> int:
        return sum(s.num_dropped_unread for s in self.shards)

    def shard_of(self, request_id: str) -> Scheduler:
        for s in self.shards:
            if str(request_id) in s.requests:
                return s
        return self.shards[0]  # its get() raises UnknownRequest, saying why

    def get(self, request_id: str) -> Request:
        return self.shard_of(request_id).get(request_id)

    def release(self, request_id: str) -> Request:
        return self.shard_of(request_id).release(request_id)

    def abort(self, request_id: str) -> Request:
        return self.shard_of(request_id).abort(request_id)

    def finish(self, request_id: str, reason: str) -> None:
        self.shard_of(request_id).finish(request_id, reason)

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.shards)

    def reset(self) -> None:
        for s in self.shards:
            s.reset()

    def add(self, prompt: list[int], sampling: SamplingConfig, stop_ids=(), request_id: str | None = None,
            arrival: float | None = None, keep: bool = False) -> Request:
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.requests:
            raise ValueError(f"request id '{rid}' is already in use")
        return self.route(prompt).add(prompt, sampling, stop_ids, rid, arrival, keep)

    def route(self, prompt: list[int]) -> Scheduler:
        """The least-loaded shard (requests queued or running); among equals, the longest cached prefix."""
        def load(s):
            return len(s.waiting) + len(s.running)

        least = min(load(s) for s in self.shards)
        return max((s for s in self.shards if load(s) == least), key=lambda s: self._cached_pages(s, prompt))

    def _cached_pages(self, s: Scheduler, prompt: list[int]) -> int:
        c, key, n = s.page_size, None, 0
        if not self.cfg.prefix_caching:
            return 0
        for i in range((len(prompt) - 1) // c):
            key = PageKey(key, tuple(prompt[i * c:(i + 1) * c]))
            if key not in s.alloc.by_key:
                break
            n += 1
        return n

    # ---- steps ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        picks = [s.pick() for s in self.shards]  # every shard counts every step: their step ids agree
        busy = [(s, rows) for s, (_, rows) in zip(self.shards, picks) if rows]
        if not busy:
            return None
        layout = busy[0][0].layout_for(busy[0][1])
        for s, rows in busy[1:]:
            layout = layout.union(s.layout_for(rows))
        plans = [s._plan(step_id, rows, layout) for s, (step_id, rows) in zip(self.shards, picks)]
        return self._combine(plans)

    def _combine(self, plans: list[StepPlan]) -> StepPlan:
        p = self.pages_per_shard
        freed = [d * p + page for d, plan in enumerate(plans) for page in plan.freed_pages]
        return StepPlan(plans[0].step_id, plans[0].layout, {}, [r for plan in plans for r in plan.rows],
                        sum(plan.num_tokens for plan in plans), freed, shards=plans)

    def padding_plan(self, layout: Layout) -> StepPlan:
        return self._combine([s.padding_plan(layout) for s in self.shards])

    def requeue(self, plan: StepPlan) -> None:
        for s, sub in zip(self.shards, plan.shards):
            s.requeue(sub)

    def update(self, plan: StepPlan, out: StepOutput) -> list[Request]:
        """Shard d's rows are rows [d * R, (d + 1) * R) of the step's outputs, its scores tokens
        [d * N, (d + 1) * N)."""
        r, n = len(out.num_new) // len(self.shards), plan.layout.num_tokens
        touched = []
        for d, (s, sub) in enumerate(zip(self.shards, plan.shards)):
            rows = slice(d * r, (d + 1) * r)
            scores = None if out.scores is None else Scores(*(a[d * n:(d + 1) * n] for a in dataclasses.astuple(out.scores)))
            touched += s.update(sub, StepOutput(out.tokens[rows], out.num_new[rows], out.logprobs[rows],
                                                None if out.drafts is None else out.drafts[rows], scores))
        return touched

    def layouts(self, scores: bool = False) -> list[Layout]:
        """Every union of as many shards' layouts as there are shards (what warmup compiles)."""
        one = self.shards[0].layouts(scores)
        out = set(one)
        for _ in range(len(self.shards) - 1):
            grown = {a.union(b) for a in out for b in one} | out
            if grown == out:
                break
            out = grown
        return sorted(out, key=dataclasses.astuple)
