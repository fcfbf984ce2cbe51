"""HOST ONLY (no jax): the OpenAI API's request checking and response shapes, apart from HTTP.

`parse_completion` / `parse_chat` turn a decoded JSON body into token-id prompts and one
SamplingConfig per choice, or raise `APIError` (OpenAI's error shape, with the status); nothing
is silently dropped: a field this server does not implement is named and rejected.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid

from jaxinfer.config import SamplingConfig

MAX_SEED = 2**32


class APIError(Exception):
    """An error the client caused (or overload): OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# Fields of OpenAI's API that this server does not implement: rejected by name, never ignored.
UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "parallel_tool_calls": "tool calling",
    "response_format": "structured output", "logit_bias": "logit bias", "suffix": "suffix insertion",
    "audio": "audio output", "modalities": "non-text output", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning models",
}
# Neutral values of unimplemented fields: sending these changes nothing, so they are accepted.
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "logit_bias": {}, "store": False}
# top_k, min_p and ignore_eos are vLLM's extensions (the openai client sends them through extra_body).
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop", "stream",
          "stream_options", "user", "presence_penalty", "frequency_penalty", "ignore_eos"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "store", "metadata"}


@dataclasses.dataclass
class Limits:
    """What the served engine allows (checked before anything is queued)."""

    model_id: str
    vocab_size: int
    max_model_len: int
    max_n: int
    max_top_logprobs: int
    default_max_tokens: int  # completions without max_tokens (OpenAI's default is 16)


@dataclasses.dataclass
class Parsed:
    """A checked request: one prompt per entry of `prompts`, `n` choices each (choice index
    prompt * n + j), sampling[j] for choice j of every prompt."""

    prompts: list[list[int]]
    sampling: list[SamplingConfig]
    n: int
    max_tokens: int  # as asked (0: score the prompt only; one token is still computed, then dropped)
    logprobs: int | None  # None: none; else the alternatives per token
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)


def _number(body: dict, key: str, default, low: float, high: float, *, integer: bool = False,
            low_open: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not integer and not math.isfinite(value)):
        raise bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key, "invalid_type")
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise bad(f"'{key}'={value} is out of range: it must be in {interval}", key, "invalid_value")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be true or false, got {value!r}", key, "invalid_type")
    return value


