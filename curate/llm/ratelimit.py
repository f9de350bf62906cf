"""Rate limits that hold for a whole pipeline, not per process.

``requests_per_minute`` and ``tokens_per_minute`` of an engine are one budget shared by every worker
of a run: all local worker processes, and all Ray workers. The state is a GCRA (generic cell rate
algorithm, a token bucket kept as one "theoretical arrival time" per limit):

- :class:`SqliteLimiter`: the state in a SQLite file (the step's work folder), updated in one
  ``BEGIN IMMEDIATE`` transaction per request, so local worker processes, and Ray workers on one
  node or on a shared filesystem, draw from the same bucket;
- :class:`RayLimiter`: the same state in a named Ray actor (``curate-ratelimit-<key>``), chosen when
  the engine runs inside a Ray worker, so a multi-node cluster shares it too;
- :class:`LocalLimiter`: in memory, for library calls without a work folder.

A request asks right before it goes out (``acquire(tokens)``: 0 = go, and it is charged; else the
seconds to wait before asking again), so requests held up on the way do not bunch up later. The burst is capped at
``BURST_SECONDS`` worth of the rate (at least one request): a run does not start with a minute's
worth of requests. A request larger than the token burst still goes once the bucket's backlog is
within the burst (it then delays the ones after it), so it never waits forever.

``hold(until)`` (an HTTP 429's ``Retry-After``) stops every worker from sending before ``until``.
:class:`AIMD` is the per-process concurrency that halves on a 429 and grows back by one request per
window of successes.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import sqlite3
import threading
import time
from typing import Any, Callable

BURST_SECONDS = 2.0


class GCRA:
    """Requests-per-minute and tokens-per-minute state. ``acquire`` lets a request go (charging
    it) or says how long to wait; ``state``/``load`` move the numbers in and out of storage."""

    def __init__(self, rpm: float | None, tpm: float | None, burst_seconds: float = BURST_SECONDS):
        self.rpm, self.tpm = rpm, tpm
        self.burst = burst_seconds
        self.tat_req = 0.0   # theoretical arrival time of the next request
        self.tat_tok = 0.0   # ... of the next token
        self.hold_until = 0.0

    def state(self) -> tuple[float, float, float]:
        return self.tat_req, self.tat_tok, self.hold_until

    def load(self, state: tuple[float, float, float]) -> None:
        self.tat_req, self.tat_tok, self.hold_until = state

    def acquire(self, tokens: int, now: float) -> float:
        """0.0: the request may go now (and is charged); else the seconds to wait before asking
        again (nothing charged). Charging only when the request really goes keeps requests that
        were delayed on the way (a busy connection, a slow start) from bunching up later."""
        slot = self.slot(now)
        if slot > now + 1e-3:
            return slot - now
        self.charge(tokens, now)
        return 0.0

    def slot(self, now: float) -> float:
        """The earliest time the next request may go."""
        slot = max(now, self.hold_until)
        if self.rpm:
            slot = max(slot, self.tat_req - max(0.0, self.burst - 60.0 / self.rpm))
        if self.tpm:
            slot = max(slot, self.tat_tok - self.burst)
        return slot

    def charge(self, tokens: int, now: float) -> None:
        if self.rpm:
            self.tat_req = max(self.tat_req, now) + 60.0 / self.rpm
        if self.tpm:
            self.tat_tok = max(self.tat_tok, now) + max(0, tokens) * 60.0 / self.tpm

    def hold(self, until: float) -> None:
        self.hold_until = max(self.hold_until, until)


class LocalLimiter:
    """One process (library calls without a work folder)."""

    def __init__(self, rpm: float | None, tpm: float | None, clock: Callable[[], float] = time.time):
        self.gcra = GCRA(rpm, tpm)
        self.clock = clock
        self.lock = threading.Lock()

    def acquire(self, tokens: int) -> float:
        with self.lock:
            return self.gcra.acquire(tokens, self.clock())

    def hold(self, until: float) -> None:
        with self.lock:
            self.gcra.hold(until)

    def close(self) -> None:
        pass


class SqliteLimiter:
    """Every process that opens the same file and ``key`` shares one bucket."""

    def __init__(self, path: str, key: str, rpm: float | None, tpm: float | None,
                 clock: Callable[[], float] = time.time):
        self.path = os.path.abspath(path)
        self.key = key
        self.rpm, self.tpm = rpm, tpm
        self.clock = clock
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "key": self.key, "rpm": self.rpm, "tpm": self.tpm}

    def __setstate__(self, s: dict[str, Any]) -> None:
        self.__init__(s["path"], s["key"], s["rpm"], s["tpm"])  # type: ignore[misc]

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            c = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=OFF")   # the state is worth nothing after a crash
            c.execute("CREATE TABLE IF NOT EXISTS gcra (key TEXT PRIMARY KEY, tat_req REAL NOT NULL, "
                      "tat_tok REAL NOT NULL, hold_until REAL NOT NULL)")
            self._conn, self._pid = c, os.getpid()
        return self._conn

    def _update(self, fn: Callable[[GCRA, float], Any]) -> Any:
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                g = GCRA(self.rpm, self.tpm)
                row = db.execute("SELECT tat_req, tat_tok, hold_until FROM gcra WHERE key = ?",
                                 (self.key,)).fetchone()
                if row:
                    g.load(tuple(float(x) for x in row))  # type: ignore[arg-type]
                out = fn(g, self.clock())
                db.execute("INSERT OR REPLACE INTO gcra VALUES (?, ?, ?, ?)", (self.key, *g.state()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return out

    def acquire(self, tokens: int) -> float:
        return self._update(lambda g, now: g.acquire(tokens, now))

    def hold(self, until: float) -> None:
        self._update(lambda g, now: g.hold(until))

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


class _LimiterActor:
    def __init__(self, rpm: float | None, tpm: float | None):
        self.gcra = GCRA(rpm, tpm)

    def acquire(self, tokens: int) -> float:
        return self.gcra.acquire(tokens, time.time())

    def hold(self, until: float) -> None:
        self.gcra.hold(until)


ACTOR_PREFIX = "curate-ratelimit-"
ACTOR_NAMESPACE = "curate"


class RayLimiter:
    """The bucket in a named, detached Ray actor (one per run folder and endpoint); the Ray
    executor kills these actors when it shuts down."""

    def __init__(self, name: str, rpm: float | None, tpm: float | None):
        import ray

        self.ray = ray
        cls = ray.remote(num_cpus=0)(_LimiterActor)
        self.actor = cls.options(name=name, namespace=ACTOR_NAMESPACE, lifetime="detached",
                                 get_if_exists=True).remote(rpm, tpm)

    def acquire(self, tokens: int) -> float:
        return float(self.ray.get(self.actor.acquire.remote(tokens)))

    def hold(self, until: float) -> None:
        self.ray.get(self.actor.hold.remote(until))

    def close(self) -> None:
        pass


def in_ray_worker() -> bool:
    try:
        import ray
    except ImportError:
        return False
    try:
        return bool(ray.is_initialized()) and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001  (an old or odd Ray: fall back to the file)
        return False


def shared_limiter(folder: str | None, endpoint: str, rpm: float | None, tpm: float | None) -> Any:
    """The limiter every worker of a run shares for ``endpoint``: a Ray actor inside Ray workers,
    else a SQLite file in ``folder``, else (no folder: a library call) one in this process."""
    key = endpoint
    if in_ray_worker():
        name = ACTOR_PREFIX + hashlib.sha256(f"{folder}|{endpoint}".encode()).hexdigest()[:16]
        return RayLimiter(name, rpm, tpm)
    if folder:
        return SqliteLimiter(os.path.join(folder, "llm_ratelimit.sqlite"), key, rpm, tpm)
    return LocalLimiter(rpm, tpm)


def kill_ray_limiters(ray: Any) -> None:
    """Kill the limiter actors of this Ray cluster (the executor's shutdown)."""
    try:
        from ray.util import list_named_actors

        for a in list_named_actors(all_namespaces=True):
            if a.get("namespace") == ACTOR_NAMESPACE and str(a.get("name", "")).startswith(ACTOR_PREFIX):
                ray.kill(ray.get_actor(a["name"], namespace=ACTOR_NAMESPACE))
    except Exception:  # noqa: BLE001  (best effort: a leftover actor holds no resources)
        pass


async def wait_for_slot(limiter: Any, tokens: int) -> None:
    """Wait until the limiter lets a request of ``tokens`` go (it is charged then). The limiter is
    asked off the event loop: its SQLite transaction or Ray call may block. A ``LocalLimiter`` (a
    lock and some arithmetic) is asked on the loop: a thread hand-off per request cost more CPU
    than the request itself at hundreds of requests per second."""
    if isinstance(limiter, LocalLimiter):
        while (wait := limiter.acquire(tokens)) > 0:
            await asyncio.sleep(wait)
        return
    loop = asyncio.get_running_loop()
    while (wait := await loop.run_in_executor(None, limiter.acquire, tokens)) > 0:
        await asyncio.sleep(wait)


class AIMD:
    """Per-process concurrency: at most ``limit`` requests in flight. A 429 halves it
    (multiplicative decrease, at most once per ``cooldown`` seconds so one burst of 429s counts
    once); each success adds ``1/limit`` (additive increase: +1 per window), up to ``maximum``.
    Waiters queue in order; a freed slot is handed to the first one (O(1) per request: waking every
    waiter on each answer cost O(concurrency) per request). One event loop only."""

    def __init__(self, maximum: int, cooldown: float = 1.0):
        self.maximum = maximum
        self.limit = float(maximum)
        self.in_flight = 0
        self.cooldown = cooldown
        self._last_cut = -1e9
        self._waiters: "collections.deque[asyncio.Future[None]]" = collections.deque()

    async def __aenter__(self) -> "AIMD":
        if not self._waiters and self.in_flight < max(1, int(self.limit)):
            self.in_flight += 1
            return self
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # the slot is counted for us when we are woken
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # woken, then cancelled: give the slot on
                self.in_flight -= 1
                self._wake()
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self.in_flight < max(1, int(self.limit)):
            fut = waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(None)

    def success(self) -> None:
        if self.limit < self.maximum:
            self.limit = min(float(self.maximum), self.limit + 1.0 / max(1.0, self.limit))
            if self._waiters:
                self._wake()

    def throttled(self) -> bool:
        """A 429: halve the limit. True when this call lowered it."""
        now = time.monotonic()
        if now - self._last_cut < self.cooldown:
            return False
        self._last_cut = now
        self.limit = max(1.0, self.limit / 2)
        return True
