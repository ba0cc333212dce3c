"""The call journal: every successful LLM call, keyed by a hash of provider, model and request, so that after a
crash or restart an identical request is answered from here and not paid for again.

Storage is SQLite in WAL mode with `synchronous=FULL`: every committed insert is fsync'd to the write-ahead log
before `put` returns, and a `kill -9` at any moment leaves either the whole row or none of it (SQLite's
journal recovery on the next open). SQLite's file locking also lets several processes on one machine (several
Ray actors) write the same journal at once. An append-only file would need its own torn-record detection and
cross-process locking, which SQLite already gets right.

The journal lives on node-local disk; the orchestrator copies the rows of a committed shard into the run
directory's `calls` table (`rows_for` / `export`) and can seed a fresh node's journal from it (`import_rows`).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable

from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_random

from workers.llm.backends.base import ChatResponse, PromptLogprobsResponse, TokenAlternatives, Usage

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


def request_key(provider: str, model: str, request: dict) -> str:
    """sha256 over provider, model and the canonical JSON of the request (sorted keys, no whitespace)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{provider}\x00{model}\x00{canonical}".encode()).hexdigest()


def encode_response(response: ChatResponse | PromptLogprobsResponse) -> str:
    data = dataclasses.asdict(response)
    data.pop("cached", None)
    data["type"] = "chat" if isinstance(response, ChatResponse) else "prompt_logprobs"
    return json.dumps(data, separators=(",", ":"))


def decode_response(text: str) -> ChatResponse | PromptLogprobsResponse:
    data = json.loads(text)
    usage = Usage(**data["usage"])
    if data["type"] == "chat":
        logprobs = None if data["logprobs"] is None else [TokenAlternatives(**t) for t in data["logprobs"]]
        return ChatResponse(text=data["text"], usage=usage, logprobs=logprobs, cached=True)
    return PromptLogprobsResponse(positions=data["positions"], usage=usage, cached=True)


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

    def get(self, key: str) -> ChatResponse | PromptLogprobsResponse | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM calls WHERE key=?", (key,)).fetchone()
        return None if row is None else decode_response(row[0])

    def put(self, key: str, response: ChatResponse | PromptLogprobsResponse, *, provider: str, model: str,
            latency_s: float, status: str = "ok") -> None:
        """Durable when it returns. The first answer for a key wins (a racing duplicate is ignored)."""
        row = (key, provider, model, status, response.usage.prompt_tokens, response.usage.completion_tokens,
               float(latency_s), encode_response(response), int(time.time() * 1000))
        with self._lock:
            self._db.execute(f"INSERT OR IGNORE INTO calls VALUES ({','.join('?' * len(_COLUMNS))})", row)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM calls WHERE key=?", (key,)).fetchone() is not None

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
        """Seed from `calls` rows (e.g. read back from the run directory); returns how many were new."""
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
                self._db.executemany(f"INSERT OR IGNORE INTO calls VALUES ({','.join('?' * len(_COLUMNS))})", values)
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
