"""Quantization of a loaded model: each linear weight becomes int8 (per output channel) or packed
int4 (group-wise) values plus float32 scales, as two params (`wq`, `wq_scale`), and the model's
matmuls go through `kernels.quant_matmul` (`model.matmul_impl`); `w8a8` stores int8 weights and
also quantizes each matmul's input per token (int8 x int8 dots, int32 sums). Optionally the LM head
(`quant_lm_head`, int8 or int4; for tied embeddings a quantized copy of embed.T) and the input
embedding table (`quant_embed`: int8 rows, one scale per row, so a step gathers int8 rows). Norms
and biases stay in float."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.kernels.quant_matmul import quantize
from jaxinfer.kernels.quant_matmul.reference import GROUP_SIZES
from jaxinfer.models import Model, float_config
from jaxinfer.models.llama import Transformer

BITS = {"int8": (8, False), "int4": (4, True), "w8a8": (8, False)}  # mode -> (weight bits, grouped)
HEAD_MODES = ("int8", "int4")  # the LM head is weight-only


def check(cfg) -> None:
    """Raises if cfg.quant / quant_lm_head / quant_group_size cannot apply to this model's shapes."""
    if cfg.quant_lm_head != "none" and cfg.quant_lm_head not in HEAD_MODES:
        raise ValueError(f"model.quant_lm_head='{cfg.quant_lm_head}' is not supported; use none, int8 or int4")
    if cfg.quant_lm_head == "int4" and cfg.quant_group_size not in GROUP_SIZES:
        raise ValueError(f"model.quant_lm_head=int4 needs quant_group_size in {', '.join(map(str, GROUP_SIZES))}; "
                         f"got {cfg.quant_group_size}")
    if cfg.quant_embed and cfg.tie_embeddings and cfg.quant_lm_head == "none":
        raise ValueError("model.quant_embed with tied embeddings: the LM head reads the same table, so it needs "
                         "model.quant_lm_head (int8 or int4) to get its own copy; set quant_lm_head: int8")
    if cfg.quant_method not in ("rtn", "awq"):
        raise ValueError(f"model.quant_method='{cfg.quant_method}' is not supported; use rtn or awq")
    if cfg.quant_method == "awq" and cfg.quant not in ("int8", "int4"):
        raise ValueError(f"model.quant_method=awq needs model.quant int8 or int4 (weight-only), got {cfg.quant}")
    if cfg.quant_calibration_tokens < 1:
        raise ValueError(f"model.quant_calibration_tokens={cfg.quant_calibration_tokens}: must be >= 1")
    if cfg.quant == "none":
        if cfg.quant_asymmetric:
            raise ValueError("model.quant_asymmetric is for model.quant=int4")
        return
    if cfg.quant not in BITS:
        raise ValueError(f"model.quant='{cfg.quant}' is not supported; use none, int8, int4 or w8a8")
    if cfg.quant_asymmetric and cfg.quant != "int4":
        raise ValueError(f"model.quant_asymmetric is for int4 only (model.quant={cfg.quant}): int8 is symmetric "
                         "per output channel")
    if cfg.quant == "int4" and cfg.quant_group_size not in GROUP_SIZES:
        # Any feature count works: a layer whose inputs the group size does not divide (an FFN of
        # 172) gets a padded last group (kernels.quant_matmul.reference).
        raise ValueError(f"model.quant_group_size={cfg.quant_group_size}: int4 groups are "
                         f"{', '.join(map(str, GROUP_SIZES))}")


