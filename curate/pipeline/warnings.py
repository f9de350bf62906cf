"""Warnings for people, computed from a step's numbers (its entry in ``stats.json``).

One function, :func:`step_warnings`, used by the funnel that ``curate run`` prints (the lines go to
stderr below it: ``WARNING step X: ...``), by ``stats.json`` (a ``warnings`` list per step) and by
``report.html``. A warning does not fail a run: it says that a step's result is probably not what
its options were meant to give.

What is warned about:

``dropped_most``   one ``dropped/<reason>`` removed more than half of the step's input;
``rewrote_most``   a filter rewrote most of the documents it kept (``<stage>/..._modified``
                   counters, e.g. ``heuristic_filter/c4_modified`` of C4's line filter);
``low_output``     an LLM or synthetic step gave fewer rows than ``LOW_YIELD`` of its input;
``<code>``         any ``warnings/<code>`` counter a stage recorded itself (rendered generically);
``rc_no_tasks``,   stage measures that mean lost work (see ``SHARE_RULES``): reading
``rc_text_cut``    comprehension documents without mined tasks, domain text cut before mining;
``errors``         rows that could not be processed (``errors/<category>/<detail>``).
"""

from __future__ import annotations

from typing import Any

DROPPED_MOST = 0.5        # one reason removed more than this share of the input
REWROTE_MOST = 0.5        # more than this share of the kept documents was rewritten
LOW_YIELD = 0.1           # an LLM / synthetic step's output below this share of its input

# drop reasons that are a step's purpose, not a sign of a misconfigured rule: `select` keeping
# its top-k / fraction / token budget drops the rest as `not_selected`
BY_DESIGN = {"not_selected"}

# stages that produce rows from model answers (or templates): few rows out means lost work
SYNTHETIC_STAGES = {"generate", "instruction_synth", "entigraph", "rephrase", "rc_llm",
                    "reading_comprehension", "llm_rate", "lm_yes_no_score"}

# (code, counter, denominator: "in" / "out" / another counter, share above which to warn, message)
SHARE_RULES: list[tuple[str, str, str, float, str]] = [
    ("rc_no_tasks", "reading_comprehension/no_tasks", "out", 0.5,
     "{n:,} of {d:,} output rows ({p:.0f}%) got no mined task (only their text is in the output)"),
    ("rc_text_cut", "reading_comprehension/chars_cut", "reading_comprehension/chars_in", 0.05,
     "{p:.0f}% of the document text ({n:,} of {d:,} characters) was cut before mining and is not in "
     "the output (`long_documents: split` keeps it)"),
]


def _pct(n: float, d: float) -> float:
    return 100.0 * n / d if d else 0.0


def step_warnings(step: dict[str, Any]) -> list[dict[str, str]]:
    """Warnings of one step, from its ``stats.json`` entry (``in``, ``out``, ``dropped``,
    ``errors``, ``counters``, ``stage``), as ``{"code", "message"}`` dicts."""
    n_in, n_out = step.get("in", 0) or 0, step.get("out", 0) or 0
    counters: dict[str, int] = step.get("counters", {}) or {}
    out: list[dict[str, str]] = []

    for reason, n in sorted((step.get("dropped") or {}).items(), key=lambda kv: -kv[1]):
        if n_in and n > DROPPED_MOST * n_in and reason not in BY_DESIGN:
            out.append({"code": "dropped_most",
                        "message": f"dropped/{reason} removed {n:,} of its {n_in:,} documents "
                                   f"({_pct(n, n_in):.0f}%): check this rule's options (or a preset)"})

    for key, n in sorted(counters.items()):
        if key.split("/")[-1].endswith("modified") and n_out and n > REWROTE_MOST * n_out:
            out.append({"code": "rewrote_most",
                        "message": f"{key}: {n:,} of the {n_out:,} kept documents ({_pct(n, n_out):.0f}%) "
                                   "were rewritten by the filter (lines removed from their text)"})

    synthetic = step.get("stage") in SYNTHETIC_STAGES or any(k.startswith("llm/") for k in counters)
    if synthetic and n_in and n_out < LOW_YIELD * n_in:
        out.append({"code": "low_output",
                    "message": f"gave {n_out:,} rows from {n_in:,} input rows ({_pct(n_out, n_in):.1f}%)"})

    for code, key, denom, share, msg in SHARE_RULES:
        n = counters.get(key, 0)
        d = n_in if denom == "in" else n_out if denom == "out" else counters.get(denom, 0)
        if n and d and n > share * d:
            out.append({"code": code, "message": msg.format(n=n, d=d, p=_pct(n, d))})

    for key, n in sorted(counters.items()):
        if key.startswith("warnings/"):
            code = key[len("warnings/"):]
            out.append({"code": code, "message": f"{code.replace('_', ' ')} (the stage counted {n:,})"})

    errors = step.get("errors") or {}
    total = sum(errors.values())
    if total:
        top = ", ".join(f"errors/{k} {v:,}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1])[:3])
        out.append({"code": "errors", "message": f"{total:,} rows could not be processed ({top}; "
                                                 "see the log)"})
    return out


def warning_lines(stats: dict[str, dict[str, Any]]) -> list[str]:
    """``WARNING step X: message`` lines for every step of a run's stats (in step order)."""
    lines = []
    for name, s in stats.items():
        ws = s["warnings"] if "warnings" in s else step_warnings(s)
        lines.extend(f"WARNING step {name}: {w['message']}" for w in ws)
    return lines
