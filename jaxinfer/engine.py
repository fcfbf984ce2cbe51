"""The engine: the one loop where the host scheduler and the jitted step meet.

Each `step()` plans with the scheduler, uploads the plan as two buffers, dispatches the
jitted step asynchronously and only then reads the *previous* step's tokens, so the device is
never idle while the host does its bookkeeping (`engine.async_scheduling`; off = read at once;
with speculation on, each step is read before the next is planned: its kept count decides it).

Threads and interrupts: one thread steps at a time (`step`, `generate`, `stream`,
`run_until_done`; a concurrent second caller gets `EngineBusy`); `add_request`, `abort` and
`completion` are safe from any thread. Host bookkeeping runs with SIGINT held, so Ctrl-C lands
only where the state is whole: while waiting for the device, with the launched steps still queued
to be read. An interrupted `generate`/`stream` aborts its own requests; the engine stays usable.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import sharding
from jaxinfer.cache import PagedKVCache
from jaxinfer.config import EngineConfig, RunConfig, SamplingConfig
from jaxinfer.generate import cut_at_stop_string
from jaxinfer.messages import Scores, StepOutput, StepPlan, pack_plan
from jaxinfer.models import Model, dtype_of
from jaxinfer.scheduler import Request, Scheduler, ShardedScheduler, Status, bucket, check_token_ids, validate
from jaxinfer.step import compile_step, poison_pages


class EngineBusy(RuntimeError):
    """step() was called while another thread is stepping the same engine."""


@contextlib.contextmanager
def interrupts_held():
    """Holds SIGINT for the block (main thread only; elsewhere Python delivers none) and
    delivers it after, so an interrupt never lands halfway through the host's bookkeeping."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, caught[0])
        elif caught and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


