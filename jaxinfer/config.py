"""Frozen dataclasses that mirror YAML one to one; dotted command-line overrides; typo-proof loading.

Every YAML file is a `RunConfig` (sections `model`, `sampling`, `decode`, ...). Unknown keys and
mistyped values raise `ConfigError` naming the file, the dotted key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import secrets
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration value: the message names the file, the key and the fix."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in the Hugging Face `rope_scaling` / `rope_parameters` field."""

    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Families differ only by the switches below."""

    name: str = "tiny-random"
    family: str = "llama"  # llama | mistral | qwen2 | qwen3 (documentation; the switches decide)
    vocab_size: int = 512
    hidden_size: int = 128  # D
    num_layers: int = 2  # L
    num_q_heads: int = 4  # N
    num_kv_heads: int = 2  # K
    head_dim: int = 32  # H
    ffw_size: int = 256  # F
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 / Llama attention_bias
    o_bias: bool = False  # Llama attention_bias
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` positions
    dtype: str = "auto"  # computation and parameter dtype: auto (f32 on CPU, bf16 elsewhere) | float32 | bfloat16
    # Layer weights stacked [L, ...] under lax.scan (one compiled layer: fast compiles, TPU-friendly),
    # or one array per layer in an unrolled loop (XLA CPU copies each scanned layer's weight slice
    # before its dot, which halves decode speed there: measured 19.4 vs 10.2 ms per 110M step).
    scan_layers: bool = True
    # Quantization of the linear layers (after loading): none | int8 (per output channel) | int4
    # (group-wise along the input, `quant_group_size` in 32, 64, 128) | w8a8 (int8 weights per
    # channel and int8 activations per token, quantized on the fly; int8 x int8 dots, int32 sums).
    quant: str = "none"
    quant_group_size: int = 128
    quant_asymmetric: bool = False  # int4 only: per-group offset (min) + scale, all 16 levels used
    # How int4 / int8 weights are chosen: rtn (round to nearest) | awq (activation-aware scaling,
    # Lin et al. 2024: per-input-channel scales searched on calibration activations, folded into
    # the preceding norm or layer; models.awq). Calibration text: quant_calibration, a UTF-8 file
    # (empty: training stories of the shipped corpus), of at least quant_calibration_tokens tokens.
    quant_method: str = "rtn"
    quant_calibration: str = ""
    quant_calibration_tokens: int = 4096
    # The LM head too (none | int8 | int4, int4 with quant_group_size); with tied embeddings the head
    # becomes a quantized copy of embed.T, the input table staying as it is. Applies with quant: none.
    quant_lm_head: str = "none"
    quant_embed: bool = False  # the input embedding table as int8 rows with a scale per row
    # kernels.quant_matmul implementation for quantized weights: auto (cpu kernel on CPU, Pallas on
    # TPU / GPU) | reference | cpu | tpu | gpu | *_interpret
    matmul_impl: str = "auto"
    # Float weights' matmuls: auto (on the CPU backend, float32 x with at most 4 rows, i.e. small-batch
    # decode: the cpu FFI kernel, which streams W once for all rows; else XLA's dot) | xla | cpu (always)
    float_matmul: str = "auto"
    init_std: float = 0.02  # random init only
    # End-of-sequence ids of the checkpoint (generation_config.json, else config.json): every
    # Engine and Generator over this model stops on them by default, with the tokenizer's EOS.
    stop_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SamplingConfig:
    """Default per-request sampling parameters (each request may carry its own)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    seed: int | None = None  # None: a fresh seed per request, recorded in its result; an int repeats a run
    logprobs: bool = False  # each generated token's logprob (Completion.logprobs)
    top_logprobs: int = 0  # > 0: also the n most likely tokens at each generated position (<= engine.max_top_logprobs)
    # Score the prompt: each prompt token's logprob given the tokens before it (the first has none),
    # with top_logprobs alternatives. Its prefill is computed in full (no prefix-cache hits).
    prompt_logprobs: bool = False
    stop: tuple[str, ...] = ()  # stop strings: the request ends when its text contains one (needs a tokenizer)

    def with_seed(self) -> "SamplingConfig":
        """This config with a concrete seed: its own, or a fresh one (recorded in the result)."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbits(32))


@dataclass(frozen=True)
class DecodeConfig:
    """Shape buckets of the dense-cache `generate()`: one compile per (rows, prompt, cache) bucket."""

    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    length_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


SPECULATIVE_METHODS = ("none", "draft", "ngram")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses k tokens per row, one target step verifies them all
    (exact rejection sampling: greedy output is unchanged, sampled output keeps its distribution)."""

    method: str = "none"  # none | draft (a small model) | ngram (prompt lookup over the request's tokens)
    num_speculative_tokens: int = 4  # k: drafts per row per step
    draft_model: str = "package:reference/draft"  # method draft: a checkpoint folder with the target's tokenizer
    ngram_min: int = 1  # method ngram: the shortest suffix that may match earlier tokens
    ngram_max: int = 4  # the longest (tried first)

    def __post_init__(self):
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"engine.speculative.method='{self.method}': must be one of {', '.join(SPECULATIVE_METHODS)}")
        _at_least(self, 1, "num_speculative_tokens", "ngram_min")
        if self.ngram_max < self.ngram_min:
            raise ValueError(f"engine.speculative.ngram_max={self.ngram_max}: must be >= ngram_min={self.ngram_min}")

    @property
    def num_drafts(self) -> int:
        """k, or 0 when speculation is off."""
        return 0 if self.method == "none" else self.num_speculative_tokens


