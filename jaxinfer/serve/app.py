"""The HTTP app (FastAPI on uvicorn): OpenAI's /v1/models, /v1/completions and
/v1/chat/completions (JSON or Server-Sent Events), /health and /metrics, over one EngineWorker.

Handlers never wait for another request: each submits its choices to the engine thread and
awaits its own events (handed over with loop.call_soon_threadsafe). A client that disconnects,
streaming or not, has its requests aborted and their pages freed. Every error is OpenAI's JSON
shape with its status; bodies are read by hand so bad bytes and bad JSON get a clear 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from jaxinfer.config import ServeConfig
from jaxinfer.engine import Completion, Engine
from jaxinfer.generate import cut_at_stop_string
from jaxinfer.serve.metrics import ServerMetrics
from jaxinfer.serve.protocol import (APIError, Limits, Parsed, bad, check_model, new_id, now, parse_chat,
                                     parse_completion)
from jaxinfer.serve.worker import EngineWorker, Overloaded, Tokens

log = logging.getLogger("jaxinfer.serve")
DISCONNECT_POLL_S = 0.05  # how often a non-streaming handler checks that its client is still there


def error_response(e: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, or APIError: too large (413), not UTF-8, not JSON, not an object."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body is {size} bytes, over this server's limit of {limit} "
                            "(serve.max_body_bytes)", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over this server's limit of {limit} bytes "
                                "(serve.max_body_bytes)", code="body_too_large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the request body is not valid UTF-8 (byte {e.start}: {e.reason})", code="invalid_utf8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                  code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


class APIKeyMiddleware:
    """401 on /v1 without 'Authorization: Bearer KEY'. Pure ASGI: Starlette's BaseHTTPMiddleware
    wraps `receive`, and a handler behind it never sees its client disconnect."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            if dict(scope["headers"]).get(b"authorization") != self.expected:
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", type="authentication_error")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Choice:
    """One choice's tokens so far and the text already sent (streaming holds back what a stop
    string or an unfinished UTF-8 character may still change)."""

    def __init__(self, index: int, prompt: list[int], parsed: Parsed):
        self.index, self.prompt, self.parsed = index, prompt, parsed
        self.stops = parsed.sampling[0].stop
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list = []
        self.sent = ""
        self.echoed = False  # streaming echo: the prompt's chunk went out
        self.done: Completion | None = None

    def take(self, ev: Tokens) -> tuple[list[int], list[float], list]:
        """Adds an event's tokens (none when max_tokens is 0); returns the new ones."""
        if self.parsed.max_tokens == 0:
            return [], [], []
        self.tokens += ev.tokens
        self.logprobs += ev.logprobs
        self.top += ev.top_logprobs
        return ev.tokens, ev.logprobs, ev.top_logprobs

    def delta(self, decode, final: bool) -> str:
        _, text, _ = cut_at_stop_string(self.tokens, self.stops, decode)
        if not final:
            text = text.rstrip("\ufffd")  # an unfinished multi-byte character
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        if not text.startswith(self.sent):
            return ""
        out, self.sent = text[len(self.sent):], text
        return out


