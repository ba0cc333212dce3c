"""A sweep of SAE latents end to end, as real processes on a real local Ray: two SAELens dictionaries built here
for the tiny llama (layer 0: planted latents that fire on known tokens, one dead latent; layer 1: random
latents, one dead), extracted in the fused forward pass, explained by the instant method on the stored records.
The driver is killed with SIGKILL at a seeded point and resumed: every latent is committed exactly once, the
dead ones skipped with reason `dead`; every table file names the unit source (weights sha256 included),
`status`, `show`, the viewer and the report name the unit kind, and a resume with another dictionary at the
same path is a one-line error."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.cli.app import main
from orchestrator.cli.app import out as cli_out
from orchestrator.plan import prepare_run
from orchestrator.store import RunStore
from schemas.config import ConfigError, SweepConfig
from schemas.tables import units_of
from support import planted_sae
from support.e2e_sweep import wait_until
from testing.models import tiny_model
from workers.units.dictionaries import save_saelens

ROOT = Path(__file__).resolve().parents[2]
D_SAE, DEAD, SHARD_SIZE, N_WINDOWS, SEQ_LEN = 24, 3, 4, 96, 16
HOOKS = {0: "blocks.0.hook_resid_pre", 1: "blocks.1.hook_resid_post"}
KILL_SEED = 20261201  # how many of layer 0's 6 shards are committed when the driver is killed (1..5)

# The driver in its own process: the instant method on the records the extraction stored. With a gate path,
# layer 1's latents wait for that file (never created), so the sweep is in flight when the test kills it.
DRIVER = r"""
import json, sys
from dataclasses import dataclass
from orchestrator.pipeline import run_sweep
from orchestrator.shards import StoreRecordSource
from schemas.config import SweepConfig
from testing.instant import InstantRunnerFactory

@dataclass(frozen=True)
class StoredRecordsInstant(InstantRunnerFactory):
    def __call__(self, cfg, env, store):
        runner = super().__call__(cfg, env, store)
        runner.records = StoreRecordSource(store)
        return runner

cfg = SweepConfig.from_dict(json.loads(sys.argv[1]))
gate = sys.argv[2] or None
o = run_sweep(cfg, {}, runner_factory=StoredRecordsInstant(delay_s=0.05, gate_file=gate, gate_from_layer=1),
              n_actors=1)
print("outcome", o.done, o.skipped, o.failed, o.complete, flush=True)
"""


@pytest.fixture(scope="module")
def saes(tmp_path_factory):
    """Two SAELens dictionaries side by side (one per layer), layer 0's planted tokens, the model's width."""
    from workers.extract.corpus import iter_windows

    tiny = tiny_model("llama")
    cfg = SweepConfig.from_dict({"corpus": {"seq_len": SEQ_LEN, "max_windows": N_WINDOWS}})
    windows = torch.tensor([w.token_ids for w in iter_windows(cfg.corpus, tiny.tokenizer)])
    root = tmp_path_factory.mktemp("saes")
    w, b, planted = planted_sae.planted_encoder(tiny, windows, D_SAE, DEAD)
    save_saelens(root / "L0", W_enc=w, b_enc=b, W_dec=w.T, b_dec=torch.zeros(w.shape[0]), hook_name=HOOKS[0])
    torch.manual_seed(3)
    w1, b1 = torch.randn(w.shape[0], D_SAE), torch.zeros(D_SAE)
    w1[:, DEAD], b1[DEAD] = 0.0, -1.0
    save_saelens(root / "L1", W_enc=w1, b_enc=b1, W_dec=w1.T, b_dec=torch.zeros(w.shape[0]), hook_name=HOOKS[1])
    return root, planted, w.shape[0]


def sweep_config(run: Path, saes: Path, address: str) -> dict:
    return {"model": {"name": "tiny-llama", "batch_size": 32}, "corpus": {"seq_len": SEQ_LEN, "max_windows": N_WINDOWS},
            "units": {"kind": "sae", "path": str(saes)}, "shard_size": SHARD_SIZE, "output": str(run),
            "metrics_port": 0, "ray_address": address}


def driver(cfg: dict, gate: str, log: Path) -> subprocess.Popen:
    """The driver script in its own process; its stderr goes to `log` (a pipe nobody reads could fill up)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(cfg), gate], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env, start_new_session=True, cwd=ROOT)


def committed(run: Path) -> int:
    markers = run / "_markers"
    return len([p for p in markers.iterdir() if p.suffix == ".json"]) if markers.is_dir() else 0