KV_CACHE_DTYPES = ("auto", "bfloat16", "float32", "int8", "fp8_e4m3")


@dataclass(frozen=True)
class EngineConfig:
    """The serving engine: paged KV cache, token budget, shape buckets and the switches that
    experiments turn on and off."""

    page_size: int = 16  # C: positions per KV page
    num_pages: int | None = None  # P; None = kv_memory_fraction of free memory, else max_num_seqs full requests
    kv_memory_fraction: float = 0.0  # > 0: fill this fraction of free device memory with pages
    kv_cache_bytes: int | None = None  # a fixed budget for the KV pool (per data shard): as many pages as fit
    # What a KV page stores: auto (the model's dtype), bfloat16, float32, or quantized with a float32
    # scale per position and kv head: int8, fp8_e4m3 (about half the bytes of bfloat16; lossy)
    kv_cache_dtype: str = "auto"
    max_model_len: int = 2048  # per-request context limit (prompt + output), capped by the model's
    max_num_seqs: int = 32  # rows per step
    max_num_batched_tokens: int = 512  # token budget per step, decodes and prefill chunks together
    decode_row_buckets: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)
    prefill_row_buckets: tuple[int, ...] = (0, 1, 2, 4)
    # Speculative verify rows (k + 1 tokens each); None: decode_row_buckets. Each bucket multiplies
    # the step shapes to compile (Engine.warmup), so fewer here keeps speculation's compile budget small.
    verify_row_buckets: tuple[int, ...] | None = None
    chunk_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)  # the largest is the chunk size
    # Block tables as wide as the context (one shape: far fewer compiles) or as the step's longest
    # row needs, in powers of two (the jnp reference attention gathers every listed page, kernels
    # stop at the kv length). None: fixed wherever a Pallas kernel runs (not on CPU).
    fixed_table_width: bool | None = None
    prefix_caching: bool = True
    async_scheduling: bool = True  # dispatch step n+1 before reading step n's tokens
    attention_impl: str = "auto"  # kernels.paged_attention implementation
    mesh: tuple[int, ...] = (1, 1)  # (data, model) device mesh; params and cache split over `model`
    debug_poison_freed_pages: bool = False  # NaN into freed pages: proves they are never read
    # A long-lived engine forgets what it has handed out: a completion is released once read, at
    # most this many finished-but-unread requests are kept (oldest dropped first), and
    # Engine.records keeps the last max_step_records steps.
    max_finished_requests: int = 1024
    max_step_records: int = 100_000
    # Scoring steps (a row asks for prompt_logprobs or top_logprobs) compute the logits of every
    # token and return this many alternatives per token: a static shape, so a request may ask for
    # up to this many (OpenAI's API allows 20).
    max_top_logprobs: int = 20
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self):
        _at_least(self, 1, "page_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_step_records")
        _at_least(self, 0, "kv_memory_fraction", "max_finished_requests", "max_top_logprobs")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            close = difflib.get_close_matches(self.kv_cache_dtype, KV_CACHE_DTYPES, n=1)
            raise ValueError(f"engine.kv_cache_dtype='{self.kv_cache_dtype}' is not supported; choose from "
                             f"{', '.join(KV_CACHE_DTYPES)}" + (f" (did you mean '{close[0]}'?)" if close else ""))
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"engine.kv_cache_bytes={self.kv_cache_bytes}: give a positive budget, or leave it unset")
        if sum(x is not None and x != 0 for x in (self.num_pages, self.kv_cache_bytes, self.kv_memory_fraction or None)) > 1:
            raise ValueError("engine.num_pages, engine.kv_cache_bytes and engine.kv_memory_fraction each size the KV "
                             "pool: set one of them")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"engine.num_pages={self.num_pages}: the KV cache needs at least one page "
                             "(or leave it unset for room for max_num_seqs full requests)")
        for name in ("decode_row_buckets", "prefill_row_buckets", "chunk_buckets", "verify_row_buckets"):
            values = getattr(self, name)
            if values is None and name == "verify_row_buckets":
                continue
            if not values or min(values) < (1 if name == "chunk_buckets" else 0):
                raise ValueError(f"engine.{name}={list(values)}: needs at least one size, each "
                                 f">= {1 if name == 'chunk_buckets' else 0}")


