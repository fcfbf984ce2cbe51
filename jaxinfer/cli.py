"""The `jaxinfer` command: `generate` (default model, or --model HF_DIR), `bench` and `convert`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "One morning, Ada and Ben"


def _config_path(args):
    """--config, else the embedded default (unless --model names the checkpoint)."""
    from jaxinfer.config import preset_path

    return args.config or (None if args.model else preset_path("default"))


def _load_run_config(args):
    from jaxinfer.config import load_config

    cfg = load_config(_config_path(args), args.overrides)
    sampling = dataclasses.replace(cfg.sampling, **{k: v for k, v in {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed,
        "logprobs": True if args.logprobs else None}.items() if v is not None})
    model = dataclasses.replace(cfg.model, dtype=args.dtype) if args.dtype else cfg.model
    return dataclasses.replace(cfg, model=model, sampling=sampling,
                               checkpoint=args.model or cfg.checkpoint,
                               tokenizer=args.tokenizer or cfg.tokenizer)


def cmd_generate(args) -> int:
    from jaxinfer.checkpoint import build
    from jaxinfer.generate import Generator

    cfg = _load_run_config(args)
    model, tok, stops, label = build(cfg)
    texts = args.prompt or [DEFAULT_PROMPT]
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts] if args.chat else texts
    prompts = [tok.encode(t, add_special_tokens=not args.chat) for t in rendered]
    print(f"model: {label}", flush=True)
    result = Generator(model, cfg.decode).generate(prompts, cfg.sampling, stops)
    for text, new, reason, lps in zip(texts, result.tokens, result.finish_reasons,
                                      result.logprobs or [None] * len(texts)):
        print(f"\n--- prompt: {text!r}\n{tok.decode(new)}\n[{len(new)} tokens, finish: {reason}]")
        if lps is not None:
            print("logprobs: " + " ".join(f"{t}:{lp:.3f}" for t, lp in zip(new, lps)))
    t = result.timing
    print(f"\nprompt tokens {t.num_prompt_tokens} | new tokens {t.num_new_tokens} | "
          f"TTFT {t.prefill_s * 1e3:.1f} ms | decode {t.decode_tokens_per_s:.1f} tok/s "
          f"({t.num_decoded} tokens in {t.decode_s * 1e3:.1f} ms) | compile {t.compile_s:.2f} s (not in the above)")
    return 0


def cmd_bench(args) -> int:
    from jaxinfer.bench import bench
    from jaxinfer.checkpoint import build
    from jaxinfer.config import load_config

    cfg = load_config(_config_path(args), args.overrides)
    flags = {"num_requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
             "shared_prefix_len": args.shared_prefix, "arrival_rate": args.rate,
             "modes": tuple(args.compare.split(",")) if args.compare else None}
    bench_cfg = dataclasses.replace(cfg.bench, **{k: v for k, v in flags.items() if v is not None})
    cfg = dataclasses.replace(cfg, bench=bench_cfg, checkpoint=args.model or cfg.checkpoint)
    model, _, _, label = build(cfg)
    print(f"model: {label}\nworkload: {bench_cfg}", flush=True)
    out = args.out or f"results/bench/{time.strftime('%Y%m%d-%H%M%S')}.json"
    bench(cfg, model, out)
    print(f"wrote {out}")
    return 0


def cmd_convert(args) -> int:
    from jaxinfer.checkpoint import load_hf, save_converted

    model = load_hf(args.hf_dir, args.dtype)
    out = save_converted(model, args.out_dir, source=args.hf_dir)
    print(f"converted {args.hf_dir} ({model.cfg.family}, {model.num_params / 1e6:.2f}M params, "
          f"{model.cfg.dtype}) -> {out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxinfer", description="JAX/XLA LLM inference research framework")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text (default: the shipped reference model)")
    g.add_argument("--config", help="a run YAML (see configs/); default: jaxinfer/presets/default.yaml")
    g.add_argument("--model", help="a Hugging Face checkpoint folder or a `jaxinfer convert` output")
    g.add_argument("--tokenizer", help="'byte' or a folder with tokenizer.json (default: the model's)")
    g.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 on accelerators")
    g.add_argument("--logprobs", action="store_true", help="print the logprob of each chosen token")
    g.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.num_layers=2")
    g.set_defaults(func=cmd_generate)
    b = sub.add_parser("bench", help="offline serving benchmark: continuous vs static vs sequential")
    b.add_argument("--config", help="a run YAML (model, engine, bench sections); default: the embedded model")
    b.add_argument("--model", help="a Hugging Face checkpoint folder instead of random init")
    b.add_argument("--compare", help="comma-separated modes: continuous,static,sequential")
    b.add_argument("--num-requests", type=int)
    b.add_argument("--prompt-len", type=int)
    b.add_argument("--output-len", type=int)
    b.add_argument("--shared-prefix", type=int, help="tokens of a prefix shared by every prompt")
    b.add_argument("--rate", type=float, help="Poisson arrival rate in requests/s (0: all at once)")
    b.add_argument("--out", help="JSON path (default results/bench/<time>.json)")
    b.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. engine.page_size=32")
    b.set_defaults(func=cmd_bench)
    c = sub.add_parser("convert", help="convert a Hugging Face folder to an orbax checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out_dir")
    c.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # config, checkpoint, tokenizer and sampling errors
        print(f"jaxinfer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
