"""Podman helpers for the container tests: a containers.conf that works on these machines, a Debian
base image made with debootstrap (no image registry is reachable), the host's package-index settings
as build arguments, and a Docker-compatible API socket for Airflow's DockerOperator.

Everything slow is cached between runs: the debootstrap root as a tar under
``~/.cache/curate/containers`` (or ``$CURATE_CONTAINER_CACHE``), the imported base image and the
built image's layers in Podman's storage.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CACHE = os.environ.get("CURATE_CONTAINER_CACHE") or os.path.expanduser("~/.cache/curate/containers")
BASE_TAG = "localhost/curate-test-base:bookworm"
CPU_TAG = "localhost/curate:cpu-test"
SUITE = "bookworm"  # python3 is 3.11 there, like python:3.11-slim
PACKAGES = "python3,python3-venv,ca-certificates"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# runc, cgroupfs and no default ulimits: what Podman needs on these (sandboxed) machines
CONTAINERS_CONF = """[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("CONTAINERS_CONF"):
        os.makedirs(CACHE, exist_ok=True)
        path = os.path.join(CACHE, "containers.conf")
        if not os.path.exists(path) or open(path).read() != CONTAINERS_CONF:
            with open(path, "w") as f:
                f.write(CONTAINERS_CONF)
        env["CONTAINERS_CONF"] = path
    return env


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
    r = subprocess.run(["podman", "info"], env=podman_env(), capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return f"podman does not work here: {r.stderr.strip()[-500:]}"
    if podman("image", "exists", BASE_TAG, check=False).returncode != 0 and not os.path.exists(_root_tar()) \
            and not shutil.which("debootstrap"):
        return "no cached base image and debootstrap is not installed (apt-get install -y debootstrap)"
    return None


def _root_tar() -> str:
    return os.path.join(CACHE, f"debian-{SUITE}-{PACKAGES.replace(',', '+')}.tar")


def base_image(mirror: str = "http://deb.debian.org/debian") -> str:
    """A Debian root with python3 + venv as a Podman image (debootstrap once, then cached)."""
    if podman("image", "exists", BASE_TAG, check=False).returncode == 0:
        return BASE_TAG
    tar = _root_tar()
    if not os.path.exists(tar):
        os.makedirs(CACHE, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            rootfs = os.path.join(tmp, "root")
            r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, rootfs, mirror],
                               capture_output=True, text=True, timeout=1800)
            assert r.returncode == 0, f"debootstrap failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            subprocess.run(["tar", "-C", rootfs, "-cf", tar + ".part", "."], check=True, timeout=600)
            os.replace(tar + ".part", tar)
    # an imported root has no image config: give it the PATH every Debian image has
    podman("import", "--change", f"ENV PATH={DEFAULT_PATH}", tar, BASE_TAG)
    return BASE_TAG


def host_pip_settings() -> tuple[dict[str, str], list[str]]:
    """The host pip's index settings as build arguments (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
    PIP_FIND_LINKS, PIP_CERT) and the read-only volumes that make local paths in them visible in the
    build, so pip inside the build reaches the same packages as on the host."""
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    found: dict[str, str] = {}
    for line in r.stdout.splitlines():
        key, sep, value = line.partition("=")
        name = key.rpartition(".")[2]
        if sep and name in ("index-url", "extra-index-url", "find-links", "cert"):
            found[name] = value.strip().strip("'\"")  # ":env:" lines come after "global." ones and win
    args: dict[str, str] = {}
    volumes: set[str] = set()
    for name in ("index-url", "extra-index-url", "find-links"):
        if name not in found:
            continue
        args["PIP_" + name.upper().replace("-", "_")] = found[name]
        for item in found[name].split():
            path = item[len("file://"):] if item.startswith("file://") else item
            if os.path.isabs(path) and os.path.exists(path):
                # a local "simple" index links to files beside it (../files/...): mount its parent
                volumes.add(os.path.dirname(path.rstrip("/")) if os.path.basename(path.rstrip("/")) == "simple"
                            else path)
    mounts = [f"{v}:{v}:ro" for v in sorted(volumes)]
    if found.get("cert") and os.path.exists(found["cert"]):
        args["PIP_CERT"] = "/run/host-ca-bundle.pem"  # a mounted file: never part of a layer
        mounts.append(f"{found['cert']}:/run/host-ca-bundle.pem:ro")
    return args, mounts


def local_cpu_torch(find_links: str) -> str | None:
    """A torch CPU wheel in the host's find-links folders, if any."""
    for d in find_links.split():
        d = d[len("file://"):] if d.startswith("file://") else d
        hits = sorted(glob.glob(os.path.join(d, "torch-*+cpu-*.whl")))
        if hits:
            return hits[-1]
    return None


def build_cpu_image(base: str, tag: str = CPU_TAG) -> tuple[str, float]:
    """Builds docker/Dockerfile on ``base`` with the host's index settings; (tag, seconds)."""
    args, mounts = host_pip_settings()
    if local_cpu_torch(args.get("PIP_FIND_LINKS", "")):
        args["TORCH_INDEX_URL"] = ""  # the CPU wheel on disk, through find-links
    cmd = ["build", "-f", "docker/Dockerfile", "-t", tag, "--build-arg", f"BASE_IMAGE={base}"]
    for k, v in args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    for m in mounts:
        cmd += ["-v", m]
    t0 = time.time()
    podman(*cmd, ".", timeout=3600, cwd=ROOT)
    return tag, time.time() - t0


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