def quantize_model(model: Model, quant: str, group_size: int = 128, matmul_impl: str = "auto",
                   asymmetric: bool = False, lm_head: str = "none", embed: bool = False) -> Model:
    """The model with its linear weights (and optionally its LM head and input embedding table)
    quantized: a new Model; `model` is untouched."""
    cfg = dataclasses.replace(model.cfg, quant=quant, quant_group_size=group_size, matmul_impl=matmul_impl,
                              quant_asymmetric=asymmetric, quant_lm_head=lm_head, quant_embed=embed)
    check(cfg)
    module = nnx.merge(model.graphdef, model.params)
    module.cfg = cfg
    if lm_head != "none":
        head_bits, head_grouped = BITS[lm_head]
        w = module.embed[...].T if module.lm_head is None else module.lm_head[...]
        q = quantize(w, head_bits, group_size if head_grouped else 0)
        module.lm_head = nnx.data(nnx.Param(q.values, out_sharding=("embed", "vocab"), eager_sharding=False))
        module.lm_head_scale = nnx.data(nnx.Param(q.scales, out_sharding=(None, "vocab"), eager_sharding=False))
    if embed:
        q = quantize(module.embed[...].T, 8)  # per column of embed.T = per row of the table
        module.embed = nnx.data(nnx.Param(q.values.T, out_sharding=("vocab", "embed"), eager_sharding=False))
        module.embed_scale = nnx.data(nnx.Param(q.scales.T, out_sharding=("vocab", None), eager_sharding=False))
    if quant == "none":
        graphdef, params = nnx.split(module)
        return Model(cfg, graphdef, params)
    bits, grouped = BITS[quant]
    stacked = cfg.scan_layers

    def one(w, n_in):  # one layer's weight, flattened to [inputs, outputs] -> {suffix: array}
        q = quantize(w.reshape(math.prod(w.shape[:n_in]), -1), bits, group_size if grouped else 0, asymmetric)
        return {"": q.values, "_scale": q.scales, **({"_offset": q.offsets} if asymmetric else {})}

    for name, (ins, outs) in Transformer.LINEAR.items():
        # A flattened axis (q_heads x head_dim) shards by its leading name; scales and offsets by outputs.
        names = {"": ("layers",) * stacked + (ins[0], outs[0]), "_scale": ("layers",) * stacked + (None, outs[0])}
        names["_offset"] = names["_scale"]
        old = getattr(module, name)
        if stacked:
            parts = jax.vmap(lambda w: one(w, len(ins)))(old[...])
            for suffix, value in parts.items():
                setattr(module, name + suffix, nnx.data(nnx.Param(value, out_sharding=names[suffix], eager_sharding=False)))
        else:
            layers = [one(p[...], len(ins)) for p in old]
            for suffix in layers[0]:
                setattr(module, name + suffix, nnx.data(nnx.List(
                    [nnx.Param(parts[suffix], out_sharding=names[suffix], eager_sharding=False) for parts in layers])))
    graphdef, params = nnx.split(module)
    return Model(cfg, graphdef, params)


def abstract_quantized(cfg):
    """(graphdef, abstract params) of the quantized model `cfg` describes, allocating nothing:
    what a saved quantized checkpoint restores into."""
    from jaxinfer.models import abstract_params

    graphdef, abstract = abstract_params(float_config(cfg))
    box = {}

    def fn(params):
        q = quantize_model(Model(float_config(cfg), graphdef, params), cfg.quant, cfg.quant_group_size,
                           cfg.matmul_impl, cfg.quant_asymmetric, cfg.quant_lm_head, cfg.quant_embed)
        box["graphdef"] = q.graphdef
        return q.params

    shapes = jax.eval_shape(fn, abstract)  # runs fn once on shapes: box holds the quantized graphdef
    return box["graphdef"], shapes


def quantized_shapes(model: Model) -> dict[tuple[int, ...], str]:
    """{float shape of a quantized weight: its name}: [K, N] per layer (and [L, K, N] stacked)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        name = next((k for k in keys if isinstance(k, str)), "")
        if name in Transformer.LINEAR or name == "lm_head":
            if name + "_scale" not in model.params:
                continue
            v = leaf.shape
            k = v[-2] * (2 if leaf.dtype == jnp.uint8 else 1)
            shapes[(*v[:-2], k, v[-1])] = name
            shapes[(k, v[-1])] = name
    return shapes


_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (f32|bf16|f16|f64)\[([\d,]*)\]", re.M)


def float_weight_copies(model: Model, hlo_text: str) -> list[str]:
    """Instructions of an optimized HLO module that produce a float array shaped like one of the
    model's quantized weights: a dequantized copy that a step would read instead of the int8 / int4
    bytes. Empty when every quantized matmul reads the stored bytes."""
    shapes = quantized_shapes(model)
    found = []
    for m in _DEF.finditer(hlo_text):
        shape = tuple(int(d) for d in m.group(3).split(",") if d)
        if shape in shapes:
            found.append(f"{m.group(1)}: {m.group(2)}{list(shape)} (like {shapes[shape]})")
    return found
