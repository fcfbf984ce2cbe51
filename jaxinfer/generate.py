"""The dense-KV baseline `generate()`: one jitted prefill, then one jitted `lax.while_loop` decode.

Rows are right-padded: row b's prompt occupies cache slots [0, len_b) and its n-th new token is fed
at slot len_b + n. Pad tokens write slots that the row overwrites before it ever attends to them,
so causal masking by position is all the masking needed and each row computes what it would alone.
Shapes are bucketed (rows, prompt length, new tokens); everything else is a per-row array.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.cache import DenseKVCache
from jaxinfer.config import DecodeConfig, SamplingConfig
from jaxinfer.models import Model, dtype_of
from jaxinfer.sampling import SamplingParams, sample
from jaxinfer.scheduler import bucket, check_token_ids, validate

TRACES: collections.Counter = collections.Counter()  # python traces per function (tests count them)
PAD = -1


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of one `generate` call; compile time is reported apart."""

    compile_s: float = 0.0  # 0 when every bucket was already compiled
    prefill_s: float = 0.0  # to the first token of every row (the batch's TTFT)
    decode_s: float = 0.0  # the decode loop, after the first token
    num_prompt_tokens: int = 0
    num_new_tokens: int = 0
    num_decoded: int = 0  # new tokens made by the decode loop (each row's first comes from prefill)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.num_decoded / self.decode_s if self.decode_s else float("nan")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # per prompt, the new tokens (a stop token included, as in HF)
    finish_reasons: list[str]  # "stop" (a stop id or string) or "length" (max_new_tokens)
    logprobs: list[list[float]] | None
    timing: Timing
    seeds: list[int] = dataclasses.field(default_factory=list)  # per prompt: pass back to repeat it
    texts: list[str] | None = None  # with a tokenizer: the decoded new tokens, cut before a stop string


