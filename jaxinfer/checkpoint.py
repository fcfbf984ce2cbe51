"""Checkpoints: Hugging Face folders (config.json + safetensors) -> params; orbax save/restore.

`load_model(path)` takes either a Hugging Face folder or the output of `jaxinfer convert`
(`jaxinfer.yaml` + an orbax `params/` folder + the tokenizer files).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import ModelConfig, RopeScaling, RunConfig, dump_yaml, load_config, resolve_path
from jaxinfer.models import Model, abstract_params, is_quantized, resolve_dtype

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
CONVERTED_CONFIG = "jaxinfer.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "config.json")


class CheckpointError(ValueError):
    """A checkpoint we cannot load: the message names the folder, the file or field, and why."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"'{path}' is missing: a Hugging Face checkpoint folder needs it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{path}' is not valid JSON: {e}") from None


def _rope_from_hf(hf: dict, where: str) -> tuple[float, RopeScaling]:
    """Reads RoPE theta and scaling from either `rope_parameters` (transformers >= 5) or the
    older top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"{where}: rope scaling type '{kind}' is not supported (default, linear, llama3)")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    return theta, RopeScaling(rope_type=kind, **{k: v for k, v in merged.items() if k in fields})


def _hf_field(hf: dict, key: str, where: str, kind=int, default=None):
    """hf[key] checked against `kind`; a missing field without a default, or a wrong type, names the field."""
    if key not in hf or hf[key] is None:
        if default is None:
            raise CheckpointError(f"{where}: field '{key}' is missing (a {kind.__name__} is required)")
        return default
    value = hf[key]
    ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
    if not ok or (kind is int and value <= 0):
        want = "a positive integer" if kind is int else f"a {kind.__name__}"
        raise CheckpointError(f"{where}: field '{key}' must be {want}, got {value!r}")
    return value


def config_from_hf(hf: dict, *, where: str = "config.json", dtype: str = "auto", stop_ids=()) -> ModelConfig:
    """Maps a Hugging Face config dict to ours; any field we cannot honour is named in the error."""
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(f"{where}: model_type '{family}' is not supported; jaxinfer runs "
                              f"{', '.join(SUPPORTED_FAMILIES)}")
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu')")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if hf.get("quantization_config"):
        problems.append("quantization_config (pre-quantized checkpoints)")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []) and family != "mistral":
        problems.append("use_sliding_window / per-layer sliding attention (only Mistral's global window)")
    if problems:
        raise CheckpointError(f"{where}: unsupported for model_type '{family}': {'; '.join(problems)}")
    theta, scaling = _rope_from_hf(hf, where)
    field = lambda key, kind=int, default=None: _hf_field(hf, key, where, kind, default)  # noqa: E731
    hidden, heads = field("hidden_size"), field("num_attention_heads")
    bias = bool(hf.get("attention_bias", False))
    window = field("sliding_window", int, 0) or None if family == "mistral" else None
    return ModelConfig(
        name=hf.get("_name_or_path") or family, family=family, vocab_size=field("vocab_size"),
        hidden_size=hidden, num_layers=field("num_hidden_layers"), num_q_heads=heads,
        num_kv_heads=field("num_key_value_heads", int, heads),
        head_dim=field("head_dim", int, hidden // heads), ffw_size=field("intermediate_size"),
        rms_norm_eps=float(field("rms_norm_eps", float, 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=field("max_position_embeddings", int, 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bias or family == "qwen2", o_bias=bias, qk_norm=family == "qwen3",
        sliding_window=window, dtype=resolve_dtype(dtype), stop_ids=tuple(stop_ids),
    )


def _hf_names(cfg: ModelConfig) -> dict[str, tuple[str, callable]]:
    """Our param name -> (HF tensor name with {i} for the layer, HF array -> our layout)."""
    D, N, K, H = cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    a = "model.layers.{i}.self_attn."
    m = "model.layers.{i}.mlp."
    names = {
        "embed": ("model.embed_tokens.weight", lambda w: w),
        "attn_norm": ("model.layers.{i}.input_layernorm.weight", lambda w: w),
        "wq": (a + "q_proj.weight", lambda w: w.T.reshape(D, N, H)),
        "wk": (a + "k_proj.weight", lambda w: w.T.reshape(D, K, H)),
        "wv": (a + "v_proj.weight", lambda w: w.T.reshape(D, K, H)),
        "wo": (a + "o_proj.weight", lambda w: w.T.reshape(N, H, D)),
        "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", lambda w: w),
        "w_gate": (m + "gate_proj.weight", lambda w: w.T),
        "w_up": (m + "up_proj.weight", lambda w: w.T),
        "w_down": (m + "down_proj.weight", lambda w: w.T),
        "final_norm": ("model.norm.weight", lambda w: w),
    }
    if cfg.qkv_bias:
        names |= {"bq": (a + "q_proj.bias", lambda w: w.reshape(N, H)),
                  "bk": (a + "k_proj.bias", lambda w: w.reshape(K, H)),
                  "bv": (a + "v_proj.bias", lambda w: w.reshape(K, H))}
    if cfg.o_bias:
        names["bo"] = (a + "o_proj.bias", lambda w: w)
    if cfg.qk_norm:
        names |= {"q_norm": (a + "q_norm.weight", lambda w: w), "k_norm": (a + "k_norm.weight", lambda w: w)}
    if not cfg.tie_embeddings:
        names["lm_head"] = ("lm_head.weight", lambda w: w.T)
    return names


class _TensorIndex:
    """Tensor name -> safetensors file, over one file or the sharded set named by the index."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._open = safe_open
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index)["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
            self.where = {name: folder / f for name, f in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"'{folder}' has no *.safetensors weights (pytorch .bin files are "
                                      "not read: re-save with safe_serialization=True)")
            self.where = {}
            for f in files:
                with safe_open(f, framework="numpy") as h:
                    self.where |= {k: f for k in h.keys()}
        self._handles = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint")
        f = self.where[name]
        if f not in self._handles:
            self._handles[f] = self._open(f, framework="numpy").__enter__()
        return self._handles[f].get_tensor(name)


def load_hf(folder: str | Path, dtype: str = "auto") -> Model:
    """Loads a Hugging Face folder into params of `dtype`, one parameter at a time."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder '{folder}' does not exist")
    hf = _read_json(folder / "config.json")
    cfg = config_from_hf(hf, where=str(folder / "config.json"), dtype=dtype, stop_ids=stop_ids(folder))
    tensors = _TensorIndex(folder)
    if cfg.tie_embeddings is False and "lm_head.weight" not in tensors.where and "tie_word_embeddings" not in hf:
        cfg = dataclasses.replace(cfg, tie_embeddings=True)
    graphdef, abstract = abstract_params(cfg)
    shapes = nnx.to_pure_dict(abstract)
    used, values = set(), {}
    for ours, (pattern, convert) in _hf_names(cfg).items():
        names = [pattern.format(i=i) for i in range(cfg.num_layers)] if "{i}" in pattern else [pattern]
        arrays = []
        for name in names:
            arrays.append(convert(tensors.get(name)))
            used.add(name)
        value = np.stack(arrays) if "{i}" in pattern else arrays[0]
        want = shapes[ours].shape
        if value.shape != want:
            raise CheckpointError(f"{folder}: tensor '{names[0]}' gives {ours} of shape {value.shape}, "
                                  f"but config.json implies {want}")
        values[ours] = jnp.asarray(value, dtype=shapes[ours].dtype)
    ignorable = ("rotary_emb.inv_freq", "lm_head.weight")
    unused = sorted(n for n in tensors.where if n not in used and not n.endswith(ignorable))
    if unused:
        raise CheckpointError(f"{folder}: {len(unused)} tensors that this architecture does not use, e.g. "
                              f"{unused[:3]}; refusing to drop weights silently")
    nnx.replace_by_pure_dict(abstract, values)
    return Model(cfg, graphdef, abstract)


def _quant_form(c: ModelConfig) -> str:
    form = f"/g{c.quant_group_size}" + (" asymmetric" if c.quant_asymmetric else "") if c.quant == "int4" else ""
    form += " AWQ" if c.quant_method == "awq" and c.quant != "none" else ""
    extra = (f", LM head {c.quant_lm_head}" if c.quant_lm_head != "none" else "") + (
        ", embedding int8" if c.quant_embed else "")
    return f"{c.quant}{form}{extra}"


def save_converted(model: Model, out_dir: str | Path, source: str | Path | None = None,
                   overwrite: bool = False) -> Path:
    """Writes `jaxinfer.yaml` + orbax `params/` (+ the source folder's tokenizer/config files).
    A quantized model is saved as stored (int8 / packed int4 values and their scales, its
    quantization settings in jaxinfer.yaml), so loading it needs no calibration. An existing
    `params/` is replaced only with `overwrite`."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if source is not None and out.exists() and out.resolve() == Path(source).resolve():
        raise CheckpointError(f"'{out}' is the source folder itself; write the conversion elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "params").exists():
        if not overwrite:
            raise CheckpointError(f"'{out / 'params'}' exists; pass overwrite=True (CLI: --force) to replace it")
        shutil.rmtree(out / "params")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", nnx.to_pure_dict(model.params))
    dump_yaml(model.cfg, out / CONVERTED_CONFIG)
    for name in TOKENIZER_FILES if source else ():
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, out / name)
    return out


def load_converted(folder: str | Path, dtype: str | None = None) -> Model:
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    cfg = load_config(folder / CONVERTED_CONFIG, cls=ModelConfig)
    if not cfg.stop_ids:  # converted before stop ids were part of the config
        cfg = dataclasses.replace(cfg, stop_ids=stop_ids(folder))
    graphdef, abstract = abstract_params(cfg)
    with ocp.StandardCheckpointer() as ckptr:
        values = ckptr.restore(folder / "params", nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, values)
    model = Model(cfg, graphdef, abstract)
    return model if dtype is None or resolve_dtype(dtype) == cfg.dtype else cast(model, dtype)


def cast(model: Model, dtype: str) -> Model:
    from jaxinfer.models import dtype_of

    if is_quantized(model.cfg):
        raise CheckpointError(f"this checkpoint's weights are quantized ({_quant_form(model.cfg)}, computing in "
                              f"{model.cfg.dtype}); load it in its saved dtype (model.dtype: auto or {model.cfg.dtype})")

    cfg = dataclasses.replace(model.cfg, dtype=resolve_dtype(dtype))
    graphdef, _ = abstract_params(cfg)
    params = jax.tree.map(lambda x: x.astype(dtype_of(dtype)), model.params)
    return Model(cfg, graphdef, params)


def relayout(model: Model, scan_layers: bool) -> Model:
    """The same weights with layers stacked [L, ...] (scan) or one array per layer (unrolled)."""
    if model.cfg.scan_layers == scan_layers:
        return model
    from jaxinfer.models import Transformer

    cfg = dataclasses.replace(model.cfg, scan_layers=scan_layers)
    graphdef, abstract = abstract_params(cfg)
    pure = nnx.to_pure_dict(model.params)
    for name in Transformer.LAYER_PARAMS:
        if name in pure:
            value = pure[name]
            pure[name] = dict(enumerate(value)) if scan_layers is False else jnp.stack([value[i] for i in range(len(value))])
    nnx.replace_by_pure_dict(abstract, pure)
    return Model(cfg, graphdef, abstract)


def load_model(path: str | Path, dtype: str | None = None, scan_layers: bool | None = None) -> Model:
    """A Hugging Face folder or a `jaxinfer convert` folder, cast to `dtype` (default: "auto" for
    HF folders, i.e. float32 on CPU and bfloat16 on accelerators; the saved dtype for converted
    ones), with layers stacked or not (`scan_layers`; default: stacked, or as saved)."""
    path = resolve_path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    model = load_converted(path, dtype) if (path / CONVERTED_CONFIG).is_file() else load_hf(path, dtype or "auto")
    return model if scan_layers is None else relayout(model, scan_layers)


def stop_ids(folder: str | Path | None) -> tuple[int, ...]:
    """EOS ids from generation_config.json (else config.json); empty when neither names one."""
    if folder is None:
        return ()
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            eos = _read_json(path).get("eos_token_id")
            if eos is not None:
                ids = eos if isinstance(eos, list) else [eos]
                if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                    raise CheckpointError(f"{path}: 'eos_token_id' must be a token id or a list of them, got {eos!r}")
                return tuple(ids)
    return ()


def build(cfg: RunConfig):
    """(model, tokenizer, stop ids, label) for a run config."""
    from jaxinfer.models import init_model
    from jaxinfer.tokenizer import load_tokenizer

    if cfg.checkpoint:
        path = resolve_path(cfg.checkpoint)
        model = load_model(path, cfg.model.dtype if cfg.model.dtype != "auto" else None, cfg.model.scan_layers)
        own = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
        tok = load_tokenizer(cfg.tokenizer if cfg.tokenizer is not None else path if own else "byte")
        label = f"{cfg.checkpoint} ({model.cfg.family}, {model.num_params / 1e6:.2f}M params, {model.cfg.dtype})"
        stops = tuple(dict.fromkeys(model.cfg.stop_ids + tok.eos_ids))
    else:
        model = init_model(cfg.model, cfg.seed)
        tok = load_tokenizer(cfg.tokenizer or "byte")
        label = (f"{cfg.model.name}: RANDOM WEIGHTS (seed {cfg.seed}), {model.num_params / 1e6:.2f}M params, "
                 f"{model.cfg.dtype}; its text is noise. Use --model HF_DIR for a real checkpoint.")
        stops = tok.eos_ids
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    m = cfg.model
    if is_quantized(model.cfg):  # a saved quantized checkpoint: used as stored
        asked = dataclasses.replace(m, matmul_impl=model.cfg.matmul_impl)
        if is_quantized(m) and _quant_form(asked) != _quant_form(model.cfg):
            raise CheckpointError(f"checkpoint '{cfg.checkpoint}' is already quantized ({_quant_form(model.cfg)}); "
                                  f"the config asks for {_quant_form(m)}: set model.quant: none to use it as saved, "
                                  "or quantize its float source")
        model = Model(dataclasses.replace(model.cfg, matmul_impl=m.matmul_impl), *_with_impl(model, m.matmul_impl))
        label += f"; weights {_quant_form(model.cfg)} as saved (matmul_impl {m.matmul_impl})"
    elif is_quantized(m):
        from jaxinfer.models.quantize import check, quantize_model

        check(m)
        if m.quant_method == "awq":
            from jaxinfer.models.awq import awq_scale

            model, _ = awq_scale(model, tok, m)
        model = quantize_model(model, m.quant, m.quant_group_size, m.matmul_impl, m.quant_asymmetric,
                               m.quant_lm_head, m.quant_embed)
        label += f"; weights {_quant_form(model.cfg)} (matmul_impl {m.matmul_impl})"
    return model, tok, stops, label


def _with_impl(model: Model, matmul_impl: str):
    """(graphdef, params) of `model` with its module's matmul_impl replaced (a static setting)."""
    module = nnx.merge(model.graphdef, model.params)
    module.cfg = dataclasses.replace(module.cfg, matmul_impl=matmul_impl)
    return nnx.split(module)


def load_draft(cfg: RunConfig, model: Model, tok) -> Model | None:
    """The draft model of `engine.speculative` (method draft), checked against the target: the same
    vocabulary size and the same tokenizer, or a CheckpointError saying which differs."""
    from jaxinfer.tokenizer import load_tokenizer, same_vocabulary

    spec = cfg.engine.speculative
    if spec.method != "draft":
        return None
    path = resolve_path(spec.draft_model)
    if not path.is_dir():
        raise CheckpointError(f"engine.speculative.draft_model='{spec.draft_model}': no such folder ({path}); "
                              "give a checkpoint folder, e.g. package:reference/draft")
    draft = load_model(path, model.cfg.dtype, model.cfg.scan_layers)
    if draft.cfg.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(f"draft model '{spec.draft_model}' has a vocabulary of {draft.cfg.vocab_size} but the "
                              f"target's is {model.cfg.vocab_size}: a draft must share the target's tokenizer")
    own = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
    if not same_vocabulary(load_tokenizer(path if own else "byte"), tok):
        raise CheckpointError(f"draft model '{spec.draft_model}' has another tokenizer than the target: its token "
                              "ids would mean other text; use a draft trained with the target's tokenizer")
    return draft


def _hf_inverse(cfg: ModelConfig) -> dict[str, callable]:
    """Our layout -> HF layout, per parameter (one layer at a time for layer params)."""
    D = cfg.hidden_size
    ident = lambda w: w  # noqa: E731
    return {
        "embed": ident, "attn_norm": ident, "mlp_norm": ident, "final_norm": ident, "q_norm": ident,
        "k_norm": ident, "bo": ident,
        "wq": lambda w: w.reshape(D, -1).T, "wk": lambda w: w.reshape(D, -1).T, "wv": lambda w: w.reshape(D, -1).T,
        "wo": lambda w: w.reshape(-1, D).T, "w_gate": lambda w: w.T, "w_up": lambda w: w.T,
        "w_down": lambda w: w.T, "lm_head": lambda w: w.T,
        "bq": lambda w: w.reshape(-1), "bk": lambda w: w.reshape(-1), "bv": lambda w: w.reshape(-1),
    }


def hf_config(cfg: ModelConfig, bos_id=None, eos_id=None, pad_id=None) -> dict:
    """config.json for transformers (model_type = cfg.family)."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[cfg.family]
    out = {
        "architectures": [arch], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffw_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_q_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "torch_dtype": cfg.dtype,
        "initializer_range": cfg.init_std,
    }
    if cfg.rope_scaling.rope_type != "default":
        out["rope_scaling"] = dataclasses.asdict(cfg.rope_scaling)
    if cfg.family in ("llama", "qwen3"):
        if cfg.qkv_bias != cfg.o_bias:
            raise CheckpointError(f"{cfg.family} has one attention_bias switch: qkv_bias and o_bias must agree")
        out["attention_bias"] = cfg.qkv_bias
    if cfg.family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


def save_hf(model: Model, folder: str | Path, tokenizer=None, specials: tuple[str, str, str] | None = None,
            dtype: str = "float32") -> Path:
    """Writes a Hugging Face folder (config.json, model.safetensors in `dtype`, generation_config.json
    and, given a `tokenizers.Tokenizer` with its (bos, eos, pad) texts, the tokenizer files)."""
    import ml_dtypes

    if is_quantized(model.cfg):
        raise CheckpointError(f"this model's weights are quantized ({_quant_form(model.cfg)}): a Hugging Face "
                              "folder holds float weights; save the float model, or save_converted the quantized one")
    from safetensors.numpy import save_file

    store = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stacked = relayout(model, True)
    cfg, pure = stacked.cfg, nnx.to_pure_dict(stacked.params)
    inverse = _hf_inverse(cfg)
    tensors = {}
    for ours, (pattern, _) in _hf_names(cfg).items():
        value = np.asarray(pure[ours], np.float32)
        if "{i}" in pattern:
            for i in range(cfg.num_layers):
                tensors[pattern.format(i=i)] = np.ascontiguousarray(inverse[ours](value[i])).astype(store)
        else:
            tensors[pattern] = np.ascontiguousarray(inverse[ours](value)).astype(store)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    ids = [tokenizer.token_to_id(s) for s in specials] if tokenizer is not None else [None] * 3
    (folder / "config.json").write_text(json.dumps(hf_config(dataclasses.replace(cfg, dtype=dtype), *ids), indent=1))
    gen = {"bos_token_id": ids[0], "eos_token_id": ids[1], "pad_token_id": ids[2], "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=1))
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1],
                   "pad_token": specials[2], "model_max_length": cfg.max_position_embeddings}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    return folder
