"""The `jaxinfer` command: `generate` (default model, or --model HF_DIR), `bench`, `run` and `report`
(experiments), `serve` (the OpenAI-compatible server), `score` (perplexity), `eval` (the quality
gate of quantization and speculative switches), `quantize` (calibrate once, save) and `convert`.

Bad input is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "One morning, Ada and Ben"


def _config_path(args):
    """--config, else the embedded default (unless --model names the checkpoint)."""
    from jaxinfer.config import preset_path

    return args.config or (None if args.model else preset_path("default"))


def _load(args):
    """The run config from --config / the preset and dotted overrides, with the compilation cache on."""
    from jaxinfer.compilation import enable_compilation_cache
    from jaxinfer.config import load_config

    cfg = load_config(_config_path(args), args.overrides)
    enable_compilation_cache(cfg.compilation_cache)
    from jaxinfer import distributed

    distributed.initialize(cfg.distributed)  # several processes (distributed.num_processes > 1) only
    return cfg


def _follow(engine) -> int:
    """Processes other than 0 of a distributed job: run process 0's steps until it closes the engine."""
    import jax

    print(f"process {jax.process_index()}: following process 0", flush=True)
    steps = engine.follow()
    print(f"process {jax.process_index()}: process 0 closed the engine after {steps} steps", flush=True)
    return 0


def _load_run_config(args):
    cfg = _load(args)
    sampling = dataclasses.replace(cfg.sampling, **{k: v for k, v in {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed,
        "stop": tuple(args.stop) if args.stop else None,
        "logprobs": True if args.logprobs else None}.items() if v is not None})
    model = dataclasses.replace(cfg.model, dtype=args.dtype) if args.dtype else cfg.model
    return dataclasses.replace(cfg, model=model, sampling=sampling,
                               checkpoint=args.model or cfg.checkpoint,
                               tokenizer=args.tokenizer or cfg.tokenizer)


def _utf8(text: str, what: str) -> str:
    """`text` if it is valid UTF-8 (argv keeps undecodable bytes as surrogates); else ValueError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        at = len(text[: e.start].encode("utf-8", "surrogateescape"))
        raise ValueError(f"{what}: invalid UTF-8 at byte {at}; pass UTF-8 text") from None
    return text


def _read_utf8(path, what: str) -> str:
    """A file's text, or ValueError naming the first byte that is not UTF-8."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} '{path}': invalid UTF-8 at byte {e.start} ({e.reason}); save it as UTF-8") from None


def _prompts(args) -> list[str]:
    texts = [_utf8(t, f"--prompt {i + 1}") for i, t in enumerate(args.prompt or [])]
    texts += [_read_utf8(path, "prompt file") for path in args.prompt_file or []]
    return texts or [DEFAULT_PROMPT]


def cmd_generate(args) -> int:
    from jaxinfer.checkpoint import build
    from jaxinfer.generate import Generator

    cfg = _load_run_config(args)
    texts = _prompts(args)
    model, tok, stops, label = build(cfg)
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts] if args.chat else texts
    prompts = [tok.encode(t, add_special_tokens=not args.chat) for t in rendered]
    print(f"model: {label}", flush=True)
    result = Generator(model, cfg.decode).generate(prompts, cfg.sampling, stops, tokenizer=tok)
    for text, new, out, reason, seed, lps in zip(texts, result.tokens, result.texts, result.finish_reasons,
                                                  result.seeds, result.logprobs or [None] * len(texts)):
        print(f"\n--- prompt: {text!r}\n{out}\n[{len(new)} tokens, finish: {reason}, seed {seed}]")
        if lps is not None:
            print("logprobs: " + " ".join(f"{t}:{lp:.3f}" for t, lp in zip(new, lps)))
    t = result.timing
    print(f"\nprompt tokens {t.num_prompt_tokens} | new tokens {t.num_new_tokens} | "
          f"TTFT {t.prefill_s * 1e3:.1f} ms | decode {t.decode_tokens_per_s:.1f} tok/s "
          f"({t.num_decoded} tokens in {t.decode_s * 1e3:.1f} ms) | compile {t.compile_s:.2f} s (not in the above)")
    return 0


