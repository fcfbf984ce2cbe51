"""Test setup: 8 simulated CPU devices (set before jax is imported) and the committed HF fixtures."""

import json
import os
from pathlib import Path

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI turns JAX's persistent compilation cache on; in-process CLI tests must not turn it on for
# the whole test process (tests/test_cli.py checks the cache in subprocesses).
os.environ.setdefault("JAXINFER_COMPILATION_CACHE", "off")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ["llama2", "llama2_bias", "llama3", "mistral", "qwen2", "qwen3"]


def golden(family: str) -> dict:
    return json.loads((FIXTURES / family / "golden.json").read_text())


def golden_logits(family: str, i: int) -> np.ndarray:
    return np.load(FIXTURES / family / "golden_logits.npz")[f"logits_{i}"]


def transformers_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops every compiled executable after each test module. Each one keeps memory mappings of
    its own (the Pallas interpreter alone makes thousands), and one process running the whole suite
    otherwise reaches the kernel's vm.max_map_count (65530): mmap then fails inside XLA, seen as
    MemoryError, 'Failed to materialize symbols' or a segfault."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def _start_tpu_compiles(config) -> None:
    """`python -m jaxinfer.aot --small` in a child process (libtpu then never loads into the test
    process), started as soon as the session knows it needs it, so that its ~2 minutes of single-
    threaded TPU compiles overlap the tests before tests/test_kernel_compile.py."""
    import subprocess
    import sys
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="jaxinfer-aot-"))
    with open(out / "stderr.txt", "w") as log:  # a file, not a pipe: libtpu's warnings would fill a pipe and block
        proc = subprocess.Popen([sys.executable, "-m", "jaxinfer.aot", "--small", "--out", str(out / "report.json")],
                                env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL, stderr=log)
    config.stash[TPU_COMPILES] = (proc, out)


TPU_COMPILES = pytest.StashKey()


def pytest_collection_finish(session):
    if any("tpu_report" in getattr(item, "fixturenames", ()) for item in session.items):
        _start_tpu_compiles(session.config)


def pytest_unconfigure(config):
    import shutil

    proc, out = config.stash.get(TPU_COMPILES, (None, None))
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def tpu_report(request):
    """The report of `python -m jaxinfer.aot --small` (every TPU kernel and the step, for each topology)."""
    if TPU_COMPILES not in request.config.stash:
        _start_tpu_compiles(request.config)
    proc, out = request.config.stash[TPU_COMPILES]
    proc.wait(timeout=1200)
    assert proc.returncode == 0, (out / "stderr.txt").read_text()[-3000:]
    return json.loads((out / "report.json").read_text())


def pytest_collection_modifyitems(config, items):
    if transformers_available():
        return
    skip = pytest.mark.skip(reason="live_hf: torch + transformers not importable (see tests/fixtures/make_hf_fixtures.py)")
    for item in items:
        if "live_hf" in item.keywords:
            item.add_marker(skip)
