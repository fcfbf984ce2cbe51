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


# ---- background jobs -------------------------------------------------------------------------------
# Two slow, single-threaded parts of the suite run as child processes started as soon as collection
# knows they are needed, so they overlap the tests before theirs: the TPU compile proofs
# (`python -m jaxinfer.aot --small`, ~2 min; libtpu then never loads into the test process) and the
# notebooks (tests/run_notebooks.py, ~3 min). A fixture waits for its job and reads what it wrote.
BACKGROUND = {
    "tpu_report": ["-m", "jaxinfer.aot", "--small", "--out", "{out}/report.json"],
    "executed_notebooks": [str(Path(__file__).parent / "run_notebooks.py"), "{out}"],
}
JOBS = pytest.StashKey()


def _start(config, name: str) -> None:
    import subprocess
    import sys
    import tempfile

    out = Path(tempfile.mkdtemp(prefix=f"jaxinfer-{name}-"))
    argv = [sys.executable] + [a.format(out=out) for a in BACKGROUND[name]]
    with open(out / "stderr.txt", "w") as log:  # a file, not a pipe: libtpu's warnings would fill a pipe and block
        proc = subprocess.Popen(argv, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=log, stderr=subprocess.STDOUT)
    config.stash.setdefault(JOBS, {})[name] = (proc, out)


def _wait(config, name: str, timeout: float = 1200) -> Path:
    if name not in config.stash.get(JOBS, {}):
        _start(config, name)
    proc, out = config.stash[JOBS][name]
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, (out / "stderr.txt").read_text()[-3000:]
    return out


def pytest_collection_finish(session):
    for name in BACKGROUND:
        if any(name in getattr(item, "fixturenames", ()) for item in session.items):
            _start(session.config, name)


def pytest_unconfigure(config):
    import shutil

    for proc, out in config.stash.get(JOBS, {}).values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def tpu_report(request):
    """The report of `python -m jaxinfer.aot --small` (every TPU kernel and the step, for each topology)."""
    return json.loads((_wait(request.config, "tpu_report") / "report.json").read_text())


@pytest.fixture(scope="session")
def executed_notebooks(request):
    """name -> (the notebook as executed at its tiny size, the error text or None)."""
    import nbformat

    out = _wait(request.config, "executed_notebooks")
    return {p.stem: (nbformat.read(p, as_version=4), (out / f"{p.stem}.error.txt").read_text()
                     if (out / f"{p.stem}.error.txt").exists() else None) for p in sorted(out.glob("*.ipynb"))}


def pytest_collection_modifyitems(config, items):
    if transformers_available():
        return
    skip = pytest.mark.skip(reason="live_hf: torch + transformers not importable (see tests/fixtures/make_hf_fixtures.py)")
    for item in items:
        if "live_hf" in item.keywords:
            item.add_marker(skip)
