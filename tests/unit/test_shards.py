"""ShardRunner without Ray: commit, ledger, failure reasons, deadlines, idempotent retries, summaries."""
import asyncio

import pytest

from orchestrator.plan import Shard
from orchestrator.results.reader import RunReader
from orchestrator.shards import ShardRunner, ShardSummary, added_by, record_call
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.failures import FailureReason
from schemas.layout import shard_marker
from testing.instant import InstantProcessor, SyntheticRecordSource
from workers.llm.backends.base import RateLimitedError, Usage
from workers.llm.client import CallEvent
from workers.method.neuron import NeuronResult
from workers.method.records import ActivationRecord


class Source(SyntheticRecordSource):
    """Synthetic records, with neuron 3 dead (never above 0)."""

    def load(self, shard):
        out = super().load(shard)
        if 3 in out:
            out[3].top[0].activations = [-1.0] * 7
        return out


class Processor(InstantProcessor):
    def __init__(self, cfg, fail=(), hang=()):
        super().__init__(cfg)
        self.fail, self.hang, self.calls = set(fail), set(hang), []

    async def __call__(self, records):
        self.calls.append(records.neuron)
        if records.neuron in self.hang:
            await asyncio.sleep(30)
        if records.neuron in self.fail:
            r = NeuronResult(records.layer, records.neuron)
            r.error = "layer 0 neuron 1: ExplanationFailed: malformed answer"
            r.reason = FailureReason.MALFORMED
            return r
        if records.neuron == 97:  # a failed result from code that sets no reason
            r = NeuronResult(records.layer, records.neuron)
            r.error = "layer 0 neuron 97: something went wrong, rate limits mentioned in passing"
            return r
        if records.neuron == 98:
            raise RateLimitedError("429 after every retry")
        if records.neuron == 99:
            raise RuntimeError("bug")
        return await super().__call__(records)


def runner(tmp_path, **kw):
    cfg = SweepConfig(output=str(tmp_path), neuron_deadline_s=0.5)
    store = RunStore.open(str(tmp_path), create=True)
    proc = Processor(cfg, **kw)
    return ShardRunner(cfg, store, proc, Source(cfg)), store, proc


def test_commit_writes_one_ledger_row_per_neuron(tmp_path):
    r, store, proc = runner(tmp_path, fail={1}, hang={2})
    shard = Shard(0, (0, 1, 2, 3, 4))
    s = asyncio.run(r.run(shard))
    assert (s.done, s.failed, s.skipped) == (2, 2, 1)
    assert s.failures == {"malformed": 1, "deadline": 1}
    ledger = {row["neuron"]: row for row in store.read_table("ledger").to_pylist()}
    assert sorted(ledger) == [0, 1, 2, 3, 4]
    assert ledger[2]["status"] == "failed" and ledger[2]["error"].startswith("deadline")
    assert (ledger[1]["reason"], ledger[2]["reason"]) == ("malformed", "deadline")
    assert ledger[3]["status"] == "skipped" and "never activates" in ledger[3]["error"]
    assert ledger[0]["reason"] is None and ledger[3]["reason"] == "dead"
    assert ledger[0]["shard_id"] == shard.shard_id and ledger[0]["attempts"] == 1
    assert sorted(store.read_table("explanations").column("neuron").to_pylist()) == [0, 4]
    assert sorted(store.read_table("scores").column("neuron").to_pylist()) == [0, 4]
    assert ShardSummary.from_json(store.read_json(shard_marker(shard.shard_id))) == s


def test_a_committed_shard_is_not_redone(tmp_path):
    r, store, proc = runner(tmp_path)
    shard = Shard(1, (5, 6))
    asyncio.run(r.run(shard))
    assert proc.calls == [5, 6]
    again = asyncio.run(r.run(shard))
    assert again.already_committed and proc.calls == [5, 6]
    assert store.read_table("ledger").num_rows == 2


def test_retry_failed_redoes_only_failed_neurons_and_keeps_the_rest(tmp_path):
    r, store, proc = runner(tmp_path, fail={1})
    shard = Shard(0, (0, 1, 2))
    asyncio.run(r.run(shard))
    proc.fail.clear()
    proc.calls.clear()
    s = asyncio.run(r.run(shard, retry_failed=True))
    assert proc.calls == [1]
    assert (s.done, s.failed, s.failures) == (3, 0, {})
    ledger = {row["neuron"]: row for row in store.read_table("ledger").to_pylist()}
    assert ledger[1]["attempts"] == 2 and ledger[0]["attempts"] == 1
    assert sorted(store.read_table("explanations").column("neuron").to_pylist()) == [0, 1, 2]


