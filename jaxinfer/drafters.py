"""HOST ONLY (no jax): n-gram (prompt lookup) proposals over a request's known tokens."""

from __future__ import annotations

import numpy as np


def ngram_propose(tokens: list[int], k: int, ngram_min: int, ngram_max: int) -> list[int] | None:
    """k drafts: what followed the most recent earlier occurrence of the longest suffix n-gram
    (n from ngram_max down to ngram_min), or None when no suffix occurred before.

    A continuation shorter than k is padded with its last token: any deterministic guess keeps
    verification exact (it is a one-hot draft), a wrong one is only rejected."""
    size = len(tokens)
    arr = np.asarray(tokens)
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:size - 1], n)  # starts 0 .. size-1-n
        hits = np.flatnonzero((windows == arr[size - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # most recent earlier occurrence (never the suffix itself)
            follow = tokens[start:start + k]
            return follow + [follow[-1]] * (k - len(follow))
    return None
