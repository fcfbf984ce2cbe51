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
