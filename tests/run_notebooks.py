"""Executes every notebook in notebooks/ at its tiny size, two at a time (each kernel is its own
process, mostly compiling on one core): `python tests/run_notebooks.py OUT` writes OUT/NAME.ipynb
(as executed) and, for a notebook that failed, OUT/NAME.error.txt. Run by the `executed_notebooks`
fixture (conftest.py) in the background; tests/test_notebooks.py reads the results."""

import asyncio
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


async def run(path: Path, out: Path, slots: asyncio.Semaphore) -> None:
    nb = nbformat.read(path, as_version=4)
    async with slots:
        try:
            await NotebookClient(nb, timeout=300, kernel_name="python3",
                                 resources={"metadata": {"path": str(path.parent)}}).async_execute()
        except Exception as e:  # noqa: BLE001 - the notebook's own test reports it
            (out / f"{path.stem}.error.txt").write_text(f"{type(e).__name__}: {e}")
        nbformat.write(nb, out / f"{path.stem}.ipynb")


async def main(out: Path) -> None:
    slots = asyncio.Semaphore(2)
    await asyncio.gather(*(run(p, out, slots) for p in NOTEBOOKS))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    os.environ |= {"JAXINFER_NOTEBOOK_SIZE": "tiny", "JAX_PLATFORMS": "cpu",  # the kernels inherit these
                   "JAXINFER_NOTEBOOK_RESULTS": str(out / "results")}  # the experiments write here, not into the checkout
    asyncio.run(main(out))
