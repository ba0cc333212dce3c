"""The driver's metrics endpoint binds the loopback address unless the config names another (`metrics_host`)."""
from __future__ import annotations

import urllib.request

from orchestrator.metrics import SweepMetrics
from schemas.config import SweepConfig
from support.localnet import free_port


def test_metrics_bind_the_loopback_address_by_default():
    assert SweepConfig().metrics_host == "127.0.0.1"
    port = free_port()
    server, _ = SweepMetrics().serve(port)
    try:
        assert server.server_address[:2] == ("127.0.0.1", port)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "neuronsweep_neurons_planned" in body
    finally:
        server.shutdown()


def test_metrics_bind_the_configured_address():
    cfg = SweepConfig.from_dict({"metrics_host": "0.0.0.0"})
    server, _ = SweepMetrics().serve(free_port(), cfg.metrics_host)
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        server.shutdown()
