"""Compile for hardware we do not have: real TPU compiles (libtpu, Mosaic included) against abstract
TPU topologies, and CUDA lowering of the GPU kernels, all from a CPU.

    python -m jaxinfer.aot [--out report.json]

compiles every kernel (and the serving step that uses them) for each topology in `TOPOLOGIES` and
exports the GPU kernels for an abstract H200, printing memory and cost analyses as a table.
Needs PyPI's `libtpu` (the `tpu` extra); run with JAX_PLATFORMS=cpu where no TPU is attached.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

TOPOLOGIES = {"v5e": "TPU v5 lite:2x2", "v5p": "TPU v5:2x2x2", "v6e": "TPU v6 lite:2x2"}
CUDA_TARGETS = ("__gpu$xla.gpu.triton",)  # Pallas GPU (Triton) custom calls


def tpu_mesh(topology: str, data: int = 1, model: int = 1):
    """A (data, model) mesh of a topology's abstract TPU chips, one chip by default (libtpu must be
    installed; jaxinfer.sharding.make_mesh says when there are too few)."""
    import importlib.util
    import os

    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("libtpu is not installed, so there is no TPU compiler: pip install -e '.[tpu]'")
    # Compiling only: no chip is opened, so libtpu's one-process-per-host lock does not apply
    # (without this, a second process that loaded libtpu, e.g. jax with no JAX_PLATFORMS, blocks us).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    name = TOPOLOGIES.get(topology, topology)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # noqa: BLE001 - say which topology failed and why
        raise RuntimeError(f"no abstract TPU topology '{name}': {e}") from e
    from jaxinfer.sharding import make_mesh

    return make_mesh(data, model, list(desc.devices))


def _on(mesh, tree):
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), tree)


def compile_tpu(fn, args, topology: str, static_kwargs=None) -> dict:
    """jit(fn).lower(args).compile() for a TPU topology -> the memory and cost analyses."""
    mesh = tpu_mesh(topology)
    return _compile(fn, _on(mesh, args), TOPOLOGIES.get(topology, topology), static_kwargs)


def compile_step_sharded(model_cfg, topology: str, data: int, model: int, attention_impl: str = "reference",
                         **layout) -> dict:
    """The serving step compiled for a multi-chip TPU topology, weights and KV cache laid out by the
    logical-axis table (jaxinfer.sharding) over a (data, model) mesh of its chips -> the analyses of
    compile_tpu; memory_analysis is per chip (SPMD: every chip runs the same program on its shard)."""
    mesh = tpu_mesh(topology, data, model)
    fn, args = step_case(model_cfg, attention_impl, mesh=mesh, **layout)
    r = _compile(fn, args, f"{TOPOLOGIES.get(topology, topology)} mesh {data}x{model}") | {"mesh": f"{data}x{model}"}
    # what one chip holds of the inputs by the shardings alone (memory_analysis should agree)
    r["shard_bytes"] = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(args))
    return r


def _compile(fn, args, topology: str, static_kwargs=None) -> dict:
    t0 = time.perf_counter()
    compiled = jax.jit(fn, static_argnames=tuple(static_kwargs or ())).lower(*args, **(static_kwargs or {})).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    return {"topology": topology, "compile_s": round(seconds, 3),
            "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes, "generated_code_bytes": mem.generated_code_size_in_bytes,
            "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
            "optimal_seconds": cost.get("optimal_seconds"), "hlo": compiled.as_text()}


def export_cuda(fn, args, device_kind: str = "NVIDIA H200"):
    """jax.export for CUDA with an abstract GPU of `device_kind` -> the Exported (its MLIR holds the
    Triton kernels). Pallas GPU custom calls carry no compatibility guarantee, hence the disabled check."""
    from jax._src.pallas.triton import pallas_call_registration  # noqa: F401  registers the GPU lowering

    dev = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in CUDA_TARGETS]
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


# ---- the cases: every kernel, and the step -----------------------------------------------------------
def attention_case(impl, *, rows=8, t=1, heads=32, kv_heads=8, head_dim=128, page_size=16, pages=1024, width=64,
                   dtype="bfloat16", kv="float", sliding_window=None, soft_cap=None):
    from jaxinfer.kernels.paged_attention import IMPLS

    kv_dtype = {"int8": "int8", "fp8": "float8_e4m3fn"}.get(kv, dtype)
    args = [sds((rows, t, heads, head_dim), dtype), sds((kv_heads, pages, page_size, head_dim), kv_dtype),
            sds((kv_heads, pages, page_size, head_dim), kv_dtype), sds((rows, width), "int32"),
            sds((rows,), "int32"), sds((rows, t), "int32")]
    if kv in ("int8", "fp8"):
        args += [sds((kv_heads, pages, page_size), "float32")] * 2

    def fn(q, k, v, table, lens, pos, ks=None, vs=None):
        return IMPLS[impl](q, k, v, table, lens, pos, k_scales=ks, v_scales=vs, sliding_window=sliding_window,
                           soft_cap=soft_cap)
    return fn, args


def matmul_case(impl, *, m=1, k=4096, n=4096, bits=8, group_size=0, dtype="bfloat16", asymmetric=False, act_bits=0):
    from jaxinfer.kernels.quant_matmul import IMPLS, QuantArray

    values = sds((k, n), "int8") if bits == 8 else sds((k // 2, n), "uint8")
    scales = sds((1 if bits == 8 else k // group_size, n), "float32")

    def fn(x, v, s, offsets=None):
        return IMPLS[impl](x, QuantArray(v, s, bits, group_size, offsets, act_bits))
    return fn, [sds((m, k), dtype), values, scales] + ([scales] if asymmetric else [])


def step_case(model_cfg, attention_impl: str, *, num_decode_rows=8, prefill_rows=1, chunk=64, width=32,
              pages=512, page_size=16, out_rows=16, mesh=None):
    """The serving step (step.step) at one shape bucket, as (fn, abstract args); the inputs are
    sized by the step schema (messages). With a mesh, the args carry the engine's shardings."""
    from jaxinfer.cache import PagedKVCache
    from jaxinfer.messages import Layout, buffer_sizes
    from jaxinfer.models import abstract_params
    from jaxinfer.step import data_parallel, step

    graphdef, params = abstract_params(model_cfg)
    leaves, param_def = jax.tree.flatten(params)
    m = model_cfg
    layout = Layout(num_decode_rows=num_decode_rows, num_prefill_rows=prefill_rows, chunk=chunk, table_width=width)
    num_ints, num_floats = buffer_sizes(layout)
    shards = 1 if mesh is None else mesh.shape["data"]  # data parallel: each shard's plan, rows and pages
    cache_shape = (m.num_layers, m.num_kv_heads, pages, page_size, m.head_dim)
    cache = PagedKVCache(sds(cache_shape, leaves[0].dtype), sds(cache_shape, leaves[0].dtype))
    one = partial(step, graphdef, param_def, attention_impl=attention_impl)
    run = one if shards == 1 else data_parallel(one, mesh)

    def fn(leaves, cache, ints, floats, prev):
        return run(leaves, cache, ints, floats, prev, layout=layout)
    args = [[sds(x.shape, x.dtype) for x in leaves], cache, sds((num_ints * shards,), "int32"),
            sds((num_floats * shards,), "float32"), sds((out_rows * shards,), "int32")]
    if mesh is not None:  # as the engine lays them out: params and cache by logical axes, plans over data
        from jaxinfer import sharding

        placed = [jax.tree.leaves(sharding.param_shardings(params, mesh)), sharding.cache_sharding(cache, mesh)]
        placed += [sharding.over_data(mesh)] * 3
        args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), args, placed)
    return fn, args


