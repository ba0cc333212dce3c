"""Exactly once under driver kills: a seeded campaign SIGKILLs the driver at 10 points across two runs of one
run directory (a sweep in which some calls keep failing, then its `--retry-failed`), resuming after each kill.
At the end the run directory holds the tables of the same two runs made without interruption, no row twice,
the same spend, and the test server answered no request more often than for the uninterrupted runs, except
those in flight at a kill (answered, not yet journaled).

Each kill point is a number of requests the test server answers in that driver's lifetime (drawn from `SEED`):
later requests are held unanswered, so when the driver is killed its sweep is stuck with work outstanding. The
method is the real one through the server (HTTP, retries, the call journal), on synthetic records (nothing to
extract); the drivers are processes that join one local Ray cluster, so a kill costs no Ray start-up.

Run as a script (`python tests/system/test_fault_campaign.py CONFIG.json [retry]`) this module is the driver."""
import contextvars
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from support.e2e_sweep import journal_size, wait_until

SEED = 20260611
KILLS_PER_RUN = 5
KEY_VAR, KEY = "NS_TEST_API_KEY", "sk-test-campaign"
ROOT = Path(__file__).resolve().parents[2]
N_NEURONS = 24

_KEY = contextvars.ContextVar("request_key", default="")


def failing(key: str, body: dict) -> bool:
    """The requests that fail (HTTP 500, on every retry) during the first run: explainer requests (chat without
    logprobs), one in two by content, so the reference and the campaign fail the same neurons."""
    return "messages" in body and not body.get("logprobs") and int(key[:8], 16) % 2 == 0


def unjournaled(body: dict) -> bool:
    """A tokenization probe (an echo with no completion): the client never journals it (workers/llm/client.py),
    so every driver asks it again."""
    return body.get("max_tokens") == 0


@pytest.fixture
def bodies(monkeypatch):
    """Every request body the test servers of this process see, by request key."""
    from testing import testserver

    seen: dict[str, dict] = {}
    real = testserver.request_key

    def noting(path: str, body: dict) -> str:
        key = real(path, body)
        seen[key] = body
        _KEY.set(key)  # for the fault decision later in the same request
        return key
    monkeypatch.setattr(testserver, "request_key", noting)
    return seen


def _fault_server(bodies: dict, **kw):
    """The test server, answering HTTP 500 to `failing` requests while `.faults` is on."""
    from testing.stubs import RuleResponder
    from testing.testserver import TestServer

    class FaultServer(TestServer):
        faults = True

        def _next_fault(self, path):
            key = _KEY.get()
            if self.faults and failing(key, bodies.get(key, {})):
                return "500", None
            return super()._next_fault(path)

    return FaultServer(responder=RuleResponder(), **kw)


def config(out: Path, server, ray_address: str | None) -> dict:
    backend = {"kind": "openai", "model": "rule-stub", "base_url": server.base_url, "api_key_env": KEY_VAR,
               "requests_per_minute": 60_000, "tokens_per_minute": 50_000_000, "concurrency": 8,
               "max_retries": 1, "timeout_s": 120, "price_input_per_mtok": 1.0, "price_output_per_mtok": 4.0}
    return {"corpus": {"seq_len": 16}, "records": {"top_k": 8, "n_random": 6, "n_per_split": 2},
            "shard_size": 3, "output": str(out), "metrics_port": 0, "ray_address": ray_address,
            "max_inflight_shards": 2, "explainer": {**backend, "capabilities": "chat"},
            "simulator": {**backend, "capabilities": "chat_logprobs"}, "scorers": ["correlation"]}


def drive(cfg_dict: dict, retry: bool, env) -> dict:
    """One driver: the sweep (or its retry) of the synthetic run with the real method."""
    from orchestrator.pipeline import run_sweep
    from schemas.config import SweepConfig
    from testing.instant import SyntheticMethodRunnerFactory, prepare_synthetic_run

    cfg = SweepConfig.from_dict(cfg_dict)
    prepare_synthetic_run(cfg, 1, N_NEURONS)
    o = run_sweep(cfg, env, runner_factory=SyntheticMethodRunnerFactory(), retry_failed=retry, n_actors=1)
    return {"done": o.done, "failed": o.failed, "cost_usd": o.cost_usd, "complete": o.complete,
            "shard_errors": o.shard_errors}