def test_a_crash_before_the_marker_leaves_a_redoable_shard(tmp_path, monkeypatch):
    r, store, proc = runner(tmp_path)
    shard = Shard(0, (0, 1))
    real = store.write_json

    def crash(rel, obj):
        if rel.startswith("_markers"):
            raise OSError("disk gone")
        real(rel, obj)
    monkeypatch.setattr(store, "write_json", crash)
    with pytest.raises(OSError):
        asyncio.run(r.run(shard))
    assert store.read_table("ledger").num_rows == 0  # its files are published, but no reader sees them
    monkeypatch.setattr(store, "write_json", real)
    asyncio.run(r.run(shard))
    assert store.read_table("ledger").num_rows == 2  # overwritten, not duplicated
    assert store.read_table("explanations").num_rows == 2


def test_the_failure_reason_is_stored_from_what_raised_not_read_from_the_message(tmp_path):
    r, store, proc = runner(tmp_path)
    s = asyncio.run(r.run(Shard(0, (96, 97, 98, 99))))
    assert (s.done, s.failed) == (1, 3)
    rows = {x["neuron"]: x for x in store.read_table("ledger").to_pylist()}
    assert rows[99]["error"] == "error: RuntimeError: bug" and rows[99]["reason"] == "error"
    assert rows[98]["error"] == "error: RateLimitedError: 429 after every retry"
    assert rows[98]["reason"] == "rate_limited"  # the exception's own reason
    assert rows[97]["reason"] == "error"  # a message mentioning rate limits is not a rate limit
    assert s.failures == {"error": 2, "rate_limited": 1}


def test_a_neuron_without_records_fails_with_the_records_reason(tmp_path):
    class Empty(Source):
        def load(self, shard):
            out = super().load(shard)
            out[1].top = []
            return out

    cfg = SweepConfig(output=str(tmp_path))
    r = ShardRunner(cfg, RunStore.open(str(tmp_path), create=True), Processor(cfg), Empty(cfg))
    s = asyncio.run(r.run(Shard(0, (0, 1))))
    assert (s.done, s.failed, s.failures) == (1, 1, {"records": 1})


def test_concurrent_shards_count_only_their_own_calls(tmp_path):
    """Two shards run at once on one runner (as in an actor); each LLM call reports to `record_call`, and each
    shard's summary and marker hold exactly the calls its own neurons made."""
    cfg = SweepConfig(output=str(tmp_path))
    calls_per_neuron = {0: 2, 1: 3}  # by layer

    class Calling(InstantProcessor):
        async def __call__(self, records):
            for i in range(calls_per_neuron[records.layer]):
                await asyncio.sleep(0)  # let the other shard's neurons interleave
                record_call(CallEvent(role="explainer", provider="p", model="m", status="ok", prompt_tokens=10,
                                      completion_tokens=2, latency_s=0.5, key=f"{records.neuron}-{i}"))
            return await super().__call__(records)

    store = RunStore.open(str(tmp_path), create=True)
    r = ShardRunner(cfg, store, Calling(cfg), SyntheticRecordSource(cfg))

    async def both():
        return await asyncio.gather(r.run(Shard(0, (0, 1))), r.run(Shard(1, (5, 6, 7))))
    a, b = asyncio.run(both())
    assert a.requests == [("explainer", "p", "m", "ok", 4)] and b.requests == [("explainer", "p", "m", "ok", 9)]
    assert ("explainer", "p", "m", "prompt", 40) in a.tokens and ("explainer", "p", "m", "prompt", 90) in b.tokens
    assert a.latencies == [("explainer", 0.5)] * 4 and len(b.latencies) == 9
    assert ShardSummary.from_json(store.read_json(shard_marker(b.shard_id))).requests == b.requests


