"""The host wall: host-policy modules import no jax, directly or through other jaxinfer modules."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "jaxinfer"
HOST_MODULES = ["tokenizer", "config", "scheduler", "metrics", "corpus", "experiment.spec", "experiment.report",
                "scoring", "serve.protocol", "serve.client", "chips"]
DEVICE_LIBS = {"jax", "jaxlib", "flax", "optax", "orbax", "chex"}


def imported_modules(module: str) -> set[str]:
    tree = ast.parse((PKG / f"{module.replace('.', '/')}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def transitive_imports(module: str, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    for name in imported_modules(module):
        if name in seen:
            continue
        seen.add(name)
        if name.startswith("jaxinfer."):
            inner = name.removeprefix("jaxinfer.")
            if (PKG / f"{inner.replace('.', '/')}.py").is_file():
                transitive_imports(inner, seen)
    return seen


@pytest.mark.parametrize("module", HOST_MODULES)
def test_host_modules_import_no_jax(module):
    leaked = {n for n in transitive_imports(module) if n.split(".")[0] in DEVICE_LIBS}
    assert not leaked, f"jaxinfer/{module}.py reaches device libraries: {sorted(leaked)}"


@pytest.mark.parametrize("module", HOST_MODULES)
def test_importing_a_host_module_loads_no_jax(module):
    """The parse above misses what the package's __init__ pulls in: import for real, in a fresh process."""
    code = (f"import sys, jaxinfer.{module}; leaked = sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(DEVICE_LIBS)})); "
            "assert not leaked, leaked")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_package_exports_load_lazily():
    import jaxinfer

    missing = [n for n in jaxinfer.__all__ if getattr(jaxinfer, n, None) is None]
    assert not missing
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jaxinfer.nope  # noqa: B018
