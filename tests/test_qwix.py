"""qwix interop (jaxinfer.models.qwix_format): weights quantized by either library convert exactly,
and a model built from qwix-quantized weights computes what qwix's own dot and dequantization do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from jaxinfer.checkpoint import relayout
from jaxinfer.config import ModelConfig
from jaxinfer.kernels.quant_matmul import dequantize, quant_matmul, quantize
from jaxinfer.models import Model, Transformer, init_model
from jaxinfer.models import qwix_format as qf
from jaxinfer.models.quantize import quantize_model

CFG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16,
                  ffw_size=128, dtype="float32", scan_layers=True)
FORMS = [(8, 0), (4, 32), (4, 64)]


@pytest.mark.parametrize("bits,group", FORMS)
def test_shared_formats_convert_exactly_both_ways(bits, group):
    w = jax.random.normal(jax.random.key(0), (256, 96))
    x = jax.random.normal(jax.random.key(1), (3, 256))
    q = quantize(w, bits, group)
    qa = qf.to_qwix(q)
    assert qa.qvalue.shape == (256, 96) and qa.qvalue.dtype == (jnp.int8 if bits == 8 else jnp.int4)
    np.testing.assert_array_equal(qwix.dequantize(qa), dequantize(q))
    back = qf.from_qwix(qa)
    assert (back.bits, back.group_size) == (bits, group)
    np.testing.assert_array_equal(back.values, q.values)
    np.testing.assert_array_equal(back.scales, q.scales)
    theirs = qf.quantize_like_qwix(w, bits, group)  # qwix's quantizer: other scales than ours
    assert not np.array_equal(theirs.scale, q.scales)
    ours = qf.from_qwix(theirs)
    np.testing.assert_allclose(quant_matmul(x, ours, impl="reference"), qwix.dot(x, theirs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(quant_matmul(x, ours, impl="cpu"), qwix.dot(x, theirs), rtol=1e-5, atol=1e-5)


def test_forms_without_an_exact_counterpart_are_refused_by_name():
    w = jax.random.normal(jax.random.key(0), (128, 32))
    with pytest.raises(ValueError, match="asymmetric int4 has float offsets"):
        qf.to_qwix(quantize(w, 4, 32, asymmetric=True))
    with pytest.raises(ValueError, match="with a zero point"):
        qf.from_qwix(qwix.quantize(w, jnp.int8, channelwise_axes=(1,), calibration_method="minmax"))
    with pytest.raises(ValueError, match="int4 tiles of 16 along K"):
        qf.from_qwix(qwix.quantize(w, jnp.int4, channelwise_axes=(1,), tiled_axes={0: 16}))
    with pytest.raises(ValueError, match="has no jaxinfer form"):
        qf.from_qwix(qwix.quantize(w, jnp.float8_e4m3fn, channelwise_axes=(1,)))


def _logits(model, tokens):
    mod = nnx.merge(model.graphdef, model.params)
    hidden, _ = mod(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape))
    return np.asarray(mod.logits(hidden))


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32)])
def test_a_model_round_trips_and_runs_qwix_quantized_weights(bits, group):
    model = init_model(CFG, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)
    ours = quantize_model(model, "int8" if bits == 8 else "int4", group or 128)
    again = qf.import_model(model, qf.export_model(ours), group or 128)
    np.testing.assert_array_equal(_logits(again, tokens), _logits(ours, tokens))
    # Weights qwix quantized, run by our kernels == the float model holding qwix's dequantized weights.
    flat = relayout(model, False)
    pure = nnx.to_pure_dict(flat.params)
    theirs = {}
    for name in Transformer.LINEAR:
        theirs[name] = []
        for i in range(CFG.num_layers):
            w = pure[name][i]
            w2 = w.reshape(-1, CFG.hidden_size) if name == "wo" else w.reshape(w.shape[0], -1)  # [K, N]
            qa = qf.quantize_like_qwix(w2, bits, group)
            theirs[name].append(qa)
            pure[name][i] = qwix.dequantize(qa).reshape(w.shape)
    graphdef, abstract = nnx.split(nnx.merge(flat.graphdef, flat.params))
    nnx.replace_by_pure_dict(abstract, pure)
    dequantized = Model(flat.cfg, graphdef, abstract)
    imported = qf.import_model(model, theirs, group or 128)
    assert imported.cfg.quant == ("int8" if bits == 8 else "int4") and imported.cfg.scan_layers
    np.testing.assert_allclose(_logits(imported, tokens), _logits(dequantized, tokens), rtol=1e-4, atol=1e-4)
