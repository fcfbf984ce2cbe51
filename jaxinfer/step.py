"""The jitted serving step: any mix of decode rows, verify rows and prefill chunks over the paged KV cache.

Tokens are flat, group after group (`messages.Layout`): decode rows of one token, verify rows of
k + 1 (the last token and k drafts), prefill rows of `chunk` tokens (a shorter chunk is padded;
padding writes go to slot P * C and are dropped). Token-wise work (projections, MLP) runs once
over the flat tokens; attention runs per group through the `kernels.paged_attention` dispatcher.
A decode row's input token may be the one the previous step sampled, still on device
(`prev_index`), so the host never waits for it before dispatching. Verify rows accept a prefix of
their drafts by exact rejection sampling (`sampling.verify`); with a draft model, the same step
then proposes every row's next k drafts (`speculative.draft_step`).
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer import messages
from jaxinfer.cache import PagedKVCache
from jaxinfer.kernels.paged_attention import paged_attention
from jaxinfer.messages import Layout
from jaxinfer.sampling import SamplingParams, sample, verify

TRACES = {"step": 0}  # python traces of the step (tests count them)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One step's view, built by the host scheduler (fields: messages.FIELDS). N tokens, R rows."""

    tokens: jax.Array  # [N] int32 (ignored where prev_index >= 0)
    positions: jax.Array  # [N] int32
    slots: jax.Array  # [N] int32 flat cache slot, P * C for padding
    prev_index: jax.Array  # [N] int32: >= 0 takes the previous step's last sampled token at that row
    block_table: jax.Array  # [R, W] int32
    num_row_pages: jax.Array  # [R] int32 valid block-table entries
    kv_lens: jax.Array  # [R] int32, kv length of the row after this step (0 for padding rows)
    logits_index: jax.Array  # [R] int32, flat index of the row's first sampled token
    sample_step: jax.Array  # [R] int32, tokens the request generated so far (key fold-in)
    targets: jax.Array  # [N] int32, scoring steps: the next prompt token to score at each position, -1 none
    draft_src: jax.Array  # [R] int32, verify rows: previous step's row of the drafts' probabilities, -1 one-hot
    sampling: SamplingParams  # [R] each


def unpack(ints, floats, layout: Layout) -> StepBatch:
    """Device: the StepBatch views of the two uploaded buffers (static slices from messages.offsets)."""
    buffers = {"ints": ints, "floats": floats}
    out = {}
    for name, (buf, start, shape, dtype) in messages.offsets(layout).items():
        x = buffers[buf][start:start + int(np.prod(shape))].reshape(shape)
        out[name] = jax.lax.bitcast_convert_type(x, jnp.uint32) if dtype == "uint32" else x
    sampling = SamplingParams(*(out.pop(k) for k in messages.SAMPLING_FIELDS))
    return StepBatch(**out, sampling=sampling)


def paged_attend(cache: PagedKVCache, layer, q, k, v, *, batch: StepBatch, layout: Layout, sliding_window,
                 impl: str):
    """q [1, N, Nh, H], k/v [1, N, K, H] -> (cache with k/v written, attention output [1, N, Nh, H])."""
    cache = cache.write(layer, k[0], v[0], batch.slots)
    nh, h = q.shape[2:]
    # the whole cache and the layer: the dispatcher slices, or a CPU kernel reads the layer in place
    attend = partial(paged_attention, k_pages=cache.k, v_pages=cache.v, k_scales=cache.k_scale,
                     v_scales=cache.v_scale, layer=layer, sliding_window=sliding_window, impl=impl)
    parts = []
    for g in layout.groups:
        rows, toks = slice(g.first_row, g.first_row + g.num_rows), slice(g.first_token, g.first_token + g.num_rows * g.query_len)
        out = attend(q[0, toks].reshape(g.num_rows, g.query_len, nh, h), block_table=batch.block_table[rows],
                     kv_lens=batch.kv_lens[rows], q_positions=batch.positions[toks].reshape(g.num_rows, g.query_len))
        parts.append(out.reshape(g.num_rows * g.query_len, nh, h))
    return cache, jnp.concatenate(parts)[None]


TOKEN_FIELDS = {f.name for f in messages.FIELDS if f.per == "token"}


def group_batch(batch: StepBatch, layout: Layout, g) -> tuple[StepBatch, Layout, slice]:
    """One row group of the step as a step of its own: (batch, layout, its flat-token slice)."""
    rows, toks = slice(g.first_row, g.first_row + g.num_rows), slice(g.first_token, g.first_token + g.num_rows * g.query_len)
    sub = StepBatch(**{f.name: jax.tree.map(lambda x: x[toks if f.name in TOKEN_FIELDS else rows], getattr(batch, f.name))
                       for f in dataclasses.fields(StepBatch)})
    return sub, Layout(num_prefill_rows=g.num_rows, chunk=g.query_len, table_width=layout.table_width), toks


