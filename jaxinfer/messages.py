"""HOST ONLY (numpy + stdlib, nothing of jaxinfer): every type that crosses the host/device wall.

One schema (`FIELDS`) says what a step reads; host packing (`pack`) and device unpacking
(`step.unpack`, via `offsets`) are both derived from it, and `aot` sizes its abstract inputs
with it. A step's static shape is a `Layout` of row groups, each with its own query length:
decode (T=1), verify (T=k+1: the last token and k drafts) and prefill (T=chunk). Plans carry
request ids, never live objects.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Group:
    """Rows [first_row, first_row + num_rows), each of `query_len` flat tokens from `first_token`."""

    name: str  # decode | verify | prefill
    first_row: int
    num_rows: int
    query_len: int
    first_token: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static shape of one step (what a compile is keyed on). Rows are ordered decode,
    verify, prefill; tokens are flat in the same order."""

    num_decode_rows: int = 0  # Bd, one token each
    num_verify_rows: int = 0  # Bv, k + 1 tokens each
    num_prefill_rows: int = 0  # Bp, `chunk` tokens each
    chunk: int = 0  # Tp
    table_width: int = 1  # W: block-table entries per row
    num_drafts: int = 0  # k (engine-wide; 0 = no speculation)
    scores: bool = False  # also every token's log-softmax: the target's logprob and the top alternatives

    @property
    def groups(self) -> tuple[Group, ...]:
        sizes = (("decode", self.num_decode_rows, 1), ("verify", self.num_verify_rows, self.num_drafts + 1),
                 ("prefill", self.num_prefill_rows, self.chunk))
        out, row, tok = [], 0, 0
        for name, rows, t in sizes:
            if rows:
                out.append(Group(name, row, rows, t, tok))
            row, tok = row + rows, tok + rows * t
        return tuple(out)

    def union(self, other: "Layout") -> "Layout":
        """The smallest layout holding both (each group's rows, chunk and table width at the larger)."""
        return Layout(*(max(a, b) for a, b in zip(dataclasses.astuple(self)[:6], dataclasses.astuple(other)[:6])),
                      scores=self.scores or other.scores)

    @property
    def num_rows(self) -> int:  # R
        return self.num_decode_rows + self.num_verify_rows + self.num_prefill_rows

    @property
    def num_tokens(self) -> int:  # N
        return self.num_decode_rows + self.num_verify_rows * (self.num_drafts + 1) + self.num_prefill_rows * self.chunk


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # int32 | uint32 | float32 (uint32 travels in the int32 buffer, bit for bit)
    per: str  # token [N] | row [R] | table [R, W]
    fill: float  # what padding holds ("pad_slot": the dropped slot P * C)
    doc: str


FIELDS = (
    Field("tokens", "int32", "token", 0, "token ids (ignored where prev_index >= 0)"),
    Field("positions", "int32", "token", 0, "positions in the sequence"),
    Field("slots", "int32", "token", "pad_slot", "flat cache slot page * C + offset; P * C is dropped"),
    Field("prev_index", "int32", "token", -1, ">= 0: take the token the previous step sampled last at that row"),
    Field("block_table", "int32", "table", 0, "the row's pages"),
    Field("num_row_pages", "int32", "row", 0, "valid entries of the row's block table"),
    Field("kv_lens", "int32", "row", 0, "kv length of the row after this step (0 for padding rows)"),
    Field("logits_index", "int32", "row", 0, "flat index of the row's first sampled token"),
    Field("sample_step", "int32", "row", 0, "tokens the request generated so far (key fold-in)"),
    Field("draft_src", "int32", "row", -1, "verify rows: the previous step's row holding the drafts' "
                                            "probabilities; -1: the drafts are one-hot (n-gram)"),
    Field("targets", "int32", "token", -1, "scoring steps: the prompt token after this one, scored "
                                            "against this position's logits; -1 = none"),
    Field("top_k", "int32", "row", 0, "0 = off"),
    Field("seed", "uint32", "row", 0, "the request's sampling seed"),
    Field("temperature", "float32", "row", 0.0, "0 = greedy"),
    Field("top_p", "float32", "row", 1.0, "1 = off"),
    Field("min_p", "float32", "row", 0.0, "0 = off"),
)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed")


def field_shape(f: Field, layout: Layout) -> tuple[int, ...]:
    return {"token": (layout.num_tokens,), "row": (layout.num_rows,),
            "table": (layout.num_rows, layout.table_width)}[f.per]