def tpu_cases(model_cfg):
    """name -> (fn, args) for every TPU kernel variant and the step over the TPU attention kernel."""
    cases = {
        "paged_attention decode bf16": attention_case("tpu"),
        "paged_attention prefill bf16 window+softcap": attention_case("tpu", rows=2, t=64, sliding_window=256,
                                                                      soft_cap=50.0),
        "paged_attention decode int8-kv": attention_case("tpu", kv="int8"),
        "paged_attention decode fp8-kv": attention_case("tpu", kv="fp8"),
        "paged_attention decode f32": attention_case("tpu", dtype="float32"),
        "quant_matmul int8 m=1": matmul_case("tpu"),
        "quant_matmul int8 m=256": matmul_case("tpu", m=256),
        "quant_matmul int4/g128 m=1": matmul_case("tpu", bits=4, group_size=128),
        "quant_matmul int4/g32 m=64": matmul_case("tpu", m=64, bits=4, group_size=32),
        "quant_matmul int4/g64 asymmetric m=8": matmul_case("tpu", m=8, bits=4, group_size=64, asymmetric=True),
        "quant_matmul w8a8 m=1": matmul_case("tpu", act_bits=8),
        "quant_matmul w8a8 m=256": matmul_case("tpu", m=256, act_bits=8),
        "step (tpu attention)": step_case(model_cfg, "tpu"),
    }
    return cases


