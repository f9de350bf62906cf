"""Ray across nodes: a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``:
a head and a second raylet, each with its own CPUs) runs the WARC example (extract, language id,
filters, exact and MinHash dedup) with ``runner: ray`` and gives byte-identical shards to the local
runner, also with an ``s3://`` output (spill files of the global steps live under the output, not on
the driver's disk). A Ray worker killed in the middle of a map step is retried: the output is
complete and has no duplicate."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from curate.pipeline.config import load_pipeline
from curate.pipeline.io import Dataset
from curate.pipeline.runner import Runner
from curate.run import run_pipeline
from helpers import ROOT, pipeline_dict, write_corpus

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'curate[ray]')")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

WARC_CONFIG = os.path.join(ROOT, "configs", "warc_example.yaml")


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1; its endpoint is in the environment before the cluster starts,
    so every Ray worker reaches it."""
    from s3_fixtures import start_moto

    server, env = start_moto()
    import s3fs

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    fs.mkdir("cluster-test")
    yield fs
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()   # cached clients point at this server
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3_env):
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _manifest(out_fs, out: str) -> dict:
    with out_fs.open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    return {step: [(s["path"], s["rows"], s["sha256"]) for s in v["shards"]] for step, v in m["steps"].items()}


def test_warc_example_on_two_nodes_equals_local(tmp_path, cluster, s3_env, monkeypatch):
    import fsspec
    from test_configs import make_warc_corpus

    make_warc_corpus(tmp_path)
    monkeypatch.setenv("WARC_PATHS", str(tmp_path / "*.warc.gz"))
    local = str(tmp_path / "local")
    run_pipeline(WARC_CONFIG, output=local, runner="local", progress=False)
    want = _manifest(fsspec.filesystem("file"), local)
    assert want["minhash_dedup"] and sum(r for _, r, _ in want["minhash_dedup"]) == 6

    on_ray = str(tmp_path / "ray")
    res = run_pipeline(WARC_CONFIG, output=on_ray, runner="ray", progress=False)
    assert _manifest(fsspec.filesystem("file"), on_ray) == want
    assert res.stats["minhash_dedup"]["dropped"] == {"near_duplicate": 6}
    # every node ran tasks
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2

    # an object-store output: shards, records and the global steps' spill files all go through S3
    pipe = load_pipeline(WARC_CONFIG, overrides={"output": "s3://cluster-test/warc", "runner": "ray"})
    runner = Runner(pipe, progress=False)
    runner.run()
    assert _manifest(s3_env, "cluster-test/warc") == want
    # nothing was spilled on the driver's disk
    for step in ("exact_dedup", "minhash_dedup"):
        local_work = runner.layout.workdir(step)
        assert not any(f.endswith(".parquet") for _, _, fs in os.walk(local_work) for f in fs)
        assert runner.layout.scratch_url(step).startswith("s3://cluster-test/warc/_curate/work/")


def test_killed_ray_worker_is_retried(tmp_path, cluster):
    write_corpus(str(tmp_path / "in"), files=6, rows=200)
    markers = str(tmp_path / "markers")
    d = pipeline_dict(str(tmp_path / "in"), str(tmp_path / "out"), runner="ray", batch_size=20)
    d["stages"].insert(1, {"stage": "slow", "options": {"seconds_per_batch": 0.15, "marker_dir": markers}})
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if os.path.isdir(markers) and len(os.listdir(markers)) >= 3:
                pid = int(sorted(os.listdir(markers))[0].split("-")[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    t = threading.Thread(target=kill_one)
    t.start()
    res = run_pipeline(d, progress=False)
    t.join()
    assert killed, "no worker was killed"
    clean = run_pipeline(pipeline_dict(str(tmp_path / "in"), str(tmp_path / "clean")), progress=False)
    for step in ("min_words", "counts2"):
        got = Dataset(res.outputs[step]).to_table()
        want = Dataset(clean.outputs[step]).to_table()
        ids = got.column("id").to_pylist()
        assert len(ids) == len(set(ids))                                   # no duplicate
        assert ids == want.column("id").to_pylist()                        # nothing lost
    assert res.stats["docs"]["out"] == 1200
