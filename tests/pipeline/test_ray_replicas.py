"""GPU steps on Ray: replicas that own their devices, load their engine once, share one queue,
survive crashes; per-step `resources:` checked before any work; environment forwarded to workers.

One Ray instance with two declared (logical) GPUs is shared by the module's Ray tests; the
``replica_probe`` and ``env_probe`` stages are in tests/plugins/replica_stages.py.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import subprocess

import pyarrow as pa
import pytest

from curate.pipeline.config import ConfigError, load_pipeline
from curate.pipeline.io import Dataset
from curate.pipeline.runner import PipelineError
from curate.run import run_pipeline
from curate.stages.sources.read_parquet import ReadParquet
from helpers import write_corpus, write_yaml

# minutes of parity/cluster checks: in `make test-slow` (CI runs both)
pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'curate[ray]')")

FILES, ROWS = 8, 25


@pytest.fixture(scope="module")
def gpu_ray():
    """A local Ray with 2 CPUs and 2 logical GPUs (Ray gives each GPU actor CUDA_VISIBLE_DEVICES)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _corpus(tmp_path) -> tuple[str, list[str]]:
    inp = str(tmp_path / "in")
    write_corpus(inp, files=FILES, rows=ROWS)
    ids = ReadParquet(paths=inp)().column("id").to_pylist()
    return inp, ids


def _pipe(inp: str, out: str, runner: str = "ray", resources: dict | None = None, **options) -> dict:
    step = {"stage": "replica_probe", "options": options}
    if resources is not None:
        step["resources"] = resources
    return {"name": "replicas", "output": out, "runner": runner, "workers": 2, "batch_size": 100,
            "plugins": ["replica_stages"],
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": inp}}},
            "stages": [step]}


def _output(res) -> pa.Table:
    return Dataset(res.outputs["replica_probe"]).to_table().sort_by("id")


@pytest.mark.ray
def test_replicas_own_their_gpu_load_once_and_redo_the_rows_of_a_crashed_one(tmp_path, gpu_ray, caplog):
    inp, ids = _corpus(tmp_path)
    markers = str(tmp_path / "markers")
    crash_row, cuda_row = ids[3 * ROWS + 7], ids[5 * ROWS + 2]
    with caplog.at_level(logging.WARNING, logger="curate"):
        res = run_pipeline(_pipe(inp, str(tmp_path / "ray"), marker_dir=markers, crash_id=crash_row,
                                 cuda_error_id=cuda_row), progress=False)
    assert os.path.exists(os.path.join(markers, "fault-crash"))      # the faults did happen
    assert os.path.exists(os.path.join(markers, "fault-cuda"))
    # the same output as a fault-free run (local runner, one process), nothing lost or doubled
    clean = run_pipeline(_pipe(inp, str(tmp_path / "clean"), runner="local", marker_dir=str(tmp_path / "m2")),
                         progress=False)
    got, want = _output(res), _output(clean)
    assert got.column("id").to_pylist() == sorted(ids) and len(set(got.column("id").to_pylist())) == len(ids)
    assert got.drop_columns(["pid", "device", "memory"]).equals(want.drop_columns(["pid", "device", "memory"]))
    assert res.stats["replica_probe"]["in"] == res.stats["replica_probe"]["out"] == FILES * ROWS
    assert not res.stats["replica_probe"]["errors"]
    # each replica sees its own device, for its whole life
    devices: dict[int, set] = collections.defaultdict(set)
    for pid, dev in zip(got.column("pid").to_pylist(), got.column("device").to_pylist()):
        devices[pid].add(dev)
    assert all(len(d) == 1 for d in devices.values()) and set().union(*devices.values()) <= {"0", "1"}
    assert len(set().union(*devices.values())) == 2
    # the engine is loaded once per actor: 2 replicas + 2 replacements (the crash, the CUDA error)
    loads = collections.Counter(f.split("-")[1] for f in os.listdir(markers) if f.startswith("load-"))
    assert all(n == 1 for n in loads.values()) and len(loads) == 4
    assert {str(p) for p in devices} <= set(loads)
    assert os.getpid() not in devices
    warned = [r.getMessage() for r in caplog.records if "redone on a new worker" in r.getMessage()]
    assert len(warned) == 2 and any("ActorDiedError" in w for w in warned) and any("CUDA error" in w for w in warned)
    assert all("step 'replica_probe'" in w for w in warned)


