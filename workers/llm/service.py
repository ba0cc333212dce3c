"""Time spent being served versus time spent waiting for an in-process model.

An in-process model is a queue with a service rate, not a network endpoint: a request that waits its turn has
not failed, and a slow machine must be slow, never failing. Two context variables carry that to the places
that time things:

- `REQUEST_TIMEOUT_S`: the LLM client's per-request timeout, handed to a backend that queues requests itself
  (`queues_requests = True`, the local backend). Such a backend applies it to the model's own work on the
  request (each forward or step that includes it, stretched by the measured speed), not to its wait in the
  queue; the client does not wrap the call in a timeout of its own.
- `CURRENT_CLOCK`: a `NeuronClock` per neuron (set by `run_within`). The backend reports each of the
  neuron's calls as queued / in service / finished; the clock counts the wall time during which the neuron
  had calls queued and none in service (a generating row between its steps counts as queued). `run_within`
  charges a neuron its wall time less that wait, so
  `neuron_deadline_s` measures work and still catches a neuron whose calls never end (time in service, in a
  remote call, in a retry's back-off or in the method's own code all counts).
"""
from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

REQUEST_TIMEOUT_S: contextvars.ContextVar[float | None] = contextvars.ContextVar("neuronsweep_request_timeout",
                                                                                 default=None)


class NeuronClock:
    """Wall time of one neuron, split into waiting-only time (calls queued, none served) and the rest."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock()
        self.queued = 0  # this neuron's calls waiting in a model's queue
        self.serving = 0  # this neuron's calls the model is working on
        self._waited_s = 0.0
        self._since: float | None = None  # start of the current waiting-only stretch

    def move(self, queued: int = 0, serving: int = 0) -> None:
        """A call entered (+1) or left (-1) the queue, or entered or left service."""
        now = self.clock()
        if self._since is not None:
            self._waited_s += now - self._since
        self.queued += queued
        self.serving += serving
        self._since = now if self.queued > 0 and self.serving == 0 else None

    def waited_s(self) -> float:
        return self._waited_s + (self.clock() - self._since if self._since is not None else 0.0)

    def charged_s(self) -> float:
        """What the deadline counts: wall time since the start, less the waiting-only time."""
        return self.clock() - self.started - self.waited_s()


CURRENT_CLOCK: contextvars.ContextVar[NeuronClock | None] = contextvars.ContextVar("neuronsweep_neuron_clock",
                                                                                  default=None)


async def run_within(work: Awaitable[T], deadline_s: float, clock: NeuronClock | None = None) -> T:
    """Await `work` with `clock` as its `CURRENT_CLOCK`; raise TimeoutError (after cancelling it) once the clock
    has charged `deadline_s`. Charged time never runs faster than wall time, so sleeping for what is left of
    the deadline and looking again is exact."""
    clock = clock or NeuronClock()
    context = contextvars.copy_context()
    context.run(CURRENT_CLOCK.set, clock)
    task = asyncio.get_running_loop().create_task(_awaited(work), context=context)
    try:
        while True:
            left = deadline_s - clock.charged_s()
            if left <= 0:
                raise TimeoutError(f"charged {clock.charged_s():.1f}s of a {deadline_s:g}s deadline")
            done, _ = await asyncio.wait({task}, timeout=left)
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _awaited(work: Awaitable[T]) -> T:
    return await work
