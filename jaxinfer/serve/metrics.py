"""GET /metrics: Prometheus text from one registry per server (prometheus_client). Gauges and
engine-wide counters are read from the engine at scrape time; per-request histograms and counters
are fed as each request finishes (definitions: jaxinfer.metrics)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxinfer.metrics import request_latencies

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineState:
    """Running/waiting requests, KV pages and preemptions, read when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.scheduler
        yield GaugeMetricFamily("jaxinfer_requests_running", "requests holding KV pages", value=len(s.running))
        yield GaugeMetricFamily("jaxinfer_requests_waiting", "requests queued for admission", value=len(s.waiting))
        yield GaugeMetricFamily("jaxinfer_kv_pages_used", "KV pages with a reference",
                                value=int((s.alloc.refcount > 0).sum()))
        yield GaugeMetricFamily("jaxinfer_kv_pages_total", "KV pages in the cache", value=s.alloc.num_pages)
        yield CounterMetricFamily("jaxinfer_preemptions", "requests preempted by recompute", value=s.num_preemptions)


class ServerMetrics:
    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        r.register(_EngineState(engine))
        self.requests = Counter("jaxinfer_requests_finished", "finished requests by finish reason", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter("jaxinfer_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated = Counter("jaxinfer_generation_tokens", "tokens generated", registry=r)
        self.cached = Counter("jaxinfer_prefix_cache_hit_tokens", "prompt tokens served by the prefix cache",
                              registry=r)
        self.proposed = Counter("jaxinfer_spec_proposed_tokens", "speculative drafts verified", registry=r)
        self.accepted = Counter("jaxinfer_spec_accepted_tokens", "speculative drafts accepted", registry=r)
        self.ttft = Histogram("jaxinfer_ttft_seconds", "time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("jaxinfer_tpot_seconds", "time per output token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("jaxinfer_e2e_seconds", "arrival to last token", buckets=LATENCY_BUCKETS, registry=r)

    def finished(self, c) -> None:
        """Called on the engine thread with each finished Completion."""
        self.requests.labels(c.finish_reason).inc()
        self.prompt_tokens.inc(len(c.prompt_tokens))
        self.generated.inc(len(c.tokens))
        self.cached.inc(c.num_cached_tokens)
        self.proposed.inc(c.num_proposed)
        self.accepted.inc(c.num_accepted)
        lat = request_latencies(c)
        for hist, key in ((self.ttft, "ttft"), (self.tpot, "tpot"), (self.e2e, "e2e")):
            if not math.isnan(lat[key]):
                hist.observe(lat[key])

    def text(self) -> bytes:
        return generate_latest(self.registry)
