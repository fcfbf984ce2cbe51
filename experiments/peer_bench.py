"""Decode speed of other inference engines on a Hugging Face folder that jaxinfer wrote: the peers of
the `decode` experiment kind (`experiment.peers`). Runs in its own environment (torch, transformers,
OpenVINO GenAI, llama-cpp-python; `experiments/setup_peers.sh` makes it), never in jaxinfer's, and
prints one JSON object.

The workload is the decode kind's: `batch` rows of `prompt_len` random token ids (numpy's
default_rng(seed), as jaxinfer draws them), greedy, `output_len` new tokens each, EOS ignored.
tok_s counts the tokens after each row's first (the decode loop, as jaxinfer's Generator timing
does): for transformers and OpenVINO, (batch * (output_len - 1)) / (time(output_len) - time(1)),
medians of the repeats after a warm-up; for llama.cpp the decode steps of a batched loop are timed
directly.

    python experiments/peer_bench.py --hf FOLDER --work DIR --engine openvino --precision int8 --batch 1
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

ENGINES = ("transformers", "openvino", "llama.cpp")
PRECISIONS = ("float32", "int8", "int4")


def prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([rng.integers(0, vocab, prompt_len) for _ in range(batch)], np.int64)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def decode_rate(run, batch: int, n: int, repeats: int) -> dict:
    """run(num_new) -> tokens [batch, >= num_new]; the decode loop's rate from time(n) - time(1)."""
    run(n)  # warm-up: compiles / plans every shape
    run(1)
    t1, _ = timed(lambda: run(1), repeats)
    tn, tokens = timed(lambda: run(n), repeats)
    decode = [a - statistics.median(t1) for a in tn]
    return {"tok_s": batch * (n - 1) / statistics.median(decode), "prefill_ms": 1e3 * statistics.median(t1),
            "step_ms": 1e3 * statistics.median(decode) / (n - 1),
            "tok_s_repeats": [batch * (n - 1) / d for d in decode], "tokens": np.asarray(tokens)[0, :n].tolist()}


def bench_transformers(a, ids) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if a.precision != "float32":
        raise SystemExit(f"transformers: precision {a.precision} is not measured (float32 only)")
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32).eval()
    x = torch.from_numpy(ids)

    @torch.inference_mode()
    def run(n):
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, x.shape[1]:].numpy()

    return decode_rate(run, len(ids), a.output_len, a.repeats) | {
        "version": f"transformers {_version('transformers')}, torch {torch.__version__}",
        "detail": f"float32, {a.threads} threads"}


OV_WEIGHTS = {"float32": ["--weight-format", "fp32"],
              # nncf's int8: per output channel; symmetric, like jaxinfer's int8 (lm_head and embedding too)
              "int8": ["--weight-format", "int8", "--sym"],
              # int4 symmetric in groups along the input; every layer, ratio 1 (nncf keeps the
              # embedding and the head in int8 by default)
              "int4": ["--weight-format", "int4", "--sym", "--ratio", "1.0"]}


