"""Device: draft-model proposals. The draft keeps its own paged KV cache, addressed by the target's
block tables and allocator (same pages, same slots), so it is kept in step simply by running over
the same tokens as the target in every step; then it proposes k tokens per row in one `lax.scan`.
Rejection sampling of the proposals lives in `sampling.verify`."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from jaxinfer.messages import Layout
from jaxinfer.sampling import draw, processed_probs


def propose(model, cache, batch, last, start, first_index, k: int, impl: str):
    """Proposes k tokens after `last` [R] (at positions `start` [R]) for every row.

    The proposals' KV goes to the row's own pages (a position past `num_row_pages` is dropped: the
    host only verifies what fits); the next step's verify group overwrites it.
    `first_index` [R]: the output index of the first proposal (its sampling key).
    -> (cache, drafts [R, k] int32, processed draft probabilities [R, k, V] float32)."""
    from jaxinfer.step import paged_attend

    num_rows, width = batch.block_table.shape
    c = cache.page_size
    layout = Layout(num_decode_rows=num_rows, table_width=width)

    def body(carry, j):
        cache, tok = carry
        pos = start + j
        page = jnp.take_along_axis(batch.block_table, jnp.clip(pos // c, 0, width - 1)[:, None], axis=1)[:, 0]
        ok = (pos // c < batch.num_row_pages) & (batch.kv_lens > 0)
        slots = jnp.where(ok, page * c + pos % c, cache.num_pages * c)
        view = dataclasses.replace(batch, positions=pos, slots=slots, kv_lens=pos + 1)

        attend = partial(paged_attend, batch=view, layout=layout, sliding_window=model.cfg.sliding_window, impl=impl)
        hidden, cache = model(tok[None], pos[None], cache, attend=attend)  # R rows as flat tokens, as in a step
        logits = model.logits(hidden[0])  # [R, V]
        probs = processed_probs(logits, batch.sampling)
        new = draw(logits, probs, batch.sampling, first_index + j, purpose=3)
        return (cache, new), (new, probs)

    (cache, _), (drafts, probs) = jax.lax.scan(body, (cache, last), jnp.arange(k))
    return cache, drafts.T, jnp.swapaxes(probs, 0, 1)
