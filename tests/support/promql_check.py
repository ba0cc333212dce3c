"""Which metric names a PromQL expression reads, and which series names a set of metric families exports.

The Grafana dashboard must only query series the project exports. `series_names` turns metric families
(name, type) -- from the static catalogue below, or parsed from a live /metrics scrape -- into the exact series
names Prometheus stores; `metric_names_in` pulls the metric names out of a PromQL expression; `unknown_metrics`
joins the two over a dashboard.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from prometheus_client.parser import text_string_to_metric_families

from orchestrator.metrics import metric_catalogue

# The driver's metrics as the orchestrator defines them (counters written with their `_total`).
PROJECT_METRICS: dict[str, str] = metric_catalogue()

_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def series_names(families: dict[str, str]) -> set[str]:
    """{family name: type} -> the series names Prometheus stores for them.

    Counters may be named with or without `_total` (prometheus-client's parser strips it; the catalogue keeps
    it); their series always carry it. `_created` series are left out: dashboards have no use for them."""
    names = set()
    for name, kind in families.items():
        if kind == "counter":
            names.add(name if name.endswith("_total") else name + "_total")
        else:
            names.update(name + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    return names


def families_from_exposition(text: str) -> dict[str, str]:
    """{family name: type} from a Prometheus text exposition (what GET /metrics returns)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


# --- PromQL ---------------------------------------------------------------------------------------------------
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan", "atan2"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed in ranges).

    >>> sorted(metric_names_in('sum by (le) (rate(a_bucket{x="rate(b)"}[5m])) / on(job) c offset 1h'))
    ['a_bucket', 'c']
    """
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)             # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)            # range and subquery selectors
    text = _GROUPING.sub(" ", text)                    # label lists of by/without/on/group_left ...
    text = re.sub(r"\boffset\s+-?\w+", " ", text)      # offset 5m
    text = re.sub(r"\$\{?\w+\}?", " ", text)           # stray Grafana variables
    names = set()
    for match in _IDENT.finditer(text):
        word, is_call = match.group(1), match.group(2)
        if is_call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_exprs(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel, rows included."""
    def panels(items: Iterable[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))
    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel.get("title", ""), target["expr"]


def unknown_metrics(dashboard: dict, exported: set[str]) -> dict[str, set[str]]:
    """{panel title: metric names it queries that are not in `exported`}; {} when every query is covered."""
    missing: dict[str, set[str]] = {}
    for title, expr in dashboard_exprs(dashboard):
        unknown = metric_names_in(expr) - exported
        if unknown:
            missing.setdefault(title, set()).update(unknown)
    return missing
