"""The README's Ray cluster recipe with token authentication (issue 21): a head node started with
``ray start --head --block`` under ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (as the image's
head container does), then ``curate run --runner ray`` with ``RAY_ADDRESS``: the same token runs
the pipeline, another token is refused with Ray's authentication error. Only processes started
here are stopped (the head's process group)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import pipeline_dict, write_corpus, write_yaml

pytest.importorskip("ray", reason="Ray is not installed (pip install 'curate[ray]')")
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def token_head(tmp_path):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    token = "a" * 32 + "b" * 32
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")   # short: Ray's unix socket paths are limited to 107 bytes
    head = subprocess.Popen([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", temp, "--block"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited: {head.stdout.read()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        pytest.fail("the Ray head did not open its port")
    try:
        yield address, token, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


def test_curate_on_a_token_authenticated_cluster(tmp_path, token_head):
    address, token, env = token_head
    write_corpus(str(tmp_path / "in"), files=2, rows=100)
    p = write_yaml(str(tmp_path / "p.yaml"), pipeline_dict(str(tmp_path / "in"), str(tmp_path / "out"),
                                                           runner="ray"))
    run_env = {**env, "RAY_ADDRESS": address}
    r = subprocess.run([sys.executable, "-m", "curate.cli", "run", p, "-q"], env=run_env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    stats = json.load(open(tmp_path / "out" / "stats.json"))["steps"]
    assert stats["docs"]["out"] == 200 and all(s["status"] == "done" for s in stats.values())

    # another token: refused by the cluster, nothing written
    bad = {**run_env, "RAY_AUTH_TOKEN": "c" * 64}
    r = subprocess.run([sys.executable, "-m", "curate.cli", "run", p, "--output", str(tmp_path / "out2"), "-q"],
                       env=bad, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    text = (r.stdout + r.stderr).lower()
    assert "token" in text and ("auth" in text or "unauthenticated" in text), text[-3000:]
    assert not (tmp_path / "out2" / "stats.json").exists()
