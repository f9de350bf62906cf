"""One run at a time per output: an exclusive, renewed lease on ``<output>/_curate/lease.json``.

A run takes the lease before it writes anything and gives it back at the end. The lease names its
holder (host, pid, start time, a run id) and when it expires; a heartbeat thread renews it every
``ttl / 4`` seconds, so a live run's lease never expires and a dead run's lease expires ``ttl``
seconds after its last renewal.

How the lease is made exclusive depends on where the output lives:

- **local paths** (and NFS mounts): ``flock`` on ``_curate/lock`` (released by the kernel when
  the process dies, even on ``kill -9``); the holder is written into ``_curate/lease.json`` for the
  error message. On NFS, ``flock`` is emulated with POSIX byte-range locks (Linux >= 2.6.12), which
  NFSv4 (and v3 with a working lock manager, NLM) enforces across clients; ``nolock`` mounts and
  servers without locking make it per-client only.
- **s3://**: a conditional create of ``lease.json`` (``PUT`` with ``If-None-Match: *``): of two
  runs, exactly one creates it. Renewal rewrites it with ``If-Match: <our ETag>``, so a run whose
  lease was taken over notices it (and stops before writing more); an expired lease is taken over
  with ``If-Match: <its ETag>``, so of two runs taking over the same stale lease, one wins.
- **other fsspec stores** (``memory://``, ``gs://``...): an existence check then a write, which is
  not atomic (two runs starting in the same instant can both pass), but expiry, heartbeat and the
  holder's name work the same.

A lease held by a live run is refused with ``LeaseHeld`` (the runner's ``OutputLocked``, exit code 4) naming the holder. A
stale lease (expired: its run died without giving it back) is taken over with a warning. ``curate
run --break-lock HOLDER`` takes over a lease that has not expired, when ``HOLDER`` is its holder's
id as the error prints it (``host:pid``): for a run known to be dead, without waiting ``ttl``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any

log = logging.getLogger("curate")

LEASE_FILE = "lease.json"
#: seconds a lease lasts without renewal (``CURATE_LEASE_TTL`` overrides it)
DEFAULT_TTL = 120.0


class LeaseHeld(Exception):
    """Another run holds the output's lease."""


def lease_ttl() -> float:
    try:
        return max(1.0, float(os.environ.get("CURATE_LEASE_TTL", DEFAULT_TTL)))
    except ValueError:
        return DEFAULT_TTL


def _holder_id(h: dict) -> str:
    return f"{h.get('host')}:{h.get('pid')}"


def describe_holder(lease: dict) -> str:
    h = lease.get("holder") or {}
    left = lease.get("expires", 0) - time.time()
    return (f"{_holder_id(h)} (run {h.get('run_id')}, started {h.get('started')}, lease "
            + (f"renewed {time.time() - lease.get('renewed', 0):.0f}s ago, expires in {left:.0f}s)" if left > 0
               else f"expired {-left:.0f}s ago)"))


class _Conflict(Exception):
    """A conditional write lost: someone else wrote the lease first."""


