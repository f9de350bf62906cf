"""The shipped quickstart's data does not change under refactoring: the content of every step up to
``select`` (the LLM step is left out: CPU float order may differ between machines) is compared with
digests recorded from a run (``CURATE_RECORD_GOLDEN=1`` rewrites them after an intended change).

The digest of a step is the sha256 of its rows sorted by id, each row as canonical JSON of every
column: a changed text, score, column or row count changes it; shard layout and file bytes do not.
The pages come from the running Python's pydoc, so the digests hold for the Python (and the pinned
libraries of constraints-dev.txt) they were recorded with; another Python skips the test."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curate.cli import quickstart_path
from helpers import recorded

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "quickstart_digests.json")


def digest(out: str, step: str) -> tuple[int, str]:
    files = sorted(glob.glob(os.path.join(out, step, "*.parquet")))
    t = pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})
    rows = sorted(t.to_pylist(), key=lambda r: str(r.get("id")))
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return len(rows), h.hexdigest()


@pytest.mark.slow   # about 40 s: the quickstart's data steps
def test_quickstart_steps_have_their_recorded_content(tmp_path):
    from curate.run import run_pipeline

    with open(quickstart_path(), encoding="utf-8") as f:
        d = yaml.safe_load(f)
    d["stages"] = [s for s in d["stages"] if s["stage"] != "generate"]
    d["output"] = str(tmp_path / "out")
    res = run_pipeline(d, progress=False)
    got = {"python": "%d.%d.%d" % sys.version_info[:3],
           "steps": {name: list(digest(res.output, name)) for name in res.stats}}
    want = recorded(GOLDEN, got)
    if want["python"] != got["python"]:
        pytest.skip(f"digests recorded with Python {want['python']}, this is {got['python']}")
    assert got["steps"] == want["steps"]
