"""The CPU image, built with Podman on a Debian root made by debootstrap (``make image OFFLINE=1``'s
route: docker/build.py), runs the quickstart with a mounted output folder, then runs it again:
every step is skipped (resume); it runs under ``--read-only``, starts from its compiled numba
cache, holds Ray and carries the OCI labels.

Takes minutes (the first build about 6 min, a cached rebuild seconds): only with
CURATE_CONTAINER_TESTS=1 (`make container-test`)."""

import json
import os
import subprocess
import time

import pytest

from podman_util import podman

pytestmark = [pytest.mark.container, pytest.mark.slow]

ORDER = ["pages", "extract_html", "language_id", "exact_dedup", "minhash_dedup", "heuristic_filter", "pii",
         "select", "generate"]


def _run_quickstart(image, data):
    r = podman("run", "--rm", "-v", f"{data}:/data", "-e", "CURATE_OUTPUT=/data/qs", image, "run", "-q",
               timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(data, "qs", "stats.json")) as f:
        stats = json.load(f)["steps"]
    with open(os.path.join(data, "qs", "manifest.json")) as f:
        manifest = json.load(f)["steps"]
    return r, stats, manifest


def test_image_metadata(cpu_image):
    image, seconds = cpu_image
    print(f"CPU image built in {seconds:.0f}s")
    cfg = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert cfg["User"] == "10001" and cfg["Entrypoint"] == ["curate"] and cfg["Cmd"] == ["run"]
    assert not any(e.split("=", 1)[0].startswith("PIP_") and e.split("=", 1)[0] != "PIP_NO_CACHE_DIR"
                   and e.split("=", 1)[0] != "PIP_DISABLE_PIP_VERSION_CHECK" for e in cfg["Env"]), cfg["Env"]
    # CPU torch, no CUDA wheels; curate runs as the non-root user
    probe = ("import importlib.metadata as m, os, torch; "
             "print(torch.__version__, torch.version.cuda, os.getuid(), "
             "sorted(d.name for d in m.distributions() if d.name.lower().startswith('nvidia')))")
    out = podman("run", "--rm", "--entrypoint", "python", image, "-c", probe).stdout.split(maxsplit=3)
    assert out[0].endswith("+cpu") and out[1] == "None" and out[2] == "10001" and out[3].strip() == "[]", out
    assert "valid pipeline" in podman("run", "--rm", image, "validate",
                                      "/opt/venv/lib/python3.11/site-packages/curate/configs/quickstart.yaml").stdout
    # OCI labels from docker/build.py: pyproject's version and this checkout's commit
    labels = cfg["Labels"]
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.revision"].split("-")[0] == rev
    assert labels["org.opencontainers.image.created"] != "unknown"
    # a Ray node: ray and its CLI are in the image
    assert podman("run", "--rm", "--entrypoint", "ray", image, "--version").stdout.strip().startswith("ray")


def test_quickstart_in_image_twice(cpu_image, tmp_path):
    image, _ = cpu_image
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)  # the image's user (uid 10001) writes the mounted folder
    r, stats, manifest = _run_quickstart(image, str(data))
    assert list(stats) == ORDER and "minhash_dedup" in r.stdout
    assert all(stats[s]["status"] == "done" for s in ORDER)
    assert stats["pages"]["out"] >= 150
    for a, b in zip(ORDER, ORDER[1:]):
        assert stats[b]["in"] == stats[a]["out"], (a, b)
    assert stats["exact_dedup"]["dropped"].get("duplicate_text", 0) >= 2
    assert stats["generate"]["out"] == 3 and stats["generate"]["counters"]["llm/requests"] == 3
    assert os.path.exists(data / "qs" / "generate")

    # the same command again: every step skipped, the same shards
    _, again, manifest2 = _run_quickstart(image, str(data))
    assert {s: again[s]["status"] for s in again} == {s: "skipped" for s in ORDER}
    assert {s: again[s]["out"] for s in again} == {s: stats[s]["out"] for s in stats}
    assert manifest2 == manifest


def test_numba_cache_saves_the_cold_start(cpu_image):
    """The kernels compiled at build time load from the image's cache (also under --read-only);
    without it every start compiles them."""
    image, _ = cpu_image
    timings = {}
    for name, extra in (("shipped", []), ("shipped_read_only", ["--read-only"]),
                        ("cold", ["-e", "NUMBA_CACHE_DIR=/tmp/empty-numba-cache"])):
        t0 = time.time()
        r = podman("run", "--rm", *extra, "--entrypoint", "python", image, "-m", "curate.numba_cache", "warm",
                   timeout=900)
        timings[name] = time.time() - t0
        assert "kernels cached" in r.stdout, r.stdout + r.stderr
    print("numba warm-up in the image (s):", {k: round(v, 1) for k, v in timings.items()})
    assert timings["shipped"] < timings["cold"] and timings["shipped_read_only"] < timings["cold"]


def test_quickstart_under_read_only_root(cpu_image, tmp_path):
    image, _ = cpu_image
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    r = podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", "-v", f"{data}:/data", "-e", "CURATE_OUTPUT=/data/qs",
               image, "run", "-q", timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stats = json.load(open(data / "qs" / "stats.json"))["steps"]
    assert list(stats) == ORDER and all(s["status"] == "done" for s in stats.values())
