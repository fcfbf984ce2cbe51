"""`jaxinfer run`: every run of an experiment into results/NAME/RUN_ID/ (config.yaml, env.json,
requests.jsonl, summary.json), resuming from the runs already done."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from jaxinfer.config import ConfigError, dump_yaml, resolve_path, to_dict
from jaxinfer.experiment.spec import Experiment, Run

RECORD = "experiment.json"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> dict:
    """sha and dirty flag of the checkout jaxinfer runs from (None outside a git checkout)."""
    root = Path(__file__).parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return {"sha": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"sha": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def environment(seed: int) -> dict:
    import jax

    devices = jax.devices()
    return {"jax": jax.__version__, "jaxlib": _version("jaxlib"), "flax": _version("flax"),
            "libtpu": _version("libtpu") or _version("libtpu-nightly"), "numpy": _version("numpy"),
            "python": platform.python_version(), "platform": jax.default_backend(),
            "device_kind": devices[0].device_kind, "num_devices": len(devices), "num_processes": jax.process_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_platforms": os.environ.get("JAX_PLATFORMS", ""),
            "cpu": _cpu_model(), "num_cpus": os.cpu_count(), "git": _git(), "seed": seed,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _stored_config(folder: Path) -> dict | None:
    path = folder / "config.yaml"
    return yaml.safe_load(path.read_text()) if (folder / "summary.json").is_file() and path.is_file() else None


def check_folder(out: Path, exp: Experiment, fresh: bool) -> list[Run]:
    """The runs still to do; ConfigError, before anything runs, if `out` holds something else:
    another experiment, or a run of this one under another configuration."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"results folder '{out}' is a file; give --out a folder")
    record = out / RECORD
    if out.is_dir() and any(out.iterdir()):
        if not record.is_file():
            raise ConfigError(f"results folder '{out}' is not empty and holds no {RECORD}: not an experiment's "
                              "results; choose another --out")
        held = json.loads(record.read_text())
        if (held.get("name"), held.get("kind"), held.get("smoke")) != (exp.name, exp.spec.kind, exp.smoke):
            raise ConfigError(f"results folder '{out}' holds experiment '{held.get('name')}' (kind "
                              f"{held.get('kind')}, smoke {held.get('smoke')}), not '{exp.name}' (kind "
                              f"{exp.spec.kind}, smoke {exp.smoke}); choose another --out")
        if fresh:
            shutil.rmtree(out)
            return list(exp.runs)
        stale = [r.run_id for r in exp.runs
                 if (s := _stored_config(out / r.run_id)) is not None and s != to_dict(r.cfg)]
        if stale:
            raise ConfigError(f"results folder '{out}' holds runs {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''} "
                              "under another configuration (the file or the overrides changed since); pass --fresh "
                              "to discard them, or choose another --out")
    return [r for r in exp.runs if _stored_config(out / r.run_id) is None]


def load_prices(spec) -> dict:
    path = resolve_path(spec.prices)
    if not path.is_file():
        raise ConfigError(f"experiment.prices='{spec.prices}': no such file ({path})")
    prices = yaml.safe_load(path.read_text())
    missing = [n for n in list(prices.get("match", {}).values()) + prices.get("compare", []) if n not in prices["devices"]]
    if missing:
        raise ConfigError(f"{path}: 'match' / 'compare' name devices that 'devices' lacks: {', '.join(missing)}")
    return prices


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # a killed run leaves no half-written summary behind


def run_experiment(exp: Experiment, out: str | Path, fresh: bool = False, progress: bool = True) -> Path:
    """Runs what is not done yet; returns the results folder."""
    from tqdm import tqdm

    from jaxinfer.experiment.kinds import KINDS, Context

    out = Path(out)
    todo = check_folder(out, exp, fresh)
    if exp.spec.peers:  # the peers' environment and precisions, before anything runs
        from jaxinfer.experiment import peers

        peers.peer_python(exp.spec)
        for run in todo:
            peers.precision(run.cfg)
    prices = load_prices(exp.spec)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / RECORD, exp.record() | {"file": exp.path, "runs": [r.run_id for r in exp.runs]})
    shutil.copyfile(exp.path, out / "experiment.yaml")
    ctx = Context(exp.spec, prices)
    skipped = len(exp.runs) - len(todo)
    if skipped:
        print(f"{exp.name}: {skipped} of {len(exp.runs)} runs already done in {out}; running the other {len(todo)}")
    bar = tqdm(todo, desc=exp.name, unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.run_id[:60])
        folder = out / run.run_id
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rows, requests = KINDS[exp.spec.kind](run, ctx)
        env = environment(run.cfg.seed)
        env["machine"] = ctx.measurements()
        _write_json(folder / "env.json", env)
        with open(folder / "requests.jsonl", "w") as f:
            for r in requests:
                f.write(json.dumps(r, default=str) + "\n")
        dump_yaml(run.cfg, folder / "config.yaml")
        _write_json(folder / "summary.json", {"experiment": exp.name, "kind": exp.spec.kind, "run_id": run.run_id,
                                              "labels": run.labels, "rows": rows, "wall_s": time.perf_counter() - t0})
        if _memory_maps_used() > 1 / 3:
            release_executables()
    return out


def _memory_maps_used() -> float:
    """Fraction of the process's memory-map limit in use (Linux; 0 where unknown)."""
    try:
        with open("/proc/self/maps") as f:
            used = sum(1 for _ in f)
        return used / int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 0.0


def release_executables() -> None:
    """Drops every compiled executable. A sweep compiles hundreds of step shapes, and XLA:CPU maps
    each executable's code into memory: a long sweep exhausted the process's memory maps (the
    page-size sweep: "LLVM compilation error: Cannot allocate memory", then a crash at ~65,000
    maps), so the runner calls this between runs once a third of the limit is in use. Runs that
    share shapes reload them from the persistent compilation cache."""
    import jax

    from jaxinfer.step import compile_step

    compile_step.cache_clear()
    jax.clear_caches()
