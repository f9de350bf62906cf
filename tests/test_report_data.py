"""The report shows the data: synthetic rows beside their source, score histograms with examples at
low, middle and high scores, dropped documents per reason, a mixture's target vs achieved shares;
every document text escaped. Checked against the run's own files, and in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chromium import chromium, load_page
from domain_text import documents

from curate.pipeline.runner import run_pipeline
from curate.pipeline.stage import DROP_SAMPLES, drop_sample_key
from curate.report import SAMPLE_CHARS, build_report, write_report
from curate.stages.clean.heuristic_filter import HeuristicFilter
from curate.testing.fake_openai import FakeOpenAI

XSS = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def table(out, step, sub=""):
    d = os.path.join(out, step, sub)
    files = sorted(f for f in os.listdir(d) if f.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(os.path.join(d, f)) for f in files]) if files else None


def answer(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    text = prompt.split("Text:", 1)[1].strip()
    if "encyclopedia" in prompt:
        return f"Here is a paraphrased version: WIKI {text[:80]} {XSS}"
    return f"Here are the questions and answers:\nQuestion: Why {XSS}?\nAnswer: {text[:40]}"


def spec(out: str, corpus: list[str], model: str, base_url: str) -> dict:
    engine = {"kind": "openai", "model": "fake", "base_url": base_url, "max_retries": 0}
    return {
        "name": "report-data", "output": out, "workers": 1, "batch_size": 16, "max_error_fraction": 1.0,
        "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": corpus}}},
        "stages": [
            {"stage": "heuristic_filter"},
            {"stage": "language_id", "options": {"filter": False}},
            {"name": "score", "stage": "fasttext_score",
             "options": {"model": model, "labels": ["finance"], "columns": {"finance": "domain_score"}}},
            {"name": "high", "stage": "select", "input": "score",
             "options": {"where": "domain_score >= 0.5", "by": "domain_score", "top": 4}},
            {"name": "low", "stage": "select", "input": "score",
             "options": {"where": "domain_score < 0.5", "by": "domain_score", "descending": False, "top": 4}},
            {"name": "qa", "stage": "rephrase", "input": "high", "options": {"engine": engine, "style": "qa"}},
            {"name": "wiki", "stage": "rephrase", "input": "low", "options": {"engine": engine}},
            {"name": "mixture", "stage": "mix", "input": ["qa", "wiki"],
             "options": {"proportions": {"qa": 1, "wiki": 3}, "total_tokens": 400}},
        ]}


def junk(i: int) -> str:
    """Documents the default heuristic filter drops, for several reasons; some carry markup."""
    kinds = [f"short {XSS}",                                             # too short
             ("buy now " * 60) + XSS,                                     # repetition
             "\n".join(f"• item {k} {XSS}" for k in range(40)),           # bullet lines
             "#### $$$ %%% " * 40]                                        # symbols
    return kinds[i % len(kinds)] + f" #{i}"


@pytest.fixture(scope="module")
def run(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("report_data")
    texts = [t for pair in zip(documents("finance", 40, seed=21), documents("cooking", 40, seed=21)) for t in pair]
    texts[3] = texts[3] + " " + XSS + " " + "x" * (3 * SAMPLE_CHARS)       # a long, hostile kept document
    rows = [{"id": f"d{i:03d}", "text": t} for i, t in enumerate(texts)]
    rows += [{"id": f"junk{i:03d}<b>", "text": junk(i)} for i in range(40)]
    corpus = []
    for k in range(4):                                      # 4 files: 4 tasks of the fused chain
        p = str(d / f"corpus{k}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[k::4]), p)
        corpus.append(p)
    out = str(d / "out")
    with FakeOpenAI(responder=answer) as srv:
        run_pipeline(spec(out, corpus, trained["model"], srv.base_url), progress=False)
    return {"out": out, "rows": rows, "corpus": corpus, "dir": d}


def section(page: str, sid: str) -> str:
    m = re.search(rf"<h2 id='{re.escape(sid)}'>.*?(?=<h2 |</body>)", page, re.S)
    assert m, sid
    return m.group(0)


def test_score_histogram_and_examples(run):
    page = build_report(run["out"])
    sec = section(page, "scores-score")
    scores = table(run["out"], "score").column("domain_score").to_numpy()
    counts = re.search(r'data-column="domain_score" data-step="score" data-counts="([0-9,]+)"', sec).group(1)
    assert [int(x) for x in counts.split(",")] == np.histogram(scores, bins=np.linspace(0, 1, 31))[0].tolist()
    assert f"{len(scores):,} values" in sec
    # low, middle and high examples: real rows whose score lies in the band the page names
    by_id = {r["id"]: r for r in table(run["out"], "score").to_pylist()}
    bands = re.findall(r"<details class='band' data-band='(\w+)' data-column='domain_score'><summary>\w+ domain_score "
                       r"\(([-0-9.e]+) – ([-0-9.e]+)\): (\d) examples</summary>(.*?)</details>", sec, re.S)
    assert [b[0] for b in bands] == ["low", "middle", "high"]
    means = []
    for band, lo, hi, n, body in bands:
        ids = [html.unescape(i) for i in re.findall(r"<div class='doc'><span class='muted'>([^<]*?) · domain_score", body)]
        assert len(ids) == int(n) >= 1
        vals = [by_id[i]["domain_score"] for i in ids]
        assert all(float(lo) - 1e-3 <= v <= float(hi) + 1e-3 for v in vals), (band, lo, hi, vals)
        means.append(np.mean(vals))
    assert means[0] < means[1] < means[2]
    # language_id is fused into the chain that ends at `score`: its scores are read there
    assert "rows as written by step score" in section(page, "scores-language_id")


def test_dropped_examples_per_reason(run):
    out = run["out"]
    page = build_report(out)
    sec = section(page, "dropped-heuristic_filter")
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]["heuristic_filter"]
    assert len(stats["dropped"]) >= 2
    kept_ids = set(table(out, "score").column("id").to_pylist())
    texts = {r["id"]: r["text"] for r in run["rows"]}
    hf = HeuristicFilter()
    hf.ensure_setup()
    for reason, n in stats["dropped"].items():
        m = re.search(rf"<details class='drop-reason' data-reason='{re.escape(reason)}'><summary><b>[^<]*</b> ([0-9,]+) "
                      rf"dropped; (\d) examples</summary>(.*?)</details>", sec, re.S)
        assert m, reason
        assert int(m.group(1).replace(",", "")) == n and int(m.group(2)) == min(n, DROP_SAMPLES)
        ids = [html.unescape(i) for i in re.findall(r"<div class='doc dropped'><span class='muted'>([^<]*?) · ", m.group(3))]
        assert len(ids) == min(n, DROP_SAMPLES)
        for i in ids:                     # really dropped, for this reason
            assert i in texts and i not in kept_ids
            assert hf.check_one(texts[i], i)[0] == reason
        # the seeded sample: the documents of this reason with the lowest keys, whatever the tasks
        dropped_here = [i for i in texts if hf.check_one(texts[i], i)[0] == reason]
        assert len(dropped_here) == n
        assert ids == sorted(dropped_here, key=drop_sample_key)[:DROP_SAMPLES]


def test_synthetic_rows_beside_their_source(run):
    out = run["out"]
    page = build_report(out)
    for step, src in (("qa", "high"), ("wiki", "low")):
        sec = section(page, f"synthetic-{step}")
        gen = {r["id"]: r for r in table(out, step).to_pylist()}
        source = {r["id"]: r["text"] for r in table(out, src).to_pylist()}
        pairs = re.findall(r"<tr class='pair'><td><div class='doc src'><span class='muted'>([^<]*)</span>\n(.*?)</div></td>"
                           r"<td><div class='doc gen'><span class='muted'>([^<]*?)(?: · [^<]*)?</span>\n(.*?)</div></td></tr>",
                           sec, re.S)
        assert len(pairs) == min(3, len(gen)) >= 1
        for sid, stext, gid, gtext in pairs:
            g = gen[html.unescape(gid)]
            assert g["source_id"] == html.unescape(sid)
            assert html.unescape(stext).rstrip("…") == source[g["source_id"]][:SAMPLE_CHARS]
            assert html.unescape(gtext).rstrip("…") == g["text"][:SAMPLE_CHARS]
        assert f"source: step {src}" in sec


def test_mix_target_vs_achieved(run):
    page = build_report(run["out"])
    sec = section(page, "mix-mixture")
    c = json.load(open(os.path.join(run["out"], "stats.json")))["steps"]["mixture"]["counters"]
    mix = table(run["out"], "mixture").to_pylist()
    tokens = {n: sum(len(r["text"].split()) for r in mix if r["mix_input"] == n) for n in ("qa", "wiki")}
    for n, target in (("qa", 0.25), ("wiki", 0.75)):
        row = re.search(rf"<tr data-input='{n}'>(.*?)</tr>", sec).group(1)
        cells = re.findall(r"<td class=n>([^<]*)</td>", row)
        assert cells[0] == f"{100 * target:.1f}%"
        assert cells[1] == f"{100 * tokens[n] / sum(tokens.values()):.1f}%"
        assert cells[1] == f"{100 * c[f'mix/proportion/{n}']:.1f}%"
        assert cells[3] == f"{c[f'mix/tokens/{n}']:,.0f}" == f"{tokens[n]:,}"
        assert int(cells[5].replace(",", "")) == sum(r["mix_input"] == n for r in mix)


def test_every_text_is_escaped_and_cut(run):
    page = build_report(run["out"])
    body = page.split("<body>", 1)[1]
    assert "<script" not in page and "<img" not in page and "onerror=alert(1)>" not in body
    assert html.escape(XSS) in body and "junk0" in body and html.escape("<b>") in body
    # the long document is cut: no run of x longer than SAMPLE_CHARS
    assert max((len(m) for m in re.findall(r"x{100,}", body)), default=0) <= SAMPLE_CHARS
    assert len(page) < 400_000


def test_resumed_task_does_not_double_the_examples(run, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(run["out"], out)
    spec_ = json.load(open(os.path.join(out, "_curate", "pipeline.json")))
    side = os.path.join(out, "heuristic_filter", "_drop_samples")
    before = sorted(os.listdir(side))
    assert len(before) == 4                                  # one file per task
    rows_before = table(out, "heuristic_filter", "_drop_samples").num_rows
    mtimes = {f: os.stat(os.path.join(side, f)).st_mtime_ns for f in before}
    # a killed run: the last task of the chain has no record; the rerun redoes exactly that task
    state = os.path.join(out, "_curate", "state", "score")
    os.remove(os.path.join(state, "DONE.json"))
    os.remove(os.path.join(state, "done", sorted(os.listdir(os.path.join(state, "done")))[-1]))
    with FakeOpenAI(responder=answer) as srv:
        for s in spec_["stages"]:
            if s["stage"] == "rephrase":
                s["options"]["engine"]["base_url"] = srv.base_url
        spec_["output"] = out
        run_pipeline(spec_, progress=False)
    assert sorted(os.listdir(side)) == before
    redone = [f for f in before if os.stat(os.path.join(side, f)).st_mtime_ns != mtimes[f]]
    assert redone == [before[-1]]                             # that task ran again and replaced its file
    assert json.load(open(os.path.join(out, "stats.json")))["steps"]["heuristic_filter"]["status"] == "resumed"
    assert table(out, "heuristic_filter", "_drop_samples").num_rows == rows_before
    a, b = build_report(run["out"]), build_report(out)
    assert section(a, "dropped-heuristic_filter") == section(b, "dropped-heuristic_filter")


def test_drop_samples_are_bounded_and_independent_of_batches():
    """FilterStage keeps, per reason, the DROP_SAMPLES dropped documents with the lowest seeded key,
    the same ones whatever the batch sizes, in bounded memory; take_side hands them over once."""
    docs = pa.table({"id": [f"j{i}" for i in range(160)], "text": [junk(i) for i in range(160)]})
    checker = HeuristicFilter()
    checker.ensure_setup()
    reason_of = {f"j{i}": checker.check_one(junk(i))[0] for i in range(160)}
    got = []
    for size in (1, 37, 160):
        st = HeuristicFilter()
        for k in range(0, docs.num_rows, size):
            st.process_safe(docs.slice(k, size))
            assert all(len(v) <= DROP_SAMPLES for v in st._drop_examples.values())
        counts = {k[8:]: v for k, v in st.counters.to_dict().items() if k.startswith("dropped/")}
        side = st.take_side()["drop_samples"].to_pylist()
        assert "drop_samples" not in st.take_side()                 # handed over once
        by = {}
        for r in side:
            by.setdefault(r["drop_reason"], []).append(r["id"])
            assert r["text"] == docs.column("text")[int(r["id"][1:])].as_py()[:2000]
        assert set(by) == set(counts) and all(len(v) == min(DROP_SAMPLES, counts[k]) for k, v in by.items())
        for reason, ids in by.items():
            everyone = [i for i, r in reason_of.items() if r == reason]
            assert ids == sorted(everyone, key=drop_sample_key)[:DROP_SAMPLES]
        got.append(by)
    assert got[0] == got[1] == got[2]


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_data_sections_in_headless_chromium(run):
    path = write_report(run["out"])
    probe = """JSON.stringify({
      pairs: document.querySelectorAll('table.pairs tr.pair').length,
      bands: document.querySelectorAll('details.band').length,
      reasons: document.querySelectorAll('details.drop-reason').length,
      mixrows: document.querySelectorAll('table.mix tr[data-input]').length,
      scripts: document.querySelectorAll('script').length,
      hist: [...document.querySelectorAll('svg.hist[data-step]')].map(s => s.getBoundingClientRect().width)})"""
    got = load_page(path, probe)
    assert got["errors"] == []
    v = json.loads(got["value"])
    assert v["pairs"] >= 2 and v["bands"] >= 6 and v["reasons"] >= 2 and v["mixrows"] == 2 and v["scripts"] == 0
    assert v["hist"] and all(w > 300 for w in v["hist"])