def test_a_marker_written_by_the_previous_summary_dict_still_loads():
    old = {"shard_id": "L000-000000-000003", "layer": 0, "n": 4, "done": 2, "failed": 1, "skipped": 1,
           "failures": {"malformed": 1}, "prompt_tokens": 120, "completion_tokens": 7, "cost_usd": 0.25,
           "elapsed_s": 1.5, "requests": [["explainer", "openai", "gpt", "ok", 3]],
           "tokens": [["explainer", "openai", "gpt", "prompt", 120]], "committed_at": "2025-01-01T00:00:00+00:00",
           "some_key_a_later_version_adds": 1}
    s = ShardSummary.from_json(old)
    assert (s.shard_id, s.n, s.done, s.failed, s.skipped, s.cost_usd) == ("L000-000000-000003", 4, 2, 1, 1, 0.25)
    assert s.requests == [("explainer", "openai", "gpt", "ok", 3)] and not s.already_committed
    assert ShardSummary.from_json(s.to_json()) == s
    assert "latencies" not in s.to_json() and "already_committed" not in s.to_json()


def test_a_ledger_file_from_before_the_reason_column_reads_with_null_reasons(tmp_path):
    """Schema 1.1 ledgers have no `reason`; read next to a newer file, whichever the scan opens first. The old
    shard's marker predates file lists: it commits the shard's first-commit names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas.tables import LEDGER, VERSION_KEY

    r, store, _ = runner(tmp_path)
    asyncio.run(r.run(Shard(0, (10, 12))))  # layer 0, both done
    old_fields = [f for f in LEDGER if f.name not in ("layer", "reason")]
    old = pa.Table.from_pylist([{"neuron": 9, "status": "failed", "error": "deadline: old"}],
                               schema=pa.schema(old_fields, metadata={VERSION_KEY: b"1.1"}))
    (tmp_path / "ledger" / "layer=0").mkdir(parents=True, exist_ok=True)
    pq.write_table(old, tmp_path / "ledger" / "layer=0" / "shard-L000-000009-000009.parquet")  # sorts first
    store.write_json(shard_marker("L000-000009-000009"), {"shard_id": "L000-000009-000009", "layer": 0, "n": 1})
    rows = {x["neuron"]: x for x in store.read_table("ledger").to_pylist()}
    assert rows[9]["reason"] is None and rows[9]["error"] == "deadline: old"
    assert rows[10]["reason"] is None and rows[10]["status"] == "done"
    assert store.read_table("ledger", columns=["reason"]).num_rows == 3


# --- a retry of the failed neurons: what was paid is counted once ------------------------------------------------
PRICED = {"explainer": {"price_input_per_mtok": 1.0, "price_output_per_mtok": 10.0},
          "simulator": {"price_input_per_mtok": 0.5}}
NEURON_COST = (2000 * 1.0 + 30 * 10.0) / 1e6 + 12000 * 0.5 / 1e6  # testing/instant.py USAGE at PRICED: $0.0083


def priced_runner(tmp_path, processor_cls=InstantProcessor, journal=None, **kw):
    cfg = SweepConfig.from_dict({"output": str(tmp_path), **PRICED})
    store = RunStore.open(str(tmp_path), create=True)
    return ShardRunner(cfg, store, processor_cls(cfg, **kw), SyntheticRecordSource(cfg), journal=journal), store, cfg


def test_a_retry_keeps_the_failed_attempts_row_and_counts_only_new_spend(tmp_path):
    r, store, cfg = priced_runner(tmp_path, fail={(0, 1)})
    shard = Shard(0, (0, 1, 2))
    first = asyncio.run(r.run(shard))
    assert (first.done, first.failed, first.commit) == (2, 1, 1)
    assert first.cost_usd == pytest.approx(3 * NEURON_COST)  # the failed attempt paid its tokens too
    r.processor = InstantProcessor(cfg)
    second = asyncio.run(r.run(shard, retry_failed=True))
    assert (second.done, second.failed, second.commit, second.failures) == (3, 0, 2, {})
    assert second.cost_usd == pytest.approx(4 * NEURON_COST) and second.prompt_tokens == 4 * 14000  # the shard's
    added = added_by(second, first)  # what the retry paid: neuron 1's second attempt, nothing of 0 and 2
    assert (added.done, added.failed, added.skipped) == (1, 0, 0)
    assert added.cost_usd == pytest.approx(NEURON_COST) and added.prompt_tokens == 14000
    ledger = sorted((x["neuron"], x["attempts"], x["status"]) for x in store.read_table("ledger").to_pylist())
    assert ledger == [(0, 1, "done"), (1, 1, "failed"), (1, 2, "done"), (2, 1, "done")]
    assert sum(x["cost_usd"] for x in store.read_table("ledger").to_pylist()) == pytest.approx(4 * NEURON_COST)
    reader = RunReader(store)
    p = reader.progress()
    assert (p.done, p.failed, p.prompt_tokens) == (3, 0, 4 * 14000) and p.cost_usd == pytest.approx(4 * NEURON_COST)
    (one,) = [x for x in reader.index().to_pylist() if x["neuron"] == 1]  # read from the second commit's files
    assert one["explanation"] == "the word 'cat'" and one["cost_usd"] == pytest.approx(2 * NEURON_COST)
    marker = store.read_json(shard_marker(shard.shard_id))
    assert marker["files"]["ledger"] == ["ledger/layer=0/shard-L000-000000-000002.v2.parquet"]
    assert store.exists("ledger/layer=0/shard-L000-000000-000002.parquet")  # the first commit, no longer read


class Journal:
    """The journal's one method a commit uses: the stored rows of the given keys."""

    def rows_for(self, keys):
        return [{"key": k, "provider": "p", "model": "m", "status": "ok", "response": "{}"} for k in sorted(set(keys))]


