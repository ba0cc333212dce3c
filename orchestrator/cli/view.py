"""`neuronsweep view | report | export | import`: looking at a run's results and moving them in and out.

Paths and names the user gave are printed with markup off: a path may hold brackets that rich would
otherwise read as style tags.

Importing this module adds the commands to `orchestrator.cli.app`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.app import CLIError, app, env, open_run, out, s3_options_from_env
from orchestrator.store import RunStore

RunArg = Annotated[str, typer.Argument(help="run directory or s3:// URI")]


# The optional extras of pyproject.toml and the packages each brings; `view` and `report` need theirs.
EXTRAS = {"viewer": ("fastapi", "uvicorn", "jinja2"), "report": ("matplotlib",)}


def _require_extra(extra: str, command: str) -> None:
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise CLIError(f"`neuronsweep {command}` needs {', '.join(missing)}: pip install 'neuronsweep[{extra}]'")


def _existing_run(run: str) -> RunStore:
    store = open_run(run)
    if not any(store.exists(p) for p in ("run.json", "_extract/complete.json", "records", "ledger")):
        raise CLIError(f"{run} is not a neuronsweep run directory (no run.json, records or ledger)")
    return store


@app.command()
def view(run: RunArg,
         port: Annotated[int, typer.Option("--port", "-p", help="port to serve on")] = 8765,
         host: Annotated[str, typer.Option("--host", help="address to bind; 127.0.0.1 keeps it local")] = "127.0.0.1",
         ) -> None:
    """Browse a run's neurons in a local web app (works while the sweep is still running)."""
    _require_extra("viewer", "view")
    _existing_run(run)
    from orchestrator.results.viewer import serve

    out.print(f"neuronsweep viewer for {run} at http://{host}:{port}/  (Ctrl+C to stop)", markup=False)
    serve(run, host=host, port=port, s3_options=s3_options_from_env(env()))


@app.command()
def report(run: RunArg,
           out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="folder for the plots and "
                                                                                "summary (default RUN-report)")] = None,
           ) -> None:
    """Write PNG plots and a Markdown summary of a run's scores, failures and cost."""
    _require_extra("report", "report")
    store = _existing_run(run)
    from orchestrator.results.report import write_report

    target = out_dir or Path(f"{run.rstrip('/').split('://')[-1]}-report")
    paths = write_report(store, target, run_name=run)
    for name, path in paths.items():
        out.print(f"{name:20s} {path}", markup=False)


@app.command("export")
def export_cmd(run: RunArg,
               dest: Annotated[Path, typer.Argument(help="folder (openai, neuronpedia) or file (bundle: .parquet "
                                                        "or .jsonl)")],
               format_: Annotated[str, typer.Option("--format", "-f", help="openai | bundle | neuronpedia")] = "openai",
               ) -> None:
    """Export a run: OpenAI's neuron-explainer JSON layout, one per-neuron bundle file, or Neuronpedia's upload
    layout."""
    store = _existing_run(run)
    from orchestrator.results.interchange.bundle import export_bundle
    from orchestrator.results.interchange.openai_export import export_openai

    if format_ == "openai":
        s = export_openai(store, dest)
        out.print(f"wrote {s.neurons} neuron records and {s.explanations} explanation files under {dest}",
                  markup=False)
    elif format_ == "bundle":
        n = export_bundle(store, dest)
        out.print(f"wrote {n} neurons to {dest}", markup=False)
    elif format_ == "neuronpedia":
        from orchestrator.results.interchange.neuronpedia import export_neuronpedia

        np_ = export_neuronpedia(store, dest)
        out.print(f"wrote {np_.features} features, {np_.activations} activations and {np_.explanations} "
                  f"explanations in {len(np_.sources)} sources under {dest}", markup=False)
    else:
        raise CLIError(f"--format {format_!r}: expected openai, bundle or neuronpedia")


@app.command("import")
def import_cmd(src: Annotated[Path, typer.Argument(help="folder in OpenAI's neuron-explainer layout (or "
                                                       "Neuronpedia's, with --format neuronpedia)")],
               run: Annotated[str, typer.Option("--out", "-o", help="run directory to create")],
               n_layers: Annotated[int | None, typer.Option(help="layers of the model (default: highest "
                                                                     "imported + 1)")] = None,
               n_neurons: Annotated[int | None, typer.Option(help="neurons per layer (default: highest "
                                                                      "imported + 1)")] = None,
               format_: Annotated[str, typer.Option("--format", "-f", help="openai | neuronpedia")] = "openai",
               ) -> None:
    """Import OpenAI neuron-explainer records (and explanations) into a run directory, ready to re-score."""
    if not src.is_dir():
        raise CLIError(f"{src} is not a folder")
    store = open_run(run, create=True)
    if store.exists("records") or store.exists("_extract/complete.json"):
        raise CLIError(f"{run} already holds records; import into a new --out directory")
    if format_ not in ("openai", "neuronpedia"):
        raise CLIError(f"--format {format_!r}: expected openai or neuronpedia")
    from orchestrator.results.interchange.openai_import import import_openai

    if format_ == "neuronpedia":
        from orchestrator.results.interchange.neuronpedia import import_neuronpedia

        try:
            np_ = import_neuronpedia(src, store)
        except ValueError as e:
            raise CLIError(str(e)) from None
        out.print(f"imported {np_.features} units over layers {np_.layers} ({np_.windows} distinct windows, "
                  f"{np_.explanations} explanations) into {run}", markup=False)
        return
    try:
        s = import_openai(src, store, n_layers=n_layers, n_neurons=n_neurons)
    except ValueError as e:
        raise CLIError(str(e)) from None
    out.print(f"imported {s.neurons} neurons over layers {s.layers} ({s.windows} distinct windows, "
              f"{s.explanations} explained, {s.scores} scored) into {run}", markup=False)
    out.print(f"a sweep with --out {run} now re-explains/re-scores these records without a subject model",
              markup=False)
