"""One shard end to end: read its neurons' records, explain and score each, commit its rows.

`ShardRunner` is a plain class (tested without Ray); `ShardActor` in pipeline.py is the thin Ray wrapper.
A shard is committed when its marker exists: the tables' files are published first, the marker last, holding
the shard's `ShardSummary` and the list of files it commits (the only files readers read, orchestrator/commits.py).
File names are deterministic per commit, so a retried commit overwrites rather than duplicates.

A shard's first commit gives every neuron one ledger row; a failed one carries its `FailureReason` in the
`reason` column. `--retry-failed` commits the shard again under new names (`shard-<id>.v2`, ...): the kept
neurons' rows as they were, every earlier ledger row (a failed attempt was paid for), a new row for each redone
neuron, and every call of every commit in `calls/`. Until its new marker replaces the old one, readers see the
previous commit whole. The summary's spend is the shard's total over its commits, so each call counts once.

A neuron's explanations and scores cover both its sides (docs/method.md §1 "Both signs"; rows tagged with
`polarity`), but the neuron stays the unit of the ledger, the commit and a retry.
"""
from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow.compute as pc

from orchestrator.commits import shard_files
from orchestrator.lease import check_holder
from orchestrator.plan import Shard
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.failures import FailureReason
from schemas.layout import SHARD_TABLES, shard_file_name, shard_marker
from schemas.tables import NEGATIVE, POSITIVE, to_table
from workers.llm.backends.base import Usage
from workers.llm.ratelimit import LimiterLostError
from workers.llm.service import run_within
from workers.method.neuron import negative_side
from workers.method.records import ActivationRecord, NeuronRecords

if TYPE_CHECKING:
    from workers.method.neuron import NeuronResult


# --- what a shard reports --------------------------------------------------------------------------------------
@dataclass
class ShardSummary:
    """A shard's outcome: what `ShardRunner.run` returns and (less the in-memory fields) its marker holds.
    done/failed/skipped count each neuron's latest status; tokens, cost and requests are the shard's totals
    over all its commits (what was paid, once); `added_by` is what one commit added."""
    shard_id: str
    layer: int
    n: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # FailureReason value -> failed neurons
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0  # this commit's wall time
    requests: list[tuple[str, str, str, str, int]] = field(default_factory=list)  # role, provider, model, status, n
    tokens: list[tuple[str, str, str, str, int]] = field(default_factory=list)  # role, provider, model, kind, n
    committed_at: str | None = None  # ISO 8601
    commit: int = 1  # the shard's k-th commit (a retry of its failed neurons commits again)
    # in memory only: for the driver's metrics, never in the marker
    already_committed: bool = False  # run() found the marker and did nothing
    latencies: list[tuple[str, float]] = field(default_factory=list)  # (role, seconds) of paid calls
    waits: list[tuple[str, float]] = field(default_factory=list)  # (role, seconds) in the rate limiter
    previous: ShardSummary | None = None  # the commit this one replaced (a retry's), for `added_by`

    _IN_MEMORY = ("already_committed", "latencies", "waits", "previous")

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self._IN_MEMORY}

    @classmethod
    def from_json(cls, data: dict) -> ShardSummary:
        """A marker's summary; keys this version does not know are ignored and missing ones take their defaults,
        so markers written by earlier versions load."""
        known = {f.name for f in fields(cls)} - set(cls._IN_MEMORY)
        kw = {k: v for k, v in data.items() if k in known}
        for k in ("requests", "tokens"):
            kw[k] = [tuple(row) for row in kw.get(k, [])]
        return cls(**kw)


# --- where a shard's records come from -------------------------------------------------------------------------
class RecordSource(Protocol):
    def load(self, shard: Shard) -> dict[int, NeuronRecords]: ...


class StoreRecordSource:
    """Records from the run directory, joined with the window tokens stored once in `sequences/`."""

    def __init__(self, store: RunStore):
        self.store = store
        self._tokens: dict[int, list[str]] | None = None

    def tokens(self) -> dict[int, list[str]]:
        if self._tokens is None:
            t = self.store.read_table("sequences", columns=["seq_id", "tokens"])
            self._tokens = dict(zip(t.column("seq_id").to_pylist(), t.column("tokens").to_pylist()))
        return self._tokens

    def load(self, shard: Shard) -> dict[int, NeuronRecords]:
        from orchestrator.extraction.outputs import read_records

        t = read_records(self.store, shard.layer, shard.neurons[0], shard.neurons[-1] + 1,
                         columns=["neuron", "kind", "rank", "seq_id", "activations"])
        t = t.filter(pc.field("neuron").isin(list(shard.neurons)))
        tokens = self.tokens()
        out = {n: NeuronRecords(shard.layer, n) for n in shard.neurons}
        for row in sorted(t.to_pylist(), key=lambda r: (r["neuron"], r["kind"], r["rank"])):
            rec = ActivationRecord(row["seq_id"], tokens[row["seq_id"]], row["activations"], row["kind"], row["rank"])
            getattr(out[row["neuron"]], row["kind"]).append(rec)
        return out


