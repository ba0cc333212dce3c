"""`neuronsweep sweep | resume | status | show`."""
from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.app import (
    AddressOpt,
    CLIError,
    ConfigOpt,
    CorpusOpt,
    LayersOpt,
    ModelOpt,
    NeuronsOpt,
    OutOpt,
    SeqLenOpt,
    SetOpt,
    WindowsOpt,
    app,
    build_config,
    console,
    env,
    open_run,
    out,
    s3_options_from_env,
)
from orchestrator.lease import DEFAULT_STALE_AFTER_S
from orchestrator.plan import check_committed_shards, config_for_run, plan_of_run, read_run_file
from orchestrator.progress import ProgressReporter
from orchestrator.store import RunStore
from schemas.config import ConfigError, SweepConfig
from schemas.layout import EXTRACT_MARKER, RUN_FILE

RetryOpt = Annotated[bool, typer.Option("--retry-failed", help="also redo neurons that failed before")]
LingerOpt = Annotated[float, typer.Option("--metrics-linger", help="keep serving metrics this many seconds after "
                                                                  "the sweep ends, so a last scrape sees the end")]
UnlockOpt = Annotated[bool, typer.Option("--force-unlock", help="take the run over from another driver's lease "
                                                               "(only when that driver is gone)")]
LeaseTimeoutOpt = Annotated[float, typer.Option("--lease-timeout", min=1.0, help="seconds without a heartbeat after "
                                                "which another driver's lease counts as stale and is taken over")]