def gpu_cases():
    return {
        "paged_attention decode bf16": attention_case("gpu"),
        "paged_attention prefill bf16 window+softcap": attention_case("gpu", rows=2, t=64, sliding_window=256,
                                                                      soft_cap=50.0),
        "paged_attention decode int8-kv": attention_case("gpu", kv="int8"),
        "paged_attention decode fp8-kv": attention_case("gpu", kv="fp8"),
        "quant_matmul int8 m=1": matmul_case("gpu"),
        "quant_matmul int4/g128 m=1": matmul_case("gpu", bits=4, group_size=128),
        "quant_matmul int4/g32 m=64": matmul_case("gpu", m=64, bits=4, group_size=32),
        "quant_matmul int4/g64 asymmetric m=8": matmul_case("gpu", m=8, bits=4, group_size=64, asymmetric=True),
        "quant_matmul w8a8 m=1": matmul_case("gpu", act_bits=8),
        "quant_matmul w8a8 m=64": matmul_case("gpu", m=64, act_bits=8),
    }


def default_model_cfg(small: bool = False):
    """A Llama-3-8B-like layer shape at 2 layers (real head and page geometry), or a small one."""
    from jaxinfer.config import ModelConfig

    if small:
        return ModelConfig(name="small-h128", vocab_size=4096, hidden_size=512, num_layers=2, num_q_heads=8,
                           num_kv_heads=2, head_dim=128, ffw_size=1024, dtype="bfloat16")
    return ModelConfig(name="llama3-8b-2l", vocab_size=128256, hidden_size=4096, num_layers=2, num_q_heads=32,
                       num_kv_heads=8, head_dim=128, ffw_size=14336, dtype="bfloat16", scan_layers=True)


def vmem_overflow_rejected(topology: str) -> str | None:
    """Compiles a kernel whose VMEM scratch (1 GiB) cannot fit: the compiler's error message, or
    None if it compiled (which would mean Mosaic never ran: the control for every proof above)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    def kernel(x_ref, o_ref, scratch):
        scratch[...] = jnp.zeros(scratch.shape, jnp.float32)
        o_ref[...] = x_ref[...] + scratch[:8, :128]

    def fn(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                              scratch_shapes=[pltpu.VMEM((1 << 16, 1 << 12), jnp.float32)])(x)
    try:
        compile_tpu(fn, [sds((8, 128), "float32")], topology)
    except Exception as e:  # noqa: BLE001 - any compiler error is the expected outcome
        return str(e).splitlines()[0][:300] or type(e).__name__
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the report as JSON here")
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--small", action="store_true", help="a small model for the step (quicker; the tests use it)")
    ap.add_argument("--pod", default="TPU v5 lite:2x4=1x8", metavar="TOPOLOGY=DATAxMODEL",
                    help="also compile the step sharded over this slice's chips (default %(default)s: v5e-8; '' skips)")
    args = ap.parse_args(argv)
    report = {"jax": jax.__version__, "tpu": {}, "cuda": {}, "vmem_overflow_rejected": {}}
    model_cfg = default_model_cfg(args.small)
    print(f"{'target':<18} {'case':<46} {'compile s':>9} {'temp MiB':>9} {'GB moved':>9} {'est. us':>9}")
    for topo in args.topologies.split(","):
        for name, (fn, fargs) in tpu_cases(model_cfg).items():
            r = compile_tpu(fn, fargs, topo)
            r["mosaic_kernels"] = r.pop("hlo").count("tpu_custom_call")
            report["tpu"].setdefault(topo, {})[name] = r
            est = r["optimal_seconds"]
            print(f"{r['topology']:<18} {name:<46} {r['compile_s']:>9.2f} {r['temp_bytes'] / 2**20:>9.1f} "
                  f"{(r['bytes_accessed'] or 0) / 1e9:>9.3f} {(est or 0) * 1e6:>9.1f}")
        report["vmem_overflow_rejected"][topo] = vmem_overflow_rejected(topo)
    if args.pod:  # the step over the XLA attention on one chip, then sharded over every chip of a slice
        topology, mesh = args.pod.rsplit("=", 1)
        data, model = (int(x) for x in mesh.split("x"))
        one = compile_tpu(*step_case(model_cfg, "reference"), topology)
        report["pod"] = {"one_chip": one, "sharded": compile_step_sharded(model_cfg, topology, data, model)}
        for r in report["pod"].values():
            r.pop("hlo")
            print(f"{r['topology']:<18} {'step (reference attention)':<46} {r['compile_s']:>9.2f} "
                  f"{r['temp_bytes'] / 2**20:>9.1f} {(r['bytes_accessed'] or 0) / 1e9:>9.3f}   args/chip "
                  f"{r['argument_bytes'] / 2**20:.1f} MiB")
    for name, (fn, fargs) in gpu_cases().items():
        t0 = time.perf_counter()
        exp = export_cuda(fn, fargs)
        text = exp.mlir_module()
        report["cuda"][name] = {"export_s": round(time.perf_counter() - t0, 3),
                                "triton_kernels": text.count("__gpu$xla.gpu.triton")}
        print(f"{'cuda (H200)':<18} {name:<46} {report['cuda'][name]['export_s']:>9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
