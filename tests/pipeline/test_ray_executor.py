"""runner: ray gives exactly the local runner's output (same tasks, same shards, same stats)."""

import os

import pytest

from curate.run import run_pipeline
from helpers import pipeline_dict, read_step, write_corpus

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'curate[ray]')")


@pytest.mark.slow
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


@pytest.mark.slow
def test_gpu_stage_without_gpus_is_a_clear_error(tmp_path):
    """Checked before any work, as a config error naming the step (GPU replicas: test_ray_replicas.py)."""
    from curate.pipeline.config import ConfigError

    write_corpus(str(tmp_path / "in"), files=1, rows=5)
    d = {"name": "gpu", "output": str(tmp_path / "out"), "runner": "ray", "workers": 1,
         "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "gpu_probe", "options": {"marker_dir": str(tmp_path / "m")}}]}
    with pytest.raises(ConfigError, match=r"stage 'gpu_probe' \(stages\[0\]\): needs 1 GPU\(s\) per worker but "
                                          r"the Ray cluster has 0 \(the stage's own need; set `resources:`"):
        run_pipeline(d, progress=False)
    assert not os.path.exists(tmp_path / "m") and not os.path.exists(tmp_path / "out" / "gpu_probe")


@pytest.mark.slow
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
