"""`neuronsweep view | report | export | import`: looking at a run's results and moving them in and out.

Importing this module adds the commands to `orchestrator.cli.app`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator.cli.app import CLIError, app, open_run, out
from orchestrator.store import RunStore

RunArg = Annotated[str, typer.Argument(help="run directory or s3:// URI")]


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
    _existing_run(run)
    from orchestrator.results.viewer import serve

    out.print(f"neuronsweep viewer for {run} at http://{host}:{port}/  (Ctrl+C to stop)")
    serve(run, host=host, port=port)


@app.command()
def report(run: RunArg,
           out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="folder for the plots and "
                                                                                "summary (default RUN-report)")] = None,
           ) -> None:
    """Write PNG plots and a Markdown summary of a run's scores, failures and cost."""
    store = _existing_run(run)
    from orchestrator.results.report import write_report

    target = out_dir or Path(f"{run.rstrip('/').split('://')[-1]}-report")
    paths = write_report(store, target, run_name=run)
    for name, path in paths.items():
        out.print(f"{name:20s} {path}")


@app.command("export")
def export_cmd(run: RunArg,
               dest: Annotated[Path, typer.Argument(help="folder (openai) or file (bundle: .parquet or .jsonl)")],
               format_: Annotated[str, typer.Option("--format", "-f", help="openai | bundle")] = "openai",
               ) -> None:
    """Export a run: OpenAI's neuron-explainer JSON layout, or one per-neuron bundle file."""
    store = _existing_run(run)
    from orchestrator.results.interchange import export_bundle, export_openai

    if format_ == "openai":
        s = export_openai(store, dest)
        out.print(f"wrote {s.neurons} neuron records and {s.explanations} explanation files under {dest}")
    elif format_ == "bundle":
        n = export_bundle(store, dest)
        out.print(f"wrote {n} neurons to {dest}")
    else:
        raise CLIError(f"--format {format_!r}: expected openai or bundle")


@app.command("import")
def import_cmd(src: Annotated[Path, typer.Argument(help="folder in OpenAI's neuron-explainer layout")],
               run: Annotated[str, typer.Option("--out", "-o", help="run directory to create")],
               n_layers: Annotated[Optional[int], typer.Option(help="layers of the model (default: highest "
                                                                     "imported + 1)")] = None,
               n_neurons: Annotated[Optional[int], typer.Option(help="neurons per layer (default: highest "
                                                                      "imported + 1)")] = None,
               ) -> None:
    """Import OpenAI neuron-explainer records (and explanations) into a run directory, ready to re-score."""
    if not src.is_dir():
        raise CLIError(f"{src} is not a folder")
    store = open_run(run, create=True)
    if store.exists("records") or store.exists("_extract/complete.json"):
        raise CLIError(f"{run} already holds records; import into a new --out directory")
    from orchestrator.results.interchange import import_openai

    try:
        s = import_openai(src, store, n_layers=n_layers, n_neurons=n_neurons)
    except ValueError as e:
        raise CLIError(str(e)) from None
    out.print(f"imported {s.neurons} neurons over layers {s.layers} ({s.windows} distinct windows, "
              f"{s.explanations} explained, {s.scores} scored) into {run}")
    out.print(f"a sweep with --out {run} now re-explains/re-scores these records without a subject model")
