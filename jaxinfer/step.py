"""The jitted serving step: any mix of decode rows and prefill chunks over the paged KV cache.

Tokens are flat: `num_decode_rows` rows of one token, then prefill rows of `Tp` tokens each (a
chunk shorter than Tp is padded; padding writes go to slot P * C and are dropped). All token-wise
work (projections, MLP) runs once over the flat tokens; attention runs per group through the
`kernels.paged_attention` dispatcher. A decode row's input token may be the one the previous step
sampled, still on device (`prev_index`), so the host never waits for it before dispatching.
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.cache import PagedKVCache
from jaxinfer.kernels.paged_attention import paged_attention
from jaxinfer.sampling import SamplingParams, sample

TRACES = {"step": 0}  # python traces of the step (tests count them)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One step's view, built by the host scheduler. N = Bd + Bp * Tp tokens; R = Bd + Bp rows."""

    tokens: jax.Array  # [N] int32 (ignored where prev_index >= 0)
    positions: jax.Array  # [N] int32
    slots: jax.Array  # [N] int32 flat cache slot, P * C for padding
    prev_index: jax.Array  # [N] int32: >= 0 takes the previous step's sampled token at that row
    block_table: jax.Array  # [R, Pmax] int32
    kv_lens: jax.Array  # [R] int32, kv length of the row after this step (0 for padding rows)
    logits_index: jax.Array  # [R] int32, flat index of the token whose logits the row samples
    sample_step: jax.Array  # [R] int32, tokens the request generated so far (key fold-in)
    sampling: SamplingParams  # [R] each


def paged_attend(cache: PagedKVCache, layer, q, k, v, *, batch: StepBatch, num_decode_rows: int,
                 sliding_window, impl: str):
    """q [1, N, Nh, H], k/v [1, N, K, H] -> (cache with k/v written, attention output [1, N, Nh, H])."""
    cache = cache.write(layer, k[0], v[0], batch.slots)
    bd = num_decode_rows
    n, nh, h = q.shape[1:]
    bp = batch.block_table.shape[0] - bd
    tp = (n - bd) // bp if bp else 0
    attend = partial(paged_attention, k_pages=cache.k[layer], v_pages=cache.v[layer],
                     sliding_window=sliding_window, impl=impl)
    parts = []
    if bd:
        out = attend(q[0, :bd, None], block_table=batch.block_table[:bd], kv_lens=batch.kv_lens[:bd],
                     q_positions=batch.positions[:bd, None])
        parts.append(out.reshape(bd, nh, h))
    if bp:
        out = attend(q[0, bd:].reshape(bp, tp, nh, h), block_table=batch.block_table[bd:],
                     kv_lens=batch.kv_lens[bd:], q_positions=batch.positions[bd:].reshape(bp, tp))
        parts.append(out.reshape(bp * tp, nh, h))
    return cache, jnp.concatenate(parts)[None]


# The host uploads a step as two flat buffers (one transfer each instead of thirteen).
INT_FIELDS = ("tokens", "positions", "slots", "prev_index", "block_table", "kv_lens", "logits_index",
              "sample_step", "top_k", "seed")
FLOAT_FIELDS = ("temperature", "top_p", "min_p")


def pack(arrays: dict) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Host: (int32 buffer, float32 buffer, static layout) from a plan's arrays."""
    ints = np.concatenate([arrays[k].astype(np.uint32).view(np.int32).ravel() if k == "seed"
                           else arrays[k].ravel() for k in INT_FIELDS])
    floats = np.concatenate([arrays[k].ravel() for k in FLOAT_FIELDS])
    layout = (arrays["tokens"].shape[0], *arrays["block_table"].shape)  # (N, R, Pmax)
    return ints, floats, layout


def unpack(ints, floats, layout) -> StepBatch:
    """Device: the StepBatch views of the two buffers (static slices)."""
    n, r, w = layout
    sizes = {"tokens": n, "positions": n, "slots": n, "prev_index": n, "block_table": r * w}
    out, at = {}, 0
    for k in INT_FIELDS:
        size = sizes.get(k, r)
        out[k], at = ints[at:at + size], at + size
    out["block_table"] = out["block_table"].reshape(r, w)
    f = {k: floats[i * r:(i + 1) * r] for i, k in enumerate(FLOAT_FIELDS)}
    sampling = SamplingParams(f["temperature"], out["top_k"], f["top_p"], f["min_p"],
                              jax.lax.bitcast_convert_type(out["seed"], jnp.uint32))
    return StepBatch(out["tokens"], out["positions"], out["slots"], out["prev_index"], out["block_table"],
                     out["kv_lens"], out["logits_index"], out["sample_step"], sampling)


def step(graphdef, param_def, param_leaves, cache: PagedKVCache, ints, floats, prev_tokens, *, layout: tuple,
         num_decode_rows: int, attention_impl: str = "auto"):
    """-> (cache, sampled tokens [Rmax], logprobs [Rmax]), rows past R zero-padded so that the
    output, which feeds the next step as `prev_tokens`, has one shape whatever the bucket.

    Params come as a flat list of arrays (`param_def` rebuilds the nnx.State inside the trace):
    flattening a list is C++-fast, an nnx.State is not (~1 ms per step for 180 leaves)."""
    TRACES["step"] += 1
    batch = unpack(ints, floats, layout)
    model = nnx.merge(graphdef, jax.tree.unflatten(param_def, param_leaves))
    prev = prev_tokens[jnp.clip(batch.prev_index, 0, prev_tokens.shape[0] - 1)]
    tokens = jnp.where(batch.prev_index >= 0, prev, batch.tokens)
    attend = partial(paged_attend, batch=batch, num_decode_rows=num_decode_rows,
                     sliding_window=model.cfg.sliding_window, impl=attention_impl)
    hidden, cache = model(tokens[None], batch.positions[None], cache, attend=attend)
    logits = model.logits(hidden[0, batch.logits_index])  # [R, V]
    new, logprobs = sample(logits, batch.sampling, batch.sample_step)
    pad = prev_tokens.shape[0] - new.shape[0]
    return cache, jnp.pad(new, (0, pad)), jnp.pad(logprobs, (0, pad))


@functools.cache
def compile_step(graphdef, param_def, num_decode_rows: int, attention_impl: str = "auto", out_shardings=None):
    """The jitted step for one decode-row count (a shape bucket); the cache is donated. Cached, so
    engines over the same model structure share compilations. On a mesh, `out_shardings` pins
    (cache, tokens, logprobs) so the donated cache keeps its layout from step to step."""
    fn = partial(step, graphdef, param_def, num_decode_rows=num_decode_rows, attention_impl=attention_impl)
    if out_shardings is None:
        return jax.jit(fn, donate_argnums=(1,), static_argnames=("layout",))
    return jax.jit(fn, donate_argnums=(1,), static_argnames=("layout",), out_shardings=out_shardings)


@partial(jax.jit, donate_argnums=(0,))
def poison_pages(cache: PagedKVCache, pages):
    """Debug: NaN into freed pages [n] (padding entries = P, dropped)."""
    return cache.poison(pages)
