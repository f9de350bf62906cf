"""configs/prox_example.yaml runs through the real `curate run`: pydoc pages -> extract -> prox_refine
doc level -> prox_refine chunk level, with SmolLM2 on the CPU (whatever programs it writes are
executed, counted, and never fail the run)."""

from __future__ import annotations

import glob
import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.text.prox import refine
from helpers import ROOT, curate_bin


def table(out, step):
    files = sorted(glob.glob(os.path.join(out, step, "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def source_texts() -> dict[str, str]:
    from curate.stages.clean.extract_html import ExtractHtml
    from curate.stages.sources.read_pydoc import ReadPydoc

    r = ReadPydoc(modules=[], topics=["pass", "continue", "break", "del"])
    pages = pa.concat_tables([t for task in r.tasks() for t in r.read(task)])
    return {x["id"]: x["text"] for x in ExtractHtml(date_extensive_search=False)(pages).to_pylist()}


@pytest.mark.slow
def test_prox_example(tmp_path):
    out = str(tmp_path / "prox")
    cmd = [curate_bin(), "run", "-q", os.path.join(ROOT, "configs", "prox_example.yaml")]
    env = {**os.environ, "CURATE_OUTPUT": out}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]
    assert list(stats) == ["pages", "extract_html", "prox_doc", "prox_chunk"]
    doc, chunk = stats["prox_doc"], stats["prox_chunk"]
    assert stats["pages"]["out"] == 4 and doc["in"] == 4 and chunk["in"] == doc["out"]
    cd, cc = doc["counters"], chunk["counters"]
    # every document answered once; each answer counted as keep_doc, drop_doc or other
    assert cd["llm/requests"] == 4
    assert sum(cd.get(f"prox_refine/ops/{k}", 0) for k in ("keep_doc", "drop_doc", "other")) == 4
    assert doc["out"] + doc["dropped"].get("prox_drop_doc", 0) == 4
    dropped = table(os.path.join(out, "prox_doc"), "_dropped")
    assert (dropped.num_rows if dropped is not None else 0) == doc["dropped"].get("prox_drop_doc", 0)
    if dropped is not None:
        assert set(dropped.column("drop_reason").to_pylist()) == {"prox_drop_doc"}
        assert all("drop" in p for p in dropped.column("prox_doc_program").to_pylist())
    # chunk level: one request per chunk; the longest kept page is cut (chunk_tokens: 128)
    assert cc.get("prox_refine/chunks", 0) == cc.get("llm/requests", 0) >= chunk["in"]
    assert chunk["out"] + sum(chunk["dropped"].values()) == chunk["in"] and not chunk["errors"]
    rows = table(out, "prox_chunk").to_pylist() if chunk["out"] else []
    assert len(rows) == chunk["out"]
    sources = source_texts()
    decisions = {"refined": 0, "unchanged": 0, "program_ignored": 0}
    for row in rows:
        src_id = row["source_id"].split("#")[0]
        assert row["id"] == row["source_id"] + "#prox-0" and row["template_id"] == "prox/chunk_instruct"
        assert row["engine_kind"] == "transformers" and row["prompt_tokens"] > 0
        # the stored program, executed again on the page, gives the stored text
        res = refine(sources[src_id], row["prox_chunk_program"])
        assert res.text == row["text"] and res.error_ops == row["prox_chunk_error_ops"]
        decisions["program_ignored" if row["prox_chunk_decision"] == "ignored" else row["prox_chunk_decision"]] += 1
    assert {k: v for k, v in decisions.items() if v} == {k: cc[f"prox_refine/{k}"] for k in decisions
                                                         if cc.get(f"prox_refine/{k}")}
    # a rerun is answered from the finished steps
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    again = json.load(open(os.path.join(out, "stats.json")))["steps"]
    assert all(again[s]["status"] == "skipped" for s in again)
