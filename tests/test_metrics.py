"""Metric definitions on hand-made timelines, and `jaxinfer bench` end to end on a tiny model."""

import json

import numpy as np
import pytest

from jaxinfer.bench import workload
from jaxinfer.cli import main
from jaxinfer.config import BenchConfig
from jaxinfer.engine import Completion
from jaxinfer.config import preset_path
from jaxinfer.metrics import format_table, request_latencies, summarize

RANDOM = str(preset_path("random"))


def completion(arrival, scheduled, times, prompt=4, cached=0):
    return Completion("r", [1] * prompt, [7] * len(times), None, "length", None, None, arrival, scheduled,
                      list(times), cached, 0)


def test_latency_definitions():
    lat = request_latencies(completion(1.0, 1.5, [2.0, 2.5, 3.5]))
    assert lat["ttft"] == 1.0 and lat["e2e"] == 2.5 and lat["queue"] == 0.5
    assert lat["tpot"] == 0.75  # (3.5 - 2.0) / (3 - 1): the first token excluded
    assert lat["itl"] == [0.5, 1.0]
    one = request_latencies(completion(0.0, 0.0, [1.0]))
    assert np.isnan(one["tpot"]) and one["itl"] == []


def test_summary_throughput_and_hit_rate():
    cs = [completion(0.0, 0.0, [1.0, 2.0], prompt=10, cached=4), completion(1.0, 1.0, [3.0, 4.0], prompt=10)]
    s = summarize(cs)
    assert s["wall_s"] == 4.0 and s["output_tokens"] == 4 and s["input_tokens"] == 20
    assert s["throughput_output_tok_s"] == 1.0 and s["throughput_total_tok_s"] == 6.0
    assert s["prefix_cache_hit_rate"] == 0.2
    assert s["ttft_s"]["p50"] == 1.5 and s["ttft_s"]["mean"] == 1.5
    assert "output tok/s" in format_table({"x": s})


def test_workload_is_deterministic_with_shared_prefix_and_poisson_arrivals():
    b = BenchConfig(num_requests=6, prompt_len=5, prompt_len_max=9, output_len=3, output_len_max=7,
                    shared_prefix_len=4, arrival_rate=10.0, seed=1)
    w1, w2 = workload(b, 100), workload(b, 100)
    assert w1 == w2
    assert all(p[:4] == w1[0][0][:4] and 9 <= len(p) <= 13 for p, _, _ in w1)
    assert all(3 <= s.max_new_tokens <= 7 for _, s, _ in w1)
    arrivals = [a for _, _, a in w1]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals) and arrivals[-1] > 0


def test_bench_command_runs_every_mode_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--num-requests", "4", "--prompt-len", "12", "--output-len", "6",
            "--compare", "continuous,static,sequential", "--out", str(out), "--config", RANDOM, "model.num_layers=1",
            "engine.max_model_len=64", "engine.page_size=8"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"continuous", "static", "sequential"}
    for r in report["results"].values():
        assert r["num_errors"] == 0 and r["output_tokens"] == 24
    assert report["config"]["model"]["num_layers"] == 1 and "jax" in report["env"]
    assert "TTFT p50 ms" in capsys.readouterr().out


def test_bench_rejects_unknown_mode(capsys):
    assert main(["bench", "--compare", "continuous,turbo"]) == 2
    assert "bench mode 'turbo' is unknown" in capsys.readouterr().err


def test_speculation_metrics():
    a, b = completion(0.0, 0.0, [1.0] * 9), completion(0.0, 0.0, [1.0] * 5)
    a.num_verify_steps, a.num_proposed, a.num_accepted, a.accepted_at = 3, 9, 6, [3, 2, 1]
    b.num_verify_steps, b.num_proposed, b.num_accepted, b.accepted_at = 1, 3, 0, [0, 0, 0]
    s = summarize([a, b, completion(0.0, 0.0, [1.0])])  # the third never verified: left out
    assert s["spec_acceptance_rate"] == 6 / 12 and s["spec_mean_accepted_length"] == (6 + 4) / 4
    assert s["spec_acceptance_by_position"] == [3 / 4, 2 / 4, 1 / 4]
    assert s["spec_per_token_acceptance"] == 6 / (6 + 4 - 1)  # 6 kept; 3 of 4 steps ended on a rejection
    assert "tokens / verify step" in format_table({"draft": s})
    assert "spec_acceptance_rate" not in summarize([completion(0.0, 0.0, [1.0])])


def test_bench_command_with_a_draft_model_reports_acceptance(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--num-requests", "2", "--prompt-len", "8", "--output-len", "8", "--compare", "continuous",
            "--out", str(out), "engine.speculative.method=draft", "engine.speculative.num_speculative_tokens=2",
            "engine.max_model_len=64", "engine.decode_row_buckets=[0,2]", "engine.prefill_row_buckets=[0,2]",
            "engine.chunk_buckets=[16]", "engine.fixed_table_width=true"]
    assert main(argv) == 0
    r = json.loads(out.read_text())["results"]["continuous"]
    assert r["output_tokens"] == 16 and r["spec_verify_steps"] > 0 and 0 <= r["spec_acceptance_rate"] <= 1
    printed = capsys.readouterr().out
    assert "speculative draft, k=2" in printed and "drafts accepted" in printed