def bench_openvino(a, ids) -> dict:
    import subprocess
    import sys

    import openvino as ov
    import openvino_genai as genai

    folder = Path(a.work) / f"openvino-{a.precision}-g{a.group_size}"
    if not (folder / "openvino_model.xml").is_file():
        args = OV_WEIGHTS[a.precision] + (["--group-size", str(a.group_size)] if a.precision == "int4" else [])
        cli = Path(sys.executable).with_name("optimum-cli")
        subprocess.run([str(cli), "export", "openvino", "--model", a.hf, "--task", "text-generation-with-past",
                        *args, str(folder)], check=True, stdout=subprocess.DEVNULL)
    # float32 compute and cache: on a CPU with AVX512-BF16 the default would be bf16 (and a u8 cache)
    props = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "INFERENCE_NUM_THREADS": a.threads}
    # The pipeline's default prefix caching stays on: it serves every timed call's prompt from the
    # cache (a 128-token prefill measured ~22 ms instead of ~125), so time(n) - time(1) is decode
    # alone; with it off, batch 32's ~5 s prefill varied more than 16 decode steps took.
    # With compressed weights OpenVINO's CPU plugin also quantizes activations to int8 on the fly
    # (DYNAMIC_QUANTIZATION_GROUP_SIZE, 32 by default) and multiplies int8 by int8; jaxinfer's int8
    # and int4 multiply float activations. That default stays (it is what OpenVINO users get);
    # --ov-dynamic-quant-group 0 turns it off for a weight-only comparison.
    if a.ov_dynamic_quant_group is not None:
        props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = a.ov_dynamic_quant_group
    pipe = genai.LLMPipeline(str(folder), "CPU", **props)
    cfg = genai.GenerationConfig()
    cfg.do_sample, cfg.ignore_eos, cfg.eos_token_id, cfg.stop_token_ids = False, True, 0, set()
    inputs = genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))

    def run(n):
        cfg.max_new_tokens = cfg.min_new_tokens = n
        return np.array(pipe.generate(inputs, cfg).tokens)

    return decode_rate(run, len(ids), a.output_len, a.repeats) | {"prefill_ms": None,  # a cached prefill
        "version": f"openvino-genai {_version('openvino-genai')}",
        "detail": f"weights {' '.join(OV_WEIGHTS[a.precision][1:])}, f32 compute and KV cache"
                  + (_ov_activations(a) if a.precision != "float32" else "")
                  + f", prompts from its prefix cache, {a.threads} threads"}


def _ov_activations(a) -> str:
    g = a.ov_dynamic_quant_group
    if g is None:
        return ", activations int8 per 32 (its default)"
    return ", float activations" if g == 0 else f", activations int8 per {g}"


LLAMA_TYPES = {"float32": None, "int8": ("q8_0", 7), "int4": ("q4_0", 2)}  # llama_ftype values


def write_gguf(hf: Path, path: Path) -> None:
    """An f32 GGUF of the folder's Llama weights, with llama.cpp's tensor names and its q/k row
    order (what convert_hf_to_gguf.py writes), and an SPM vocabulary of placeholder pieces (the
    benchmark feeds token ids; llama.cpp wants a vocabulary to load)."""
    import gguf
    from safetensors.numpy import load_file

    c = json.loads((hf / "config.json").read_text())
    w = load_file(str(hf / "model.safetensors"))
    heads, kv, d = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    head_dim = c.get("head_dim") or d // heads

    def permute(x, n):  # HF's rotate-half rows -> llama.cpp's interleaved pairs
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    out = gguf.GGUFWriter(str(path), "llama")
    out.add_context_length(c["max_position_embeddings"])
    out.add_embedding_length(d)
    out.add_block_count(c["num_hidden_layers"])
    out.add_feed_forward_length(c["intermediate_size"])
    out.add_head_count(heads)
    out.add_head_count_kv(kv)
    out.add_key_length(head_dim)
    out.add_value_length(head_dim)
    out.add_rope_dimension_count(head_dim)
    out.add_layer_norm_rms_eps(c["rms_norm_eps"])
    out.add_rope_freq_base(c["rope_theta"])
    out.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = c["vocab_size"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(len(tokens), vocab)]
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    out.add_tokenizer_model("llama")
    out.add_token_list(tokens)
    out.add_token_scores([0.0] * vocab)
    out.add_token_types(types)
    out.add_bos_token_id(1)
    out.add_eos_token_id(2)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in w.items():
        value = value.astype(np.float32)
        if key == "lm_head.weight":
            name = "output.weight"
        else:
            parts = key.removeprefix("model.").removesuffix(".weight")
            if parts.startswith("layers."):
                _, i, rest = parts.split(".", 2)
                name = f"blk.{i}.{names[rest]}.weight"
                value = permute(value, heads) if rest == "self_attn.q_proj" else \
                    permute(value, kv) if rest == "self_attn.k_proj" else value
            else:
                name = f"{names[parts]}.weight"
        out.add_tensor(name, np.ascontiguousarray(value))
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


def _quiet(level, text, user_data):
    pass


try:
    import llama_cpp as _L

    _QUIET = _L.llama_log_callback(_quiet)
except ImportError:  # the other engines run without llama-cpp-python
    _QUIET = None


