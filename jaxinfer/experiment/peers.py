"""HOST ONLY: other engines on the same weights, for the `decode` kind's `experiment.peers`. The run's
float model is written once as a Hugging Face folder (save_hf) and `experiments/peer_bench.py` runs
in the peers' own Python environment (experiments/setup_peers.sh: torch, transformers, OpenVINO
GenAI, llama-cpp-python), converting it to each engine's format and timing the decode workload
jaxinfer's rows time. Nothing of it is imported into jaxinfer's environment."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
from pathlib import Path

from jaxinfer.config import ConfigError, RunConfig
from jaxinfer.experiment.spec import PRECISIONS

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "experiments" / "peer_bench.py"
SETUP = "experiments/setup_peers.sh"


def peer_python(spec) -> Path:
    """The peers' interpreter: experiment.peer_python, else $JAXINFER_PEER_PYTHON, else .peers/ at
    the checkout's root (where setup_peers.sh puts it)."""
    given = spec.peer_python or os.environ.get("JAXINFER_PEER_PYTHON", "")
    path = Path(given).expanduser() if given else ROOT / ".peers" / "bin" / "python"
    if not path.is_file():
        where = f"experiment.peer_python='{spec.peer_python}'" if spec.peer_python else \
            f"$JAXINFER_PEER_PYTHON='{given}'" if given else f"{path} (the default)"
        raise ConfigError(f"experiment.peers {list(spec.peers)}: no peer Python at {where}; run `sh {SETUP}` to "
                          "create .peers/ (torch, transformers, OpenVINO GenAI, llama-cpp-python), or point "
                          "experiment.peer_python at an environment that has them, or set experiment.peers: []")
    return path


def precision(cfg: RunConfig) -> str:
    """The peers' weight precision for this run: float32, int8 or int4 from model.quant."""
    if cfg.model.quant == "none":
        if cfg.model.dtype != "float32":
            raise ConfigError(f"experiment.peers: model.dtype={cfg.model.dtype}; the peers are measured with "
                              "float32 weights (set model.dtype: float32, or quantize with model.quant)")
        return "float32"
    return cfg.model.quant


def _folder(cfg: RunConfig, ctx) -> Path:
    """The run's unquantized model as a Hugging Face folder, written once per model and kept (with
    the peers' conversions beside it) in a temporary folder for the life of the experiment."""
    from jaxinfer.checkpoint import save_hf

    m = cfg.model
    float_model = dataclasses.replace(m, quant="none", quant_lm_head="none", quant_embed=False, quant_asymmetric=False)
    key = ("peer_folder", cfg.checkpoint, cfg.seed, float_model)
    if key not in ctx.cache:
        if "peer_tmp" not in ctx.cache:
            ctx.cache["peer_tmp"] = tempfile.TemporaryDirectory(prefix="jaxinfer-peers-")
        work = Path(ctx.cache["peer_tmp"].name) / f"model{sum(1 for k in ctx.cache if k[0] == 'peer_folder')}"
        model = ctx.model(dataclasses.replace(cfg, model=float_model))[0]
        save_hf(model, work / "hf")
        ctx.cache[key] = work
    return ctx.cache[key]


def measure(peer: str, cfg: RunConfig, ctx, reference_tokens: list[int] | None, timeout_s: float = 3600) -> dict | None:
    """One peer's decode row for this run's workload (bench.num_requests x bench.prompt_len random
    tokens, bench.output_len new ones, bench.seed): tok_s, step_ms, prefill_ms, and `agree_tokens`,
    how many of the first row's greedy tokens equal jaxinfer's (reference_tokens) before the first
    difference: the check that the peer ran the same model. None where the peer has no path for
    the run's precision (PRECISIONS)."""
    if precision(cfg) not in PRECISIONS[peer]:
        return None
    python = peer_python(ctx.spec)
    work = _folder(cfg, ctx)
    b = cfg.bench
    args = [str(python), str(SCRIPT), "--hf", str(work / "hf"), "--work", str(work), "--engine", peer,
            "--precision", precision(cfg), "--batch", str(b.num_requests), "--prompt-len", str(b.prompt_len),
            "--output-len", str(b.output_len), "--repeats", str(ctx.spec.repeats), "--seed", str(b.seed),
            "--group-size", str(cfg.model.quant_group_size)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"peer {peer}: no result within {timeout_s:.0f} s ({' '.join(args)})") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"peer {peer} failed (exit {done.returncode}): {' '.join(args)}\n{tail}")
    row = json.loads(lines[-1])
    tokens = row.pop("tokens")
    if reference_tokens is not None:
        same = next((i for i, (a, c) in enumerate(zip(tokens, reference_tokens)) if a != c), min(len(tokens), len(reference_tokens)))
        row["agree_tokens"] = same
    return {k: v for k, v in row.items() if k not in ("engine", "batch")}
