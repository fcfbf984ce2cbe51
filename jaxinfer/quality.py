"""The quality gate: what a lossy switch (quantized weights, W8A8, a quantized KV cache) or a
supposedly lossless one (speculative decoding) costs against the float model, measured.

Teacher-forced, on held-out text: every window runs through the serving path's paged attention
(`step.forward` over a `PagedKVCache` of the variant's KV dtype, so quantized pages are written and
read back exactly as the engine does), giving the next-token distributions from which
`teacher_forced` computes perplexity, the mean and p99 of the per-token KL(float || variant), and
top-1 agreement. Free-running: `continuations` decodes story openings greedily through the
`Engine` (speculative decoding included) keeping each token's full distribution, and `greedy`
reports how much of the float model's continuation the variant reproduces and the KL of its
distributions along the common prefix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer import step as step_mod
from jaxinfer.cache import PagedKVCache
from jaxinfer.config import EngineConfig, SamplingConfig
from jaxinfer.messages import Layout
from jaxinfer.models import Model
from jaxinfer.sampling import SamplingParams


def paged_log_probs(model: Model, windows: np.ndarray, kv_cache_dtype: str = "auto", *, page_size: int = 16,
                    batch: int = 8, attention_impl: str = "auto") -> np.ndarray:
    """[n, T, V] float32 next-token log-probabilities of `model` on windows[:, :-1] ([n, T + 1]
    tokens), each window one prefill row of the serving step over a KV cache of `kv_cache_dtype`
    (engine.kv_cache_dtype: its pages are written, then read by the attention)."""
    from jaxinfer.engine import kv_dtype

    x = np.asarray(windows[:, :-1], np.int32)
    n, t = x.shape
    dtype = kv_dtype(EngineConfig(kv_cache_dtype=kv_cache_dtype), model)
    width = -(-t // page_size)
    cfg = model.cfg
    layout = Layout(num_prefill_rows=batch, chunk=t, table_width=width)
    positions = np.tile(np.arange(t, dtype=np.int32), batch)
    rows = np.repeat(np.arange(batch, dtype=np.int32), t)
    slots = (rows * width + positions // page_size) * page_size + positions % page_size
    zeros_r = jnp.zeros(batch, jnp.int32)
    sb = step_mod.StepBatch(
        tokens=jnp.zeros(batch * t, jnp.int32), positions=jnp.asarray(positions), slots=jnp.asarray(slots),
        prev_index=jnp.full(batch * t, -1, jnp.int32),
        block_table=jnp.arange(batch * width, dtype=jnp.int32).reshape(batch, width),
        num_row_pages=jnp.full(batch, width, jnp.int32), kv_lens=jnp.full(batch, t, jnp.int32),
        logits_index=zeros_r, sample_step=zeros_r, targets=jnp.full(batch * t, -1, jnp.int32), draft_src=zeros_r - 1,
        sampling=SamplingParams.from_configs([], batch))  # unused: forward samples nothing

    @jax.jit
    def fn(params, tokens):
        mod = nnx.merge(model.graphdef, params)
        cache = PagedKVCache.zeros(cfg.num_layers, cfg.num_kv_heads, batch * width, page_size, cfg.head_dim, dtype)
        hidden, _ = step_mod.forward(mod, cache, tokens, dataclasses.replace(sb, tokens=tokens), layout, attention_impl)
        return jax.nn.log_softmax(mod.logits(hidden).astype(jnp.float32)).reshape(batch, t, -1)

    pad = -n % batch
    x = np.concatenate([x, np.zeros((pad, t), np.int32)])
    out = [np.asarray(fn(model.params, jnp.asarray(x[i:i + batch].reshape(-1)))) for i in range(0, len(x), batch)]
    return np.concatenate(out)[:n]


def kl_per_token(ref: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """KL(ref || lp) at every position of two [..., V] log-probability arrays (nats, >= 0)."""
    return np.maximum((np.exp(ref) * (ref - lp)).sum(-1), 0.0)


def teacher_forced(ref: np.ndarray, lp: np.ndarray, windows: np.ndarray) -> dict:
    """Perplexity of both on windows[:, 1:], KL(ref || lp) mean and p99 over tokens, top-1 agreement."""
    targets = windows[:, 1:, None]
    kl = kl_per_token(ref, lp)
    return {"ppl": float(np.exp(-np.take_along_axis(lp, targets, -1).mean())),
            "ppl_ref": float(np.exp(-np.take_along_axis(ref, targets, -1).mean())),
            "kl": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "agreement": float((lp.argmax(-1) == ref.argmax(-1)).mean()), "eval_tokens": int(targets.size)}


@dataclasses.dataclass
class Continuations:
    tokens: list[list[int]]  # greedy tokens per prompt
    log_probs: list[np.ndarray]  # [len(tokens), V] the distribution each token was chosen from


def continuations(engine, prompts: list[list[int]], num_tokens: int) -> Continuations:
    """Greedy continuations of `prompts` through `engine` (which must allow top_logprobs of the
    whole vocabulary: engine.max_top_logprobs >= vocab size), EOS ignored, with each generated
    token's full next-token distribution."""
    vocab = engine.model.cfg.vocab_size
    sampling = SamplingConfig(max_new_tokens=num_tokens, temperature=0.0, top_logprobs=vocab, seed=0)
    done = engine.generate(prompts, sampling, stop_ids=())
    failed = [c for c in done if c.error]
    if failed:
        raise ValueError(f"{len(failed)} continuation(s) failed: {failed[0].error}")
    dists = []
    for c in done:
        lp = np.full((len(c.tokens), vocab), -np.inf, np.float32)
        for i, top in enumerate(c.top_logprobs):
            ids, vals = zip(*top)
            lp[i, list(ids)] = vals
        dists.append(lp)
    return Continuations([list(c.tokens) for c in done], dists)


