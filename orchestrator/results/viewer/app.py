"""The neuron viewer: a FastAPI app over one run directory (`neuronsweep view RUN`).

Pages (server-rendered with Jinja2; charts drawn by the vendored Chart.js, so it works with no internet):
    /                       the neuron index: filter by layer, status and score range, search explanations, sort, pages
    /neuron/{layer}/{n}     explanations, scores, stats, and every record as a token heat map; a neuron's
                            negative side (docs/method.md §1 "Both signs") in a section of its own
    /run                    progress, score histogram, mean score by layer, tokens and cost
    /api/neurons, /api/neuron/{layer}/{n}, /api/run     the same data as JSON

The app reads through `RunReader`, which re-reads only new files, so it can be left open on a running sweep.
Heat map cells carry their values (`data-act` for true activations, `data-sim` for simulated ones) so a test
or a script can read them back from the page.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from orchestrator.results.index import SORTABLE, query_index
from orchestrator.results.reader import RunReader
from orchestrator.store import RunStore
from orchestrator.units import noun, recorded_source, unit_label, units_line
from schemas.tables import LAYER, NEURON

HERE = Path(__file__).parent
PAGE_SIZE = 50
HISTOGRAM_BINS = np.linspace(-1.0, 1.0, 21)
# the largest layer and neuron numbers the tables can hold: a larger one in a URL names no neuron (404)
MAX_LAYER = int(np.iinfo(LAYER.type.to_pandas_dtype()).max)
MAX_NEURON = int(np.iinfo(NEURON.type.to_pandas_dtype()).max)


def _num(x) -> str:
    """A number for a data attribute: exact (Python's shortest round-trip repr), 'nan' for NaN/None."""
    if x is None:
        return "nan"
    x = float(x)
    return "nan" if math.isnan(x) else repr(x)


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _show_token(tok: str) -> str:
    """Whitespace made visible the way the prompts show it (a newline is ⏎, a tab →)."""
    return tok.replace("\n", "⏎").replace("\t", "→").replace("\r", "␍")


def heat(value, vmax: float, rgb: str = "34, 139, 34", sign: float = 1.0) -> str:
    """Background colour for a value on a 0..vmax scale (values <= 0 stay white); with `sign` -1, for minus the
    value (a negative activation on a bottom record)."""
    if value is None or vmax <= 0 or math.isnan(float(value)):
        return "transparent"
    a = max(0.0, min(1.0, sign * float(value) / vmax))
    return f"rgba({rgb}, {a:.3f})" if a > 0 else "transparent"


def _opt(kind, raw: str | None):
    """An optional number from a form field, where an empty field means 'not set'."""
    if raw is None or raw.strip() == "":
        return None
    try:
        return kind(raw)
    except ValueError:
        raise HTTPException(400, f"not a number: {raw!r}") from None


def score_histogram(scores: list[float]) -> dict:
    counts, edges = np.histogram(np.clip(scores, -1, 1), bins=HISTOGRAM_BINS) if scores else \
        (np.zeros(len(HISTOGRAM_BINS) - 1, dtype=int), HISTOGRAM_BINS)
    return {"labels": [f"{a:.1f}" for a in edges[:-1]], "counts": [int(c) for c in counts]}


def create_app(run: str, *, refresh_s: float = 2.0, s3_options: dict | None = None) -> FastAPI:
    store = RunStore.open(run, s3_options=s3_options)
    reader = RunReader(store, refresh_s=refresh_s)
    app = FastAPI(title="neuronsweep viewer", docs_url=None, redoc_url=None)
    app.state.reader = reader
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(num=_num, fmt=_fmt, token=_show_token)
    templates.env.globals.update(heat=heat, run_name=run)
    app.state.units = None  # the run's unit source, looked up until the run records it (a sweep may be starting)

    def units() -> dict | None:
        if app.state.units is None:
            app.state.units = recorded_source(store)
        return app.state.units

    templates.env.globals.update(unit_label=lambda layer, n: unit_label(units(), layer, n),
                                 units_title=lambda: f"{noun(units())}s", units_line=lambda: units_line(units()))

    def index_params(layer, status, min_score, max_score, q, sort, order, page):
        layer, min_score, max_score = _opt(int, layer), _opt(float, min_score), _opt(float, max_score)
        if layer is not None and not 0 <= layer <= MAX_LAYER:
            raise HTTPException(400, f"layer {layer} is out of range (0..{MAX_LAYER})")
        return dict(layer=layer, status=status or None, min_score=min_score, max_score=max_score,
                    text=q or None, sort=sort if sort in SORTABLE else "score", descending=order != "asc",
                    offset=(max(page, 1) - 1) * PAGE_SIZE, limit=PAGE_SIZE)

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, layer: str | None = None, status: str | None = None,
              min_score: str | None = None, max_score: str | None = None, q: str | None = None,
              sort: str = "score", order: str = "desc", page: int = Query(1, ge=1)):
        idx = reader.index()
        params = index_params(layer, status, min_score, max_score, q, sort, order, page)
        rows, total = query_index(idx, **params)
        layers = sorted(set(idx["layer"].to_pylist())) if idx.num_rows else []
        args = {"layer": params["layer"], "status": status, "min_score": params["min_score"],
                "max_score": params["max_score"], "q": q, "sort": sort, "order": order}
        args = {k: v for k, v in args.items() if v not in (None, "")}
        pages = max(1, math.ceil(total / PAGE_SIZE))
        link = lambda p: str(request.url_for("index").include_query_params(**args, page=p))  # noqa: E731
        return templates.TemplateResponse(request, "index.html", {
            "rows": rows.to_pylist(), "total": total, "page": page, "pages": pages, "layers": layers,
            "args": args, "sortable": SORTABLE, "n_indexed": idx.num_rows,
            "prev_url": link(page - 1) if page > 1 else None, "next_url": link(page + 1) if page < pages else None})

    @app.get("/api/neurons")
    def api_neurons(layer: str | None = None, status: str | None = None, min_score: str | None = None,
                    max_score: str | None = None, q: str | None = None, sort: str = "score",
                    order: str = "desc", page: int = Query(1, ge=1)):
        rows, total = query_index(reader.index(),
                                  **index_params(layer, status, min_score, max_score, q, sort, order, page))
        return {"total": total, "page": page, "rows": _json_rows(rows.to_pylist())}

    @app.get("/neuron/{layer}/{neuron}", response_class=HTMLResponse)
    def neuron_page(request: Request, layer: int, neuron: int):
        d = _detail(reader, layer, neuron)
        top = d["records"].get("top") or []
        vmax = max([r["max_activation"] for r in top] + [(d["stats"] or {}).get("max") or 0.0, 0.0])
        # the negative side's scale: the size of the most negative activation (the bottom records' colour scale)
        vneg = max([-x for r in d["records"].get("bottom") or [] for x in r["activations"]
                    if x is not None and math.isfinite(x)] + [0.0])
        return templates.TemplateResponse(request, "neuron.html", {"d": d, "vmax": vmax, "vneg": vneg})

    @app.get("/api/neuron/{layer}/{neuron}")
    def api_neuron(layer: int, neuron: int):
        return _json_rows([_detail(reader, layer, neuron)])[0]

    @app.get("/run", response_class=HTMLResponse)
    def run_page(request: Request):
        return templates.TemplateResponse(request, "run.html", _run_data(reader))

    @app.get("/api/run")
    def api_run():
        data = _run_data(reader)
        return {k: v for k, v in data.items() if k != "info"}

    return app