def forward(model, cache, tokens, batch: StepBatch, layout: Layout, impl: str):
    """The model over the step's flat tokens [N] -> (final hidden [N, D], cache)."""
    attend = partial(paged_attend, batch=batch, layout=layout, sliding_window=model.cfg.sliding_window, impl=impl)
    hidden, cache = model(tokens[None], batch.positions[None], cache, attend=attend)
    return hidden[0], cache


def _rows(params: SamplingParams, idx) -> SamplingParams:
    return jax.tree.map(lambda x: x[idx], params)


def sample_rows(model, hidden, tokens, batch: StepBatch, layout: Layout, draft_probs=None):
    """Plain rows (decode, prefill) sample one token at logits_index; verify rows score all k + 1
    and keep a prefix of their drafts. -> (tokens [R, k+1], num_new [R], logprobs [R, k+1]).
    draft_probs [Rmax, k, V]: the previous step's draft-model proposals (None: n-gram drafts)."""
    k, num_rows = layout.num_drafts, layout.num_rows
    plain = np.array([r for g in layout.groups if g.name != "verify"
                      for r in range(g.first_row, g.first_row + g.num_rows)], np.int32)
    out_tokens = jnp.zeros((num_rows, k + 1), jnp.int32)
    out_logprobs = jnp.zeros((num_rows, k + 1), jnp.float32)
    num_new = jnp.ones(num_rows, jnp.int32)
    if len(plain):
        logits = model.logits(hidden[batch.logits_index[plain]])  # [Rp, V]
        new, lp = sample(logits, _rows(batch.sampling, plain), batch.sample_step[plain])
        out_tokens, out_logprobs = out_tokens.at[plain, 0].set(new), out_logprobs.at[plain, 0].set(lp)
    for g in (g for g in layout.groups if g.name == "verify"):
        rows = np.arange(g.first_row, g.first_row + g.num_rows)
        toks = slice(g.first_token, g.first_token + g.num_rows * g.query_len)
        logits = model.logits(hidden[toks]).reshape(g.num_rows, k + 1, -1)  # [Bv, k+1, V]
        drafts = tokens[toks].reshape(g.num_rows, k + 1)[:, 1:]
        q = jax.nn.one_hot(drafts, logits.shape[-1], dtype=jnp.float32)  # n-gram drafts: deterministic
        if draft_probs is not None:  # the draft model's own distributions, from the step that proposed them
            src = batch.draft_src[rows]
            q = jnp.where((src >= 0)[:, None, None], draft_probs[jnp.clip(src, 0, draft_probs.shape[0] - 1)], q)
        new, n, lp = verify(logits, drafts, q, _rows(batch.sampling, rows), batch.sample_step[rows])
        out_tokens, out_logprobs, num_new = out_tokens.at[rows].set(new), out_logprobs.at[rows].set(lp), num_new.at[rows].set(n)
    return out_tokens, num_new, out_logprobs