def empty_arrays(layout: Layout, pad_slot: int) -> dict[str, np.ndarray]:
    """Every field at its padding value: padding rows are greedy, write nowhere and sample nothing used."""
    return {f.name: np.full(field_shape(f, layout), pad_slot if f.fill == "pad_slot" else f.fill, f.dtype)
            for f in FIELDS}


def _buffer(f: Field) -> str:
    return "floats" if f.dtype == "float32" else "ints"


def offsets(layout: Layout) -> dict[str, tuple[str, int, tuple[int, ...], str]]:
    """name -> (buffer, start, shape, dtype): where each field sits in the two uploaded buffers."""
    out, at = {}, {"ints": 0, "floats": 0}
    for f in FIELDS:
        shape, buf = field_shape(f, layout), _buffer(f)
        out[f.name] = (buf, at[buf], shape, f.dtype)
        at[buf] += int(np.prod(shape))
    return out


def buffer_sizes(layout: Layout) -> tuple[int, int]:
    """(int32 elements, float32 elements) of a packed step."""
    ends = {"ints": 0, "floats": 0}
    for buf, start, shape, _ in offsets(layout).values():
        ends[buf] = start + int(np.prod(shape))
    return ends["ints"], ends["floats"]


def pack_plan(plan: "StepPlan") -> tuple[np.ndarray, np.ndarray]:
    """A plan's two buffers; a sharded plan's are its shards' buffers end to end (shard d's at
    d * size: what a `data`-sharded buffer hands shard d)."""
    if plan.shards is None:
        return pack(plan.arrays, plan.layout)
    ints, floats = zip(*(pack(p.arrays, p.layout) for p in plan.shards))
    return np.concatenate(ints), np.concatenate(floats)


def pack(arrays: dict[str, np.ndarray], layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """The plan's arrays as one int32 and one float32 buffer (one transfer each, not fifteen)."""
    parts = {"ints": [], "floats": []}
    for f in FIELDS:
        a = arrays[f.name]
        assert a.shape == field_shape(f, layout), (f.name, a.shape, field_shape(f, layout))
        parts[_buffer(f)].append(a.astype(f.dtype).view(np.int32 if f.dtype != "float32" else np.float32).ravel())
    return np.concatenate(parts["ints"]), np.concatenate(parts["floats"])


@dataclasses.dataclass(frozen=True)
class RowPlan:
    request_id: str
    row: int
    samples: bool  # the row's last token is the request's last known one: it samples
    num_drafts: int = 0  # a verify row's draft tokens (tokens 1..k of its group)


@dataclasses.dataclass
class StepPlan:
    """What one step computes: the arrays for the device and which request each row serves."""

    step_id: int
    layout: Layout
    arrays: dict[str, np.ndarray]
    rows: list[RowPlan]
    num_tokens: int  # real tokens scheduled
    freed_pages: list[int]
    # Data parallelism: one plan per shard of the `data` mesh axis, all in `layout` (rows, arrays,
    # pages and freed pages above are then the shards' together, pages as global ids).
    shards: list["StepPlan"] | None = None


@dataclasses.dataclass
class Scores:
    """A scoring step's per-token results, at flat token indices (Layout.groups)."""

    target_logprobs: np.ndarray  # [N] float32: logprob of `targets` at each position (0 where none)
    top_ids: np.ndarray  # [N, n] int32: the n most likely next tokens at each position, best first
    top_logprobs: np.ndarray  # [N, n] float32: their logprobs


@dataclasses.dataclass
class StepOutput:
    """A step's results on the host, one row per plan row (padded to the engine's row count)."""

    tokens: np.ndarray  # [R, k + 1] int32: a row's new tokens are tokens[r, :num_new[r]]
    num_new: np.ndarray  # [R] int32, 1..k+1 for a sampling row
    logprobs: np.ndarray  # [R, k + 1] float32, of the model's own distribution
    drafts: np.ndarray | None = None  # [R, k] int32: the draft model's proposals for the next step
    scores: Scores | None = None  # scoring steps (Layout.scores) only

    @classmethod
    def single(cls, tokens, logprobs) -> "StepOutput":
        """One token per row (no speculation)."""
        tokens = np.asarray(tokens)
        return cls(tokens.reshape(-1, 1), np.ones(len(tokens), np.int32), np.asarray(logprobs).reshape(-1, 1))
