"""Quantized weights and `x @ W` in plain jnp: the specification for the quant_matmul kernels.

`QuantArray` holds W [K, N] as integers with float scales:
- int8, per output channel, symmetric: values int8 [K, N], scales [1, N]; w = v * s;
- int4, group-wise along K: two values per byte (even k in the low nibble, odd k in the high),
  values uint8 [K // 2, N], scales [K // group_size, N]. Symmetric: nibbles are signed (-8..7)
  and w = v * s. Asymmetric (`offsets` [K // group_size, N], each group's minimum): nibbles are
  unsigned (0..15) and w = v * s + offset, which spends all 16 levels on the group's range.
  Any K: when the group size does not divide K, the last group is padded to a whole group with
  copies of W's last row (so its range, and the scale, are W's own) and the weight stores
  K_pad = ceil(K / group_size) * group_size rows; x's K features are padded with zeros to K_pad
  (`check_features`), so the padded rows add nothing to x @ W.
- W8A8 (`act_bits=8`): int8 per-channel weights as above, and x quantized per token (row) on the
  fly, symmetric int8 with a float32 scale per row (`quantize_activations`); the dot multiplies
  int8 by int8 with int32 accumulation and both scales apply after it:
  out = (xq @ wq) * x_scale[:, None] * w_scale[None, :] (the int8 MXU / tensor-core path).
The reference dequantizes, then dots with float32 accumulation (W8A8: the int8 dot itself).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantArray:
    values: jax.Array  # int8 [K, N] | uint8 [K // 2, N] (int4 packed)
    scales: jax.Array  # float32 [1, N] | [K // group_size, N]
    bits: int = dataclasses.field(metadata=dict(static=True), default=8)
    group_size: int = dataclasses.field(metadata=dict(static=True), default=0)  # 0: per channel
    offsets: jax.Array | None = None  # float32 [K // group_size, N]: asymmetric int4 only
    act_bits: int = dataclasses.field(metadata=dict(static=True), default=0)  # 8: W8A8; 0: float x

    @property
    def shape(self) -> tuple[int, int]:
        k = self.values.shape[0] * (2 if self.bits == 4 else 1)
        return k, self.values.shape[1]


GROUP_SIZES = (32, 64, 128)  # int4 group sizes (the TPU and GPU kernels' tiles assume them)


def padded_features(k: int, bits: int, group_size: int) -> int:
    """The rows a quantized weight of K input features stores (int4: K rounded up to whole groups)."""
    return -(-k // group_size) * group_size if bits == 4 and group_size else k


def quantize(w, bits: int = 8, group_size: int = 0, asymmetric: bool = False) -> QuantArray:
    """w [K, N] float -> QuantArray. int8: per output channel; int4: groups of `group_size` rows,
    symmetric or (`asymmetric`) with a per-group offset."""
    k, n = w.shape
    if asymmetric and bits != 4:
        raise ValueError(f"asymmetric quantization is int4 only (bits={bits})")
    if bits == 8:
        if group_size:
            raise ValueError(f"int8 weights are per output channel: group_size={group_size} must be 0")
        group = k
    elif bits == 4:
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size={group_size}: use one of {', '.join(map(str, GROUP_SIZES))} (a K "
                             "that it does not divide gets a padded last group)")
        group = group_size
        if k % group:  # pad the last group with copies of the last row (x's zero padding cancels them)
            w = jnp.pad(w, ((0, -k % group), (0, 0)), mode="edge")
            k = w.shape[0]
    else:
        raise ValueError(f"bits={bits}: only 8 and 4 are supported")
    wg = w.astype(jnp.float32).reshape(k // group, group, n)
    if asymmetric:
        low, high = jnp.min(wg, axis=1), jnp.max(wg, axis=1)  # [K // group, N]
        scales = jnp.where(high > low, (high - low) / 15, 1.0)
        q = jnp.clip(jnp.round((wg - low[:, None]) / scales[:, None]), 0, 15).astype(jnp.uint8).reshape(k, n)
        return QuantArray(q[0::2] | (q[1::2] << 4), scales, 4, group_size, low)
    qmax = 2 ** (bits - 1) - 1
    scales = jnp.max(jnp.abs(wg), axis=1) / qmax  # [K // group, N]
    scales = jnp.where(scales == 0, 1.0, scales)
    q = jnp.clip(jnp.round(wg / scales[:, None]), -qmax - 1, qmax).astype(jnp.int8).reshape(k, n)
    if bits == 8:
        return QuantArray(q, scales, 8, 0)
    nib = (q & 0xF).astype(jnp.uint8)
    return QuantArray(nib[0::2] | (nib[1::2] << 4), scales, 4, group_size)


def unpack_int4(packed, signed: bool = True):
    """uint8 [K // 2, N] -> int8 [K, N]: nibbles interleaved back, sign-extended to [-8, 7] or
    (`signed=False`) kept in [0, 15]."""
    lo = (packed & 0xF).astype(jnp.int8)
    hi = (packed >> 4).astype(jnp.int8)
    if signed:
        lo, hi = jnp.where(lo > 7, lo - 16, lo), jnp.where(hi > 7, hi - 16, hi)
    return jnp.stack([lo, hi], axis=1).reshape(-1, packed.shape[1])


def dequantize(q: QuantArray, dtype=jnp.float32):
    k, n = q.shape
    ints = unpack_int4(q.values, signed=q.offsets is None) if q.bits == 4 else q.values
    group = q.group_size or k
    w = ints.astype(jnp.float32).reshape(k // group, group, n) * q.scales[:, None]
    if q.offsets is not None:
        w = w + q.offsets[:, None]
    return w.reshape(k, n).astype(dtype)


def cost(x2, q: QuantArray):
    """XLA's view of a kernel call on x2 [M, K]: it cannot see inside a custom call."""
    from jax.experimental import pallas as pl

    (m, k), n = x2.shape, q.shape[1]
    weight_bytes = q.values.size * q.values.dtype.itemsize + q.scales.size * 4 * (1 if q.offsets is None else 2)
    return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                           bytes_accessed=weight_bytes + (x2.size + m * n) * x2.dtype.itemsize)


