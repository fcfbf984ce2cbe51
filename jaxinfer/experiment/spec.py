"""HOST ONLY: an experiment YAML -> its runs. One file per table or figure: an `experiment:` section
(what it measures, the sweep, the report) beside the sections of a `RunConfig` (the base config).

Every run is the base config with one point of the grid (`sweep`: the product of its lists), crossed
with one point of `zip` (lists of equal length, stepped together) and one named `variant` (a
mapping of dotted keys). All of it is resolved and type-checked before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jaxinfer.config import ConfigError, RunConfig, _set_dotted, from_dict, to_dict

PEERS = ("transformers", "openvino", "llama.cpp")
# What each peer's rows mean by a precision (peer_bench.py): OpenVINO through optimum-intel's nncf
# compression (int8 per output channel, int4 in groups of model.quant_group_size, symmetric, every
# layer), llama.cpp's q8_0 and q4_0 (a float16 scale per 32 weights). transformers: float32 only.
PRECISIONS = {"transformers": ("float32",), "openvino": ("float32", "int8", "int4"),
              "llama.cpp": ("float32", "int8", "int4")}

KINDS = ("decode", "serve", "quality", "speculative", "compile", "pods")


@dataclass(frozen=True)
class PlotSpec:
    """One figure: metric `y` against `x` (a swept key, `variant`, or a metric), one line per `series`."""

    x: str
    y: str
    series: str | None = None
    title: str = ""
    logx: bool = False
    logy: bool = False
    bounds: bool = False  # draw each series' roofline bound (bound_tok_s) dashed beside it
    where: dict[str, typing.Any] = field(default_factory=dict)  # only rows whose labels match


@dataclass(frozen=True)
class ExperimentSpec:
    kind: str  # decode | serve | quality | speculative | compile
    description: str = ""  # the table's caption
    repeats: int = 3  # the median is reported; warm-up and compile are kept apart
    sweep: dict[str, tuple[typing.Any, ...]] = field(default_factory=dict)  # dotted key -> values (grid)
    zip: dict[str, tuple[typing.Any, ...]] = field(default_factory=dict)  # dotted key -> values (stepped together)
    variants: dict[str, dict[str, typing.Any]] = field(default_factory=dict)  # name -> dotted overrides
    baseline: str | None = None  # a variant: rows gain "x <baseline>" (same labels otherwise)
    ratio_metric: str = ""  # the metric of that ratio (default: the kind's throughput)
    columns: tuple[str, ...] = ()  # metrics shown in the table (default: the kind's)
    plots: tuple[PlotSpec, ...] = ()
    smoke: dict[str, typing.Any] = field(default_factory=dict)  # dotted overrides under --smoke (CI)
    prices: str = "package:presets/prices.yaml"
    bandwidth_mb: int = 1024  # buffer of the read-bandwidth measurement (far above the caches)
    matmul_size: int = 2048  # n of the n x n x n matmul that measures the compute peak
    # serve: compile every step shape the engine config can reach (Engine.warmup) before the warm-up
    # pass; arrivals vary the shapes a pass meets, so without it a measured step may compile. Off
    # for configs with many shapes and a deterministic workload (all arrivals at 0).
    compile_all_shapes: bool = True
    # decode: what decodes: generator (dense cache, one compiled loop) and/or engine (paged cache,
    # host scheduler, one compiled step per token); each gives a row labelled `decoder`
    decoders: tuple[str, ...] = ("generator",)
    # decode: other engines timed on the same weights and workload, each a row labelled `decoder`
    # (transformers, openvino, llama.cpp; jaxinfer/experiment/peers.py), run in their own Python
    # environment: peer_python, else $JAXINFER_PEER_PYTHON, else .peers/ (experiments/setup_peers.sh)
    peers: tuple[str, ...] = ()
    peer_python: str = ""
    # quality: held-out stories (the validation split of the reference corpus) and window length
    eval_stories: int = 100
    eval_len: int = 128
    # quality: greedy continuations through the Engine against the float model's (0: none), from
    # greedy_prompts story openings of greedy_prompt_len tokens; and how speed is timed: generate
    # (batch decode through the dense-cache generate()) or engine (Engine.generate over story
    # prompts: paged KV cache, so kv_cache_dtype and speculative decoding count)
    greedy_tokens: int = 0
    greedy_prompts: int = 8
    greedy_prompt_len: int = 16
    speed: str = "generate"
    # compile: TPU topologies and kernel/step cases (empty: all), and whether to export for CUDA
    topologies: tuple[str, ...] = ("v5e", "v5p", "v6e")
    cases: tuple[str, ...] = ()
    cuda: bool = True
    small_model: bool = False  # compile: the small step model instead of the 8B-like layers
    # pods (jaxinfer.pods): SLICE:MODEL:DATAxMODEL targets compiled at full size (memory and cost at
    # batch 64, context 2048), and targets predicted over the grid of batches x contexts
    pod_targets: tuple[str, ...] = ("v5e-8:llama3-8b:1x8", "v6e-8:llama3-8b:1x8", "v5p-8:llama3-8b:1x4",
                                    "v5p-32:llama3-70b:2x8", "h200:llama3-8b:1x1")
    pod_grid: tuple[str, ...] = ("v5e-8:llama2-7b:1x8", "h200:llama3-8b:1x1")
    batches: tuple[int, ...] = (1, 8, 32, 64, 96, 128, 256)
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192)

    def __post_init__(self):
        if self.kind not in KINDS:
            close = difflib.get_close_matches(self.kind, KINDS, n=1)
            raise ValueError(f"experiment.kind='{self.kind}' is unknown; choose from {', '.join(KINDS)}"
                             + (f" (did you mean '{close[0]}'?)" if close else ""))
        if self.speed not in ("generate", "engine"):
            raise ValueError(f"experiment.speed='{self.speed}': use generate or engine")
        if self.greedy_tokens < 0:
            raise ValueError(f"experiment.greedy_tokens={self.greedy_tokens}: must be >= 0 (0: no continuations)")
        for name in ("repeats", "bandwidth_mb", "matmul_size", "eval_stories", "eval_len", "greedy_prompts",
                     "greedy_prompt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"experiment.{name}={getattr(self, name)}: must be >= 1")
        for section in ("sweep", "zip"):
            for key, values in getattr(self, section).items():
                if not values:
                    raise ValueError(f"experiment.{section}.{key}: an empty list of values; give at least one "
                                     f"(or drop the key)")
        for d in self.decoders:
            if d not in ("generator", "engine"):
                raise ValueError(f"experiment.decoders: '{d}' is not a decoder; use generator and/or engine")
        for p in self.peers:
            if p not in PEERS:
                close = difflib.get_close_matches(p, PEERS, n=1)
                raise ValueError(f"experiment.peers: '{p}' is not a peer; choose from {', '.join(PEERS)}"
                                 + (f" (did you mean '{close[0]}'?)" if close else ""))
        if self.kind == "pods":
            from jaxinfer.chips import parse_target

            for t in self.pod_targets + self.pod_grid:
                parse_target(t)
        if self.peers and self.kind != "decode":
            raise ValueError(f"experiment.peers: only the decode kind times peers, not {self.kind}")
        lengths = {k: len(v) for k, v in self.zip.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"experiment.zip: lists of different lengths {lengths}; zip steps them together")
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"experiment.baseline='{self.baseline}' is not a variant; variants: "
                             f"{', '.join(self.variants) or 'none'}")


@dataclass(frozen=True)
class Run:
    run_id: str  # folder name under results/NAME/
    labels: dict  # what distinguishes this run: swept key -> value, and "variant"
    cfg: RunConfig


@dataclass(frozen=True)
class Experiment:
    name: str
    path: str
    spec: ExperimentSpec
    base: dict  # the RunConfig sections as written (after overrides)
    runs: tuple[Run, ...]
    smoke: bool = False

    def record(self) -> dict:
        """What identifies this experiment in its results folder (compared on resume)."""
        return {"name": self.name, "kind": self.spec.kind, "smoke": self.smoke,
                "spec": to_dict(self.spec), "base": self.base}


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _slug(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9._,+-]", "_", text)


def run_id(labels: dict) -> str:
    """A folder name from the labels: `variant` first, then key=value by leaf name."""
    leaves = [_leaf(k) for k in labels if k != "variant"]
    parts = [_slug(labels["variant"])] if "variant" in labels else []
    parts += [f"{_leaf(k) if leaves.count(_leaf(k)) == 1 else k}={_slug(v)}" for k, v in labels.items() if k != "variant"]
    return "__".join(parts) or "base"


def _check_key(key: str, where: str) -> None:
    """ConfigError unless `key` names a field of RunConfig (with a suggestion)."""
    hints, cls, path = None, RunConfig, []
    for part in key.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            close = difflib.get_close_matches(part, list(hints), n=1)
            raise ConfigError(f"{where}: '{key}' is not a config key ('{part}' is not in "
                              f"{'.'.join(path) or 'the top level'}"
                              + (f"; did you mean '{'.'.join(path + [close[0]])}'?)" if close else ")"))
        path.append(part)
        cls = hints[part]


def points(spec: ExperimentSpec) -> list[dict]:
    """Every run's labels: grid x zip x variants, in that nesting (variants innermost)."""
    grid = [dict(zip(spec.sweep, combo)) for combo in itertools.product(*spec.sweep.values())]
    n = len(next(iter(spec.zip.values()))) if spec.zip else 1
    zipped = [{k: v[i] for k, v in spec.zip.items()} for i in range(n)]
    variants = [{"variant": name} for name in spec.variants] or [{}]
    return [g | z | v for g in grid for z in zipped for v in variants]


