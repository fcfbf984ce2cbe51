"""Compile proof for hardware we lack: every TPU kernel, and the serving step that uses one, compiles
with the real TPU compiler (libtpu, Mosaic included) for v5e, v5p and v6e topologies; every GPU
kernel lowers for CUDA (an abstract H200). Needs libtpu (the `tpu` extra, which `test` includes).

The TPU compiles run in a child process (`python -m jaxinfer.aot`, the `tpu_report` fixture of
conftest.py, started when the session begins): libtpu then never loads into the test process, whose
CPU compiles it could otherwise disturb."""

import pytest

from jaxinfer import aot


@pytest.mark.parametrize("topology", list(aot.TOPOLOGIES))
def test_every_tpu_kernel_and_the_step_compile_with_their_analyses(tpu_report, topology):
    results = tpu_report["tpu"][topology]
    assert set(results) == set(aot.tpu_cases(aot.default_model_cfg(small=True)))
    for name, r in results.items():
        assert r["mosaic_kernels"] >= 1, name  # the Mosaic kernel is in the executable
        assert r["argument_bytes"] > 0 and r["output_bytes"] > 0 and r["temp_bytes"] >= 0, name
        assert r["flops"] and r["bytes_accessed"], name  # the kernels' cost estimates reach XLA
    assert results["step (tpu attention)"]["mosaic_kernels"] >= 2  # decode and prefill attention


def test_the_step_sharded_over_a_v5e_8_slice_holds_its_shards_per_chip(tpu_report):
    """The serving step with weights and KV cache laid out over 8 abstract v5e chips: the compiler's
    per-chip argument bytes are what the shardings put on one chip, less than the whole on one chip."""
    one, sharded = tpu_report["pod"]["one_chip"], tpu_report["pod"]["sharded"]
    assert sharded["topology"] == "TPU v5 lite:2x4 mesh 1x8"
    assert abs(sharded["argument_bytes"] - sharded["shard_bytes"]) < 0.01 * sharded["shard_bytes"]
    assert sharded["argument_bytes"] < 0.7 * one["argument_bytes"]
    assert sharded["flops"] < one["flops"]  # each chip computes its heads' and FFN columns' share


@pytest.mark.parametrize("topology", list(aot.TOPOLOGIES))
def test_tpu_compiler_really_runs_mosaic(tpu_report, topology):
    """A kernel whose VMEM scratch (1 GiB) cannot fit fails to compile: proof the checks above can fail."""
    message = tpu_report["vmem_overflow_rejected"][topology]
    assert message, "an impossible kernel compiled: Mosaic did not run"
    assert "exceed" in message and "vmem" in message, message


@pytest.mark.parametrize("name", list(aot.gpu_cases()))
def test_every_gpu_kernel_lowers_for_cuda(name):
    fn, args = aot.gpu_cases()[name]
    exported = aot.export_cuda(fn, args)
    assert exported.platforms == ("cuda",)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_step_with_gpu_attention_lowers_for_cuda():
    fn, args = aot.step_case(aot.default_model_cfg(small=True), "gpu")
    text = aot.export_cuda(fn, args).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") >= 2  # decode and prefill attention calls
