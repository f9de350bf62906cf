"""One run per output: the lease on ``<output>/_curate/lease.json`` (curate/pipeline/lease.py) on
an s3:// output through the real S3 protocol (a moto server on 127.0.0.1, as tests/pipeline/test_s3.py)
and on local folders."""

import json
import os
import socket
import subprocess
import time

import pytest

from curate.pipeline.runner import OutputLocked
from curate.run import run_pipeline
from helpers import curate_bin, pipeline_dict, write_corpus, write_yaml

s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed")

PLUGINS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins")


def _env(**extra):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, PLUGINS, os.environ.get("PYTHONPATH", "")]),
            **extra}


def _lease(fs):
    return json.loads(fs.cat(f"{fs.bucket}/out/_curate/lease.json"))


def _slow_pipeline(tmp_path, out, seconds=0.5, files=2):
    write_corpus(str(tmp_path / "in"), files=files, rows=100)
    d = pipeline_dict(str(tmp_path / "in"), out, workers=1, batch_size=10)
    d["stages"].insert(1, {"stage": "slow", "options": {"seconds_per_batch": seconds}})
    return d


@pytest.mark.slow
def test_a_second_run_on_an_s3_output_is_refused_and_deletes_nothing(tmp_path, s3):
    """A --force run started 8 s after another one deleted its shards."""
    out = f"s3://{s3.bucket}/out"
    d = _slow_pipeline(tmp_path, out, seconds=0.6, files=5)   # about 30 s, a task every 6 s
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    first = subprocess.Popen([curate_bin(), "run", "-q", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=_env(CURATE_LEASE_TTL="4"))
    deadline = time.time() + 60
    while time.time() < deadline and not s3.glob(f"{s3.bucket}/out/_curate/state/*/done/*.json"):
        time.sleep(0.1)
        s3.invalidate_cache()
    assert s3.glob(f"{s3.bucket}/out/_curate/state/*/done/*.json"), "the first run never finished a task"
    lease = _lease(s3)
    assert lease["holder"]["pid"] == first.pid and lease["holder"]["host"] == socket.gethostname()
    time.sleep(4.5)     # longer than the ttl: the heartbeat keeps a live run's lease
    assert first.poll() is None
    s3.invalidate_cache()
    done = sorted(s3.glob(f"{s3.bucket}/out/_curate/state/*/done/*.json"))
    with pytest.raises(OutputLocked, match=rf"holds the lease .*{socket.gethostname()}:{first.pid}.*--break-lock"):
        run_pipeline(d, progress=False, force=True)
    r = subprocess.run([curate_bin(), "run", "-q", "--force", cfg], capture_output=True, text=True, env=_env())
    assert r.returncode == 4 and f"{socket.gethostname()}:{first.pid}" in r.stderr
    s3.invalidate_cache()
    assert set(done) <= set(s3.glob(f"{s3.bucket}/out/_curate/state/*/done/*.json"))   # nothing deleted
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    s3.invalidate_cache()
    assert not s3.exists(f"{s3.bucket}/out/_curate/lease.json")      # given back at the end
    res = run_pipeline(d, progress=False)
    assert all(s["status"] == "skipped" for s in res.stats.values())


def _plant(fs, holder, expires_in):
    now = time.time()
    fs.pipe(f"{fs.bucket}/out/_curate/lease.json",
            json.dumps({"holder": holder, "renewed": now - 1, "expires": now + expires_in, "ttl": 120}).encode())


def test_s3_stale_lease_is_taken_over_and_a_live_one_only_with_break_lock(tmp_path, s3, caplog):
    write_corpus(str(tmp_path / "in"), files=1, rows=200)
    d = pipeline_dict(str(tmp_path / "in"), f"s3://{s3.bucket}/out", workers=1)
    dead = {"host": "node-7", "pid": 4242, "run_id": "abc", "started": "2026-01-01T00:00:00Z"}
    _plant(s3, dead, expires_in=-5)                          # a run that died: expired
    res = run_pipeline(d, progress=False)
    assert res.stats["top"]["out"] == 50
    assert any("taking over the stale lease" in r.message and "node-7:4242" in r.message for r in caplog.records)

    _plant(s3, dead, expires_in=600)                         # not expired: refused, nothing written
    with pytest.raises(OutputLocked, match="node-7:4242 .*expires in .*--break-lock node-7:4242"):
        run_pipeline(d, progress=False, force=True)
    assert s3.exists(f"{s3.bucket}/out/top/part-00000.parquet")
    with pytest.raises(OutputLocked):
        run_pipeline(d, progress=False, break_lock="node-7:9999")   # another holder's name
    from curate.pipeline.config import load_pipeline
    from curate.pipeline.runner import Runner
    res = Runner(load_pipeline(d), force=True, progress=False, break_lock="node-7:4242").run()
    assert res.stats["top"]["status"] == "done"


def test_s3_lease_lost_to_another_run_stops_the_run(tmp_path, s3):
    """Conditional renewal: a run whose lease was taken over stops before its next step."""
    from curate.pipeline.config import load_pipeline
    from curate.pipeline.runner import Runner

    d = _slow_pipeline(tmp_path, f"s3://{s3.bucket}/out", seconds=0.01)
    runner = Runner(load_pipeline(d), progress=False)
    orig = runner._run_segment

    def segment(seg):
        orig(seg)
        if seg.target.name == "min_words":      # someone breaks the lock while we run
            lease = _lease(s3)
            _plant(s3, {"host": "other", "pid": 1, "run_id": "x", "started": "now"}, 600)
            assert lease["holder"]["run_id"] == runner._lease.holder["run_id"]
            runner._lease.renew()               # the heartbeat's next renewal

    runner._run_segment = segment
    with pytest.raises(OutputLocked, match="taken over by other:1"):
        runner.run()
    assert _lease(s3)["holder"]["host"] == "other"              # the other run's lease is left alone
    assert not s3.exists(f"{s3.bucket}/out/top")                  # no step started after the loss


@pytest.mark.slow
def test_local_lock_error_names_the_holder(tmp_path):
    out = str(tmp_path / "out")
    d = _slow_pipeline(tmp_path, out, seconds=0.5)
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    first = subprocess.Popen([curate_bin(), "run", "-q", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=_env())
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.exists(os.path.join(out, "_curate", "lease.json")):
        time.sleep(0.05)
    r = subprocess.run([curate_bin(), "run", "-q", "--force", cfg], capture_output=True, text=True, env=_env())
    first.kill()
    first.wait()
    assert r.returncode == 4, r.stderr
    assert f"{socket.gethostname()}:{first.pid}" in r.stderr and "another curate run is writing" in r.stderr
    r = subprocess.run([curate_bin(), "run", "-q", cfg], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr          # kill -9: the kernel released the lock; the run resumes
