"""Several processes, one engine (jaxinfer.distributed): 2 processes x 4 CPU devices on 127.0.0.1
give the single-process 8-device tokens; a process that dies ends the others with an error; bad
settings fail fast. Every child has a hard timeout and is always reaped; this process never
initializes jax.distributed itself."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sharding import run_routed

from jaxinfer import distributed
from jaxinfer.config import DistributedConfig

WORKER = Path(__file__).parent / "distributed_worker.py"
TIMEOUT = 240  # seconds a multi-process run may take (it takes ~45 on 2 cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Children with their output in files (a full pipe would block them), killed on exit."""

    def __init__(self, tmp_path, argvs):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
        self.logs = [tmp_path / f"process{i}.log" for i in range(len(argvs))]
        self.procs = []
        for argv, log in zip(argvs, self.logs):
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT,
                                                   env=env, start_new_session=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def log(self, i) -> str:
        return self.logs[i].read_text()

    def wait(self, i, timeout=TIMEOUT) -> int:
        return self.procs[i].wait(timeout=timeout)

    def wait_for(self, i, text, timeout=TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while text not in self.log(i):
            assert self.procs[i].poll() is None, f"process {i} exited early:\n{self.log(i)[-3000:]}"
            assert time.monotonic() < end, f"process {i} never printed {text!r}:\n{self.log(i)[-3000:]}"
            time.sleep(0.2)


def workers(tmp_path, mesh, num_pages=32):
    port, out = free_port(), tmp_path / "tokens.json"
    argvs = [[str(WORKER), str(i), "2", str(port), *map(str, mesh), str(num_pages), str(out)] for i in range(2)]
    return Processes(tmp_path, argvs), out


def test_two_processes_give_the_single_process_tokens(tmp_path):
    """Data over the processes, model within each: the plan crosses processes every step; greedy
    and seeded sampling, prefix caching and preemption in the workload."""
    procs, out = workers(tmp_path, (2, 4))
    with procs:
        for i in range(2):
            assert procs.wait(i) == 0, procs.log(i)[-3000:]
    got = json.loads(out.read_text())
    want, _, e = run_routed((2, 4), 32)  # one process, 8 devices, the same mesh
    assert got["tokens"] == [c.tokens for c in want]
    assert got["errors"] == [None] * len(want)
    assert got["preemptions"] > 0 and got["cached"] > 0
    assert "followed" in procs.log(1)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_process_that_dies_ends_the_other_with_an_error(tmp_path, victim):
    procs, _ = workers(tmp_path, (1, 8))
    with procs:
        procs.wait_for(victim, "engine ready")
        os.killpg(procs.procs[victim].pid, signal.SIGKILL)
        t0 = time.monotonic()
        other = 1 - victim
        rc = procs.wait(other, timeout=60)  # heartbeat_timeout_s=10 in the worker; never a hang
        assert rc != 0, procs.log(other)[-3000:]
        assert time.monotonic() - t0 < 60
        text = procs.log(other)
        assert "another task died" in text or "lost process 0" in text or "unhealthy" in text, text[-3000:]


@pytest.mark.parametrize("pid,match", [
    (1, "process 1 of 2: no distributed job formed at 127.0.0.1:.* within 3 s.*nothing answers there"),
    (0, "process 0 of 2: the job at 127.0.0.1:.* has not formed after 3 s.*all 2 processes must start"),
])
def test_a_job_that_does_not_form_fails_within_the_timeout(tmp_path, pid, match):
    """Process 1 with no coordinator at the address; process 0 whose second process never comes
    (a mismatched process count): one clear message each, in bounded time."""
    code = ("from jaxinfer import distributed\nfrom jaxinfer.config import DistributedConfig\n"
            f"distributed.initialize(DistributedConfig('127.0.0.1:{free_port()}', 2, {pid}, timeout_s=3))")
    t0 = time.monotonic()
    with Processes(tmp_path, [["-c", code]]) as procs:
        assert procs.wait(0, timeout=60) != 0
    assert time.monotonic() - t0 < 60
    assert re.search(match, procs.log(0)), procs.log(0)[-2000:]


@pytest.mark.parametrize("cfg,match", [
    (DistributedConfig(None, 2, 0), "needs distributed.coordinator as host:port"),
    (DistributedConfig("127.0.0.1:1", 2, 2), r"process_id=2: each of the 2 processes needs its own id in \[0, 1\]"),
    (DistributedConfig("127.0.0.1:1", 2, None), "process_id=None"),
])
def test_bad_distributed_settings_say_what_is_wrong(cfg, match, monkeypatch):
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(cfg)


def test_one_process_needs_no_distributed_setup(monkeypatch):
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    assert distributed.initialize(DistributedConfig()) is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert distributed.settings(DistributedConfig(coordinator="h:1")) == ("h:1", 3, 2)