@pytest.mark.ray
def test_a_task_whose_replicas_keep_dying_stops_the_run_naming_step_and_cause(tmp_path, gpu_ray):
    inp, ids = _corpus(tmp_path)
    d = _pipe(inp, str(tmp_path / "out"), resources={"max_retries": 1}, marker_dir=str(tmp_path / "markers"),
              crash_id=ids[0], crash_always=True)
    with pytest.raises(PipelineError) as err:
        run_pipeline(d, progress=False)
    msg = str(err.value)
    assert "step 'replica_probe'" in msg and "f0.parquet" in msg
    assert "failed 2 time(s)" in msg and "max_retries=1" in msg and "ActorDiedError" in msg


@pytest.mark.ray
def test_tasks_go_to_whichever_replica_is_free(tmp_path, gpu_ray):
    """The replica on device 0 is slow (3 s a task): the other one takes the tasks it cannot, where
    handing tasks out in turn would give each replica half of them."""
    inp, ids = _corpus(tmp_path)
    res = run_pipeline(_pipe(inp, str(tmp_path / "out"), marker_dir=str(tmp_path / "m"), slow_device="0",
                             slow_seconds=3.0), progress=False)
    got = _output(res)
    tasks_on = collections.Counter(got.column("device").to_pylist())
    assert sum(tasks_on.values()) == FILES * ROWS and set(tasks_on) == {"0", "1"}
    assert tasks_on["0"] // ROWS <= 2 < tasks_on["1"] // ROWS      # in turn: 4 and 4


@pytest.mark.ray
def test_step_resources_are_checked_against_the_cluster_before_any_work(tmp_path, gpu_ray):
    inp, _ = _corpus(tmp_path)
    out = str(tmp_path / "out")
    cases = [({"gpus": 4}, "key 'resources.gpus'", "needs 4 GPU(s) per worker but the Ray cluster has 2"),
             ({"replicas": 3}, "key 'resources.replicas'", "3 replicas of 1 GPU(s) each do not fit"),
             ({"memory_gb": 100000}, "key 'resources.memory_gb'", "needs 100000 GB of memory per worker"),
             ({"cpus": 64, "gpus": 0}, "key 'resources.cpus'", "needs 64 CPU(s) per worker")]
    for resources, key, msg in cases:
        with pytest.raises(ConfigError) as err:
            run_pipeline(_pipe(inp, out, resources=resources, marker_dir=str(tmp_path / "m")), progress=False)
        assert f"stage 'replica_probe' (stages[0]): {key}" in str(err.value) and msg in str(err.value), str(err.value)
        assert os.listdir(out) == ["_curate"] and os.listdir(os.path.join(out, "_curate")) == ["lock"]
        assert not os.path.exists(tmp_path / "m")                      # no work was done
    # what the stage itself declares is checked too, naming where to change it
    pipe = load_pipeline(_pipe(inp, out, marker_dir=str(tmp_path / "m")))
    pipe.steps["replica_probe"].stage.resources = pipe.steps["replica_probe"].stage.resources.override(None) \
        .model_copy(update={"gpus": 3.0})
    from curate.pipeline.runner import Runner
    with pytest.raises(ConfigError, match=r"stage 'replica_probe' \(stages\[0\]\): needs 3 GPU.*set `resources:`"):
        Runner(pipe, progress=False).run()
    # a bad key is a config error when the file is loaded
    with pytest.raises(ConfigError, match=r"stage 'replica_probe' \(stages\[0\]\): key 'resources.gpu'.*unknown key"):
        load_pipeline(_pipe(inp, out, resources={"gpu": 1}, marker_dir="m"))


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_one_replica_when_asked_and_cpu_steps_run_after_gpu_steps(tmp_path, gpu_ray):
    """`replicas: 1` keeps one engine on one GPU; the replica gives its CPUs (here both of the
    cluster's) back to the CPU steps that follow, which would otherwise wait forever. A CPU step
    with `replicas: 1` runs its tasks (two row ranges here) on one worker."""
    inp, _ = _corpus(tmp_path)
    d = _pipe(inp, str(tmp_path / "out"), resources={"replicas": 1, "cpus": 2, "memory_gb": 0.25},
              marker_dir=str(tmp_path / "m"))
    d["plugins"].append("runner_stages")
    d["stages"] += [{"stage": "top_k", "options": {"k": 50}}, {"stage": "word_count", "save": True},
                    {"stage": "env_probe", "resources": {"replicas": 1}, "options": {"variable": "X", "sha256": "-"}}]
    res = run_pipeline(d, progress=False)
    first = _output(res)
    assert len(set(first.column("pid").to_pylist())) == 1 and len(os.listdir(tmp_path / "m")) == 1
    assert set(first.column("memory").to_pylist()) == {0.25 * 2**30}     # memory_gb reserved in Ray
    assert Dataset(res.outputs["word_count"]).to_table().num_rows == 50
    last = Dataset(res.outputs["env_probe"]).to_table()
    assert last.num_rows == 50 and len(set(last.column("env_pid").to_pylist())) == 1