class Lease:
    """The lease of one run on one output (a ``Layout``)."""

    def __init__(self, layout: Any, *, ttl: float | None = None, break_lock: str | None = None):
        from curate.pipeline.io import is_local, join

        self.layout = layout
        self.fs = layout.fs
        self.path = join(layout.root, "_curate", LEASE_FILE)
        self.ttl = ttl or lease_ttl()
        self.break_lock = break_lock
        self.local = is_local(self.fs)
        self.s3 = "s3" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,))
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": uuid.uuid4().hex[:12],
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.etag: str | None = None
        self.lost: str | None = None     # why the lease was lost (set by the heartbeat)
        self._fh = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the lease record ---------------------------------------------------------------------------
    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.holder, "renewed": now, "expires": now + self.ttl,
                           "ttl": self.ttl}, sort_keys=True).encode()

    def read(self) -> tuple[dict | None, str | None]:
        """The lease on the store and its ETag (S3), or (None, None)."""
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            from fsspec.asyn import sync

            async def get() -> tuple[bytes, str | None]:
                out = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
                body = out["Body"]
                try:
                    return await body.read(), out.get("ETag")
                finally:
                    body.close()

            try:
                data, etag = sync(self.fs.loop, get)
                return json.loads(data), etag
            except FileNotFoundError:
                return None, None
            except ValueError:
                return {}, None
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read()), None
        except FileNotFoundError:
            return None, None
        except ValueError:   # a torn or foreign file: treated as an expired lease
            return {}, None

    def _put(self, *, if_none_match: bool = False, if_match: str | None = None) -> None:
        data = self._record()
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            cond: dict[str, str] = {}
            if if_none_match:
                cond["IfNoneMatch"] = "*"
            if if_match:
                cond["IfMatch"] = if_match
            try:
                out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
            except Exception as exc:  # noqa: BLE001 - s3fs maps 412 to various errors; check below
                if _precondition_failed(exc):
                    raise _Conflict(str(exc)) from None
                raise
            self.etag = out.get("ETag")
            self.fs.invalidate_cache(self.path)
            return
        from curate.pipeline.io import atomic_write_bytes
        atomic_write_bytes(self.fs, self.path, data)

    # -- acquire / renew / release ------------------------------------------------------------------
    def acquire(self) -> "Lease":
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        if self.local:
            self._acquire_local()
        else:
            self._acquire_remote()
        self._thread = threading.Thread(target=self._heartbeat, name="curate-lease", daemon=True)
        self._thread.start()
        return self

    def _acquire_local(self) -> None:
        import fcntl

        fh = open(os.path.join(os.path.dirname(self.path), "lock"), "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            lease, _ = self.read()
            who = describe_holder(lease) if lease else "another process"
            raise LeaseHeld(f"another curate run is writing {self.layout.url}: {who}; wait for it or "
                               "stop it") from None
        self._fh = fh
        self._put()   # who holds it, for the message of the next run

    def _acquire_remote(self) -> None:
        for _ in range(3):
            lease, etag = self.read()
            if lease is None:
                try:
                    self._put(if_none_match=True)
                    return
                except _Conflict:
                    continue     # another run created it in between: look again
            expired = lease.get("expires", 0) < time.time()
            named = self.break_lock is not None and self.break_lock == _holder_id(lease.get("holder") or {})
            if not (expired or named):
                raise LeaseHeld(
                    f"another curate run holds the lease on {self.layout.url}: {describe_holder(lease)}. "
                    f"Wait for it to finish; if it is dead, its lease expires {self.ttl:.0f}s after its last "
                    f"renewal, or take over now with --break-lock {_holder_id(lease.get('holder') or {})}")
            log.warning("taking over the %s lease on %s held by %s", "broken" if named and not expired else "stale",
                        self.layout.url, describe_holder(lease) if lease else "an unreadable record")
            try:
                self._put(if_match=etag) if self.s3 and etag else self._put()
                return
            except _Conflict:
                continue         # another run took it over first: look again
        raise LeaseHeld(f"could not take the lease on {self.layout.url}: other runs keep changing it")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried; expiry is ttl away
                log.warning("could not renew the lease on %s (%s: %s)", self.layout.url, type(exc).__name__, exc)

    def renew(self) -> None:
        if self.local:
            self._put()
            return
        if self.s3:
            try:
                self._put(if_match=self.etag)
            except _Conflict:
                lease, _ = self.read()
                self.lost = f"taken over by {describe_holder(lease) if lease else 'another run'}"
                self._stop.set()
            return
        lease, _ = self.read()
        if lease is not None and (lease.get("holder") or {}).get("run_id") != self.holder["run_id"]:
            self.lost = f"taken over by {describe_holder(lease)}"
            self._stop.set()
            return
        self._put()

    def check(self) -> None:
        """Raise ``LeaseHeld`` when the lease was lost (taken over): stop writing."""
        if self.lost:
            raise LeaseHeld(f"the lease on {self.layout.url} was {self.lost}; this run stops without "
                               "writing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if not self.lost:
                if self.s3 and self.etag:
                    bucket, key, _ = self.fs.split_path(self.path)
                    try:
                        self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
                    except Exception as exc:  # noqa: BLE001
                        if not _precondition_failed(exc):
                            raise
                    self.fs.invalidate_cache(self.path)
                elif not self.s3:
                    lease, _ = self.read()
                    if lease is not None and (lease.get("holder") or {}).get("run_id") == self.holder["run_id"]:
                        self.fs.rm(self.path)
        except Exception as exc:  # noqa: BLE001 - an unreleased lease expires by itself
            log.warning("could not release the lease on %s (%s: %s); it expires in %.0fs",
                        self.layout.url, type(exc).__name__, exc, self.ttl)
        finally:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _precondition_failed(exc: BaseException) -> bool:
    seen = exc
    while seen is not None:
        text = f"{type(seen).__name__} {seen}"
        if "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
