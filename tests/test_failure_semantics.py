"""Failure semantics of the runner (README, "Failure semantics"): a step over its error fraction
stays unfinished until a rerun redoes its errored tasks; budget stops have their own exit code;
failed and interrupted runs leave stats, funnel and report of what finished; no secret from the
environment is written to the output."""

import json
import os
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.pipeline.runner import PipelineError, run_pipeline
from helpers import curate_bin, read_step, write_yaml

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, PLUGINS, os.environ.get("PYTHONPATH", "")])}


def _cli(*args, **kw):
    return subprocess.run([curate_bin(), *args], capture_output=True, text=True, env=_env(), timeout=300, **kw)


def _two_files(folder, bad="EXPLODE"):
    """a.parquet: 30 good documents; b.parquet: 30 documents containing ``bad``."""
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({"text": [f"good document {i} with words" for i in range(30)]}),
                   os.path.join(folder, "a.parquet"))
    pq.write_table(pa.table({"text": [f"other document {i} {bad}" for i in range(30)]}),
                   os.path.join(folder, "b.parquet"))


def _fragile_pipeline(tmp_path, **over):
    broken = tmp_path / "BROKEN"
    d = {"name": "fragile", "output": str(tmp_path / "out"), "workers": 1, "max_error_fraction": 0.2,
         "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "fragile", "options": {"broken_file": str(broken)}}]}
    d.update(over)
    return d, broken


def test_a_rerun_after_too_many_errors_fails_again_then_recovers_every_document(tmp_path):
    """Issue 16.1: the failed step's task records used to make a plain rerun exit 0 with the 30
    failed documents gone (and a rerun after the fix kept them gone)."""
    _two_files(str(tmp_path / "in"))
    d, broken = _fragile_pipeline(tmp_path)
    broken.write_text("")
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    for attempt in range(2):        # the cause is not fixed: every plain rerun fails the same way
        r = _cli("run", "-q", cfg)
        assert r.returncode == 1, (attempt, r.stderr)
        assert "30 of 60 documents failed" in r.stderr and "max_error_fraction=0.2" in r.stderr
        assert "30 rows failed in step fragile" in r.stderr
        stats = json.load(open(tmp_path / "out" / "stats.json"))
        assert stats["complete"] is False and stats["failure"]["step"] == "fragile"
        assert stats["steps"]["fragile"]["errors"] == {"exception/ValueError": 30}
        assert not (tmp_path / "out" / "_curate" / "state" / "fragile" / "DONE.json").exists()
    good = tmp_path / "out" / "fragile" / "part-00000-00000.parquet"
    mtime = os.stat(good).st_mtime_ns
    broken.unlink()                 # the cause is fixed: the rerun redoes exactly the errored task
    r = _cli("run", "-q", cfg)
    assert r.returncode == 0, r.stderr
    assert "rows failed" not in r.stderr
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["complete"] is True and stats["steps"]["fragile"]["status"] == "resumed"
    assert stats["steps"]["fragile"]["out"] == 60 and stats["steps"]["fragile"]["errors"] == {}
    out = pa.concat_tables(read_step(str(tmp_path / "out"), "fragile").values())
    assert out.num_rows == 60 and len(set(out.column("id").to_pylist())) == 60
    assert os.stat(good).st_mtime_ns == mtime      # the error-free task was kept, not redone


def test_error_fraction_default_and_loud_summary(tmp_path):
    """The default threshold reads as "almost nothing lost" (1%); exactly at it passes, above it
    fails; errored rows of a passing run are named on stderr after the funnel."""
    from curate.pipeline.config import PipelineSpec

    assert PipelineSpec(output="x").max_error_fraction == 0.01
    os.makedirs(tmp_path / "in")
    texts = [f"document {i}" + (" EXPLODE" if i < 2 else "") for i in range(200)]  # 1% fail
    pq.write_table(pa.table({"text": texts}), str(tmp_path / "in" / "a.parquet"))
    d = {"name": "x", "output": str(tmp_path / "out"), "workers": 1, "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "explode"}]}
    r = _cli("run", "-q", write_yaml(str(tmp_path / "p.yaml"), d))
    assert r.returncode == 0, r.stderr
    assert "2 rows failed in step explode (exception/ValueError 2;" in r.stderr
    assert "explode" in r.stdout and "2 rows failed" not in r.stdout
    texts[2] += " EXPLODE"          # 3 of 200: more than 1%
    pq.write_table(pa.table({"text": texts}), str(tmp_path / "in" / "a.parquet"))
    with pytest.raises(PipelineError, match="3 of 200 documents failed"):
        run_pipeline({**d, "output": str(tmp_path / "out2")}, progress=False)


def _three_step(tmp_path, last):
    from helpers import write_corpus
    write_corpus(str(tmp_path / "in"), files=2, rows=200)
    return {"name": "partial", "output": str(tmp_path / "out"), "workers": 2, "batch_size": 50,
            "plugins": ["runner_stages"],
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
            "stages": [{"stage": "word_count"}, {"stage": "min_words", "options": {"min_words": 10}},
                       {"name": "top", "stage": "top_k", "options": {"k": 20}}, {**last, "input": "top"}]}


def test_a_failed_run_leaves_stats_funnel_report_and_inspect_per_step(tmp_path):
    """Issue 18.3: a failed run wrote no stats.json, funnel or report, and `curate inspect` merged
    every step's shards into one dataset."""
    d = _three_step(tmp_path, {"name": "boom", "stage": "explode", "options": {"bad_word": " "}})
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    r = _cli("run", "-q", cfg)
    assert r.returncode == 1 and "step 'boom': 20 of 20 documents failed" in r.stderr
    out = tmp_path / "out"
    stats = json.load(open(out / "stats.json"))
    assert stats["complete"] is False
    assert stats["failure"]["step"] == "boom" and stats["failure"]["kind"] == "failed"
    st = stats["steps"]
    assert st["min_words"]["status"] == "done" and st["min_words"]["in"] == 400
    assert st["top"]["status"] == "done" and st["top"]["out"] == 20
    assert st["boom"]["status"] == "failed" and st["boom"]["errors"] == {"exception/ValueError": 20}
    # the funnel of what finished is on the terminal, marked
    assert "min_words" in r.stdout and "top_k" in r.stdout and "INCOMPLETE" in r.stdout
    assert "failed" in [l for l in r.stdout.splitlines() if l.startswith("boom")][0]
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["complete"] is False and set(manifest["steps"]) == {"min_words", "top"}
    assert "INCOMPLETE RUN" in open(out / "report.html").read()
    r = _cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "INCOMPLETE" in r.stdout and "step 'boom'" in r.stdout
    assert "  top/  1 shards, 20 rows" in r.stdout and "  boom/  unfinished" in r.stdout
    assert "schema:" not in r.stdout          # an overview per step, not one merged dataset
    # the same output, killed before any stats were written: still per step
    os.remove(out / "stats.json")
    os.remove(out / "manifest.json")
    r = _cli("inspect", str(out))
    assert "INCOMPLETE" in r.stdout and "schema:" not in r.stdout and "  top/  unfinished" in r.stdout


@pytest.mark.slow
def test_sigterm_writes_what_finished_and_a_rerun_resumes(tmp_path):
    markers = tmp_path / "markers"
    d = _three_step(tmp_path, {"name": "slow", "stage": "slow",
                               "options": {"seconds_per_batch": 2.0, "marker_dir": str(markers)}})
    d["batch_size"] = 2
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    proc = subprocess.Popen([curate_bin(), "run", "-q", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and not (markers.is_dir() and os.listdir(markers)):
        time.sleep(0.05)
    assert os.listdir(markers), "the slow step never started"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)          # what Airflow, Kubernetes and `docker stop` send
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert time.time() - t0 < 15              # the workers are stopped, not waited for
    assert "terminated: finished shards are kept" in err and "INCOMPLETE" in out
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["complete"] is False and stats["failure"]["kind"] == "interrupted"
    assert stats["failure"]["step"] == "slow" and stats["steps"]["top"]["status"] == "done"
    d["stages"][-1]["options"]["seconds_per_batch"] = 2.0   # same options: the rerun resumes
    r = _cli("run", "-q", cfg)
    assert r.returncode == 0, r.stderr
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["complete"] is True and stats["steps"]["top"]["status"] == "skipped"
    assert stats["steps"]["slow"]["out"] == 20
