"""The end-to-end sweeps' shared parts (test_sweep_e2e.py, test_kill_resume.py): the config of a small real
sweep (tiny GPT-2, real extraction, the method through the OpenAI-compatible test server), the checks of its
tables and journal, and the wait the kill tests (also test_fault_campaign.py, test_sae_sweep.py) poll with."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from schemas.config import SweepConfig

KEY_VAR, KEY = "NS_TEST_API_KEY", "sk-test-do-not-leak-4f9a1c"
ENV = {KEY_VAR: KEY}


def config(out, server, **kw) -> dict:
    backend = {"kind": "openai", "model": "rule-stub", "base_url": server.base_url, "api_key_env": KEY_VAR,
               "requests_per_minute": 60_000, "tokens_per_minute": 50_000_000, "concurrency": 16,
               "max_retries": 3, "timeout_s": 10}
    cfg = {"model": {"name": "tiny-gpt2", "batch_size": 16}, "corpus": {"seq_len": 16, "max_windows": 160},
           "layers": "0-1", "neurons": "0-11", "shard_size": 4, "output": str(out), "metrics_port": 0,
           "explainer": {**backend, "capabilities": "chat"},
           "simulator": {**backend, "capabilities": "chat_logprobs"},
           "scorers": ["correlation", "detection"]}
    for k, v in kw.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def table_rows(store, table, cols):
    t = store.read_table(table, columns=cols)
    return sorted(tuple(r[c] for c in cols) for r in t.to_pylist())


def assert_complete(store, planned=24):
    # a neuron's ledger has a row per attempt (a --retry-failed keeps the failed one: it was paid for)
    for table, extra in (("ledger", ["attempts"]), ("explanations", []), ("scores", ["scorer"])):
        rows = table_rows(store, table, ["layer", "neuron"] + extra)
        assert len(rows) == len(set(rows)), f"duplicate rows in {table}"
    latest = {}
    for layer, n, _attempts, status in table_rows(store, "ledger", ["layer", "neuron", "attempts", "status"]):
        latest[(layer, n)] = (layer, n, status)  # sorted by attempts: the last one stays
    ledger = sorted(latest.values())
    assert len(ledger) == planned
    done = {(layer, n) for layer, n, s in ledger if s == "done"}
    assert set(table_rows(store, "explanations", ["layer", "neuron"])) == done
    for scorer in ("correlation", "detection"):
        assert {(layer, n) for layer, n, s in table_rows(store, "scores", ["layer", "neuron", "scorer"])
                if s == scorer} == done


def journal_size(run: Path) -> int:
    db = run / "_journal" / "calls.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def write_config(path: Path, cfg: SweepConfig) -> str:
    """`cfg` as a YAML file for `neuronsweep sweep -c`; returns its path."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)
