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
    """Request/token/cost caps of one step that survive a resume, even a ``kill -9``.

    Usage is kept in SQLite (``path``; in memory for library calls without a work folder) and only
    new generations count (cached answers are free). Each request is charged twice over its life:

    - ``reserve(tokens, cost)`` before it is sent: one request and an estimate (prompt tokens plus
      ``max_tokens``) are added at once, in one transaction; a request may go while the step's
      usage (reservations included) is under every limit;
    - ``settle(d_tokens, d_cost)`` when its answer arrives, *before* the answer is cached: the
      estimate is replaced by what the answer used.

    A kill before ``settle`` leaves the estimate charged (at least what the answer used, unless a
    prompt has more tokens than estimated); a kill after it leaves the answer uncached, so a rerun
    pays (and charges) it again: the store can over-count, never under-count, and no number of
    kills lets a run go past a budget. ``reserve`` answers None (wait) when only this process's
    own requests in flight stand in the way: their answers may leave room. Several worker
    processes share the file (one transaction per reservation); another process's reservations
    count as used.
    """

    def __init__(self, path: str | None, key: str, max_requests: int | None = None,
                 max_tokens: int | None = None, max_cost: float | None = None):
        self.key = key
        self.limits = (max_requests, max_tokens, max_cost)
        self.path = path
        self._mem = [0, 0, 0.0]
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self.in_flight = [0, 0, 0.0]  # this process's reservations not settled yet

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

    def _under(self, used: tuple[int, int, float] | list) -> bool:
        max_req, max_tok, max_cost = self.limits
        return not ((max_req is not None and used[0] >= max_req) or (max_tok is not None and used[1] >= max_tok)
                    or (max_cost is not None and used[2] >= max_cost))

    def _update(self, fn: Any) -> Any:
        """Run ``fn(used) -> (result, delta)`` in one transaction and add ``delta`` to the usage."""
        if self.path is None:
            result, delta = fn(tuple(self._mem))
            for i, d in enumerate(delta):
                self._mem[i] += d
            return result
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            used = self.used()
            result, delta = fn(used)
            if any(delta):
                db.execute("INSERT OR REPLACE INTO usage VALUES (?, ?, ?, ?, ?)",
                           (self.key, used[0] + delta[0], used[1] + delta[1], used[2] + delta[2], time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    def reserve(self, tokens: int = 0, cost: float = 0.0) -> bool | None:
        """Charge one request and its estimated ``tokens``/``cost`` if the budget has room: True
        (charged), None (no room while this process has requests in flight: ask again after an
        answer), False (no room)."""
        if not self.active:
            return True

        def fn(used: tuple[int, int, float]) -> tuple[bool | None, tuple]:
            if self._under(used):
                return True, (1, tokens, cost)
            return (None if self.in_flight[0] else False), (0, 0, 0.0)

        ok = self._update(fn)
        if ok:
            self.in_flight[0] += 1
            self.in_flight[1] += tokens
            self.in_flight[2] += cost
        return ok

    def settle(self, est_tokens: int, est_cost: float, tokens: int, cost: float) -> None:
        """A reserved request answered: its estimate replaced by what it used."""
        if not self.active:
            return
        self.in_flight[0] = max(0, self.in_flight[0] - 1)
        self.in_flight[1] -= est_tokens
        self.in_flight[2] -= est_cost
        if tokens != est_tokens or cost != est_cost:
            self._update(lambda used: (None, (0, tokens - est_tokens, cost - est_cost)))

    def adjust(self, est_tokens: int, est_cost: float, tokens: int, cost: float) -> None:
        """An answer to a request reserved by an earlier process (a batch submitted by a killed
        run): its estimate, still charged, replaced by what it used; nothing of this process's
        in-flight reservations changes."""
        if self.active and (tokens != est_tokens or cost != est_cost):
            self._update(lambda used: (None, (0, tokens - est_tokens, cost - est_cost)))

    def release(self) -> None:
        """Forget this process's in-flight reservations (their requests failed or were abandoned:
        the estimates stay charged)."""
        self.in_flight = [0, 0, 0.0]

    def allow(self, n: int) -> int:
        """Reserve up to ``n`` requests at once (no token estimate); how many may go."""
        k = 0
        while k < n and self.reserve():
            k += 1
        return k

    def add(self, tokens: int, cost: float) -> None:
        """Charge tokens/cost after the fact (requests reserved with ``allow``)."""
        if self.active and (tokens or cost):
            self._update(lambda used: (None, (0, tokens, cost)))

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