# --- what happens to one neuron ------------------------------------------------------------------------------------
# an async function (or object with an async __call__): a coroutine, which `asyncio.run` also takes (cli/sweep.py)
NeuronProcessor = Callable[[NeuronRecords], Coroutine[Any, Any, "NeuronResult"]]


@dataclass
class CallTally:
    """The calls one shard made, gathered through a context variable from the LLM clients' `on_call`."""
    requests: Counter = field(default_factory=Counter)  # (role, provider, model, status) -> n
    tokens: Counter = field(default_factory=Counter)  # (role, provider, model, kind) -> n
    latencies: list = field(default_factory=list)  # (role, seconds), paid attempts only
    waits: list = field(default_factory=list)  # (role, seconds)
    keys: list = field(default_factory=list)  # journal keys of answered calls

    def add(self, e) -> None:
        self.requests[(e.role, e.provider, e.model, e.status)] += 1
        if e.status != "cached":
            self.tokens[(e.role, e.provider, e.model, "prompt")] += e.prompt_tokens
            self.tokens[(e.role, e.provider, e.model, "completion")] += e.completion_tokens
            self.latencies.append((e.role, e.latency_s))
            self.waits.append((e.role, e.limiter_wait_s))
        if e.key and e.status in ("ok", "cached"):
            self.keys.append(e.key)


CURRENT_TALLY: contextvars.ContextVar[CallTally | None] = contextvars.ContextVar("neuronsweep_tally", default=None)


def record_call(event) -> None:
    """`on_call` sink for LLM clients: counts the event against the shard whose task made it."""
    tally = CURRENT_TALLY.get()
    if tally is not None:
        tally.add(event)


def cost_usd(cfg: SweepConfig, usage: Mapping[str, Usage]) -> float:
    total = 0.0
    for role, u in usage.items():
        b = getattr(cfg, role, None)
        if b is not None:
            total += (u.prompt_tokens * b.price_input_per_mtok + u.completion_tokens * b.price_output_per_mtok) / 1e6
    return total


