"""Runner behaviour added with the runner split: work after a global step is spread over every
worker, transient row failures are retried by a plain rerun, resumed runs say what they skipped,
step files are exactly what the completion records name, GPU jobs never get more workers than GPUs."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.pipeline.io import Dataset, iter_parquet
from curate.pipeline.runner import PipelineError
from curate.run import run_pipeline
from curate.pipeline.stats import funnel_table
from helpers import pipeline_dict, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(str(d), files=2, rows=300)
    return str(d)


def _after_global(corpus, out, workers, **over):
    """docs -> word_count -> top_k (global, one shard) -> word_count (map after a global step)."""
    d = pipeline_dict(corpus, out, workers=workers, rows_per_shard=1000, **over)
    d["stages"] = [{"stage": "word_count"},
                   {"name": "top", "stage": "top_k", "options": {"k": 400}},
                   {"name": "after", "stage": "word_count", "input": "top", "options": {"column": "n2"}}]
    return d


def test_map_after_global_step_uses_every_worker(tmp_path, corpus):
    one = run_pipeline(_after_global(corpus, str(tmp_path / "w1"), 1), progress=False)
    two = run_pipeline(_after_global(corpus, str(tmp_path / "w2"), 2), progress=False)
    # the global step wrote a single shard ...
    assert len(two.outputs["top"]) == 1
    # ... and the map step after it still ran as two tasks (one per worker), over row ranges
    done = os.listdir(tmp_path / "w2" / "_curate" / "state" / "after" / "done")
    assert len(done) == 2
    assert len(os.listdir(tmp_path / "w1" / "_curate" / "state" / "after" / "done")) == 1
    # same rows in the same order either way
    a = Dataset(one.outputs["after"]).to_table()
    b = Dataset(two.outputs["after"]).to_table()
    assert a.num_rows == b.num_rows == 400
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert a.column("n2").to_pylist() == b.column("n_words").to_pylist()


def test_resume_marks_skipped_steps_and_times_add_up(tmp_path, corpus):
    out = str(tmp_path / "o")
    first = run_pipeline(_after_global(corpus, out, 2), progress=False)
    assert all(s["status"] == "done" for s in first.stats.values())
    assert sum(s["seconds"] for s in first.stats.values()) <= first.seconds + 0.05
    again = run_pipeline(_after_global(corpus, out, 2), progress=False)
    assert all(s["status"] == "skipped" and s["seconds"] == 0 for s in again.stats.values())
    assert again.stats["after"]["cpu_seconds"] == first.stats["after"]["cpu_seconds"]
    table = funnel_table(again.stats)
    assert all(line.rstrip().endswith("skipped") for line in table.splitlines()[2:])
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]
    assert stats["top"]["status"] == "skipped"


def test_partly_finished_step_is_marked_resumed(tmp_path, corpus):
    out = str(tmp_path / "o")
    d = pipeline_dict(corpus, out)
    run_pipeline(d, progress=False)
    # forget one task of the fused min_words chain: the next run redoes only that task
    state = os.path.join(out, "_curate", "state", "min_words")
    os.remove(os.path.join(state, "DONE.json"))
    os.remove(os.path.join(state, "done", "part-00001.json"))
    res = run_pipeline(d, progress=False)
    assert res.stats["min_words"]["status"] == "resumed"
    assert res.stats["docs"]["status"] == "resumed"
    assert "(resumed)" in funnel_table(res.stats)


def test_step_folder_holds_exactly_the_recorded_files(tmp_path, corpus):
    out = str(tmp_path / "o")
    d = pipeline_dict(corpus, out)
    first = run_pipeline(d, progress=False)
    # leftovers of an earlier split into more tasks, and of a killed write
    stray = os.path.join(out, "min_words", "part-00042-00000.parquet")
    pq.write_table(pa.table({"text": ["stray"]}), stray)
    open(os.path.join(out, "min_words", "part-00000-00000.parquet.tmp-abcd"), "w").close()
    os.remove(os.path.join(out, "_curate", "state", "min_words", "DONE.json"))
    again = run_pipeline(d, progress=False)
    assert not os.path.exists(stray)
    names = sorted(f for f in os.listdir(os.path.join(out, "min_words")) if not f.startswith("_"))
    assert names == sorted(os.path.basename(u) for u in again.outputs["min_words"])
    assert again.outputs["min_words"] == first.outputs["min_words"]


def test_transient_failures_are_retried_by_a_plain_rerun(tmp_path, corpus):
    clean = run_pipeline(pipeline_dict(corpus, str(tmp_path / "clean")), progress=False)
    out = str(tmp_path / "o")
    d = pipeline_dict(corpus, out)
    d["stages"].insert(1, {"stage": "flaky", "options": {"state_dir": str(tmp_path / "flaky")}})
    with pytest.raises(PipelineError, match=r"failed for reasons that may pass \(timeout\).*Run the same command"):
        run_pipeline(d, progress=False)
    assert not os.path.exists(os.path.join(out, "_curate", "state", "min_words", "DONE.json"))
    res = run_pipeline(d, progress=False)      # no --force: the failed tasks run again
    assert res.stats["flaky"]["errors"] == {}  # this run had no failure
    for step in ("min_words", "top", "counts2"):
        got = Dataset(res.outputs[step]).to_table()
        want = Dataset(clean.outputs[step]).to_table()
        assert got.column("id").to_pylist() == want.column("id").to_pylist(), step


def test_iter_parquet_row_ranges(tmp_path):
    p = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"x": list(range(1000))}), p, row_group_size=128)
    for start, stop in [(0, None), (100, 300), (128, 256), (999, None), (500, 2000), (1000, None)]:
        got = [v for t in iter_parquet(p, batch_size=50, start=start, stop=stop) for v in t.column("x").to_pylist()]
        assert got == list(range(1000))[start:stop]


def test_gpu_jobs_get_at_most_one_worker_per_gpu(monkeypatch):
    from curate.pipeline.local_executor import LocalExecutor
    from curate.pipeline.worker import SegmentJob

    def job(gpus):
        return SegmentJob(key="k", fingerprint="f", source=None, chain=(), out_dir="o", state_dir="s",
                   side_dirs={}, task_ids=(), batch_size=1, rows_per_shard=1, gpus=gpus)

    ex = LocalExecutor(1)
    ex.workers = 4                      # a 4-process pool, without starting one
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert ex.slots(job(0)) == 4
    assert ex.slots(job(1)) == 2
    assert ex.slots(job(2)) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert ex.slots(job(1)) == 1        # no GPU: one engine at a time, which says what it lacks


def test_local_gpu_stage_runs_one_pinned_worker_per_gpu(tmp_path, monkeypatch):
    """Two (declared) GPUs and four workers: the GPU step runs on exactly two processes, each
    pinned to its own device for life and set up once."""
    write_corpus(str(tmp_path / "in"), files=6, rows=40)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    markers = str(tmp_path / "markers")
    d = {"name": "gpu", "output": str(tmp_path / "out"), "workers": 4, "batch_size": 10,
         "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "gpu_probe", "options": {"marker_dir": markers}}]}
    res = run_pipeline(d, progress=False)
    t = Dataset(res.outputs["gpu_probe"]).to_table()
    assert t.num_rows == 240
    by_pid: dict[int, set] = {}
    for pid, gpu in zip(t.column("pid").to_pylist(), t.column("gpu").to_pylist()):
        by_pid.setdefault(pid, set()).add(gpu)
    assert len(by_pid) == 2                                           # never more engines than GPUs
    assert sorted(next(iter(g)) for g in by_pid.values()) == ["0", "1"]   # each its own device
    assert all(len(g) == 1 for g in by_pid.values())
    assert sorted(os.listdir(markers)) == sorted(f"setup-{p}" for p in by_pid)


def test_a_run_writes_its_report(tmp_path, corpus):
    out = str(tmp_path / "o")
    run_pipeline(pipeline_dict(corpus, out), progress=False)
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert "<svg" in page and "min_words" in page and "too_short" in page
    out2 = str(tmp_path / "o2")
    run_pipeline(pipeline_dict(corpus, out2, report=False), progress=False)
    assert not os.path.exists(os.path.join(out2, "report.html"))
