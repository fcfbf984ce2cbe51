"""Compile proof for hardware we lack: every TPU kernel, and the serving step that uses one, compiles
with the real TPU compiler (libtpu, Mosaic included) for v5e, v5p and v6e topologies; every GPU
kernel lowers for CUDA (an abstract H200). Needs libtpu (the `tpu` extra, which `test` includes)."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxinfer import aot
from jaxinfer.config import ModelConfig

TOPOLOGIES = list(aot.TOPOLOGIES)
STEP_MODEL = ModelConfig(vocab_size=4096, hidden_size=512, num_layers=2, num_q_heads=8, num_kv_heads=2, head_dim=128,
                         ffw_size=1024, dtype="bfloat16")


@pytest.fixture(scope="module", params=TOPOLOGIES)
def topology(request):
    aot.tpu_mesh(request.param)  # fails, naming the fix, where libtpu is missing
    return request.param


def test_every_tpu_kernel_compiles_and_reports_its_analyses(topology):
    for name, (fn, args) in aot.tpu_cases(STEP_MODEL).items():
        r = aot.compile_tpu(fn, args, topology)
        assert "tpu_custom_call" in r["hlo"], name  # the Mosaic kernel is in the executable
        assert r["argument_bytes"] > 0 and r["output_bytes"] > 0 and r["temp_bytes"] >= 0, name
        assert r["flops"] is not None and r["bytes_accessed"] is not None, name


def test_tpu_compiler_really_runs_mosaic(topology):
    """A kernel whose VMEM scratch cannot fit must fail to compile: proof the check above can fail."""
    def kernel(x_ref, o_ref, scratch):
        scratch[...] = jnp.zeros(scratch.shape, jnp.float32)
        o_ref[...] = x_ref[...] + scratch[:8, :128]

    def fn(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                              scratch_shapes=[pltpu.VMEM((1 << 16, 1 << 12), jnp.float32)])(x)  # 1 GiB
    with pytest.raises(Exception, match="(?i)vmem|memory|exceed"):
        aot.compile_tpu(fn, [aot.sds((8, 128), "float32")], topology)


@pytest.mark.parametrize("name", list(aot.gpu_cases()))
def test_every_gpu_kernel_lowers_for_cuda(name):
    fn, args = aot.gpu_cases()[name]
    exported = aot.export_cuda(fn, args)
    assert exported.platforms == ("cuda",)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_step_with_gpu_attention_lowers_for_cuda():
    fn, args = aot.step_case(STEP_MODEL, "gpu")
    text = aot.export_cuda(fn, args).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") >= 2  # decode and prefill attention calls