class Calling(InstantProcessor):
    """Makes one paid call per neuron, keyed by the neuron and `self.round`, before answering."""
    round = "a"

    async def __call__(self, records):
        record_call(CallEvent(role="explainer", provider="p", model="m", status="ok", prompt_tokens=10,
                              completion_tokens=2, latency_s=0.1, key=f"{records.neuron}-{self.round}"))
        return await super().__call__(records)


def test_a_retrys_calls_table_keeps_the_calls_of_the_first_commit(tmp_path):
    r, store, _ = priced_runner(tmp_path, Calling, fail={(0, 1)}, journal=Journal())
    shard = Shard(0, (0, 1, 2))
    first = asyncio.run(r.run(shard))
    r.processor.fail, r.processor.round = frozenset(), "b"
    second = asyncio.run(r.run(shard, retry_failed=True))
    assert sorted(store.read_table("calls").column("key").to_pylist()) == ["0-a", "1-a", "1-b", "2-a"]
    assert second.requests == [("explainer", "p", "m", "ok", 4)]  # the shard's, over both commits
    assert added_by(second, first).requests == [("explainer", "p", "m", "ok", 1)]
    assert ("explainer", "p", "m", "prompt", 10) in added_by(second, first).tokens


def test_a_retry_already_committed_past_the_callers_commit_is_not_redone(tmp_path):
    """The retry's reply was lost (its actor died after the commit) and the driver asks again: nothing is paid."""
    r, store, cfg = priced_runner(tmp_path, Processor, fail={1})
    shard = Shard(0, (0, 1, 2))
    asyncio.run(r.run(shard))
    asyncio.run(r.run(shard, retry_failed=True, retry_of=1))  # neuron 1 fails again: commit 2, still failed
    r.processor.calls.clear()
    again = asyncio.run(r.run(shard, retry_failed=True, retry_of=1))
    assert again.already_committed and again.commit == 2 and r.processor.calls == []
    third = asyncio.run(r.run(shard, retry_failed=True, retry_of=2))  # the caller saw commit 2: redo
    assert third.commit == 3 and r.processor.calls == [1]


def test_give_up_records_the_unfinished_neurons_as_failed(tmp_path):
    r, store, cfg = priced_runner(tmp_path, fail={(0, 1)})
    asyncio.run(r.run(Shard(0, (0, 1, 2))))
    driver = ShardRunner.committer(cfg, store)  # the driver's: no method, no records
    crashed = driver.give_up(Shard(1, (5, 6)), FailureReason.WORKER_CRASH, "worker_crash: died 3 times", attempts=3)
    assert (crashed.done, crashed.failed, crashed.failures, crashed.cost_usd) == (0, 2, {"worker_crash": 2}, 0.0)
    retried = driver.give_up(Shard(0, (0, 1, 2)), FailureReason.WORKER_CRASH, "worker_crash: died", retry_of=1)
    assert (retried.done, retried.failed, retried.commit) == (2, 1, 2)
    assert retried.cost_usd == pytest.approx(3 * NEURON_COST)  # the first commit's spend stays counted
    rows = {(x["layer"], x["neuron"], x["attempts"]): x for x in store.read_table("ledger").to_pylist()}
    assert rows[(1, 5, 3)]["reason"] == "worker_crash" and rows[(1, 5, 3)]["status"] == "failed"
    assert rows[(0, 1, 2)]["reason"] == "worker_crash" and rows[(0, 1, 1)]["reason"] == "malformed"
    assert driver.give_up(Shard(1, (5, 6)), FailureReason.WORKER_CRASH, "x").already_committed


