"""Prometheus metrics the driver serves (prometheus-client), in base units, with bounded labels only.

Actors do not export these themselves: each shard's summary carries its call statistics back to the driver,
which counts them here, so one scrape of the driver sees the whole sweep (and Ray's own per-node endpoint
covers the actors' processes). No label ever holds a neuron or shard id.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from schemas.failures import FAILURE_REASONS

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60)


class SweepMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        api = ["role", "provider", "model"]
        self.neurons_planned = Gauge("neuronsweep_neurons_planned", "Neurons in the plan", registry=r)
        self.neurons = Counter("neuronsweep_neurons", "Neurons finished, by outcome", ["status"], registry=r)
        self.shards_planned = Gauge("neuronsweep_shards_planned", "Shards in the plan", registry=r)
        self.shards_committed = Counter("neuronsweep_shards_committed", "Shards committed", registry=r)
        self.api_requests = Counter("neuronsweep_api_requests", "LLM API requests by outcome",
                                    api + ["status"], registry=r)
        self.api_tokens = Counter("neuronsweep_api_tokens", "LLM tokens by kind", api + ["kind"], registry=r)
        self.api_latency = Histogram("neuronsweep_api_request_duration_seconds", "LLM request latency",
                                     ["role"], buckets=LATENCY_BUCKETS, registry=r)
        self.limiter_wait = Histogram("neuronsweep_ratelimit_wait_seconds", "Time waiting for the rate limiter",
                                      ["role"], buckets=WAIT_BUCKETS, registry=r)
        self.tpm_limit = Gauge("neuronsweep_api_tokens_per_minute_limit", "Configured tokens/min", api, registry=r)
        self.rpm_limit = Gauge("neuronsweep_api_requests_per_minute_limit", "Configured requests/min", api,
                               registry=r)
        self.cost = Counter("neuronsweep_estimated_cost_dollars", "Estimated API spend", registry=r)
        self.extract_tokens = Counter("neuronsweep_extract_tokens", "Corpus tokens run through the subject model",
                                      registry=r)
        self.extract_rate = Gauge("neuronsweep_extract_tokens_per_second", "Extraction throughput per actor",
                                  ["actor"], registry=r)
        self.queue_depth = Gauge("neuronsweep_queue_depth", "Work waiting or in flight", ["queue"], registry=r)
        self.eta = Gauge("neuronsweep_eta_seconds", "Estimated seconds until the plan is done", registry=r)
        self.failures = Counter("neuronsweep_neuron_failures", "Failed neurons by reason", ["reason"], registry=r)
        self.build_info = Gauge("neuronsweep_build_info", "Version and run of this driver", ["version", "run"],
                                registry=r)
        for reason in FAILURE_REASONS:  # so rate() works from the first failure on
            self.failures.labels(reason)
        for status in ("done", "failed", "skipped"):
            self.neurons.labels(status)

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Start the HTTP endpoint on `addr` (config `metrics_host`); returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)


def metric_catalogue() -> dict[str, str]:
    """Every driver metric as Prometheus stores it (counters with `_total`) -> its type, derived from the
    definitions above, so the dashboard checks never drift from what the driver exports."""
    return {f.name + ("_total" if f.type == "counter" else ""): f.type for f in SweepMetrics().registry.collect()}

