"""Per-stage LLM bookkeeping: counters, failures, the failure-rate stop, budgets and cost."""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from typing import Any, Sequence

from curate.engines.base import Completion


class LLMAccounting:
    """Per-stage LLM bookkeeping shared by every LLM stage.

    ``record(completions)`` counts ``llm/requests``, ``llm/cached``, ``llm/prompt_tokens``,
    ``llm/completion_tokens``, ``llm/cost`` (when the engine config has prices), ``llm/rate_limited``
    (HTTP 429 answers met) and ``llm/failed`` (+ ``errors/llm/<reason>``, the first few logged); an
    answer saying the endpoint looks unreachable or misconfigured (it never answered in this run)
    stops the stage at once with that error, which names the endpoint; ``parse_failed`` records an answer the stage
    could not use (``errors/parse/<reason>``). ``check()`` raises ``StageError`` once at least
    ``min_requests`` were made and more than ``max_failure_rate`` of them failed, so a broken
    endpoint or a model that never answers in the expected format does not produce an empty
    corpus; the message names the most common reasons. Tokens count new generations only.
    """

    def __init__(self, stage: Any, max_failure_rate: float = 0.5, min_requests: int = 8,
                 prices: tuple[float | None, float | None] = (None, None)):
        self.stage = stage
        self.max_failure_rate = max_failure_rate
        self.min_requests = min_requests
        self.prices = prices
        self.total = 0
        self.failed = 0
        self.reasons: Counter[str] = Counter()
        self.failures: list[dict[str, Any]] = []  # the most recent failures (bounded)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        pp, pc = self.prices
        return (prompt_tokens * (pp or 0.0) + completion_tokens * (pc or 0.0)) / 1e6

    def record(self, completions: Sequence[Completion], *, count_failures: bool = True,
               retry: bool = False) -> None:
        """Count answers. ``retry``: new tries of answers already counted (parse retries): they
        cost tokens but do not add to the number of requests the failure rate is taken over."""
        st = self.stage
        for c in completions:
            if not retry:
                self.total += 1
            st.count("llm/requests")
            if c.throttled:
                st.count("llm/rate_limited", c.throttled)
            if c.endpoint_dead:
                from curate.pipeline.stage import StageError

                raise StageError(f"stage {st.step_name!r}: {c.error}")
            if c.cached:
                st.count("llm/cached")
            elif c.ok:
                st.count("llm/prompt_tokens", c.prompt_tokens)
                st.count("llm/completion_tokens", c.completion_tokens)
                if any(p is not None for p in self.prices):
                    st.count("llm/cost", self.cost(c.prompt_tokens, c.completion_tokens))
            if not c.ok and count_failures:
                self._fail("llm", "request", c.request_id, c.error or "")

    def request_failed(self, doc_id: str | None, detail: str, transient: bool = False) -> None:
        """A request that failed after the engine's retries. A transient failure is counted here
        for the failure rate only: the stage defers the row (``errors/transient/<reason>``)."""
        self._fail("llm", "request", doc_id, detail, count_error=not transient)

    def parse_failed(self, doc_id: str | None, detail: str = "", reason: str = "unparseable") -> None:
        """The stage could not use an answer (malformed JSON, missing field...)."""
        self.stage.count("llm/parse_failed")
        self._fail("parse", reason, doc_id, detail)

    def invalid_prompt(self, doc_id: str | None, detail: str = "") -> None:
        """A row could not be turned into a request (template field missing, null prompt)."""
        self.total += 1
        self._fail("llm", "prompt", doc_id, detail)

    def _fail(self, category: str, reason: str, doc_id: str | None, detail: str, count_error: bool = True) -> None:
        self.failed += 1
        self.reasons[f"{category}/{reason}"] += 1
        self.stage.count("llm/failed")
        if count_error:
            self.stage.error(f"{category}/{reason}", doc_id=doc_id, detail=_short(detail))
        self.failures.append({"id": doc_id, "reason": f"{category}/{reason}", "detail": _short(detail)})
        del self.failures[:-100]

    def check(self) -> None:
        from curate.pipeline.stage import StageError

        if self.total >= self.min_requests and self.failed > self.max_failure_rate * self.total:
            last = self.failures[-1]["detail"] if self.failures else ""
            top = ", ".join(f"errors/{k}: {v}" for k, v in self.reasons.most_common(5))
            raise StageError(
                f"stage {self.stage.step_name!r}: {self.failed} of {self.total} LLM requests failed "
                f"(more than {self.max_failure_rate:.0%}; {top}); last error: {last}")


class Budget:
    """Request/token/cost caps of one step that survive a resume.

    Usage is kept in SQLite (``path``; in memory for library calls without a work folder) and only
    new generations count (cached answers are free). ``allow(n)`` reserves up to ``n`` requests and
    returns how many may go; ``add`` records what they used. Several worker processes share the
    file (one transaction per reservation).
    """

    def __init__(self, path: str | None, key: str, max_requests: int | None = None,
                 max_tokens: int | None = None, max_cost: float | None = None):
        self.key = key
        self.limits = (max_requests, max_tokens, max_cost)
        self.path = path
        self._mem = [0, 0, 0.0]
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()

    @property
    def active(self) -> bool:
        return any(x is not None for x in self.limits)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
            c = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("CREATE TABLE IF NOT EXISTS usage (key TEXT PRIMARY KEY, requests INTEGER NOT NULL, "
                      "tokens INTEGER NOT NULL, cost REAL NOT NULL, updated REAL NOT NULL)")
            self._conn, self._pid = c, os.getpid()
        return self._conn

    def used(self) -> tuple[int, int, float]:
        if self.path is None:
            return self._mem[0], self._mem[1], self._mem[2]
        row = self._db().execute("SELECT requests, tokens, cost FROM usage WHERE key = ?", (self.key,)).fetchone()
        return (int(row[0]), int(row[1]), float(row[2])) if row else (0, 0, 0.0)

    def _room(self, used: tuple[int, int, float], n: int) -> int:
        max_req, max_tok, max_cost = self.limits
        if (max_tok is not None and used[1] >= max_tok) or (max_cost is not None and used[2] >= max_cost):
            return 0
        return n if max_req is None else max(0, min(n, max_req - used[0]))

    def allow(self, n: int) -> int:
        if not self.active or n == 0:
            return n
        if self.path is None:
            k = self._room(self.used(), n)
            self._mem[0] += k
            return k
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            used = self.used()
            k = self._room(used, n)
            db.execute("INSERT OR REPLACE INTO usage VALUES (?, ?, ?, ?, ?)",
                       (self.key, used[0] + k, used[1], used[2], time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return k

    def add(self, tokens: int, cost: float) -> None:
        if not self.active or (not tokens and not cost):
            return
        if self.path is None:
            self._mem[1] += tokens
            self._mem[2] += cost
            return
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            r, t, c = self.used()
            db.execute("INSERT OR REPLACE INTO usage VALUES (?, ?, ?, ?, ?)",
                       (self.key, r, t + tokens, c + cost, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def describe(self) -> str:
        r, t, c = self.used()
        names = ("max_requests", "max_total_tokens", "max_cost")
        parts = [f"{n}={lim} (used {u:g})" for n, lim, u in zip(names, self.limits, (r, t, c)) if lim is not None]
        return ", ".join(parts)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _short(s: str, n: int = 300) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[:n] + "..."