def _check_writable(path: Path) -> None:
    """Fails now, not after a long run, if `path` cannot be written."""
    if path.is_dir():
        raise ValueError(f"--out '{path}' is a folder; give a file name, e.g. {path / 'bench.json'}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"--out '{path}': cannot write there ({e.strerror}); choose another path") from None
    if not existed:
        path.unlink()


def cmd_bench(args) -> int:
    from jaxinfer.bench import bench
    from jaxinfer.checkpoint import build, load_draft

    cfg = _load(args)
    import jax

    if jax.process_count() > 1:
        raise ValueError("jaxinfer bench runs in one process; with several (distributed.num_processes), run "
                         "jaxinfer serve on every process and jaxinfer bench --url against process 0")
    flags = {"num_requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
             "shared_prefix_len": args.shared_prefix, "arrival_rate": args.rate,
             "modes": tuple(args.compare.split(",")) if args.compare else None}
    bench_cfg = dataclasses.replace(cfg.bench, **{k: v for k, v in flags.items() if v is not None})
    cfg = dataclasses.replace(cfg, bench=bench_cfg, checkpoint=args.model or cfg.checkpoint)
    out = Path(args.out or f"results/bench/{time.strftime('%Y%m%d-%H%M%S')}.json")
    _check_writable(out)
    model, tok, _, label = build(cfg)
    draft = load_draft(cfg, model, tok)
    spec = cfg.engine.speculative
    if spec.method != "none":
        label += f"; speculative {spec.method}, k={spec.num_speculative_tokens}" + (
            f" (draft {spec.draft_model})" if draft is not None else "")
    print(f"model: {label}\nworkload: {bench_cfg}", flush=True)
    bench(cfg, model, out, draft, url=args.url, api_key=args.api_key or os.environ.get("JAXINFER_API_KEY"))
    print(f"wrote {out}")
    return 0


def cmd_run(args) -> int:
    from jaxinfer.experiment.runner import run_experiment
    from jaxinfer.experiment.spec import load_experiment

    exp = load_experiment(args.config, args.overrides, smoke=args.smoke)
    out = Path(args.out or (f"results/smoke/{exp.name}" if args.smoke else f"results/{exp.name}"))
    if args.dry_run:
        for r in exp.runs:
            print(r.run_id)
        print(f"{len(exp.runs)} runs of '{exp.name}' ({exp.spec.kind}) -> {out}")
        return 0
    from jaxinfer.compilation import enable_compilation_cache

    enable_compilation_cache(exp.runs[0].cfg.compilation_cache)
    print(f"{exp.name} ({exp.spec.kind}): {len(exp.runs)} runs -> {out}", flush=True)
    run_experiment(exp, out, fresh=args.fresh)
    from jaxinfer.experiment.report import report

    print(report(out))
    print(f"\nwrote {out}/ (report.md, one folder per run)")
    return 0


def cmd_report(args) -> int:
    from jaxinfer.experiment.report import readme_blocks, report

    if args.check and not args.readme or not (args.readme or args.folders):
        raise ValueError("report: give results folders, or --readme FILE (with --check to only compare)")
    if args.readme:
        path = Path(args.readme)
        old = path.read_text()
        new = readme_blocks(old, path.parent)
        if args.check:
            if new != old:
                print(f"jaxinfer report: {path} has report blocks that no longer match their summaries; "
                      f"run `jaxinfer report --readme {path}`", file=sys.stderr)
                return 1
            print(f"{path}: every report block matches its summaries")
            return 0
        path.write_text(new)
        print(f"rewrote the report blocks of {path}")
    for folder in args.folders:
        print(report(folder))
        print()
    return 0


def cmd_convert(args) -> int:
    from jaxinfer.checkpoint import load_hf, save_converted

    src, out = Path(args.hf_dir), Path(args.out_dir)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ValueError(f"convert: the output folder is the input folder '{src}'; give another out_dir")
    if out.exists() and not out.is_dir():
        raise ValueError(f"convert: out_dir '{out}' is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"convert: out_dir '{out}' exists and is not empty; pass --force to replace its "
                         "params/ and jaxinfer.yaml, or choose an empty folder")
    model = load_hf(src, args.dtype)
    saved = save_converted(model, out, source=src, overwrite=args.force)
    print(f"converted {src} ({model.cfg.family}, {model.num_params / 1e6:.2f}M params, {model.cfg.dtype}) -> {saved}")
    return 0


def cmd_quantize(args) -> int:
    from jaxinfer.checkpoint import build, resolve_path, save_converted
    from jaxinfer.models import is_quantized

    cfg = _load(args)
    cfg = dataclasses.replace(cfg, checkpoint=args.model or cfg.checkpoint)
    if not is_quantized(cfg.model):
        raise ValueError("quantize: the config asks for no quantization; set e.g. model.quant=int4 "
                         "model.quant_method=awq")
    if not cfg.checkpoint:
        raise ValueError("quantize: needs a checkpoint (--model or the config's checkpoint), not random weights")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ValueError(f"quantize: '{out}' exists and is not an empty folder; pass --force to replace its "
                         "params/ and jaxinfer.yaml, or choose an empty folder")
    t0 = time.perf_counter()
    model, _, _, label = build(cfg)
    saved = save_converted(model, out, source=resolve_path(cfg.checkpoint), overwrite=args.force)
    print(f"{label}\nquantized in {time.perf_counter() - t0:.1f} s -> {saved} ({model.param_bytes / 2**20:.1f} MiB "
          "of params); load it with --model, no calibration needed")
    return 0


def cmd_eval(args) -> int:
    import json

    from jaxinfer import quality
    from jaxinfer.checkpoint import build, load_draft
    from jaxinfer.experiment.kinds import held_out, story_prompts

    cfg = _load(args)
    cfg = dataclasses.replace(cfg, checkpoint=args.model or cfg.checkpoint)
    for name in ("stories", "window", "prompts", "prompt_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"eval: --{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.tokens < 0:
        raise ValueError(f"eval: --tokens={args.tokens} must be >= 0 (0: no greedy continuations)")
    model, tok, _, label = build(cfg)
    windows = held_out(tok, args.stories, args.window)
    if not len(windows):
        raise ValueError(f"eval: --stories {args.stories} give less than one window of --window {args.window} + 1 "
                         "tokens; raise --stories or lower --window")
    prompts = story_prompts(tok, args.prompts, args.prompt_len)
    ref = quality.evaluate_reference(cfg, windows, prompts, args.tokens, lambda c: build(c)[:2])
    row = quality.evaluate(cfg, model, tok, load_draft(cfg, model, tok), windows, prompts, args.tokens, ref)
    spec = cfg.engine.speculative
    print(f"model: {label}\nKV cache: {cfg.engine.kv_cache_dtype}; speculative: {spec.method}"
          + (f" (k={spec.num_speculative_tokens})" if spec.method != "none" else "")
          + f"\nagainst the float model, {row['eval_tokens']} held-out tokens ({len(windows)} windows of {args.window})"
          + (f", greedy: {len(prompts)} story openings x {args.tokens} tokens" if args.tokens else ""))
    names = {"ppl": "perplexity", "ppl_ref": "perplexity (float)", "kl": "KL mean (nats/token)", "kl_p99": "KL p99",
             "agreement": "top-1 agreement", "greedy_agreement": "greedy agreement", "gen_kl": "KL along greedy",
             "kv_bytes_per_token": "KV bytes / token", "weight_mib": "weight MiB / step"}
    for key, name in names.items():
        if key in row:
            v = row[key]
            print(f"  {name:22s} {v:.4%}" if "agreement" in key else f"  {name:22s} {v:.6g}")
    failed = [f"KL mean {row['kl']:.3g} > --max-kl {args.max_kl}"] if args.max_kl is not None and row["kl"] > args.max_kl else []
    if args.min_agreement is not None and row["agreement"] < args.min_agreement:
        failed.append(f"top-1 agreement {row['agreement']:.4f} < --min-agreement {args.min_agreement}")
    if args.out:
        _check_writable(Path(args.out))
        Path(args.out).write_text(json.dumps(row | {"model": label, "passed": not failed}, indent=1))
        print(f"wrote {args.out}")
    for f in failed:
        print(f"jaxinfer eval: gate failed: {f}", file=sys.stderr)
    return 1 if failed else 0


def _model_id(cfg) -> str:
    """The id clients send as `model`: serve.model_name, else the checkpoint folder's name."""
    if cfg.serve.model_name:
        return cfg.serve.model_name
    return Path(cfg.checkpoint.removeprefix("package:")).name if cfg.checkpoint else cfg.model.name.split(" ")[0]


def cmd_serve(args) -> int:
    import socket

    try:
        import uvicorn

        from jaxinfer.serve.app import create_app
    except ImportError as e:
        raise ValueError(f"jaxinfer serve needs the serve extra ({e.name} is missing): "
                         "pip install 'jaxinfer[serve]'") from None
    from jaxinfer.engine import Engine

    cfg = _load(args)
    serve = dataclasses.replace(cfg.serve, **{k: v for k, v in {"host": args.host, "port": args.port}.items()
                                              if v is not None})
    cfg = dataclasses.replace(cfg, serve=serve, checkpoint=args.model or cfg.checkpoint)
    api_key = args.api_key or os.environ.get("JAXINFER_API_KEY") or None
    import jax

    if jax.process_index() != 0:  # a follower of a distributed job: no port, no server
        return _follow(Engine.from_config(cfg))
    sock = socket.socket(socket.AF_INET6 if ":" in serve.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bound before the model loads: a taken port fails now, and port 0 picks a free one
        sock.bind((serve.host, serve.port))
    except OSError as e:
        raise ValueError(f"cannot listen on {serve.host}:{serve.port} ({e.strerror}); choose another --port") from None
    engine = Engine.from_config(cfg)
    if args.warmup:
        info = engine.warmup()
        print(f"warmup: {info['num_layouts']} step shapes in {info['compile_s']:.1f} s", flush=True)
    model_id = _model_id(cfg)
    app = create_app(engine, serve, model_id, api_key)
    host, port = sock.getsockname()[:2]
    print(f"serving '{model_id}' at http://{host}:{port}/v1" + (" (API key required)" if api_key else ""), flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()  # releases the other processes of a distributed job
    return 0


def cmd_score(args) -> int:
    from jaxinfer.engine import Engine
    from jaxinfer.scoring import perplexity

    cfg = _load(args)
    cfg = dataclasses.replace(cfg, checkpoint=args.model or cfg.checkpoint)
    text = _read_utf8(args.file, "score: file")
    engine = Engine.from_config(cfg)
    if not engine.is_leader:
        return _follow(engine)
    try:
        result = perplexity(engine, text, window=args.window, stride=args.stride)
    finally:
        engine.close()
    print(f"{args.file}: {result['num_scored']} tokens scored in {result['num_windows']} windows of up to "
          f"{result['window']} tokens (stride {result['stride']})\n"
          f"perplexity {result['perplexity']:.4f} | NLL {result['nll_per_token']:.4f} nats/token "
          f"({result['bits_per_byte']:.4f} bits/byte)")
    return 0


def _sampling_flags(g) -> None:
    from jaxinfer.config import SamplingConfig

    d = SamplingConfig()
    g.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"new tokens per prompt, >= 1 (default: the config's, {d.max_new_tokens} in the presets)")
    g.add_argument("--temperature", type=float, metavar="T",
                   help=f"finite, >= 0; 0 = greedy (default: the config's, {d.temperature})")
    g.add_argument("--top-k", type=int, metavar="K", help=f">= 0; 0 = off (default: {d.top_k})")
    g.add_argument("--top-p", type=float, metavar="P", help=f"in (0, 1]; 1 = off (default: {d.top_p})")
    g.add_argument("--min-p", type=float, metavar="P", help=f"in [0, 1]; 0 = off (default: {d.min_p})")
    g.add_argument("--seed", type=int, metavar="S", help="sampling seed in [0, 2**32) (default: a fresh seed per "
                                                         "prompt, printed with its completion so the run can be repeated)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop string, repeatable: a completion ends where its text first contains one (default: none)")
    g.add_argument("--logprobs", action="store_true", help="print the logprob of each chosen token")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxinfer", description="JAX/XLA LLM inference research framework")
    sub = p.add_subparsers(dest="command", required=True)
    overrides = dict(nargs="*", help="dotted config overrides, e.g. model.num_layers=2 compilation_cache=null")
    g = sub.add_parser("generate", help="generate text (default: the shipped reference model)")
    g.add_argument("--config", help="a run YAML (see configs/) (default: jaxinfer/presets/default.yaml, "
                                    "the shipped reference model; none with --model)")
    g.add_argument("--model", help="a Hugging Face checkpoint folder, a `jaxinfer convert` output, or "
                                   "package:reference/target (default: the config's checkpoint)")
    g.add_argument("--tokenizer", help="'byte', or a folder with tokenizer.json or vocab.json + merges.txt "
                                       "(default: the checkpoint's own, else byte)")
    g.add_argument("--prompt", action="append", help=f"prompt text, repeatable for a batch (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--prompt-file", action="append", metavar="FILE",
                   help="a UTF-8 file whose whole text is one prompt, repeatable, after the --prompt ones (default: none)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template "
                                                       "(the model needs one: the shipped reference model has none)")
    _sampling_flags(g)
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 on accelerators (default: the config's model.dtype, auto)")
    g.add_argument("overrides", **overrides)
    g.set_defaults(func=cmd_generate)
    b = sub.add_parser("bench", help="offline serving benchmark: continuous vs static vs sequential")
    b.add_argument("--config", help="a run YAML with model, engine and bench sections "
                                    "(default: jaxinfer/presets/default.yaml, the shipped reference model)")
    b.add_argument("--model", help="a Hugging Face or converted checkpoint folder: replaces the config's "
                                   "checkpoint (default: the config's; one with checkpoint: null runs random "
                                   "weights of its model: section)")
    b.add_argument("--compare", help="comma-separated modes from continuous,static,sequential (default: continuous)")
    b.add_argument("--num-requests", type=int, metavar="N", help="requests, >= 1 (default: the config's bench.num_requests, 32)")
    b.add_argument("--prompt-len", type=int, metavar="N", help="prompt tokens, >= 1; with the shared prefix and "
                                                               "the output it must fit engine.max_model_len (default: 128)")
    b.add_argument("--output-len", type=int, metavar="N", help="output tokens, >= 1 (default: 128)")
    b.add_argument("--shared-prefix", type=int, metavar="N", help="tokens of a prefix shared by every prompt, >= 0 (default: 0)")
    b.add_argument("--rate", type=float, metavar="R", help="Poisson arrival rate in requests/s, >= 0; 0 = all at once (default: 0)")
    b.add_argument("--url", help="also send the workload to a `jaxinfer serve` at this URL (e.g. http://127.0.0.1:8000; "
                                 "run it with the same --config): an 'http' column and its latency over in-process (default: none)")
    b.add_argument("--api-key", help="with --url: the server's API key (default: $JAXINFER_API_KEY)")
    b.add_argument("--out", help="JSON path, checked for writing before the run (default: results/bench/<time>.json)")
    b.add_argument("overrides", **overrides)
    b.set_defaults(func=cmd_bench)
    r = sub.add_parser("run", help="run an experiment YAML: every sweep point into results/NAME/RUN_ID/, then its report")
    r.add_argument("config", help="an experiment YAML, e.g. configs/experiments/decode_roofline.yaml")
    r.add_argument("--out", help="results folder (default: results/NAME, results/smoke/NAME with --smoke); "
                                 "runs already done there are kept (resume)")
    r.add_argument("--smoke", action="store_true", help="the experiment's reduced version (its smoke: overrides; CI runs these)")
    r.add_argument("--fresh", action="store_true", help="discard the runs already in the results folder")
    r.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    r.add_argument("overrides", nargs="*", help="dotted overrides of the base config or the experiment, "
                                                "e.g. experiment.repeats=1 bench.output_len=32")
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("report", help="Markdown tables and plots from results folders; regenerate README blocks")
    rp.add_argument("folders", nargs="*", help="results folders of `jaxinfer run` (writes report.md and PNGs into each)")
    rp.add_argument("--readme", help="rewrite this file's <!-- report: FOLDER --> blocks from their summaries (default: none)")
    rp.add_argument("--check", action="store_true", help="with --readme: exit 1 if a block differs, write nothing")
    rp.set_defaults(func=cmd_report)
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over the engine (needs the serve extra)")
    sv.add_argument("--config", help="a run YAML (model, engine, serve sections) (default: "
                                     "jaxinfer/presets/default.yaml, the shipped reference model; none with --model)")
    sv.add_argument("--model", help="a Hugging Face or converted checkpoint folder (default: the config's checkpoint)")
    sv.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, help="port, 0 = any free one (default: serve.port, 8000)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $JAXINFER_API_KEY, else none)")
    sv.add_argument("--warmup", action="store_true", help="compile every step shape before serving, scoring ones "
                                                          "(prompt/top logprobs) aside (default: each on first use)")
    sv.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                    help="uvicorn's log level (default: warning)")
    sv.add_argument("overrides", **overrides)
    sv.set_defaults(func=cmd_serve)
    sc = sub.add_parser("score", help="perplexity of a UTF-8 text file under the model (prompt logprobs)")
    sc.add_argument("file", help="a UTF-8 text file")
    sc.add_argument("--config", help="a run YAML (default: jaxinfer/presets/default.yaml; none with --model)")
    sc.add_argument("--model", help="a Hugging Face or converted checkpoint folder (default: the config's)")
    sc.add_argument("--window", type=int, help="tokens per scored window, >= 2 (default: the context, "
                                               "engine.max_model_len - 1)")
    sc.add_argument("--stride", type=int, help="tokens between window starts, 1..window-1; each token is scored once, "
                                               "in the first window with context before it (default: window - 1)")
    sc.add_argument("overrides", **overrides)
    sc.set_defaults(func=cmd_score)
    q = sub.add_parser("quantize", help="quantize (and calibrate: model.quant_method=awq) a checkpoint once, "
                                        "saved as an orbax folder that loads without calibration")
    q.add_argument("--config", help="a run YAML (default: jaxinfer/presets/default.yaml; none with --model)")
    q.add_argument("--model", help="the float checkpoint folder (default: the config's)")
    q.add_argument("--out", required=True, help="an empty or new folder (required: no default)")
    q.add_argument("--force", action="store_true", help="replace params/ and jaxinfer.yaml in a non-empty --out")
    q.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.quant=int4 model.quant_method=awq "
                                                "model.quant_group_size=32")
    q.set_defaults(func=cmd_quantize)
    ev = sub.add_parser("eval", help="the quality gate: a config's switches (weights, W8A8, KV cache, speculative) "
                                     "against its float model: perplexity, KL, top-1 and greedy agreement")
    ev.add_argument("--config", help="a run YAML (default: jaxinfer/presets/default.yaml; none with --model)")
    ev.add_argument("--model", help="a checkpoint folder (default: the config's)")
    ev.add_argument("--stories", type=int, default=32, help="held-out stories scored, >= 1 (default: 32)")
    ev.add_argument("--window", type=int, default=128, help="tokens per scored window, >= 1 (default: 128)")
    ev.add_argument("--prompts", type=int, default=8, help="story openings continued greedily (default: 8)")
    ev.add_argument("--prompt-len", type=int, default=16, help="tokens per opening (default: 16)")
    ev.add_argument("--tokens", type=int, default=32, help="greedy tokens per opening, 0: none (default: 32)")
    ev.add_argument("--max-kl", type=float, help="exit 1 if the mean KL exceeds this (default: no gate)")
    ev.add_argument("--min-agreement", type=float, help="exit 1 if top-1 agreement is below this (default: no gate)")
    ev.add_argument("--out", help="also write the metrics as JSON here (default: none)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides: the switches to judge, e.g. model.quant=int4 "
                                                 "engine.kv_cache_dtype=int8 engine.speculative.method=ngram")
    ev.set_defaults(func=cmd_eval)
    c = sub.add_parser("convert", help="convert a Hugging Face folder to an orbax checkpoint")
    c.add_argument("hf_dir", help="the Hugging Face folder (config.json + safetensors)")
    c.add_argument("out_dir", help="an empty or new folder (not hf_dir)")
    c.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the saved params (default: float32)")
    c.add_argument("--force", action="store_true", help="replace params/ and jaxinfer.yaml in a non-empty out_dir")
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    from jaxinfer.distributed import DistributedError

    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, DistributedError) as e:  # config, checkpoint, tokenizer, sampling and file errors
        detail = f"{e.strerror}: '{e.filename}'" if isinstance(e, OSError) and e.filename else str(e)
        print(f"jaxinfer {args.command}: error: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxinfer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