def test_neurons_finished_before_their_commit_count_their_tokens_for_progress_until_it(tmp_path):
    """The progress lines add what finished neurons spent before their shard commits; the commit takes it over."""
    gate = asyncio.Event()

    class Gated(Processor):
        async def __call__(self, records):
            if records.neuron == 2:
                await gate.wait()
            return await super().__call__(records)

    cfg = SweepConfig(output=str(tmp_path), neuron_deadline_s=30)
    store = RunStore.open(str(tmp_path), create=True)
    r = ShardRunner(cfg, store, Gated(cfg), Source(cfg))

    async def run():
        task = asyncio.create_task(r.run(Shard(0, (0, 1, 2))))
        while r.finished["done"] < 2:
            await asyncio.sleep(0.01)
        before = dict(r.finished)
        gate.set()
        return before, await task

    before, summary = asyncio.run(run())
    ledger = {row["neuron"]: row for row in store.read_table("ledger").to_pylist()}
    assert before["prompt_tokens"] == ledger[0]["prompt_tokens"] + ledger[1]["prompt_tokens"] > 0
    assert before["completion_tokens"] == ledger[0]["completion_tokens"] + ledger[1]["completion_tokens"] > 0
    assert summary.done == 3 and all(v == 0 for v in r.finished.values())


# --- both signs: a neuron's negative side is its own unit, within the neuron's commit ------------------------------
class Signed(SyntheticRecordSource):
    """Synthetic records with bottom records (seq ids 5000 + neuron): neurons 0 and 2 go as far below 0 as above
    it, neuron 1 only a tenth as far (below records.negative_ratio = 0.5)."""

    def load(self, shard):
        out = super().load(shard)
        for n, recs in out.items():
            top = recs.top[0]
            depth = 0.1 if n == 1 else 1.0
            recs.bottom = [ActivationRecord(5000 + n, top.tokens, [-depth * x for x in top.activations], "bottom", 0)]
        return out


class SidedProcessor(InstantProcessor):
    """The instant method, failing (or hanging on) the negative sides of the neurons in `fail_negative`
    (`hang_negative`); `seen` keeps the records of every side it was given."""

    def __init__(self, cfg, fail_negative=(), hang_negative=()):
        super().__init__(cfg)
        self.fail_negative, self.hang_negative, self.seen = set(fail_negative), set(hang_negative), []

    async def __call__(self, records):
        self.seen.append(records)
        negative = records.top[0].seq_id >= 5000
        if negative and records.neuron in self.hang_negative:
            await asyncio.sleep(30)
        if negative and records.neuron in self.fail_negative:
            r = NeuronResult(records.layer, records.neuron)
            r.usage = {"explainer": Usage(100, 10)}
            r.error = f"layer 0 neuron {records.neuron}: ExplanationFailed: malformed"
            r.reason = FailureReason.MALFORMED
            return r
        return await super().__call__(records)


def sided_runner(tmp_path, **kw):
    cfg = SweepConfig.from_dict({"output": str(tmp_path), "neuron_deadline_s": 0.5, **PRICED})
    store = RunStore.open(str(tmp_path), create=True)
    proc = SidedProcessor(cfg, **kw)
    return ShardRunner(cfg, store, proc, Signed(cfg)), store, proc


