"""Meshes and the one table that maps logical axis names to mesh axes.

Params carry logical names (models/llama.py); the cache is `[L, K, P, C, H]` with K on `model`
and P on `data`: each data shard owns a range of pages and serves its own requests (data-parallel
attention; see step.data_parallel). Weights are split over `model` and replicated over `data`.
A dimension that the mesh axis does not divide is replicated instead (e.g. 2 KV heads on a
4-way `model` axis, as vLLM replicates KV heads past the tensor-parallel degree).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinfer.cache import PagedKVCache

# logical axis -> mesh axis (None: replicated)
RULES: dict[str, str | None] = {
    "layers": None, "embed": None, "head_dim": None,
    "vocab": "model", "q_heads": "model", "kv_heads": "model", "ffw": "model", "pages": "data",
}
CACHE_AXES = ("layers", "kv_heads", "pages", None, "head_dim")  # [L, K, P, C, H]


def make_mesh(data: int = 1, model: int = 1, devices=None, model_cfg=None) -> Mesh:
    """A (data, model) mesh over the first data * model devices. With several processes
    (jax.distributed) it must span every device of every process. `model_cfg`: also checks that
    `model` divides the query heads (else attention would not split at all)."""
    devices = jax.devices() if devices is None else devices
    if data < 1 or model < 1:
        raise ValueError(f"engine.mesh=({data}, {model}): both axes need at least one device")
    if data * model > len(devices):
        raise ValueError(f"engine.mesh=({data}, {model}) needs {data * model} devices; {len(devices)} are available "
                         f"({jax.process_count()} process(es)); pick data x model <= {len(devices)}")
    if jax.process_count() > 1 and data * model != len(devices):
        raise ValueError(f"engine.mesh=({data}, {model}) covers {data * model} of the {len(devices)} devices of "
                         f"{jax.process_count()} processes: a multi-process mesh must span them all "
                         f"(data x model = {len(devices)})")
    if model_cfg is not None and model_cfg.num_q_heads % model:
        divisors = [m for m in range(1, model_cfg.num_q_heads + 1) if model_cfg.num_q_heads % m == 0]
        raise ValueError(f"engine.mesh=({data}, {model}): the model axis ({model}) does not divide the "
                         f"{model_cfg.num_q_heads} query heads of {model_cfg.name or 'the model'}; use one of {divisors}")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def spec_for(shape, names, mesh: Mesh) -> P:
    """PartitionSpec for logical `names`; an axis the mesh axis does not divide stays replicated."""
    axes = []
    for size, name in zip(shape, names):
        axis = RULES.get(name) if name else None
        axes.append(axis if axis and size % mesh.shape[axis] == 0 else None)
    return P(*axes)


def param_shardings(params: nnx.State, mesh: Mesh):
    return jax.tree.map(lambda v: NamedSharding(mesh, spec_for(v.shape, v.get_metadata()["out_sharding"], mesh)),
                        params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def cache_sharding(cache: PagedKVCache, mesh: Mesh) -> PagedKVCache:
    """Values [L, K, P, C, H] and (quantized pages) scales [L, K, P, C] by CACHE_AXES."""
    return jax.tree.map(lambda a: NamedSharding(mesh, spec_for(a.shape, CACHE_AXES[:a.ndim], mesh)), cache)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def over_data(mesh: Mesh) -> NamedSharding:
    """Leading axis split over `data` (shard d's rows or plan buffer on data shard d's devices)."""
    return NamedSharding(mesh, P("data"))
