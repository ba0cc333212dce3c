"""ShardRunner without Ray: commit, ledger, failures, deadlines, idempotent retries."""
import asyncio

import pytest

from testing.instant import InstantProcessor, SyntheticRecordSource
from orchestrator.plan import Shard
from orchestrator.shards import CallTally, ShardRunner, marker_path, record_call, CURRENT_TALLY
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from workers.method.neuron import NeuronResult
from workers.method.records import ActivationRecord, NeuronRecords


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
            return r
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
    assert (s["done"], s["failed"], s["skipped"]) == (2, 2, 1)
    assert s["failures"] == {"malformed": 1, "deadline": 1}
    ledger = {row["neuron"]: row for row in store.read_table("ledger").to_pylist()}
    assert sorted(ledger) == [0, 1, 2, 3, 4]
    assert ledger[2]["status"] == "failed" and ledger[2]["error"].startswith("deadline")
    assert ledger[3]["status"] == "skipped" and "never activates" in ledger[3]["error"]
    assert ledger[0]["shard_id"] == shard.shard_id and ledger[0]["attempts"] == 1
    assert sorted(store.read_table("explanations").column("neuron").to_pylist()) == [0, 4]
    assert sorted(store.read_table("scores").column("neuron").to_pylist()) == [0, 4]
    assert store.read_json(marker_path(shard.shard_id))["done"] == 2


def test_a_committed_shard_is_not_redone(tmp_path):
    r, store, proc = runner(tmp_path)
    shard = Shard(1, (5, 6))
    asyncio.run(r.run(shard))
    assert proc.calls == [5, 6]
    again = asyncio.run(r.run(shard))
    assert again["already_committed"] and proc.calls == [5, 6]
    assert store.read_table("ledger").num_rows == 2


def test_retry_failed_redoes_only_failed_neurons_and_keeps_the_rest(tmp_path):
    r, store, proc = runner(tmp_path, fail={1})
    shard = Shard(0, (0, 1, 2))
    asyncio.run(r.run(shard))
    proc.fail.clear()
    proc.calls.clear()
    s = asyncio.run(r.run(shard, retry_failed=True))
    assert proc.calls == [1]
    assert (s["done"], s["failed"]) == (3, 0)
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
    monkeypatch.setattr(store, "write_json", real)
    asyncio.run(r.run(shard))
    assert store.read_table("ledger").num_rows == 2  # overwritten, not duplicated
    assert store.read_table("explanations").num_rows == 2


def test_a_neuron_bug_is_recorded_not_raised(tmp_path):
    r, store, proc = runner(tmp_path)
    s = asyncio.run(r.run(Shard(0, (98, 99))))
    assert (s["done"], s["failed"]) == (1, 1)
    row = [x for x in store.read_table("ledger").to_pylist() if x["neuron"] == 99][0]
    assert row["error"] == "error: RuntimeError: bug"


def test_call_events_count_against_the_shard_that_made_them():
    from workers.llm.client import CallEvent

    async def shard_task(tag, n):
        tally = CallTally()
        CURRENT_TALLY.set(tally)
        for _ in range(n):
            await asyncio.sleep(0)
            record_call(CallEvent(role="explainer", provider="p", model=tag, status="ok", prompt_tokens=10,
                                  completion_tokens=2, key=f"{tag}-{_}"))
        return tally

    async def both():
        return await asyncio.gather(shard_task("a", 3), shard_task("b", 5))
    a, b = asyncio.run(both())
    assert sum(a.requests.values()) == 3 and sum(b.requests.values()) == 5
    assert a.tokens[("explainer", "p", "a", "prompt")] == 30 and len(b.keys) == 5
