"""runner: ray gives exactly the local runner's output (same tasks, same shards, same stats)."""

import os

import pytest

from curate.pipeline.runner import run_pipeline
from helpers import pipeline_dict, read_step, write_corpus

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'curate[ray]')")


@pytest.mark.ray
def test_ray_runner_matches_local(tmp_path):
    write_corpus(str(tmp_path / "in"), files=3, rows=200)
    local, onray = str(tmp_path / "local"), str(tmp_path / "ray")
    a = run_pipeline(pipeline_dict(str(tmp_path / "in"), local), progress=False)
    b = run_pipeline(pipeline_dict(str(tmp_path / "in"), onray, runner="ray"), progress=False)
    for step in ("min_words", "top", "counts2"):
        x, y = read_step(local, step), read_step(onray, step)
        assert list(x) == list(y) and all(x[k].equals(y[k]) for k in x)
    for step in a.stats:
        assert {k: a.stats[step][k] for k in ("in", "out", "dropped")} == \
               {k: b.stats[step][k] for k in ("in", "out", "dropped")}
    # resume under ray: everything is skipped
    c = run_pipeline(pipeline_dict(str(tmp_path / "in"), onray, runner="ray"), progress=False)
    assert all(s["status"] == "skipped" for s in c.stats.values())


@pytest.mark.ray
def test_gpu_stages_run_on_actors_that_own_their_gpus(tmp_path):
    import pyarrow as pa

    write_corpus(str(tmp_path / "in"), files=6, rows=40)
    markers = str(tmp_path / "markers")
    d = {"name": "gpu", "output": str(tmp_path / "out"), "runner": "ray", "workers": 2, "batch_size": 10,
         "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "gpu_probe", "options": {"marker_dir": markers}}]}
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)  # logical GPUs
    try:
        run_pipeline(d, progress=False)
    finally:
        ray.shutdown()
    t = pa.concat_tables(read_step(str(tmp_path / "out"), "gpu_probe").values())
    assert t.num_rows == 240
    by_pid = {}
    for pid, gpu in zip(t.column("pid").to_pylist(), t.column("gpu").to_pylist()):
        by_pid.setdefault(pid, set()).add(gpu)
    assert len(by_pid) == 2                                   # two GPUs -> two actors
    assert all(len(g) == 1 and "" not in g for g in by_pid.values())   # each keeps its own GPU
    assert len({next(iter(g)) for g in by_pid.values()}) == 2
    setups = sorted(os.listdir(markers))
    assert setups == sorted(f"setup-{p}" for p in by_pid)   # set up once per actor


def test_gpu_stage_without_gpus_is_a_clear_error(tmp_path):
    from curate.pipeline.runner import PipelineError

    write_corpus(str(tmp_path / "in"), files=1, rows=5)
    d = {"name": "gpu", "output": str(tmp_path / "out"), "runner": "ray", "workers": 1,
         "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "gpu_probe", "options": {"marker_dir": str(tmp_path / "m")}}]}
    with pytest.raises(PipelineError, match="step 'gpu_probe'.*needs 1 GPU"):
        run_pipeline(d, progress=False)


@pytest.mark.ray
def test_plugin_next_to_the_pipeline_file_runs_on_ray_workers(tmp_path):
    """Ray workers do not inherit the driver's sys.path: the job names the plugin folders."""
    import textwrap

    import pyarrow as pa

    write_corpus(str(tmp_path / "in"), files=2, rows=30)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "ray_side_plugin.py").write_text(textwrap.dedent('''
        import os
        import pyarrow as pa
        from curate.pipeline.stage import MapStage, register

        @register
        class WhereAmI(MapStage):
            """Adds the worker's pid."""
            name = "where_am_i"
            def process(self, table):
                return table.append_column("pid", pa.array([os.getpid()] * table.num_rows, pa.int64()))
    '''))
    import yaml
    cfg = {"name": "p", "output": str(tmp_path / "out"), "runner": "ray", "workers": 2,
           "plugins": ["ray_side_plugin"],
           "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
           "stages": [{"stage": "where_am_i"}]}
    (proj / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    res = run_pipeline(str(proj / "pipeline.yaml"), progress=False)
    t = pa.concat_tables(read_step(str(tmp_path / "out"), "where_am_i").values())
    assert t.num_rows == 60 and os.getpid() not in set(t.column("pid").to_pylist())
    assert res.stats["where_am_i"]["out"] == 60
