"""Model construction: the NNX module is split once into (graphdef, params); jitted code takes params."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.models.llama import Transformer, dtype_of, resolve_dtype

__all__ = ["Model", "Transformer", "abstract_params", "init_model", "dtype_of", "logical_axes", "resolve_dtype"]


@dataclasses.dataclass(frozen=True)
class Model:
    """A split model: `graphdef` is static structure, `params` the arrays (an `nnx.State`)."""

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State

    def bind(self, params=None) -> Transformer:
        """The module with `params` (default: ours); call inside jit to keep the host out of the step."""
        return nnx.merge(self.graphdef, self.params if params is None else params)

    @property
    def num_params(self) -> int:
        """Weights counted as numbers: a packed int4 byte (uint8, models/quantize.py) holds two."""
        return sum(x.size * (2 if x.dtype == jnp.uint8 else 1) for x in jax.tree.leaves(self.params))

    @property
    def param_bytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graphdef and parameter shapes/dtypes, without allocating anything (a quantized config:
    the quantized params, models.quantize.abstract_quantized)."""
    if is_quantized(cfg):
        from jaxinfer.models.quantize import abstract_quantized

        return abstract_quantized(cfg)
    module = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(module)


@partial(jax.jit, static_argnums=0)
def _create(cfg: ModelConfig, seed):
    # Compiled once per config (the seed is traced), not once per call: ~7 s for a 1-layer model on
    # the 2-core CPU, nearly all of it threefry. (RBG compiles in 2.1 s, but changes every test's
    # random weights: the engine-vs-dense greedy test then met a near-tie at token 15.)
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(jax.random.key(seed))))[1]


def is_quantized(cfg: ModelConfig) -> bool:
    """Whether cfg asks for any weight quantization (linear layers, LM head or embedding table)."""
    return cfg.quant != "none" or cfg.quant_lm_head != "none" or cfg.quant_embed


def float_config(cfg: ModelConfig) -> ModelConfig:
    """cfg without weight quantization (the model a quantized one is made from)."""
    return dataclasses.replace(cfg, quant="none", quant_lm_head="none", quant_embed=False, quant_asymmetric=False)


def init_model(cfg: ModelConfig, seed: int = 0) -> Model:
    """Random init at real shapes, computed on device by one jitted function (no host copy first):
    float weights (a config's quantization applies afterwards: models.quantize.quantize_model)."""
    cfg = float_config(dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype)))
    graphdef, _ = abstract_params(cfg)
    return Model(cfg, graphdef, _create(cfg, seed))


def logical_axes(params: nnx.State):
    """The pytree of logical axis-name tuples, one per parameter (e.g. ('layers', 'embed', 'q_heads', 'head_dim'))."""
    return jax.tree.map(lambda v: v.get_metadata()["out_sharding"], params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