def _prefill(graphdef, params, tokens, lengths, sampling, *, cache_len):
    """tokens [B, T], lengths [B] -> (cache, first tokens [B], their logprobs [B])."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    b, t = tokens.shape
    cache = DenseKVCache.zeros(cfg.num_layers, b, cache_len, cfg.num_kv_heads, cfg.head_dim, dtype_of(cfg.dtype))
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, cache = model(tokens, positions, cache, kv_len=t)
    last = hidden[jnp.arange(b), lengths - 1]  # [B, D]
    tok, lp = sample(model.logits(last), sampling, jnp.zeros(b, jnp.int32))
    return cache, tok, lp


def _decode(graphdef, params, cache, first, first_lp, lengths, max_new, stop_ids, sampling, *, max_steps):
    """Decodes until every row is done or `max_steps` tokens exist. Returns tokens [B, M], logprobs."""
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, params)
    b = first.shape[0]
    is_stop = lambda tok: jnp.any(tok[:, None] == stop_ids, axis=-1)  # noqa: E731
    out = jnp.full((b, max_steps), PAD, jnp.int32).at[:, 0].set(first)
    lps = jnp.zeros((b, max_steps), jnp.float32).at[:, 0].set(first_lp)
    done = is_stop(first) | (max_new <= 1)

    def cond(state):
        _, step, _, done, _, _ = state
        return (step < max_steps) & ~jnp.all(done)

    def body(state):
        cache, step, tok, done, out, lps = state
        pos = lengths + step - 1  # the token fed now was generated at index step - 1
        hidden, cache = model(tok[:, None], pos[:, None], cache)
        new, lp = sample(model.logits(hidden[:, 0]), sampling, jnp.full((b,), step, jnp.int32))
        new = jnp.where(done, PAD, new)
        out = out.at[:, step].set(new)
        lps = lps.at[:, step].set(lp)
        done = done | is_stop(new) | (step + 1 >= max_new)
        return cache, step + 1, new, done, out, lps

    state = (cache, jnp.int32(1), first, done, out, lps)
    _, _, _, _, out, lps = jax.lax.while_loop(cond, body, state)
    return out, lps


_COMPILED: dict[tuple, tuple] = {}  # (graphdef, param dtypes, buckets) -> (prefill, decode) executables


class Generator:
    """Compiles prefill and decode once per shape bucket; executables are shared by every
    Generator over the same model structure, across calls."""

    def __init__(self, model: Model, decode: DecodeConfig = DecodeConfig(), reserve_len: int | None = None):
        """reserve_len: give every row a dense cache of this many positions (static batching's
        reservation for the maximum length) instead of the smallest bucket that fits."""
        self.model = model
        self.decode_cfg = decode
        self.reserve_len = reserve_len

    def _executables(self, rows, prompt_len, max_steps, num_stops, args):
        cache_len = self.reserve_len or bucket(prompt_len + max_steps, self.decode_cfg.length_buckets,
                                               "prompt + new tokens")
        if cache_len < prompt_len + max_steps:
            raise ValueError(f"reserve_len={cache_len} is shorter than the prompt bucket {prompt_len} plus "
                             f"{max_steps} new tokens")
        key = (self.model.graphdef, rows, prompt_len, max_steps, num_stops, cache_len)
        if key in _COMPILED:
            return _COMPILED[key], 0.0
        t0 = time.perf_counter()
        graphdef = self.model.graphdef
        prefill = jax.jit(partial(_prefill, graphdef, cache_len=cache_len))
        tokens, lengths, sampling, max_new, stops = args
        prefill_c = prefill.lower(self.model.params, tokens, lengths, sampling).compile()
        cache, first, lp = jax.eval_shape(prefill, self.model.params, tokens, lengths, sampling)
        decode = jax.jit(partial(_decode, graphdef, max_steps=max_steps))
        decode_c = decode.lower(self.model.params, cache, first, lp, lengths, max_new, stops, sampling).compile()
        _COMPILED[key] = (prefill_c, decode_c)
        return _COMPILED[key], time.perf_counter() - t0

    def compiled_hlo(self) -> dict[str, str]:
        """{"prefill": ..., "decode": ...}: the optimized HLO of the last generate()'s executables."""
        if not hasattr(self, "_last"):
            raise ValueError("compiled_hlo: call generate() first")
        return {"prefill": self._last[0].as_text(), "decode": self._last[1].as_text()}

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig | list[SamplingConfig] = SamplingConfig(),
                 stop_ids: tuple[int, ...] | None = None, tokenizer=None) -> GenerationResult:
        """Generates for each prompt (lists of token ids); each row as if it ran alone.

        stop_ids: None = the model's own (its folder's generation_config.json). `tokenizer` (needed
        for `sampling.stop` strings) also fills `texts`; a row stops at the first stop string."""
        configs = [validate(s).with_seed() for s in (sampling if isinstance(sampling, (list, tuple))
                                                     else [sampling] * len(prompts))]
        if not prompts or len(configs) != len(prompts):
            raise ValueError(f"need one sampling config per prompt and at least one prompt; got "
                             f"{len(prompts)} prompts and {len(configs)} configs")
        if tokenizer is None and any(s.stop for s in configs):
            raise ValueError(f"sampling.stop={list(next(s.stop for s in configs if s.stop))}: stop strings need "
                             "the text: pass tokenizer= to generate()")
        stop_ids = self.model.cfg.stop_ids if stop_ids is None else tuple(stop_ids)
        context = self.model.cfg.max_position_embeddings
        prompts = [check_token_ids(p, self.model.cfg.vocab_size, f"prompt {i}") for i, p in enumerate(prompts)]
        for i, (p, s) in enumerate(zip(prompts, configs)):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
            if len(p) + s.max_new_tokens > context:
                raise ValueError(f"prompt {i} has {len(p)} tokens and asks for {s.max_new_tokens} new ones: "
                                 f"{len(p) + s.max_new_tokens} exceeds the model's context of {context}; "
                                 f"shorten the prompt or lower max_new_tokens")
        rows = bucket(len(prompts), self.decode_cfg.batch_buckets, "number of prompts")
        prompt_len = bucket(max(map(len, prompts)), self.decode_cfg.length_buckets, "prompt length")
        max_steps = bucket(max(s.max_new_tokens for s in configs), self.decode_cfg.length_buckets, "max_new_tokens")
        tokens = np.zeros((rows, prompt_len), np.int32)
        lengths = np.ones(rows, np.int32)
        max_new = np.ones(rows, np.int32)
        for i, (p, s) in enumerate(zip(prompts, configs)):
            tokens[i, : len(p)], lengths[i], max_new[i] = p, len(p), s.max_new_tokens
        stops = np.full((rows, max(1, len(stop_ids))), PAD, np.int32)
        stops[:, : len(stop_ids)] = stop_ids
        params = SamplingParams.from_configs(configs, rows)
        args = (tokens, lengths, params, max_new, stops)
        (prefill, decode), compile_s = self._executables(rows, prompt_len, max_steps, stops.shape[1], args)
        self._last = (prefill, decode)

        t0 = time.perf_counter()
        cache, first, first_lp = prefill(self.model.params, tokens, lengths, params)
        first.block_until_ready()
        t1 = time.perf_counter()
        out, lps = decode(self.model.params, cache, first, first_lp, lengths, max_new, stops, params)
        out, lps = np.asarray(out), np.asarray(lps)
        t2 = time.perf_counter()
        return self._result(out, lps, len(prompts), configs, stop_ids, tokenizer,
                            Timing(compile_s, t1 - t0, t2 - t1, int(sum(map(len, prompts)))))

    @staticmethod
    def _result(out, lps, n, configs, stop_ids, tokenizer, timing) -> GenerationResult:
        tokens, reasons, logprobs, texts = [], [], [], []
        for i in range(n):
            row = out[i][out[i] != PAD][: configs[i].max_new_tokens].tolist()
            reason = "stop" if row and row[-1] in stop_ids else "length"
            if tokenizer is not None:
                row, text, hit = cut_at_stop_string(row, configs[i].stop, tokenizer.decode)
                reason = "stop" if hit else reason
                texts.append(text)
            tokens.append(row)
            logprobs.append(lps[i, : len(row)].tolist())
            reasons.append(reason)
        timing.num_new_tokens = sum(map(len, tokens))
        timing.num_decoded = timing.num_new_tokens - n
        want_lp = any(c.logprobs for c in configs)
        return GenerationResult(tokens, reasons, logprobs if want_lp else None, timing,
                                [c.seed for c in configs], texts if tokenizer is not None else None)


def cut_at_stop_string(tokens: list[int], stops, decode) -> tuple[list[int], str, bool]:
    """(tokens up to the one that completes the first stop string, their text cut before it, hit).
    The engine stops a request at that same token, so both paths return the same tokens."""
    text = decode(tokens)
    if not any(s in text for s in stops):
        return tokens, text, False
    n = next(k for k in range(1, len(tokens) + 1) if any(s in decode(tokens[:k]) for s in stops))
    text = decode(tokens[:n])
    return tokens[:n], text[: min(text.index(s) for s in stops if s in text)], True


def generate(model: Model, prompts: list[list[int]], sampling: SamplingConfig | list[SamplingConfig] = SamplingConfig(),
             stop_ids: tuple[int, ...] | None = None, decode: DecodeConfig = DecodeConfig(),
             tokenizer=None) -> GenerationResult:
    """One-shot convenience over `Generator` (which keeps compiled buckets across calls)."""
    return Generator(model, decode).generate(prompts, sampling, stop_ids, tokenizer)
