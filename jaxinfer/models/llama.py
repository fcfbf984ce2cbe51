"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) as one Flax NNX module.

Layer weights are stacked on a leading `layers` axis and the layers run under `lax.scan` (one
compiled layer body whatever the depth), or, with `scan_layers: false`, held one array per layer
in an unrolled loop (faster on CPU). The KV cache is one `[L, ...]` buffer either way. Every
parameter carries logical axis names (`out_sharding` metadata) so sharding is a table, not a rewrite.
"""

from __future__ import annotations

import math
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from jaxinfer.cache import DenseKVCache
from jaxinfer.config import ModelConfig
from jaxinfer.kernels.quant_matmul import QuantArray, float_matmul, quant_matmul

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str) -> str:
    """'auto' -> float32 on CPU (fast f32 GEMMs, slow bf16 GEMV there), bfloat16 on accelerators."""
    if name == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if name not in DTYPES:
        raise ValueError(f"dtype '{name}' is not supported; use one of auto, {', '.join(sorted(DTYPES))}")
    return name


def dtype_of(name: str):
    return DTYPES[resolve_dtype(name)]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] in float32, with Hugging Face's linear / llama3 scaling."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
    s = cfg.rope_scaling
    if s.rope_type == "default":
        return inv.astype(np.float32)
    if s.rope_type == "linear":
        return (inv / s.factor).astype(np.float32)
    if s.rope_type == "llama3":
        old = s.original_max_position_embeddings
        low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_scaling.rope_type '{s.rope_type}' is not supported (default, linear, llama3)")


def apply_rope(x, cos, sin):
    """x: [B, T, heads, H]; cos, sin: [B, T, H]. Rotate-half convention, as in Hugging Face."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :].astype(x.dtype) + rotated * sin[:, :, None, :].astype(x.dtype)