def journaled_answers(server, bodies: dict) -> Counter:
    """The server's answers, by request, to the requests the client journals."""
    return Counter({k: n for k, n in server.served.items() if not unjournaled(bodies.get(k, {}))})


def rows(store, table: str, cols: list[str]) -> list[tuple]:
    return sorted(tuple(r[c] for c in cols) for r in store.read_table(table, columns=cols).to_pylist())


TABLES = {"ledger": ["layer", "neuron", "attempts", "status", "reason", "cost_usd"],
          "explanations": ["layer", "neuron", "candidate", "explanation"],
          "scores": ["layer", "neuron", "candidate", "scorer", "score"]}
KEYS = {"ledger": 3, "explanations": 3, "scores": 4}  # the leading columns that identify a row


class Campaign:
    """The campaign's bookkeeping. Each driver's era ends with its kill (or the run's end); a request answered
    in an era after the one that first had it answered is a repeat; a kill's in-flight calls are those its era
    had answered that the journal does not hold."""

    def __init__(self, server, gate, run: Path, cfg_file: Path, bodies: dict):
        self.server, self.gate, self.run, self.cfg_file, self.bodies = server, gate, run, cfg_file, bodies
        self.eras: list[Counter] = []  # what the server had answered by the end of each era
        self._ends: list[tuple[int, int]] = []  # (answers, journal rows) at the end of each era
        self.in_flight = 0
        self.kills = 0

    def start(self, retry: bool) -> subprocess.Popen:
        # the root for `testing`, tests/ for `support` (this module imports both when it runs as the driver)
        path = os.pathsep.join(filter(None, (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH"))))
        return subprocess.Popen([sys.executable, __file__, str(self.cfg_file), *(["retry"] if retry else [])],
                                cwd=ROOT, env={**os.environ, KEY_VAR: KEY, "PYTHONPATH": path},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def answered(self) -> int:
        return sum(1 for c in self.server.log if c.status != 429)

    def _end_era(self) -> int:
        """Close an era; the answers it added that the journal did not take."""
        served, journaled = journaled_answers(self.server, self.bodies), journal_size(self.run)
        prev_served, prev_journaled = self._ends[-1] if self._ends else (0, 0)
        self.eras.append(served)
        self._ends.append((sum(served.values()), journaled))
        return (sum(served.values()) - prev_served) - (journaled - prev_journaled)

    def kill_at(self, retry: bool, n_answers: int) -> None:
        """Start a driver, let the server answer `n_answers` more requests, SIGKILL the driver once it waits."""
        self.gate.open_for = self.gate.passed + n_answers
        held = self.gate.held
        p = self.start(retry)
        wait_until(lambda: self.gate.held > held or p.poll() is not None, 300, "the driver reaching its kill point")
        assert p.poll() is None, f"the driver ended ({p.returncode}) before its kill point: {p.stderr.read()[-2000:]}"
        os.kill(p.pid, signal.SIGKILL)  # the driver only: its actors go when Ray sees their owner gone
        p.wait()
        wait_until(lambda: self.answered() >= self.gate.passed, 30, "the requests let through to be answered")
        # the killed driver's actors live on for a moment and may still journal answers they hold: count those
        # in this era (measured earlier, they would shrink the next era's count of calls in flight)
        self._settle_journal()
        self.in_flight += max(0, self._end_era())
        self.kills += 1

    def _settle_journal(self, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
        """Wait until the journal has taken no row for `quiet_s`."""
        deadline, rows, since = time.monotonic() + timeout_s, journal_size(self.run), time.monotonic()
        while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
            time.sleep(0.1)
            if (now := journal_size(self.run)) != rows:
                rows, since = now, time.monotonic()

    def finish(self, retry: bool) -> dict:
        self.gate.open_for = float("inf")
        p = self.start(retry)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        self._end_era()
        return json.loads(out.strip().splitlines()[-1])

    def repeated(self, reference: Counter) -> int:
        """Answers beyond those the uninterrupted runs had (`reference`: answers by request). A request whose
        answer the client rejects (and so does not journal) is asked again by its neuron's next try there too."""
        return sum(max(0, n - reference.get(key, 0)) for key, n in self.eras[-1].items())

    def story(self, reference: Counter) -> list:
        """For each request answered more often than in the reference: its reference count and its answers by
        the end of each era (for a failure message)."""
        return [(k[:8], reference.get(k, 0), [e.get(k, 0) for e in self.eras]) for k, n in self.eras[-1].items()
                if n > reference.get(k, 0)]


@pytest.fixture(scope="module")
def key_in_env():
    """The API key in this process's environment before the module's Ray starts: shard actors read it from
    their own environment, which Ray's local workers take from this process."""
    old = os.environ.get(KEY_VAR)
    os.environ[KEY_VAR] = KEY
    yield
    if old is None:
        os.environ.pop(KEY_VAR, None)
    else:
        os.environ[KEY_VAR] = old


@pytest.mark.slow
def test_ten_driver_kills_across_a_sweep_and_its_retry_change_nothing(tmp_path, key_in_env, ray_local, bodies,
                                                                      record_property):
    from orchestrator.store import RunStore
    from support.gate import RequestGate

    address = ray_local.get_runtime_context().gcs_address
    rng = random.Random(SEED)

    # the reference: both runs without interruption, in this process
    with _fault_server(bodies) as ref_server:
        ref = config(tmp_path / "ref", ref_server, None)
        first = drive(ref, False, {KEY_VAR: KEY})
        answers_first = sum(1 for c in ref_server.log if c.status != 429)
        ref_server.faults = False
        second = drive(ref, True, {KEY_VAR: KEY})
        answers_second = sum(1 for c in ref_server.log if c.status != 429) - answers_first
        reference = journaled_answers(ref_server, bodies)
    assert 2 <= first["failed"] <= N_NEURONS - 2, first  # the retry redoes some neurons and keeps others
    assert (second["done"], second["failed"]) == (N_NEURONS, 0), second
    assert answers_second >= 2 * KILLS_PER_RUN, answers_second  # room for five kill points in the retry

    gate = RequestGate(open_for=0, latency_s=0.02)
    run = tmp_path / "run"
    with _fault_server(bodies, latency=gate) as server:
        cfg_file = tmp_path / "run.json"
        cfg_file.write_text(json.dumps(config(run, server, address)))
        campaign = Campaign(server, gate, run, cfg_file, bodies)
        for retry, answers in ((False, answers_first), (True, answers_second)):
            server.faults = not retry
            # five eras of at most a sixth of the answers the run needs each: the run cannot end before its kills
            for _ in range(KILLS_PER_RUN):
                campaign.kill_at(retry, rng.randint(1, max(1, answers // (KILLS_PER_RUN + 1))))
            outcome = campaign.finish(retry)
            assert outcome["complete"] and not outcome["shard_errors"], outcome
        repeated, in_flight = campaign.repeated(reference), campaign.in_flight

    record_property("measured", f"fault campaign: {campaign.kills} driver kills, {repeated} requests answered "
                                f"again (in flight at a kill: {in_flight})")
    assert campaign.kills == 2 * KILLS_PER_RUN
    assert repeated <= in_flight, (repeated, in_flight, campaign.story(reference))
    assert (outcome["done"], outcome["failed"]) == (second["done"], second["failed"])
    assert outcome["cost_usd"] == pytest.approx(second["cost_usd"])
    ref_store, store = RunStore.open(str(tmp_path / "ref")), RunStore.open(str(run))
    for table, cols in TABLES.items():
        got = rows(store, table, cols)
        keys = [r[:KEYS[table]] for r in got]
        assert len(keys) == len(set(keys)), f"duplicate rows in {table}"
        assert got == rows(ref_store, table, cols), table


if __name__ == "__main__":
    print(json.dumps(drive(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2:] == ["retry"], os.environ)))
