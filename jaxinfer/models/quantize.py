"""Weight-only quantization of a loaded model: each linear weight becomes int8 (per output channel)
or packed int4 (group-wise) values plus float32 scales, as two params (`wq`, `wq_scale`), and the
model's matmuls go through `kernels.quant_matmul` (`model.matmul_impl`). Embeddings, norms, biases
and the LM head stay in float."""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from jaxinfer.kernels.quant_matmul import quantize
from jaxinfer.models import Model
from jaxinfer.models.llama import Transformer

BITS = {"int8": (8, False), "int4": (4, True)}


def check(cfg) -> None:
    """Raises if cfg.quant / quant_group_size cannot apply to this model's shapes."""
    if cfg.quant == "none":
        return
    if cfg.quant not in BITS:
        raise ValueError(f"model.quant='{cfg.quant}' is not supported; use none, int8 or int4")
    if cfg.quant_asymmetric and cfg.quant != "int4":
        raise ValueError(f"model.quant_asymmetric is for int4 only (model.quant={cfg.quant}): int8 is symmetric "
                         "per output channel")
    if cfg.quant == "int4":
        g = cfg.quant_group_size
        inputs = {"hidden_size": cfg.hidden_size, "num_q_heads * head_dim": cfg.num_q_heads * cfg.head_dim,
                  "ffw_size": cfg.ffw_size}
        if g not in (32, 64, 128):
            raise ValueError(f"model.quant_group_size={g}: int4 groups are 32, 64 or 128")
        for what, size in inputs.items():
            if size % g:
                raise ValueError(f"model.quant=int4 with quant_group_size={g}: {what}={size} is not a multiple "
                                 "of the group size; pick a group size that divides it")


def quantize_model(model: Model, quant: str, group_size: int = 128, matmul_impl: str = "auto",
                   asymmetric: bool = False) -> Model:
    """The model with its linear weights quantized (a new Model; `model` is untouched)."""
    cfg = dataclasses.replace(model.cfg, quant=quant, quant_group_size=group_size, matmul_impl=matmul_impl,
                              quant_asymmetric=asymmetric)
    check(cfg)
    if quant == "none":
        return Model(cfg, model.graphdef, model.params)
    bits, grouped = BITS[quant]
    module = nnx.merge(model.graphdef, model.params)
    module.cfg = cfg
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
