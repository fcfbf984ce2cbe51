"""AWQ: activation-aware weight quantization (Lin et al., "AWQ: Activation-aware Weight Quantization
for On-Device LLM Compression and Acceleration", MLSys 2024, arXiv:2306.00978), as a float-model
transform applied before round-to-nearest quantization (`model.quant_method: awq`).

A few input channels carry most of the activation magnitude; scaling those weight rows up by s
before rounding (and the input down by s, folded into the preceding op, so the float model is
unchanged) spends the quantization grid on them. Per group of linears that share an input, s =
mean|x|^alpha (normalized by sqrt(max * min)); alpha in {0, 0.05, ..., 1} is searched to minimize
the squared output error of the quantized layers on calibration activations (alpha 0 is plain
RTN, so the search never does worse on the calibration tokens). Groups, with where 1/s goes:
wq wk wv (attn_norm), w_gate w_up (mlp_norm), w_down (w_up's output columns). wo is left as RTN:
with grouped-query attention its input channels come from shared kv heads (AutoAWQ skips it too).
Weight clipping search (the paper's second step) is not done.

Calibration text (`model.quant_calibration`): a UTF-8 file, or (empty) training stories of the
shipped corpus (disjoint from the held-out split the quality gate scores).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.kernels.quant_matmul import dequantize, quantize
from jaxinfer.models import Model

# (the param that absorbs 1/s, the linears whose input rows scale by s); the first linear's input is the group's
GROUPS = (("attn_norm", ("wq", "wk", "wv")), ("mlp_norm", ("w_gate", "w_up")), ("w_up", ("w_down",)))
ALPHAS = np.linspace(0.0, 1.0, 21)
WINDOW = 256  # calibration tokens per row of the forward pass
SAMPLE = 1024  # calibration tokens per layer input kept for the error of the search


def calibration_tokens(tok, cfg) -> np.ndarray:
    """quant_calibration_tokens token ids of the calibration text (cfg: a ModelConfig), or a
    ValueError saying what is missing: the file, or enough tokens in it."""
    need = cfg.quant_calibration_tokens
    if cfg.quant_calibration:
        path = Path(cfg.quant_calibration)
        if not path.is_file():
            raise ValueError(f"model.quant_calibration='{cfg.quant_calibration}': no such file; give a UTF-8 text "
                             "file (or leave it empty for the shipped story corpus)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"model.quant_calibration='{path}' is not UTF-8 text ({e.reason} at byte {e.start})")
        ids = tok.encode(text)
        where = f"'{path}'"
    else:
        from jaxinfer.corpus import build_corpus

        eos = list(tok.eos_ids[:1])
        ids, stories = [], 64
        while len(ids) < need and stories <= 2**16:
            ids = [t for s in build_corpus(0, stories, 20)[0] for t in tok.encode(s) + eos]
            stories *= 4
        where = "the story corpus"
    if len(ids) < need:
        raise ValueError(f"model.quant_calibration: {where} has {len(ids)} tokens but AWQ needs "
                         f"model.quant_calibration_tokens={need}; give a longer text or lower quant_calibration_tokens")
    return np.asarray(ids[:need], np.int32)


def layer_inputs(model: Model, tokens: np.ndarray) -> dict:
    """{(layer, linear): (mean |x| per input channel [K], a sample of rows [<= SAMPLE, K])} for the
    first linear of each group, over `tokens` in rows of WINDOW (unrolled float model)."""
    n = max(len(tokens) // WINDOW, 1)
    rows = np.asarray(tokens[: n * WINDOW] if len(tokens) >= WINDOW else tokens).reshape(n, -1)
    firsts = {g[1][0] for g in GROUPS}

    @jax.jit
    def fn(params, x):
        mod = nnx.merge(model.graphdef, params)
        out = {}

        def tap(layer, name, h):
            if name in firsts:
                h = h.reshape(-1, h.shape[-1]).astype(jnp.float32)
                out[(layer, name)] = (jnp.abs(h).sum(0), h[:: max(1, h.shape[0] // (SAMPLE // n or 1))])

        mod(x, jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape), tap=tap)
        return out

    sums, samples = {}, {}
    for i in range(n):
        for key, (s, rows_i) in fn(model.params, jnp.asarray(rows[i:i + 1])).items():
            sums[key] = sums.get(key, 0) + np.asarray(s)
            samples.setdefault(key, []).append(np.asarray(rows_i))
    total = rows.size
    return {k: (sums[k] / total, np.concatenate(samples[k])[:SAMPLE]) for k in sums}


def _round_trip(w, bits: int, group: int):
    k = w.shape[0]
    return dequantize(quantize(w, bits, group if bits == 4 else 0))[:k]


def _alpha_losses(x, ws, mean_abs, bits_group):
    """Output error of each alpha: sum over the group's weights of mean((x W' - x W)^2)."""
    bits, group = bits_group

    def one(alpha):
        s = jnp.maximum(mean_abs, 1e-8) ** alpha
        s = jnp.maximum(s, 1e-4)
        s = s / jnp.sqrt(s.max() * s.min())
        err = 0.0
        for w in ws:
            wq = _round_trip(w * s[:, None], bits, group) / s[:, None]
            err = err + jnp.mean((x @ (wq - w)) ** 2)
        return err, s

    return jax.lax.map(one, jnp.asarray(ALPHAS, jnp.float32))


_losses = jax.jit(_alpha_losses, static_argnums=3)


def awq_scale(model: Model, tok, cfg) -> tuple[Model, dict]:
    """(the float model with AWQ's per-channel scales folded in: the same function, weights ready
    for round-to-nearest at cfg.quant / quant_group_size; {(layer, first linear): chosen alpha and
    calibration error over RTN's}). cfg: the ModelConfig asking for it."""
    from tqdm import tqdm

    from jaxinfer.checkpoint import relayout
    from jaxinfer.models.quantize import BITS

    if cfg.quant not in ("int8", "int4"):
        raise ValueError(f"model.quant_method=awq applies to weight-only int8 / int4, not model.quant={cfg.quant} "
                         "(W8A8 quantizes activations too; AWQ's scales would widen their range)")
    if cfg.quant_asymmetric:
        raise ValueError("model.quant_method=awq is implemented for symmetric int4; set quant_asymmetric: false")
    scan = model.cfg.scan_layers
    model = relayout(model, False)
    bits = BITS[cfg.quant][0]
    stats = layer_inputs(model, calibration_tokens(tok, cfg))
    pure = nnx.to_pure_dict(model.params)
    D = model.cfg.hidden_size
    report = {}
    for layer in tqdm(range(model.cfg.num_layers), desc="AWQ search", unit="layer", leave=False):
        for absorber, linears in GROUPS:
            mean_abs, x = stats[(layer, linears[0])]
            ws = [jnp.asarray(pure[n][layer]).reshape(mean_abs.shape[0], -1).astype(jnp.float32) for n in linears]
            losses, scales = _losses(jnp.asarray(x), ws, jnp.asarray(mean_abs), (bits, cfg.quant_group_size))
            best = int(jnp.argmin(losses))
            s = scales[best]
            report[(layer, linears[0])] = {"alpha": float(ALPHAS[best]),
                                           "error_vs_rtn": float(losses[best] / jnp.maximum(losses[0], 1e-30))}
            if best == 0:
                continue
            for n in linears:
                w = jnp.asarray(pure[n][layer])
                pure[n][layer] = (w.reshape(s.shape[0], -1) * s[:, None]).reshape(w.shape).astype(w.dtype)
            a = jnp.asarray(pure[absorber][layer])
            if absorber == "w_up":  # [D, F]: its output columns feed w_down's rows
                pure[absorber][layer] = (a / s[None, :]).astype(a.dtype)
            else:
                assert a.shape == (D,)
                pure[absorber][layer] = (a / s).astype(a.dtype)
    graphdef, abstract = nnx.split(nnx.merge(model.graphdef, model.params))
    nnx.replace_by_pure_dict(abstract, pure)
    out = Model(dataclasses.replace(model.cfg, quant_method="awq"), graphdef, abstract)
    return relayout(out, scan), report
