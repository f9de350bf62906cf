"""Exit codes of ``curate run`` and what a scheduler should do with each (README, "Failure
semantics"). Plain constants and one pure function, so that schedulers (``curate.airflow``) and
tests can use them without importing the runner.

==  ==============================================================================================
0   done: every step finished (errors, if any, within ``max_error_fraction``)
1   failed: a rerun of the same command may succeed (a lost worker, an endpoint down, rows that
    failed transiently, too many documents failed); it redoes exactly the unfinished work
2   invalid: a bad pipeline file or usage; a retry cannot help until a person acts
3   budget reached: an LLM step spent its ``max_requests`` / ``max_total_tokens`` / ``max_cost``;
    a rerun sends nothing, so it is not retried: raise the budget in the YAML and run again
4   locked: another live run holds the output's lease (the message names it); nothing was
    written; a retry later waits for it to end (or takes over the lease once it has expired)
130 interrupted (Ctrl-C), 143 terminated (SIGTERM): finished work is kept; a rerun resumes
==  ==============================================================================================
"""

from __future__ import annotations

from typing import Literal

OK = 0
FAILED = 1
INVALID = 2
BUDGET = 3
LOCKED = 4
INTERRUPTED = 130
TERMINATED = 143

#: codes a retry cannot fix: a scheduler fails the task at once instead of retrying it
NOT_RETRIED = frozenset({INVALID, BUDGET})


def retry_policy(code: int) -> Literal["ok", "fail", "retry"]:
    """What a scheduler does with ``curate run``'s exit code: ``ok`` (0), ``fail`` without retries
    (invalid pipeline, budget reached), ``retry`` otherwise (a rerun resumes)."""
    if code == OK:
        return "ok"
    return "fail" if code in NOT_RETRIED else "retry"


def describe(code: int) -> str:
    return {FAILED: "the run failed; a retry resumes it", INVALID: "invalid pipeline",
            BUDGET: "an LLM budget was reached; raise it in the pipeline file", LOCKED:
            "the output is locked by another run", INTERRUPTED: "interrupted",
            TERMINATED: "terminated"}.get(code, "failed")
