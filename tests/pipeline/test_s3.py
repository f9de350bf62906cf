"""An s3:// output and input through the real S3 protocol (a moto server on 127.0.0.1), with a
process pool: workers write shards and completion records to the object store, resume works."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.run import run_pipeline
from helpers import pipeline_dict, write_corpus

s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed")

@pytest.mark.slow
def test_s3_input_and_output_with_workers(tmp_path, s3):
    for p in write_corpus(str(tmp_path / "in"), files=3, rows=200):
        s3.put(p, f"{s3.bucket}/in/{os.path.basename(p)}")
    d = pipeline_dict(f"s3://{s3.bucket}/in", f"s3://{s3.bucket}/out", workers=2)
    res = run_pipeline(d, progress=False)
    assert res.stats["docs"]["out"] == 600 and res.stats["top"]["out"] == 50
    shards = s3.glob(f"{s3.bucket}/out/min_words/*.parquet")
    assert shards and not s3.glob(f"{s3.bucket}/out/**/*.tmp-*")
    kept = pa.concat_tables([pq.read_table(s3.open(f)) for f in sorted(shards)])
    assert kept.num_rows == res.stats["min_words"]["out"]
    manifest = json.loads(s3.cat(f"{s3.bucket}/out/manifest.json"))
    assert sum(sh["rows"] for sh in manifest["steps"]["min_words"]["shards"]) == kept.num_rows
    again = run_pipeline(d, progress=False)
    assert all(s["status"] == "skipped" for s in again.stats.values())


# --------------------------------------------------------------------- the output write check (issue 21)


def test_object_store_output_is_probed_and_left_clean(s3):
    from curate.pipeline.output_check import output_problem

    assert output_problem(f"s3://{s3.bucket}/corpus") is None
    assert s3.find(f"{s3.bucket}/corpus") == []          # the probe object was deleted
    problem = output_problem("s3://no-such-bucket-curate/corpus")
    assert problem.startswith("output s3://no-such-bucket-curate/corpus: cannot write no-such-bucket-curate/corpus/_curate/")
    assert "no such bucket" in problem


def test_object_store_output_without_credentials(s3, monkeypatch, tmp_path):
    from curate.pipeline.output_check import output_problem

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        problem = output_problem(f"s3://{s3.bucket}/corpus")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert problem and "no usable credentials" in problem and "AWS_ACCESS_KEY_ID" in problem, problem


def test_curate_run_exits_2_on_an_unwritable_object_store_output(s3, tmp_path):
    import yaml
    from click.testing import CliRunner

    from curate.cli import main

    write_corpus(str(tmp_path / "in"), files=1, rows=20)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pipeline_dict(str(tmp_path / "in"), "s3://no-such-bucket-curate/out", workers=1)))
    r = CliRunner().invoke(main, ["run", str(path), "-q"])
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "s3://no-such-bucket-curate/out" in r.output and "no such bucket" in r.output
    assert not s3.exists("no-such-bucket-curate")
