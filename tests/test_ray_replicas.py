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
from curate.pipeline.runner import PipelineError, run_pipeline
from curate.stages.read_parquet import ReadParquet
from helpers import write_corpus, write_yaml

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
    assert got.drop_columns(["pid", "device"]).equals(want.drop_columns(["pid", "device"]))
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
