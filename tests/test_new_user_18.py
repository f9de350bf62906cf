"""What a new user building a domain corpus hit (issue 18): step warnings, heuristic presets, the
raw html carried along, one-row shards, short Latin-1 files, typos without suggestions, inspect."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.pipeline.warnings import step_warnings
from helpers import write_yaml


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


# -- 18.0: step warnings ------------------------------------------------------------------------------

def _step(stage="heuristic_filter", n_in=100, n_out=100, dropped=None, errors=None, counters=None):
    return {"stage": stage, "in": n_in, "out": n_out, "dropped": dropped or {}, "errors": errors or {},
            "counters": counters or {}}


def test_step_warnings_from_counters():
    assert step_warnings(_step(n_out=60, dropped={"gopher_quality:gopher_short_doc": 40})) == []
    w = step_warnings(_step(n_out=10, dropped={"gopher_quality:gopher_below_alpha_threshold": 90}))
    assert [x["code"] for x in w] == ["dropped_most"]
    assert "gopher_below_alpha_threshold removed 90 of its 100 documents (90%)" in w[0]["message"]
    w = step_warnings(_step(n_out=10, dropped={"x": 90}, counters={"heuristic_filter/c4_modified": 9}))
    assert [x["code"] for x in w] == ["dropped_most", "rewrote_most"]
    assert "9 of the 10 kept documents" in w[1]["message"]
    assert step_warnings(_step(counters={"heuristic_filter/c4_modified": 50})) == []
    # LLM / synthetic steps: a small output
    assert [x["code"] for x in step_warnings(_step("generate", n_out=5))] == ["low_output"]
    assert step_warnings(_step("generate", n_out=50)) == []
    assert [x["code"] for x in step_warnings(_step("my_stage", n_out=5, counters={"llm/requests": 100}))] == \
        ["low_output"]
    assert step_warnings(_step("my_stage", n_out=5)) == []   # a plain step may shrink
    # what a stage counted itself, and errors
    w = step_warnings(_step("rephrase", counters={"warnings/low_yield": 3}))
    assert w == [{"code": "low_yield", "message": "low yield (the stage counted 3)"}]
    w = step_warnings(_step(errors={"parse/no_json": 4, "exception/ValueError": 1}))
    assert w[0]["code"] == "errors" and "5 rows" in w[0]["message"] and "errors/parse/no_json 4" in w[0]["message"]


def test_warnings_are_shown_below_the_funnel_in_stats_and_in_the_report(tmp_path):
    # short one-line documents: Gopher's minimum word count drops nearly all of them; the
    # long ones have lines without end punctuation, which C4's line filter removes
    prose = ("The committee reviewed the annual budget and approved the new plan for the schools. "
             "Members of the public were invited to comment on the proposal before the final vote. ")
    long_doc = "\n".join([prose * 3, "see also the index", prose * 2, "Table of contents", prose * 3])
    texts = [f"short note number {i}" for i in range(30)] + [long_doc.replace("plan", f"plan {i}") for i in range(4)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    p = write_yaml(str(tmp_path / "p.yaml"), {
        "name": "w", "output": str(tmp_path / "out"), "workers": 1,
        "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": [str(tmp_path / "docs.parquet")]}}},
        "stages": [{"stage": "heuristic_filter", "options": {"gopher_repetition": {"enabled": False},
                                                             "fineweb": {"enabled": False}}}]})
    r = cli("run", "-q", p)
    assert r.exit_code == 0, r.output
    assert "WARNING step heuristic_filter: dropped/gopher_quality:gopher_short_doc removed 30 of its 34" in r.stderr
    assert "heuristic_filter/c4_modified: 4 of the 4 kept documents (100%)" in r.stderr
    assert "WARNING" not in r.stdout   # on stderr, below the funnel
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert [w["code"] for w in stats["steps"]["heuristic_filter"]["warnings"]] == ["dropped_most", "rewrote_most"]
    assert stats["steps"]["docs"]["warnings"] == []
    page = open(tmp_path / "out" / "report.html").read()
    assert "<h2 id='warnings'>Warnings</h2>" in page and "gopher_short_doc removed 30 of its 34" in page