def _run(cfg: SweepConfig, *, retry_failed: bool, linger_s: float = 0.0, force_unlock: bool = False,
         lease_timeout_s: float = DEFAULT_STALE_AFTER_S, command: str = "neuronsweep sweep") -> None:
    from orchestrator.metrics import SweepMetrics
    from orchestrator.pipeline import run_sweep

    e = env()
    metrics = SweepMetrics()
    server = None
    if cfg.metrics_port:
        try:
            server, _ = metrics.serve(cfg.metrics_port, cfg.metrics_host)
            host = f"[{cfg.metrics_host}]" if ":" in cfg.metrics_host else cfg.metrics_host
            console.print(f"metrics: http://{host}:{cfg.metrics_port}/metrics", markup=False)
        except OSError as err:
            console.print(f"[yellow]metrics port {cfg.metrics_port} unavailable ({err.strerror}); "
                          f"set metrics_port to another port or 0[/]")
    metrics.build_info.labels(_version(), cfg.output).set(1)
    # a progress bar on a terminal, plain lines every progress_interval_s otherwise (orchestrator/progress.py)
    with ProgressReporter(cfg, console=console, out=out, metrics=metrics) as reporter:
        try:
            outcome = run_sweep(cfg, e, retry_failed=retry_failed, s3_options=s3_options_from_env(e),
                                metrics=metrics, on_progress=reporter.on_progress,
                                extract_progress=reporter.extract_progress, force_unlock=force_unlock,
                                lease_timeout_s=lease_timeout_s, command=command)
        except ConfigError:  # refused (a run in use, a damaged run directory): its one line, without an empty bar
            reporter.discard()
            raise
        reporter.on_progress(outcome)
    out.print(f"neurons: {outcome.done:,} done, {outcome.failed:,} failed, {outcome.skipped:,} skipped "
              f"of {outcome.planned:,}; {outcome.shards_committed}/{outcome.shards_total} shards committed")
    out.print(f"tokens: {outcome.prompt_tokens:,} prompt + {outcome.completion_tokens:,} completion; "
              f"estimated cost ${outcome.cost_usd:.4f}")
    if outcome.failures:
        out.print("failures by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(outcome.failures.items())))
    for shard_id, message in outcome.shard_errors[:5]:
        out.print(f"[red]shard {shard_id} did not commit:[/] {escape(str(message))}")
    if outcome.stopped_by_budget:
        out.print(f"[yellow]stopped: {escape(str(outcome.stopped_by_budget))}.[/] Raise the budget and continue "
                  f"with `{escape(_resume_command(cfg))} --set budget.max_tokens=...`")
    elif not outcome.complete:
        out.print(f"[yellow]incomplete[/]: continue with `{escape(_resume_command(cfg))}`")
    else:
        out.print(f"results in {cfg.output}: `neuronsweep status {cfg.output}`, "
                  f"`neuronsweep show {cfg.output} LAYER NEURON`, `neuronsweep view {cfg.output}`", markup=False)
    if server is not None:
        if linger_s > 0:
            console.print(f"serving final metrics for {linger_s:g}s more")
            time.sleep(linger_s)
        server.shutdown()
    if outcome.shard_errors:
        raise typer.Exit(1)


def _resume_command(cfg: SweepConfig) -> str:
    """How to continue this run: with the config file again where an endpoint or key variable is not the default
    (resume never takes those from run.json)."""
    default = SweepConfig()
    custom = any(getattr(cfg, role).kind == "openai" and (
        getattr(cfg, role).base_url != getattr(default, role).base_url
        or getattr(cfg, role).api_key_env != getattr(default, role).api_key_env) for role in ("explainer", "simulator"))
    return f"neuronsweep resume {cfg.output}" + (" --config CONFIG" if custom else "")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("neuronsweep")
    except PackageNotFoundError:
        return "dev"


@app.command()
def sweep(config: ConfigOpt = None, sets: SetOpt = None, model: ModelOpt = None, corpus: CorpusOpt = None,
          layers: LayersOpt = None, neurons: NeuronsOpt = None, out_dir: OutOpt = None, seq_len: SeqLenOpt = None,
          max_windows: WindowsOpt = None, address: AddressOpt = None, retry_failed: RetryOpt = False,
          metrics_linger: LingerOpt = 0.0, force_unlock: UnlockOpt = False,
          lease_timeout: LeaseTimeoutOpt = DEFAULT_STALE_AFTER_S) -> None:
    """Extract, explain, simulate and score every requested neuron (resumes an existing run directory)."""
    cfg = build_config(config, sets, model=model, corpus=corpus, layers=layers, neurons=neurons, out=out_dir,
                       seq_len=seq_len, max_windows=max_windows, address=address)
    _run(cfg, retry_failed=retry_failed, linger_s=metrics_linger, force_unlock=force_unlock,
         lease_timeout_s=lease_timeout)


@app.command()
def resume(run: Annotated[str, typer.Argument(help="run directory or URI")], config: ConfigOpt = None,
           sets: SetOpt = None, address: AddressOpt = None, retry_failed: RetryOpt = False,
           metrics_linger: LingerOpt = 0.0, force_unlock: UnlockOpt = False,
           lease_timeout: LeaseTimeoutOpt = DEFAULT_STALE_AFTER_S) -> None:
    """Continue a run from its run directory: nothing committed is redone, no journaled call is repaid. The config
    comes from the run's run.json, with --config/--set on top; an endpoint other than the default, or the variable
    holding its key, must be given again (--config or --set): a run directory never decides where a key goes."""
    store = _open(run)
    user = build_config(config, sets, address=address)
    cfg = config_for_run(read_run_file(store)["config"], user, output=run)
    _run(cfg, retry_failed=retry_failed, linger_s=metrics_linger, force_unlock=force_unlock,
         lease_timeout_s=lease_timeout, command="neuronsweep resume")


def _open(run: str) -> RunStore:
    store = open_run(run)
    if not store.exists(RUN_FILE):
        raise CLIError(f"{run} is not a neuronsweep run directory (no {RUN_FILE})")
    read_run_file(store)  # damaged or inconsistent: one line naming it and what to do
    return store


@app.command()
def status(run: Annotated[str, typer.Argument(help="run directory or URI")],
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Counts, throughput, cost so far and failures by reason, from the run directory alone."""
    from orchestrator.pipeline import committed_summaries
    from orchestrator.results.reader import RunReader
    from orchestrator.units import recorded_source, units_line

    store = _open(run)
    plan = plan_of_run(store)
    if plan is not None:  # committed shards run.json does not plan: counts would pass `planned`
        check_committed_shards(plan, store)
    p = RunReader(store).progress()
    span = _commit_span_s(committed_summaries(store).values())
    units = recorded_source(store)
    st = {**p.to_dict(), "wall_s": span, "neurons_per_s": p.processed / span if span else 0.0, "units": units}
    if as_json:
        out.print_json(json.dumps(st, default=str))
        return
    t = Table(show_header=False, box=None)
    t.add_row("units", escape(units_line(units)))
    t.add_row("planned", f"{p.planned:,}" if p.planned is not None else "?")
    for k in ("done", "failed", "skipped", "pending"):
        t.add_row(k, f"{st[k]:,}")
    t.add_row("shards", f"{p.shards_committed}/{p.n_shards} committed")
    t.add_row("extraction", "complete" if p.extracted else "not finished")
    t.add_row("throughput", f"{st['neurons_per_s']:.2f} neurons/s (first shard start to last commit: {span:.0f} s)")
    t.add_row("tokens", f"{p.prompt_tokens:,} prompt + {p.completion_tokens:,} completion")
    t.add_row("cost so far", f"${p.cost_usd:.4f}")
    if p.mean_score is not None:
        t.add_row("mean score", f"{p.mean_score:.3f} over {p.scored:,} scored neurons")
    out.print(t)
    if p.failures:
        out.print("failures by reason:")
        for reason, n in p.failures.items():
            out.print(f"  {reason:<14} {n}")


def _commit_span_s(summaries) -> float:
    """Seconds from the first shard's start to the last commit (pauses between resumed runs included)."""
    import datetime as dt

    starts, ends = [], []
    for s in summaries:
        if s.committed_at:
            end = dt.datetime.fromisoformat(s.committed_at).timestamp()
            ends.append(end)
            starts.append(end - s.elapsed_s)
    return max(ends) - min(starts) if ends else 0.0


@app.command()
def show(run: Annotated[str, typer.Argument(help="run directory or URI")], layer: int, neuron: int,
         n_records: Annotated[int, typer.Option("--records", help="top records to print")] = 3) -> None:
    """A neuron's explanation, scores and top records with their activations."""
    from orchestrator.results.reader import RunReader
    from orchestrator.units import recorded_source, unit_label

    store = _open(run)
    d = RunReader(store).neuron(layer, neuron)
    led = d["ledger"]
    out.print(f"[bold]{escape(unit_label(recorded_source(store), layer, neuron))}[/]: "
              f"{led['status'] if led else 'not processed yet'}"
              + escape(f" ({led['error']})" if led and led.get("error") else ""))
    negative = d.get("negative")  # its negative side, where explained too (docs/method.md §1 "Both signs")
    if negative:
        out.print(" positive side:")
    _print_side(out, d)
    for r in d["records"]["top"][:n_records]:
        text = "".join(f"{tok}[{act:.2f}]" if act > 0 else tok for tok, act in zip(r["tokens"], r["activations"]))
        out.print(f"   top #{r['rank']} (max {r['max_activation']:.3f}): {text!r}", markup=False, highlight=False)
    if negative:
        out.print(" negative side (bottom records, negated):")
        _print_side(out, negative)
        for r in d["records"]["bottom"][:n_records]:
            text = "".join(f"{tok}[{act:.2f}]" if act < 0 else tok for tok, act in zip(r["tokens"], r["activations"]))
            out.print(f"   bottom #{r['rank']} (min {min(r['activations'], default=0.0):.3f}): {text!r}", markup=False,
                      highlight=False)


@app.command()
def explain(layer: Annotated[int, typer.Option("--layer", help="layer of the neuron")],
            neuron: Annotated[int, typer.Option("--neuron", help="index of the neuron in its layer")],
            out_dir: OutOpt = None, config: ConfigOpt = None, sets: SetOpt = None, model: ModelOpt = None) -> None:
    """Explain and score one neuron in this process (no Ray), from the records `extract` stored in --out.
    Prints the explanation and scores; writes nothing but the call journal."""
    import asyncio

    from orchestrator.pipeline import build_runner, required_secrets
    from orchestrator.plan import Shard

    cfg = build_config(config, sets, model=model, out=out_dir)
    store = open_run(cfg.output)
    if store.exists(RUN_FILE):  # the run's method settings; endpoints and key variables from the user only
        cfg = config_for_run(read_run_file(store)["config"], cfg, output=cfg.output)
    if not store.exists(EXTRACT_MARKER):
        raise CLIError(f"{cfg.output} has no finished extraction; run `neuronsweep extract --out {cfg.output}` first")
    e = env()
    required_secrets(cfg, e)
    runner = build_runner(cfg, e)
    records = runner.records.load(Shard(layer, (neuron,)))[neuron]
    if not records.top:
        raise CLIError(f"no records for layer {layer} neuron {neuron} in {cfg.output} (extracted layers differ?)")
    started = time.monotonic()
    with console.status(f"explaining layer {layer} neuron {neuron} with {escape(cfg.explainer.model)}"):
        result = asyncio.run(runner.processor(records))
    if result.error:
        raise CLIError(f"layer {layer} neuron {neuron} failed: {result.error}")
    out.print(f"[bold]layer {layer} neuron {neuron}[/] ({time.monotonic() - started:.1f}s)")
    for row in result.explanation_rows:
        out.print(escape(f" {'*' if row['selected'] else ' '} {row['explanation']}"))
    for s in result.score_rows:
        out.print(score_line(s))


def _print_side(out, side: dict) -> None:
    """One side's explanation candidates (the selected one starred) and score lines."""
    for e in side["explanations"]:
        mark = "*" if e.get("selected") else " "
        out.print(escape(f" {mark} explanation [{e['candidate']}]: {e['explanation']}"))
    for s in side["scores"]:
        out.print(score_line(s))


def score_line(s: dict) -> str:
    val = "null" if s["score"] is None else f"{s['score']:.3f}"
    extra = "".join(f" {k}={s[k]:.3f}" for k in ("score_top", "score_random", "r2", "absdev") if s.get(k) is not None)
    reason = f"  ({s['null_reason']})" if s.get("null_reason") else ""
    return escape(f"   {s['scorer']:<12} {val}{extra}{reason}  [{s.get('simulator_mode') or ''}]")
