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

from jaxinfer.config import ModelConfig, RopeScaling


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # dense peak, per chip
    hbm_bytes: float
    hbm_bytes_per_s: float
    source: str


CHIPS = {
    "v5e": Chip("TPU v5e", 197e12, 16e9, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 95e9, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918e12, 32e9, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 141e9, 4.8e12, "https://www.nvidia.com/en-us/data-center/h200/"),
}
# slice -> (chip, libtpu topology); "h200" is one GPU (CUDA lowering, no topology)
SLICES = {"v5e-8": ("v5e", "TPU v5 lite:2x4"), "v6e-8": ("v6e", "TPU v6 lite:2x4"),
          "v5p-8": ("v5p", "TPU v5:2x2x1"), "v5p-32": ("v5p", "TPU v5:2x2x4"), "h200": ("h200", None)}

_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
MODELS = {
    "llama2-7b": ModelConfig(name="llama2-7b", vocab_size=32000, hidden_size=4096, num_layers=32, num_q_heads=32,
                             num_kv_heads=32, head_dim=128, ffw_size=11008, max_position_embeddings=4096,
                             rms_norm_eps=1e-5, dtype="bfloat16", scan_layers=True),
    "llama3-8b": ModelConfig(name="llama3-8b", vocab_size=128256, hidden_size=4096, num_layers=32, num_q_heads=32,
                             num_kv_heads=8, head_dim=128, ffw_size=14336, max_position_embeddings=131072,
                             rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, dtype="bfloat16",
                             scan_layers=True),
    "llama3-70b": ModelConfig(name="llama3-70b", vocab_size=128256, hidden_size=8192, num_layers=80, num_q_heads=64,
                              num_kv_heads=8, head_dim=128, ffw_size=28672, max_position_embeddings=131072,
                              rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, dtype="bfloat16",
                              scan_layers=True),
}
PAGE_SIZE = 16


def parse_target(target: str) -> tuple[str, str, int, int]:
    """'v5e-8:llama3-8b:1x8' -> (slice, model, data, model ways)."""
    try:
        slice_, model, mesh = target.split(":")
        data, ways = (int(x) for x in mesh.split("x"))
    except ValueError:
        raise ValueError(f"pod target '{target}': write SLICE:MODEL:DATAxMODEL, e.g. v5e-8:llama3-8b:1x8") from None
    if slice_ not in SLICES:
        raise ValueError(f"pod target '{target}': slice '{slice_}' is unknown; choose from {', '.join(SLICES)}")
    if model not in MODELS:
        raise ValueError(f"pod target '{target}': model '{model}' is unknown; choose from {', '.join(MODELS)}")
    return slice_, model, data, ways


def kv_bytes_per_token(m: ModelConfig) -> int:
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2  # k and v, bf16


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
    from jaxinfer import aot
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


def _weight_bytes(m: ModelConfig, embedding_rows: int | None = None) -> int:
    """bf16 weight bytes; embedding_rows: count only that many rows of the input embedding (what a step reads)."""
    rows = m.vocab_size if embedding_rows is None else min(embedding_rows, m.vocab_size)
    head = 0 if m.tie_embeddings else m.vocab_size * m.hidden_size
    layer = m.hidden_size * m.head_dim * (2 * m.num_q_heads + 2 * m.num_kv_heads) + 3 * m.hidden_size * m.ffw_size
    return 2 * (rows * m.hidden_size + head + m.num_layers * layer)


def _kv_split(m: ModelConfig, ways: int) -> int:
    return ways if m.num_kv_heads % ways == 0 else 1  # indivisible KV heads are replicated (jaxinfer.sharding)


def min_bytes(m: ModelConfig, batch: int, context: int, data: int, ways: int) -> float:
    """What one chip must read per decode step at least: its share of the weights (the embedding
    rows of the batch only) and of the batch's KV."""
    return (_weight_bytes(m, batch) / ways
            + batch * context * kv_bytes_per_token(m) / (data * _kv_split(m, ways)))


def fits(target: str, batch: int, context: int) -> bool:
    """Whether the weights and the KV the batch needs fit one chip's HBM by size alone (before compiling)."""
    slice_, name, data, ways = parse_target(target)
    m, chip = MODELS[name], CHIPS[SLICES[slice_][0]]
    per_chip = _weight_bytes(m) / ways + batch * context * kv_bytes_per_token(m) / (data * _kv_split(m, ways))
    return per_chip <= chip.hbm_bytes


# Published measurements to set beside the predictions (the same model and slice).
PUBLISHED = [
    {"target": "v5e-8:llama2-7b:1x8", "batch": 96, "context": 2048, "tok_s": 3663,
     "what": "JetStream-PyTorch, bf16, 1024 in / 1024 out (serving, prefill included)",
     "source": "https://github.com/AI-Hypercomputer/jetstream-pytorch/blob/main/benchmarks/summary.md"},
    {"target": "v5e-8:llama3-8b:1x8", "batch": 128, "context": 2048, "tok_s": 8249,
     "what": "JetStream-PyTorch, bf16, 1024 in / 1024 out (serving, prefill included)",
     "source": "https://github.com/AI-Hypercomputer/jetstream-pytorch/blob/main/benchmarks/summary.md"},
]


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
