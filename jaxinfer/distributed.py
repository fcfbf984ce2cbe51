"""Several processes, one engine, on jax.distributed.

Process 0 owns the scheduler. Each step it sends the packed plan (the layout and the two
buffers) to every other process through the coordinator's key-value store, then every process
dispatches the same jitted step over the global mesh, so the processes never diverge: the
plan is the step's only input that is not already on the devices. Tokens come back on process
0 (the step's outputs are replicated); the others only follow (`Engine.follow`).

    from jaxinfer import distributed
    distributed.initialize(cfg.distributed)   # before anything touches a device
    engine = Engine.from_config(cfg)           # every process, the same config
    if distributed.is_leader():
        ... engine.generate(...) ...; engine.close()
    else:
        engine.follow()                        # until process 0 closes the engine

A process that dies is found by the coordinator's heartbeats (`distributed.heartbeat_timeout_s`):
jax then ends every other process with an error naming the dead task; a follower whose leader
is gone fails on its next read of the store. Neither hangs.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import threading
import time

from jaxinfer.config import DistributedConfig

PREFIX = "jaxinfer/plan/"


class DistributedError(RuntimeError):
    """The job did not form, or a process was lost: the message says which and what to do."""

KEEP = 64  # messages kept in the store: steps are lockstep (each has collectives), so far more than enough


def settings(cfg: DistributedConfig) -> tuple[str | None, int, int | None]:
    """(coordinator, num_processes, process_id) from the config, else the environment."""
    num = cfg.num_processes if cfg.num_processes is not None else int(os.environ.get("JAX_NUM_PROCESSES", 1))
    pid = cfg.process_id if cfg.process_id is not None else (
        int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    return cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"), num, pid


def initialize(cfg: DistributedConfig) -> bool:
    """jax.distributed.initialize as the config says; False (and nothing done) for one process.
    Bad settings and a coordinator that does not answer within timeout_s raise one clear error."""
    import jax

    coordinator, num, pid = settings(cfg)
    if num == 1:
        return False
    if jax.distributed.is_initialized():
        return True
    if coordinator is None or not coordinator.rpartition(":")[2].isdigit():
        raise ValueError(f"distributed.num_processes={num} needs distributed.coordinator as host:port (process 0's "
                         f"address), or $JAX_COORDINATOR_ADDRESS; got {coordinator!r}")
    if pid is None or not 0 <= pid < num:
        raise ValueError(f"distributed.process_id={pid}: each of the {num} processes needs its own id in "
                         f"[0, {num - 1}] (distributed.process_id or $JAX_PROCESS_ID)")
    host, port = coordinator.rsplit(":", 1)
    if pid != 0:  # jax aborts the process (no Python error) when nothing answers: ask first
        _probe(host, int(port), cfg.timeout_s, f"process {pid} of {num}")
    # jax also aborts when the job does not form in time (a process missing, or one too many):
    # say why just before it does, in the process's own words.
    warn = threading.Timer(max(cfg.timeout_s - 1.0, 0.5 * cfg.timeout_s), lambda: print(
        f"jaxinfer.distributed: process {pid} of {num}: the job at {coordinator} has not formed after "
        f"{cfg.timeout_s} s (distributed.timeout_s): all {num} processes must start with the same "
        f"coordinator and num_processes and distinct process ids; jax ends this process now", file=sys.stderr,
        flush=True))
    warn.daemon = True
    warn.start()
    try:
        jax.distributed.initialize(coordinator, num, pid, initialization_timeout=cfg.timeout_s,
                                   heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    finally:
        warn.cancel()
    return True


def _probe(host: str, port: int, timeout_s: float, who: str) -> None:
    """Waits (up to timeout_s) for something to listen at host:port, else one clear DistributedError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"{who}: no distributed job formed at {host}:{port} within {timeout_s} s "
                    f"(distributed.timeout_s): nothing answers there ({e.strerror or e}); start process 0 "
                    f"with that coordinator address, or point distributed.coordinator at it") from None
            time.sleep(0.2)


def is_leader() -> bool:
    import jax

    return jax.process_index() == 0


def _client():
    from jax._src.distributed import global_state  # the coordinator's key-value store (as orbax uses it)

    return global_state.client


class PlanChannel:
    """Process 0 -> every other process: one numbered message per step (or control event)."""

    def __init__(self):
        self.client, self.count = _client(), 0

    def send(self, kind: str, *payload) -> None:
        self.client.key_value_set_bytes(f"{PREFIX}{self.count}", pickle.dumps((kind, payload)))
        if self.count >= KEEP:
            self.client.key_value_delete(f"{PREFIX}{self.count - KEEP}")
        self.count += 1

    def recv(self, poll_ms: int = 1000):
        """The next message (waits as long as process 0 is alive: a server idles between requests);
        DistributedError if the coordinator (process 0) is gone."""
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(f"{PREFIX}{self.count}", poll_ms)
            except Exception as e:  # noqa: BLE001 - a timeout is normal; anything else means process 0 is gone
                if "DEADLINE_EXCEEDED" in str(e):
                    continue
                import jax

                raise DistributedError(f"process {jax.process_index()}: lost process 0 (the coordinator) while waiting "
                                   f"for step message {self.count}: {str(e).strip().splitlines()[0][:200]}") from None
            self.count += 1
            return pickle.loads(data)
