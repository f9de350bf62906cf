"""The local runner: map + global stages end to end, resume after SIGKILL, atomic writes, --force."""

import glob
import json
import os
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate.pipeline import io as cio
from curate.pipeline.config import load_pipeline
from curate.pipeline.runner import PipelineError
from curate.run import run_pipeline
from helpers import pipeline_dict, read_step, write_corpus, write_yaml


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(str(d), files=4, rows=500)
    return str(d)


def expected_tables(corpus):
    t = pq.read_table(corpus)  # the four files, in file order
    n = pc.list_value_length(pc.utf8_split_whitespace(t.column("text")))
    return t, n.to_pylist()


def test_end_to_end_map_and_global(tmp_path, corpus):
    out = str(tmp_path / "out")
    res = run_pipeline(pipeline_dict(corpus, out), progress=False)
    src, n = expected_tables(corpus)
    long_texts = [t for t, k in zip(src.column("text").to_pylist(), n) if k >= 10]

    kept = pa.concat_tables(read_step(out, "min_words").values())
    assert kept.column("text").to_pylist() == long_texts          # order kept, filter exact
    assert set(kept.schema.names) >= {"id", "text", "source", "metadata", "lang_hint", "n_words"}
    assert len(set(kept.column("id").to_pylist())) == kept.num_rows
    assert all(len(t) <= 300 for t in read_step(out, "min_words").values() for t in [t.column("id")])

    dropped = pa.concat_tables(read_step(out, "min_words/_dropped").values())
    assert dropped.num_rows == len(src) - len(long_texts)
    assert set(dropped.column("drop_reason").to_pylist()) == {"too_short"}

    top = pa.concat_tables(read_step(out, "top").values())
    assert top.num_rows == 50
    lengths = sorted((len(t) for t in src.column("text").to_pylist()), reverse=True)
    assert min(len(t) for t in top.column("text").to_pylist()) == lengths[49]

    branch = pa.concat_tables(read_step(out, "counts2").values())
    assert branch.column("n2").to_pylist() == branch.column("n_words").to_pylist()

    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]
    assert stats["docs"]["out"] == 2000
    assert stats["min_words"]["in"] == 2000 and stats["min_words"]["out"] == len(long_texts)
    assert stats["min_words"]["dropped"] == {"too_short": 2000 - len(long_texts)}
    assert stats["top"]["in"] == len(long_texts) and stats["top"]["out"] == 50
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    for step in ("min_words", "top", "counts2"):
        for sh in manifest["steps"][step]["shards"]:
            data = open(os.path.join(out, step, sh["path"]), "rb").read()
            import hashlib
            assert hashlib.sha256(data).hexdigest() == sh["sha256"]
    assert res.stats == stats


def _run_cli(args, **kw):
    from helpers import curate_bin
    return subprocess.Popen([curate_bin(), "run", "-q", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _all_parquet_valid(out):
    for f in glob.glob(os.path.join(out, "**", "*.parquet"), recursive=True):
        pq.read_table(f)  # raises on a partial file


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["map", "global"])
def test_resume_after_sigkill_gives_identical_output(tmp_path, corpus, phase):
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "out")
    d = pipeline_dict(corpus, ref_out)
    d["stages"].insert(1, {"stage": "slow", "options": {"seconds_per_batch": 0.15}})
    d["stages"][3]["options"]["sleep"] = 3.0 if phase == "global" else 0.0
    run_pipeline(d, progress=False)

    cfg = write_yaml(str(tmp_path / "p.yaml"), {**d, "output": out})
    kills = 0
    for attempt in range(8):
        proc = _run_cli([cfg], start_new_session=True)
        deadline = time.time() + 60
        # wait for the phase we want to interrupt
        while time.time() < deadline and proc.poll() is None:
            done = glob.glob(os.path.join(out, "_curate/state/min_words/done/*.json"))
            if phase == "map" and len(done) >= 1 + attempt:
                break
            if phase == "global" and os.path.exists(os.path.join(out, "_curate/state/min_words/DONE.json")):
                time.sleep(0.5)
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its spawned workers
        proc.wait()
        kills += 1
        _all_parquet_valid(out)
        if phase == "global":
            assert not os.path.exists(os.path.join(out, "_curate/state/top/DONE.json"))
            break
    assert kills >= 1
    proc = _run_cli([cfg])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err

    for step in ("min_words", "top", "counts2"):
        a, b = read_step(ref_out, step), read_step(out, step)
        assert list(a) == list(b)
        for name in a:
            assert a[name].equals(b[name]), (step, name)
    ref_stats = json.load(open(os.path.join(ref_out, "stats.json")))["steps"]
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]
    for step in ref_stats:
        for key in ("in", "out", "dropped", "errors"):
            assert stats[step][key] == ref_stats[step][key], (step, key)


