"""Progress of the extraction's chunk pass: windows done, tokens/s and ETA, for a callback, a rich Progress
and the Prometheus metrics."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class ExtractProgress:
    windows_done: int
    windows_total: int
    tokens_done: int
    tokens_per_s: float
    eta_s: float | None
    chunks_done: int
    chunks_total: int


class ProgressTracker:
    """Windows done, tokens/s and ETA, sent to a callback or a rich Progress, and to the metrics."""

    def __init__(self, progress, metrics, n_windows: int, n_chunks: int, chunk_windows: int, seq_len: int,
                 done: set[int]):
        self.progress, self.metrics = progress, metrics
        self.n_windows, self.n_chunks, self.seq_len = n_windows, n_chunks, seq_len
        last = n_windows - (n_chunks - 1) * chunk_windows
        self.windows_done = sum(last if c == n_chunks - 1 else chunk_windows for c in done)
        self.chunks_done = len(done)
        self.tokens_new, self.t0 = 0, time.monotonic()
        self.task = None
        if progress is not None and hasattr(progress, "add_task"):
            self.task = progress.add_task("extract windows", total=n_windows, completed=self.windows_done,
                                          rate="")
        self.report()

    @property
    def tokens_per_s(self) -> float:
        dt = time.monotonic() - self.t0
        return self.tokens_new / dt if dt > 0 and self.tokens_new else 0.0

    def chunk_done(self, windows: int, tokens: int, slot: int, seconds: float) -> None:
        self.windows_done += windows
        self.chunks_done += 1
        self.tokens_new += tokens
        if self.metrics is not None:
            self.metrics.extract_tokens.inc(tokens)
            if seconds > 0:
                self.metrics.extract_rate.labels(str(slot)).set(tokens / seconds)
        self.report()

    def report(self) -> None:
        rate = self.tokens_per_s
        left = (self.n_windows - self.windows_done) * self.seq_len
        eta = left / rate if rate else None
        if self.task is not None:
            self.progress.update(self.task, completed=self.windows_done,
                                 rate=f"{rate:,.0f} tokens/s" if rate else "")
        elif callable(self.progress):
            self.progress(ExtractProgress(self.windows_done, self.n_windows, self.tokens_new, rate, eta,
                                          self.chunks_done, self.n_chunks))

    def close(self) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.windows_done)
