"""Device: draft-model proposals. The draft keeps its own paged KV cache, addressed by the target's
block tables and allocator (same pages, same slots). It reads the prompt chunks the target
reads; every later token's draft KV it writes itself while proposing (the one it may lack, the
last accepted draft, is recomputed by the next proposal's first step). The k proposal steps run
in one `lax.scan` inside the serving step. Rejection sampling lives in `sampling.verify`."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.messages import Layout
from jaxinfer.sampling import draw, processed_probs


def draft_step(model, cache, tokens, batch, layout: Layout, last, num_new, impl: str):
    """The draft's part of a serving step, after the target sampled: it reads the step's prompt
    chunks, then proposes k tokens after each row's `last` [R] (num_new [R]: tokens the row kept).
    -> (draft cache, drafts [R, k], probabilities [R, k, V])."""
    from jaxinfer.step import forward, group_batch

    k = layout.num_drafts
    groups = {g.name: g for g in layout.groups}
    if "prefill" in groups:
        sub, sub_layout, toks = group_batch(batch, layout, groups["prefill"])
        _, cache = forward(model, cache, tokens[toks], sub, sub_layout, impl)
    # `last` sits where the row's kept tokens end: a verify row drops k + 1 - num_new of its k + 1.
    dropped = np.concatenate([np.full(g.num_rows, k + 1 if g.name == "verify" else 1) for g in layout.groups])
    start = batch.kv_lens - jnp.asarray(dropped, jnp.int32) + num_new
    before = tokens[batch.logits_index + num_new - 1]  # the kept token before `last`
    return propose(model, cache, batch, before, last, start, batch.sample_step + num_new, k, impl)


def propose(model, cache, batch, before, last, start, first_index, k: int, impl: str):
    """Proposes k tokens after `last` [R] (at positions `start` [R]) for every row.

    The first draft step also (re)computes the token `before` at start - 1: it is the last kept
    draft when all k were accepted, whose draft KV was never written (rewriting any other is a
    no-op). The proposals' KV goes to the row's own pages (a position past `num_row_pages` is
    dropped: the host only verifies what fits). `first_index` [R]: the first proposal's output
    index (its sampling key). -> (cache, drafts [R, k] int32, draft probabilities [R, k, V])."""
    from jaxinfer.step import paged_attend

    num_rows, width = batch.block_table.shape
    c = cache.page_size

    def run(cache, toks, pos, j):
        """toks, pos: [R, T] -> (cache, drafts [R], probs [R, V]) from each row's last token."""
        t = toks.shape[1]
        page = jnp.take_along_axis(batch.block_table, jnp.clip(pos // c, 0, width - 1), axis=1)
        ok = (pos // c < batch.num_row_pages[:, None]) & (batch.kv_lens[:, None] > 0)
        slots = jnp.where(ok, page * c + pos % c, cache.num_pages * c).reshape(-1)
        view = dataclasses.replace(batch, positions=pos.reshape(-1), slots=slots, kv_lens=pos[:, -1] + 1)
        layout = Layout(num_verify_rows=num_rows, num_drafts=t - 1, table_width=width)  # one group of T per row
        attend = partial(paged_attend, batch=view, layout=layout, sliding_window=model.cfg.sliding_window, impl=impl)
        hidden, cache = model(toks.reshape(1, -1), pos.reshape(1, -1), cache, attend=attend)
        logits = model.logits(hidden[0].reshape(num_rows, t, -1)[:, -1])  # [R, V]
        probs = processed_probs(logits, batch.sampling)
        return cache, draw(logits, probs, batch.sampling, first_index + j, purpose=3), probs

    cache, first, first_probs = run(cache, jnp.stack([before, last], 1), jnp.stack([start - 1, start], 1), 0)

    def body(carry, j):
        cache, tok = carry
        cache, new, probs = run(cache, tok[:, None], (start + j)[:, None], j)
        return (cache, new), (new, probs)

    (cache, _), (drafts, probs) = jax.lax.scan(body, (cache, first), jnp.arange(1, k))
    drafts = jnp.concatenate([first[:, None], drafts.T], axis=1)
    return cache, drafts, jnp.concatenate([first_probs[:, None], jnp.swapaxes(probs, 0, 1)], axis=1)
