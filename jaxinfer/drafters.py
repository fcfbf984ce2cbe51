"""HOST ONLY (no jax): n-gram (prompt lookup) proposals over a request's known tokens."""

from __future__ import annotations

import numpy as np


def ngram_propose(tokens: list[int], k: int, ngram_min: int, ngram_max: int) -> list[int] | None:
    """k drafts: what followed the most recent earlier occurrence of the longest suffix n-gram
    (n from ngram_max down to ngram_min), or None when no suffix occurred before.

    A continuation shorter than k is padded with its last token: any deterministic guess keeps
    verification exact (it is a one-hot draft), a wrong one is only rejected."""
    arr = np.asarray(tokens)
    size = len(arr)
    ends = np.flatnonzero(arr[:-1] == arr[-1])  # earlier occurrences of the last token (1-gram matches)
    if not len(ends):
        return None
    length = np.ones(len(ends), np.int64)  # how far back each match extends, up to ngram_max
    alive = np.ones(len(ends), bool)
    for n in range(2, min(ngram_max, size - 1) + 1):
        alive &= (ends >= n - 1) & (arr[np.maximum(ends - n + 1, 0)] == arr[size - n])
        length += alive
    best = length.max()
    if best < ngram_min:
        return None
    start = int(ends[np.flatnonzero(length == best)[-1]]) + 1  # the most recent of the longest
    follow = tokens[start:start + k]
    return follow + [follow[-1]] * (k - len(follow))