def _text(value, param: str) -> str:
    """A JSON string that is valid Unicode (JSON escapes can spell lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"'{param}' is not valid UTF-8 text (a lone surrogate escape)", param, "invalid_utf8") from None
    return value


def _check_fields(body: dict, allowed: set[str], endpoint: str) -> None:
    for key, value in body.items():
        if key in NEUTRAL and value == NEUTRAL[key]:
            continue
        if key in UNSUPPORTED or key in NEUTRAL:
            what = UNSUPPORTED.get(key, f"'{key}' other than {NEUTRAL.get(key)!r}")
            raise bad(f"'{key}' is not supported by this server ({what}); remove it", key, "unsupported_parameter")
        if key not in allowed:
            raise bad(f"unknown field '{key}' for {endpoint}; supported: {', '.join(sorted(allowed))}", key,
                      "unknown_parameter")


def _model(body: dict, limits: Limits) -> None:
    model = body.get("model")
    if model is None:
        raise bad("'model' is required (GET /v1/models lists it)", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise bad(f"'model' must be a string, got {model!r}", "model", "invalid_type")
    check_model(model, limits.model_id)


def check_model(model: str, served: str) -> None:
    """404 unless `model` is the id this server serves (requests and GET /v1/models/{id})."""
    if model != served:
        raise APIError(404, f"the model '{model}' does not exist here; this server serves '{served}'",
                       "model", "model_not_found")


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"'stop' must be a string or a list of strings, got {stop!r}", "stop", "invalid_type")
    if any(s == "" for s in stops):
        raise bad("'stop' holds an empty string, which would end every completion at once; remove it", "stop",
                  "invalid_value")
    return tuple(_text(s, "stop") for s in stops)


def _sampling(body: dict, limits: Limits, max_tokens: int, logprobs: int | None, prompt_logprobs: bool,
              n: int) -> list[SamplingConfig]:
    seed = _number(body, "seed", None, 0, MAX_SEED - 1, integer=True)
    top_k = _number(body, "top_k", 0, -1, limits.vocab_size, integer=True)
    base = SamplingConfig(
        max_new_tokens=max(max_tokens, 1),
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, low_open=True)),
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both disable it
        min_p=float(_number(body, "min_p", 0.0, 0, 1)),
        logprobs=logprobs is not None, top_logprobs=logprobs or 0, prompt_logprobs=prompt_logprobs,
        stop=_stops(body))
    # n choices of one prompt differ by seed: choice j samples with seed + j (repeatable when seed is given)
    return [dataclasses.replace(base, seed=None if seed is None else (seed + j) % MAX_SEED) for j in range(n)]


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _flag(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options", "invalid_value")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise bad(f"'stream_options' must be an object with 'include_usage' only, got {opts!r}", "stream_options",
                  "invalid_type")
    return stream, _flag(opts, "include_usage")


def _check_lengths(prompts: list[list[int]], max_tokens: int, limits: Limits, param: str) -> None:
    for i, ids in enumerate(prompts):
        where = f" (prompt {i})" if len(prompts) > 1 else ""
        if not ids:
            raise bad(f"'{param}'{where} is empty: give at least one token", param, "invalid_value")
        if len(ids) + max(max_tokens, 1) > limits.max_model_len:
            too_long = len(ids) >= limits.max_model_len
            raise bad(f"the prompt{where} has {len(ids)} tokens" + (
                f"; with max_tokens={max_tokens} that exceeds" if not too_long else ", beyond") +
                f" this model's context of {limits.max_model_len} tokens", param if too_long else "max_tokens",
                "context_length_exceeded")


def _max_tokens(body: dict, key: str, default: int, limits: Limits) -> int:
    return _number(body, key, default, 0, limits.max_model_len, integer=True)


def _prompt_ids(prompt, encode, limits: Limits) -> list[list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    def ids(x, i):
        if not x or not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            raise bad(f"'prompt' item {i} must be a string or a non-empty list of integer token ids", "prompt",
                      "invalid_type")
        for pos, t in enumerate(x):
            if not 0 <= t < limits.vocab_size:
                raise bad(f"'prompt': token id {t} at position {pos} is outside the vocabulary [0, "
                          f"{limits.vocab_size})", "prompt", "invalid_value")
        return list(x)

    if isinstance(prompt, str):
        return [encode(_text(prompt, "prompt"))]
    if not isinstance(prompt, list) or not prompt:
        raise bad(f"'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists, "
                  f"got {prompt!r:.80}", "prompt", "invalid_type")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [ids(prompt, 0)]
    return [encode(_text(p, "prompt")) if isinstance(p, str) else ids(p, i) for i, p in enumerate(prompt)]


def parse_completion(body: dict, limits: Limits, encode) -> Parsed:
    """POST /v1/completions -> Parsed, or APIError. encode: text -> token ids."""
    _check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    _model(body, limits)
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    prompts = _prompt_ids(body["prompt"], encode, limits)
    max_tokens = _max_tokens(body, "max_tokens", limits.default_max_tokens, limits)
    _check_lengths(prompts, max_tokens, limits, "prompt")
    n = _number(body, "n", 1, 1, limits.max_n, integer=True)
    logprobs = _number(body, "logprobs", None, 0, limits.max_top_logprobs, integer=True)
    echo = _flag(body, "echo")
    stream, usage = _stream(body)
    sampling = _sampling(body, limits, max_tokens, logprobs, echo and logprobs is not None, n)
    return Parsed(prompts, sampling, n, max_tokens, logprobs, echo, stream, usage, _flag(body, "ignore_eos"))


def chat_messages(messages) -> list[dict]:
    """OpenAI messages -> [{"role", "content": str}] for the chat template (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise bad(f"'messages' must be a non-empty list of {{role, content}} objects, got {messages!r:.80}",
                  "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise bad(f"{param} must be an object with 'role' and 'content'", param, "invalid_type")
        if m["role"] not in ("system", "developer", "user", "assistant"):
            raise bad(f"{param}.role={m['role']!r} is not supported: use system, developer, user or assistant "
                      "(tool messages need tool calling, which this server does not implement)", param + ".role",
                      "invalid_value")
        if set(m) - {"role", "content", "name"}:
            extra = sorted(set(m) - {"role", "content", "name"})
            raise bad(f"{param} has fields this server does not support: {', '.join(extra)}", param,
                      "unsupported_parameter")
        content = m["content"]
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{param}.content[{j}] must be a text part {{'type': 'text', 'text': ...}} (this "
                              "server serves a text model)", f"{param}.content", "unsupported_content")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise bad(f"{param}.content must be a string or a list of text parts", f"{param}.content", "invalid_type")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text(content, f"{param}.content")})
    return out


def parse_chat(body: dict, limits: Limits, render) -> Parsed:
    """POST /v1/chat/completions -> Parsed, or APIError. render: messages -> token ids (the
    folder's chat template); it raises APIError when the model has no template."""
    _check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    _model(body, limits)
    if "messages" not in body:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    prompts = [render(chat_messages(body["messages"]))]
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is not None:
        raise bad("give 'max_completion_tokens' or 'max_tokens', not both", "max_tokens", "invalid_value")
    key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    room = limits.max_model_len - len(prompts[0])  # OpenAI's default: as many as fit
    max_tokens = _max_tokens(body, key, max(room, 1), limits)
    _check_lengths(prompts, max_tokens, limits, "messages")
    n = _number(body, "n", 1, 1, limits.max_n, integer=True)
    want = _flag(body, "logprobs")
    top = _number(body, "top_logprobs", None, 0, limits.max_top_logprobs, integer=True)
    if top is not None and not want:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    logprobs = (top or 0) if want else None
    stream, usage = _stream(body)
    return Parsed(prompts, _sampling(body, limits, max_tokens, logprobs, False, n), n, max_tokens, logprobs,
                  False, stream, usage, _flag(body, "ignore_eos"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
