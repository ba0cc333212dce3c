"""The run lease: one driver at a time works on a run directory.

A driver (`sweep`, `resume`, `extract`) takes the lease before it reads or writes anything of the run and gives
it back when it returns. The lease is a small JSON document (`LEASE_FILE`, schemas/layout.py) naming its holder:
user, host, pid, command, start time and a heartbeat that a thread of the holder renews every `heartbeat_s`.

- **Taking** creates the document only if none exists: `O_CREAT | O_EXCL` on a local disk, a PUT with
  `If-None-Match: *` on S3. A second driver is refused with a message naming the holder, so two drivers never
  both plan, pay for or commit the same run (and two started together with different configs cannot both write
  `run.json`).
- **Stale** leases are taken over, with a warning naming the old holder: its pid no longer runs on this host, or
  its heartbeat is older than `stale_after_s`. The takeover replaces exactly the document judged stale (under a
  file lock on a local disk, `If-Match` on its ETag on S3), so of two drivers that find one stale lease, one wins.
- **Lost**: a holder whose renewal finds another document in place (it was taken over while its process was
  paused or cut off) marks the lease lost; the driver stops scheduling (`check`), and each shard checks the lease
  before it commits (`check_holder`), so a driver that lost its lease stops committing.
- **Force** (`--force-unlock`): the operator removes whatever lease is there (the warning names it) and takes it.

What each store guarantees is in `RunLease.guarantee`: a local disk (with `flock`, including NFS with working
locks) and S3 through boto3 are exclusive; any other object store (GCS through pyarrow, or S3 without boto3) gets
a best-effort lease that is checked by reading back, with a warning that says so.
"""
from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow.fs as pafs

from orchestrator.store import RunDirectoryError, RunStore
from schemas.layout import LEASE_FILE, LEASE_GUARD, TMP_PREFIX

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER_S = 60.0  # a heartbeat older than this: the holder is taken to be gone


class LeaseHeldError(RunDirectoryError):
    """Another driver holds the run's lease."""


class LeaseLostError(RunDirectoryError):
    """The lease this driver (or the shard's driver) took is no longer its own."""