class Server:
    """The app's state: the engine thread, the tokenizer and the limits."""

    def __init__(self, engine: Engine, cfg: ServeConfig, model_id: str, api_key: str | None = None):
        if engine.tokenizer is None:
            raise ValueError("jaxinfer serve needs an engine with a tokenizer (text prompts, stop strings)")
        self.engine, self.cfg, self.model_id, self.api_key = engine, cfg, model_id, api_key
        self.tokenizer = engine.tokenizer
        self.created = now()
        self.metrics = ServerMetrics(engine)
        self.worker = EngineWorker(engine, cfg.max_waiting, on_finish=self.metrics.finished)
        self.limits = Limits(model_id, engine.model.cfg.vocab_size, engine.max_model_len, cfg.max_n,
                             engine.cfg.max_top_logprobs, cfg.default_max_tokens)

    # ---- text ---------------------------------------------------------------------------------
    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def render(self, messages: list[dict]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages)
        except ValueError as e:  # no template (TokenizerError), or the template raised
            raise bad(f"this model cannot render chat messages: {e}; use /v1/completions with a plain prompt",
                      "messages", "chat_template_missing") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- logprobs -----------------------------------------------------------------------------
    def completion_logprobs(self, ids, lps, tops, offset: int = 0) -> dict:
        """The legacy completions shape: parallel lists of token text, logprob, top alternatives, offset."""
        tokens = [self.piece(t) for t in ids]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        top = [None if alts is None else {self.piece(i): lp for i, lp in alts} for alts in tops]
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top, "text_offset": offsets}

    def chat_logprobs(self, ids, lps, tops) -> dict:
        def entry(t, lp):
            s = self.piece(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [entry(t, lp) | {"top_logprobs": [entry(i, a) for i, a in alts]}
                            for t, lp, alts in zip(ids, lps, tops or [[]] * len(ids))]}

    def prompt_logprobs(self, prompt: list[int], lps, tops) -> dict:
        """An echoed prompt's scores in the completions shape (its first token has none)."""
        tops = tops or [None] + [[] for _ in prompt[1:]]
        return self.completion_logprobs(prompt, lps, tops)

    def _logprobs(self, choice: Choice, ids, lps, tops, chat: bool, echo_prompt: Completion | None = None):
        p = choice.parsed
        if p.logprobs is None:
            return None
        tops = tops if p.logprobs else [[] for _ in ids]
        if chat:
            return self.chat_logprobs(ids, lps, tops)
        if echo_prompt is not None:  # the prompt's own scores first
            first = self.prompt_logprobs(echo_prompt.prompt_tokens, echo_prompt.prompt_logprobs,
                                         echo_prompt.prompt_top_logprobs)
            rest = self.completion_logprobs(ids, lps, tops, offset=len(self.decode(echo_prompt.prompt_tokens)))
            return {k: first[k] + rest[k] for k in first}
        return self.completion_logprobs(ids, lps, tops)

    # ---- requests -----------------------------------------------------------------------------
    def submit(self, parsed: Parsed, queue: asyncio.Queue) -> tuple[list[str], dict[str, Choice]]:
        loop = asyncio.get_running_loop()
        choices = [Choice(i * parsed.n + j, prompt, parsed) for i, prompt in enumerate(parsed.prompts)
                   for j in range(parsed.n)]
        prompts = [c.prompt for c in choices]
        samplings = [parsed.sampling[c.index % parsed.n] for c in choices]
        try:
            ids = self.worker.submit(prompts, samplings,
                                     lambda rid, ev: loop.call_soon_threadsafe(queue.put_nowait, (rid, ev)),
                                     () if parsed.ignore_eos else None)
        except Overloaded as e:
            raise APIError(503, str(e), code="overloaded", type="server_error") from None
        except ValueError as e:  # the engine's own checks (the parser should have caught it first)
            raise bad(str(e)) from None
        return ids, dict(zip(ids, choices))

    @staticmethod
    def failed(c: Completion) -> APIError | None:
        if c.finish_reason == "error":
            return bad(c.error or "the request could not run")
        if c.finish_reason == "abort":
            return APIError(500, c.error or "the request was aborted", code="aborted", type="server_error")
        return None

    def usage(self, parsed: Parsed, choices) -> dict:
        prompt = sum(len(p) for p in parsed.prompts)
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def complete(self, request: Request, parsed: Parsed, chat: bool) -> dict:
        """Runs every choice to its end; aborts them all if the client goes away."""
        queue: asyncio.Queue = asyncio.Queue()
        ids, choices = self.submit(parsed, queue)
        pending = set(ids)
        try:
            checked = time.monotonic()
            while pending:
                try:
                    rid, ev = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                    if isinstance(ev, Tokens):
                        choices[rid].take(ev)
                    else:
                        choices[rid].done = ev
                        pending.discard(rid)
                except TimeoutError:
                    pass
                if time.monotonic() - checked > DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise asyncio.CancelledError("client disconnected")
        finally:
            if pending:
                self.worker.abort(pending)
        ordered = sorted(choices.values(), key=lambda c: c.index)
        for c in ordered:
            if (err := self.failed(c.done)) is not None:
                raise err
        return self.response(parsed, ordered, chat)

    def _finish_reason(self, c: Completion) -> str:
        return "length" if c.finish_reason not in ("stop", "length") else c.finish_reason

    def response(self, parsed: Parsed, choices: list[Choice], chat: bool) -> dict:
        out = []
        for c in choices:
            text = c.done.text if parsed.max_tokens else ""
            n = len(c.tokens)
            finish = "length" if parsed.max_tokens == 0 else self._finish_reason(c.done)
            if chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "logprobs": self._logprobs(c, c.tokens, c.logprobs[:n], c.top[:n], True),
                            "finish_reason": finish})
            else:
                echo = self.decode(c.prompt) if parsed.echo else ""
                out.append({"index": c.index, "text": echo + text,
                            "logprobs": self._logprobs(c, c.tokens, c.logprobs[:n], c.top[:n], False,
                                                       c.done if parsed.echo else None),
                            "finish_reason": finish})
        return {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
                "created": now(), "model": self.model_id, "choices": out, "usage": self.usage(parsed, choices)}

    async def stream(self, parsed: Parsed, chat: bool, queue: asyncio.Queue, ids, choices) -> AsyncIterator[str]:
        """SSE chunks: one id and `created` for all; chat's first delta carries the role; each
        choice's last chunk its finish_reason; the usage chunk if asked; then [DONE]."""
        rid_, created = new_id("chatcmpl" if chat else "cmpl"), now()
        obj = "chat.completion.chunk" if chat else "text_completion"
        pending = set(ids)

        def chunk(choice_list, usage=None) -> str:
            body = {"id": rid_, "object": obj, "created": created, "model": self.model_id, "choices": choice_list}
            if parsed.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def piece(c: Choice, text: str, logprobs=None, finish=None) -> dict:
            if chat:
                return {"index": c.index, "delta": {"content": text} if text or finish is None else {},
                        "logprobs": logprobs, "finish_reason": finish}
            return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}

        try:
            for c in sorted(choices.values(), key=lambda c: c.index):
                if chat:
                    yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            while pending:
                rid, ev = await queue.get()
                c = choices[rid]
                if parsed.echo and not c.echoed and not (isinstance(ev, Completion) and self.failed(ev)):
                    # the prompt first, with its scores once they exist (the first event: its prefill ran)
                    c.echoed = True
                    scores = (self.prompt_logprobs(c.prompt, ev.prompt_logprobs, ev.prompt_top_logprobs)
                              if parsed.logprobs is not None and ev.prompt_logprobs is not None else None)
                    yield chunk([piece(c, self.decode(c.prompt), scores)])
                if isinstance(ev, Tokens):
                    ids_, lps, tops = c.take(ev)
                    text = c.delta(self.decode, final=False)
                    if text or (ids_ and parsed.logprobs is not None):
                        yield chunk([piece(c, text, self._logprobs(c, ids_, lps, tops, chat))])
                    continue
                c.done = ev
                pending.discard(rid)
                if (err := self.failed(ev)) is not None:
                    yield f"data: {json.dumps(err.body())}\n\n"
                    continue
                text = c.delta(self.decode, final=True) if parsed.max_tokens else ""
                yield chunk([piece(c, text, None, "length" if parsed.max_tokens == 0 else self._finish_reason(ev))])
            if parsed.include_usage:
                yield chunk([], self.usage(parsed, choices.values()))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the response task is cancelled) or the stream ended
            if pending:
                self.worker.abort(pending)


