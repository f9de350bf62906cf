"""`--log-format json` and `--log-level` (issue 21): a real `curate run` in a subprocess (two worker
processes) on a small pipeline; every stderr line is one JSON object with time, level, step, event,
counters; the funnel becomes `step` events that match stats.json; text mode is unchanged."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from helpers import pipeline_dict, write_corpus, write_yaml

KEYS = {"time", "level", "logger", "event", "step", "counters", "message"}


def _pipeline(tmp_path):
    write_corpus(str(tmp_path / "in"), files=2, rows=100)
    return write_yaml(str(tmp_path / "p.yaml"), pipeline_dict(str(tmp_path / "in"), str(tmp_path / "out")))


def _json_lines(stderr):
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    for obj in lines:
        assert set(obj) >= KEYS, obj
        assert isinstance(obj["counters"], dict) and obj["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
    return lines


def test_run_json_logs(tmp_path):
    p = _pipeline(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CURATE_LOG_")}
    r = subprocess.run([sys.executable, "-m", "curate.cli", "--log-format", "json", "run", p], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == ""                         # everything is a JSON line on the log stream
    events = _json_lines(r.stderr)                # json.loads fails on any non-JSON line
    stats = json.load(open(tmp_path / "out" / "stats.json"))["steps"]
    steps = {e["step"]: e["counters"] for e in events if e["event"] == "step"}
    assert list(steps) == list(stats)
    for name, s in stats.items():
        assert (steps[name]["in"], steps[name]["out"], steps[name]["status"]) == (s["in"], s["out"], s["status"])
    assert steps["min_words"]["dropped"] == stats["min_words"]["dropped"] and steps["min_words"]["dropped"]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and {e["step"] for e in progress} <= set(stats)
    assert all(isinstance(e["counters"]["docs"], int) and "docs_per_s" in e["counters"] for e in progress)
    done = [e for e in events if e["event"] == "run"]
    assert done[-1]["counters"]["complete"] is True and done[-1]["counters"]["output"] == str(tmp_path / "out")
    # again, options on `run`, --log-level warning: no INFO log lines, the summary (all skipped) stays
    r = subprocess.run([sys.executable, "-m", "curate.cli", "run", p, "--log-format", "json", "--log-level",
                        "warning", "--workers", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    events = _json_lines(r.stderr)
    assert not [e for e in events if e["level"] == "INFO" and e["event"] in ("log", "progress")]
    assert {e["step"]: e["counters"]["status"] for e in events if e["event"] == "step"} == \
        {s: "skipped" for s in stats}


def test_json_error_and_env_variable(tmp_path):
    bad = write_yaml(str(tmp_path / "bad.yaml"), {"name": "x", "output": str(tmp_path / "o"),
                                                   "stages": [{"stage": "no_such_stage"}]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("CURATE_LOG_")}
    env["CURATE_LOG_FORMAT"] = "json"
    r = subprocess.run([sys.executable, "-m", "curate.cli", "run", bad], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and r.stdout == ""
    (err,) = _json_lines(r.stderr)
    assert err["event"] == "error" and err["level"] == "ERROR" and "no_such_stage" in err["message"]
    # the group's option applies to every command
    env.pop("CURATE_LOG_FORMAT")
    r = subprocess.run([sys.executable, "-m", "curate.cli", "--log-format", "json", "validate", bad],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stdout == ""
    (err,) = _json_lines(r.stderr)
    assert err["event"] == "error" and "no_such_stage" in err["message"]


def test_text_mode_is_unchanged(tmp_path):
    p = _pipeline(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CURATE_LOG_")}
    r = subprocess.run([sys.executable, "-m", "curate.cli", "run", p, "--log-level", "debug", "--workers", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "min_words" in r.stdout and "output:" in r.stdout          # the funnel table
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and not any(ln.startswith("{") for ln in lines)
    assert any(" DEBUG " in ln for ln in lines) and any(" INFO " in ln for ln in lines)


@pytest.mark.parametrize("fmt,bar", [("json", False), ("text", True)])
def test_progress_bar_only_in_text_mode_on_a_terminal(monkeypatch, fmt, bar):
    from curate.pipeline.stats import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    monkeypatch.setenv("CURATE_LOG_FORMAT", fmt)
    p = Progress("s", total=10)
    assert (p._bar is not None) == bar
    p.close()


def test_json_formatter_fields():
    from curate.logs import JsonFormatter, event

    stream = io.StringIO()
    lg = logging.getLogger("curate.test_json_formatter")
    h = logging.StreamHandler(stream)
    h.setFormatter(JsonFormatter())
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        event(lg, "progress", "[dedup] 10 docs", step="dedup", counters={"docs": 10})
        lg.warning("step select: kept none")
        try:
            raise ValueError("boom")
        except ValueError:
            lg.exception("failed")
    finally:
        lg.removeHandler(h)
    a, b, c = [json.loads(x) for x in stream.getvalue().splitlines() if x.startswith("{")]
    assert (a["event"], a["step"], a["counters"], a["level"]) == ("progress", "dedup", {"docs": 10}, "INFO")
    assert (b["event"], b["step"], b["level"]) == ("log", "select", "WARNING")
    assert c["level"] == "ERROR" and "ValueError: boom" in c["exception"] and a["time"].endswith("+00:00")
