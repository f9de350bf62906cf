#!/usr/bin/env python3
"""Builds curate's images with Docker or Podman (``make image``, ``make image-gpu``).

    python docker/build.py                    # CPU image: curate:cpu, curate:<version>-cpu, curate:<version>-<rev>-cpu
    python docker/build.py --gpu              # GPU image (docker/Dockerfile.gpu): curate:gpu, ...
    python docker/build.py --offline          # no registry, no PyTorch index: a debootstrap Debian base
                                              # and the host pip's index / find-links (local wheels)
    python docker/build.py --dry-run          # print the build command only

The tool is ``--tool`` or ``$CURATE_CONTAINER_TOOL``, else the first of ``docker``, ``podman`` whose
``info`` works. Every image gets the OCI labels ``org.opencontainers.image.version`` (pyproject's
version), ``.revision`` (the git commit, ``-dirty`` when the tree has changes), ``.source`` and
``.created`` (``$SOURCE_DATE_EPOCH``, else the commit's time: a rebuild of one commit gets the same
labels), set with ``--label`` and as build arguments (CURATE_VERSION, CURATE_REVISION,
CURATE_CREATED, CURATE_SOURCE) for the Dockerfiles' LABEL step (a plain ``docker build`` then says
``unknown``).

The offline route (``--offline``), what the container tests use:
- the base image is a Debian root made by ``debootstrap`` (bookworm: Python 3.11) from a Debian
  mirror (``--mirror``; an apt proxy or a local mirror works) and imported with ``podman import`` /
  ``docker import``; the root is cached as a tar in ``~/.cache/curate/containers``
  (``$CURATE_CONTAINER_CACHE``);
- pip in the build uses this machine's pip settings (``pip config list``: index-url,
  extra-index-url, find-links, cert) as build arguments, with local folders mounted read-only
  (Podman ``-v``; with Docker, put the wheels in a local index server instead), and a local
  ``torch-*+cpu`` wheel in find-links replaces the PyTorch CPU index.
Podman on machines without systemd (containers in containers) needs runc, cgroupfs and no default
ulimits: a ``containers.conf`` with those is written and passed as ``CONTAINERS_CONF`` unless one
is set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("CURATE_CONTAINER_CACHE") or os.path.expanduser("~/.cache/curate/containers")
SOURCE_URL = "https://github.com/curate-project/curate"
BASE_TAG = "localhost/curate-base:bookworm"
SUITE = "bookworm"  # python3 is 3.11 there, like python:3.11-slim
PACKAGES = "python3,python3-venv,ca-certificates"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# runc, cgroupfs and no default ulimits: what Podman needs in sandboxes without systemd
CONTAINERS_CONF = """[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""
VARIANTS = {"cpu": "docker/Dockerfile", "gpu": "docker/Dockerfile.gpu"}


# ------------------------------------------------------------------------------ the tool


def tool_env(tool: str) -> dict[str, str]:
    env = dict(os.environ)
    if tool == "podman" and not env.get("CONTAINERS_CONF"):
        os.makedirs(CACHE, exist_ok=True)
        path = os.path.join(CACHE, "containers.conf")
        if not os.path.exists(path) or open(path).read() != CONTAINERS_CONF:
            with open(path, "w") as f:
                f.write(CONTAINERS_CONF)
        env["CONTAINERS_CONF"] = path
    return env


def run_tool(tool: str, *args: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([tool, *args], env=tool_env(tool), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args[:3])}... exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def tool_works(tool: str) -> str | None:
    """None when ``tool info`` works, else why not."""
    if not shutil.which(tool):
        return f"{tool} is not installed"
    try:
        r = run_tool(tool, "info", timeout=120, check=False)
    except subprocess.TimeoutExpired:
        return f"{tool} info timed out"
    return None if r.returncode == 0 else f"{tool} info failed: {(r.stderr or r.stdout).strip()[-300:]}"


def detect_tool(wanted: str | None = None) -> str:
    """``wanted`` or $CURATE_CONTAINER_TOOL when set, else docker, else podman (whichever works)."""
    wanted = wanted or os.environ.get("CURATE_CONTAINER_TOOL") or None
    candidates = [wanted] if wanted else ["docker", "podman"]
    why = []
    for tool in candidates:
        problem = tool_works(tool)
        if problem is None:
            return tool
        why.append(problem)
    raise SystemExit("no container tool works here: " + "; ".join(why)
                     + " (install Docker, or Podman: apt-get install -y podman runc)")


# ------------------------------------------------------------------------------ metadata


def version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["version"]


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def revision() -> str:
    """The commit, with ``-dirty`` when tracked files have changes; ``unknown`` outside git."""
    rev = _git("rev-parse", "HEAD")
    if not rev:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return rev + ("-dirty" if dirty else "")


def created() -> str:
    """RFC 3339 time: $SOURCE_DATE_EPOCH, else the commit's time, else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH") or _git("log", "-1", "--format=%ct")
    when = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch else dt.datetime.now(dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def labels(variant: str) -> dict[str, str]:
    return {"org.opencontainers.image.title": f"curate ({variant})",
            "org.opencontainers.image.version": version(),
            "org.opencontainers.image.revision": revision(),
            "org.opencontainers.image.source": os.environ.get("CURATE_SOURCE_URL", SOURCE_URL),
            "org.opencontainers.image.created": created(),
            "org.opencontainers.image.licenses": "Apache-2.0"}


def tags(variant: str, name: str = "curate") -> list[str]:
    """``name:<variant>`` (moving), ``name:<version>-<variant>`` and ``name:<version>-<rev12>-<variant>``."""
    rev = revision()
    short = rev[:12] + ("-dirty" if rev.endswith("-dirty") else "") if rev != "unknown" else "unknown"
    return [f"{name}:{variant}", f"{name}:{version()}-{variant}", f"{name}:{version()}-{short}-{variant}"]


# ------------------------------------------------------------------------------ offline route


def root_tar(suite: str = SUITE) -> str:
    return os.path.join(CACHE, f"debian-{suite}-{PACKAGES.replace(',', '+')}.tar")


def base_image(tool: str, mirror: str = DEBIAN_MIRROR, tag: str = BASE_TAG) -> str:
    """A Debian root with python3 + venv as an image (debootstrap once, then cached)."""
    if run_tool(tool, "image", "inspect", tag, check=False).returncode == 0:
        return tag
    tar = root_tar()
    if not os.path.exists(tar):
        if not shutil.which("debootstrap"):
            raise SystemExit("--offline needs debootstrap (apt-get install -y debootstrap) or a cached root "
                             f"at {tar}")
        os.makedirs(CACHE, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            rootfs = os.path.join(tmp, "root")
            r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, rootfs, mirror],
                               capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                raise RuntimeError(f"debootstrap failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            subprocess.run(["tar", "-C", rootfs, "-cf", tar + ".part", "."], check=True, timeout=600)
            os.replace(tar + ".part", tar)
    # an imported root has no image config: give it the PATH every Debian image has
    run_tool(tool, "import", "--change", f"ENV PATH={DEFAULT_PATH}", tar, tag, timeout=1200)
    return tag


def host_pip_settings() -> tuple[dict[str, str], list[str]]:
    """This machine's pip index settings as build arguments (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
    PIP_FIND_LINKS, PIP_CERT) and the read-only volumes that make local paths in them visible in the
    build, so that pip in the build reaches the same packages as here."""
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    found: dict[str, str] = {}
    for line in r.stdout.splitlines():
        key, sep, value = line.partition("=")
        name = key.rpartition(".")[2]
        if sep and name in ("index-url", "extra-index-url", "find-links", "cert"):
            found[name] = value.strip().strip("'\"")  # ":env:" lines come after "global." ones and win
    for name in ("index-url", "extra-index-url", "find-links", "cert"):
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            found[name] = env
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
    """A torch CPU wheel in the given find-links folders, if any."""
    for d in find_links.split():
        d = d[len("file://"):] if d.startswith("file://") else d
        hits = sorted(glob.glob(os.path.join(d, "torch-*+cpu-*.whl")))
        if hits:
            return hits[-1]
    return None


# ------------------------------------------------------------------------------ the build


def build_command(tool: str, variant: str = "cpu", *, base: str | None = None, offline: bool = False,
                  extra_args: dict[str, str] | None = None, name: str = "curate",
                  tag_list: list[str] | None = None) -> list[str]:
    """The ``<tool> build ...`` argv (run in the repository root)."""
    cmd = [tool, "build", "-f", VARIANTS[variant]]
    for t in tag_list or tags(variant, name):
        cmd += ["-t", t]
    build_args: dict[str, str] = {}
    mounts: list[str] = []
    if base:
        build_args["BASE_IMAGE"] = base
    if offline:
        pip_args, mounts = host_pip_settings()
        build_args.update(pip_args)
        if variant == "cpu" and local_cpu_torch(pip_args.get("PIP_FIND_LINKS", "")):
            build_args["TORCH_INDEX_URL"] = ""  # the CPU wheel on disk, through find-links
    lab = labels(variant)
    build_args.update({"CURATE_VERSION": lab["org.opencontainers.image.version"],
                       "CURATE_REVISION": lab["org.opencontainers.image.revision"],
                       "CURATE_CREATED": lab["org.opencontainers.image.created"],
                       "CURATE_SOURCE": lab["org.opencontainers.image.source"]})
    build_args.update(extra_args or {})
    for k, v in build_args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    # also as --label: a build whose every layer comes from the cache keeps the labels of the
    # cached LABEL layer (Buildah does not re-evaluate it for new build-arg values); --label
    # always sets them on the image
    for k, v in lab.items():
        cmd += ["--label", f"{k}={v}"]
    if mounts:
        if tool != "podman":
            raise SystemExit("local pip folders (find-links / a file:// index) can be mounted into the build by "
                             "Podman only; with Docker serve them over HTTP (python -m http.server) and set "
                             f"PIP_INDEX_URL / PIP_FIND_LINKS to that URL: {mounts}")
        for m in mounts:
            cmd += ["-v", m]
    cmd.append(".")
    return cmd


def build(variant: str = "cpu", *, tool: str | None = None, base: str | None = None, offline: bool = False,
          mirror: str = DEBIAN_MIRROR, extra_args: dict[str, str] | None = None, tag_list: list[str] | None = None,
          timeout: float = 3600, dry_run: bool = False, log=print) -> tuple[list[str], float]:
    """Builds the image; (tags, seconds). Offline, the CPU image's base is the debootstrap root."""
    tool = tool or detect_tool()
    if offline and base is None and variant == "cpu":
        base = BASE_TAG if dry_run else base_image(tool, mirror)
    cmd = build_command(tool, variant, base=base, offline=offline, extra_args=extra_args, tag_list=tag_list)
    tag_list = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-t"]
    log("$ " + shlex.join(cmd))
    sys.stdout.flush()
    if dry_run:
        return tag_list, 0.0
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=tool_env(tool), timeout=timeout,
                       capture_output=log is not print, text=True)
    if r.returncode != 0:
        tail = (r.stdout or "")[-3000:] + (r.stderr or "")[-3000:] if log is not print else ""
        raise RuntimeError(f"{cmd[0]} build exited {r.returncode}{': ' + tail if tail else ''}")
    return tag_list, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the GPU image (docker/Dockerfile.gpu)")
    p.add_argument("--tool", choices=["docker", "podman"], help="default: $CURATE_CONTAINER_TOOL, docker, podman")
    p.add_argument("--base", help="BASE_IMAGE (default: the Dockerfile's; --offline: a debootstrap root)")
    p.add_argument("--offline", action="store_true", help="debootstrap base + this machine's pip settings")
    p.add_argument("--mirror", default=DEBIAN_MIRROR, help="Debian mirror for debootstrap (--offline)")
    p.add_argument("--name", default="curate", help="image name (default curate)")
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V", help="more build arguments")
    p.add_argument("--dry-run", action="store_true", help="print the command, build nothing")
    a = p.parse_args(argv)
    variant = "gpu" if a.gpu else "cpu"
    extra = dict(kv.split("=", 1) for kv in a.build_arg)
    if a.dry_run:   # no tool needed to print the command
        tool = a.tool or os.environ.get("CURATE_CONTAINER_TOOL") or "docker"
    else:
        tool = detect_tool(a.tool)
    try:
        tag_list, seconds = build(variant, tool=tool, base=a.base, offline=a.offline, mirror=a.mirror,
                                  extra_args=extra, tag_list=tags(variant, a.name), dry_run=a.dry_run)
    except RuntimeError as exc:   # the tool's own output is above
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not a.dry_run:
        print(f"built {', '.join(tag_list)} with {tool} in {seconds:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
