"""HOST ONLY (no jax): the hardware and models of the pods experiment, and the arithmetic that
needs no compiler: published chip specs (with sources), slices and their libtpu topologies, the
model shapes, pod targets (SLICE:MODEL:DATAxMODEL), the bytes a decode step must read, and
published measurements to set beside predictions (jaxinfer.pods compiles; experiment.spec checks
targets with parse_target)."""

from __future__ import annotations

import dataclasses

from jaxinfer.config import ModelConfig, RopeScaling


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # dense peak, per chip
    hbm_bytes: float
    hbm_bytes_per_s: float
    source: str


CHIPS = {
    "v5e": Chip("TPU v5e", 197e12, 16e9, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 95e9, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918e12, 32e9, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 141e9, 4.8e12, "https://www.nvidia.com/en-us/data-center/h200/"),
}
# slice -> (chip, libtpu topology); "h200" is one GPU (CUDA lowering, no topology)
SLICES = {"v5e-8": ("v5e", "TPU v5 lite:2x4"), "v6e-8": ("v6e", "TPU v6 lite:2x4"),
          "v5p-8": ("v5p", "TPU v5:2x2x1"), "v5p-32": ("v5p", "TPU v5:2x2x4"), "h200": ("h200", None)}

_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
MODELS = {
    "llama2-7b": ModelConfig(name="llama2-7b", vocab_size=32000, hidden_size=4096, num_layers=32, num_q_heads=32,
                             num_kv_heads=32, head_dim=128, ffw_size=11008, max_position_embeddings=4096,
                             rms_norm_eps=1e-5, dtype="bfloat16", scan_layers=True),
    "llama3-8b": ModelConfig(name="llama3-8b", vocab_size=128256, hidden_size=4096, num_layers=32, num_q_heads=32,
                             num_kv_heads=8, head_dim=128, ffw_size=14336, max_position_embeddings=131072,
                             rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, dtype="bfloat16",
                             scan_layers=True),
    "llama3-70b": ModelConfig(name="llama3-70b", vocab_size=128256, hidden_size=8192, num_layers=80, num_q_heads=64,
                              num_kv_heads=8, head_dim=128, ffw_size=28672, max_position_embeddings=131072,
                              rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, dtype="bfloat16",
                              scan_layers=True),
}
PAGE_SIZE = 16


def parse_target(target: str) -> tuple[str, str, int, int]:
    """'v5e-8:llama3-8b:1x8' -> (slice, model, data, model ways)."""
    try:
        slice_, model, mesh = target.split(":")
        data, ways = (int(x) for x in mesh.split("x"))
    except ValueError:
        raise ValueError(f"pod target '{target}': write SLICE:MODEL:DATAxMODEL, e.g. v5e-8:llama3-8b:1x8") from None
    if slice_ not in SLICES:
        raise ValueError(f"pod target '{target}': slice '{slice_}' is unknown; choose from {', '.join(SLICES)}")
    if model not in MODELS:
        raise ValueError(f"pod target '{target}': model '{model}' is unknown; choose from {', '.join(MODELS)}")
    return slice_, model, data, ways


def kv_bytes_per_token(m: ModelConfig) -> int:
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2  # k and v, bf16


def _weight_bytes(m: ModelConfig, embedding_rows: int | None = None) -> int:
    """bf16 weight bytes; embedding_rows: count only that many rows of the input embedding (what a step reads)."""
    rows = m.vocab_size if embedding_rows is None else min(embedding_rows, m.vocab_size)
    head = 0 if m.tie_embeddings else m.vocab_size * m.hidden_size
    layer = m.hidden_size * m.head_dim * (2 * m.num_q_heads + 2 * m.num_kv_heads) + 3 * m.hidden_size * m.ffw_size
    return 2 * (rows * m.hidden_size + head + m.num_layers * layer)


def _kv_split(m: ModelConfig, ways: int) -> int:
    return ways if m.num_kv_heads % ways == 0 else 1  # indivisible KV heads are replicated (jaxinfer.sharding)


def min_bytes(m: ModelConfig, batch: int, context: int, data: int, ways: int) -> float:
    """What one chip must read per decode step at least: its share of the weights (the embedding
    rows of the batch only) and of the batch's KV."""
    return (_weight_bytes(m, batch) / ways
            + batch * context * kv_bytes_per_token(m) / (data * _kv_split(m, ways)))


def fits(target: str, batch: int, context: int) -> bool:
    """Whether the weights and the KV the batch needs fit one chip's HBM by size alone (before compiling)."""
    slice_, name, data, ways = parse_target(target)
    m, chip = MODELS[name], CHIPS[SLICES[slice_][0]]
    per_chip = _weight_bytes(m) / ways + batch * context * kv_bytes_per_token(m) / (data * _kv_split(m, ways))
    return per_chip <= chip.hbm_bytes


# Published measurements to set beside the predictions (the same model and slice).
PUBLISHED = [
    {"target": "v5e-8:llama2-7b:1x8", "batch": 96, "context": 2048, "tok_s": 3663,
     "what": "JetStream-PyTorch, bf16, 1024 in / 1024 out (serving, prefill included)",
     "source": "https://github.com/AI-Hypercomputer/jetstream-pytorch/blob/main/benchmarks/summary.md"},
    {"target": "v5e-8:llama3-8b:1x8", "batch": 128, "context": 2048, "tok_s": 8249,
     "what": "JetStream-PyTorch, bf16, 1024 in / 1024 out (serving, prefill included)",
     "source": "https://github.com/AI-Hypercomputer/jetstream-pytorch/blob/main/benchmarks/summary.md"},
]
