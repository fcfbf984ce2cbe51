"""The notebooks (notebooks/*.ipynb, the Colab tutorials) run top to bottom on CPU at their tiny size,
and each carries its Colab badge and install cell, with no outputs or paths of the machine that saved it."""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = ["01_quickstart", "02_batching", "03_speculative_decoding", "04_quantization_and_kernels",
         "05_sharding_and_tpu_pods"]
REPO = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
SECRETS = re.compile(r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,}|AKIA[A-Z0-9]{16}|"
                     r"(api[_-]?key|password|secret)\s*=", re.I)


def badge(name: str) -> str:
    github = REPO.removeprefix("https://github.com/")
    return ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{github}/blob/main/notebooks/{name}.ipynb)")


def cells(path: Path) -> list[dict]:
    return [dict(c, text="".join(c["source"])) for c in json.loads(path.read_text())["cells"]]


def test_the_five_tutorials_are_there():
    assert [p.stem for p in NOTEBOOKS] == NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_badge_install_cell_and_no_stale_outputs(path):
    cs = cells(path)
    assert cs[0]["cell_type"] == "markdown" and badge(path.stem) in cs[0]["text"]
    install = cs[1]
    assert install["cell_type"] == "code"
    for needed in ('"google.colab" in sys.modules', REPO, "pip", "tpu,experiments", "jax[cuda12]"):
        assert needed in install["text"], f"the install cell lacks {needed!r}"
    assert "jax.devices()" in cs[2]["text"] and "TINY" in cs[2]["text"]  # sizes by backend
    for c in cs:
        if c["cell_type"] == "code":
            assert c["execution_count"] is None and c["outputs"] == [], "outputs or execution counts were saved"
    raw = path.read_text()
    for home in {str(ROOT), str(Path.home()), "/tmp/", "/content/drive"}:
        assert home not in raw, f"a path of the machine that saved it: {home}"
    assert not SECRETS.search(raw), SECRETS.search(raw)


def test_readme_lists_every_notebook_with_its_badge():
    readme = (ROOT / "README.md").read_text()
    for name in NAMES:
        assert badge(name) in readme and f"(notebooks/{name}.ipynb)" in readme, name


@pytest.mark.parametrize("name", NAMES)
def test_runs_top_to_bottom_on_cpu(executed_notebooks, name):
    """Executed by tests/run_notebooks.py (the `executed_notebooks` fixture, started in the background)."""
    nb, error = executed_notebooks[name]
    assert error is None, error[-3000:]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
