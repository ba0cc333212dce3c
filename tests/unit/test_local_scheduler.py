"""The local backend as a scheduler: time waiting for the model never fails a request or a neuron; the model's
own work still has a timeout (a hung forward is caught), and the neuron deadline still catches a neuron whose
calls never end. The model is the tiny test model behind a wrapper that makes every forward slow or hang."""
import asyncio
import os
import threading
import time

import pytest
import torch

from schemas.failures import FailureReason
from testing.models import tiny_model
from workers.llm.backends.base import TransientLLMError
from workers.llm.backends.local import LocalBackend, use_threads
from workers.llm.client import LLMClient
from workers.llm.service import CURRENT_CLOCK, NeuronClock, run_within

PREFIX = "You look at a neuron. Here are examples of its activations.\n"


class SlowModel(torch.nn.Module):
    """The tiny model, with every forward taking at least `delay_s`, or blocking while `gate` is cleared."""

    def __init__(self, inner: torch.nn.Module, delay_s: float = 0.0, gate: threading.Event | None = None):
        super().__init__()
        self.inner, self.delay_s, self.gate = inner, delay_s, gate
        self.config, self.generation_config = inner.config, inner.generation_config
        self.forwards = 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        if self.gate is not None:
            self.gate.wait()
        time.sleep(self.delay_s)
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def prompt(name: str) -> tuple[str, list[int]]:
    """A prompt and its offsets: the tab it ends with, and the end."""
    text = PREFIX + f"record {name}: the cat sat on\t"
    return text, [len(text) - 1, len(text)]


async def logprobs(client, name: str):
    text, at = prompt(name)
    return await client.prompt_logprobs(text, at, top_k=2)


def test_a_long_queue_on_a_slow_model_fails_nothing(tiny):
    """16 neurons at once on a model that serves 2 requests per forward of at least 0.2 s (56 forwards): the
    queue holds requests far longer than their 2.5 s timeout and neurons far longer than their 5 s deadline,
    yet every call is answered on its first attempt and every neuron finishes. (One forward per unit of work:
    no prefix reuse, so that each request's own service stays a few forwards even on a busy CPU.)"""
    model = SlowModel(tiny.model, delay_s=0.2)
    backend = LocalBackend(model, tiny.tokenizer, name="slow", max_batch=2, min_prefix_tokens=10**9)
    events = []
    client = LLMClient(backend, role="sim", timeout_s=2.5, max_retries=0, concurrency=1, on_call=events.append)
    clocks = []

    async def neuron(i: int):
        chat = client.chat([{"role": "user", "content": f"neuron {i}: explain"}], max_tokens=2)
        answers = await asyncio.gather(chat, *(logprobs(client, f"{i}.{j}") for j in range(4)))
        clock = CURRENT_CLOCK.get()
        clocks.append((clock.waited_s(), clock.charged_s()))  # at the neuron's end, as its deadline saw them
        return answers

    async def warm_up():  # the first forwards of a model in a process are slow (lazy set-up), not the queue
        await backend.chat([{"role": "user", "content": "warm up"}], max_tokens=2)
        await logprobs(backend, "warm up")

    async def sweep():
        return await asyncio.gather(*(run_within(neuron(i), deadline_s=5.0) for i in range(16)))

    asyncio.run(warm_up())
    started = time.monotonic()
    results = asyncio.run(sweep())
    wall = time.monotonic() - started
    assert len(results) == 16 and all(len(r) == 5 for r in results)
    assert {e.status for e in events} == {"ok"} and len(events) == 16 * 5  # no timeout, no retry
    assert wall > 2 * 5.0  # the queue really was longer than the deadline and every timeout
    assert max(waited for waited, _ in clocks) > 5.0  # ...and neurons spent it waiting, uncharged
    assert max(charged for _, charged in clocks) < 5.0
    assert max(backend.stats.batch_sizes) == 2 and backend.stats.steps > 0  # never more in service than 2


