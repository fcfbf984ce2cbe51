"""The README runs as written: every Python snippet executes as pasted (on the shipped model), the
quickstart commands that .ci/run executes are there, and every relative link resolves."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_python_snippets_run_as_pasted(i, tmp_path):
    proc = subprocess.run([sys.executable, "-c", SNIPPETS[i]], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # not the repository: the installed package must be enough
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_quickstart_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    for name, cmd in [("quickstart-run", "./install.sh && .venv/bin/jaxinfer generate"),
                      ("quickstart-test", "./install.sh test && .venv/bin/python -m pytest -q")]:
        assert f"<!-- {name} -->\n```bash\n{cmd}\n```" in README
        assert name in ci


def test_relative_links_resolve():
    for target in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / target).exists(), target
    assert "../shared" not in README
