"""One shard end to end: read its neurons' records, explain and score each, commit its rows.

`ShardRunner` is a plain class (tested without Ray); `ShardActor` in pipeline.py is the thin Ray wrapper.
A shard is committed when its marker exists: the tables' files are published first (deterministic names,
so a retry overwrites rather than duplicates), the marker last. Every neuron gets exactly one ledger row.
"""
from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping, Protocol

import pyarrow.compute as pc

from orchestrator.metrics import failure_reason
from orchestrator.plan import Shard
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.tables import to_table
from workers.llm.backends.base import Usage
from workers.method.records import ActivationRecord, NeuronRecords

MARKERS = "_markers"


def marker_path(shard_id: str) -> str:
    return f"{MARKERS}/{shard_id}.json"


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
        from orchestrator.extraction import read_records

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
NeuronProcessor = Callable[[NeuronRecords], Awaitable["object"]]  # -> workers.method.neuron.NeuronResult


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

    async def run(self, shard: Shard, *, retry_failed: bool = False) -> dict:
        """Process and commit one shard; returns its summary (also stored in its marker)."""
        previous = self._committed(shard)
        if previous is not None and not (retry_failed and previous.get("failed")):
            return {**previous, "already_committed": True}
        tally = CallTally()
        CURRENT_TALLY.set(tally)  # this task's context: every call below counts against this shard
        started = time.monotonic()
        keep, todo, attempts = self._carry_over(shard) if previous is not None else ({}, list(shard.neurons), {})
        records = await asyncio.to_thread(self.records.load, shard)
        outcomes = await asyncio.gather(*(self._neuron(records[n], attempts.get(n, 0) + 1) for n in todo))
        rows = {t: [r for o in outcomes for r in o[t]] for t in ("explanations", "scores", "ledger")}
        for t, kept in keep.items():
            rows[t] = kept + rows[t]
        summary = self._summary(shard, rows["ledger"], tally, time.monotonic() - started)
        await asyncio.to_thread(self._commit, shard, rows, tally, summary)
        return {**summary, "latencies": tally.latencies, "waits": tally.waits}

    # --- one neuron ----------------------------------------------------------------------------------------------
    async def _neuron(self, records: NeuronRecords, attempt: int) -> dict[str, list[dict]]:
        started = time.monotonic()
        status, error, result = "done", None, None
        usage = {"explainer": Usage(), "simulator": Usage()}
        if not records.top:
            status, error = "failed", "records: no records for this neuron (was extraction complete?)"
        elif max(r.max_activation for r in records.top) <= 0:
            status, error = "skipped", "never activates above 0 on the corpus"
        else:
            async with self._slots:
                try:
                    result = await asyncio.wait_for(self.processor(records), self.cfg.neuron_deadline_s)
                except TimeoutError:
                    status, error = "failed", f"deadline: not finished within {self.cfg.neuron_deadline_s:g}s"
                except Exception as e:  # noqa: BLE001 - one neuron's bug must not sink its shard
                    status, error = "failed", f"error: {type(e).__name__}: {e}"
            if result is not None:
                usage = result.usage
                if result.error:
                    status, error = "failed", result.error
        ledger = {"layer": records.layer, "neuron": records.neuron, "status": status, "attempts": attempt,
                  "error": error, "updated_at": self.now(), "shard_id": None,
                  "prompt_tokens": sum(u.prompt_tokens for u in usage.values()),
                  "completion_tokens": sum(u.completion_tokens for u in usage.values()),
                  "cost_usd": cost_usd(self.cfg, usage), "elapsed_s": time.monotonic() - started}
        ok = status == "done" and result is not None
        return {"explanations": result.explanation_rows if ok else [], "scores": result.score_rows if ok else [],
                "ledger": [ledger]}

    # --- commit ----------------------------------------------------------------------------------------------------
    def _commit(self, shard: Shard, rows: dict, tally: CallTally, summary: dict) -> None:
        name = f"shard-{shard.shard_id}"
        for r in rows["ledger"]:
            r["shard_id"] = shard.shard_id
        for table in ("explanations", "scores", "ledger"):
            self.store.write_table(table, to_table(table, rows[table]), name, layer=shard.layer)
        if self.journal is not None and tally.keys:
            self.store.write_table("calls", to_table("calls", self.journal.rows_for(tally.keys)), name)
        self.store.write_json(marker_path(shard.shard_id), summary)  # last: the shard is now committed

    def _committed(self, shard: Shard) -> dict | None:
        path = marker_path(shard.shard_id)
        return self.store.read_json(path) if self.store.exists(path) else None

    def _carry_over(self, shard: Shard):
        """For a retry of a committed shard: keep the rows of its done/skipped neurons, redo the failed ones."""
        name = f"shard-{shard.shard_id}"
        tables = {}
        for table in ("explanations", "scores", "ledger"):
            rel = self.store.table_file(table, name, shard.layer)
            t = self.store.read_table_file(rel, table) if self.store.exists(rel) else None
            tables[table] = t.to_pylist() if t is not None else []
        failed = {r["neuron"]: r["attempts"] or 1 for r in tables["ledger"] if r["status"] == "failed"}
        keep = {t: [r for r in rs if r["neuron"] not in failed] for t, rs in tables.items()}
        for rs in keep.values():
            for r in rs:
                r["layer"] = shard.layer
        return keep, [n for n in shard.neurons if n in failed], failed

    def _summary(self, shard: Shard, ledger: list[dict], tally: CallTally, elapsed: float) -> dict:
        status = Counter(r["status"] for r in ledger)
        reasons = Counter(failure_reason(r["error"]) for r in ledger if r["status"] == "failed")
        tokens = defaultdict(int)
        for r in ledger:
            tokens["prompt"] += r["prompt_tokens"] or 0
            tokens["completion"] += r["completion_tokens"] or 0
        return {
            "shard_id": shard.shard_id, "layer": shard.layer, "n": len(shard.neurons),
            "done": status["done"], "failed": status["failed"], "skipped": status["skipped"],
            "failures": dict(reasons), "prompt_tokens": tokens["prompt"], "completion_tokens": tokens["completion"],
            "cost_usd": sum(r["cost_usd"] or 0.0 for r in ledger), "elapsed_s": elapsed,
            "requests": [[*k, v] for k, v in tally.requests.items()],
            "tokens": [[*k, v] for k, v in tally.tokens.items()],
            "committed_at": self.now().isoformat(),
        }