class ShardRunner:
    def __init__(self, cfg: SweepConfig, store: RunStore, processor: NeuronProcessor, records: RecordSource, *,
                 journal=None, now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)):
        self.cfg, self.store, self.processor, self.records = cfg, store, processor, records
        self.journal = journal
        self.now = now
        self._slots = asyncio.Semaphore(max(cfg.explainer.concurrency, cfg.simulator.concurrency))
        self.finished: Counter = Counter()  # neurons finished in shards not committed yet, by status (progress)
        self.lease_token: str | None = None  # the driver's run lease: checked before each commit (lease.py)

    async def run(self, shard: Shard, *, retry_failed: bool = False, retry_of: int | None = None) -> ShardSummary:
        """Process and commit one shard; returns its summary (also stored in its marker). With `retry_failed`,
        a committed shard with failed neurons redoes those; `retry_of` (the commit the caller saw) makes that
        happen once: a shard already committed past it (the retry ran, then its reply was lost) is left as is."""
        previous = self._committed(shard)
        if previous is not None and (not (retry_failed and previous.failed)
                                     or (retry_of is not None and previous.commit != retry_of)):
            return replace(previous, already_committed=True)
        tally = CallTally()
        CURRENT_TALLY.set(tally)  # this task's context: every call below counts against this shard
        started = time.monotonic()
        carried = self._carry_over(shard) if previous is not None else _Carried(todo=list(shard.neurons))
        records = await asyncio.to_thread(self.records.load, shard)
        outcomes = await asyncio.gather(*(self._neuron(records[n], carried.attempts.get(n, 0) + 1)
                                          for n in carried.todo))
        rows = {t: carried.rows.get(t, []) + [r for o in outcomes for r in o[t]]
                for t in ("explanations", "scores", "ledger")}
        rows["calls"] = _union_calls(carried.rows.get("calls", []),
                                     self.journal.rows_for(tally.keys) if self.journal is not None and tally.keys
                                     else [])
        summary = self._summary(shard, rows["ledger"], tally, time.monotonic() - started, previous)
        await asyncio.to_thread(self._commit, shard, rows, summary)
        for o in outcomes:  # now counted by the commit
            self._count_finished(o["ledger"][0], -1)
        return replace(summary, latencies=tally.latencies, waits=tally.waits, previous=previous)

    def _count_finished(self, ledger: dict, sign: int) -> None:
        """Neurons finished in shards not committed yet: by status, and their tokens and cost (progress lines)."""
        self.finished[ledger["status"]] += sign
        for k in ("prompt_tokens", "completion_tokens", "cost_usd"):
            self.finished[k] += sign * (ledger[k] or 0)

    @classmethod
    def committer(cls, cfg: SweepConfig, store: RunStore) -> ShardRunner:
        """A runner that only commits what its caller decided (`give_up`): it has no method and no records."""
        return cls(cfg, store, _no_method, _NoRecords())

    def give_up(self, shard: Shard, reason: FailureReason, error: str, *, attempts: int = 1,
                retry_of: int | None = None) -> ShardSummary:
        """Commit the shard with its unfinished neurons failed for `reason` (the driver's last word on a shard
        that keeps killing its actor): every neuron on a first commit, the failed ones on a retry (`retry_of`,
        as in `run`); a shard committed meanwhile is left as is. `attempts` counts the tries that ended so."""
        previous = self._committed(shard)
        if previous is not None and (retry_of is None or previous.commit != retry_of):
            return replace(previous, already_committed=True)
        carried = self._carry_over(shard) if previous is not None else _Carried(todo=list(shard.neurons))
        failed = [{"layer": shard.layer, "neuron": n, "status": "failed",
                   "attempts": carried.attempts.get(n, 0) + attempts, "error": error, "reason": reason.value,
                   "updated_at": self.now(), "shard_id": None, "prompt_tokens": 0, "completion_tokens": 0,
                   "cost_usd": 0.0, "elapsed_s": 0.0} for n in carried.todo]
        rows = {t: list(carried.rows.get(t, [])) for t in ("explanations", "scores", "calls")}
        rows["ledger"] = carried.rows.get("ledger", []) + failed
        summary = self._summary(shard, rows["ledger"], CallTally(), 0.0, previous)
        self._commit(shard, rows, summary)
        return replace(summary, previous=previous)

    # --- one neuron ----------------------------------------------------------------------------------------------
    async def _neuron(self, records: NeuronRecords, attempt: int) -> dict[str, list[dict]]:
        """One neuron's rows: its ledger row, and the explanations and scores of its positive side and, where the
        rule of docs/method.md §1 "Both signs" holds, of its negative side (`negative_side`). The ledger row's
        status is the positive side's; a failed negative side leaves the neuron done and is recorded as one
        null score per configured scorer, its `null_reason` saying why. Each side has `neuron_deadline_s`; the
        row's tokens and cost count both."""
        started = time.monotonic()
        status, error, reason = "done", None, None
        usage: Mapping[str, Usage] = {"explainer": Usage(), "simulator": Usage()}
        rows: dict[str, list[dict]] = {"explanations": [], "scores": []}
        if not records.top:
            status, error = "failed", "records: no records for this neuron (was extraction complete?)"
            reason = FailureReason.RECORDS
        elif max(r.max_activation for r in records.top) <= 0:
            status, error, reason = "skipped", "never activates above 0 on the corpus", FailureReason.DEAD
        else:
            async with self._slots:
                result, error, reason = await self._side(records)
                if result is not None:
                    usage = result.usage
                if error is not None:
                    status = "failed"
                else:
                    assert result is not None  # _side returns a result whenever there is no error
                    _add_side(rows, result, POSITIVE)
                    if (negated := negative_side(records, self.cfg)) is not None:
                        usage = _sum_usage(usage, await self._negative(negated, rows))
        ledger = {"layer": records.layer, "neuron": records.neuron, "status": status, "attempts": attempt,
                  "error": error, "reason": None if reason is None else reason.value, "updated_at": self.now(),
                  "shard_id": None,
                  "prompt_tokens": sum(u.prompt_tokens for u in usage.values()),
                  "completion_tokens": sum(u.completion_tokens for u in usage.values()),
                  "cost_usd": cost_usd(self.cfg, usage), "elapsed_s": time.monotonic() - started}
        self._count_finished(ledger, 1)
        return {**rows, "ledger": [ledger]}

    async def _negative(self, negated: NeuronRecords, rows: dict[str, list[dict]]) -> Mapping[str, Usage]:
        """Add the negative side's rows (or, when it failed, its null scores saying why); returns its usage."""
        result, error, reason = await self._side(negated)
        if error is None:
            assert result is not None
            _add_side(rows, result, NEGATIVE)
        else:
            rows["scores"] += _failed_side_rows(negated, self.cfg.scorers, NEGATIVE, error, reason)
        return result.usage if result is not None else {}

    async def _side(self, records: NeuronRecords) -> tuple[NeuronResult | None, str | None, FailureReason | None]:
        """The method on one side of a neuron: (its result, or None when it raised; the error, None when it is
        done; the error's reason)."""
        try:
            # charged time: waits in an in-process model's queue do not count (workers/llm/service.py)
            result = await run_within(self.processor(records), self.cfg.neuron_deadline_s)
        except TimeoutError:
            return None, (f"deadline: not finished within {self.cfg.neuron_deadline_s:g}s "
                          "(not counting waits for an in-process model)"), FailureReason.DEADLINE
        except LimiterLostError:
            raise  # the driver is gone: the shard stops uncommitted, to be redone whole by a resume
        except Exception as e:  # noqa: BLE001 - one neuron's bug must not sink its shard
            return None, f"error: {type(e).__name__}: {e}", reason_of(e)
        if result.error:
            return result, result.error, reason_of(result)
        return result, None, None

    # --- commit ----------------------------------------------------------------------------------------------------
    def _commit(self, shard: Shard, rows: dict, summary: ShardSummary) -> None:
        if self.lease_token is not None:  # a driver that lost its lease to another stops committing
            check_holder(self.store, self.lease_token)
        name = shard_file_name(shard.shard_id, summary.commit)
        for r in rows["ledger"]:
            r["shard_id"] = shard.shard_id
        files = {}
        for table in ("explanations", "scores", "ledger"):
            files[table] = [self.store.write_table(table, to_table(table, rows[table]), name, layer=shard.layer)]
        if rows["calls"]:
            files["calls"] = [self.store.write_table("calls", to_table("calls", rows["calls"]), name)]
        # last: the shard is now committed, and readers switch to exactly these files
        self.store.write_json(shard_marker(shard.shard_id), {**summary.to_json(), "files": files})

    def _committed(self, shard: Shard) -> ShardSummary | None:
        path = shard_marker(shard.shard_id)
        return ShardSummary.from_json(self.store.read_json(path)) if self.store.exists(path) else None

    def _carry_over(self, shard: Shard) -> _Carried:
        """For a new commit of a committed shard: its committed rows (every ledger row, every call; the
        explanations and scores of the neurons whose latest status is not failed) and the failed neurons to
        redo, with the attempts each has had."""
        rows = {}
        for table in SHARD_TABLES:
            paths = shard_files(self.store, shard.shard_id, table, shard.layer) or []
            rows[table] = [r for rel in paths if self.store.exists(rel)
                           for r in self.store.read_table_file(rel, table).to_pylist()]
        latest = _latest_rows(rows["ledger"])
        failed = {n: r["attempts"] or 1 for n, r in latest.items() if r["status"] == "failed"}
        for table in ("explanations", "scores"):
            rows[table] = [r for r in rows[table] if r["neuron"] not in failed]
        for table in ("explanations", "scores", "ledger"):
            for r in rows[table]:
                r["layer"] = shard.layer
        return _Carried(rows=rows, todo=[n for n in shard.neurons if n in failed], attempts=failed)

    def _summary(self, shard: Shard, ledger: list[dict], tally: CallTally, elapsed: float,
                 previous: ShardSummary | None) -> ShardSummary:
        latest = _latest_rows(ledger)
        status = Counter(r["status"] for r in latest.values())
        reasons = Counter(r.get("reason") or FailureReason.ERROR.value for r in latest.values()
                          if r["status"] == "failed")
        requests, tokens = Counter(tally.requests), Counter(tally.tokens)
        if previous is not None:  # the shard's totals: what its earlier commits' calls cost stays counted
            requests.update({tuple(k[:-1]): k[-1] for k in previous.requests})
            tokens.update({tuple(k[:-1]): k[-1] for k in previous.tokens})
        return ShardSummary(
            shard_id=shard.shard_id, layer=shard.layer, n=len(shard.neurons),
            done=status["done"], failed=status["failed"], skipped=status["skipped"], failures=dict(reasons),
            prompt_tokens=sum(r["prompt_tokens"] or 0 for r in ledger),
            completion_tokens=sum(r["completion_tokens"] or 0 for r in ledger),
            cost_usd=sum(r["cost_usd"] or 0.0 for r in ledger), elapsed_s=elapsed,
            requests=[(*k, v) for k, v in requests.items()], tokens=[(*k, v) for k, v in tokens.items()],
            committed_at=self.now().isoformat(), commit=previous.commit + 1 if previous is not None else 1,
        )


