"""The run lease (orchestrator/lease.py) between real processes, on a local disk and on S3 (a moto server):
one holder at a time, a refusal that names the holder, takeover of a dead or silent holder, a holder that learns
it lost the lease, and --force-unlock."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from orchestrator.lease import LeaseHeldError, LeaseLostError, RunLease, check_holder, read_lease
from orchestrator.store import RunStore
from schemas.layout import LEASE_FILE

# A driver stand-in in its own process: takes the lease on argv[1] (once the file argv[3] exists, so that
# several start together), prints `held PID` or `refused MESSAGE`, holds until its stdin closes, then releases.
HOLDER = r"""
import json, os, sys, time
from orchestrator.lease import LeaseHeldError, RunLease
from orchestrator.store import RunStore
uri, opts, go, stale = sys.argv[1], json.loads(sys.argv[2]) or None, sys.argv[3], float(sys.argv[4])
store = RunStore.open(uri, s3_options=opts, create=not uri.startswith("s3://"))
lease = RunLease(store, command="test holder", s3_options=opts, stale_after_s=stale, heartbeat_s=0.1)
print("ready", flush=True)
while go and not os.path.exists(go):
    time.sleep(0.002)
try:
    lease.acquire()
except LeaseHeldError as e:
    print("refused", e, flush=True)
    sys.exit(3)
