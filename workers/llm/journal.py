"""The call journal: every answered LLM call, keyed by a hash of provider, endpoint, model and request, so that
after a crash or restart an identical request is answered from here and not paid for again.

A row's `status` says what the method made of the answer (workers/llm/verdict.py): `pending` when stored,
`ok` once the method accepted it, `rejected` when the method found it unusable (malformed, misaligned). Pending
and ok rows are replayed; a rejected row never is, and the next answer for its key replaces it. A verdict
lost in a crash leaves its row pending, and the replay is judged again.

Storage is SQLite in WAL mode with `synchronous=FULL`: every committed insert is fsync'd to the write-ahead log
before `put` returns, and a `kill -9` at any moment leaves either the whole row or none of it (SQLite's
journal recovery on the next open). SQLite's file locking also lets several processes on one machine (several
Ray actors) write the same journal at once. An append-only file would need its own torn-record detection and
cross-process locking, which SQLite already gets right.

The journal lives on node-local disk; the orchestrator copies the rows of a committed shard into the run
directory's `calls` table (`rows_for` / `export`) and can seed a fresh node's journal from it (`import_rows`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_random

from workers.llm.backends.base import ChatResponse, PromptLogprobsResponse, TokenAlternatives, TokensResponse, Usage
from workers.llm.redact import redact_url
from workers.llm.verdict import ACCEPTED, REJECTED, attach

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    provider TEXT, model TEXT, status TEXT,
    prompt_tokens INTEGER, completion_tokens INTEGER, latency_s REAL,
    response TEXT NOT NULL,
    at_ms INTEGER NOT NULL
)"""
_COLUMNS = ("key", "provider", "model", "status", "prompt_tokens", "completion_tokens", "latency_s", "response",
            "at_ms")
_REPLACE = ", ".join(f"{c}=excluded.{c}" for c in _COLUMNS[1:])  # an upsert's "take the new row"
PENDING = "pending"
KEY_SCHEME = "ns-2"  # part of every key; change it when what a request means changes (old rows then miss)


def endpoint_of(backend) -> str:
    """Which server answers a backend's requests: its credential-free URL (`endpoint`), or, for an in-process
    backend without one, its provider."""
    return getattr(backend, "endpoint", None) or backend.provider


def request_key(provider: str, model: str, request: dict, *, endpoint: str) -> str:
    """sha256 over the key scheme, provider, endpoint (credentials removed, so rotating a password keeps the
    hits), model and the canonical JSON of the request (every parameter; sorted keys, no whitespace)."""
    if "://" in endpoint:
        endpoint = redact_url(endpoint)
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    material = "\x00".join((KEY_SCHEME, provider, endpoint, model, canonical))
    return hashlib.sha256(material.encode()).hexdigest()


Response = ChatResponse | PromptLogprobsResponse | TokensResponse
_TYPES = {ChatResponse: "chat", PromptLogprobsResponse: "prompt_logprobs", TokensResponse: "tokens"}


def encode_response(response: Response) -> str:
    data = dataclasses.asdict(response)
    data.pop("cached", None)
    data["type"] = _TYPES[type(response)]
    return json.dumps(data, separators=(",", ":"))


def decode_response(text: str) -> Response:
    data = json.loads(text)
    usage = Usage(**data["usage"])
    if data["type"] == "tokens":
        return TokensResponse(tokens=data["tokens"], usage=usage, cached=True)
    if data["type"] == "chat":
        logprobs = None if data["logprobs"] is None else [TokenAlternatives(**t) for t in data["logprobs"]]
        return ChatResponse(text=data["text"], usage=usage, logprobs=logprobs, cached=True)
    # every other field as stored (e.g. `branches`): a replay must carry all that the answer carried
    extra = {f.name: data[f.name] for f in dataclasses.fields(PromptLogprobsResponse)
             if f.name not in ("usage", "cached") and f.name in data}
    return PromptLogprobsResponse(**extra, usage=usage, cached=True)


@retry(retry=retry_if_exception_type(sqlite3.OperationalError), stop=stop_after_delay(60),
       wait=wait_random(0.05, 0.5), reraise=True)