def check_features(x, q: QuantArray):
    """x with its features padded with zeros to the weight's K (an int4 weight whose last group
    was padded stores more rows than x has features); ValueError if they cannot match."""
    k, have = q.shape[0], x.shape[-1]
    if have == k:
        return x
    if q.bits == 4 and q.group_size and have < k and padded_features(have, 4, q.group_size) == k:
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k - have)])
    raise ValueError(f"x has {have} features but the weight expects K={k}")


def quantize_activations(x2):
    """x2 [M, K] float -> (int8 [M, K], float32 scales [M, 1]): symmetric per row (token), absmax /
    127 (a zero row gets scale 1)."""
    xf = x2.astype(jnp.float32)
    scales = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127
    scales = jnp.where(scales == 0, 1.0, scales)
    return jnp.clip(jnp.round(xf / scales), -127, 127).astype(jnp.int8), scales


def check_w8a8(q: QuantArray) -> None:
    if q.act_bits not in (0, 8):
        raise ValueError(f"act_bits={q.act_bits}: activations are float (0) or int8 (8)")
    if q.act_bits and (q.bits != 8 or q.group_size or q.offsets is not None):
        raise ValueError(f"W8A8 needs int8 per-channel weights, got bits={q.bits} group_size={q.group_size}")


def quant_matmul(x, q: QuantArray):
    """x [..., K] (f32/bf16) @ W -> [..., N] in x's dtype, float32 accumulation (W8A8: int32)."""
    x = check_features(x, q)
    if q.act_bits:
        check_w8a8(q)
        xq, xs = quantize_activations(x.reshape(-1, x.shape[-1]))
        acc = jax.lax.dot(xq, q.values, preferred_element_type=jnp.int32)
        out = acc.astype(jnp.float32) * xs * q.scales.astype(jnp.float32)
        return out.reshape(*x.shape[:-1], -1).astype(x.dtype)
    out = jnp.einsum("...k,kn->...n", x, dequantize(q, x.dtype), preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
