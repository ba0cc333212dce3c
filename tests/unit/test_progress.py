"""Progress where there is no terminal: the plain line's content, the estimate of a sweep's time from the local
model's measured service, and the calls per neuron that estimate rests on (hand-worked numbers)."""
from types import SimpleNamespace

import pytest

from orchestrator.progress import (
    Live,
    LocalEstimate,
    ProgressLines,
    ProgressReporter,
    SweepState,
    calls_per_neuron,
    duration,
)
from schemas.config import SweepConfig


def demo_config(**changes) -> SweepConfig:
    data = {"records": {"top_k": 20, "n_random": 15, "n_per_split": 5}, "scorers": ["correlation"],
            "progress_interval_s": 30}
    data.update(changes)
    return SweepConfig.from_dict(data)


def test_calls_per_neuron_follow_the_method_as_configured():
    # a split holds 5 top + 5 random records; correlation simulates calibration and valid: 10 + 10 calls
    assert calls_per_neuron(demo_config()) == {"chat": 1, "logprob": 20}
    # best of 3: calibration once per candidate (3 x 10) + valid (10); 2 records per call halves them
    cfg = demo_config(explainer={"best_of": 3}, simulator={"records_per_call": 2})
    assert calls_per_neuron(cfg) == {"chat": 3, "logprob": 20}
    # no random records: 5 per split; a chat-mode simulator turns its calls into chats
    cfg = demo_config(records={"top_k": 20, "n_random": 0, "n_per_split": 5}, simulator={"mode": "logprob_free"})
    assert calls_per_neuron(cfg) == {"chat": 1 + 10, "logprob": 0}


def test_local_estimate_from_two_actors_measurements():
    stats = [{"chats": 4, "chat_s": 10.0, "logprob_calls": 30, "logprob_s": 12.0, "forward_tokens": 8000,
              "forward_s": 10.0},
             {"chats": 4, "chat_s": 6.0, "logprob_calls": 10, "logprob_s": 4.0, "forward_tokens": 2000,
              "forward_s": 2.5}]
    est = LocalEstimate.from_stats(demo_config(), stats)
    # 16 s / 8 chats = 2 s; 16 s / 40 calls = 0.4 s; per neuron 1 x 2 + 20 x 0.4 = 10 s; 10,000 tokens / 12.5 s
    assert (est.chat_s, est.logprob_s, est.per_neuron_s, est.tokens_per_s) == pytest.approx((2.0, 0.4, 10.0, 800))
    assert est.describe("smollm2-135m", 12, copies=2) == (
        "local model smollm2-135m: 800 prompt tokens/s; 2.0 s of model time per explanation, 0.40 s per "
        "simulation call -> about 10s per neuron, 1m00s for the 12 neurons left")
    no_simulation_yet = [{**stats[0], "logprob_calls": 0, "logprob_s": 0.0}]
    assert LocalEstimate.from_stats(demo_config(), no_simulation_yet) is None


def test_a_sweep_line_shows_the_estimate_or_else_the_rate_of_finished_neurons():
    now = [0.0]
    lines = ProgressLines(write=print, interval_s=30, clock=lambda: now[0])
    now[0] = 20.0
    assert lines.line() == "[    20s] starting"
    lines.on_extract(SimpleNamespace(windows_done=0, windows_total=600, tokens_per_s=0.0, eta_s=None,
                                     chunks_done=0, chunks_total=2))
    assert lines.line() == "[    20s] extract 0/600 windows | chunk 1 of 2 running"
    lines.on_extract(SimpleNamespace(windows_done=512, windows_total=600, tokens_per_s=1234.4, eta_s=10.2,
                                     chunks_done=1, chunks_total=2))
    assert lines.line() == "[    20s] extract 512/600 windows | 1,234 tokens/s, ETA 10s"
    lines.on_sweep(SweepState(planned=12, done=1, tokens=61234, shards_queued=2, eta_s=200.0))
    now[0] = 80.0  # 60 s into the explain stage, 1 neuron finished: too few for a rate of its own
    assert lines.line() == ("[  1m20s] neurons 1/12: 1 done, 0 failed, 0 skipped | 1.0/min, ETA 3m20s | "
                            "61,234 tokens, $0.0000 | queue 2 shards")
    lines.on_sweep(SweepState(planned=12, done=5, skipped=1, tokens=99000, shards_queued=1))
    now[0] = 200.0  # 180 s in, 6 finished: 2/min, 6 left -> 3 minutes (no model estimate: a remote API)
    assert lines.line() == ("[  3m20s] neurons 6/12: 5 done, 0 failed, 1 skipped | 2.0/min, ETA 3m00s | "
                            "99,000 tokens, $0.0000 | queue 1 shard")


def test_the_reporter_counts_neurons_finished_between_commits_and_announces_the_estimate_once():
    printed = []
    out = SimpleNamespace(is_terminal=False, print=lambda text, **_: printed.append(text))
    reporter = ProgressReporter(demo_config(), console=out, out=out, terminal=False)
    with reporter:
        stats = [{"chats": 2, "chat_s": 4.0, "logprob_calls": 10, "logprob_s": 5.0, "busy_s": 30.0}]
        outcome = SimpleNamespace(planned=12, done=0, failed=0, skipped=0, prompt_tokens=10, completion_tokens=2,
                                  cost_usd=0.0,
                                  live=Live(done=2, failed=1, tokens=30, model_stats=stats, model_copies=1))
        reporter.on_progress(outcome)
        reporter.on_progress(outcome)
        state = reporter.lines.sweep
    # the tokens of committed shards (12) and of neurons finished since (30)
    assert (state.done, state.failed, state.planned, state.tokens) == (2, 1, 12, 42)
    # 2 s per explanation + 20 x 0.5 s = 12 s per neuron; 12 neurons need 144 s, of which 30 s are done
    assert state.eta_s == pytest.approx(12 * 12.0 - 30.0)
    assert [p for p in printed if p.startswith("local model")] == [
        "local model smollm2-135m: 0 prompt tokens/s; 2.0 s of model time per explanation, 0.50 s per simulation "
        "call -> about 12s per neuron, 1m48s for the 9 neurons left"]


def test_duration():
    assert [duration(s) for s in (0, 59.4, 60, 185, 7260, None)] == ["0s", "59s", "1m00s", "3m05s", "2h01m", "?"]


def test_once_the_models_worked_longer_than_estimated_the_eta_comes_from_the_sweeps_rate():
    out = SimpleNamespace(is_terminal=False, print=lambda text, **_: None)
    reporter = ProgressReporter(demo_config(), console=out, out=out, terminal=False)
    with reporter:
        # 12 s per neuron x 12 neurons = 144 s of model time estimated; 200 s worked already
        stats = [{"chats": 2, "chat_s": 4.0, "logprob_calls": 10, "logprob_s": 5.0, "busy_s": 200.0}]
        reporter.on_progress(SimpleNamespace(planned=12, done=0, failed=0, skipped=0, prompt_tokens=0,
                                             completion_tokens=0, cost_usd=0.0,
                                             live=Live(done=4, model_stats=stats, model_copies=1)))
        state = reporter.lines.sweep
    assert state.eta_s is None  # the line then shows the rate's ETA, not a floor that never moves
