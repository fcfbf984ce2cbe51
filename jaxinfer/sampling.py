"""Per-row sampling: greedy, temperature, top-k, top-p, min-p, with one key per row per step.

Every knob is a per-row array (never static), so a batch mixes greedy and sampled requests
without recompiling. Row keys are `fold_in(key(seed), step)`: a request's tokens depend on its
own seed and position only, never on what else is in the batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import SamplingConfig
from jaxinfer.scheduler import PAD_ROW


def validate(s: SamplingConfig) -> SamplingConfig:
    """Raises ValueError naming the field, the value and the allowed range."""

    def bad(field, why):
        raise ValueError(f"sampling.{field}={getattr(s, field)!r}: {why}")

    if not isinstance(s.max_new_tokens, int) or s.max_new_tokens <= 0:
        bad("max_new_tokens", "must be a positive integer (number of tokens to generate)")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        bad("temperature", "must be finite and >= 0 (0 means greedy)")
    if s.top_k < 0:
        bad("top_k", "must be >= 0 (0 disables top-k)")
    if not math.isfinite(s.top_p) or not 0 < s.top_p <= 1:
        bad("top_p", "must be in (0, 1] (1 disables top-p)")
    if not math.isfinite(s.min_p) or not 0 <= s.min_p <= 1:
        bad("min_p", "must be in [0, 1] (0 disables min-p)")
    if s.seed is not None and not 0 <= s.seed < 2**32:
        bad("seed", "must be in [0, 2**32), or None for a fresh seed per request")
    if isinstance(s.stop, str) or not all(isinstance(x, str) for x in s.stop):
        bad("stop", "must be a list of strings")
    if any(x == "" for x in s.stop):
        bad("stop", "an empty stop string would end every request after its first token; remove it")
    return s


def check_token_ids(ids, vocab_size: int, what: str = "prompt") -> list[int]:
    """The ids as ints, or ValueError naming the first id outside [0, vocab_size) and its position."""
    ids = [int(i) for i in ids]
    for pos, i in enumerate(ids):
        if not 0 <= i < vocab_size:
            raise ValueError(f"{what}: token id {i} at position {pos} is outside the vocabulary [0, {vocab_size}); "
                             "ids must come from this model's tokenizer")
    return ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Device-side sampling knobs, one entry per row."""

    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    min_p: jax.Array  # [B] float32, 0 = off
    seed: jax.Array  # [B] uint32

    @classmethod
    def from_configs(cls, configs: list[SamplingConfig], num_rows: int) -> "SamplingParams":
        """Host arrays for `configs` (seeds resolved), padded with greedy rows up to `num_rows`."""
        pad = [PAD_ROW] * (num_rows - len(configs))
        rows = list(configs) + pad
        return cls(
            temperature=np.array([c.temperature for c in rows], np.float32),
            top_k=np.array([c.top_k for c in rows], np.int32),
            top_p=np.array([c.top_p for c in rows], np.float32),
            min_p=np.array([c.min_p for c in rows], np.float32),
            seed=np.array([c.seed for c in rows], np.uint32),
        )


def allowed_logits(logits, p: SamplingParams):
    """Temperature-scaled logits with every token outside the top-k / top-p / min-p set at -inf.

    logits: [B, V] float32. Order as in Hugging Face and vLLM: temperature, top-k, top-p, min-p.
    """
    v = logits.shape[-1]
    t = jnp.where(p.temperature > 0, p.temperature, 1.0)[:, None]
    x = logits / t
    desc = -jnp.sort(-x, axis=-1)  # [B, V]
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    desc = jnp.where(jnp.arange(v)[None] < k[:, None], desc, -jnp.inf)
    # top-p: keep the smallest prefix of the sorted tokens whose mass reaches top_p (at least one).
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < p.top_p[:, None]) | (jnp.arange(v)[None] == 0)
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff, -jnp.inf, x)
    # min-p: drop tokens whose probability is below min_p times the top token's.
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs < p.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, x)
    return x


def sample(logits, p: SamplingParams, step):
    """logits [B, V] float32, step [B] int32 -> (tokens [B] int32, logprobs [B] float32).

    Logprobs are of the model's own distribution (before temperature and filtering).
    """

    def draw(_):
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(p.seed, step)
        drawn = jax.vmap(jax.random.categorical)(keys, allowed_logits(logits, p))
        return jnp.where(p.temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)

    greedy = lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32)  # noqa: E731
    tokens = jax.lax.cond(jnp.any(p.temperature > 0), draw, greedy, None)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
