"""Pods from a CPU: the whole serving step at full size, compiled with the engine's shardings for
real TPU slices (libtpu against abstract topologies) and lowered for one H200, turned into
per-chip memory (what fits, the largest KV pool) and a predicted step time.

The prediction is the roofline of XLA's own cost analysis: a step takes
max(flops / peak, bytes accessed / HBM bandwidth) on each chip, with each chip's published bf16
peak and HBM bandwidth (`CHIPS`, with their sources). It leaves out what the roofline cannot see:
inter-chip collectives (ICI), kernel launch and host overheads, and the gap between peak and
achieved bandwidth (60-90% in practice), so real steps are slower. TPU numbers come from the
compiled (fused, partitioned) program: memory and cost are per chip; the cost of the layers is
extrapolated from 2- and 3-layer programs (XLA counts a loop body once). The GPU's come from the
CUDA lowering before XLA's GPU passes (no CUDA compiler here): its bytes count every unfused
intermediate once, an upper bound. Attention is the XLA path (`reference`): the TPU compiler
cannot cost a Mosaic kernel, and the XLA path reads exactly the listed pages, here as many as
the context needs.

    python -m jaxinfer.pods [--quick]        (or: jaxinfer run configs/experiments/pods.yaml)
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax

from jaxinfer.chips import (CHIPS, MODELS, PAGE_SIZE, PUBLISHED, SLICES, fits, kv_bytes_per_token,  # noqa: F401
                            min_bytes, parse_target)
from jaxinfer.config import ModelConfig


def _mesh(slice_: str, data: int, ways: int):
    from jaxinfer import aot

    chip, topology = SLICES[slice_]
    if topology is None:
        if data * ways != 1:
            raise ValueError(f"{slice_} is one device: its mesh is 1x1, not {data}x{ways}")
        return None
    return aot.tpu_mesh(topology, data, ways)


def analyse(target: str, batch: int, context: int, pages: int | None = None, memory: bool = True) -> dict:
    """Compiles (TPU) or lowers (H200) the decode step of `batch` rows at `context` tokens each,
    with a pool of `pages` KV pages (default: exactly what the batch needs) -> one row: per-chip
    memory, the largest pool that fits, flops and bytes, and the roofline step time and tokens/s.
    `memory=False` skips the full-size compile: memory from the argument sizes alone."""
    from jaxinfer.sharding import make_mesh

    slice_, name, data, ways = parse_target(target)
    m, chip = MODELS[name], CHIPS[SLICES[slice_][0]]
    mesh = _mesh(slice_, data, ways)
    if mesh is not None:
        make_mesh(data, ways, list(mesh.devices.flat), model_cfg=m)  # the engine's checks (heads, devices)
    if batch % data:
        raise ValueError(f"{target}: batch {batch} does not split over {data} data shards")
    width = -(-context // PAGE_SIZE)
    pages = pages or batch * width
    pages = -(-pages // data) * data
    row = {"target": target, "chip": chip.name, "model": name, "mesh": f"{data}x{ways}", "batch": batch,
           "context": context, "kv_pages": pages}
    t0 = time.perf_counter()
    fn, args = _case(m, batch, data, width, pages, mesh)
    jitted = jax.jit(fn, donate_argnums=(1,))  # the cache is donated, as in the engine
    shard = {"weights": _bytes(args[0], 1 if mesh is None else None), "kv": _bytes(args[1], 1 if mesh is None else None)}
    if mesh is None or not memory:  # one GPU has no compiler here: sizes from the arguments
        row["hbm_used_gb"] = (shard["weights"] + shard["kv"]) / 1e9
    else:
        mem = jitted.lower(*args).compile().memory_analysis()
        used = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes)
        row |= {"hbm_used_gb": used / 1e9, "temp_gb": mem.temp_size_in_bytes / 1e9}
    # XLA's cost analysis counts a loop body once, so the layers are costed unrolled, at 2 and 3
    # layers, and extrapolated (every inner layer is the same program): cost(L) = c3 + (L - 3)(c3 - c2).
    # (From 1 and 2 layers it is 8% high at 6 layers: the first layer fuses differently; from 2 and 3
    # it is within 0.1%, tests/test_pods.py.)
    c2, c3 = (_cost(dataclasses.replace(m, num_layers=n, scan_layers=False), batch, data, width, pages, mesh)
              for n in (2, 3))
    flops, moved = (c3[k] + (m.num_layers - 3) * (c3[k] - c2[k]) for k in ("flops", "bytes accessed"))
    row["compile_s"] = time.perf_counter() - t0
    per_page = shard["kv"] / (pages / data) if pages else 0  # one shard's page, on one chip
    free = chip.hbm_bytes - (row["hbm_used_gb"] * 1e9 - shard["kv"])
    max_pages = int(free // per_page) * data if per_page else 0
    t_compute, t_memory = flops / chip.bf16_flops, moved / chip.hbm_bytes_per_s
    step_s = max(t_compute, t_memory)
    least = min_bytes(m, batch, context, data, ways)
    row |= {"fits": row["hbm_used_gb"] * 1e9 <= chip.hbm_bytes, "weights_gb_chip": shard["weights"] / 1e9,
            "kv_gb_chip": shard["kv"] / 1e9, "max_kv_tokens": max_pages * PAGE_SIZE,
            "max_seqs_at_context": max_pages * PAGE_SIZE // context, "gflops_chip": flops / 1e9,
            "gb_moved_chip": moved / 1e9, "min_gb_chip": least / 1e9, "bound": "compute" if t_compute > t_memory else "memory",
            "step_ms": step_s * 1e3, "tok_s": batch / step_s,
            "floor_tok_s": batch / max(t_compute, least / chip.hbm_bytes_per_s)}
    for p in PUBLISHED:
        if (p["target"], p["batch"], p["context"]) == (target, batch, context):
            row |= {"published_tok_s": p["tok_s"], "published": f"{p['what']}: {p['source']}"}
    return row


def _case(m: ModelConfig, batch: int, data: int, width: int, pages: int, mesh):
    from jaxinfer import aot

    return aot.step_case(m, "reference", num_decode_rows=batch // data, prefill_rows=0, chunk=0, width=width,
                         pages=pages, page_size=PAGE_SIZE, out_rows=batch // data, mesh=mesh)


def _cost(m: ModelConfig, batch: int, data: int, width: int, pages: int, mesh) -> dict:
    """XLA's cost analysis of the step: of the compiled per-chip program on a TPU mesh, of the
    CUDA lowering (before GPU passes) for one GPU."""
    fn, args = _case(m, batch, data, width, pages, mesh)
    jitted = jax.jit(fn, donate_argnums=(1,))
    if mesh is None:
        cost = jitted.trace(*args).lower(lowering_platforms=("cuda",)).cost_analysis()
    else:
        cost = jitted.lower(*args).compile().cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    return {k: float(cost.get(k, float("nan"))) for k in ("flops", "bytes accessed")}


def _bytes(tree, chips: int | None = None) -> float:
    """Bytes of an abstract pytree held by one chip (by its shardings; chips=1: all of it)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.shape if chips == 1 or a.sharding is None else a.sharding.shard_shape(a.shape)
        total += math.prod(shape) * a.dtype.itemsize
    return total


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one cell per target")
    args = ap.parse_args(argv)
    for target in ("v5e-8:llama3-8b:1x8", "v6e-8:llama3-8b:1x8", "v5p-8:llama3-8b:1x4", "v5p-32:llama3-70b:2x8",
                   "h200:llama3-8b:1x1"):
        for batch, context in ([(64, 2048)] if args.quick else [(1, 2048), (64, 2048), (256, 2048)]):
            r = analyse(target, batch, context)
            print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