@dataclass(frozen=True)
class BenchConfig:
    """An offline serving workload for `jaxinfer bench`. Prompts are random token ids: the shared
    prefix (if any) followed by a unique part of `prompt_len` tokens. Outputs ignore EOS so every
    request produces its drawn output length."""

    num_requests: int = 32
    prompt_len: int = 128
    prompt_len_max: int = 0  # > prompt_len: lengths drawn uniformly from [prompt_len, prompt_len_max]
    output_len: int = 128
    output_len_max: int = 0  # > output_len: drawn uniformly from [output_len, output_len_max]
    shared_prefix_len: int = 0
    arrival_rate: float = 0.0  # requests per second, Poisson arrivals; 0 = all arrive at once
    seed: int = 0
    modes: tuple[str, ...] = ("continuous",)  # continuous | static | sequential (one by one via generate())
    warmup: bool = True  # run the workload once first so compilation stays out of the numbers
    # Also compile every step shape first (Engine.warmup): arrivals in time can reach shapes the
    # warm-up pass missed. Size the buckets for it (engine.fixed_table_width: ~100 shapes, not ~1,000).
    warmup_shapes: bool = False
    # Service-level objectives for goodput (requests meeting both per second); 0 = no limit.
    slo_ttft_s: float = 0.0
    slo_tpot_s: float = 0.0

    def __post_init__(self):
        _at_least(self, 1, "num_requests", "prompt_len", "output_len")
        _at_least(self, 0, "prompt_len_max", "output_len_max", "shared_prefix_len", "arrival_rate",
                  "slo_ttft_s", "slo_tpot_s")
        if not math.isfinite(self.arrival_rate):
            raise ValueError(f"bench.arrival_rate={self.arrival_rate}: must be finite (0 = all at once)")


@dataclass(frozen=True)
class ServeConfig:
    """`jaxinfer serve`: the OpenAI-compatible HTTP server over the engine (jaxinfer.serve).
    The API key is never read from YAML: --api-key or $JAXINFER_API_KEY."""

    host: str = "127.0.0.1"  # loopback: reachable from this machine only; 0.0.0.0 opens it to the network
    port: int = 8000
    model_name: str | None = None  # the id clients send as `model`; None: the checkpoint folder's name
    max_waiting: int = 256  # requests queued for admission; past it new ones get 503 (admitted ones finish)
    max_n: int = 16  # choices per request (`n`)
    max_body_bytes: int = 4_000_000  # larger request bodies get 413
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default); chat fills the context

    def __post_init__(self):
        _at_least(self, 0, "port")
        _at_least(self, 1, "max_waiting", "max_n", "max_body_bytes", "default_max_tokens")
        if self.port > 65535:
            raise ValueError(f"serve.port={self.port}: must be in [0, 65535] (0: any free port)")


