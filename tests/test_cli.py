"""The `jaxinfer` command: runs with no arguments, on a transformers-written folder, and answers
bad input with one line on stderr (exit 2), never a traceback."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import FIXTURES, golden

from jaxinfer.cli import main
from jaxinfer.tokenizer import load_tokenizer


def test_generate_with_no_arguments_runs_the_shipped_reference_model(capsys):
    assert main(["generate"]) == 0
    out = capsys.readouterr().out
    assert "package:reference/target (llama" in out
    assert "TTFT" in out and "tok/s" in out and "compile" in out


def test_random_preset_needs_no_files(capsys):
    from jaxinfer.config import preset_path

    assert main(["generate", "--config", str(preset_path("random"))]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "new tokens 64" in out


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "jaxinfer.cli", "generate", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "new tokens 4" in proc.stdout


def test_generate_on_a_transformers_folder_prints_transformers_tokens(capsys):
    text = "The quick brown fox jumps over the lazy dog, again and again."
    assert main(["generate", "--model", str(FIXTURES / "llama2"), "--prompt", text, "--max-new-tokens", "32"]) == 0
    out = capsys.readouterr().out
    want = load_tokenizer(FIXTURES / "llama2").decode(golden("llama2")["greedy"][0])
    assert want in out
    assert "llama, 0.14M params, float32" in out


def test_generate_batch_chat_and_sampling_flags(capsys):
    args = ["generate", "--model", str(FIXTURES / "qwen3"), "--prompt", "hi", "--prompt", "a longer one",
            "--chat", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "5", "--logprobs"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("--- prompt:") == 2 and out.count("logprobs:") == 2


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert match in lines[0], lines[0]


def test_bad_input_gets_one_clear_line(capsys, tmp_path):
    one_line_error(capsys, ["generate", "--model", str(tmp_path / "missing")], "does not exist")
    bad = tmp_path / "gpt2"
    shutil.copytree(FIXTURES / "llama2", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    one_line_error(capsys, ["generate", "--model", str(bad)], "model_type 'gpt2' is not supported")
    one_line_error(capsys, ["generate", "model.num_layer=2"], "did you mean 'model.num_layers'")
    one_line_error(capsys, ["generate", "--prompt", "x" * 3000], "exceeds the model's context of 512")
    one_line_error(capsys, ["generate", "--max-new-tokens", "0"], "max_new_tokens=0")
    one_line_error(capsys, ["generate", "--temperature", "nan"], "temperature=nan")
    (bad / "config.json").unlink()
    one_line_error(capsys, ["convert", str(bad), str(tmp_path / "out")], "config.json' is missing")


@pytest.mark.parametrize("flag", ["--config", "--tokenizer"])
def test_missing_config_or_tokenizer_file(capsys, tmp_path, flag):
    one_line_error(capsys, ["generate", flag, str(tmp_path / "nope")], "does not exist")


# ---- bad input: one line, exit 2, checked before any long work ---------------------------------------
@pytest.mark.parametrize("argv,match", [
    (["--prompt-len", "600"], "= 728 tokens exceeds the context of 512"),
    (["--prompt-len", "0"], "bench.prompt_len=0: must be >= 1"),
    (["--num-requests", "0"], "bench.num_requests=0: must be >= 1"),
    (["--rate", "-2"], "bench.arrival_rate=-2.0: must be >= 0"),
    (["engine.page_size=0"], "engine.page_size=0: must be >= 1"),
    (["--compare", "fast"], "bench mode 'fast' is unknown"),
])
def test_bench_rejects_impossible_workloads(capsys, tmp_path, argv, match):
    one_line_error(capsys, ["bench", "--out", str(tmp_path / "b.json"), *argv], match)


def test_bench_checks_out_before_running(capsys, tmp_path, monkeypatch):
    import jaxinfer.bench

    monkeypatch.setattr(jaxinfer.bench, "bench", lambda *a: pytest.fail("ran before checking --out"))
    (tmp_path / "file").write_text("")
    one_line_error(capsys, ["bench", "--out", str(tmp_path / "file" / "b.json")], "cannot write there")
    one_line_error(capsys, ["bench", "--out", str(tmp_path)], "is a folder")


def test_convert_refuses_to_overwrite_or_write_into_its_input(capsys, tmp_path):
    src, out = str(FIXTURES / "llama2"), tmp_path / "out"
    assert main(["convert", src, str(out)]) == 0
    one_line_error(capsys, ["convert", src, str(out)], "exists and is not empty; pass --force")
    assert main(["convert", src, str(out), "--force"]) == 0
    copy = tmp_path / "hf"
    shutil.copytree(FIXTURES / "llama2", copy)
    one_line_error(capsys, ["convert", str(copy), str(copy)], "is the input folder")
    assert not (copy / "params").exists()
    (tmp_path / "file").write_text("")
    one_line_error(capsys, ["convert", src, str(tmp_path / "file")], "is a file, not a folder")
    one_line_error(capsys, ["convert", src, str(tmp_path / "file" / "sub")], "Not a directory")


@pytest.mark.parametrize("change,match", [
    ({"hidden_size": None}, "field 'hidden_size' is missing"),
    ({"num_hidden_layers": "four"}, "field 'num_hidden_layers' must be a positive integer, got 'four'"),
    ({"rms_norm_eps": "small"}, "field 'rms_norm_eps' must be a float"),
])
def test_wrong_config_json_fields_are_named(capsys, tmp_path, change, match):
    bad = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama2", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg = {k: v for k, v in {**cfg, **change}.items() if v is not None}
    (bad / "config.json").write_text(json.dumps(cfg))
    one_line_error(capsys, ["generate", "--model", str(bad)], match)


def test_prompts_that_are_not_utf8_are_named(capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"hello \xff world")
    one_line_error(capsys, ["generate", "--prompt-file", str(f)], f"prompt file '{f}': invalid UTF-8 at byte 6")
    one_line_error(capsys, ["generate", "--prompt", "ok", "--prompt", "ab\udcffc"], "--prompt 2: invalid UTF-8 at byte 2")
    f.write_text("Late at night, Zoe")
    assert main(["generate", "--prompt-file", str(f), "--max-new-tokens", "3"]) == 0
    assert "--- prompt: 'Late at night, Zoe'" in capsys.readouterr().out


def test_chat_without_a_template_says_so(capsys):
    one_line_error(capsys, ["generate", "--chat"], "has no chat template")


def test_tokenizer_byte_is_honoured_over_the_checkpoints(capsys):
    assert main(["generate", "--tokenizer", "byte", "--max-new-tokens", "2"]) == 0
    assert "prompt tokens 25 " in capsys.readouterr().out  # 24 UTF-8 bytes + BOS, not the BPE's 7


def test_stop_strings_and_seeds_in_generate(capsys):
    assert main(["generate", "--max-new-tokens", "40"]) == 0
    free = capsys.readouterr().out.split("\n--- prompt: ")[1].splitlines()[1]
    stop = free[12:16]
    assert main(["generate", "--max-new-tokens", "40", "--stop", stop]) == 0
    out = capsys.readouterr().out
    assert f"\n{free[:12]}\n[" in out and "finish: stop" in out
    assert main(["generate", "--temperature", "1", "--prompt", "a", "--prompt", "a", "--max-new-tokens", "8"]) == 0
    seeds = [line.split("seed ")[1].rstrip("]") for line in capsys.readouterr().out.splitlines() if ", seed " in line]
    assert len(seeds) == 2 and seeds[0] != seeds[1]


def test_help_gives_every_flag_a_default():
    from jaxinfer.cli import parser

    sub = parser()._subparsers._group_actions[0].choices
    for name, p in sub.items():
        for action in p._actions:
            if action.option_strings and action.nargs != 0:  # flags that take a value
                assert "default" in (action.help or ""), (name, action.option_strings)


def test_train_reference_models_help():
    proc = subprocess.run([sys.executable, "-m", "experiments.train_reference_models", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout and "Traceback" not in proc.stderr


def test_persistent_compilation_cache_is_written_and_reused(tmp_path):
    import os

    env = dict(os.environ, JAXINFER_COMPILATION_CACHE=str(tmp_path / "xla"))
    run = lambda: subprocess.run([sys.executable, "-m", "jaxinfer.cli", "generate", "--max-new-tokens", "4"],  # noqa: E731
                                 capture_output=True, text=True, timeout=300, env=env)
    first = run()
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in (tmp_path / "xla").iterdir())
    assert entries, "nothing was cached"
    second = run()
    assert second.returncode == 0 and sorted(p.name for p in (tmp_path / "xla").iterdir()) == entries


def test_a_checkpoint_without_tokenizer_files_runs_on_bytes(capsys, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(FIXTURES / "llama2", bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    assert main(["generate", "--model", str(bare), "--max-new-tokens", "2"]) == 0
    assert "prompt tokens 25 " in capsys.readouterr().out  # the byte tokenizer: 24 bytes + BOS