def greedy(ref: Continuations, var: Continuations) -> dict:
    """greedy_agreement: the mean fraction of the float model's continuation that the variant
    reproduces before it first differs (1.0: identical); gen_kl: mean KL(float || variant) of the
    distributions along those common prefixes (the same contexts on both sides)."""
    fractions, kls = [], []
    for a, b, la, lb in zip(ref.tokens, var.tokens, ref.log_probs, var.log_probs):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fractions.append(same / max(len(a), 1))
        n = min(same + 1, len(a), len(b))  # the first differing token was still chosen in a common context
        kls.append(kl_per_token(la[:n], lb[:n]))
    kl = np.concatenate(kls)
    return {"greedy_agreement": float(np.mean(fractions)), "gen_kl": float(kl.mean()) if kl.size else float("nan"),
            "gen_kl_max": float(kl.max()) if kl.size else float("nan"), "greedy_tokens": int(sum(map(len, ref.tokens)))}


def reference_config(cfg):
    """The float model of a run config: no weight quantization (any form), KV pages in the model's
    dtype, no speculative decoding; everything else (checkpoint, dtype, engine shape) the same."""
    from jaxinfer.models import float_config

    m = dataclasses.replace(float_config(cfg.model), quant_method="rtn")
    e = dataclasses.replace(cfg.engine, kv_cache_dtype="auto",
                            speculative=dataclasses.replace(cfg.engine.speculative, method="none"))
    return dataclasses.replace(cfg, model=m, engine=e)


def gate_engine_config(cfg, model: Model) -> EngineConfig:
    """cfg.engine able to return every generated token's whole distribution (max_top_logprobs)."""
    return dataclasses.replace(cfg.engine, max_top_logprobs=max(cfg.engine.max_top_logprobs, model.cfg.vocab_size))


def evaluate(cfg, model: Model, tok, draft, windows: np.ndarray, prompts: list[list[int]], greedy_tokens: int,
             reference: dict) -> dict:
    """One variant's row of the gate against `reference`, a dict `evaluate_reference` filled:
    bytes (KV per token as the pages store it, weights as stored), teacher-forced metrics on
    `windows` and greedy metrics over `prompts`."""
    from jaxinfer.engine import Engine
    from jaxinfer.experiment.machine import footprint

    fp = footprint(model, cfg.engine)
    row = {"kv_bytes_per_token": fp.kv_bytes_per_token, "weight_mib": fp.streamed_bytes / 2**20}
    row |= teacher_forced(reference["log_probs"], paged_log_probs(model, windows, cfg.engine.kv_cache_dtype,
                                                                  attention_impl=cfg.engine.attention_impl), windows)
    if greedy_tokens:
        engine = Engine(model, tok, gate_engine_config(cfg, model), stop_ids=(), draft=draft)
        row |= greedy(reference["continuations"], continuations(engine, prompts, greedy_tokens))
    return row


def evaluate_reference(cfg, windows: np.ndarray, prompts: list[list[int]], greedy_tokens: int, build) -> dict:
    """The float reference of cfg (`reference_config`), built by `build(cfg) -> (model, tok)`:
    its log-probabilities on `windows` and its greedy continuations of `prompts`."""
    from jaxinfer.engine import Engine

    from jaxinfer.models import is_quantized

    ref_cfg = reference_config(cfg)
    model, tok = build(ref_cfg)
    if is_quantized(model.cfg):
        raise ValueError(f"checkpoint '{cfg.checkpoint}' is saved quantized: it has no float model to compare "
                         "with; evaluate its float source with the quantization as overrides (e.g. model.quant=int4)")
    out = {"log_probs": paged_log_probs(model, windows, "auto", attention_impl=cfg.engine.attention_impl)}
    if greedy_tokens:
        engine = Engine(model, tok, gate_engine_config(ref_cfg, model), stop_ids=())
        out["continuations"] = continuations(engine, prompts, greedy_tokens)
    return out
