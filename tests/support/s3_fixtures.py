"""``s3``: a moto S3 server on 127.0.0.1 (the real S3 protocol through s3fs) with a fresh bucket
(``s3.bucket``) and the AWS_* variables that point curate's s3fs at it."""

from __future__ import annotations

import uuid

import pytest


def start_moto():
    """A started moto S3 server on 127.0.0.1 and the AWS_* variables that point s3fs at it."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    return server, env


@pytest.fixture
def s3(monkeypatch):
    import s3fs

    server, env = start_moto()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()   # a port used again must not find an old listing cache
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    fs.bucket = f"curate-test-{uuid.uuid4().hex[:8]}"   # moto keeps buckets across servers of one process
    fs.mkdir(fs.bucket)
    yield fs
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