def create_app(engine: Engine, cfg: ServeConfig = ServeConfig(), model_id: str = "jaxinfer",
               api_key: str | None = None) -> FastAPI:
    """The app over `engine`; its lifespan starts and stops the engine thread."""
    server = Server(engine, cfg, model_id, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        yield
        server.worker.stop()

    app = FastAPI(title="jaxinfer", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e, {"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        what = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on "
                f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(APIError(e.status_code, what, code={404: "not_found", 405: "method_not_allowed"}.get(
            e.status_code)), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(APIError(500, f"internal server error ({type(e).__name__}); see the server log",
                                       type="server_error", code="internal_error"))

    if api_key:
        app.add_middleware(APIKeyMiddleware, key=api_key)

    def model_card() -> dict:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "jaxinfer",
                "max_model_len": engine.max_model_len, "vocab_size": engine.model.cfg.vocab_size}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        check_model(model, server.model_id)
        return model_card()

    async def handle(request: Request, chat: bool):
        body = await read_json(request, cfg.max_body_bytes)
        parsed = (parse_chat(body, server.limits, server.render) if chat else
                  parse_completion(body, server.limits, server.encode))
        if not parsed.stream:
            return JSONResponse(await server.complete(request, parsed, chat))
        queue: asyncio.Queue = asyncio.Queue()
        ids, choices = server.submit(parsed, queue)  # an overload is still a 503, before the stream starts
        return StreamingResponse(server.stream(parsed, chat, queue, ids, choices), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.get("/health")
    async def health():
        if not server.worker.alive:
            raise APIError(503, f"the engine thread has stopped: {server.worker.error!r}", code="engine_stopped",
                           type="server_error")
        s = engine.scheduler
        return {"status": "ok", "running": len(s.running), "waiting": len(s.waiting)}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")

    return app
