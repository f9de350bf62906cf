"""Podman helpers for the container tests. The image build itself (a debootstrap Debian base, the
host's package-index settings as build arguments, the containers.conf Podman needs here) is
docker/build.py's offline route, the one ``make image OFFLINE=1`` uses; this module adds what only
the tests need: a ``podman`` runner, the reasons the tests cannot run, and a Docker-compatible API
socket for Airflow's DockerOperator.

Everything slow is cached between runs: the debootstrap root as a tar under
``~/.cache/curate/containers`` (or ``$CURATE_CONTAINER_CACHE``), the imported base image and the
built image's layers in Podman's storage.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_spec = importlib.util.spec_from_file_location("curate_docker_build", os.path.join(ROOT, "docker", "build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

CACHE = build.CACHE
BASE_TAG = build.BASE_TAG
CPU_TAG = "localhost/curate:cpu-test"


def podman_env() -> dict[str, str]:
    return build.tool_env("podman")


def podman(*args: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}... exit {r.returncode}:\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-3000:]}")
    return r


def unavailable() -> str | None:
    """Why the container tests cannot run here, or None."""
    if not shutil.which("podman"):
        return "podman is not installed (apt-get install -y podman runc debootstrap)"
    problem = build.tool_works("podman")
    if problem:
        return f"podman does not work here: {problem}"
    if podman("image", "exists", BASE_TAG, check=False).returncode != 0 and not os.path.exists(build.root_tar()) \
            and not shutil.which("debootstrap"):
        return "no cached base image and debootstrap is not installed (apt-get install -y debootstrap)"
    return None


def base_image() -> str:
    """The debootstrap Debian base of docker/build.py --offline (made once, then cached)."""
    return build.base_image("podman")


def build_cpu_image(base: str, tag: str = CPU_TAG) -> tuple[str, float]:
    """Builds docker/Dockerfile on ``base`` as ``make image OFFLINE=1`` does; (tag, seconds)."""
    tags, seconds = build.build("cpu", tool="podman", base=base, offline=True, tag_list=[tag],
                                log=lambda line: None)
    return tags[0], seconds


class ApiSocket:
    """``podman system service`` on a private unix socket: a Docker-compatible API for docker-py."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, "podman.sock")
        self.url = f"unix://{self.path}"
        self.proc = subprocess.Popen(["podman", "system", "service", "--time=0", self.url], env=podman_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise AssertionError(f"podman system service did not start: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