def test_atomic_shard_write_leaves_no_partial_file(tmp_path, monkeypatch):
    t = pa.table({"id": ["a", "b"], "text": ["x", "y"]})
    target = str(tmp_path / "part-00000.parquet")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(cio.os, "replace", broken_replace)
    with pytest.raises(OSError):
        cio.write_parquet_atomic(cio.get_fs(target)[0], target, t)
    assert not os.path.exists(target)
    assert cio.list_parquet(str(tmp_path)) == []   # the temp file is never listed as a shard
    monkeypatch.undo()
    info = cio.write_parquet_atomic(cio.get_fs(target)[0], target, t)
    assert pq.read_table(target).equals(t) and info.rows == 2


def test_rerun_skips_and_force_recomputes(tmp_path, corpus):
    out = str(tmp_path / "out")
    d = pipeline_dict(corpus, out)
    run_pipeline(d, progress=False)
    shard = os.path.join(out, "top", "part-00000.parquet")
    before = read_step(out, "min_words")
    m1 = os.stat(shard).st_mtime_ns
    res = run_pipeline(d, progress=False)
    assert os.stat(shard).st_mtime_ns == m1
    assert all(s["status"] == "skipped" for s in res.stats.values())
    res = run_pipeline(d, progress=False, force=True)
    assert os.stat(shard).st_mtime_ns != m1
    assert all(s["status"] == "done" for s in res.stats.values())
    after = read_step(out, "min_words")
    assert list(before) == list(after) and all(before[k].equals(after[k]) for k in before)


def test_changed_options_recompute_step_and_downstream_only(tmp_path, corpus):
    out = str(tmp_path / "out")
    d = pipeline_dict(corpus, out)
    run_pipeline(d, progress=False)
    d["stages"][2]["options"]["k"] = 7               # only the global step changes
    res = run_pipeline(d, progress=False)
    assert res.stats["min_words"]["status"] == "skipped"
    assert res.stats["top"]["status"] == "done" and res.stats["top"]["out"] == 7
    d["stages"][1]["options"]["min_words"] = 20       # upstream change: everything below reruns
    res = run_pipeline(d, progress=False)
    assert res.stats["min_words"]["status"] == "done" and res.stats["counts2"]["status"] == "done"
    kept = pa.concat_tables(read_step(out, "min_words").values())
    assert min(kept.column("n_words").to_pylist()) >= 20


def test_failing_documents_are_isolated_and_counted(tmp_path):
    texts = [f"document number {i} with enough words to pass" for i in range(100)]
    texts[7] += " EXPLODE"
    texts[42] += " EXPLODE"
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"text": texts}), str(tmp_path / "in" / "a.parquet"))
    d = {"name": "x", "output": str(tmp_path / "out"), "workers": 1, "plugins": ["runner_stages"],
         "max_error_fraction": 0.05,   # 2% fail: within it (the default, 1%, would stop the run)
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "explode"}]}
    res = run_pipeline(d, progress=False)
    assert res.stats["explode"]["errors"] == {"exception/ValueError": 2}
    out = pa.concat_tables(read_step(str(tmp_path / "out"), "explode").values())
    assert out.num_rows == 98 and not any("EXPLODE" in t for t in out.column("text").to_pylist())

    pq.write_table(pa.table({"text": [t + " EXPLODE" for t in texts]}), str(tmp_path / "in" / "a.parquet"))
    with pytest.raises(PipelineError, match="max_error_fraction"):
        run_pipeline({**d, "output": str(tmp_path / "out2")}, progress=False)


def test_library_calls_on_table_and_path(tmp_path, corpus):
    from runner_stages import MinWords, TopK, WordCount
    from curate.stages.sources.read_parquet import ReadParquet

    docs = ReadParquet(paths=corpus)()
    assert docs.num_rows == 2000 and len(set(docs.column("id").to_pylist())) == 2000
    counted = WordCount()(docs)
    assert counted.column("n_words").to_pylist() == expected_tables(corpus)[1]
    f = MinWords(min_words=10)
    kept = f(counted)
    assert kept.num_rows == sum(1 for k in counted.column("n_words").to_pylist() if k >= 10)
    assert f.counters.data["dropped/too_short"] == 2000 - kept.num_rows
    pq.write_table(counted, str(tmp_path / "counted.parquet"))
    assert MinWords(min_words=10)(str(tmp_path / "counted.parquet")).equals(kept)
    assert TopK(k=5)(kept).num_rows == 5