@dataclasses.dataclass
class Completion:
    """One request's result. Times are seconds on the engine's clock (time.perf_counter)."""

    request_id: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str | None
    finish_reason: str  # stop | length | abort | error
    logprobs: list[float] | None
    error: str | None
    arrival: float
    scheduled: float | None
    token_times: list[float]
    num_cached_tokens: int
    num_preemptions: int
    seed: int | None = None  # the sampling seed it ran with: pass it back to repeat the request
    # Speculative decoding: verify steps, drafts proposed and accepted, and accepted per draft position.
    num_verify_steps: int = 0
    num_proposed: int = 0
    num_accepted: int = 0
    accepted_at: list[int] = dataclasses.field(default_factory=list)
    # sampling.top_logprobs: the top alternatives [(id, logprob)] at each generated token;
    # sampling.prompt_logprobs: each prompt token's logprob (None at position 0) and alternatives.
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """Drafts accepted / proposed (None: it never verified drafts)."""
        return self.num_accepted / self.num_proposed if self.num_proposed else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens per verify step: accepted drafts + the correction or bonus token."""
        return (self.num_accepted + self.num_verify_steps) / self.num_verify_steps if self.num_verify_steps else None


@dataclasses.dataclass
class StepRecord:
    """Per-step accounting for metrics: host time excludes the wait for the device."""

    start: float
    end: float
    wait_s: float  # blocked reading tokens back
    num_tokens: int
    num_rows: int
    pages_used: int
    live_tokens: int


def num_pages_for(cfg: EngineConfig, model: Model, max_model_len: int, num_shards: int = 1) -> int:
    """Pages per shard of the `data` axis: engine.num_pages split evenly, or a fraction of one
    device's free memory, or room for max_num_seqs full requests (max_num_seqs is per shard)."""
    if cfg.num_pages is not None:
        if cfg.num_pages % num_shards:
            raise ValueError(f"engine.num_pages={cfg.num_pages} does not split over the mesh's {num_shards} data "
                             f"shards (each owns an equal share); use a multiple of {num_shards}, e.g. "
                             f"{cfg.num_pages // num_shards * num_shards or num_shards}")
        return cfg.num_pages // num_shards
    c, m = cfg.page_size, model.cfg
    per_page = page_bytes(cfg, model)
    if cfg.kv_cache_bytes is not None:
        return cfg.kv_cache_bytes // per_page
    if cfg.kv_memory_fraction > 0:
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            raise ValueError(f"engine.kv_memory_fraction={cfg.kv_memory_fraction}: {jax.devices()[0].platform} "
                             "reports no memory limit; set engine.num_pages or engine.kv_cache_bytes instead")
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return int(free * cfg.kv_memory_fraction) // per_page
    return cfg.max_num_seqs * -(-max_model_len // c)


def kv_dtype(cfg: EngineConfig, model: Model):
    """The KV pages' dtype: a float dtype, or the name of a quantized format (cache.QUANTIZED_KV)."""
    if cfg.kv_cache_dtype == "auto":
        return dtype_of(model.cfg.dtype)
    return dtype_of(cfg.kv_cache_dtype) if cfg.kv_cache_dtype in ("bfloat16", "float32") else cfg.kv_cache_dtype


def page_bytes(cfg: EngineConfig, model: Model) -> int:
    """Bytes of one KV page of every layer (k and v; quantized pages with their float32 scales)."""
    from jaxinfer.cache import QUANTIZED_KV

    m, dt = model.cfg, kv_dtype(cfg, model)
    value = jnp.dtype(QUANTIZED_KV[dt] if isinstance(dt, str) else dt).itemsize
    return 2 * m.num_layers * m.num_kv_heads * cfg.page_size * (m.head_dim * value + (4 if isinstance(dt, str) else 0))


class Engine:
    def __init__(self, model: Model, tokenizer=None, cfg: EngineConfig = EngineConfig(), stop_ids=None,
                 clock=time.perf_counter, draft: Model | None = None):
        """stop_ids: default stop ids of every request; None = the model's own (its folder's
        generation_config.json) and the tokenizer's EOS. draft: the draft model of
        `engine.speculative.method: draft` (Engine.from_config loads engine.speculative.draft_model)."""
        self.model, self.tokenizer, self.cfg, self.clock = model, tokenizer, cfg, clock
        self.num_drafts = cfg.speculative.num_drafts
        if cfg.speculative.method == "draft" and draft is None:
            raise ValueError("engine.speculative.method='draft' needs a draft model: Engine(..., draft=model), or "
                             "Engine.from_config, which loads engine.speculative.draft_model")
        if draft is not None and cfg.speculative.method != "draft":
            raise ValueError(f"a draft model was given but engine.speculative.method='{cfg.speculative.method}'; "
                             "set it to 'draft'")
        if draft is not None and draft.cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                             f"({model.cfg.vocab_size}): a draft must share the target's tokenizer")
        self.draft = draft
        self.default_stop_ids = tuple(dict.fromkeys(
            model.cfg.stop_ids + (tuple(tokenizer.eos_ids) if tokenizer else ()))) if stop_ids is None else tuple(stop_ids)
        self.max_model_len = min(cfg.max_model_len, model.cfg.max_position_embeddings)
        # Data parallelism: each shard of the mesh's `data` axis serves its own requests from its own pages.
        self.num_shards = cfg.mesh[0] if cfg.mesh else 1
        pages_per_shard = num_pages_for(cfg, model, self.max_model_len, self.num_shards)
        if pages_per_shard <= 0:
            why = (f"engine.kv_cache_bytes={cfg.kv_cache_bytes}" if cfg.kv_cache_bytes is not None else
                   f"engine.kv_memory_fraction={cfg.kv_memory_fraction}")
            raise ValueError(f"{why} gives {pages_per_shard} KV pages of {page_bytes(cfg, model)} bytes: the cache "
                             "needs at least one; raise it or set engine.num_pages")
        self.num_pages = num_pages = pages_per_shard * self.num_shards
        self.params, self.mesh, self._out_shardings, self._batch_sharding = model.params, None, None, None
        self.draft_params = None if draft is None else draft.params
        if tuple(cfg.mesh) != (1, 1):
            self.mesh = sharding.make_mesh(*cfg.mesh, model_cfg=model.cfg)
            self.params = jax.device_put(model.params, sharding.param_shardings(model.params, self.mesh))
            rep = sharding.replicated(self.mesh)
            # the plan's buffers: shard d's part to the devices of data shard d (all of them with one shard)
            self._batch_sharding = sharding.over_data(self.mesh)
            draft_s = None
            if draft is not None:
                self.draft_params = jax.device_put(draft.params, sharding.param_shardings(draft.params, self.mesh))
                draft_s = (sharding.cache_sharding(self._zero_cache(draft), self.mesh), self._batch_sharding)
            self._out_shardings = (sharding.cache_sharding(self._zero_cache(), self.mesh), draft_s, rep, rep, rep, rep, rep,
                                   rep)
        # Several processes (jaxinfer.distributed): process 0 plans, every process runs the step.
        self._channel, self.is_leader, self._closed = None, jax.process_index() == 0, False
        if jax.process_count() > 1:
            if self.mesh is None:
                raise ValueError(f"{jax.process_count()} processes share this engine but engine.mesh is (1, 1): "
                                 f"set it to span all {jax.device_count()} devices, e.g. (1, {jax.device_count()})")
            from jaxinfer.distributed import PlanChannel

            self._channel = PlanChannel()
        if cfg.fixed_table_width is None:
            cfg = self.cfg = dataclasses.replace(cfg, fixed_table_width=jax.default_backend() != "cpu")
        self.scheduler = (Scheduler(cfg, num_pages, self.max_model_len, clock) if self.num_shards == 1 else
                          ShardedScheduler(cfg, self.num_shards, pages_per_shard, self.max_model_len, clock))
        self.num_out_rows = (max(cfg.decode_row_buckets) + max(cfg.prefill_row_buckets)  # per shard
                             + (max(self.scheduler.verify_buckets) if self.num_drafts else 0))
        self._init_device_state()
        self._param_leaves, self._param_def = jax.tree.flatten(self.params)
        self._draft_leaves, self._draft_def = (None, None) if draft is None else jax.tree.flatten(self.draft_params)
        self._step = compile_step(self.model.graphdef, self._param_def, cfg.attention_impl, self._out_shardings,
                                  None if draft is None else draft.graphdef, self._draft_def, cfg.max_top_logprobs,
                                  self.mesh if self.num_shards > 1 else None)
        self._inflight: collections.deque[tuple[StepPlan, tuple]] = collections.deque()
        self.records: collections.deque[StepRecord] = collections.deque(maxlen=cfg.max_step_records)
        self._lock = threading.RLock()  # the scheduler's state: any thread
        self._stepping = threading.Lock()  # one stepping thread at a time

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "Engine":
        from jaxinfer.checkpoint import build, load_draft

        model, tok, stops, _ = build(cfg)
        return cls(model, tok, cfg.engine, stops, draft=load_draft(cfg, model, tok))

    # ---- requests -------------------------------------------------------------------------------
    def _prepare(self, prompt: str | list[int], sampling: SamplingConfig, stop_ids, what: str = "prompt"):
        """(token ids, sampling, stop ids) checked, or ValueError: nothing is queued."""
        validate(sampling)
        if sampling.top_logprobs > self.cfg.max_top_logprobs:
            raise ValueError(f"sampling.top_logprobs={sampling.top_logprobs} exceeds engine.max_top_logprobs="
                             f"{self.cfg.max_top_logprobs} (a static shape of the scoring step); raise it or ask for fewer")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{what} is text but this engine has no tokenizer: pass token ids, or "
                                 "Engine(model, tokenizer)")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = check_token_ids(prompt, self.model.cfg.vocab_size, what)
        if sampling.stop and self.tokenizer is None:
            raise ValueError(f"sampling.stop={list(sampling.stop)}: stop strings need a tokenizer to read the "
                             "text; use stop ids, or Engine(model, tokenizer)")
        stops = self.default_stop_ids if stop_ids is None else tuple(int(i) for i in stop_ids)
        return ids, sampling, stops

    def add_request(self, prompt: str | list[int], sampling: SamplingConfig = SamplingConfig(),
                    request_id: str | None = None, stop_ids=None, arrival: float | None = None) -> str:
        """Queues a request (text needs a tokenizer); returns its id. Bad input raises and queues
        nothing; a request that can never fit (context, cache) is finished at once with `error` set."""
        ids, sampling, stops = self._prepare(prompt, sampling, stop_ids)
        with self._lock:
            return self.scheduler.add(ids, sampling, stops, request_id, arrival).id

    def abort(self, request_id: str) -> None:
        """Ends a request (finish reason `abort`) and frees its pages; unknown ids raise UnknownRequest."""
        with self._lock:
            self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._inflight)

    # ---- the loop -------------------------------------------------------------------------------
    def _dispatch(self, plan: StepPlan):
        if self._closed:
            raise RuntimeError("this engine was closed (Engine.close): the other processes no longer follow it")
        ints, floats = pack_plan(plan)
        freed = plan.freed_pages if self.cfg.debug_poison_freed_pages else []
        if self._channel is not None:  # the other processes run the same step (jaxinfer.distributed)
            self._channel.send("step", plan.layout, ints, floats, freed)
        return plan, self._run(plan.layout, ints, floats, freed)

    def _run(self, layout, ints, floats, freed) -> tuple:
        """Dispatches the step of a packed plan; -> its outputs (still on device)."""
        self._last_layout = layout
        if self._channel is not None:  # every process holds the same buffers: each places its own part
            ints, floats = (jax.make_array_from_callback(a.shape, self._batch_sharding, lambda i, a=a: a[i])
                            for a in (ints, floats))
        elif self.mesh is not None:  # laid out on the mesh; one device takes numpy straight (~0.1 ms less)
            ints, floats = jax.device_put((ints, floats), self._batch_sharding)
        if freed:
            pages = np.full(bucket(len(freed), (2 ** i for i in range(31)), "pages"), self.cache.num_pages, np.int32)
            pages[: len(freed)] = freed
            self.cache = poison_pages(self.cache, pages)
            if self._draft_state is not None:
                self._draft_state = (poison_pages(self._draft_state[0], pages), self._draft_state[1])
        self.cache, self._draft_state, self._prev, *out = self._step(
            self._param_leaves, self.cache, ints, floats, self._prev, self._draft_leaves, self._draft_state,
            layout=layout)
        return tuple(out)

    # ---- several processes (jaxinfer.distributed) -----------------------------------------------
    def follow(self) -> int:
        """Every process but 0: runs each step process 0 sends, until it closes the engine
        (Engine.close); -> the number of steps run. Raises if process 0 is lost."""
        if self._channel is None or self.is_leader:
            raise RuntimeError("Engine.follow() is for processes other than 0 of a jax.distributed job "
                               "(jaxinfer.distributed.initialize); process 0 steps the engine")
        num_steps, last = 0, None
        while True:
            kind, payload = self._channel.recv()
            if kind == "stop":
                return num_steps
            if kind == "reset":
                self._init_device_state()
                continue
            out = self._run(*payload)
            if last is not None:  # surfaces a failed step here, and keeps at most two in flight
                jax.block_until_ready(last)
            last, num_steps = out, num_steps + 1

    def close(self) -> None:
        """Process 0 of several: releases the followers (their Engine.follow returns). Idempotent;
        nothing to do for one process."""
        if self._channel is None or not self.is_leader or self._closed:
            return
        with self._stepping:  # after a step another thread may be running
            self._channel.send("stop")
            self._closed = True

    def step_hlo(self, layout=None) -> str:
        """The compiled step's optimized HLO for `layout` (default: the last one dispatched), e.g.
        to check what a step really reads; compiles it if this layout has not run yet."""
        from jaxinfer.messages import buffer_sizes

        layout = layout or getattr(self, "_last_layout", None)
        if layout is None:
            raise ValueError("step_hlo: no step has run yet; pass a layout (messages.Layout) or generate first")
        num_ints, num_floats = buffer_sizes(layout)

        def spec(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))
        args = jax.tree.map(spec, (self._param_leaves, self.cache))
        batch = self._batch_sharding if self.mesh is not None else None
        args += (jax.ShapeDtypeStruct((num_ints * self.num_shards,), np.int32, sharding=batch),
                 jax.ShapeDtypeStruct((num_floats * self.num_shards,), np.float32, sharding=batch))
        args += jax.tree.map(spec, (self._prev, self._draft_leaves, self._draft_state))
        return self._step.lower(*args, layout=layout).compile().as_text()

    def _launch(self, plan: StepPlan) -> None:
        try:
            self._inflight.append(self._dispatch(plan))
        except BaseException:
            self.scheduler.requeue(plan)  # the step never ran: its requests recompute
            if self.cache.k.is_deleted():  # donated to a call that failed
                self._reset_device_state()
            raise

    def _collect(self) -> tuple[list[Request], float]:
        """Reads the oldest launched step and hands its tokens to the scheduler. The wait is the
        one place an interrupt lands: the step stays queued and the next call reads it."""
        plan, out = self._inflight[0]
        t0 = self.clock()
        try:
            tokens, num_new, logprobs, drafts, scores = self._read(*out)
        except Exception:  # the device step failed: its outputs, the cache included, are lost
            with self._lock, interrupts_held():
                self._reset_device_state()
            raise
        wait = self.clock() - t0
        with self._lock, interrupts_held():
            touched = self.scheduler.update(plan, StepOutput(tokens, num_new, logprobs,
                                                             drafts if self.draft is not None else None,
                                                             Scores(*scores) if plan.layout.scores else None))
            self._inflight.popleft()
            self._check_stop_strings(touched)
        return touched, wait

    def _zero_cache(self, model: Model | None = None) -> PagedKVCache:
        model = model or self.model
        m = model.cfg
        return PagedKVCache.zeros(m.num_layers, m.num_kv_heads, self.num_pages, self.cfg.page_size, m.head_dim,
                                  kv_dtype(self.cfg, model))

    def kv_cache_info(self) -> dict:
        """What the allocated KV pool is: its dtype (as stored), bytes, pages and tokens it holds."""
        c = self.cache
        return {"kv_cache_dtype": self.cfg.kv_cache_dtype, "stored_dtype": str(c.k.dtype), "scales": c.quantized,
                "bytes": c.nbytes, "num_pages": c.num_pages, "tokens": c.num_pages * c.page_size,
                "bytes_per_token": c.nbytes / (c.num_pages * c.page_size)}

    def _init_device_state(self) -> None:
        """The KV cache and the previous-step token buffer, zeroed (and laid out on the mesh)."""
        cache = self._zero_cache()
        self.cache = cache if self.mesh is None else jax.device_put(cache, self._out_shardings[0])
        self._prev = jax.device_put(jnp.zeros(self.num_out_rows * self.num_shards, jnp.int32), self._batch_sharding)
        self._draft_state = None
        if self.draft is not None:  # its cache, and the probabilities of the last proposals [Rmax, k, V]
            state = (self._zero_cache(self.draft),
                     jnp.zeros((self.num_out_rows * self.num_shards, self.num_drafts, self.model.cfg.vocab_size),
                               jnp.float32))
            self._draft_state = state if self.mesh is None else jax.device_put(state, self._out_shardings[1])

    @staticmethod
    def _read(*arrays) -> tuple:
        """Waits for the device and copies `arrays` (and tuples of them) to the host. Outputs are
        replicated: with several processes, the local copy is the whole array."""
        def host(x):
            return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))
        return tuple(jax.tree.map(host, a) for a in arrays)

    def _reset_device_state(self) -> None:
        """After a lost step (its cache with it): every unfinished request recomputes from a fresh cache."""
        if self._channel is not None:
            self._channel.send("reset")
        self._inflight.clear()
        self.scheduler.reset()
        self._init_device_state()

    def _check_stop_strings(self, touched: list[Request]) -> None:
        for req in touched:
            if req.sampling.stop and req.status != Status.FINISHED and self.tokenizer is not None:
                text = self.tokenizer.decode(req.output)
                if any(s in text for s in req.sampling.stop):
                    self.scheduler.finish(req.id, "stop")

    def step(self) -> list[Request]:
        """One iteration: plan and dispatch a step, then read the previous one. Returns the
        requests that received a token. Raises EngineBusy if another thread is stepping."""
        if not self.is_leader:
            raise RuntimeError(f"process {jax.process_index()} follows process 0, which steps the engine: call "
                               "Engine.follow() here")
        if not self._stepping.acquire(blocking=False):
            raise EngineBusy("Engine.step() is already running in another thread: one thread steps an engine "
                             "(add_request/abort/completion are safe from any thread)")
        try:
            start = self.clock()
            with self._lock, interrupts_held():
                plan = self.scheduler.schedule()
                if plan is not None:
                    self._launch(plan)
            touched, wait = [], 0.0
            # Speculative rows need the step's accepted count before the next plan: no read-behind.
            keep = 1 if self.cfg.async_scheduling and plan is not None and not self.num_drafts else 0
            while len(self._inflight) > keep:
                got, waited = self._collect()
                touched, wait = touched + got, wait + waited
            if plan is not None:
                with self._lock:
                    alloc = self.scheduler.alloc
                    live = sum(r.num_computed for r in self.scheduler.running)
                    self.records.append(StepRecord(start, self.clock(), wait, plan.num_tokens, len(plan.rows),
                                                   int((alloc.refcount > 0).sum()), live))
            return touched
        finally:
            self._stepping.release()

    def warmup(self, progress: bool = True, scores: bool = False) -> dict:
        """Compiles every step shape the configuration can reach (Scheduler.layouts), so none
        compiles in the middle of traffic. Each runs once on an all-padding plan, which writes
        nothing. -> {"num_layouts", "num_executables", "compile_s"}. Needs an idle engine.
        The count grows with every bucket list (engine.*_buckets) and table width: the default
        config reaches ~1,000 shapes on CPU and ~130 with fixed_table_width; size them to fit.
        `scores`: also the scoring variant of each (requests with prompt_logprobs or top_logprobs)."""
        with self._lock:
            if self.has_work():
                raise RuntimeError("Engine.warmup() needs an idle engine: call it before adding requests")
            layouts = self.scheduler.layouts(scores)
        t0 = time.perf_counter()
        from tqdm import tqdm

        for layout in tqdm(layouts, desc="Engine.warmup", unit="shape", leave=False, disable=not progress):
            _, out = self._dispatch(self.scheduler.padding_plan(layout))
            self._read(*out)
        return {"num_layouts": len(layouts), "num_executables": self.num_executables,
                "compile_s": time.perf_counter() - t0}

    @property
    def num_executables(self) -> int:
        """Step executables compiled for this engine's model structure (shared by engines over it);
        -1 where this jax does not say (`_cache_size` is jit's own count)."""
        return getattr(self._step, "_cache_size", lambda: -1)()

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def _finished(self, request_id: str) -> bool:
        with self._lock:
            return self.scheduler.get(request_id).status == Status.FINISHED

    @contextlib.contextmanager
    def _owning(self, ids: list[str]):
        """Aborts (and releases) these requests if the caller leaves early: an exception, Ctrl-C,
        or a stream closed before its end. Nothing of theirs runs unseen in a later call."""
        try:
            yield
        except BaseException:
            with self._lock:
                for rid in ids:
                    if rid in self.scheduler.requests:
                        self.scheduler.abort(rid)
                        self.scheduler.release(rid)
            raise

    # ---- offline API ----------------------------------------------------------------------------
    def _enqueue_all(self, prompts, sampling, stop_ids) -> list[str]:
        """Checks every prompt first, then queues them all: a bad one queues none."""
        configs = sampling if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(configs) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(configs)} sampling configs: pass one config, "
                             "or one per prompt")
        ready = [self._prepare(p, s, stop_ids, f"prompt {i}") for i, (p, s) in enumerate(zip(prompts, configs))]
        with self._lock:
            return [self.scheduler.add(ids, s, stops, keep=True).id for ids, s, stops in ready]

    def generate(self, prompts: list[str | list[int]], sampling: SamplingConfig | list[SamplingConfig] = SamplingConfig(),
                 stop_ids=None) -> list[Completion]:
        """Runs every prompt to completion; results in prompt order (and released)."""
        ids = self._enqueue_all(prompts, sampling, stop_ids)
        with self._owning(ids):
            while not all(self._finished(i) for i in ids):
                self.step()
        return [self.completion(i) for i in ids]

    def stream(self, prompts: list[str | list[int]], sampling: SamplingConfig | list[SamplingConfig] = SamplingConfig(),
               stop_ids=None) -> Iterator[tuple[str, int]]:
        """Yields (request id, token) as tokens arrive. The requests are released when the
        stream ends, and aborted if it is closed early."""
        ids = self._enqueue_all(prompts, sampling, stop_ids)
        seen = dict.fromkeys(ids, 0)
        with self._owning(ids):
            while seen:
                for req in self.step():
                    if req.id in seen:
                        yield from ((req.id, tok) for tok in req.output[seen[req.id]:])
                        seen[req.id] = len(req.output)
                for rid in [r for r in seen if self._finished(r)]:
                    del seen[rid]
                    self.completion(rid)

    def completion(self, request_id: str, release: bool = True) -> Completion:
        """A finished request's result; `release` (default) forgets it, so ask once."""
        with self._lock:
            r = self.scheduler.get(request_id)
            if release and r.status == Status.FINISHED:
                self.scheduler.release(request_id)
        text = None if self.tokenizer is None else cut_at_stop_string(r.output, r.sampling.stop,
                                                                         self.tokenizer.decode)[1]
        return Completion(r.id, r.prompt, list(r.output), text, r.finish_reason,
                          list(r.logprobs) if r.sampling.logprobs else None, r.error, r.arrival,
                          r.scheduled_time, list(r.token_times), r.num_cached_tokens, r.num_preemptions,
                          r.sampling.seed, r.num_verify_steps, r.num_proposed, r.num_accepted, list(r.accepted_at),
                          list(r.top_logprobs) if r.sampling.top_logprobs else None,
                          list(r.prompt_logprobs) if r.sampling.prompt_logprobs else None,
                          list(r.prompt_top) if r.sampling.prompt_logprobs and r.sampling.top_logprobs else None)

    def score(self, prompts: list[str | list[int]], top_logprobs: int = 0) -> list["Scored"]:
        """Each prompt's token logprobs under the model (the first token has none), through the
        serving step's scoring path (sampling.prompt_logprobs): what evaluation harnesses and
        perplexity need. Prompts must fit engine.max_model_len - 1 (one token is generated)."""
        sampling = SamplingConfig(max_new_tokens=1, seed=0, prompt_logprobs=True, top_logprobs=top_logprobs)
        return [Scored(c.prompt_tokens, c.prompt_logprobs, c.prompt_top_logprobs, c.error)
                for c in self.generate(prompts, sampling, stop_ids=())]


@dataclasses.dataclass
class Scored:
    """One scored prompt: logprobs[i] = log p(tokens[i] | tokens[:i]), None at 0 (and on error)."""

    tokens: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None] | None
    error: str | None = None

    @property
    def nll(self) -> float:
        """Total negative log-likelihood of tokens[1:] (nats)."""
        if self.error:
            raise ValueError(f"this prompt was not scored: {self.error}")
        return -sum(lp for lp in self.logprobs[1:])

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(len(self.tokens) - 1, 1))