# --- the document ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeaseDoc:
    token: str
    user: str
    host: str
    pid: int
    command: str
    started_at: str  # ISO 8601
    heartbeat_at: float  # seconds since the epoch, by the holder's clock
    pid_start: int | None = None  # the holder process's start (Linux: clock ticks after boot), so a reused pid
    #                               (a restarted container's pid 1) is not taken for the holder

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, indent=2, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseDoc | None:
        """The document in `data`, or None for anything else (half written, or edited by hand)."""
        try:
            d = json.loads(data)
            return cls(token=str(d["token"]), user=str(d["user"]), host=str(d["host"]), pid=int(d["pid"]),
                       command=str(d["command"]), started_at=str(d["started_at"]),
                       heartbeat_at=float(d["heartbeat_at"]),
                       pid_start=int(d["pid_start"]) if d.get("pid_start") is not None else None)
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float) -> str:
        return (f"{self.user}@{self.host} pid {self.pid} ({self.command}), started {self.started_at}, "
                f"last heartbeat {max(0.0, now - self.heartbeat_at):.0f}s ago")


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (Linux), or None where there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot; Linux only, else None)."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def _alive_here(pid: int, started: int | None) -> bool:
    """Whether process `pid`, started at `started` (if known), runs on this host. A zombie (killed, not yet reaped
    by its parent) does not, nor does another process that got the same pid later."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    except OSError:
        return True  # cannot tell: let the heartbeat decide
    fields = _proc_stat(pid)
    if fields is None:
        return True
    if fields[0] == b"Z":
        return False
    return started is None or process_start(pid) in (None, started)


def stale_reason(doc: LeaseDoc, now: float, stale_after_s: float, host: str) -> str | None:
    """Why the lease `doc` is stale, or None while its holder may still be working."""
    if doc.host == host and not _alive_here(doc.pid, doc.pid_start):
        return f"pid {doc.pid} no longer runs on {host}"
    age = now - doc.heartbeat_at
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f}s (more than {stale_after_s:g}s)"
    return None


# --- where the document lives ----------------------------------------------------------------------------------------
class _LocalFile:
    """The lease on a local (or NFS) disk. Create, replace and delete hold an exclusive `flock` on a guard file for
    a moment, so a takeover replaces exactly the document it judged stale; `O_EXCL` makes creation exclusive even
    without it. The version of a document is its bytes."""

    guarantee = "exclusive (O_EXCL create, flock-guarded takeover)"

    def __init__(self, root: str):
        self.path = os.path.join(root, LEASE_FILE)
        self.guard = os.path.join(root, LEASE_GUARD)

    @contextmanager
    def _locked(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: O_EXCL still makes creation exclusive; a takeover race stays open
            yield
            return
        fd = os.open(self.guard, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # and with it the lock

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[bytes | None, object]:
        with self._locked():
            data = self._read()
        return data, data

    def mtime(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> object | None:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(os.path.dirname(self.path))
            return data

    def replace(self, data: bytes, version: object) -> object | None:
        with self._locked():
            if self._read() != version:
                return None
            tmp = os.path.join(os.path.dirname(self.path), f"{TMP_PREFIX}lease-{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(os.path.dirname(self.path))
            return data

    def delete(self, version: object) -> bool:
        with self._locked():
            if self._read() != version:
                return False
            os.unlink(self.path)
            return True


class _S3Object:
    """The lease on S3 through boto3: creation is a conditional PUT (`If-None-Match: *`), a renewal or takeover a
    PUT with `If-Match` on the ETag it read, a release a DELETE with `If-Match`. The version is the ETag."""

    guarantee = "exclusive (conditional PUT: If-None-Match / If-Match)"

    def __init__(self, client, bucket: str, key: str):
        self.client, self.bucket, self.key = client, bucket, key

    @staticmethod
    def _conflict(e) -> bool:
        err = getattr(e, "response", {}).get("Error", {})
        status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        return err.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404") or \
            status in (404, 409, 412)

    def read(self) -> tuple[bytes | None, object]:
        from botocore.exceptions import ClientError
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._conflict(e):
                return None, None
            raise
        return r["Body"].read(), r["ETag"]

    def mtime(self) -> float | None:
        return None  # heartbeat_at inside the document decides

    def _put(self, data: bytes, **cond) -> object | None:
        from botocore.exceptions import ClientError
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **cond)["ETag"]
        except ClientError as e:
            if self._conflict(e):
                return None
            raise

    def create(self, data: bytes) -> object | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: object) -> object | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: object) -> bool:
        from botocore.exceptions import ClientError
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
            return True
        except ClientError as e:
            if self._conflict(e):
                return False
            raise


class _StoreObject:
    """Any other store (GCS through pyarrow, S3 without boto3): no conditional write, so every step reads the
    document back to see whether it won. Two drivers that start within the same moment can both pass; the one whose
    document was overwritten finds out at its next renewal (lost) and stops."""

    guarantee = "best effort (no conditional create through this store: checked by reading back)"

    def __init__(self, store: RunStore):
        self.store = store
        self.path = store.path(LEASE_FILE)

    def read(self) -> tuple[bytes | None, object]:
        try:
            with self.store.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, data

    def mtime(self) -> float | None:
        info = self.store.fs.get_file_info(self.path)
        return info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime else None

    def _write_and_check(self, data: bytes) -> object | None:
        with self.store.fs.open_output_stream(self.path) as f:
            f.write(data)
        return data if self.read()[0] == data else None

    def create(self, data: bytes) -> object | None:
        return None if self.read()[0] is not None else self._write_and_check(data)

    def replace(self, data: bytes, version: object) -> object | None:
        return None if self.read()[0] != version else self._write_and_check(data)

    def delete(self, version: object) -> bool:
        if self.read()[0] != version:
            return False
        self.store.fs.delete_file(self.path)
        return True


def _backend(store: RunStore, s3_options: dict | None):
    if store.is_local:
        return _LocalFile(store.root)
    if isinstance(store.fs, pafs.S3FileSystem):
        try:
            import boto3
        except ImportError:
            return _StoreObject(store)
        bucket, _, prefix = store.root.partition("/")
        key = f"{prefix}/{LEASE_FILE}" if prefix else LEASE_FILE
        return _S3Object(_s3_client(boto3, s3_options or {}), bucket, key)
    return _StoreObject(store)


def _s3_client(boto3, opts: dict):
    """A boto3 client for the endpoint and keys of pyarrow's S3 options (else boto3's own defaults)."""
    kw = {"region_name": opts.get("region") or None}
    if opts.get("endpoint_override"):
        kw["endpoint_url"] = f"{opts.get('scheme', 'https')}://{opts['endpoint_override']}"
    if opts.get("access_key"):
        kw.update(aws_access_key_id=opts["access_key"], aws_secret_access_key=opts.get("secret_key", ""))
        if opts.get("session_token"):
            kw["aws_session_token"] = opts["session_token"]
    return boto3.client("s3", **kw)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


# --- the lease -------------------------------------------------------------------------------------------------------
class RunLease:
    """This driver's lease on one run directory (see the module docstring).

        with RunLease(store, command="neuronsweep sweep").acquire():
            ...                 # lease.check() between steps; lease.token for the shards' check_holder
    """

    def __init__(self, store: RunStore, *, command: str = "neuronsweep", s3_options: dict | None = None,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S, heartbeat_s: float | None = None,
                 clock: Callable[[], float] = time.time):
        if stale_after_s <= 0:
            raise ValueError(f"the lease timeout must be positive, got {stale_after_s}")
        self.store, self.command, self.clock = store, command, clock
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.05, stale_after_s / 4)
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.lost: str | None = None  # why this lease is no longer ours
        self._backend = _backend(store, s3_options)
        self._version: object = None
        self._started_at = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one write at a time: the heartbeat thread and release

    @property
    def guarantee(self) -> str:
        return self._backend.guarantee

    @property
    def where(self) -> str:
        return self.store.path(LEASE_FILE)

    def _doc(self) -> bytes:
        return LeaseDoc(self.token, _user(), self.host, os.getpid(), self.command, self._started_at,
                        self.clock(), process_start(os.getpid())).to_bytes()

    # --- taking and giving back ------------------------------------------------------------------------------------
    def acquire(self, *, force: bool = False) -> RunLease:
        """Take the lease (or raise `LeaseHeldError` naming its holder), then renew it in a thread until
        `release`. `force`: first remove whatever lease is there."""
        try:
            return self._acquire(force)
        except RunDirectoryError:
            raise
        except Exception as e:  # noqa: BLE001 - permissions, a store that cannot be reached: one line, not a trace
            raise RunDirectoryError(f"cannot take the run lease {self.where}: {type(e).__name__}: "
                                    f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None

    def _acquire(self, force: bool) -> RunLease:
        if isinstance(self._backend, _StoreObject):
            log.warning("the run lease on %s is %s", self.store.root, self._backend.guarantee)
        self._started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if force:
            self._force_remove()
        for _ in range(20):  # each round either takes the lease, refuses, or saw the lease change under it
            version = self._backend.create(self._doc())
            if version is not None:
                self._started(version)
                return self
            data, seen = self._backend.read()
            if data is None:
                continue  # released between our create and read: try again
            doc = LeaseDoc.parse(data)
            now = self.clock()
            if doc is None:
                why = self._unreadable_stale(now)
                if why is None:
                    raise LeaseHeldError(
                        f"{self.where} is not a lease document this version can read, and it changed in the last "
                        f"{self.stale_after_s:g}s; if no other driver works on {self.store.root}, rerun with "
                        f"--force-unlock")
            else:
                why = stale_reason(doc, now, self.stale_after_s, self.host)
                if why is None:
                    raise LeaseHeldError(
                        f"{self.store.root} is in use by another driver: {doc.describe(now)}. Wait for it to "
                        f"finish or stop it; if it is gone, rerun with --force-unlock (a lease whose heartbeat "
                        f"is {self.stale_after_s:g}s old is taken over by itself)")
            version = self._backend.replace(self._doc(), seen)
            if version is not None:
                held = doc.describe(now) if doc else "an unreadable lease"
                log.warning("took over the stale lease of %s on %s: %s", held, self.store.root, why)
                self._started(version)
                return self
        raise LeaseHeldError(f"{self.where} kept changing while this driver tried to take it; "
                             f"is another driver starting? Try again")

    def _unreadable_stale(self, now: float) -> str | None:
        mtime = self._backend.mtime()
        if mtime is not None and now - mtime <= self.stale_after_s:
            return None
        return "an unreadable lease document, unchanged for longer than the lease timeout"

    def _force_remove(self) -> None:
        data, version = self._backend.read()
        if data is None:
            return
        doc = LeaseDoc.parse(data)
        held = doc.describe(self.clock()) if doc else "an unreadable lease document"
        if self._backend.delete(version):
            log.warning("--force-unlock: removed the lease of %s on %s", held, self.store.root)

    def _started(self, version: object) -> None:
        self._version = version
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="neuronsweep-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.lost is None and self._version is not None:
                try:
                    self._backend.delete(self._version)
                except Exception as e:  # noqa: BLE001 - the lease goes stale and is taken over later
                    log.warning("could not remove the run lease %s (%s); the next driver takes it over once "
                                "it is stale", self.where, e)
            self._version = None

    def __enter__(self) -> RunLease:
        if self._version is None:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # --- while held ------------------------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.renew()
            if self.lost:
                return

    def renew(self) -> bool:
        """Write a new heartbeat; False (and `lost` says why) if the lease is no longer ours."""
        with self._lock:
            if self.lost or self._version is None:
                return False
            try:
                version = self._backend.replace(self._doc(), self._version)
            except Exception as e:  # noqa: BLE001 - a store hiccup: try again at the next beat
                log.warning("could not renew the run lease %s (%s); trying again", self.where, e)
                return True
            if version is not None:
                self._version = version
                return True
            data, _ = self._backend.read()
            doc = LeaseDoc.parse(data) if data else None
            self.lost = f"now held by {doc.describe(self.clock())}" if doc else "the lease document was removed"
            log.error("lost the run lease on %s: %s; this driver schedules no more shards", self.store.root,
                      self.lost)
            return False

    def check(self) -> None:
        """Raise `LeaseLostError` if the lease is no longer ours."""
        if self.lost:
            raise LeaseLostError(f"this driver lost the lease on {self.store.root} ({self.lost}) and stopped; "
                                 f"the run continues under the other driver")


def read_lease(store: RunStore) -> LeaseDoc | None:
    """The run's lease document as it is now (None: no lease, or one this version cannot read)."""
    try:
        with store.fs.open_input_stream(store.path(LEASE_FILE)) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return LeaseDoc.parse(data)


def lease_token(store: RunStore) -> str | None:
    doc = read_lease(store)
    return doc.token if doc else None


def check_holder(store: RunStore, token: str) -> None:
    """Raise `LeaseLostError` unless the run's lease holds `token`: what a shard checks just before it commits,
    so a driver that lost its lease stops committing (a commit already past this check still completes)."""
    doc = read_lease(store)
    if doc is None or doc.token != token:
        holder = doc.describe(time.time()) if doc else "no driver"
        raise LeaseLostError(f"not committed: the driver that started this shard no longer holds the lease on "
                             f"{store.root} (held by {holder})")
