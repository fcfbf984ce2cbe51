"""The experiments layer: YAML -> runs (sweeps, zips, variants; every bad input refused before
anything runs), results folders that resume, the roofline and cost formulas against hand counts,
reports and the README's generated blocks, and the reduced (--smoke) version of every experiment."""

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from jaxinfer.cli import main
from jaxinfer.config import ConfigError
from jaxinfer.experiment import report as rep
from jaxinfer.experiment import runner
from jaxinfer.experiment.spec import load_experiment
from jaxinfer.metrics import Footprint, Machine, goodput, run_bound, step_bound, usd_per_million

ROOT = Path(__file__).parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "configs/experiments").glob("*.yaml") if "experiment" in yaml.safe_load(p.read_text()))
TINY = {"name": "tiny", "vocab_size": 260, "hidden_size": 32, "num_layers": 1, "num_q_heads": 2, "num_kv_heads": 1,
        "head_dim": 16, "ffw_size": 64, "dtype": "float32"}


def write(tmp_path, experiment: dict, **sections) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"experiment": experiment, "model": TINY, "tokenizer": "byte",
                                    "bench": {"prompt_len": 4, "output_len": 3}} | sections))
    return path


def tiny_decode(**extra) -> dict:
    return {"kind": "decode", "repeats": 1, "bandwidth_mb": 4, "matmul_size": 64,
            "sweep": {"bench.num_requests": [1, 2]}} | extra


def test_runs_are_grid_times_zip_times_variants(tmp_path):
    exp = load_experiment(write(tmp_path, {"kind": "serve", "sweep": {"engine.page_size": [4, 8], "model.quant": ["none", "int8"]},
                                           "zip": {"bench.output_len": [3, 5], "bench.prompt_len": [4, 6]},
                                           "variants": {"a": {"engine.prefix_caching": True}, "b": {"engine.prefix_caching": False}}}))
    assert len(exp.runs) == 2 * 2 * 2 * 2
    assert len({r.run_id for r in exp.runs}) == 16
    run = next(r for r in exp.runs if r.labels == {"engine.page_size": 8, "model.quant": "int8", "bench.output_len": 5,
                                                   "bench.prompt_len": 6, "variant": "b"})
    assert (run.cfg.engine.page_size, run.cfg.model.quant, run.cfg.bench.output_len, run.cfg.bench.prompt_len,
            run.cfg.engine.prefix_caching) == (8, "int8", 5, 6, False)
    assert run.run_id == "b__page_size=8__quant=int8__output_len=5__prompt_len=6"


def test_smoke_and_command_line_overrides(tmp_path):
    path = write(tmp_path, tiny_decode(smoke={"experiment.sweep": {"bench.num_requests": [3]}, "bench.output_len": 2}))
    assert [r.cfg.bench.num_requests for r in load_experiment(path).runs] == [1, 2]
    smoke = load_experiment(path, ["experiment.repeats=2", "bench.prompt_len=5"], smoke=True)
    assert [(r.cfg.bench.num_requests, r.cfg.bench.output_len, r.cfg.bench.prompt_len) for r in smoke.runs] == [(3, 2, 5)]
    assert smoke.spec.repeats == 2
    swept = load_experiment(path, ["experiment.sweep.bench.num_requests=[4, 5]", "experiment.sweep.model.quant=[int8]"])
    assert [(r.cfg.bench.num_requests, r.cfg.model.quant) for r in swept.runs] == [(4, "int8"), (5, "int8")]
    with pytest.raises(ConfigError, match="'bench.num_request' is not a config key"):
        load_experiment(path, ["experiment.sweep.bench.num_request=[4]"])
    with pytest.raises(ConfigError, match="'bench.output_lenn' is not a config key"):
        load_experiment(write(tmp_path, tiny_decode(smoke={"bench.output_lenn": 2})), smoke=True)


