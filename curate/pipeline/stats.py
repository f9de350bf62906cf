"""Per-step counters (stats.json), the funnel table, and progress reporting.

A progress bar (tqdm: docs/s, ETA when the total is known) on a terminal; plain log lines every
``interval`` seconds otherwise (CI logs, Airflow, Docker).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from curate.pipeline.state import StepRecord

log = logging.getLogger("curate")


class StepStats:
    """One step's numbers for stats.json and the funnel.

    ``seconds`` is the wall time this run spent in the step (0 for a step finished earlier; the
    fused steps of a segment share its wall time in proportion to their worker time), so the
    steps add up to at most the run's time. ``cpu_seconds`` is the worker time of all runs.
    ``status``: ``done``, ``skipped`` (finished by an earlier run) or ``resumed`` (some tasks
    finished by an earlier run).
    """

    def __init__(self, name: str, stage: str):
        self.name = name
        self.stage = stage
        self.rows_in = 0
        self.rows_out = 0
        self.counters: Counter[str] = Counter()
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.shards = 0
        self.status = "pending"

    def add(self, rec: "StepRecord") -> None:
        self.rows_in += rec.rows_in
        self.rows_out += rec.rows_out
        self.cpu_seconds += rec.seconds
        if rec.counters:
            self.counters.update(rec.counters)

    def load(self, rec: "StepRecord") -> None:
        """Replace by a step's recorded totals (a step finished by an earlier run)."""
        self.rows_in = self.rows_out = 0
        self.cpu_seconds = 0.0
        self.counters.clear()
        self.add(rec)
        self.shards = rec.shards

    def record(self) -> "StepRecord":
        from curate.pipeline.state import StepRecord
        return StepRecord(rows_in=self.rows_in, rows_out=self.rows_out, counters=dict(self.counters),
                          seconds=self.cpu_seconds, shards=self.shards)

    def errors(self) -> int:
        return sum(v for k, v in self.counters.items() if k.startswith("errors/"))

    def to_dict(self) -> dict[str, Any]:
        dropped = {k[8:]: v for k, v in sorted(self.counters.items()) if k.startswith("dropped/")}
        errors = {k[7:]: v for k, v in sorted(self.counters.items()) if k.startswith("errors/")}
        other = {k: v for k, v in sorted(self.counters.items())
                 if not k.startswith(("dropped/", "errors/"))}
        out = {"stage": self.stage, "status": self.status, "in": self.rows_in, "out": self.rows_out,
               "dropped": dropped, "errors": errors, "counters": other,
               "shards": self.shards, "seconds": round(self.seconds, 3),
               "cpu_seconds": round(self.cpu_seconds, 3)}
        from curate.pipeline.warnings import step_warnings
        out["warnings"] = step_warnings(out)
        return out


def _short(reason: str, width: int = 26) -> str:
    return reason if len(reason) <= width else reason[: width - 1] + "…"


def step_time(s: dict[str, Any]) -> str:
    """A step's time for people: this run's seconds, ``skipped`` for a step an earlier run
    finished, ``(resumed)`` when an earlier run finished part of it."""
    status = s.get("status")
    if status == "skipped":
        return "skipped"
    if status == "pending":      # a failed or interrupted run stopped before this step
        return "not run"
    if status == "failed":
        return f"{s.get('seconds', 0):.1f}s failed"
    return f"{s.get('seconds', 0):.1f}s" + (" (resumed)" if status == "resumed" else "")