def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to write-ahead logging (it stays so). Switching needs the file to itself, and SQLite
    answers "database is locked" at once, without waiting, when another process opens it at that moment (seen
    when several shard actors start together), hence the retries; a file already in WAL mode is left alone."""
    if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        db.execute("PRAGMA journal_mode=WAL")


class CallJournal:
    """Thread-safe (one connection behind a lock) and multi-process safe (SQLite file locks)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=60000")
        _use_wal(self._db)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def get(self, key: str) -> Response | None:
        """The stored answer (cached=True, carrying a verdict hook), or None when there is none or it was
        rejected."""
        with self._lock:
            row = self._db.execute("SELECT response, status FROM calls WHERE key=? AND status IS NOT ?",
                                   (key, REJECTED)).fetchone()
        if row is None:
            return None
        response = decode_response(row[0])
        attach(response, self._verdict_hook(key, row[0], row[1]))
        return response

    def put(self, key: str, response: Response, *, provider: str, model: str,
            latency_s: float, status: str = PENDING) -> None:
        """Durable when it returns; hangs a verdict hook on `response`. The first answer for a key wins (a
        racing duplicate is ignored), except over a rejected one, which the new answer replaces."""
        raw = encode_response(response)
        row = (key, provider, model, status, response.usage.prompt_tokens, response.usage.completion_tokens,
               float(latency_s), raw, int(time.time() * 1000))
        with self._lock:
            self._db.execute(f"INSERT INTO calls VALUES ({','.join('?' * len(_COLUMNS))}) ON CONFLICT(key) "
                             f"DO UPDATE SET {_REPLACE} WHERE calls.status IS ?", (*row, REJECTED))
        attach(response, self._verdict_hook(key, raw, status))

    def set_status(self, key: str, response_json: str, status: str) -> bool:
        """Record a verdict on the row holding exactly this answer (a row since replaced by another answer
        keeps its own status); True if a row changed."""
        with self._lock:
            cur = self._db.execute("UPDATE calls SET status=? WHERE key=? AND response=? AND status IS NOT ?",
                                   (status, key, response_json, status))
            return cur.rowcount > 0

    def status(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT status FROM calls WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def _verdict_hook(self, key: str, response_json: str, status: str | None):
        known = [status]  # a verdict equal to the stored status costs no write (replays of accepted answers)

        async def on_verdict(verdict: str) -> None:
            if verdict not in (ACCEPTED, REJECTED):
                raise ValueError(f"unknown verdict {verdict!r} (allowed: {ACCEPTED}, {REJECTED})")
            if verdict != known[0]:
                known[0] = verdict
                await asyncio.to_thread(self.set_status, key, response_json, verdict)
        return on_verdict

    def __contains__(self, key: str) -> bool:
        """True when `get(key)` would answer (a rejected answer does not count)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM calls WHERE key=? AND status IS NOT ?",
                                    (key, REJECTED)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def keys(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT key FROM calls ORDER BY at_ms, key")]

    # --- rows of the `calls` table (schemas/tables.py CALLS) -------------------------------------------------
    def rows_for(self, keys: Iterable[str]) -> list[dict]:
        keys = list(dict.fromkeys(keys))
        out: list[dict] = []
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                cur = self._db.execute(
                    f"SELECT {','.join(_COLUMNS)} FROM calls WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                out.extend(_to_table_row(r) for r in cur)
        return sorted(out, key=lambda r: r["key"])

    def export(self) -> list[dict]:
        with self._lock:
            return [_to_table_row(r) for r in self._db.execute(f"SELECT {','.join(_COLUMNS)} FROM calls ORDER BY key")]

    def import_rows(self, rows: Iterable[dict]) -> int:
        """Seed from `calls` rows (e.g. read back from the run directory), statuses kept; returns how many
        were new. A key already here keeps its row, unless that row is rejected and the imported one is not."""
        values = []
        for r in rows:
            at = r.get("at")
            at_ms = int(at.timestamp() * 1000) if isinstance(at, dt.datetime) else int(time.time() * 1000)
            values.append((r["key"], r.get("provider"), r.get("model"), r.get("status") or "ok",
                           r.get("prompt_tokens"), r.get("completion_tokens"), r.get("latency_s"), r["response"],
                           at_ms))
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(f"INSERT INTO calls VALUES ({','.join('?' * len(_COLUMNS))}) ON CONFLICT(key) "
                                     f"DO UPDATE SET {_REPLACE} WHERE calls.status IS '{REJECTED}' "
                                     f"AND excluded.status IS NOT '{REJECTED}'", values)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _to_table_row(r: tuple) -> dict:
    row = dict(zip(_COLUMNS, r))
    row["at"] = dt.datetime.fromtimestamp(row.pop("at_ms") / 1000, tz=dt.timezone.utc)
    return row