@dataclass(frozen=True)
class DistributedConfig:
    """Several processes, one engine (jaxinfer.distributed): process 0 schedules and every process
    runs the same step over the global mesh (engine.mesh must span all their devices). Unset
    fields come from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and $JAX_PROCESS_ID."""

    coordinator: str | None = None  # host:port of process 0's coordinator
    num_processes: int | None = None  # None: $JAX_NUM_PROCESSES, else 1 (no jax.distributed)
    process_id: int | None = None  # None: $JAX_PROCESS_ID
    timeout_s: int = 60  # to connect: all num_processes must join within it
    heartbeat_timeout_s: int = 10  # a process silent this long is dead: the others exit with an error

    def __post_init__(self):
        _at_least(self, 1, "timeout_s", "heartbeat_timeout_s")
        if self.num_processes is not None:
            _at_least(self, 1, "num_processes")
        if self.process_id is not None:
            _at_least(self, 0, "process_id")


@dataclass(frozen=True)
class RunConfig:
    """What `jaxinfer generate` runs: a model (checkpoint or random init), a tokenizer, sampling."""

    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: str | None = None  # a Hugging Face folder or a `jaxinfer convert` output; None = random init
    tokenizer: str | None = None  # None: the checkpoint's (byte without one); "byte"; or a tokenizer folder
    seed: int = 0  # random-init seed
    # JAX's persistent compilation cache for the `jaxinfer` command (null: off); a second run of the
    # same shapes loads its executables instead of compiling. $JAXINFER_COMPILATION_CACHE overrides.
    compilation_cache: str | None = "~/.cache/jaxinfer/xla"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def _at_least(cfg, low, *names) -> None:
    """ValueError naming the first field of `cfg` below `low`."""
    section = {"EngineConfig": "engine", "BenchConfig": "bench", "SpeculativeConfig": "engine.speculative",
               "ServeConfig": "serve"}.get(type(cfg).__name__, type(cfg).__name__)
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, (int, float)) and not value >= low:
            raise ValueError(f"{section}.{name}={value}: must be >= {low}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str, where: str):
    """Checks `value` against the annotation `tp`; returns it converted (list -> tuple, int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' expects a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where=where, prefix=key + ".")
    if origin is dict:  # dict[str, V]: string keys (YAML may give ints), values checked against V
        (_, value_tp) = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' expects a mapping, got {value!r}")
        return {str(k): v if value_tp is typing.Any else _coerce(v, value_tp, f"{key}.{k}", where)
                for k, v in value.items()}
    if tp is typing.Any:
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' expects a list of {_type_name(item_tp)}, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(
            f"{where}: '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )
    return value


def from_dict(cls, data: dict, *, where: str = "<dict>", prefix: str = ""):
    """Builds dataclass `cls` from `data`, rejecting unknown keys (with a suggestion) and bad types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}' in {cls.__name__}{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key, where)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a dataclass's own range check: say where the value came from
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def _set_dotted(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[leaf] = value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Applies `a.b=value` strings to nested `data` (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. model.num_layers=2)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return data


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (), cls=RunConfig):
    """Loads a YAML file (or the defaults when `path` is None), applies dotted overrides, validates."""
    data: dict = {}
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        where = str(path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: the top level must be a mapping of {cls.__name__} fields")
    overrides = list(overrides)
    if overrides:
        where = f"{where} + overrides"
    return from_dict(cls, apply_overrides(data, overrides), where=where)


def preset_path(name: str) -> Path:
    """Path of a config shipped inside the package (`jaxinfer/presets/NAME.yaml`)."""
    return Path(__file__).parent / "presets" / f"{name}.yaml"


PACKAGE = "package:"  # paths inside the installed package, e.g. package:reference/target


def resolve_path(spec: str | Path) -> Path:
    """A path, with `package:REL` meaning REL inside the installed jaxinfer package."""
    spec = str(spec)
    return Path(__file__).parent / spec[len(PACKAGE):] if spec.startswith(PACKAGE) else Path(spec)