def test_fsspec_output_memory_filesystem(corpus):
    import fsspec

    d = pipeline_dict(corpus, "memory://curate-test/out", workers=1)
    res = run_pipeline(d, progress=False)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/curate-test/out/stats.json")
    assert res.stats["top"]["out"] == 50
    top = pa.concat_tables([pq.read_table(fs.open(p)) for p in fs.glob("/curate-test/out/top/*.parquet")])
    assert top.num_rows == 50
    res2 = run_pipeline(d, progress=False)  # resume works on the remote filesystem too
    assert res2.stats["top"]["status"] == "skipped"


def test_plain_progress_lines_when_not_a_tty(tmp_path, corpus, caplog):
    import logging

    from curate.pipeline.stats import Progress
    caplog.set_level(logging.INFO, logger="curate")
    p = Progress("step", total=100, interval=0.0, tty=False)
    p.update(40)
    p.close()
    assert any("[step] 40 docs" in r.message and "40% of 100" in r.message for r in caplog.records)


def test_second_run_on_same_output_is_refused(tmp_path, corpus):
    import fcntl
    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, "_curate"))
    with open(os.path.join(out, "_curate", "lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)   # as a running `curate run` holds it
        with pytest.raises(PipelineError, match="another curate run"):
            run_pipeline(pipeline_dict(corpus, out), progress=False)
    assert run_pipeline(pipeline_dict(corpus, out), progress=False).stats["top"]["out"] == 50


@pytest.mark.slow
def test_workers_die_with_a_killed_run(tmp_path, corpus):
    d = pipeline_dict(corpus, str(tmp_path / "out"))
    markers = str(tmp_path / "markers")
    d["stages"].insert(1, {"stage": "slow", "options": {"seconds_per_batch": 0.3, "marker_dir": markers}})
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    proc = _run_cli([cfg])
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.isdir(markers) and os.listdir(markers)):
        time.sleep(0.05)
    assert os.listdir(markers), "the run never started processing"
    os.kill(proc.pid, signal.SIGKILL)          # only the main process, as `kill -9 PID` does
    proc.wait()
    time.sleep(2.0)
    n = len(os.listdir(markers))
    time.sleep(1.5)
    assert len(os.listdir(markers)) == n, "orphaned workers kept processing after the run was killed"


def test_empty_input_to_global_steps_and_a_warning(tmp_path, caplog):
    import logging
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"text": ["too short", "tiny"]}), str(tmp_path / "in" / "a.parquet"))
    d = {"name": "e", "output": str(tmp_path / "out"), "workers": 1, "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "word_count"}, {"stage": "min_words", "options": {"min_words": 5}},
                    {"stage": "top_k", "options": {"k": 3}}, {"stage": "exact_dedup"}]}
    caplog.set_level(logging.WARNING, logger="curate")
    res = run_pipeline(d, progress=False)
    assert res.stats["min_words"]["out"] == 0 and res.stats["exact_dedup"]["out"] == 0
    assert res.outputs["exact_dedup"] == []
    assert any("step min_words kept none of its 2 documents (too_short 2)" in r.message for r in caplog.records)


@pytest.mark.parametrize("workers", [1, 2])
def test_generated_tokens_reach_the_progress_bar(tmp_path, corpus, monkeypatch, workers):
    from curate.pipeline import stats as S

    seen = []
    orig = S.Progress.update

    def update(self, n, tokens=0):
        seen.append((self.step, n, tokens))
        return orig(self, n, tokens)

    monkeypatch.setattr(S.Progress, "update", update)
    d = {"name": "tok", "output": str(tmp_path / "out"), "workers": workers, "batch_size": 100,
         "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": corpus}}},
         "stages": [{"stage": "fake_tokens"}]}
    res = run_pipeline(d, progress=True)
    assert sum(t for step, _, t in seen if step == "fake_tokens") == 3 * 2000
    assert sum(n for step, n, _ in seen if step == "fake_tokens") == 2000
    assert res.stats["fake_tokens"]["counters"]["llm/completion_tokens"] == 6000