@pytest.mark.slow
def test_sae_latents_swept_killed_resumed_and_named(tmp_path, saes, ray_local, monkeypatch, capsys):
    sae_root, planted, d_model = saes
    run = tmp_path / "run"
    cfg = sweep_config(run, sae_root, ray_local.get_runtime_context().gcs_address)
    kill_at = random.Random(KILL_SEED).randint(1, D_SAE // SHARD_SIZE - 1)
    p = driver(cfg, str(tmp_path / "gate-never-opened"), tmp_path / "killed.log")
    try:
        wait_until(lambda: committed(run) >= kill_at or p.poll() is not None, 180, f"{kill_at} committed shards")
        assert p.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        os.kill(p.pid, signal.SIGKILL)  # the driver only; its actors are left for Ray to end with its job
        p.wait()
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    at_kill = committed(run)
    assert kill_at <= at_kill < 2 * D_SAE // SHARD_SIZE  # layer 1 waits at the gate: work was outstanding

    resumed = driver(cfg, "", tmp_path / "resumed.log")  # no gate: everything left runs
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "outcome" in out and out.split()[-1] == "True", out

    store = RunStore.open(str(run))
    ledger = store.read_table("ledger").to_pylist()
    keys = [(r["layer"], r["neuron"]) for r in ledger]
    assert sorted(keys) == [(layer, n) for layer in (0, 1) for n in range(D_SAE)]  # each latent exactly once
    dead = {k: r for k, r in zip(keys, ledger) if r["status"] == "skipped"}
    assert {(0, DEAD), (1, DEAD)} <= set(dead) and all(r["reason"] == "dead" for r in dead.values())
    assert all(ledger[keys.index((0, j))]["status"] == "done" for j in range(len(planted)))
    assert not [r for r in ledger if r["status"] == "failed"]
    done = sorted(k for k, r in zip(keys, ledger) if r["status"] == "done")
    for table in ("explanations", "scores"):
        t = store.read_table(table, columns=["layer", "neuron"]).to_pylist()
        assert sorted((r["layer"], r["neuron"]) for r in t) == done, table

    # the unit source, in run.json and every table file; sha256 as documented (workers/units/source.py)
    digests = [hashlib.sha256((sae_root / f"L{i}" / "sae_weights.safetensors").read_bytes()).hexdigest()
               for i in (0, 1)]
    expected = {"kind": "sae", "path": str(sae_root), "format": "saelens", "n_units": D_SAE, "activation": "relu",
                "hooks": {"0": HOOKS[0], "1": HOOKS[1]},
                "sha256": hashlib.sha256(f"{digests[0]}\n{digests[1]}\n".encode()).hexdigest()}
    assert json.loads((run / "run.json").read_text())["model"]["units"] == expected
    files = [f for f in run.rglob("*.parquet") if not any(part.startswith(("_", ".")) for part in
                                                          f.relative_to(run).parts)]
    tables = {f.relative_to(run).parts[0] for f in files}
    assert {"sequences", "records", "neuron_stats", "ledger", "explanations", "scores"} <= tables
    for f in files:
        assert units_of(pq.read_schema(f)) == expected, f

    # the commands name the kind: SAE latent, its hook and its dictionary
    monkeypatch.setattr(cli_out, "width", 400)  # one line per row, whatever the path's length
    assert main(["status", str(run)]) == 0
    assert (f"SAE latents: {D_SAE} per layer of {sae_root} (saelens, relu) at {HOOKS[0]}, {HOOKS[1]}; "
            f"sha256 {expected['sha256'][:12]}") in capsys.readouterr().out
    assert main(["show", str(run), "0", "0"]) == 0
    assert f"SAE latent 0 of layer 0 ({HOOKS[0]}, {sae_root}): done" in capsys.readouterr().out
    assert main(["show", str(run), "1", str(DEAD)]) == 0
    assert f"SAE latent {DEAD} of layer 1 ({HOOKS[1]}, {sae_root}): skipped" in capsys.readouterr().out
    from fastapi.testclient import TestClient

    from orchestrator.results.report import write_report
    from orchestrator.results.viewer.app import create_app
    page = TestClient(create_app(str(run))).get("/neuron/0/1").text
    assert f"<h1>SAE latent 1 of layer 0 ({HOOKS[0]}, {sae_root})</h1>" in page
    summary = write_report(store, tmp_path / "report")["summary"].read_text()
    assert f"- units: SAE latents: {D_SAE} per layer of {sae_root}" in summary

    # another dictionary at the same path: a resume is refused before any work, in one line
    old = (sae_root / "L1" / "sae_weights.safetensors").read_bytes()
    try:
        torch.manual_seed(4)
        save_saelens(sae_root / "L1", W_enc=torch.randn(d_model, D_SAE), b_enc=torch.zeros(D_SAE),
                     W_dec=torch.randn(D_SAE, d_model), b_dec=torch.zeros(d_model), hook_name=HOOKS[1])
        with pytest.raises(ConfigError) as e:
            prepare_run(SweepConfig.from_dict(cfg), store)
        message = str(e.value)
        assert "\n" not in message and "another dictionary" in message and "sha256" in message, message
        # and `neuronsweep extract` again does not take the finished extraction for the new dictionary's
        from orchestrator.extraction import run_extraction
        from workers.units.source import UnitsError
        with pytest.raises(UnitsError, match="another dictionary"):
            run_extraction(SweepConfig.from_dict(cfg), store, use_ray=False)
    finally:
        (sae_root / "L1" / "sae_weights.safetensors").write_bytes(old)
