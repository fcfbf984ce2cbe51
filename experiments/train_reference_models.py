"""Trains jaxinfer's reference pair on its own corpus: a BPE tokenizer, a target model, and a draft
distilled from the target; writes both as Hugging Face folders, loss curves and a summary.

    python -m experiments.train_reference_models configs/experiments/reference_models.yaml [key=value ...]

Deterministic from `seed`; resumable (orbax checkpoints under out_dir/ckpt_*); progress bars.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxinfer.config import ConfigError, ModelConfig, dump_yaml, load_config

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")


@dataclass(frozen=True)
class StageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 800
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    distill_alpha: float = 0.0  # draft only: weight of KL(target || draft); 1 - alpha on the data loss
    checkpoint_every: int = 100


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    corpus_file: str = ""  # one document per line instead of the generated stories (e.g. your own text)
    num_stories: int = 10000
    val_every: int = 20
    vocab_size: int = 2048
    out_dir: str = "results/reference_models"
    ship_dir: str = ""  # if set, the trained folders are copied here (e.g. jaxinfer/reference)
    ship_dtype: str = "bfloat16"  # weights in the written folders (halves the package); metrics report both
    target: StageConfig = field(default_factory=StageConfig)
    draft: StageConfig = field(default_factory=StageConfig)


def check(cfg: TrainConfig) -> None:
    """Stops before any training on input that cannot work."""
    if cfg.corpus_file and not Path(cfg.corpus_file).is_file():
        raise ConfigError(f"corpus_file '{cfg.corpus_file}' does not exist (leave it empty for the generated stories)")
    if cfg.num_stories < cfg.val_every * 2:
        raise ConfigError(f"num_stories={cfg.num_stories}: too few for a validation split every {cfg.val_every}")
    if cfg.vocab_size <= len(SPECIALS) + 256:
        raise ConfigError(f"vocab_size={cfg.vocab_size} must exceed the {len(SPECIALS)} special tokens plus the "
                          "256 byte-level base symbols")
    for name in ("target", "draft"):
        m = getattr(cfg, name).model
        if m.vocab_size != cfg.vocab_size:
            raise ConfigError(f"{name}.model.vocab_size={m.vocab_size} differs from vocab_size={cfg.vocab_size}: "
                              "the draft and the target must share the tokenizer")
        stage = getattr(cfg, name)
        if stage.seq_len > m.max_position_embeddings:
            raise ConfigError(f"{name}.seq_len={stage.seq_len} exceeds {name}.model.max_position_embeddings")
        if not 0 <= stage.warmup_steps < stage.steps:
            raise ConfigError(f"{name}.warmup_steps={stage.warmup_steps} must be in [0, {name}.steps={stage.steps})")
    if cfg.draft.seq_len != cfg.target.seq_len:
        raise ConfigError("draft.seq_len must equal target.seq_len (they share the token windows)")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], bos)])
    return tok


def token_stream(tok, texts: list[str]) -> np.ndarray:
    """BOS + story + EOS for every story, concatenated."""
    eos = tok.token_to_id(SPECIALS[1])
    ids = [e.ids + [eos] for e in tok.encode_batch(texts)]
    return np.fromiter((t for row in ids for t in row), np.int32)


def make_fns(graphdef, stage: StageConfig, teacher=None):
    """(train step, eval fn) under jit. With a teacher (graphdef, params): distillation."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    sched = optax.warmup_cosine_decay_schedule(0.0, stage.lr, stage.warmup_steps, stage.steps, stage.lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=stage.weight_decay))

    def logits_of(gdef, params, x):
        mod = nnx.merge(gdef, params)
        pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape)
        hidden, _ = mod(x, pos)
        return mod.logits(hidden)

    def loss_fn(params, batch, teacher_params):
        x, y = batch[:, :-1], batch[:, 1:]
        logits = logits_of(graphdef, params, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        if teacher is None:
            return ce, (ce, jnp.float32(0))
        t = jax.lax.stop_gradient(logits_of(teacher[0], teacher_params, x))
        kl = (jax.nn.softmax(t) * (jax.nn.log_softmax(t) - jax.nn.log_softmax(logits))).sum(-1).mean()
        a = stage.distill_alpha
        return a * kl + (1 - a) * ce, (ce, kl)

    @jax.jit
    def train_step(params, opt_state, batch, teacher_params):
        (loss, (ce, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, teacher_params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, ce, kl

    @jax.jit
    def eval_batch(params, batch, teacher_params):
        """Summed NLL, token count, and (with a teacher) greedy agreements."""
        x, y = batch[:, :-1], batch[:, 1:]
        logits = logits_of(graphdef, params, x)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
        agree = jnp.int32(0)
        if teacher is not None:
            agree = (logits.argmax(-1) == logits_of(teacher[0], teacher_params, x).argmax(-1)).sum()
        return nll, y.size, agree

    return opt, train_step, eval_batch


def evaluate(eval_batch, params, val: np.ndarray, teacher_params, batch_size: int) -> dict:
    nll = n = agree = 0
    for i in range(0, len(val), batch_size):
        a, b, c = eval_batch(params, val[i:i + batch_size], teacher_params)
        nll, n, agree = nll + float(a), n + int(b), agree + int(c)
    return {"val_ppl": math.exp(nll / n), "val_nll": nll / n, "greedy_agreement": agree / n, "val_tokens": n}


def train_stage(name: str, stage: StageConfig, train: np.ndarray, val: np.ndarray, out: Path, seed: int,
                teacher=None):
    """Trains one model, resuming from out/ckpt_<name> if present. Returns (model, metrics, curve)."""
    import jax
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from jaxinfer.models import init_model

    model = init_model(stage.model, seed)
    opt, train_step, eval_batch = make_fns(model.graphdef, stage, teacher)
    params, opt_state = model.params, opt.init(model.params)
    teacher_params = teacher[1] if teacher else None
    curve: list[list[float]] = []
    mngr = ocp.CheckpointManager((out / f"ckpt_{name}").absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=1))
    start = 0
    if mngr.latest_step() is not None:
        start = mngr.latest_step()
        state = mngr.restore(start, args=ocp.args.StandardRestore({"params": params, "opt": opt_state, "curve": np.zeros((start, 3))}))
        params, opt_state, curve = state["params"], state["opt"], np.asarray(state["curve"]).tolist()
        print(f"{name}: resumed at step {start}", flush=True)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(train)) for _ in range(stage.steps * stage.batch_size // len(train) + 2)]
    order = np.concatenate(orders)
    bar = tqdm(range(start, stage.steps), desc=f"train {name}", initial=start, total=stage.steps)
    for step in bar:
        batch = train[order[step * stage.batch_size:(step + 1) * stage.batch_size]]
        params, opt_state, loss, ce, kl = train_step(params, opt_state, batch, teacher_params)
        curve.append([step, float(ce), float(kl)])
        bar.set_postfix(ce=f"{float(ce):.3f}", kl=f"{float(kl):.3f}")
        if (step + 1) % stage.checkpoint_every == 0 or step + 1 == stage.steps:
            mngr.save(step + 1, args=ocp.args.StandardSave({"params": params, "opt": opt_state, "curve": np.asarray(curve)}))
    mngr.wait_until_finished()
    model = dataclasses.replace(model, params=params)
    return model, evaluate(eval_batch, params, val, teacher_params, stage.batch_size), np.asarray(curve)


def unigram_ppl(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Add-one unigram model of the training targets, scored on the validation targets."""
    counts = np.bincount(train[:, 1:].ravel(), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-logp[val[:, 1:].ravel()].mean())


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(c[:, 0], c[:, 1], label=f"{name}: data loss (CE)")
        if c[:, 2].any():
            ax.plot(c[:, 0], c[:, 2], label=f"{name}: KL to target", linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("jaxinfer reference models: training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    from jaxinfer.corpus import build_corpus, windows
    from jaxinfer.checkpoint import load_model, save_hf

    import argparse

    ap = argparse.ArgumentParser(prog="python -m experiments.train_reference_models",
                                 description="Trains the shipped reference pair (target + distilled draft) from "
                                             "generated stories; resumes finished stages.")
    ap.add_argument("config", help="a TrainConfig YAML, e.g. configs/experiments/reference_models.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. target_steps=100")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.overrides, cls=TrainConfig)
    check(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "config.yaml")
    t0 = time.time()
    if cfg.corpus_file:
        docs = [line for line in Path(cfg.corpus_file).read_text().splitlines() if line.strip()]
        if len(docs) < 2 * cfg.val_every:
            raise ConfigError(f"corpus_file '{cfg.corpus_file}' has {len(docs)} documents; need >= {2 * cfg.val_every}")
        train_texts = [d for i, d in enumerate(docs) if i % cfg.val_every]
        val_texts = [d for i, d in enumerate(docs) if i % cfg.val_every == 0]
    else:
        train_texts, val_texts = build_corpus(cfg.seed, cfg.num_stories, cfg.val_every)
    tok = train_tokenizer(train_texts, cfg.vocab_size)
    seq = cfg.target.seq_len
    train, val = windows(token_stream(tok, train_texts), seq), windows(token_stream(tok, val_texts), seq)
    print(f"corpus: {len(train_texts)} train / {len(val_texts)} validation stories, "
          f"{train.size} / {val.size} tokens, vocab {tok.get_vocab_size()}", flush=True)
    target, target_metrics, target_curve = train_stage("target", cfg.target, train, val, out, cfg.seed)
    draft, draft_metrics, draft_curve = train_stage("draft", cfg.draft, train, val, out, cfg.seed + 1,
                                                    teacher=(target.graphdef, target.params))
    summary = {"unigram_val_ppl": unigram_ppl(train, val, cfg.vocab_size), "target": target_metrics,
               "draft": draft_metrics, "target_params": target.num_params, "draft_params": draft.num_params,
               "train_tokens": int(train.size), "wall_s": time.time() - t0}
    plot_curves({"target": target_curve, "draft": draft_curve}, out / "loss_curves.png")
    for name, model in (("target", target), ("draft", draft)):
        save_hf(model, out / name, tok, SPECIALS, dtype=cfg.ship_dtype)
    # The metrics of the weights as written (rounded to ship_dtype, computed in float32).
    t_w, d_w = (load_model(out / n, "float32") for n in ("target", "draft"))
    summary["target"]["shipped"] = evaluate(make_fns(t_w.graphdef, cfg.target)[2], t_w.params, val, None,
                                            cfg.target.batch_size)
    summary["draft"]["shipped"] = evaluate(make_fns(d_w.graphdef, cfg.draft, (t_w.graphdef, t_w.params))[2],
                                           d_w.params, val, t_w.params, cfg.draft.batch_size)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.ship_dir:
        import shutil

        for name in ("target", "draft"):
            dst = Path(cfg.ship_dir) / name
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(out / name, dst)
        shutil.copy(out / "summary.json", Path(cfg.ship_dir) / "summary.json")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
