"""benchmarks/gpu_check.py in its CPU mode (--dry-run): every part runs on tiny shapes and the
JSON file has every field, with numeric ratios (the GPU run itself needs a GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_dry_run_writes_every_field(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "dry.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "dry-run" and res["device"]["torch_device"] == "cpu"
    assert {"packages", "missing", "parts", "gpu_monitor", "targets", "seconds"} <= set(res)
    parts = res["parts"]
    assert {k: parts[k]["status"] for k in ("device", "generate", "hf_classify", "pinning")} == \
        {"device": "ok", "generate": "ok", "hf_classify": "ok", "pinning": "ok"}, parts
    gen = parts["generate"]
    assert gen["path"] == "generate stage (library call)" and gen["same_work"] is True
    assert gen["plain"]["output_tokens"] == gen["curate"]["output_tokens"] == gen["prompts"] * gen["new_tokens"]
    clf = parts["hf_classify"]
    assert clf["path"] == "hf_classify stage (library call)" and clf["max_abs_score_diff"] < 1e-4
    for p in (gen, clf):
        assert isinstance(p["ratio"], float) and p["ratio"] > 0
    assert gen["curate"]["tokens_per_s"] > 0 and clf["curate"]["docs_per_s"] > 0
    # the local runner pinned each worker of the GPU step to one of the two declared devices
    pin = parts["pinning"]
    assert pin["pinned"] is True and pin["rows"] == 80
    assert sorted({w["CUDA_VISIBLE_DEVICES"] for w in pin["workers"]}) <= ["0", "1"]
    assert all(t in res["targets"] for t in ("generate_ratio", "hf_classify_ratio", "pinning"))
    assert res["targets"]["generate_ratio"]["value"] == gen["ratio"]
    assert "nvidia-smi" in (res["gpu_monitor"]["error"] or "") or res["gpu_monitor"]["all"]["samples"] >= 0
