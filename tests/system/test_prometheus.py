"""A real Prometheus server (Debian's `prometheus` package) scrapes the project's metrics with the shipped
cluster/prometheus.yml, and its HTTP API returns the progress series and evaluates every dashboard query.

`make test` and CI install the server (`scripts/system-deps.sh`) and fail when it is missing; a plain `pytest`
skips these tests then (see tests/support/system_tools.py).
"""
from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.k8s_validate import REPO_ROOT
from support.live_sweep import SHIPPED_PROMETHEUS_CONFIG
from support.localnet import scrape
from support.metrics_target import metrics_target_url  # noqa: F401  (fixture)
from support.promql_check import dashboard_exprs, families_from_exposition, series_names, unknown_metrics
from support.system_tools import require_tool

DASHBOARD = REPO_ROOT / "cluster" / "grafana" / "neuronsweep-dashboard.json"


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return require_tool("prometheus")


@pytest.fixture(scope="module")
def prometheus_url(prometheus_binary, live_sweep) -> Iterator[str]:
    """The Prometheus server that the live sweep fixture started before the sweep, so it watched it run."""
    assert live_sweep.prometheus_url, "the live sweep found no prometheus binary"
    wait_for(lambda: _ready(live_sweep.prometheus_url, live_sweep.prometheus), timeout=30,
             what=lambda: f"Prometheus ready; log:\n{live_sweep.prometheus_log()[-2000:]}")
    yield live_sweep.prometheus_url


def _ready(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"prometheus exited with code {proc.returncode}")
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def wait_for(check: Callable[[], Any], timeout: float, what: Callable[[], str] | str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(0.25)


def query(prometheus_url: str, promql: str) -> dict[str, Any]:
    """The `data` of an instant query; raises AssertionError with Prometheus's error for a bad query."""
    q = urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(f"{prometheus_url}/api/v1/query?{q}", timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    assert body["status"] == "success", f"{promql}: {body.get('errorType')}: {body.get('error')}"
    return body["data"]


# --- tests -----------------------------------------------------------------------------------------------------
def test_prometheus_returns_the_progress_series(prometheus_url, metrics_target_url):  # noqa: F811
    expected = scrape(metrics_target_url)[("neuronsweep_neurons_total", frozenset({("status", "done")}))]
    assert expected > 0
    promql = 'neuronsweep_neurons_total{job="neuronsweep-driver", status="done"}'

    def final_value_seen():
        result = query(prometheus_url, promql)["result"]
        return result if result and float(result[0]["value"][1]) == expected else None
    (series,) = wait_for(final_value_seen, timeout=30, what=f"{promql} == {expected}")
    assert series["metric"]["__name__"] == "neuronsweep_neurons_total"


def test_prometheus_watched_the_sweep_progress(prometheus_url, metrics_target_url):  # noqa: F811
    """Scraped while the sweep ran: the series took several increasing values, not just the final one."""
    promql = 'neuronsweep_neurons_total{job="neuronsweep-driver", status="done"}[10m]'
    result = wait_for(lambda: query(prometheus_url, promql)["result"], timeout=30, what=promql)
    values = [float(v) for _, v in result[0]["values"]]
    assert values == sorted(values) and len(set(values)) >= 3, values


def test_both_shipped_scrape_jobs_are_up(prometheus_url):
    def up_jobs() -> set[str]:
        return {s["metric"]["job"] for s in query(prometheus_url, "up == 1")["result"]}
    assert wait_for(lambda: up_jobs() >= {"neuronsweep-driver", "ray"} and up_jobs(), timeout=30,
                    what="both scrape jobs up") == {"neuronsweep-driver", "ray"}


def test_every_dashboard_query_is_valid_promql_and_progress_evaluates(prometheus_url, metrics_target_url):  # noqa: F811
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [(title, expr.replace("$__rate_interval", "1m")) for title, expr in dashboard_exprs(dashboard)]
    assert len(exprs) >= 9
    for _, expr in exprs:
        query(prometheus_url, expr)                      # raises with Prometheus's parse error
    samples = scrape(metrics_target_url)
    finished = sum(v for (name, _), v in samples.items() if name == "neuronsweep_neurons_total")
    planned = samples[("neuronsweep_neurons_planned", frozenset())]
    (progress,) = [e for t, e in exprs if t == "Progress"]
    wait_for(lambda: query(prometheus_url, 'up{job="ray"} == 1')["result"], timeout=30, what="ray job up")
    # the sweep has finished, but Prometheus's last scrape (one a second) may predate its last commit
    seen: list[float] = []

    def final_progress() -> bool:
        seen[:] = [float(r["value"][1]) for r in query(prometheus_url, progress)["result"]]
        return bool(seen) and seen[0] == pytest.approx(finished / planned)
    wait_for(final_progress, timeout=30, what=lambda: f"{progress} == {finished / planned} (last seen {seen})")


def test_every_dashboard_query_reads_metrics_of_a_live_scrape(metrics_target_url):  # noqa: F811
    """The dashboard's queries name only series the running sweep's endpoint exports (the static catalogue
    check is in test_dashboard.py; this one reads a real scrape)."""
    dashboard = json.loads(DASHBOARD.read_text())
    with urllib.request.urlopen(metrics_target_url, timeout=10) as response:
        exported = series_names(families_from_exposition(response.read().decode()))
    assert unknown_metrics(dashboard, exported) == {}


def test_promtool_accepts_the_shipped_config():
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "config", str(SHIPPED_PROMETHEUS_CONFIG)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