def rms_norm(x, weight, eps):
    """Normalises in float32 (bf16 squares lose the small components), scales in the input dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def attention(q, k, v, q_pos, kv_pos, sliding_window):
    """q: [B, T, N, H]; k, v: [B, S, K, H]; q_pos [B, T]; kv_pos [B, S] -> [B, T, N, H].

    Causal by position: query t sees key s iff kv_pos <= q_pos (and within the sliding window).
    """
    h = q.shape[-1]
    q = rearrange(q, "b t (k g) h -> b t k g h", k=k.shape[2])  # query head n = k * G + g, as HF's repeat_kv
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    mask = kv_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if sliding_window is not None:
        mask &= kv_pos[:, None, :] > q_pos[:, :, None] - sliding_window
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return rearrange(jnp.einsum("bkgts,bskh->btkgh", probs, v), "b t k g h -> b t (k g) h")


def dense_attend(cache: DenseKVCache, layer, q, k, v, *, positions, kv_len: int, sliding_window):
    """Writes k/v [B, T, K, H] at slots `positions` of `layer`, attends to slots [0, kv_len)."""
    cache = cache.write(layer, k, v, positions)
    kv_pos = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (q.shape[0], kv_len))
    out = attention(q, cache.k[layer, :, :kv_len], cache.v[layer, :, :kv_len], positions, kv_pos, sliding_window)
    return cache, out


class Transformer(nnx.Module):
    """Decoder-only transformer. Split once with `nnx.split`; jitted code merges inside the trace."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = dtype_of(cfg.dtype)
        L, D, N, K = cfg.num_layers, cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads
        H, F, V = cfg.head_dim, cfg.ffw_size, cfg.vocab_size
        if N % K:
            raise ValueError(f"num_q_heads={N} must be a multiple of num_kv_heads={K}")
        normal = nnx.initializers.normal(cfg.init_std)

        def param(shape, names, init="normal"):
            if init == "normal":
                value = normal(rngs.params(), shape, jnp.float32).astype(dt)
            else:
                value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dt)
            return nnx.Param(value, out_sharding=names, eager_sharding=False)

        def layer_param(shape, names, init="normal"):
            if cfg.scan_layers:
                return param((L, *shape), ("layers", *names), init)
            return nnx.List([param(shape, names, init) for _ in range(L)])

        self.embed = param((V, D), ("vocab", "embed"))
        self.attn_norm = layer_param((D,), ("embed",), "ones")
        self.wq = layer_param((D, N, H), ("embed", "q_heads", "head_dim"))
        self.wk = layer_param((D, K, H), ("embed", "kv_heads", "head_dim"))
        self.wv = layer_param((D, K, H), ("embed", "kv_heads", "head_dim"))
        self.wo = layer_param((N, H, D), ("q_heads", "head_dim", "embed"))
        qkv_bias = cfg.qkv_bias
        self.bq = layer_param((N, H), ("q_heads", "head_dim"), "zeros") if qkv_bias else None
        self.bk = layer_param((K, H), ("kv_heads", "head_dim"), "zeros") if qkv_bias else None
        self.bv = layer_param((K, H), ("kv_heads", "head_dim"), "zeros") if qkv_bias else None
        self.bo = layer_param((D,), ("embed",), "zeros") if cfg.o_bias else None
        self.q_norm = layer_param((H,), ("head_dim",), "ones") if cfg.qk_norm else None
        self.k_norm = layer_param((H,), ("head_dim",), "ones") if cfg.qk_norm else None
        self.mlp_norm = layer_param((D,), ("embed",), "ones")
        self.w_gate = layer_param((D, F), ("embed", "ffw"))
        self.w_up = layer_param((D, F), ("embed", "ffw"))
        self.w_down = layer_param((F, D), ("ffw", "embed"))
        self.final_norm = param((D,), ("embed",), "ones")
        self.lm_head = None if cfg.tie_embeddings else param((D, V), ("embed", "vocab"))
        for name in self.LINEAR:  # set by models.quantize.quantize_model
            setattr(self, name + "_scale", None)
            setattr(self, name + "_offset", None)
        self.lm_head_scale = None  # quant_lm_head: lm_head holds the quantized values
        self.embed_scale = None  # quant_embed: embed holds int8 rows, this a scale per row

    # Linear weights: (input axes, output axes) as logical names; quantization flattens each to 2-D.
    LINEAR = {"wq": (("embed",), ("q_heads", "head_dim")), "wk": (("embed",), ("kv_heads", "head_dim")),
              "wv": (("embed",), ("kv_heads", "head_dim")), "wo": (("q_heads", "head_dim"), ("embed",)),
              "w_gate": (("embed",), ("ffw",)), "w_up": (("embed",), ("ffw",)), "w_down": (("ffw",), ("embed",))}
    LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "q_norm", "k_norm",
                    "mlp_norm", "w_gate", "w_up", "w_down", *(n + "_scale" for n in LINEAR),
                    *(n + "_offset" for n in LINEAR))

    def _quant_array(self, mode, values, scales, offsets=None) -> QuantArray:
        """Stored values and scales as a QuantArray for `mode` (int8: per channel; int4: groups of
        quant_group_size; w8a8: int8 per channel with int8 activations per token)."""
        int4 = mode == "int4"
        return QuantArray(values, scales, 4 if int4 else 8, self.cfg.quant_group_size if int4 else 0, offsets,
                          8 if mode == "w8a8" else 0)

    def _linear(self, x, p, name, out_shape, tap=None):
        """x @ p[name], the weight as a matrix [inputs, outputs] (a free reshape of its stored
        [in..., out...]) and x's contracted axes flattened to match: a dot over float weights, or
        kernels.quant_matmul over quantized ones. A dot contracting two axes (wo: heads x head_dim)
        let XLA CPU transpose the whole weight in every Engine step (~10 ms a step at 124.7M)."""
        lead = x.shape[:2]  # [B, T]
        if tap is not None:  # models.awq: this matmul's input, flattened as the weight sees it
            tap(name, x.reshape(*lead, -1))
        if name + "_scale" not in p:
            w = p[name]
            w = w.reshape(math.prod(w.shape[:len(self.LINEAR[name][0])]), -1)
            y = float_matmul(x.reshape(*lead, -1), w, impl=self.cfg.float_matmul)
        else:
            q = self._quant_array(self.cfg.quant, p[name], p[name + "_scale"], p.get(name + "_offset"))
            y = quant_matmul(x.reshape(*lead, -1), q, impl=self.cfg.matmul_impl)
        return y.reshape(*lead, *out_shape)

    def _layer_params(self):
        """Stacked: {name: [L, ...]}. Unstacked: [{name: array}] per layer."""
        present = [n for n in self.LAYER_PARAMS if getattr(self, n) is not None]
        if self.cfg.scan_layers:
            return {n: getattr(self, n)[...] for n in present}
        return [{n: getattr(self, n)[i][...] for n in present} for i in range(self.cfg.num_layers)]

    def _block(self, p, x, cos, sin, attend, tap=None):
        """One layer. p: this layer's params; attend(q, k, v) -> (cache, attention output);
        tap(name, x): sees each linear layer's input (calibration)."""
        cfg = self.cfg
        h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        N, K, H, D = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        q = self._linear(h, p, "wq", (N, H), tap)
        k = self._linear(h, p, "wk", (K, H), tap)
        v = self._linear(h, p, "wv", (K, H), tap)
        if "bq" in p:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        if "q_norm" in p:  # Qwen3: per-head RMSNorm before RoPE
            q, k = rms_norm(q, p["q_norm"], cfg.rms_norm_eps), rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache, a = attend(q, k, v)
        a = self._linear(a, p, "wo", (D,), tap)
        if "bo" in p:
            a = a + p["bo"]
        x = x + a
        h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        F = cfg.ffw_size
        g = self._linear(h, p, "w_gate", (F,), tap)
        u = self._linear(h, p, "w_up", (F,), tap)
        return x + self._linear(jax.nn.silu(g) * u, p, "w_down", (D,), tap), cache

    def __call__(self, tokens, positions, cache=None, kv_len: int | None = None, attend=None, tap=None):
        """tokens, positions: [B, T] int32 -> (final-normed hidden [B, T, D], cache).

        `attend(cache, layer, q, k, v) -> (cache, out [B, T, N, H])` owns the KV cache: it writes
        this chunk's k/v and attends over what the cache holds (paged: see step.py). By default,
        with a `DenseKVCache` the chunk writes at slots `positions` and attends to slots
        [0, kv_len) (static; default all); with no cache the chunk attends to itself.
        `tap(layer, name, x)` sees every linear layer's input (unrolled layers only: models.awq).
        """
        chex.assert_rank(tokens, 2)
        chex.assert_equal_shape([tokens, positions])
        chex.assert_type([tokens, positions], jnp.int32)
        window = self.cfg.sliding_window
        if attend is None and cache is None:
            attend = lambda c, layer, q, k, v: (c, attention(q, k, v, positions, positions, window))  # noqa: E731
        elif attend is None:
            attend = partial(dense_attend, positions=positions, kv_len=kv_len or cache.max_len, sliding_window=window)
        x = self.embed[...][tokens]
        if self.embed_scale is not None:  # int8 rows: only the rows this step needs are read
            x = x.astype(jnp.float32) * self.embed_scale[...][tokens]
            x = x.astype(dtype_of(self.cfg.dtype))
        # RoPE angles in float32: bf16 cannot tell position 257 from 256.
        freqs = positions[..., None].astype(jnp.float32) * rope_inv_freq(self.cfg)  # [B, T, H/2]
        freqs = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)

        def body(carry, xs):
            x, cache = carry
            p, layer = xs
            x, cache = self._block(p, x, cos, sin, partial(attend, cache, layer),
                                   None if tap is None else partial(tap, layer))
            return (x, cache), None

        if self.cfg.scan_layers:
            if tap is not None:
                raise ValueError("tap needs unrolled layers (scan_layers: false)")
            layers = jnp.arange(self.cfg.num_layers)
            (x, cache), _ = jax.lax.scan(body, (x, cache), (self._layer_params(), layers))
        else:
            for layer, p in enumerate(self._layer_params()):
                (x, cache), _ = body((x, cache), (p, layer))
        return rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps), cache

    def logits(self, hidden):
        """hidden [..., D] -> float32 logits [..., V]."""
        if self.lm_head_scale is not None:
            q = self._quant_array(self.cfg.quant_lm_head, self.lm_head[...], self.lm_head_scale[...])
            return quant_matmul(hidden, q, impl=self.cfg.matmul_impl).astype(jnp.float32)
        if self.lm_head is None:  # tied: XLA's dot reads embed [V, D] as is (the kernel would need embed.T copied)
            return jnp.einsum("...d,vd->...v", hidden, self.embed[...], preferred_element_type=jnp.float32)
        return float_matmul(hidden, self.lm_head[...], impl=self.cfg.float_matmul, preferred_element_type=jnp.float32)
