"""`jaxinfer bench --url`: the bench workload sent to a running server over HTTP (streaming
/v1/completions, Poisson arrivals from bench.arrival_rate), timed on the client: a token's time
is when the SSE chunk carrying it arrives (each chunk names its tokens: logprobs=0). The result
feeds the same `metrics.summarize` as the in-process bench, so the columns compare directly."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx


@dataclasses.dataclass
class HTTPResult:
    """One request as the client saw it (the fields metrics.summarize reads)."""

    prompt_tokens: list[int]
    tokens: list[str]  # the token texts, one per token received
    token_times: list[float]
    arrival: float
    error: str | None = None
    scheduled: float | None = None  # the server's queueing is not visible from the client
    num_cached_tokens: int = 0


def model_card(url: str, api_key: str | None = None) -> dict:
    """The served model (GET /v1/models): its id, context and vocabulary."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise ValueError(f"bench --url {url}: no server answers there ({e}); start one with `jaxinfer serve`") from None
    if r.status_code != 200:
        raise ValueError(f"bench --url {url}: GET /v1/models returned {r.status_code}: {r.text[:200]}")
    return r.json()["data"][0]


async def _one(http: httpx.AsyncClient, model: str, prompt, sampling, start: float) -> HTTPResult:
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    body = {"model": model, "prompt": prompt, "max_tokens": sampling.max_new_tokens, "temperature":
            sampling.temperature, "seed": sampling.seed, "stream": True, "logprobs": 0, "ignore_eos": True}
    res = HTTPResult(prompt, [], [], time.perf_counter())
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    continue
                for choice in chunk["choices"]:
                    got = (choice.get("logprobs") or {}).get("tokens") or []
                    res.tokens += got
                    res.token_times += [now] * len(got)
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _run(url: str, model: str, reqs, api_key: str | None, progress) -> list[HTTPResult]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=None, limits=limits) as http:
        t0 = time.perf_counter()

        async def tracked(p, s, a):
            r = await _one(http, model, p, s, t0 + a)
            progress.update(1)
            return r
        return await asyncio.gather(*(tracked(p, s, a) for p, s, a in reqs))


def run_http(url: str, reqs, api_key: str | None = None, desc: str = "http") -> list[HTTPResult]:
    """Sends the workload (prompt ids, sampling, arrival offset) and waits for every answer."""
    from tqdm import tqdm

    model = model_card(url, api_key)["id"]
    with tqdm(total=len(reqs), desc=desc, unit="req", leave=False) as bar:
        return asyncio.run(_run(url, model, reqs, api_key, bar))
