"""The Grafana dashboard: the panels the issue asks for, laid out sanely, querying only exported metrics."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from support.k8s_validate import REPO_ROOT
from support.promql_check import (
    PROJECT_METRICS,
    dashboard_exprs,
    families_from_exposition,
    metric_names_in,
    series_names,
    unknown_metrics,
)

DASHBOARD_PATH = REPO_ROOT / "cluster" / "grafana" / "neuronsweep-dashboard.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


def _exprs_of(dashboard: dict, title: str) -> list[str]:
    exprs = [e for t, e in dashboard_exprs(dashboard) if t == title]
    assert exprs, f"no panel titled {title!r}"
    return exprs


# --- the PromQL name extraction -------------------------------------------------------------------------------
@pytest.mark.parametrize("expr,names", [
    ("up", {"up"}),
    ('sum(rate(a_total{status="done"}[5m])) * 60', {"a_total"}),
    ("histogram_quantile(0.95, sum by (le, role) (rate(h_bucket[$__rate_interval])))", {"h_bucket"}),
    ('sum by (role) (rate(r_total{status="429"}[1m])) / sum by (role) (rate(r_total[1m]))', {"r_total"}),
    ("sum(x) by (reason) / on(job) group_left(run) y offset 1h", {"x", "y"}),
    ('a{label="sum(b) or c"} and ignoring(z) d', {"a", "d"}),           # names inside strings are not metrics
    ("1e3 * m:recorded:rate5m - 0.5", {"m:recorded:rate5m"}),           # numbers are not names
    ("max_over_time(g[10m:1m]) > bool 2", {"g"}),                        # subquery; `bool` is a keyword
])
def test_metric_names_in(expr, names):
    assert metric_names_in(expr) == names


@given(st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True).filter(
    lambda n: n not in {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                        "bool", "offset", "inf", "nan", "atan2"}),
    st.sampled_from(["sum", "max", "avg"]), st.sampled_from(["1m", "5m", "$__rate_interval"]))
def test_a_metric_wrapped_in_functions_is_found_alone(name, agg, window):
    expr = f'{agg} by (role, le) (rate({name}{{status=~"ok|429"}}[{window}])) * 60'
    assert metric_names_in(expr) == {name}


def test_series_names_of_each_type():
    assert series_names({"c": "counter", "d_total": "counter", "g": "gauge", "h": "histogram",
                         "s": "summary"}) == {"c_total", "d_total", "g", "h_bucket", "h_sum", "h_count",
                                              "s", "s_sum", "s_count"}


def test_families_from_a_real_exposition():
    registry = CollectorRegistry()
    Counter("x_requests", "", ["status"], registry=registry)           # no children yet: still announced
    Gauge("x_eta_seconds", "", registry=registry)
    Histogram("x_latency_seconds", "", registry=registry)
    families = families_from_exposition(generate_latest(registry).decode())
    assert families == {"x_requests": "counter", "x_eta_seconds": "gauge", "x_latency_seconds": "histogram",
                        "x_latency_seconds_created": "gauge"}    # the text format's separate _created gauge
    assert "x_requests_total" in series_names(families)


# --- the dashboard ----------------------------------------------------------------------------------------------
def test_every_query_reads_only_exported_metrics(dashboard):
    assert unknown_metrics(dashboard, series_names(PROJECT_METRICS)) == {}


def test_the_check_names_the_panel_of_an_unexported_metric(dashboard):
    exported = series_names(PROJECT_METRICS) - {"neuronsweep_eta_seconds"}
    assert unknown_metrics(dashboard, exported) == {"ETA": {"neuronsweep_eta_seconds"}}


def test_catalogue_is_derived_from_the_driver_metrics():
    assert PROJECT_METRICS["neuronsweep_neurons_total"] == "counter"
    assert PROJECT_METRICS["neuronsweep_api_request_duration_seconds"] == "histogram"
    assert PROJECT_METRICS["neuronsweep_eta_seconds"] == "gauge"
    assert len(PROJECT_METRICS) == 17


def test_the_panels_the_issue_asks_for(dashboard):
    def one(title: str) -> str:
        return " ".join(_exprs_of(dashboard, title))
    assert 'neuronsweep_neurons_total{status="done"}' in one("Neurons done per minute")
    assert "* 60" in one("Neurons done per minute")
    assert "neuronsweep_eta_seconds" in one("ETA")
    tokens = one("Tokens per minute vs configured limit")
    assert "neuronsweep_api_tokens_total" in tokens and "neuronsweep_api_tokens_per_minute_limit" in tokens
    assert "by (role, status)" in one("Requests by status")
    assert 'status="429"' in one("429 rate")
    latency = _exprs_of(dashboard, "API latency p50 / p95 / p99")
    assert [e.split(",")[0] for e in latency] == [f"histogram_quantile({q}" for q in ("0.5", "0.95", "0.99")]
    assert "neuronsweep_estimated_cost_dollars_total" in one("Estimated cost")
    assert "by (actor)" in one("Extraction tokens/s per GPU")
    assert "by (reason)" in one("Failures by reason")


def test_layout_ids_and_datasource(dashboard):
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cover = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cover & cells, f"{p['title']} overlaps another panel"
        cells |= cover
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs) and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    (variable,) = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
