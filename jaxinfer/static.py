"""The static-batching baseline: a dense cache reserved for the maximum length (`reserve_len`; the
engine's max_model_len in `jaxinfer bench`), and a batch that returns when its slowest member is
done. `max_batch=1` without a reservation is "one by one through generate()".

Per-token times: the while_loop reports none, so token i is stamped at the prefill end plus i
decode steps of the batch's measured mean step time; the last token is stamped when the batch
returns (that is when the caller gets it), so E2E includes waiting for the slowest member.
"""

from __future__ import annotations

import time

from jaxinfer.config import DecodeConfig, SamplingConfig
from jaxinfer.engine import Completion
from jaxinfer.generate import Generator
from jaxinfer.models import Model


class StaticBatcher:
    def __init__(self, model: Model, max_batch: int, decode: DecodeConfig = DecodeConfig(),
                 reserve_len: int | None = None, clock=time.perf_counter):
        self.gen = Generator(model, decode, reserve_len)
        self.max_batch, self.clock = max_batch, clock
        self.steps: list[tuple[int, int, int]] = []  # (tokens, rows, live kv tokens) per step, for the roofline

    def run(self, requests: list[tuple[list[int], SamplingConfig, float]], stop_ids=(), progress=None) -> list[Completion]:
        """requests: (prompt ids, sampling, absolute arrival time), served in arrival order; a batch
        starts when it is full (or no request is left) and its last member has arrived."""
        order = sorted(range(len(requests)), key=lambda i: requests[i][2])
        out: list[Completion | None] = [None] * len(requests)
        for b in range(0, len(order), self.max_batch):
            idx = order[b:b + self.max_batch]
            wait = max(requests[i][2] for i in idx) - self.clock()
            if wait > 0:
                time.sleep(wait)
            start = self.clock()
            res = self.gen.generate([requests[i][0] for i in idx], [requests[i][1] for i in idx], stop_ids)
            end = self.clock()
            t = res.timing
            self._account([len(requests[i][0]) for i in idx], max(len(x) for x in res.tokens))
            first = start + t.prefill_s
            per_step = t.decode_s / max(max(len(x) for x in res.tokens) - 1, 1)
            for j, i in enumerate(idx):
                toks = res.tokens[j]
                times = [first + k * per_step for k in range(len(toks))]
                times[-1] = end
                prompt, sampling, arrival = requests[i]
                out[i] = Completion(str(i), prompt, toks, None, res.finish_reasons[j],
                                    res.logprobs[j] if res.logprobs else None, None, arrival, start, times, 0, 0, res.seeds[j])
            if progress is not None:
                progress.update(len(idx))
        return out

    def _account(self, prompt_lens: list[int], num_new: int) -> None:
        """The steps a batch ran: one prefill over the prompts, then num_new - 1 decode steps of every
        row (a static batch steps its finished rows too, until the slowest is done)."""
        total = sum(prompt_lens)
        self.steps.append((total, len(prompt_lens), total))
        self.steps += [(len(prompt_lens), len(prompt_lens), total + len(prompt_lens) * (i + 1)) for i in range(num_new - 1)]
