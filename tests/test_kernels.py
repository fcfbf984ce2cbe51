"""Conformance: every Pallas kernel equals its jnp reference, run by the Pallas interpreter on CPU
(and the CPU FFI paged-attention kernel, run natively).

TPU kernels run under TPU interpret mode with race detection on and uninitialized memory poisoned
with NaN; GPU kernels under the generic interpreter. Unused cache slots hold NaN, so a kernel that
reads past a row's kv length (or a stale page) fails. The `slow` cases are the full grid (run
with `pytest -m slow`); CI runs the rest, a representative subset.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxinfer import kernels
from jaxinfer.kernels import paged_attention as pa
from jaxinfer.kernels import quant_matmul as qm
from jaxinfer.kernels.paged_attention import cpu as pa_cpu, gpu as pa_gpu, reference as pa_ref, tpu as pa_tpu
from jaxinfer.kernels.quant_matmul import gpu as qm_gpu, tpu as qm_tpu

# Two cores share the "parallel" grid axes in a random order, as on a megacore chip.
STRICT_TPU = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2, random_seed=0)
RUNNERS = {
    "tpu": lambda fn: lambda *a, **k: fn(*a, interpret=STRICT_TPU, **k),
    "gpu": lambda fn: lambda *a, **k: fn(*a, interpret=True, **k),
    "cpu": lambda fn: jax.jit(fn, static_argnames=("sliding_window", "soft_cap")),
}
PA = {"tpu": pa_tpu, "gpu": pa_gpu, "cpu": pa_cpu}
# |kernel - reference| <= TOL * max|reference| (bf16: the kernel rounds p to bf16 per page, the
# reference once per row; f32 differs only in summation order).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    kv_lens: tuple  # per row; 0 = a row with no tokens at all
    t: int = 1  # query slots per row
    q_lens: tuple | None = None  # real queries per row (default t); the rest are padding
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    page_size: int = 16
    dtype: object = jnp.float32
    kv: str = "float"
    sliding_window: int | None = None
    soft_cap: float | None = None
    width: int | None = None  # block-table width (default: just enough)

    def __str__(self):
        return (f"lens{list(self.kv_lens)}-t{self.t}-gqa{self.heads // self.kv_heads}-h{self.head_dim}-c{self.page_size}"
                f"-{jnp.dtype(self.dtype).name}-{self.kv}" + (f"-win{self.sliding_window}" if self.sliding_window else "")
                + (f"-cap{self.soft_cap}" if self.soft_cap else ""))


def make_inputs(case: Case, seed=0):
    """Pages shuffled across rows, every unused slot NaN; queries at the last q_len positions of each row."""
    rng = np.random.default_rng(seed)
    c, b = case.page_size, len(case.kv_lens)
    need = [-(-n // c) for n in case.kv_lens]
    width = case.width or max(1, max(need))
    num_pages = sum(need) + 3
    order = rng.permutation(num_pages)
    table = np.zeros((b, width), np.int32)
    k = np.full((case.kv_heads, num_pages, c, case.head_dim), np.nan, np.float32)
    v = np.full_like(k, np.nan)
    used = 0
    for row, n in enumerate(case.kv_lens):
        table[row, : need[row]] = order[used: used + need[row]]
        used += need[row]
        for s in range(n):
            page = table[row, s // c]
            k[:, page, s % c] = rng.standard_normal((case.kv_heads, case.head_dim))
            v[:, page, s % c] = rng.standard_normal((case.kv_heads, case.head_dim))
    q_lens = case.q_lens or (case.t,) * b
    pos = np.full((b, case.t), -1, np.int32)  # padding query slots
    for row, (n, ql) in enumerate(zip(case.kv_lens, q_lens)):
        pos[row, :ql] = np.arange(n - ql, n)
    q = rng.standard_normal((b, case.t, case.heads, case.head_dim)).astype(np.float32)
    args = dict(q=jnp.asarray(q, case.dtype), block_table=jnp.asarray(table), kv_lens=jnp.asarray(case.kv_lens, jnp.int32),
                q_positions=jnp.asarray(pos))
    if case.kv == "int8":
        kq, ks = pa_ref.quantize_pages(jnp.nan_to_num(jnp.asarray(k)))
        vq, vs = pa_ref.quantize_pages(jnp.nan_to_num(jnp.asarray(v)))
        args.update(k_pages=kq, v_pages=vq, k_scales=ks, v_scales=vs)
    elif case.kv == "fp8":  # the engine's fp8_e4m3 pages
        kq, ks = pa_ref.quantize_pages(jnp.nan_to_num(jnp.asarray(k)), jnp.float8_e4m3fn)
        vq, vs = pa_ref.quantize_pages(jnp.nan_to_num(jnp.asarray(v)), jnp.float8_e4m3fn)
        args.update(k_pages=kq, v_pages=vq, k_scales=ks, v_scales=vs)
    else:
        args.update(k_pages=jnp.asarray(k, case.dtype), v_pages=jnp.asarray(v, case.dtype))
    return args, pos


BASE = [
    Case(kv_lens=(1,)),  # one token
    Case(kv_lens=(37, 16, 5)),  # decode rows, kv length not a multiple of the page size
    Case(kv_lens=(37, 0, 20), t=8, q_lens=(8, 0, 3)),  # prefill chunks, a row with zero new tokens
    Case(kv_lens=(50, 9), t=4, heads=8, kv_heads=1, sliding_window=7),  # GQA 8:1 with a window
    Case(kv_lens=(40, 3), soft_cap=5.0, dtype=jnp.bfloat16),
    Case(kv_lens=(33, 18), t=3, kv="int8"),
    Case(kv_lens=(29, 64), t=2, dtype=jnp.bfloat16, kv="int8", heads=8),
    Case(kv_lens=(33, 18), t=3, kv="fp8"),
    Case(kv_lens=(29, 64), t=2, dtype=jnp.bfloat16, kv="fp8", heads=8),
]
SLOW = [
    Case(kv_lens=(300, 257, 1, 128), t=16, heads=32, kv_heads=8, head_dim=128, dtype=jnp.bfloat16),  # largest bucket-ish
    Case(kv_lens=(512,), t=64, heads=4, kv_heads=4, head_dim=64, page_size=32, sliding_window=100, soft_cap=30.0),
    Case(kv_lens=(70, 1, 0, 45), t=5, q_lens=(5, 1, 0, 2), heads=6, kv_heads=3, head_dim=16, page_size=16, kv="int8"),
    Case(kv_lens=(64, 100), width=12, dtype=jnp.bfloat16),  # a block table wider than needed
]


def supported(impl, case, args):
    mod = PA[impl]
    return mod.unsupported(args["q"], args["k_pages"], args.get("k_scales")) is None


def check_attention(impl, case):
    args, pos = make_inputs(case)
    if not supported(impl, case, args):
        pytest.skip(f"{impl} kernel does not take {case}")
    kw = dict(sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    want = np.asarray(pa_ref.paged_attention(**args, **kw).astype(jnp.float32))
    run = RUNNERS[impl](PA[impl].paged_attention)
    got = np.asarray(run(**args, **kw).astype(jnp.float32))
    assert got.shape == want.shape and np.isfinite(got).all()
    real = pos >= 0  # padding query slots are nobody's output
    scale = max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got[real], want[real], atol=TOL[case.dtype] * scale, rtol=0)
    assert (got[~real] == 0).all() and (want[~real] == 0).all()  # a query that sees nothing: zeros


@pytest.mark.parametrize("impl", ["tpu", "gpu", "cpu"])
@pytest.mark.parametrize("case", BASE, ids=str)
def test_paged_attention_kernel_equals_reference(impl, case):
    check_attention(impl, case)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize("case", SLOW, ids=str)
def test_paged_attention_kernel_equals_reference_full_grid(impl, case):
    check_attention(impl, case)


@pytest.mark.parametrize("case", [Case(kv_lens=(40, 3), soft_cap=5.0), *(dataclasses.replace(c, dtype=jnp.float32) for c in SLOW)],
                         ids=str)
def test_cpu_paged_attention_full_grid(case):
    """The CPU kernel runs natively, so CI takes the whole grid in float32 (soft cap, long rows,
    windows, int8 pages, a block table wider than needed)."""
    check_attention("cpu", case)


def test_gpu_kernel_splits_and_page_blocks_do_not_change_the_result():
    args, pos = make_inputs(Case(kv_lens=(100, 31, 64), t=2))
    want = np.asarray(pa_ref.paged_attention(**args))
    for splits, ppb in [(1, 1), (3, 1), (2, 2), (7, 4)]:
        got = pa_gpu.paged_attention(**args, interpret=True, num_splits=splits, pages_per_block=ppb)
        np.testing.assert_allclose(np.asarray(got)[pos >= 0], want[pos >= 0], atol=2e-5)


def test_tpu_kernel_page_blocks_do_not_change_the_result():
    """1, 2, 3 (not dividing the table) and 8 (wider than it) pages per step, double-buffered DMAs."""
    args, pos = make_inputs(Case(kv_lens=(100, 31, 64), t=2, page_size=8))
    want = np.asarray(pa_ref.paged_attention(**args))
    for ppb in [1, 2, 3, 8, 16]:
        got = pa_tpu.paged_attention(**args, interpret=STRICT_TPU, pages_per_block=ppb)
        np.testing.assert_allclose(np.asarray(got)[pos >= 0], want[pos >= 0], atol=2e-5)


def test_int8_kv_pages_follow_the_float_pages_they_quantize():
    """The int8 format is close to the float cache it came from (not just self-consistent)."""
    case = Case(kv_lens=(40, 23), t=2)
    args, pos = make_inputs(case)
    f = np.asarray(pa_ref.paged_attention(**args))
    kq, ks = pa_ref.quantize_pages(jnp.nan_to_num(args["k_pages"]))
    vq, vs = pa_ref.quantize_pages(jnp.nan_to_num(args["v_pages"]))
    q8 = pa_ref.paged_attention(**{**args, "k_pages": kq, "v_pages": vq}, k_scales=ks, v_scales=vs)
    np.testing.assert_allclose(np.asarray(q8)[pos >= 0], f[pos >= 0], atol=0.05)


# ---- quantized matmul ---------------------------------------------------------------------------------
MATMUL = [(8, 0, (1, 256, 128)), (8, 0, (5, 512, 384)), (4, 32, (1, 256, 128)), (4, 64, (7, 512, 256)),
          (4, 128, (3, 256, 128)), (8, 0, (2, 3, 128, 64)), ("4a", 32, (1, 256, 128)), ("4a", 128, (5, 512, 256)),
          (4, 64, (3, 172, 128)),  # K that the group does not divide: a padded last group
          ("8a", 0, (1, 256, 128)), ("8a", 0, (5, 512, 384)), ("8a", 0, (2, 3, 128, 64))]  # W8A8
MATMUL_SLOW = [(8, 0, (300, 1024, 512)), (4, 32, (17, 2048, 256)), (4, 128, (64, 1024, 640)), ("4a", 64, (33, 1024, 384)),
               ("8a", 0, (70, 1024, 512))]


def check_matmul(impl, bits, group, shape, dtype):
    """bits "4a": asymmetric int4 (skewed weights, so the offsets matter); "8a": W8A8 (int8
    activations too: both sides sum the same int32 products, so they agree to float rounding)."""
    *lead, k, n = shape
    w = jax.random.normal(jax.random.key(0), (k, n))
    if bits == "8a":
        q = dataclasses.replace(qm.quantize(w, 8), act_bits=8)
    else:
        q = qm.quantize(w + 0.5, 4, group, asymmetric=True) if bits == "4a" else qm.quantize(w, bits, group)
    x = jax.random.normal(jax.random.key(1), (*lead, k)).astype(dtype)
    mod = {"tpu": qm_tpu, "gpu": qm_gpu}[impl]
    if mod.unsupported(x, q):
        pytest.skip(mod.unsupported(x, q))
    want = np.asarray(qm.reference.quant_matmul(x, q).astype(jnp.float32))
    got = np.asarray(RUNNERS[impl](mod.quant_matmul)(x, q).astype(jnp.float32))
    assert got.shape == want.shape
    tol = 2e-6 if dtype == jnp.float32 else 1e-2  # relative to max |out|
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits,group,shape", MATMUL, ids=lambda v: str(v))
def test_quant_matmul_kernel_equals_reference(impl, dtype, bits, group, shape):
    check_matmul(impl, bits, group, shape, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize("bits,group,shape", MATMUL_SLOW, ids=lambda v: str(v))
def test_quant_matmul_kernel_equals_reference_full_grid(impl, bits, group, shape):
    check_matmul(impl, bits, group, shape, jnp.bfloat16)


# ---- dispatch -----------------------------------------------------------------------------------------
def test_explicit_impl_that_cannot_take_the_input_names_the_constraint():
    args, _ = make_inputs(Case(kv_lens=(5,), page_size=4, head_dim=12))
    with pytest.raises(ValueError, match="attention_impl 'gpu_interpret': head_dim must be a power of two >= 16, got 12"):
        pa.paged_attention(**args, impl="gpu_interpret")
    with pytest.raises(ValueError, match="attention_impl 'tpu': head_dim must be a multiple of 8, got 12"):
        pa.paged_attention(**args, impl="tpu")
    args, _ = make_inputs(Case(kv_lens=(5,), page_size=4))
    with pytest.raises(ValueError, match="page_size must be a multiple of 8, got 4"):
        pa.paged_attention(**args, impl="tpu_interpret")
    with pytest.raises(ValueError, match="matmul_impl 'gpu': N must be a multiple of 16, got 40"):
        qm.quant_matmul(jnp.ones((1, 64)), qm.quantize(jnp.ones((64, 40))), impl="gpu")
    with pytest.raises(ValueError, match="matmul_impl 'tpu': activations must be float32 or bfloat16, got float16"):
        qm.quant_matmul(jnp.ones((1, 64), jnp.float16), qm.quantize(jnp.ones((64, 128))), impl="tpu")
    with pytest.raises(ValueError, match="attention_impl 'mosaic' is not available; choose from auto, reference"):
        pa.paged_attention(**args, impl="mosaic")


def test_auto_falls_back_to_the_reference_and_logs_once(caplog, monkeypatch):
    """On a GPU backend, `auto` takes the GPU kernel when it can; a shape it cannot take goes to the
    reference with one log line, however many calls."""
    monkeypatch.setattr(kernels, "_LOGGED", set())
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    args, _ = make_inputs(Case(kv_lens=(5,), head_dim=12))
    with caplog.at_level(logging.WARNING, logger="jaxinfer.kernels"):
        for _ in range(3):
            assert kernels.select("attention_impl", "auto", pa.UNSUPPORTED, args["q"], args["k_pages"], None) == ("reference", {})
    lines = [r.message for r in caplog.records]
    assert lines == ["attention_impl auto: the gpu kernel cannot take these inputs (head_dim must be a power of two "
                     ">= 16, got 12); using the jnp reference"]
    args, _ = make_inputs(Case(kv_lens=(5,)))
    assert kernels.select("attention_impl", "auto", pa.UNSUPPORTED, args["q"], args["k_pages"], None) == ("gpu", {})


def test_gpu_check_script_runs_end_to_end_interpreted(tmp_path):
    """The prepared H200 script (experiments/gpu_kernels.py) at toy sizes through the interpreter:
    its correctness checks pass and it writes its report, so a lent GPU's minutes go to timing."""
    import json

    from experiments import gpu_kernels

    assert gpu_kernels.main(["--smoke", "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["attention"]) == 2 and len(report["matmul"]) == 2
    assert all(r["err"] < 2e-2 for part in ("attention", "matmul") for r in report[part].values())