async def _no_method(records: NeuronRecords):
    raise RuntimeError("this ShardRunner only commits (ShardRunner.committer)")


class _NoRecords:
    def load(self, shard: Shard) -> dict[int, NeuronRecords]:
        raise RuntimeError("this ShardRunner only commits (ShardRunner.committer)")


@dataclass
class _Carried:
    """What a new commit of a shard takes over from its previous one (nothing, for a first commit)."""
    rows: dict[str, list[dict]] = field(default_factory=dict)  # table -> rows kept
    todo: list[int] = field(default_factory=list)  # neurons to (re)do
    attempts: dict[int, int] = field(default_factory=dict)  # neuron -> attempts it has had


def _add_side(rows: dict[str, list[dict]], result: NeuronResult, polarity: str) -> None:
    rows["explanations"] += [{**r, "polarity": polarity} for r in result.explanation_rows]
    rows["scores"] += [{**r, "polarity": polarity} for r in result.score_rows]


def _failed_side_rows(records: NeuronRecords, scorers: list[str], polarity: str, error: str,
                      reason: FailureReason | None) -> list[dict]:
    """A side that failed while its neuron is done: one null score per scorer, saying why."""
    why = f"{polarity} side failed ({(reason or FailureReason.ERROR).value}): {error}"
    return [{"layer": records.layer, "neuron": records.neuron, "scorer": name, "score": None, "null_reason": why,
             "polarity": polarity} for name in scorers]


