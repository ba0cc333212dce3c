"""A Prometheus scrape target exposing the project's metrics, for the dashboard and real-Prometheus tests.

`metrics_target_url` is the fixture both tests use. Today it serves, with prometheus-client on loopback, the
driver's own metrics (orchestrator.metrics.SweepMetrics) holding the values of a small finished sweep; to test
against a real sweep instead, override this fixture (e.g. in conftest.py) to run one and yield its `http://127.0.0.1:<metrics_port>/metrics`.
Tests read expected values from the target itself, so they hold for either.
"""
from __future__ import annotations

from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from orchestrator.metrics import SweepMetrics


def small_sweep_registry() -> CollectorRegistry:
    """The driver's metrics (orchestrator.metrics), holding what an 8-neuron, 2-shard sweep with one failure
    leaves behind."""
    m = SweepMetrics()
    m.neurons_planned.set(8)
    m.shards_planned.set(2)
    m.neurons.labels(status="done").inc(7)
    m.neurons.labels(status="failed").inc(1)
    m.failures.labels(reason="malformed").inc(1)
    m.shards_committed.inc(2)
    for role, calls in (("explainer", 8), ("simulator", 14)):
        backend = dict(role=role, provider="openai", model="gpt-4o-mini")
        m.api_requests.labels(**backend, status="ok").inc(calls)
        m.api_requests.labels(**backend, status="429").inc(1)
        m.api_tokens.labels(**backend, kind="prompt").inc(900 * calls)
        m.api_tokens.labels(**backend, kind="completion").inc(40 * calls)
        m.tpm_limit.labels(**backend).set(2_000_000)
        m.rpm_limit.labels(**backend).set(5000)
        for seconds in (0.4, 0.9, 2.5):
            m.api_latency.labels(role=role).observe(seconds)
        m.limiter_wait.labels(role=role).observe(0.05)
    m.cost.inc(0.0123)
    m.extract_tokens.inc(128_000)
    m.extract_rate.labels(actor="0").set(5300.0)
    m.queue_depth.labels(queue="extract").set(0)
    m.queue_depth.labels(queue="explain").set(0)
    m.eta.set(0)
    m.build_info.labels(version="0.1.0", run="runs/test").set(1)
    return m.registry


@pytest.fixture(scope="module")
def metrics_target_url() -> Iterator[str]:
    server, thread = start_http_server(0, addr="127.0.0.1", registry=small_sweep_registry())
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
