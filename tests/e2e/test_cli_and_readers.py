"""CLI commands (stages, inspect, run) and the built-in readers (parquet, jsonl, pydoc)."""

import gzip
import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.run import run_pipeline
from curate.stages.sources.read_jsonl import ReadJsonl
from curate.stages.sources.read_pydoc import ReadPydoc
from helpers import pipeline_dict, write_corpus


def test_stages_lists_and_describes(curate_cmd):
    r = subprocess.run(curate_cmd + ["stages"], capture_output=True, text=True, check=True)
    for name in ("read_parquet", "read_jsonl", "read_pydoc"):
        assert name in r.stdout
    r = subprocess.run(curate_cmd + ["stages", "read_jsonl"], capture_output=True, text=True, check=True)
    assert "text_key" in r.stdout and "source stage" in r.stdout
    r = subprocess.run(curate_cmd + ["stages", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown stage 'nope'" in r.stderr


def test_inspect_output_and_step(tmp_path, curate_cmd):
    write_corpus(str(tmp_path / "in"), files=2, rows=50)
    out = str(tmp_path / "out")
    run_pipeline(pipeline_dict(str(tmp_path / "in"), out), progress=False)
    r = subprocess.run(curate_cmd + ["inspect", out], capture_output=True, text=True, check=True)
    assert "min_words/" in r.stdout and "top/" in r.stdout
    r = subprocess.run(curate_cmd + ["inspect", os.path.join(out, "top"), "-n", "2"],
                       capture_output=True, text=True, check=True)
    assert "50 rows" in r.stdout and "n_words: int64" in r.stdout and "sample:" in r.stdout
    assert len([l for l in r.stdout.splitlines() if l.startswith('  {"id"')]) == 2


def test_run_cli_prints_funnel_and_exit_1_on_failure(tmp_path, curate_cmd):
    write_corpus(str(tmp_path / "in"), files=1, rows=30)
    d = pipeline_dict(str(tmp_path / "in"), str(tmp_path / "out"), workers=1)
    import yaml
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(d))
    r = subprocess.run(curate_cmd + ["run", "-q", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "step" in r.stdout and "min_words" in r.stdout and "too_short" in r.stdout
    d["stages"] = [{"stage": "explode", "options": {"bad_word": "a"}}]  # every doc fails
    p.write_text(yaml.safe_dump({**d, "output": str(tmp_path / "out2")}))
    r = subprocess.run(curate_cmd + ["run", "-q", str(p)], capture_output=True, text=True)
    assert r.returncode == 1 and "max_error_fraction" in r.stderr


def test_read_jsonl_counts_and_skips_bad_lines(tmp_path):
    lines = [json.dumps({"text": "a good document", "id": "d1", "lang": "en"}).encode(),
             b"{not json",
             json.dumps([1, 2]).encode(),
             json.dumps({"body": "no text key"}).encode(),
             b'{"text": "bad \xff\xfe bytes"}',
             b"",
             json.dumps({"text": "second good one", "url": "http://x"}).encode()]
    p = tmp_path / "docs.jsonl.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    st = ReadJsonl(paths=str(p))
    t = st()
    assert t.column("text").to_pylist() == ["a good document", "second good one"]
    assert t.column("id").to_pylist()[0] == "d1"
    assert json.loads(t.column("metadata")[0].as_py()) == {"lang": "en"}
    assert json.loads(t.column("metadata")[1].as_py()) == {"url": "http://x"}
    c = st.counters.to_dict()
    assert c == {"errors/bad_json": 1, "errors/not_an_object": 1, "errors/no_text": 1, "errors/not_utf8": 1}
    assert ReadJsonl(paths=str(tmp_path / "missing.jsonl")).check()[0][0] == "paths"


def test_read_parquet_rejects_missing_text_column(tmp_path):
    from curate.pipeline.stage import StageError
    from curate.stages.sources.read_parquet import ReadParquet

    pq.write_table(pa.table({"body": ["x"]}), str(tmp_path / "a.parquet"))
    with pytest.raises(StageError, match="no column 'text'"):
        ReadParquet(paths=str(tmp_path))()
    t = ReadParquet(paths=str(tmp_path), text_column="body")()
    assert t.column("text").to_pylist() == ["x"] and t.column("id")[0].as_py()


def test_read_pydoc_renders_real_pages():
    st = ReadPydoc(modules=["json", "os.path", "posixpath", "no_such_module_xyz"])
    t = st()
    assert t.num_rows == 3
    htmls = t.column("html").to_pylist()
    assert all(h.lstrip().lower().startswith("<!doctype html") for h in htmls)
    assert "JSON" in htmls[0]
    assert st.counters.to_dict() == {"errors/render_failed": 1}
