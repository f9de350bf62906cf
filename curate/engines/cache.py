"""A request cache in SQLite: key (sha256 of engine kind, model, prompt, sampling params, seed) ->
the completion as JSON. A resumed or repeated run answers finished requests from here.

Safe with several processes writing the same file: WAL journal, a busy timeout, and retries with
backoff when the database is locked. Each process opens its own connection (the object is
picklable: it reconnects lazily after a fork/pickle).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created REAL NOT NULL
)
"""


class RequestCache:
    def __init__(self, path: str, busy_timeout: float = 30.0, retries: int = 10):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.busy_timeout = busy_timeout
        self.retries = retries
        self._local = threading.local()
        self._pid = os.getpid()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._with_retry(lambda c: c.execute(_SCHEMA))

    # pickling: connections do not travel
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "busy_timeout": self.busy_timeout, "retries": self.retries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:  # forked: never share a connection across processes
            self._local = threading.local()
            self._pid = os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            self._with_retry_conn(conn, lambda c: c.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _with_retry_conn(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                msg = str(exc).lower()
                if attempt >= self.retries or ("locked" not in msg and "busy" not in msg):
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def _with_retry(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._with_retry_conn(self._conn(), fn)

    # -- API ---------------------------------------------------------------------------------------
    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = f"SELECT key, value FROM completions WHERE key IN ({','.join('?' * len(chunk))})"
            rows = self._with_retry(lambda c: c.execute(q, chunk).fetchall())
            for k, v in rows:
                try:
                    out[k] = json.loads(v)
                except ValueError:  # a corrupt entry is a miss, it will be regenerated
                    continue
        return out

    def get(self, key: str) -> dict[str, Any] | None:
        return self.get_many([key]).get(key)

    def put_many(self, items: dict[str, dict[str, Any]]) -> None:
        if not items:
            return
        now = time.time()
        rows = [(k, json.dumps(v, ensure_ascii=False), now) for k, v in items.items()]

        def write(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany("INSERT OR REPLACE INTO completions (key, value, created) VALUES (?, ?, ?)",
                              rows)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        self._with_retry(write)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.put_many({key: value})

    def __len__(self) -> int:
        return int(self._with_retry(lambda c: c.execute("SELECT COUNT(*) FROM completions").fetchone()[0]))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
