"""Meshes and the one table that maps logical axis names to mesh axes.

Params carry logical names (models/llama.py); the cache is `[L, K, P, C, H]` with K on `model`.
A dimension that the mesh axis does not divide is replicated instead (e.g. 2 KV heads on a
4-way `model` axis), so every mesh shape runs, only less split.
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
    "vocab": "model", "q_heads": "model", "kv_heads": "model", "ffw": "model",
}
CACHE_AXES = ("layers", "kv_heads", None, None, "head_dim")  # [L, K, P, C, H]


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    if data * model > len(devices):
        raise ValueError(f"mesh (data={data}, model={model}) needs {data * model} devices; "
                         f"{len(devices)} are available")
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
    s = NamedSharding(mesh, spec_for(cache.k.shape, CACHE_AXES, mesh))
    return PagedKVCache(s, s)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