@pytest.mark.ray
def test_variables_a_pipeline_needs_reach_ray_workers_and_nowhere_else(tmp_path, gpu_ray, monkeypatch):
    secret = "s3cr3t-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    monkeypatch.setenv("CURATE_TEST_TOKEN", secret)     # set after Ray started: its workers lack it
    inp, _ = _corpus(tmp_path)

    def pipe(out: str, runner: str, env: list[str]) -> dict:
        return {"name": "env", "output": out, "runner": runner, "workers": 2, "env": env,
                "plugins": ["replica_stages"],
                "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": inp}}},
                "stages": [{"stage": "env_probe", "options": {"variable": "CURATE_TEST_TOKEN",
                                                              "sha256": hashlib.sha256(secret.encode()).hexdigest()}}]}

    def seen(res) -> set:
        return set(Dataset(res.outputs["env_probe"]).to_table().column("env_ok").to_pylist())

    assert seen(run_pipeline(pipe(str(tmp_path / "plain"), "ray", []), progress=False)) == {False}
    d = pipe(str(tmp_path / "fwd"), "ray", ["CURATE_TEST_TOKEN"])
    d["stages"][0]["resources"] = {"memory_gb": 0.125}                  # CPU tasks reserve memory too
    res = run_pipeline(d, progress=False)
    assert seen(res) == {True}
    assert set(Dataset(res.outputs["env_probe"]).to_table().column("env_memory").to_pylist()) == {0.125 * 2**30}
    assert seen(run_pipeline(pipe(str(tmp_path / "local"), "local", []), progress=False)) == {True}
    # (GPU replicas get them for their life: the API key in test_llm_rows_of_a_crashed_replica...)
    _assert_written_nowhere(secret, str(tmp_path))


def _assert_written_nowhere(secret: str, out: str) -> None:
    """The value is in no file of the outputs, nor in Ray's logs of this session."""
    session = ray._private.worker._global_node.get_session_dir_path()
    for root in (out, session):
        for folder, _, files in os.walk(root):
            for f in files:
                try:
                    with open(os.path.join(folder, f), "rb") as fh:
                        data = fh.read()
                except OSError:
                    continue
                assert secret.encode() not in data, os.path.join(folder, f)