def bench_llama_cpp(a, ids) -> dict:
    import llama_cpp as L

    L.llama_log_set(_QUIET, ctypes.c_void_p())  # llama.cpp logs every load, quantization and graph
    work = Path(a.work)
    f32 = work / "llama-f32.gguf"
    if not f32.is_file():
        write_gguf(Path(a.hf), f32)
    path = f32
    if LLAMA_TYPES[a.precision]:
        name, ftype = LLAMA_TYPES[a.precision]
        path = work / f"llama-{name}.gguf"
        if not path.is_file():
            params = L.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, a.threads
            if L.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)):
                raise SystemExit(f"llama.cpp: quantizing to {name} failed")
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    batch, plen = ids.shape
    n = a.output_len
    cp = L.llama_context_default_params()
    cp.n_ctx = batch * (plen + n + 8)
    cp.n_batch = cp.n_ubatch = max(batch * plen, 512)
    cp.n_seq_max = batch
    cp.n_threads = cp.n_threads_batch = a.threads
    cp.kv_unified = True
    cp.type_k = cp.type_v = 0  # GGML_TYPE_F32: a float32 KV cache, as jaxinfer's and OpenVINO's rows
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_n_vocab(L.llama_model_get_vocab(model))
    lb = L.llama_batch_init(batch * plen, 0, batch)

    def fill(entries):  # entries: (token, pos, seq, wants_logits)
        lb.n_tokens = len(entries)
        for i, (t, p, s, want) in enumerate(entries):
            lb.token[i], lb.pos[i], lb.n_seq_id[i], lb.logits[i] = int(t), p, 1, want
            lb.seq_id[i][0] = s
        if L.llama_decode(ctx, lb):
            raise SystemExit("llama.cpp: llama_decode failed")

    def next_tokens(rows):
        return [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, r), (vocab,)))) for r in rows]

    def run():
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        fill([(t, p, s, p == plen - 1) for s in range(batch) for p, t in enumerate(ids[s])])
        toks = [next_tokens([s * plen + plen - 1 for s in range(batch)])]
        t1 = time.perf_counter()
        for step in range(n - 1):
            fill([(toks[-1][s], plen + step, s, True) for s in range(batch)])
            toks.append(next_tokens(range(batch)))
        return t1 - t0, time.perf_counter() - t1, np.array(toks).T

    run()  # warm-up
    reps = [run() for _ in range(a.repeats)]
    decode = [r[1] for r in reps]
    return {"tok_s": batch * (n - 1) / statistics.median(decode), "prefill_ms": 1e3 * statistics.median(r[0] for r in reps),
            "step_ms": 1e3 * statistics.median(decode) / (n - 1), "tok_s_repeats": [batch * (n - 1) / d for d in decode],
            "tokens": reps[-1][2][0].tolist(), "version": f"llama-cpp-python {_version('llama-cpp-python')}",
            "detail": f"weights {LLAMA_TYPES[a.precision][0] if LLAMA_TYPES[a.precision] else 'f32'} (gguf), "
                      f"f32 KV cache, batched llama_decode, {a.threads} threads"}


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="the Hugging Face folder (config.json, model.safetensors)")
    p.add_argument("--work", required=True, help="where converted models are kept (reused when present)")
    p.add_argument("--engine", required=True, choices=ENGINES)
    p.add_argument("--precision", required=True, choices=PRECISIONS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (OpenVINO; llama.cpp's q4_0 is 32)")
    p.add_argument("--ov-dynamic-quant-group", type=int, default=None,
                   help="OpenVINO's DYNAMIC_QUANTIZATION_GROUP_SIZE (0: float activations; default: its own)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args(argv)
    if a.output_len < 2:
        p.error(f"--output-len {a.output_len}: the decode rate needs at least 2 new tokens")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    vocab = json.loads((Path(a.hf) / "config.json").read_text())["vocab_size"]
    ids = prompts(a.batch, a.prompt_len, vocab, a.seed)
    fn = {"transformers": bench_transformers, "openvino": bench_openvino, "llama.cpp": bench_llama_cpp}[a.engine]
    row = fn(a, ids)
    print(json.dumps(row | {"engine": a.engine, "precision": a.precision, "batch": a.batch}))


if __name__ == "__main__":
    main()