def score_tokens(model, hidden, targets, num_top: int):
    """A scoring step's every position: hidden [N, D], targets [N] -> (logprob of the target [N],
    0 where none; the num_top most likely next tokens [N, n] and their logprobs [N, n]). The
    logits of all N tokens: only layouts with `scores` pay for them."""
    logprobs = jax.nn.log_softmax(model.logits(hidden), axis=-1)  # [N, V]
    target = jnp.take_along_axis(logprobs, jnp.clip(targets, 0)[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, num_top) if num_top else (
        jnp.zeros((len(targets), 0), jnp.float32), jnp.zeros((len(targets), 0), jnp.int32))
    return jnp.where(targets >= 0, target, 0.0), top_ids.astype(jnp.int32), top_lp


def step(graphdef, param_def, param_leaves, cache: PagedKVCache, ints, floats, prev_tokens, draft_leaves=None,
         draft=None, *, layout: Layout, attention_impl: str = "auto", draft_graphdef=None, draft_param_def=None,
         num_top_logprobs: int = 0):
    """-> (cache, draft, last [Rmax], tokens [Rmax, k+1], num_new [Rmax], logprobs [Rmax, k+1],
    drafts [Rmax, k], scores); rows past R are zero so every output has one shape whatever the bucket.
    scores: `score_tokens` of every flat token where layout.scores, else empty ([0], [0, n], [0, n]).
    `prev_tokens` [Rmax] is the previous step's `last` (each row's last sampled token).
    With a draft model: `draft_leaves` its params, `draft` (its cache, the probabilities
    [Rmax, k, V] of the previous step's proposals), returned with the new cache and proposals.

    Params come as a flat list of arrays (`param_def` rebuilds the nnx.State inside the trace):
    flattening a list is C++-fast, an nnx.State is not (~1 ms per step for 180 leaves)."""
    TRACES["step"] += 1
    batch = unpack(ints, floats, layout)
    r_max, k, num_rows = prev_tokens.shape[0], layout.num_drafts, layout.num_rows
    prev = prev_tokens[jnp.clip(batch.prev_index, 0, r_max - 1)]
    tokens = jnp.where(batch.prev_index >= 0, prev, batch.tokens)
    model = nnx.merge(graphdef, jax.tree.unflatten(param_def, param_leaves))
    hidden, cache = forward(model, cache, tokens, batch, layout, attention_impl)
    out_tokens, num_new, out_logprobs = sample_rows(model, hidden, tokens, batch, layout,
                                                    None if draft is None else draft[1])
    last = jnp.take_along_axis(out_tokens, (num_new - 1)[:, None], axis=1)[:, 0]
    pad = r_max - num_rows
    proposals = jnp.zeros((r_max, k), jnp.int32)
    if draft is not None:
        from jaxinfer.speculative import draft_step

        d_model = nnx.merge(draft_graphdef, jax.tree.unflatten(draft_param_def, draft_leaves))
        d_cache, drafts, probs = draft_step(d_model, draft[0], tokens, batch, layout, last, num_new, attention_impl)
        proposals = jnp.pad(drafts, ((0, pad), (0, 0)))
        draft = (d_cache, jnp.pad(probs, ((0, pad), (0, 0), (0, 0))))
    n = num_top_logprobs
    scores = (score_tokens(model, hidden, batch.targets, n) if layout.scores else
              (jnp.zeros(0, jnp.float32), jnp.zeros((0, n), jnp.int32), jnp.zeros((0, n), jnp.float32)))
    return (cache, draft, jnp.pad(last, (0, pad)), jnp.pad(out_tokens, ((0, pad), (0, 0))), jnp.pad(num_new, (0, pad)),
            jnp.pad(out_logprobs, ((0, pad), (0, 0))), proposals, scores)


def data_parallel(fn, mesh):
    """`step` as one step per shard of the mesh's `data` axis, in one program: shard d gets
    part d of the plan buffers and of `prev_tokens`, its range of cache pages (the host wrote
    local page ids and slots) and its rows of every output, so it runs exactly the step a single
    engine would over its own requests. Weights stay split over `model` (left to XLA inside)."""
    from jax.sharding import PartitionSpec as P

    rows = P("data")

    def sharded(param_leaves, cache, ints, floats, prev_tokens, draft_leaves=None, draft=None, *, layout):
        everywhere = partial(jax.tree.map, lambda _: P())
        pages = jax.tree.map(lambda _: P(None, None, "data"), cache)  # values [L, K, P, C, H], scales [L, K, P, C]
        draft_spec = None if draft is None else (jax.tree.map(lambda _: P(None, None, "data"), draft[0]), rows)
        in_specs = (everywhere(param_leaves), pages, rows, rows, rows, everywhere(draft_leaves), draft_spec)
        out_specs = (pages, draft_spec, rows, rows, rows, rows, rows, (rows, rows, rows))
        return jax.shard_map(partial(fn, layout=layout), mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             axis_names={"data"}, check_vma=False)(
            param_leaves, cache, ints, floats, prev_tokens, draft_leaves, draft)
    return sharded


@functools.cache
def compile_step(graphdef, param_def, attention_impl: str = "auto", out_shardings=None, draft_graphdef=None,
                 draft_param_def=None, num_top_logprobs: int = 0, data_mesh=None):
    """The jitted step (one executable per Layout, the static argument); the caches are donated.
    Cached, so engines over the same model structure share compilations. On a mesh,
    `out_shardings` pins the outputs so the donated cache keeps its layout from step to step;
    `data_mesh` (a mesh whose `data` axis has several shards) runs it data-parallel."""
    fn = partial(step, graphdef, param_def, attention_impl=attention_impl, draft_graphdef=draft_graphdef,
                 draft_param_def=draft_param_def, num_top_logprobs=num_top_logprobs)
    if data_mesh is not None:
        fn = data_parallel(fn, data_mesh)
    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(fn, donate_argnums=(1, 6), static_argnames=("layout",), **kw)


@partial(jax.jit, donate_argnums=(0,))
def poison_pages(cache: PagedKVCache, pages):
    """Debug: NaN into freed pages [n] (padding entries = P, dropped)."""
    return cache.poison(pages)