def test_work_slower_than_the_timeout_is_slow_not_hung(tiny):
    """Every forward takes 0.3 s against a 0.05 s timeout: the timeout stretches by what the model's measured
    speed predicts for each piece of work, so a slow machine answers everything."""
    backend = LocalBackend(SlowModel(tiny.model, delay_s=0.3), tiny.tokenizer, name="slow")
    events = []
    client = LLMClient(backend, role="sim", timeout_s=0.05, max_retries=0, on_call=events.append)

    async def run():
        for name in ("a", "b", "c"):
            await logprobs(client, name)
        await client.chat([{"role": "user", "content": "explain"}], max_tokens=3)

    asyncio.run(run())
    assert [e.status for e in events] == ["ok"] * 4


def test_a_hung_forward_times_out_and_what_waits_behind_it_fails_fast(tiny):
    gate = threading.Event()
    gate.set()
    backend = LocalBackend(SlowModel(tiny.model, gate=gate), tiny.tokenizer, name="hung")
    client = LLMClient(backend, role="sim", timeout_s=0.5, max_retries=0)
    patient = LLMClient(backend, role="sim", timeout_s=60.0, max_retries=0)

    async def run():
        await logprobs(patient, "warm up")  # the measured speed: a tiny model's forward should take milliseconds
        gate.clear()  # from now on the model's forward hangs
        first = asyncio.ensure_future(logprobs(client, "first"))
        await asyncio.sleep(1.0)  # the forward hangs past its 0.5 s
        t0 = time.monotonic()
        with pytest.raises(TransientLLMError, match="fail until it returns") as behind:
            await logprobs(client, "behind")
        fast = time.monotonic() - t0
        with pytest.raises(TransientLLMError, match="one forward on this request ran") as hung:
            await first
        gate.set()  # the forward returns: the model serves again
        while backend.load()["in_forward"]:
            await asyncio.sleep(0.01)
        again = await logprobs(patient, "again")
        return behind.value, hung.value, fast, again

    behind, hung, fast, again = asyncio.run(run())
    assert hung.reason == behind.reason == FailureReason.TIMEOUT
    assert fast < 0.5
    assert len(again.positions) == 2


def test_neuron_clock_charges_wall_time_less_waiting_only_time():
    now = [0.0]
    clock = NeuronClock(lambda: now[0])
    clock.move(queued=2)  # t=0: two calls queued, none served
    now[0] = 5.0
    clock.move(queued=-1, serving=1)  # t=5: one in service (the other still queued: charged from here)
    now[0] = 6.0
    clock.move(serving=-1)  # t=6: back to one queued, none served
    now[0] = 8.0
    clock.move(queued=-1, serving=1)  # t=8
    now[0] = 9.5
    clock.move(serving=-1)  # t=9.5: all done
    now[0] = 12.0  # the method's own work after its last call
    assert clock.waited_s() == pytest.approx(5.0 + 2.0)
    assert clock.charged_s() == pytest.approx(12.0 - 7.0)


def test_the_deadline_still_catches_a_neuron_whose_call_never_ends(tiny):
    gate = threading.Event()  # the model's first forward does not return until the deadline has passed
    backend = LocalBackend(SlowModel(tiny.model, gate=gate), tiny.tokenizer, name="hung")
    client = LLMClient(backend, role="sim", timeout_s=1000.0, max_retries=0)

    async def run():
        t0 = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                await run_within(logprobs(client, "never"), deadline_s=0.3)
            return time.monotonic() - t0
        finally:
            gate.set()  # let the worker thread end, or the event loop could not close

    assert 0.3 <= asyncio.run(run()) < 1.0


def test_the_local_model_uses_every_core_its_process_may_run_on():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what a Ray actor starts with (OMP_NUM_THREADS=1, its CPU reservation)
        assert use_threads(0) == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        assert use_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
