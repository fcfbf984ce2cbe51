"""Perplexity of a long text through `Engine.score` (the serving step's prompt logprobs): the
tokens are cut into windows that fit the context; each token is scored once, in the first window
that holds it with at least one token before it."""

from __future__ import annotations

import math


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over positions [0, num_tokens)."""
    if window < 2:
        raise ValueError(f"window={window}: a window needs at least 2 tokens (one of context)")
    if not 1 <= stride < window:
        raise ValueError(f"stride={stride}: must be in [1, {window - 1}] (window - 1: windows overlap by one "
                         "token, so every token after the first has context)")
    out, start, scored_to = [], 0, 1
    while scored_to < num_tokens:
        end = min(start + window, num_tokens)
        if end > scored_to:
            out.append((start, end, scored_to))
            scored_to = end
        start += stride
    return out


def perplexity(engine, text: str, window: int | None = None, stride: int | None = None,
               progress: bool = True) -> dict:
    """exp(mean NLL) of `text`'s tokens after the first; also the NLL per token and bits per byte."""
    from tqdm import tqdm

    if engine.tokenizer is None:
        raise ValueError("perplexity needs an engine with a tokenizer")
    tokens = engine.tokenizer.encode(text)
    if len(tokens) < 2:
        raise ValueError(f"the text has {len(tokens)} token(s): perplexity needs at least 2")
    limit = engine.max_model_len - 1  # Engine.score generates one token after each window
    window = limit if window is None else window
    if window > limit:
        raise ValueError(f"window={window} exceeds the context: at most engine.max_model_len - 1 = {limit}")
    stride = window - 1 if stride is None else stride
    spans = windows(len(tokens), window, stride)
    nll, count = 0.0, 0
    batch = max(engine.cfg.max_num_seqs, 1)
    with tqdm(total=len(spans), desc="score", unit="window", disable=not progress, leave=False) as bar:
        for i in range(0, len(spans), batch):
            part = spans[i:i + batch]
            for (start, _, first), scored in zip(part, engine.score([tokens[s:e] for s, e, _ in part])):
                lps = scored.logprobs[first - start:]
                nll -= sum(lps)
                count += len(lps)
            bar.update(len(part))
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "num_scored": count,
            "num_windows": len(spans), "window": window, "stride": stride,
            "bits_per_byte": nll / math.log(2) / max(len(text.encode("utf-8")), 1)}
