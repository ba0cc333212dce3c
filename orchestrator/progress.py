"""Progress of a sweep where nobody watches a terminal, and the sweep's estimate of its own time.

- `ProgressLines`: with stdout not a terminal (RayJob logs, CI, nohup, `make demo > log`) a rich progress bar
  shows nothing until the end. This prints one plain, self-contained line every `interval_s`
  (`progress_interval_s`, 30 s by default), whatever happens in between, from the latest state it was given:

      [  2m30s] neurons 5/12: 5 done, 0 failed, 0 skipped | 2.0/min, ETA 3m30s | 61,234 tokens, $0.0000 | queue 1 shard
      [     30s] extract 512/600 windows | 1,234 tokens/s, ETA 10s

- `LocalEstimate`: from what the local model measured on its first calls (its share of model time per chat
  and per prompt-logprobs request, workers/llm/backends/local.py `LocalStats`) and the calls the method makes
  per neuron as configured, the expected model time per neuron and for the neurons left. Printed once, as soon
  as both kinds of call have been measured, and used as the ETA until neurons themselves finish.
- `poll_live`: what the shard actors report between commits (neurons finished in shards not committed yet,
  their local model's measurements), so the counts and the ETA move before the first shard commits.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.config import SweepConfig

MIN_RATE_NEURONS = 3  # finished neurons before their own rate gives an ETA (where no model estimate does)


def calls_per_neuron(cfg: SweepConfig) -> dict[str, int]:
    """The LLM calls one neuron makes through the method as configured, without retries: {'chat': explainer
    candidates (and simulator calls in a chat mode), 'logprob': simulator calls in prompt-logprob mode}. The
    correlation scorer simulates the calibration split for each candidate and the valid split once
    (docs/method.md §5-§6); a split holds n_per_split top records and as many random ones."""
    split = cfg.records.n_per_split * (2 if cfg.records.n_random else 1)
    per_split = math.ceil(split / cfg.simulator.records_per_call)
    best_of = cfg.explainer.best_of
    simulations = 0
    if "correlation" in cfg.scorers or best_of > 1:
        simulations += best_of * per_split
    if "correlation" in cfg.scorers:
        simulations += per_split
    logprob_mode = cfg.simulator.mode == "prompt_logprob" or (cfg.simulator.mode == "auto"
                                                               and cfg.simulator.kind == "local")
    return {"chat": best_of + (0 if logprob_mode else simulations), "logprob": simulations if logprob_mode else 0}


@dataclass
class LocalEstimate:
    """Expected model seconds per neuron on the local model(s), from their measured service."""
    tokens_per_s: float  # prompt tokens per second of model time
    chat_s: float  # model seconds per chat request (its share of batched work)
    logprob_s: float  # model seconds per prompt-logprobs request
    per_neuron_s: float

    @classmethod
    def from_stats(cls, cfg: SweepConfig, stats: list[dict]) -> LocalEstimate | None:
        """None until each kind of call the method makes has been measured at least once."""
        total = {k: sum(s.get(k, 0) for s in stats) for k in
                 ("chats", "chat_s", "logprob_calls", "logprob_s", "forward_tokens", "forward_s")}
        calls = calls_per_neuron(cfg)
        if (calls["chat"] and not total["chats"]) or (calls["logprob"] and not total["logprob_calls"]):
            return None
        if not total["chats"] and not total["logprob_calls"]:
            return None
        chat_s = total["chat_s"] / total["chats"] if total["chats"] else 0.0
        logprob_s = total["logprob_s"] / total["logprob_calls"] if total["logprob_calls"] else 0.0
        rate = total["forward_tokens"] / total["forward_s"] if total["forward_s"] > 0 else 0.0
        return cls(rate, chat_s, logprob_s, calls["chat"] * chat_s + calls["logprob"] * logprob_s)

    def describe(self, model: str, neurons_left: int, copies: int = 1) -> str:
        return (f"local model {model}: {self.tokens_per_s:,.0f} prompt tokens/s; {self.chat_s:.1f} s of model time "
                f"per explanation, {self.logprob_s:.2f} s per simulation call -> about "
                f"{duration(self.per_neuron_s)} per neuron, {duration(self.per_neuron_s * neurons_left / copies)} "
                f"for the {neurons_left:,} neurons left")


@dataclass
class SweepState:
    """What a progress line shows about the explain stage."""
    planned: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    shards_queued: int = 0  # waiting or running
    finished_at_start: int = 0  # neurons already finished when this run began (resumed runs)
    eta_s: float | None = None


@dataclass
class ExtractState:
    windows_done: int = 0
    windows_total: int = 0
    tokens_per_s: float = 0.0
    eta_s: float | None = None
    chunks_done: int = 0
    chunks_total: int = 0


@dataclass
class ProgressLines:
    """One plain line every `interval_s` (from a background thread) with the latest state set here."""
    write: Callable[[str], None]
    interval_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0, init=False)
    sweep: SweepState | None = field(default=None, init=False)
    extract: ExtractState | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _sweep_started: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    # --- state --------------------------------------------------------------------------------------------
    def on_extract(self, p) -> None:
        """Callback for the extraction stage (`ExtractProgress`)."""
        self.extract = ExtractState(p.windows_done, p.windows_total, p.tokens_per_s, p.eta_s, p.chunks_done,
                                    p.chunks_total)

    def on_sweep(self, state: SweepState) -> None:
        if self._sweep_started is None:
            self._sweep_started = self.clock()
        self.extract = None
        self.sweep = state

    # --- lines --------------------------------------------------------------------------------------------
    def line(self) -> str | None:
        stamp = f"[{duration(self.clock() - self.started):>7}]"
        if self.sweep is not None:
            return f"{stamp} {self._sweep_line(self.sweep)}"
        if self.extract is not None:
            e = self.extract
            if e.windows_total and e.windows_done >= e.windows_total:
                return f"{stamp} extract {e.windows_done:,}/{e.windows_total:,} windows: done; starting to explain"
            if not e.tokens_per_s:  # counts move a checkpointed chunk at a time
                return (f"{stamp} extract {e.windows_done:,}/{e.windows_total:,} windows | chunk "
                        f"{e.chunks_done + 1} of {e.chunks_total} running")
            eta = f", ETA {duration(e.eta_s)}" if e.eta_s is not None else ""
            return (f"{stamp} extract {e.windows_done:,}/{e.windows_total:,} windows | "
                    f"{e.tokens_per_s:,.0f} tokens/s{eta}")
        return f"{stamp} starting"

    def _sweep_line(self, s: SweepState) -> str:
        finished = s.done + s.failed + s.skipped
        elapsed = self.clock() - (self._sweep_started or self.started)
        new = finished - s.finished_at_start
        rate = new / elapsed * 60 if elapsed > 0 and new > 0 else 0.0
        eta = s.eta_s
        if eta is None and new >= MIN_RATE_NEURONS and rate > 0:  # the sweep's own rate, once it has one
            eta = (s.planned - finished) / rate * 60
        parts = [f"neurons {finished:,}/{s.planned:,}: {s.done:,} done, {s.failed:,} failed, {s.skipped:,} skipped",
                 (f"{rate:.1f}/min" if rate else "rate: measuring") + (f", ETA {duration(eta)}" if eta is not None
                                                                         else ""),
                 f"{s.tokens:,} tokens, ${s.cost_usd:.4f}",
                 f"queue {s.shards_queued:,} shard{'s' if s.shards_queued != 1 else ''}"]
        return " | ".join(parts)

    # --- the timer ----------------------------------------------------------------------------------------
    def __enter__(self) -> ProgressLines:
        self._thread = threading.Thread(target=self._run, name="progress-lines", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            line = self.line()
            if line:
                self.write(line)


def duration(seconds: float | None) -> str:
    """12s, 3m05s, 2h10m."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# --- the driver's view of its actors between commits ------------------------------------------------------
