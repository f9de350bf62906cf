"""An s3:// output and input through the real S3 protocol (a moto server on 127.0.0.1), with a
process pool: workers write shards and completion records to the object store, resume works."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.run import run_pipeline
from helpers import pipeline_dict, write_corpus

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed")


@pytest.fixture
def s3(monkeypatch):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    fs.mkdir("curate-test")
    yield fs
    server.stop()


@pytest.mark.slow
def test_s3_input_and_output_with_workers(tmp_path, s3):
    for p in write_corpus(str(tmp_path / "in"), files=3, rows=200):
        s3.put(p, f"curate-test/in/{os.path.basename(p)}")
    d = pipeline_dict("s3://curate-test/in", "s3://curate-test/out", workers=2)
    res = run_pipeline(d, progress=False)
    assert res.stats["docs"]["out"] == 600 and res.stats["top"]["out"] == 50
    shards = s3.glob("curate-test/out/min_words/*.parquet")
    assert shards and not s3.glob("curate-test/out/**/*.tmp-*")
    kept = pa.concat_tables([pq.read_table(s3.open(f)) for f in sorted(shards)])
    assert kept.num_rows == res.stats["min_words"]["out"]
    manifest = json.loads(s3.cat("curate-test/out/manifest.json"))
    assert sum(sh["rows"] for sh in manifest["steps"]["min_words"]["shards"]) == kept.num_rows
    again = run_pipeline(d, progress=False)
    assert all(s["status"] == "skipped" for s in again.stats.values())