def _sum_usage(a: Mapping[str, Usage], b: Mapping[str, Usage]) -> dict[str, Usage]:
    return {role: a.get(role, Usage()) + b.get(role, Usage()) for role in {**a, **b}}


def _latest_rows(ledger: list[dict]) -> dict[int, dict]:
    """neuron -> its latest ledger row (a shard's ledger lists each neuron's attempts in order)."""
    return {r["neuron"]: r for r in ledger}


def _union_calls(kept: list[dict], new: list[dict]) -> list[dict]:
    """The calls of every commit of a shard, each once (a key answered again from the journal is the same call)."""
    out = {r["key"]: r for r in new}
    out.update({r["key"]: r for r in kept})
    return sorted(out.values(), key=lambda r: r["key"])


def added_by(summary: ShardSummary, previous: ShardSummary | None) -> ShardSummary:
    """What one commit (`summary`) added to its shard over the commit before it (`previous`, None for a first
    commit): the neurons it finished (a retry finishes its failed neurons again, the kept ones are not counted a
    second time), the calls it made, their tokens and cost. Its failures are all new: a retry redoes every
    failed neuron."""
    if previous is None:
        return summary

    def minus(now: list[tuple], before: list[tuple]) -> list[tuple]:
        left = Counter({tuple(k[:-1]): k[-1] for k in now})
        left.subtract({tuple(k[:-1]): k[-1] for k in before})
        return [(*k, v) for k, v in left.items() if v > 0]

    return replace(summary, done=summary.done - previous.done, skipped=summary.skipped - previous.skipped,
                   prompt_tokens=summary.prompt_tokens - previous.prompt_tokens,
                   completion_tokens=summary.completion_tokens - previous.completion_tokens,
                   cost_usd=summary.cost_usd - previous.cost_usd,
                   requests=minus(summary.requests, previous.requests), tokens=minus(summary.tokens, previous.tokens))


def reason_of(source) -> FailureReason:
    """The `FailureReason` an exception or a failed `NeuronResult` carries in its `reason`, else ERROR (a bare
    bug, or an object from code that sets none; a foreign `.reason` such as an HTTP phrase is not one)."""
    reason = getattr(source, "reason", None)
    if isinstance(reason, FailureReason):
        return reason
    try:
        return FailureReason(reason) if isinstance(reason, str) else FailureReason.ERROR
    except ValueError:
        return FailureReason.ERROR