@dataclass
class Live:
    """Summed over the shard actors: neurons finished in shards not committed yet, and local model stats."""
    done: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0  # prompt and completion tokens of those neurons
    cost_usd: float = 0.0
    model_stats: list[dict] = field(default_factory=list)
    model_copies: int = 0  # actors holding a local model


class LivePoller:
    """Asks every shard actor for `live()` at most every `every_s`, without waiting for the answers: each call
    returns what the previous round brought. `forget(k)` when a shard of actor k commits: its earlier answers
    still count that shard's neurons, which the commit now counts."""

    def __init__(self, actors: list, every_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.actors, self.every_s, self.clock = actors, every_s, clock
        self.latest: dict[int, dict] = {}
        self._pending: dict = {}  # ref -> (actor index, when asked)
        self._forgot: dict[int, float] = {}  # actor index -> when its last commit was counted
        self._last = -math.inf

    def forget(self, k: int) -> None:
        self.latest.pop(k, None)
        self._forgot[k] = self.clock()

    def poll(self) -> Live:
        import ray

        if self._pending:
            ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
            for ref in ready:
                k, asked = self._pending.pop(ref)
                try:
                    answer = ray.get(ref)
                except Exception:  # noqa: BLE001 - a dead or restarting actor: keep its last answer
                    continue
                if asked >= self._forgot.get(k, -math.inf):
                    self.latest[k] = answer
        if not self._pending and self.clock() - self._last >= self.every_s:
            self._last = self.clock()
            self._pending = {a.live.remote(): (k, self._last) for k, a in enumerate(self.actors)}
        live = Live()
        for answer in self.latest.values():
            for status in ("done", "failed", "skipped"):
                setattr(live, status, getattr(live, status) + answer.get("finished", {}).get(status, 0))
            finished = answer.get("finished", {})
            live.tokens += int(finished.get("prompt_tokens", 0) + finished.get("completion_tokens", 0))
            live.cost_usd += finished.get("cost_usd", 0.0)
            live.model_stats += answer.get("model", [])
            live.model_copies += bool(answer.get("model"))
        return live


# --- what `neuronsweep sweep` / `extract` show while they run ------------------------------------------------
class ProgressReporter:
    """A rich progress bar where stdout and stderr are terminals, `ProgressLines` on stdout otherwise; and the
    local model's estimate, printed once. The CLI passes `on_progress` and `extract_progress` to `run_sweep`."""

    def __init__(self, cfg: SweepConfig, *, console, out, metrics=None, terminal: bool | None = None):
        self.cfg, self.console, self.out, self.metrics = cfg, console, out, metrics
        self.terminal = (console.is_terminal and out.is_terminal) if terminal is None else terminal
        self.estimate: LocalEstimate | None = None
        self.lines: ProgressLines | None = None
        self.progress: Any = None  # a rich Progress
        self._task = None
        self._finished_at_start: int | None = None

    def __enter__(self) -> ProgressReporter:
        if self.terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn()]
            self.progress = Progress(*columns, console=self.console, transient=False).__enter__()
        else:
            self.lines = ProgressLines(self._plain, self.cfg.progress_interval_s).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
        if self.lines is not None:
            self.lines.__exit__(*exc)

    def _plain(self, line: str) -> None:
        self.out.print(line, markup=False, highlight=False)

    @property
    def extract_progress(self):
        """What run_extraction takes as `progress`: the rich Progress, or the plain lines' callback."""
        if self.progress is not None:
            return self.progress
        return self.lines.on_extract if self.lines is not None else None

    def discard(self) -> None:
        """The sweep was refused before it started: no empty bar."""
        if self.progress is not None and self._task is not None:
            self.progress.remove_task(self._task)

    def on_progress(self, o) -> None:
        live = getattr(o, "live", None) or Live()
        done, failed, skipped = o.done + live.done, o.failed + live.failed, o.skipped + live.skipped
        tokens, cost = o.prompt_tokens + o.completion_tokens + live.tokens, o.cost_usd + live.cost_usd
        if done + failed + skipped > o.planned:  # an answer from just before a commit the driver counted already
            done, failed, skipped = o.done, o.failed, o.skipped
            tokens, cost = o.prompt_tokens + o.completion_tokens, o.cost_usd
        finished = done + failed + skipped
        if self._finished_at_start is None:
            self._finished_at_start = o.done + o.failed + o.skipped
        left = max(0, o.planned - finished)
        copies = max(1, live.model_copies)
        estimate = LocalEstimate.from_stats(self.cfg, live.model_stats) if live.model_stats else None
        if self.estimate is None and estimate is not None:  # the first one is announced
            self.estimate = estimate
            text = estimate.describe(self.cfg.explainer.model, left, copies)
            (self.progress.console.print if self.progress is not None else self._plain)(text)
        eta = None
        if estimate is not None and left:
            # the model time this run needs, less what the models have worked so far (it moves between
            # commits, as neurons progress together); once the models have worked longer than that (the
            # neurons needed more calls than the estimate counts: retried answers), the sweep's own rate
            work = (o.planned - self._finished_at_start) * estimate.per_neuron_s
            busy = sum(st.get("busy_s", 0.0) for st in live.model_stats)
            eta = max(work - busy, estimate.per_neuron_s) / copies if busy < work else None
        if self.progress is not None:
            if self._task is None:
                self._task = self.progress.add_task("neurons", total=None, rate="")
            speed = self.progress.tasks[self._task].speed
            self.progress.update(self._task, total=o.planned, completed=finished,
                                 rate=f"{speed:.1f} neurons/s" if speed else "")
        if self.lines is not None:
            queued = self.metrics.registry.get_sample_value("neuronsweep_queue_depth", {"queue": "explain"}) \
                if self.metrics is not None else None
            self.lines.on_sweep(SweepState(o.planned, done, failed, skipped, tokens, cost, int(queued or 0),
                                           self._finished_at_start, eta))
