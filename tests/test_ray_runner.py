"""runner: ray gives exactly the local runner's output (same tasks, same shards, same stats)."""

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
    assert all(s["status"] == "done (resumed)" for s in c.stats.values())
