"""One process of the multi-process tests (tests/test_distributed.py launches them):

    python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT DATA MODEL NUM_PAGES OUT

4 CPU devices per process; process 0 drives test_sharding's workload on the global mesh and
writes its tokens to OUT (JSON); the others follow until it closes the engine."""

import json
import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxinfer import distributed  # noqa: E402
from jaxinfer.config import DistributedConfig  # noqa: E402


def main(pid, num, port, data, model, num_pages, out):
    distributed.initialize(DistributedConfig(f"127.0.0.1:{port}", int(num), int(pid), timeout_s=60,
                                             heartbeat_timeout_s=10))
    import test_sharding

    e = test_sharding.dp_engine((int(data), int(model)), int(num_pages))
    print(f"process {pid}: engine ready", flush=True)
    if distributed.is_leader():
        done, _ = test_sharding.drive(e)
        e.close()
        with open(out, "w") as f:
            json.dump({"tokens": [c.tokens for c in done], "errors": [c.error for c in done],
                       "preemptions": e.scheduler.num_preemptions,
                       "cached": sum(c.num_cached_tokens for c in done)}, f)
    else:
        print(f"process {pid}: followed {e.follow()} steps", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