def test_forwarded_variables_come_from_env_engines_and_storage(monkeypatch):
    from curate.pipeline.resources import forwarded_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    d = {"name": "p", "output": "s3://bucket/out", "env": ["HF_TOKEN"],
         "engines": {"chat": {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1",
                              "api_key_env": "CHAT_KEY"}},
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": "/nonexistent/in/*.parquet"}}},
         "stages": [{"stage": "generate", "options": {"engine": "chat", "prompt_column": "text"}}]}
    names = forwarded_env(load_pipeline(d, check=False))
    assert names[:2] == ["HF_TOKEN", "CHAT_KEY"] and {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(names)
    d["output"] = "/tmp/out"
    assert not any(n.startswith("AWS_") for n in forwarded_env(load_pipeline(d, check=False)))
    with pytest.raises(ConfigError, match="key 'env.0'"):
        load_pipeline({**d, "env": ["NOT A NAME"]}, check=False)


def test_local_runner_honours_replicas_and_gpus_per_worker(tmp_path, monkeypatch):
    from curate.pipeline.local_executor import LocalExecutor
    from curate.pipeline.worker import SegmentJob

    def job(gpus, replicas=None):
        return SegmentJob(key="k", fingerprint="f", source=None, chain=(), out_dir="o", state_dir="s", side_dirs={},
                   task_ids=(), batch_size=1, rows_per_shard=1, gpus=gpus, replicas=replicas)

    ex = LocalExecutor(1)
    ex.workers = 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert [ex.slots(job(1)), ex.slots(job(1, 3)), ex.slots(job(2)), ex.slots(job(0, 2))] == [4, 3, 2, 2]
    # a step asking for more GPUs per worker than the machine has is an error before any work: exit 2
    write_corpus(str(tmp_path / "in"), files=1, rows=5)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cfg = write_yaml(str(tmp_path / "p.yaml"), _pipe(str(tmp_path / "in"), str(tmp_path / "out"), runner="local",
                                                       resources={"gpus": 2}, marker_dir=str(tmp_path / "m")))
    from helpers import curate_bin
    r = subprocess.run([curate_bin(), "run", "-q", cfg], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "stage 'replica_probe' (stages[0]): key 'resources.gpus': needs 2 GPU(s) per worker but this " \
           "machine has 1" in r.stderr
    assert not os.path.exists(tmp_path / "out" / "_curate" / "pipeline.json")


def _echo_server():
    """The OpenAI-compatible test server of tests/support/openai_server.py, with its instant echo backend."""
    import threading

    from openai_server import OpenAIServer

    srv = OpenAIServer(None)
    srv.state.backend = "echo"
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


@pytest.mark.ray
def test_llm_rows_of_a_crashed_replica_are_redone_from_the_request_cache(tmp_path, gpu_ray, monkeypatch):
    """An LLM step given a GPU by `resources:` runs on replicas; the one that dies after its answers
    came back is replaced and the task redone: no request is paid twice, no row lost or doubled.
    The engine's API key (`api_key_env`, set after Ray started) reaches the replicas."""
    monkeypatch.setenv("CURATE_TEST_LLM_KEY", "k-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8])
    inp, ids = _corpus(tmp_path)
    srv = _echo_server()
    try:
        d = {"name": "llm", "output": str(tmp_path / "out"), "runner": "ray", "workers": 2, "batch_size": 100,
             "plugins": ["replica_stages"],
             "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": inp}}},
             "stages": [{"stage": "crash_generate", "resources": {"gpus": 1},
                         "options": {"marker_dir": str(tmp_path / "m"), "crash_id": ids[2 * ROWS + 3],
                                     "max_tokens": 8, "engine": {"kind": "openai", "model": "m",
                                                                 "base_url": srv.base_url,
                                                                 "api_key_env": "CURATE_TEST_LLM_KEY"}}}]}
        res = run_pipeline(d, progress=False)
        hits, auth = srv.state.hits, set(srv.state.auth)
    finally:
        srv.shutdown()
        srv.server_close()
    assert os.path.exists(tmp_path / "m" / "fault-crash")
    got = Dataset(res.outputs["crash_generate"]).to_table().sort_by("id")
    assert got.column("id").to_pylist() == sorted(ids)                       # nothing lost or doubled
    assert got.column("completion").to_pylist() == [t[::-1] for t in got.column("text").to_pylist()]
    assert hits == len(ids)                                                  # nothing paid twice
    counters = res.stats["crash_generate"]["counters"]
    assert counters["llm/cached"] == ROWS and counters["llm/requests"] == len(ids)   # the redone task's answers
    assert auth == {f"Bearer {os.environ['CURATE_TEST_LLM_KEY']}"}
    _assert_written_nowhere(os.environ["CURATE_TEST_LLM_KEY"], str(tmp_path))