def resolve(base: dict, labels: dict, spec: ExperimentSpec, where: str) -> RunConfig:
    data = copy.deepcopy(base)
    overrides = {k: v for k, v in labels.items() if k != "variant"}
    overrides |= spec.variants.get(labels.get("variant"), {})
    for key, value in overrides.items():
        _check_key(key, where)
        _set_dotted(data, key, value)
    return from_dict(RunConfig, data, where=f"{where} (run {run_id(labels)})")


def _override(exp: dict, data: dict, key: str, value, where: str) -> None:
    """Applies one dotted override: `experiment.sweep.KEY` / `experiment.zip.KEY` set one swept key
    (itself dotted), other `experiment.*` keys the experiment, the rest the base run config."""
    for section in ("sweep", "zip"):
        prefix = f"experiment.{section}."
        if key.startswith(prefix):
            _check_key(key[len(prefix):], f"{where}: override")
            exp.setdefault(section, {})[key[len(prefix):]] = value
            return
    if key.startswith("experiment."):
        _set_dotted(exp, key.removeprefix("experiment."), value)
    else:
        _check_key(key, f"{where}: override")
        _set_dotted(data, key, value)


def load_experiment(path: str | Path, overrides: typing.Iterable[str] = (), smoke: bool = False) -> Experiment:
    """Reads, overrides and fully resolves an experiment file; every error is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file '{path}' does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    where = str(path)
    if not isinstance(data, dict) or not isinstance(data.get("experiment"), dict):
        raise ConfigError(f"{where}: an experiment file needs an 'experiment:' section (kind, sweep, ...) beside "
                          "the run config sections (model, engine, bench, ...)")
    exp = data.pop("experiment")
    if not isinstance(exp.get("smoke", {}), dict):
        raise ConfigError(f"{where}: experiment.smoke must be a mapping of dotted keys to values")
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. experiment.repeats=1)")
    pairs = [(k, copy.deepcopy(v)) for k, v in exp.get("smoke", {}).items()] if smoke else []
    pairs += [(k.strip(), yaml.safe_load(raw) if raw.strip() else "") for k, raw in (o.split("=", 1) for o in overrides)]
    for key, value in pairs:
        _override(exp, data, key, value, where)
    spec = from_dict(ExperimentSpec, exp, where=where, prefix="experiment.")
    for section in ("sweep", "zip"):
        for key in getattr(spec, section):
            _check_key(key, f"{where}: experiment.{section}")
    for name, variant in spec.variants.items():
        for key in variant:
            _check_key(key, f"{where}: experiment.variants.{name}")
    from_dict(RunConfig, copy.deepcopy(data), where=where)  # the base alone must be valid
    runs = [Run(run_id(labels), labels, resolve(data, labels, spec, where)) for labels in points(spec)]
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: two runs share the folder name '{max(ids, key=ids.count)}'; "
                          "give the sweep distinct values")
    return Experiment(path.stem, str(path), spec, data, tuple(runs), smoke)
