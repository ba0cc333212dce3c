"""`neuronsweep extract`: the extraction stage on its own (the sweep runs it first anyway)."""
from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli.app import (
    AddressOpt,
    CLIError,
    ConfigOpt,
    CorpusOpt,
    LayersOpt,
    ModelOpt,
    OutOpt,
    SeqLenOpt,
    SetOpt,
    WindowsOpt,
    app,
    build_config,
    checked_against_model,
    console,
    env,
    open_run,
    out,
    s3_options_from_env,
)


@app.command()
def extract(config: ConfigOpt = None, sets: SetOpt = None, model: ModelOpt = None, corpus: CorpusOpt = None,
            layers: LayersOpt = None, max_windows: WindowsOpt = None, seq_len: SeqLenOpt = None,
            out_dir: OutOpt = None, address: AddressOpt = None,
            actors: Annotated[int | None, typer.Option("--actors", help="extraction actors (default: one per "
                                                                           "GPU, else 1)")] = None,
            chunk_windows: Annotated[int | None, typer.Option("--chunk-windows", help="windows per "
                                                                 "checkpointed chunk (default 512)")] = None,
            local: Annotated[bool, typer.Option("--local", help="run in this process, without Ray")] = False,
            ) -> None:
    """Run the model over the corpus once and store per-neuron top/random records and stats in --out."""
    from orchestrator.extraction import run_extraction
    from orchestrator.lease import RunLease
    from orchestrator.progress import ProgressReporter

    cfg = build_config(config, sets, model=model, corpus=corpus, layers=layers, max_windows=max_windows,
                       seq_len=seq_len, out=out_dir, address=address)
    checked_against_model(cfg)
    if chunk_windows is not None and chunk_windows < 1:
        raise CLIError(f"--chunk-windows: must be at least 1 (got {chunk_windows})")
    store = open_run(cfg.output, create=True)
    lease = RunLease(store, command="neuronsweep extract", s3_options=s3_options_from_env(env()))
    # a progress bar on a terminal, plain lines every progress_interval_s otherwise; ExtractError: main() reports
    with lease.acquire(), ProgressReporter(cfg, console=console, out=out) as reporter:
        s = run_extraction(cfg, store, n_actors=actors, progress=reporter.extract_progress,
                           chunk_windows=chunk_windows, use_ray=not local)
    if s.already_complete:
        out.print(f"extraction in {cfg.output} is already complete ({s.n_windows:,} windows, layers "
                  f"{_ranges(s.layers)}); nothing to do", markup=False)
        return
    resumed = f", {s.chunks_resumed} chunks resumed from checkpoints" if s.chunks_resumed else ""
    out.print(f"extracted {len(s.layers)} layers x {s.n_neurons:,} neurons over {s.n_windows:,} windows "
              f"in {s.seconds:.1f} s ({s.tokens_per_s:,.0f} tokens/s{resumed}) -> {cfg.output}", markup=False)


def _ranges(xs: list[int]) -> str:
    out_, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out_.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out_)