def funnel_table(stats: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: step, stage, in, out, kept %, dropped (top reasons), errors, time (this
    run's; ``skipped`` for a step finished by an earlier run, ``(resumed)`` when partly)."""
    rows = [("step", "stage", "in", "out", "kept", "dropped (top reasons)", "errors", "time")]
    for name, s in stats.items():
        kept = f"{100 * s['out'] / s['in']:.1f}%" if s["in"] else "-"
        top = sorted(s["dropped"].items(), key=lambda kv: -kv[1])
        dropped = ", ".join(f"{_short(k)} {v:,}" for k, v in top[:2]) or "-"
        if len(top) > 2:
            dropped += f", +{len(top) - 2} more"
        errs = sum(s["errors"].values())
        time_ = step_time(s)
        rows.append((name, s["stage"], f"{s['in']:,}", f"{s['out']:,}", kept, dropped,
                     f"{errs:,}" if errs else "-", time_))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(str(c).rjust(w) if i in (2, 3, 4, 6, 7) else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def funnel_warnings(stats: dict[str, dict[str, Any]]) -> str:
    """The lines to show below the funnel: ``WARNING step X: ...`` (see curate/pipeline/warnings.py);
    empty when no step has a warning."""
    from curate.pipeline.warnings import warning_lines
    return "\n".join(warning_lines(stats))


class Progress:
    """Counts documents for one step; a tqdm bar on a TTY, log lines otherwise."""

    def __init__(self, step: str, total: int | None = None, interval: float = 10.0,
                 tty: bool | None = None, enabled: bool = True):
        self.step = step
        self.total = total
        self.n = 0
        self.tokens = 0
        self.start = time.monotonic()
        self.interval = interval
        self._last = self.start
        self._bar = None
        self.enabled = enabled
        self._tasks: tuple[int, int] | None = None
        self._n0: int | None = None      # rows finished by earlier runs (set by the first tasks())
        self.req: dict[str, Any] | None = None   # LLM requests (see llm())
        self.batches: dict[str, list[Any]] = {}  # batch mode: batch id -> [status, completed, failed, total]
        self._req_at_n = 0               # requests answered when rows were last reported
        # the step's LLM requests and cost projected by `curate estimate` ({"requests", "cost"})
        self.estimate: dict[str, float] | None = None
        if tty is None:   # a bar on a terminal, unless the logs are JSON (curate --log-format json)
            from curate.logs import is_json
            tty = sys.stderr.isatty() and not is_json()
        if enabled and tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=step, unit="doc", dynamic_ncols=True, leave=True)

    def tasks(self, done: int, total: int) -> None:
        """Show finished/total tasks (an estimate of progress when the row total is unknown)."""
        if self._n0 is None:
            self._n0 = self.n   # rows finished by earlier runs: not part of this run's rate
        self._tasks = (done, total)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=True)

    def llm(self, delta: dict[str, Any]) -> None:
        """LLM requests reported by workers (sums since their last report): ``sent``, ``done``,
        ``failed``, ``tokens``, ``cost``. Shown as requests done / in flight / failed, tokens and
        cost; the ETA then comes from the answers, before any batch of rows is finished."""
        if self.req is None:
            self.req = {"sent": 0, "done": 0, "failed": 0, "tokens": 0, "cost": 0.0}
        for k in self.req:
            self.req[k] += delta.get(k, 0)
        if delta.get("batches"):   # batch mode: the latest [status, completed, failed, total] per batch
            self.batches.update(delta["batches"])
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
        else:
            self.update(0)

    def _llm_text(self) -> str:
        r = self.req
        if not r:
            return ""
        flying = max(0, r["sent"] - r["done"] - r["failed"])
        est = self.estimate or {}
        of = f" of ~{est['requests']:,.0f} estimated" if est.get("requests") else ""
        msg = (f"LLM requests {r['done']:,}{of} done, {flying:,} in flight, {r['failed']:,} failed, "
               f"{r['tokens']:,} tokens")
        if r["cost"] or est.get("cost"):
            msg += f", cost {r['cost']:,.4f}" + (f" of ~{est['cost']:,.4f} estimated" if est.get("cost") else "")
        if self.batches:
            msg += ", " + self.batch_text()
        return msg

    def batch_text(self) -> str:
        """Batch mode: ``batches 2 in_progress, 1 completed: 1,200/5,000 requests (3 failed)``,
        from each batch's ``request_counts``."""
        by = Counter(v[0] for v in self.batches.values())
        done = sum(int(v[1] or 0) for v in self.batches.values())
        failed = sum(int(v[2] or 0) for v in self.batches.values())
        total = sum(int(v[3] or 0) for v in self.batches.values())
        msg = "batches " + ", ".join(f"{n} {st}" for st, n in sorted(by.items()))
        msg += f": {done:,}/{total:,} requests"
        if failed:
            msg += f" ({failed:,} failed)"
        return msg

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, from the rows done in this run, or, for an LLM step, from the answers so
        far (rows done estimated from requests answered per row; one per row before any batch)."""
        now = time.monotonic() if now is None else now
        r = self.req
        if not self.total:
            # no row total: from the requests answered against those `curate estimate` projected
            est = (self.estimate or {}).get("requests")
            answered = (r["done"] + r["failed"]) if r else 0
            if not est or not answered or answered >= est:
                return None
            return (est - answered) * (now - self.start) / answered
        n0 = self._n0 or 0
        est = self.n
        r = self.req
        if r and r["done"]:
            per_row = self._req_at_n / (self.n - n0) if self.n > n0 and self._req_at_n else 1.0
            est = max(self.n, min(self.total, n0 + r["done"] / per_row))
        done = est - n0
        if done <= 0 or est >= self.total:
            return None
        return (self.total - est) * (now - self.start) / done

    def _postfix(self) -> str:
        parts = []
        if self._tasks:
            parts.append(f"tasks {self._tasks[0]}/{self._tasks[1]}")
        if self.req:
            parts.append(self._llm_text())
        if self.tokens:
            parts.append(f"{self.tokens / max(time.monotonic() - self.start, 1e-9):.1f} tok/s")
        if not self.total and self.req:   # tqdm shows its own ETA when the row total is known
            eta = self.eta()
            if eta is not None:
                parts.append(f"ETA {eta:,.0f}s")
        return ", ".join(parts)

    def update(self, n: int, tokens: int = 0) -> None:
        self.n += n
        self.tokens += tokens
        if n and self.req:
            self._req_at_n = self.req["done"]
        if self._bar is not None:
            self._bar.update(n)
            if self.tokens:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
        elif self.enabled:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._log(now)

    def _log(self, now: float) -> None:
        el = max(now - self.start, 1e-9)
        msg = f"[{self.step}] {self.n:,} docs, {self.n / el:,.1f} docs/s"
        if self.total:
            msg += f", {100 * self.n / self.total:.0f}% of {self.total:,}"
        eta = self.eta(now)
        if eta is not None:
            msg += f", ETA {eta:,.0f}s"
        if self._tasks:
            msg += f", tasks {self._tasks[0]}/{self._tasks[1]}"
        if self.req:
            msg += ", " + self._llm_text()
        if self.tokens:
            msg += f", {self.tokens / el:,.1f} generated tok/s"
        from curate.logs import event
        counters: dict[str, Any] = {"docs": self.n, "docs_per_s": round(self.n / el, 2), "elapsed_s": round(el, 1)}
        if self.total:
            counters.update(total=self.total, percent=round(100 * self.n / self.total, 1))
            eta = self.eta(now)
            if eta is not None:
                counters["eta_s"] = round(eta, 1)
        if self._tasks:
            counters.update(tasks_done=self._tasks[0], tasks=self._tasks[1])
        if self.req:
            counters.update({f"llm_{k}": v for k, v in self.req.items()})
        if self.tokens:
            counters["generated_tokens"] = self.tokens
        event(log, "progress", msg, step=self.step, counters=counters)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._log(time.monotonic())


def error_lines(stats: dict[str, dict[str, Any]], output: str) -> list[str]:
    """One line per step with errored rows, for stderr after the funnel: rows that were counted
    and skipped (within ``max_error_fraction``) must not go unnoticed."""
    lines = []
    for name, s in stats.items():
        errs = {k: v for k, v in s.get("errors", {}).items()}
        n = sum(errs.values())
        if not n:
            continue
        top = ", ".join(f"{k} {v:,}" for k, v in sorted(errs.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"{n:,} rows failed in step {name} ({top}; see the log above and "
                     f"{output.rstrip('/')}/stats.json)")
    return lines
