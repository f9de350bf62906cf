"""The run report: one self-contained HTML page with the funnel, score histograms with the selection
threshold, and samples on both sides; loaded in headless Chromium without errors."""

import json
import os
import re
import subprocess

import pyarrow.parquet as pq
import pytest
from chromium import chromium, load_page

from curate.run import run_pipeline
from curate.report import ReportError, write_report
from helpers import curate_bin


@pytest.fixture(scope="module")
def run_output(domain_data, trained, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report") / "out")
    run_pipeline({
        "name": "report-test", "output": out, "workers": 1, "batch_size": 100,
        "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": domain_data["corpus"]}}},
        "stages": [
            {"stage": "language_id", "options": {"filter": False}},
            {"name": "score", "stage": "fasttext_score",
             "options": {"model": trained["model"], "labels": ["finance"], "columns": {"finance": "domain_score"}}},
            {"stage": "select", "options": {"by": "domain_score", "min_value": 0.2, "top": 150,
                                            "where": "language == 'en'"}},
        ]}, progress=False)
    return out


def test_report_page(run_output):
    path = write_report(run_output)
    assert path == os.path.join(run_output, "report.html")
    page = open(path, encoding="utf-8").read()
    stats = json.load(open(os.path.join(run_output, "stats.json")))["steps"]
    for name, s in stats.items():                           # the funnel
        assert f"<td>{name}</td>" in page and f"<td class=n>{s['out']:,}</td>" in page
    # every numeric score column of the select step's input, with the number of values
    score = pq.read_table(os.path.join(run_output, "score"))
    for col in ("language_score", "domain_score"):
        assert f'data-column="{col}"' in page
        assert f"{score.num_rows:,} values" in page
    # thresholds: min_value and the lowest selected score, drawn on domain_score
    sel = json.load(open(os.path.join(run_output, "select", "_selection.json")))
    cutoff = min(pq.read_table(os.path.join(run_output, "select")).column("domain_score").to_pylist())
    assert {t["from"] for t in sel["thresholds"]} == {"min_value", "lowest selected score"}
    assert sel["cutoff"] == pytest.approx(cutoff)
    hist = re.search(r'<svg class="hist" data-column="domain_score".*?</svg>', page).group(0)
    assert hist.count('class="threshold"') == 2 and hist.count('class="bar"') >= 2
    # samples above and below, with their text
    assert "3 passing" in page and "3 not passing" in page
    texts = set(score.column("text").to_pylist())
    shown = re.findall(r"<div class='doc'><span class='muted'>[^<]*</span>\n([^<]{40})", page)
    assert len(shown) >= 6 and all(any(t.startswith(s.replace("&#x27;", "'")) for t in texts) for s in shown)
    # self-contained: no scripts, stylesheets or images from anywhere
    assert not re.search(r"<(script|link|img|iframe)\b", page) and "http" not in page.split("<body>")[0]


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_report_in_headless_chromium(run_output):
    path = write_report(run_output)
    probe = """JSON.stringify({
      hists: [...document.querySelectorAll('svg.hist')].map(s => {const r = s.getBoundingClientRect();
               return {col: s.dataset.column, step: s.dataset.step || null, w: r.width, h: r.height, bars: s.querySelectorAll('rect.bar').length,
                       thresholds: s.querySelectorAll('line.threshold').length}}),
      funnel: document.querySelectorAll('svg.funnel rect.bar').length,
      rows: document.querySelectorAll('table.funnel-table tr').length})"""
    got = load_page(path, probe)
    assert got["errors"] == []
    v = json.loads(got["value"])
    assert v["funnel"] == 4 and v["rows"] == 5
    cols = {h["col"]: h for h in v["hists"] if h["step"] is None}   # the select step's (scoring steps' have data-step)
    assert {"domain_score", "language_score"} <= set(cols)
    assert all(h["w"] > 300 and h["h"] > 100 and h["bars"] >= 1 for h in v["hists"])
    assert cols["domain_score"]["thresholds"] == 2


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_page_checker_sees_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><p>x</p><img src="https://cdn.example.invalid/x.png">'
                   '<script>console.error("boom"); throw new Error("kaput")</script>')
    errors = load_page(str(bad))["errors"]
    assert any("boom" in e for e in errors) and any("kaput" in e for e in errors)
    assert any("Failed to load resource" in e for e in errors)


def test_report_cli(run_output, tmp_path):
    r = subprocess.run([curate_bin(), "report", run_output], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == os.path.join(run_output, "report.html")
    r = subprocess.run([curate_bin(), "report", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "no stats.json" in r.stderr
    with pytest.raises(ReportError):
        write_report(str(tmp_path))