def _detail(reader: RunReader, layer: int, neuron: int) -> dict:
    if not (0 <= layer <= MAX_LAYER and 0 <= neuron <= MAX_NEURON):
        raise HTTPException(404, f"no data for layer {layer} neuron {neuron} in this run")
    d = reader.neuron(layer, neuron)
    if not any([d["ledger"], d["stats"], d["explanations"], any(d["records"].values())]):
        raise HTTPException(404, f"no data for layer {layer} neuron {neuron} in this run")
    return d


def _run_data(reader: RunReader) -> dict:
    p = reader.progress()
    idx = reader.index()
    scores = [s for s, st in zip(idx["score"].to_pylist(), idx["status"].to_pylist())
              if s is not None and st == "done"] if idx.num_rows else []
    info = reader.run_info()
    return {"progress": p.to_dict(), "histogram": score_histogram(scores), "headline": reader.headline(),
            "layers": {"labels": [str(k) for k in p.by_layer],
                       "mean": [v["mean_score"] for v in p.by_layer.values()]},
            "model": info.get("model") or (reader.extract_marker() or {}).get("model"),
            "created_at": info.get("created_at"), "info": info,
            "per_neuron": {"tokens": (p.prompt_tokens + p.completion_tokens) / p.processed if p.processed else None,
                           "cost_usd": p.cost_usd / p.processed if p.processed else None}}


def _json_rows(rows: list[dict]) -> list[dict]:
    """NaN-free, JSON-ready copies (timestamps to ISO strings)."""
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        if hasattr(v, "isoformat"):
            return v.isoformat()
        return v
    return [clean(r) for r in rows]


def serve(run: str, *, host: str = "127.0.0.1", port: int = 8765, log_level: str = "warning",
          s3_options: dict | None = None) -> None:
    """Serve the viewer; `s3_options` (endpoint, keys) come from the CLI's environment, as for every command."""
    import uvicorn

    uvicorn.run(create_app(run, s3_options=s3_options), host=host, port=port, log_level=log_level)