def test_a_strong_negative_side_is_explained_in_the_same_commit_and_a_weak_one_is_not(tmp_path):
    r, store, proc = sided_runner(tmp_path)
    s = asyncio.run(r.run(Shard(0, (0, 1))))
    assert (s.done, s.failed) == (2, 0)
    sides = sorted((x["neuron"], x["polarity"]) for x in store.read_table("explanations").to_pylist())
    assert sides == [(0, "negative"), (0, "positive"), (1, "positive")]
    scores = {(x["neuron"], x["polarity"]): x for x in store.read_table("scores").to_pylist()}
    assert sorted(scores) == sides and scores[(0, "negative")]["seq_ids"] == [5000]
    negated = next(x for x in proc.seen if x.top[0].seq_id == 5000)  # the method ran on the bottom record, negated
    assert negated.top[0].activations == [-x for x in r.records.load(Shard(0, (0,)))[0].bottom[0].activations]
    ledger = {x["neuron"]: x for x in store.read_table("ledger").to_pylist()}
    assert ledger[0]["prompt_tokens"] == 2 * 14000 and ledger[1]["prompt_tokens"] == 14000  # both sides paid
    assert ledger[0]["cost_usd"] == pytest.approx(2 * NEURON_COST) and s.cost_usd == pytest.approx(3 * NEURON_COST)
    assert r.finished["prompt_tokens"] == 0  # counted by the commit now, both sides


def test_records_negative_off_explains_the_positive_side_only(tmp_path):
    cfg = SweepConfig(output=str(tmp_path), records={"negative": "off"})
    proc = SidedProcessor(cfg)
    r = ShardRunner(cfg, RunStore.open(str(tmp_path), create=True), proc, Signed(cfg))
    asyncio.run(r.run(Shard(0, (0,))))
    assert [x.top[0].seq_id for x in proc.seen] == [0]
    assert r.store.read_table("explanations")["polarity"].to_pylist() == ["positive"]


@pytest.mark.parametrize("kw, reason", [({"fail_negative": {0}}, "malformed"), ({"hang_negative": {0}}, "deadline")])
def test_a_failed_negative_side_leaves_its_neuron_done_and_says_why_in_its_scores(tmp_path, kw, reason):
    r, store, proc = sided_runner(tmp_path, **kw)
    s = asyncio.run(r.run(Shard(0, (0, 2))))
    assert (s.done, s.failed, s.failures) == (2, 0, {})
    ledger = {x["neuron"]: x for x in store.read_table("ledger").to_pylist()}
    assert (ledger[0]["status"], ledger[0]["reason"], ledger[0]["error"]) == ("done", None, None)
    assert sorted((x["neuron"], x["polarity"]) for x in store.read_table("explanations").to_pylist()) == [
        (0, "positive"), (2, "negative"), (2, "positive")]  # a failed side has no explanation
    failed = [x for x in store.read_table("scores").to_pylist() if (x["neuron"], x["polarity"]) == (0, "negative")]
    assert [(x["scorer"], x["score"], x["candidate"]) for x in failed] == [("correlation", None, None)]
    assert failed[0]["null_reason"].startswith(f"negative side failed ({reason}): ")
    if reason == "malformed":  # what the failed side spent counts in the neuron's row
        assert ledger[0]["prompt_tokens"] == 14000 + 100
    index = {x["neuron"]: x for x in RunReader(store).index().to_pylist()}
    assert index[0]["negative_explanation"] is None and index[0]["negative_score"] is None
    assert index[0]["negative_null_reason"].startswith("negative side failed") and index[0]["explanation"]


def test_a_failed_positive_side_skips_the_negative_one(tmp_path):
    cfg = SweepConfig(output=str(tmp_path))
    proc = SidedProcessor(cfg)
    proc.fail = frozenset({(0, 0)})  # InstantProcessor's planted failure, on either side
    r = ShardRunner(cfg, RunStore.open(str(tmp_path), create=True), proc, Signed(cfg))
    s = asyncio.run(r.run(Shard(0, (0,))))
    assert (s.done, s.failed) == (0, 1) and len(proc.seen) == 1
    assert r.store.read_table("scores").num_rows == 0


def test_a_lost_limiter_stops_the_shard_uncommitted(tmp_path):
    """A limiter gone with its driver fails no neuron: the shard stops with nothing written, and a resume
    redoes it whole."""
    from workers.llm.ratelimit import LimiterLostError

    class LosingLimiter(InstantProcessor):
        async def __call__(self, records):
            if records.neuron == 2:
                raise LimiterLostError("the shared rate limiter is gone (ActorDiedError): its driver has stopped")
            return await super().__call__(records)

    cfg = SweepConfig(output=str(tmp_path))
    store = RunStore.open(str(tmp_path), create=True)
    with pytest.raises(LimiterLostError):
        asyncio.run(ShardRunner(cfg, store, LosingLimiter(cfg), Source(cfg)).run(Shard(0, (0, 1, 2))))
    assert not store.exists(shard_marker(0)) and not store.list_files("ledger")