print("held", os.getpid(), flush=True)
sys.stdin.read()
lease.release()
"""


class Run:
    """A run directory (local or S3) and how to open it."""

    def __init__(self, uri: str, s3_options: dict | None):
        self.uri, self.s3_options = uri, s3_options
        self.store = RunStore.open(uri, s3_options=s3_options, create=not uri.startswith("s3://"))

    def lease(self, **kw) -> RunLease:
        return RunLease(self.store, command="test", s3_options=self.s3_options, **kw)

    def holder(self, go: str = "", stale_after_s: float = 60.0) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", HOLDER, self.uri, json.dumps(self.s3_options or {}), go,
                                 str(stale_after_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def s3_server():
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"endpoint_override": f"{host}:{port}", "scheme": "http", "access_key": "test", "secret_key": "test",
            "region": "us-east-1", "allow_bucket_creation": True}
    pafs.S3FileSystem(**opts).create_dir("leases")
    yield opts
    server.stop()


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path) -> Run:
    if request.param == "local":
        return Run(str(tmp_path / "run"), None)
    opts = request.getfixturevalue("s3_server")
    return Run(f"s3://leases/{tmp_path.name}", opts)


def first_line(p: subprocess.Popen) -> str:
    return p.stdout.readline().strip()


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.stdin.close()
        p.wait(timeout=60)


def test_of_drivers_started_together_exactly_one_takes_the_lease(run, tmp_path):
    go = str(tmp_path / "go")
    procs = [run.holder(go) for _ in range(5)]
    try:
        assert [first_line(p) for p in procs] == ["ready"] * 5
        open(go, "w").close()
        outcomes = [first_line(p) for p in procs]
        held = [o for o in outcomes if o.startswith("held ")]
        assert len(held) == 1, outcomes
        winner = int(held[0].split()[1])
        refused = [o for o in outcomes if o.startswith("refused ")]
        assert len(refused) == 4
        # the refusal names the holder and what to do
        assert all("in use by another driver: " in o and f"pid {winner} (test holder)" in o
                   and socket.gethostname() in o and "--force-unlock" in o for o in refused)
    finally:
        for p in procs:
            stop(p)
    assert read_lease(run.store) is None  # the winner gave it back
    run.lease().acquire().release()


def test_a_live_holder_keeps_its_lease_by_its_heartbeat(run):
    holder = run.holder()
    try:
        assert first_line(holder) == "ready" and first_line(holder).startswith("held ")
        first = read_lease(run.store).heartbeat_at
        time.sleep(1.5)
        assert read_lease(run.store).heartbeat_at > first  # renewed every 0.1 s
        # a contender whose timeout (1 s) is far above the holder's heartbeat period finds it fresh
        with pytest.raises(LeaseHeldError, match=f"pid {holder.pid} "):
            run.lease(stale_after_s=1.0).acquire()
    finally:
        stop(holder)


def test_a_killed_holders_lease_is_taken_over_with_a_warning(run, caplog):
    holder = run.holder()
    assert first_line(holder) == "ready" and first_line(holder) == f"held {holder.pid}"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_lease(run.store).pid == holder.pid  # it never gave the lease back
    with caplog.at_level(logging.WARNING, logger="orchestrator.lease"):
        lease = run.lease().acquire()
    try:
        assert read_lease(run.store).token == lease.token
        assert f"took over the stale lease of {read_user()}@{socket.gethostname()} pid {holder.pid}" in caplog.text
        assert f"pid {holder.pid} no longer runs on {socket.gethostname()}" in caplog.text
    finally:
        lease.release()


def read_user() -> str:
    import getpass
    return getpass.getuser()


def test_a_lease_from_another_host_is_stale_only_once_its_heartbeat_is_old(run):
    now = 1_000_000.0
    doc = {"token": "t-other", "user": "ops", "host": "elsewhere.invalid", "pid": 1, "command": "neuronsweep sweep",
           "started_at": "2026-01-01T00:00:00+00:00", "heartbeat_at": now - 50}
    run.store.write_json(LEASE_FILE, doc)
    with pytest.raises(LeaseHeldError, match=r"ops@elsewhere.invalid pid 1 \(neuronsweep sweep\), started "
                                             r"2026-01-01T00:00:00\+00:00, last heartbeat 50s ago"):
        run.lease(stale_after_s=60, clock=lambda: now).acquire()
    lease = run.lease(stale_after_s=60, clock=lambda: now + 11).acquire()  # 61 s without a heartbeat
    try:
        assert read_lease(run.store).token == lease.token
    finally:
        lease.release()


def test_force_unlock_takes_a_live_lease_and_the_old_holder_learns_it_lost(run, caplog):
    old = run.lease(heartbeat_s=3600).acquire()  # renewals by hand below
    assert old.renew()
    with caplog.at_level(logging.WARNING, logger="orchestrator.lease"):
        new = run.lease(heartbeat_s=3600).acquire(force=True)
    assert "--force-unlock: removed the lease of" in caplog.text
    check_holder(run.store, new.token)
    with pytest.raises(LeaseLostError, match="no longer holds the lease"):
        check_holder(run.store, old.token)  # what the old driver's shards check before they commit
    assert not old.renew()
    assert old.lost and old.lost.startswith("now held by ")
    with pytest.raises(LeaseLostError, match="lost the lease"):
        old.check()
    old.release()  # must not remove the new holder's lease
    assert read_lease(run.store).token == new.token
    new.release()
    assert read_lease(run.store) is None


def test_an_unreadable_lease_is_refused_while_recent_and_taken_once_old(tmp_path):
    store = RunStore.open(str(tmp_path / "run"), create=True)
    path = tmp_path / "run" / LEASE_FILE
    path.write_text('{"token": "half wri')
    with pytest.raises(LeaseHeldError, match=f"{path} is not a lease document .* --force-unlock"):
        RunLease(store, stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    lease = RunLease(store, stale_after_s=60).acquire()
    try:
        assert read_lease(store).token == lease.token
    finally:
        lease.release()


def test_leftover_temporary_files_are_removed_and_nothing_else(tmp_path):
    store = RunStore.open(str(tmp_path / "run"), create=True)
    store.write_json("_markers/L000-000000-000003.json", {"shard_id": "L000-000000-000003"})
    for rel in ("_tmp-1a2b", "ledger/layer=0/_tmp-3c4d", "_markers/_tmp-5e6f"):
        (tmp_path / "run" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / rel).write_bytes(b"half")
    (tmp_path / "run" / "ledger/layer=0/shard-L000-000000-000003.parquet").write_bytes(b"kept")
    removed = store.remove_temporary_files()
    assert sorted(os.path.relpath(p, tmp_path / "run") for p in removed) == [
        "_markers/_tmp-5e6f", "_tmp-1a2b", "ledger/layer=0/_tmp-3c4d"]
    left = sorted(str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert left == ["_markers/L000-000000-000003.json", "ledger/layer=0/shard-L000-000000-000003.parquet"]


def test_a_reused_pid_on_this_host_does_not_keep_a_dead_holders_lease(tmp_path):
    """A restarted container's driver may get the pid of the one before it (pid 1): the process start time tells
    them apart."""
    from orchestrator.lease import process_start

    store = RunStore.open(str(tmp_path / "run"), create=True)
    now = time.time()
    doc = {"token": "t-before", "user": "ops", "host": socket.gethostname(), "pid": os.getpid(), "command": "sweep",
           "started_at": "2026-01-01T00:00:00+00:00", "heartbeat_at": now, "pid_start": process_start(os.getpid())}
    store.write_json(LEASE_FILE, doc)
    with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()} "):  # this very process: alive
        RunLease(store).acquire()
    store.write_json(LEASE_FILE, {**doc, "pid_start": process_start(os.getpid()) - 1})  # an earlier process
    lease = RunLease(store).acquire()
    try:
        assert read_lease(store).token == lease.token
    finally:
        lease.release()