@pytest.mark.parametrize("experiment, sections, match", [
    ({"kind": "decod"}, {}, r"experiment.kind='decod' is unknown.*did you mean 'decode'"),
    ({"kind": "decode", "sweep": {"engine.page_sise": [4]}}, {}, r"'engine.page_sise' is not a config key.*did you mean 'engine.page_size'"),
    ({"kind": "decode", "sweep": {"bench.num_requests": [1, "two"]}}, {}, r"bench.num_requests' expects int, got 'two'"),
    ({"kind": "decode", "sweep": {"bench.num_requests": []}}, {}, r"experiment.sweep.bench.num_requests: an empty list"),
    ({"kind": "decode", "zip": {"bench.prompt_len": [1, 2], "bench.output_len": [3]}}, {}, r"lists of different lengths"),
    ({"kind": "decode", "baseline": "plain", "variants": {"fast": {}}}, {}, r"baseline='plain' is not a variant"),
    ({"kind": "decode", "variants": {"x": {"model.quantt": "int8"}}}, {}, r"variants.x: 'model.quantt' is not a config key"),
    ({"kind": "decode", "repeat": 3}, {}, r"unknown key 'experiment.repeat'.*did you mean 'experiment.repeats'"),
    ({"kind": "decode"}, {"engine": {"page_size": 0}}, r"engine.page_size=0: must be >= 1"),
    ({"kind": "decode", "sweep": {"bench.num_requests": [1, 1]}}, {}, r"two runs share the folder name"),
    ({"kind": "decode", "peers": ["openvnio"]}, {}, r"'openvnio' is not a peer.*did you mean 'openvino'"),
    ({"kind": "serve", "peers": ["llama.cpp"]}, {}, r"only the decode kind times peers, not serve"),
])
def test_bad_experiments_are_refused_before_anything_runs(tmp_path, experiment, sections, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment(write(tmp_path, experiment, **sections))


def test_bad_input_is_one_line_from_the_command(tmp_path, capsys):
    assert main(["run", str(write(tmp_path, {"kind": "nope"})), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "experiment.kind='nope' is unknown" in err
    assert not (tmp_path / "r").exists()
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert main(["report", str(tmp_path)]) == 2 and "holds no experiment.json" in capsys.readouterr().err


def test_peers_without_their_environment_or_in_bfloat16_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "python"
    path = write(tmp_path, tiny_decode(peers=["openvino"], peer_python=str(missing)))
    assert main(["run", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "setup_peers.sh" in err
    path = write(tmp_path, tiny_decode(peers=["openvino"], peer_python=__import__("sys").executable),
                 model=TINY | {"dtype": "bfloat16"})
    assert main(["run", str(path), "--out", str(tmp_path / "r2")]) == 2
    assert "model.dtype=bfloat16" in capsys.readouterr().err


def test_results_folder_resumes_and_refuses_other_experiments(tmp_path, monkeypatch):
    from jaxinfer.experiment import kinds

    exp = load_experiment(write(tmp_path, tiny_decode()))
    out = tmp_path / "results"
    calls = []
    real = kinds.KINDS["decode"]

    def interrupted(run, ctx):  # the second run is interrupted (Ctrl-C) after the first finished
        calls.append(run.run_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run, ctx)

    monkeypatch.setitem(kinds.KINDS, "decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(exp, out, progress=False)
    first = out / exp.runs[0].run_id
    assert (first / "summary.json").is_file() and not (out / exp.runs[1].run_id / "summary.json").exists()
    stamp = (first / "summary.json").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setitem(kinds.KINDS, "decode", lambda run, ctx: (calls.append(run.run_id), real(run, ctx))[1])
    runner.run_experiment(exp, out, progress=False)
    assert calls == [exp.runs[1].run_id] and (first / "summary.json").stat().st_mtime_ns == stamp
    for name in ("config.yaml", "env.json", "requests.jsonl", "summary.json"):
        assert (first / name).is_file()
    env = json.loads((first / "env.json").read_text())
    for key in ("jax", "jaxlib", "flax", "libtpu", "device_kind", "num_devices", "platform", "xla_flags", "cpu",
                "git", "seed", "date", "machine"):
        assert key in env, key
    assert any(m.get("read_bytes_per_s", 0) > 0 for m in env["machine"]) and any("peak_flops_per_s" in m for m in env["machine"])

    changed = load_experiment(write(tmp_path, tiny_decode(), bench={"prompt_len": 5, "output_len": 3}))
    with pytest.raises(ConfigError, match="under another configuration.*--fresh"):
        runner.run_experiment(changed, out, progress=False)
    other = load_experiment(write(tmp_path, {"kind": "serve"}))
    with pytest.raises(ConfigError, match="holds experiment 'exp' \\(kind decode"):
        runner.check_folder(out, other.__class__(**{**other.__dict__, "name": "other"}), fresh=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an experiment's results"):
        runner.check_folder(tmp_path / "junk", exp, fresh=True)
    calls.clear()
    runner.run_experiment(changed, out, fresh=True, progress=False)
    assert len(calls) == 2


def test_step_bound_counts_embedding_rows_not_the_table():
    """A hand count: 1 layer of 1000 weights, a vocab 100 x hidden 10 embedding (untied, float32),
    KV of 8 bytes per position."""
    from jaxinfer.config import ModelConfig
    from jaxinfer.experiment.machine import footprint
    from jaxinfer.models import init_model

    cfg = ModelConfig(vocab_size=100, hidden_size=16, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8,
                      ffw_size=32, dtype="float32")
    for tied in (False, True):
        m = init_model(ModelConfig(**{**cfg.__dict__, "tie_embeddings": tied}))
        fp = footprint(m)
        table = 100 * 16 * 4
        assert fp.streamed_bytes == m.param_bytes - (0 if tied else table)  # a tied table is the LM head: read whole
        assert fp.embed_row_bytes == 16 * 4 and fp.kv_bytes_per_token == 1 * 2 * 1 * 8 * 4
        assert fp.head_params == 1600 and fp.layer_params == m.num_params - 1600 * (1 if tied else 2)
    fp = Footprint(streamed_bytes=4000, embed_row_bytes=40, kv_bytes_per_token=8, layer_params=1000, head_params=1000)
    b = step_bound(fp, Machine(read_bytes_per_s=1e6, peak_flops_per_s=1e6), tokens=3, rows=2, kv_tokens=50)
    assert b["bytes"] == 4000 + 3 * 40 + 50 * 8 and b["flops"] == 2 * 1000 * 3 + 2 * 1000 * 2
    assert b["binding"] == "compute" and b["bound_s"] == pytest.approx(10000 / 1e6)
    total = run_bound(fp, Machine(1e3, 1e9), [(1, 1, 10), (1, 1, 11)])
    assert total["binding"] == "memory" and total["bound_s"] == pytest.approx((4120 + 4128) / 1e3)


def test_cost_and_goodput_arithmetic():
    assert usd_per_million(1000.0, 3.6) == pytest.approx(1.0)  # $3.6/h = $0.001/s; 1M tokens take 1000 s
    assert usd_per_million(1000.0, 3.6, num_devices=4) == pytest.approx(4.0)
    assert math.isnan(usd_per_million(0.0, 1.0))

    class C:
        def __init__(self, times):
            self.error, self.arrival, self.scheduled, self.token_times = None, 0.0, 0.0, times

    done = [C([0.1, 0.2, 0.3]), C([0.1, 0.5]), C([2.0, 2.01])]  # meets both, TPOT 0.4 too slow, TTFT 2 too slow
    g = goodput(done, wall_s=2.0, slo_ttft_s=1.0, slo_tpot_s=0.2)
    assert g == {"goodput_req_s": 0.5, "slo_attainment": pytest.approx(1 / 3)}
    assert goodput(done, 2.0, 0.0, 0.0)["slo_attainment"] == 1.0


def test_static_batches_account_their_steps():
    from jaxinfer.static import StaticBatcher

    b = StaticBatcher.__new__(StaticBatcher)
    b.steps = []
    b._account([3, 5], num_new=4)  # one prefill, then 3 decode steps of both rows
    assert b.steps == [(8, 2, 8), (2, 2, 10), (2, 2, 12), (2, 2, 14)]


def test_report_table_baseline_and_readme_blocks(tmp_path):
    exp = load_experiment(write(tmp_path, tiny_decode(variants={"a": {}, "b": {"bench.output_len": 4}}, baseline="a",
                                                      plots=[{"x": "bench.num_requests", "y": "tok_s", "series": "variant",
                                                              "bounds": True}])))
    out = runner.run_experiment(exp, tmp_path / "res", progress=False)
    text = rep.report(out)
    lines = [x for x in rep.markdown(rep.load(out)).splitlines() if x.startswith("| ") and "---" not in x]
    assert "| num_requests | variant | decoder | $ / 1M tok here | h100 at bound |" in text  # the other devices' costs
    assert lines[0].startswith("| num_requests | variant | decoder | tok/s | bound tok/s | % of bound |")
    assert len(lines) == 1 + 4 and lines[0].endswith("| tok/s / a |")
    assert all(x.endswith("| 1.00x |") for x in lines[1:] if "| a |" in x)
    assert (out / "report.md").is_file() and (out / "exp.png").stat().st_size > 1000
    assert "jax " in text and "measured read" in text and "git " in text

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- report: res -->\nstale\n<!-- /report -->\nend\n")
    assert main(["report", "--readme", str(readme), "--check"]) == 1
    assert main(["report", "--readme", str(readme)]) == 0
    body = readme.read_text()
    assert "stale" not in body and "| num_requests | variant |" in body and "![exp](res/exp.png)" in body
    assert main(["report", "--readme", str(readme), "--check"]) == 0
    shutil.rmtree(out / exp.runs[0].run_id)
    assert main(["report", "--readme", str(readme), "--check"]) == 1  # a summary changed: the block is stale


def test_readme_report_blocks_match_the_committed_summaries():
    text = (ROOT / "README.md").read_text()
    assert rep.BLOCK.search(text), "the README has no generated report blocks"
    assert rep.readme_blocks(text, ROOT) == text, "run `jaxinfer report --readme README.md`"
    folders = [ROOT / m["path"] for m in rep.BLOCK.finditer(text)]
    folders = [f for f in folders if (f / "experiment.json").is_file()] + [
        sub for f in folders if not (f / "experiment.json").is_file() for sub in f.iterdir() if (sub / "experiment.json").is_file()]
    assert {f.name for f in folders} >= {p.stem for p in EXPERIMENTS}, "every experiment is published"
    for folder in folders:
        assert not rep.load(folder)["record"]["smoke"], folder


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_runs_reduced_and_reports(path, tmp_path):
    out = tmp_path / path.stem
    assert main(["run", str(path), "--smoke", "--out", str(out)]) == 0
    res = rep.load(out)
    assert res["missing"] == 0 and res["runs"]
    for run in res["runs"]:
        assert run["rows"], run["run_id"]
        for row in run["rows"]:
            if res["record"]["kind"] == "pods":  # predictions: XLA moves at least what a step needs
                assert row["fits"] and row["tok_s"] > 0 and row["bound"] in ("memory", "compute"), row
                assert row["gb_moved_chip"] >= row["min_gb_chip"] and row["floor_tok_s"] >= row["tok_s"], row
            elif res["record"]["kind"] != "compile":
                assert row["pct_of_bound"] > 0 and row["binding"] in ("memory", "compute"), row
                assert row["usd_per_1m"] > 0
    assert "| " in (out / "report.md").read_text()
