"""The Prometheus scrape target of the real-Prometheus tests (test_prometheus.py): the driver endpoint of a real
sweep (the `live_sweep` fixture in conftest.py), once all its shards are committed, so the values the tests
compare stay put while they read them."""
from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def metrics_target_url(live_sweep) -> Iterator[str]:
    live_sweep.wait_finished()
    yield live_sweep.url
