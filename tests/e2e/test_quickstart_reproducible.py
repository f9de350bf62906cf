"""The quickstart is byte-reproducible: two runs (two processes, so objects sit at other memory
addresses) into two outputs give identical manifests, i.e. the same shards with the same sha256 for
every step, the LLM step included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from curate.cli import quickstart_path


def quickstart(tmp_path, **changes) -> str:
    with open(quickstart_path(), encoding="utf-8") as f:
        d = yaml.safe_load(f)
    stages = {s.get("name") or s["stage"]: s for s in d["stages"]}
    for key, options in changes.items():
        target = d["inputs"]["pages"] if key == "pages" else stages[key]
        target.setdefault("options", {}).update(options)
    p = tmp_path / "quickstart.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(p)


def run_twice(curate_cmd, tmp_path, pipeline: str) -> list[dict]:
    manifests = []
    for run in ("a", "b"):
        out = str(tmp_path / f"out_{run}")
        r = subprocess.run(curate_cmd + ["run", "-q", pipeline, "--output", out], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with open(os.path.join(out, "manifest.json")) as f:
            manifests.append(json.load(f))
    return manifests


def check_identical(manifests: list[dict]) -> None:
    a, b = manifests
    assert set(a["steps"]) == {"language_id", "exact_dedup", "minhash_dedup", "pii", "select", "generate"}
    for step in a["steps"]:
        assert a["steps"][step]["shards"], f"{step} wrote no shard"
        assert a["steps"][step] == b["steps"][step], f"step {step} differs between two runs"
    assert a["steps"]["generate"]["shards"][0]["rows"] >= 1


def test_pydoc_pages_are_the_same_bytes_in_two_processes():
    """Memory addresses in pydoc's rendering of default values (``<object object at 0x...>``)
    differ between processes; read_pydoc normalises them."""
    code = ("import hashlib; from curate.stages.sources.read_pydoc import ReadPydoc; "
            "t = ReadPydoc(modules=['collections', 'inspect', 'json', 'ftplib', 'logging', 'dataclasses'])(); "
            "print([hashlib.sha256(h.encode()).hexdigest() for h in t.column('html').to_pylist()])")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].count("'") == 12


@pytest.mark.slow
def test_quickstart_pipeline_is_byte_reproducible(curate_cmd, tmp_path):
    """Every step of the quickstart, with its options, on modules whose pydoc pages hold memory
    addresses (collections, inspect, json, ftplib, shutil, ...) and two documents summarised in 8
    tokens instead of three in 48 (the shipped file otherwise; test_configs runs it as shipped)."""
    modules = ["collections", "collections.abc", "_collections_abc", "inspect", "json", "ftplib", "shutil",
               "logging", "dataclasses", "sched", "smtplib", "socket", "tarfile", "unittest", "urllib.parse",
               "difflib", "configparser", "os", "os.path", "posixpath", "csv", "argparse"]
    p = quickstart(tmp_path, pages={"modules": modules, "topics": ["if", "while", "for", "try", "with"],
                                    "modules_per_task": 4},
                   select={"top": 2}, generate={"max_tokens": 8})
    check_identical(run_twice(curate_cmd, tmp_path, p))
