"""Interoperability with qwix (Google's JAX quantization library, `pip install qwix`): quantized
weights move between qwix's `QArray` and jaxinfer's `QuantArray` for the formats both have.

A qwix QArray keeps the logical shape: `qvalue` [K, N] (jnp.int8 or jnp.int4, one value per
element), `scale` broadcastable to it ([1, N] per output channel; [K / g, N] for tiles of g
along K), `zero_point` None when symmetric. jaxinfer stores int4 packed two per byte
(reference.py). Both define w = value * scale, so the shared formats convert exactly, values and
scales bit for bit:
- int8 per output channel (qwix: channelwise_axes=(1,)), our `model.quant: int8`;
- symmetric int4 in groups of 32, 64 or 128 along K (qwix: tiled_axes={0: g}, channelwise_axes=(1,)),
  our `model.quant: int4` with quant_group_size g.
Not shared: our asymmetric int4 (w = v * s + offset with a float offset; qwix's zero point is
stored in the integer type, so it cannot hold our offsets exactly), qwix's float8 / nf4 / mxfp
weight types, and its activation-quantization rules (our W8A8 quantizes activations in the
kernel, not through qwix's interception). The scales the two libraries *choose* differ (qwix
spans qmax + 0.5, we span qmax), so quantizing the same float weight gives different numbers in
each; what converts exactly is a weight already quantized by either.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxinfer.kernels.quant_matmul.reference import GROUP_SIZES, QuantArray, unpack_int4


def _qwix():
    try:
        import qwix
    except ImportError as e:
        raise ImportError("qwix interop needs the qwix package: pip install qwix (or ./install.sh test)") from e
    return qwix


def to_qwix(q: QuantArray):
    """Our QuantArray -> qwix.QArray (int8 per channel, or symmetric group-wise int4)."""
    qwix = _qwix()
    if q.offsets is not None:
        raise ValueError("asymmetric int4 has float offsets; qwix stores zero points as integers: no exact export")
    if q.act_bits:
        raise ValueError("W8A8 quantizes activations in the kernel; export its weights as int8 (act_bits=0)")
    if q.bits == 8:
        return qwix.QArray(q.values, q.scales.astype(jnp.float32), None, jnp.int8)
    return qwix.QArray(unpack_int4(q.values).astype(jnp.int4), q.scales.astype(jnp.float32), None, jnp.int4)


def from_qwix(qa) -> QuantArray:
    """qwix.QArray of a [K, N] weight -> our QuantArray; ValueError naming what does not map."""
    if qa.zero_point is not None:
        raise ValueError("a qwix array with a zero point (asymmetric) has no exact jaxinfer form; quantize "
                         "symmetric in qwix (calibration_method absmax)")
    if qa.qvalue.ndim != 2:
        raise ValueError(f"a weight matrix [K, N] is expected, got shape {qa.qvalue.shape}")
    k, n = qa.qvalue.shape
    if qa.scale.shape[1] != n:
        raise ValueError(f"scales {qa.scale.shape} are not per output channel (N={n}); quantize with channelwise_axes=(1,)")
    values = jnp.asarray(qa.qvalue)
    scales = qa.scale.astype(jnp.float32)
    if values.dtype == jnp.int8:
        if qa.scale.shape[0] != 1:
            raise ValueError(f"int8 weights are per output channel here, but the scales tile K in {k // qa.scale.shape[0]}")
        return QuantArray(values, scales, 8, 0)
    if values.dtype == jnp.int4:
        group = k // qa.scale.shape[0]
        if group not in GROUP_SIZES or k % group:
            raise ValueError(f"int4 tiles of {group} along K: jaxinfer's groups are {', '.join(map(str, GROUP_SIZES))}")
        nib = (values.astype(jnp.int8) & 0xF).astype(jnp.uint8)
        return QuantArray(nib[0::2] | (nib[1::2] << 4), scales, 4, group)
    raise ValueError(f"qwix qtype {qa.qtype} has no jaxinfer form (int8 and int4 do)")


def quantize_like_qwix(w, bits: int, group_size: int = 0):
    """qwix's own quantizer on a float [K, N] weight, in qwix's format (int8 per channel or int4 tiles)."""
    qwix = _qwix()
    if bits == 8:
        return qwix.quantize(w, jnp.int8, channelwise_axes=(1,))
    return qwix.quantize(w, jnp.int4, channelwise_axes=(1,), tiled_axes={0: group_size})


def export_model(model) -> dict[str, list]:
    """{linear name: [qwix.QArray [K, N] per layer]} of a model quantized int8 or symmetric int4."""
    from flax import nnx

    from jaxinfer.checkpoint import relayout
    from jaxinfer.models import Transformer

    c = model.cfg
    if c.quant not in ("int8", "int4") or c.quant_asymmetric:
        raise ValueError(f"export to qwix needs model.quant int8 or symmetric int4, got {c.quant}"
                         + (" asymmetric" if c.quant_asymmetric else ""))
    pure = nnx.to_pure_dict(relayout(model, False).params)
    bits, group = (4, c.quant_group_size) if c.quant == "int4" else (8, 0)
    return {name: [to_qwix(QuantArray(pure[name][i], pure[name + "_scale"][i], bits, group))
                   for i in range(c.num_layers)] for name in Transformer.LINEAR}


def import_model(model, weights: dict[str, list], group_size: int = 128):
    """`model` (float) with its linear layers replaced by qwix-quantized ones ({name: [QArray per
    layer]}, every linear, one format): the quantized Model, its own quantizer never run on them."""
    from flax import nnx

    from jaxinfer.checkpoint import relayout
    from jaxinfer.models import Model, Transformer
    from jaxinfer.models.quantize import quantize_model

    missing = [n for n in Transformer.LINEAR if n not in weights]
    if missing:
        raise ValueError(f"qwix weights lack {', '.join(missing)}: every linear layer is needed")
    ours = {n: [from_qwix(a) for a in weights[n]] for n in Transformer.LINEAR}
    first = ours["wq"][0]
    forms = {(q.bits, q.group_size) for qs in ours.values() for q in qs}
    if len(forms) > 1:
        raise ValueError(f"qwix weights mix formats {sorted(forms)}; one model.quant applies to every layer")
    quant, group = ("int8", group_size) if first.bits == 8 else ("int4", first.group_size)
    scan = model.cfg.scan_layers
    shell = quantize_model(relayout(model, False), quant, group, model.cfg.matmul_impl)
    pure = nnx.to_pure_dict(shell.params)
    for name, qs in ours.items():
        if len(qs) != model.cfg.num_layers:
            raise ValueError(f"qwix weights have {len(qs)} layers of {name}; the model has {model.cfg.num_layers}")
        for i, q in enumerate(qs):
            for key, value in ((name, q.values), (name + "_scale", q.scales)):
                if pure[key][i].shape != value.shape:
                    raise ValueError(f"qwix {name} layer {i}: {key} shape {value.shape}, the model's is {pure[key][i].shape}")
                pure[key][i] = value
    graphdef, abstract = nnx.split(nnx.merge(shell.graphdef, shell.params))
    nnx.replace_by_pure_dict(abstract, pure)
    return relayout(Model(shell.cfg, graphdef, abstract), scan)
