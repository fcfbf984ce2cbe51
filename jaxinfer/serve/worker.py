"""The engine thread: the one thread that steps the engine. HTTP handlers submit requests and
aborts from any thread; each request's new tokens and its completion come back through the
callback it was submitted with (called on the engine thread: hand them to your own loop)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid

from jaxinfer.config import SamplingConfig
from jaxinfer.engine import Completion, Engine
from jaxinfer.scheduler import Status, UnknownRequest

log = logging.getLogger("jaxinfer.serve")


class Overloaded(Exception):
    """The waiting queue is full (serve.max_waiting): retry later."""


@dataclasses.dataclass
class Tokens:
    """Tokens a request received since the last event, with their logprobs (when asked)."""

    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    # The first event of a prompt_logprobs request: the prompt's scores (known once its prefill
    # ran), named as in Completion.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list | None = None


@dataclasses.dataclass
class _Sub:
    callback: object
    seen: int = 0


class EngineWorker:
    """Steps `engine` on its own thread while any request is unfinished; sleeps otherwise."""

    def __init__(self, engine: Engine, max_waiting: int, on_finish=None, max_failures: int = 3):
        self.engine, self.max_waiting, self.on_finish, self.max_failures = engine, max_waiting, on_finish, max_failures
        self._subs: dict[str, _Sub] = {}
        self._lock = threading.Lock()  # _subs and admission
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None  # what stopped the thread, if it died
        self.thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)

    def start(self) -> "EngineWorker":
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, prompts: list[list[int]], samplings: list[SamplingConfig], callback, stop_ids=None) -> list[str]:
        """Queues every (prompt, sampling) pair or none: Overloaded past serve.max_waiting waiting
        requests. callback(request_id, Tokens | Completion) runs on the engine thread; stop_ids:
        None = the model's own (EOS), () = none."""
        with self._lock:
            waiting = len(self.engine.scheduler.waiting)
            if waiting + len(prompts) > self.max_waiting:
                raise Overloaded(f"the server is overloaded: {waiting} requests are waiting (serve.max_waiting="
                                 f"{self.max_waiting}); retry later")
            ids = []
            for prompt, sampling in zip(prompts, samplings):
                rid = uuid.uuid4().hex
                self._subs[rid] = _Sub(callback)
                self.engine.add_request(prompt, sampling, request_id=rid, stop_ids=stop_ids)
                ids.append(rid)
        self._wake.set()
        return ids

    def abort(self, request_ids) -> None:
        """Ends these requests (their pages are freed); finished or unknown ones are skipped."""
        for rid in request_ids:
            try:
                self.engine.abort(rid)
            except UnknownRequest:
                pass
        self._wake.set()

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                if self.engine.has_work():
                    try:
                        self.engine.step()
                        failures = 0
                    except Exception as e:  # the engine recovers (its requests recompute); give up after a few
                        failures += 1
                        log.exception("engine step failed (%d in a row)", failures)
                        if failures >= self.max_failures:
                            self._abort_all(f"the engine failed {failures} steps in a row: {e}")
                            failures = 0
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
                self._deliver()
        except BaseException as e:  # the thread is dying: /health says so
            self.error = e
            log.exception("the engine thread stopped")
            raise

    def _abort_all(self, why: str) -> None:
        with self._lock:
            ids = list(self._subs)
        for rid in ids:
            try:
                req = self.engine.scheduler.get(rid)
                self.engine.abort(rid)
                req.error = why
            except UnknownRequest:
                pass

    def _deliver(self) -> None:
        """New tokens to their callbacks; finished requests' completions (and releases them)."""
        with self._lock:
            subs = list(self._subs.items())
        for rid, sub in subs:
            req = self.engine.scheduler.requests.get(rid)
            if req is None:
                continue
            n = len(req.output)
            if n > sub.seen:
                top = req.top_logprobs[sub.seen:n] if req.sampling.top_logprobs else []
                ev = Tokens(req.output[sub.seen:n], req.logprobs[sub.seen:n], top)
                if sub.seen == 0 and req.sampling.prompt_logprobs:
                    ev.prompt_logprobs, ev.prompt_top_logprobs = list(req.prompt_logprobs), list(req.prompt_top)
                self._call(sub, rid, ev)
                sub.seen = n
            if req.status == Status.FINISHED:
                done = self.engine.completion(rid)
                with self._lock:
                    del self._subs[rid]
                if self.on_finish is not None:
                    self.on_finish(done)
                self._call(sub, rid, done)

    @staticmethod
    def _call(sub: _Sub, rid: str, event: Tokens | Completion) -> None:
        try:
            sub.callback(rid, event)
        except Exception:  # a handler gone (its loop closed) must not stop the engine
            log.debug("callback for %s failed", rid, exc_info=True)
