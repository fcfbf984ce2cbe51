"""The engine: the one loop where the host scheduler and the jitted step meet.

Each `step()` plans with the scheduler, uploads the plan in one `device_put`, dispatches the
jitted step asynchronously and only then reads the *previous* step's tokens, so the device is
never idle while the host does its bookkeeping (`engine.async_scheduling`; off = read at once).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import sharding
from jaxinfer.cache import PagedKVCache
from jaxinfer.config import EngineConfig, RunConfig, SamplingConfig
from jaxinfer.models import Model, dtype_of
from jaxinfer.sampling import validate
from jaxinfer.scheduler import Request, Scheduler, Status, StepPlan, bucket
from jaxinfer.step import compile_step, pack, poison_pages


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


def num_pages_for(cfg: EngineConfig, model: Model, max_model_len: int) -> int:
    """engine.num_pages, or a fraction of free device memory, or room for max_num_seqs full requests."""
    if cfg.num_pages is not None:
        return cfg.num_pages
    c, m = cfg.page_size, model.cfg
    if cfg.kv_memory_fraction > 0:
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            raise ValueError(f"engine.kv_memory_fraction={cfg.kv_memory_fraction}: {jax.devices()[0].platform} "
                             "reports no memory limit; set engine.num_pages instead")
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        per_page = 2 * m.num_layers * m.num_kv_heads * c * m.head_dim * jnp.dtype(dtype_of(m.dtype)).itemsize
        return int(free * cfg.kv_memory_fraction) // per_page
    return cfg.max_num_seqs * -(-max_model_len // c)


class Engine:
    def __init__(self, model: Model, tokenizer=None, cfg: EngineConfig = EngineConfig(), stop_ids=(),
                 clock=time.perf_counter):
        self.model, self.tokenizer, self.cfg, self.clock = model, tokenizer, cfg, clock
        self.default_stop_ids = tuple(stop_ids) or (tuple(tokenizer.eos_ids) if tokenizer else ())
        self.max_model_len = min(cfg.max_model_len, model.cfg.max_position_embeddings)
        num_pages = num_pages_for(cfg, model, self.max_model_len)
        if num_pages <= 0:
            raise ValueError(f"engine.num_pages={num_pages}: the KV cache needs at least one page "
                             "(set engine.num_pages, or leave it unset for room for max_num_seqs full requests)")
        m = model.cfg
        self.cache = PagedKVCache.zeros(m.num_layers, m.num_kv_heads, num_pages, cfg.page_size, m.head_dim,
                                        dtype_of(m.dtype))
        self.params, self.mesh, self._out_shardings, self._batch_sharding = model.params, None, None, None
        if tuple(cfg.mesh) != (1, 1):
            self.mesh = sharding.make_mesh(*cfg.mesh)
            self.params = jax.device_put(model.params, sharding.param_shardings(model.params, self.mesh))
            cache_s = sharding.cache_sharding(self.cache, self.mesh)
            self.cache = jax.device_put(self.cache, cache_s)
            self._batch_sharding = sharding.replicated(self.mesh)
            self._out_shardings = (cache_s, self._batch_sharding, self._batch_sharding)
        self.scheduler = Scheduler(cfg, num_pages, self.max_model_len, clock)
        self.num_out_rows = max(cfg.decode_row_buckets) + max(cfg.prefill_row_buckets)
        self._prev = jax.device_put(jnp.zeros(self.num_out_rows, jnp.int32), self._batch_sharding)
        self._param_leaves, self._param_def = jax.tree.flatten(self.params)
        self._steps: dict[int, object] = {}
        self._inflight: tuple[StepPlan, jax.Array, jax.Array] | None = None
        self.records: list[StepRecord] = []

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "Engine":
        from jaxinfer.checkpoint import build

        model, tok, stops, _ = build(cfg)
        return cls(model, tok, cfg.engine, stops)

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], sampling: SamplingConfig = SamplingConfig(),
                    request_id: str | None = None, stop_ids=None, arrival: float | None = None) -> str:
        """Queues a request (text needs a tokenizer); returns its id. Bad sampling raises; a request
        that can never fit (context, cache) is finished at once with `error` set."""
        validate(sampling)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stops = self.default_stop_ids if stop_ids is None else tuple(stop_ids)
        return self.scheduler.add(ids, sampling, stops, request_id, arrival).id

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ---- the loop -------------------------------------------------------------------------------
    def _step_fn(self, num_decode_rows: int):
        if num_decode_rows not in self._steps:
            self._steps[num_decode_rows] = compile_step(self.model.graphdef, self._param_def, num_decode_rows,
                                                        self.cfg.attention_impl, self._out_shardings)
        return self._steps[num_decode_rows]

    def _dispatch(self, plan: StepPlan):
        ints, floats, layout = pack(plan.arrays)
        ints, floats = jax.device_put((ints, floats), self._batch_sharding)
        if self.cfg.debug_poison_freed_pages and plan.freed_pages:
            pages = np.full(bucket(len(plan.freed_pages), (2 ** i for i in range(31)), "pages"),
                            self.cache.num_pages, np.int32)
            pages[: len(plan.freed_pages)] = plan.freed_pages
            self.cache = poison_pages(self.cache, pages)
        self.cache, tokens, logprobs = self._step_fn(plan.num_decode_rows)(
            self._param_leaves, self.cache, ints, floats, self._prev, layout=layout)
        self._prev = tokens
        return plan, tokens, logprobs

    def _collect(self, inflight) -> tuple[list[Request], float]:
        plan, tokens, logprobs = inflight
        t0 = self.clock()
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        wait = self.clock() - t0
        touched = self.scheduler.update(plan, tokens, logprobs)
        self._check_stop_strings(touched)
        return touched, wait

    def _check_stop_strings(self, touched: list[Request]) -> None:
        for req in touched:
            if req.sampling.stop and req.status != Status.FINISHED and self.tokenizer is not None:
                text = self.tokenizer.decode(req.output)
                if any(s in text for s in req.sampling.stop):
                    self.scheduler.finish(req.id, "stop")

    def step(self) -> list[Request]:
        """One iteration: plan and dispatch a step, then read the previous one. Returns the
        requests that received a token."""
        start = self.clock()
        plan = self.scheduler.schedule()
        launched = self._dispatch(plan) if plan is not None else None
        touched, wait = [], 0.0
        if self.cfg.async_scheduling:
            if self._inflight is not None:
                touched, wait = self._collect(self._inflight)
            self._inflight = launched
        elif launched is not None:
            touched, wait = self._collect(launched)
        if plan is not None:
            alloc = self.scheduler.alloc
            live = sum(r.num_computed for r in self.scheduler.running)
            self.records.append(StepRecord(start, self.clock(), wait, plan.num_tokens, len(plan.rows),
                                           int((alloc.refcount > 0).sum()), live))
        return touched

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    # ---- offline API ----------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], sampling: SamplingConfig | list[SamplingConfig] = SamplingConfig(),
                 stop_ids=None) -> list[Completion]:
        """Runs every prompt to completion; results in prompt order."""
        configs = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        ids = [self.add_request(p, s, stop_ids=stop_ids) for p, s in zip(prompts, configs)]
        self.run_until_done()
        return [self.completion(i) for i in ids]

    def stream(self, prompts: list[str | list[int]], sampling: SamplingConfig = SamplingConfig(),
               stop_ids=None) -> Iterator[tuple[str, int]]:
        """Yields (request id, token) as tokens arrive."""
        ids = {self.add_request(p, sampling, stop_ids=stop_ids) for p in prompts}
        seen = {i: 0 for i in ids}
        while self.has_work():
            for req in self.step():
                if req.id in ids:
                    for tok in req.output[seen[req.id]:]:
                        yield req.id, tok
                    seen[req.id] = len(req.output)

    def completion(self, request_id: str) -> Completion:
        r = self.scheduler.requests[request_id]
        text = self.tokenizer.decode(r.output) if self.tokenizer is not None else None
        if text is not None and r.finish_reason == "stop":
            cut = [text.index(s) for s in r.sampling.stop if s in text]
            text = text[: min(cut)] if cut else text
        return Completion(r.id, r.prompt, list(r.output), text, r.finish_reason,
                          list(r.logprobs) if r.sampling.logprobs else None, r.error, r.arrival,
                          r.scheduled_time, list(r.token_times), r.num_cached_tokens, r.num_preemptions)
