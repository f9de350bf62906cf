"""A first run building a domain corpus: step warnings, heuristic presets, the
raw html carried along, one-row shards, short Latin-1 files, typos without suggestions, inspect."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from curate.cli import main
from curate.pipeline.warnings import step_warnings
from helpers import write_yaml


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


# -- 18.0: step warnings ------------------------------------------------------------------------------

def _step(stage="heuristic_filter", n_in=100, n_out=100, dropped=None, errors=None, counters=None):
    return {"stage": stage, "in": n_in, "out": n_out, "dropped": dropped or {}, "errors": errors or {},
            "counters": counters or {}}


def test_step_warnings_from_counters():
    assert step_warnings(_step(n_out=60, dropped={"gopher_quality:gopher_short_doc": 40})) == []
    w = step_warnings(_step(n_out=10, dropped={"gopher_quality:gopher_below_alpha_threshold": 90}))
    assert [x["code"] for x in w] == ["dropped_most"]
    assert "gopher_below_alpha_threshold removed 90 of its 100 documents (90%)" in w[0]["message"]
    w = step_warnings(_step(n_out=10, dropped={"x": 90}, counters={"heuristic_filter/c4_modified": 9}))
    assert [x["code"] for x in w] == ["dropped_most", "rewrote_most"]
    assert "9 of the 10 kept documents" in w[1]["message"]
    assert step_warnings(_step(counters={"heuristic_filter/c4_modified": 50})) == []
    # select keeping its top-k drops the rest by design: no warning
    assert step_warnings(_step("select", n_out=7, dropped={"not_selected": 93})) == []
    # LLM / synthetic steps: a small output
    assert [x["code"] for x in step_warnings(_step("generate", n_out=5))] == ["low_output"]
    assert step_warnings(_step("generate", n_out=50)) == []
    assert [x["code"] for x in step_warnings(_step("my_stage", n_out=5, counters={"llm/requests": 100}))] == \
        ["low_output"]
    assert step_warnings(_step("my_stage", n_out=5)) == []   # a plain step may shrink
    # what a stage counted itself, and errors
    w = step_warnings(_step("rephrase", counters={"warnings/low_yield": 3}))
    assert w == [{"code": "low_yield", "message": "low yield (the stage counted 3)"}]
    w = step_warnings(_step(errors={"parse/no_json": 4, "exception/ValueError": 1}))
    assert w[0]["code"] == "errors" and "5 rows" in w[0]["message"] and "errors/parse/no_json 4" in w[0]["message"]


def test_warnings_are_shown_below_the_funnel_in_stats_and_in_the_report(tmp_path):
    # short one-line documents: Gopher's minimum word count drops nearly all of them; the
    # long ones have lines without end punctuation, which C4's line filter removes
    prose = ("The committee reviewed the annual budget and approved the new plan for the schools. "
             "Members of the public were invited to comment on the proposal before the final vote. ")
    long_doc = "\n".join([prose * 3, "see also the index", prose * 2, "Table of contents", prose * 3])
    texts = [f"short note number {i}" for i in range(30)] + [long_doc.replace("plan", f"plan {i}") for i in range(4)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    p = write_yaml(str(tmp_path / "p.yaml"), {
        "name": "w", "output": str(tmp_path / "out"), "workers": 1,
        "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": [str(tmp_path / "docs.parquet")]}}},
        "stages": [{"stage": "heuristic_filter", "options": {"gopher_repetition": {"enabled": False},
                                                             "fineweb": {"enabled": False}}}]})
    r = cli("run", "-q", p)
    assert r.exit_code == 0, r.output
    assert "WARNING step heuristic_filter: dropped/gopher_quality:gopher_short_doc removed 30 of its 34" in r.stderr
    assert "heuristic_filter/c4_modified: 4 of the 4 kept documents (100%)" in r.stderr
    assert "WARNING" not in r.stdout   # on stderr, below the funnel
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert [w["code"] for w in stats["steps"]["heuristic_filter"]["warnings"]] == ["dropped_most", "rewrote_most"]
    assert stats["steps"]["docs"]["warnings"] == []
    page = open(tmp_path / "out" / "report.html").read()
    assert "<h2 id='warnings'>Warnings</h2>" in page and "gopher_short_doc removed 30 of its 34" in page


# -- 18.10: html dropped after extraction, headerlinks, tasks by bytes, short Latin-1 files -----------

SPHINX_PAGE = """<html><head><title>3. An Informal Introduction — Docs</title></head><body><div class="body">
<section id="intro"><h1>3. An Informal Introduction<a class="headerlink" href="#intro" title="Permalink">¶</a></h1>
<p>In the following examples, input and output are distinguished by the presence or absence of
prompts. Many of the examples in this manual include comments, which start with a hash character.</p>
<section id="calc"><h2>3.1. Using Python as a Calculator<a class="headerlink" href="#calc" title="Permalink">¶</a></h2>
<p>Let us try some simple commands. Start the interpreter and wait for the primary prompt, which
is shown before each example in this section of the tutorial.</p></section></section></div></body></html>"""


def test_extract_drops_html_unless_asked_and_removes_headerlinks(tmp_path):
    from curate.stages.clean.extract_html import ExtractHtml

    t = pa.table({"id": ["a"], "text": [""], "source": ["a.html"], "metadata": ["{}"], "html": [SPHINX_PAGE]})
    out = ExtractHtml()(t)
    assert "html" not in out.schema.names
    assert out.column("title").to_pylist() == ["3. An Informal Introduction"]
    assert "¶" not in out.column("text")[0].as_py()
    kept = ExtractHtml(keep_html=True, drop_headerlinks=False)(t)
    assert kept.column("html").to_pylist() == [SPHINX_PAGE]
    assert kept.column("title").to_pylist() == ["3. An Informal Introduction¶"]   # what a user got


def test_read_files_groups_tasks_by_bytes(tmp_path):
    from curate.stages.sources.read_files import ReadFiles

    for i in range(10):
        (tmp_path / f"p{i}.txt").write_text(f"page {i} " + "x" * 995)   # about 1 KB each
    assert len(ReadFiles(paths=[str(tmp_path)]).tasks()) == 10
    st = ReadFiles(paths=[str(tmp_path)], bytes_per_task=3000)
    tasks = st.tasks()
    assert [len(t.payload) for t in tasks] == [2, 2, 2, 2, 2]
    assert sorted(st().column("source").to_pylist()) == sorted(f"p{i}.txt" for i in range(10))   # relative to the input root
    assert [len(t.payload) for t in ReadFiles(paths=[str(tmp_path)], bytes_per_task=10**9).tasks()] == [10]


@pytest.mark.parametrize("text", ["café", "Un café, s'il vous plaît.\n", "Smørrebrød og øl.", "Ångström",
                                  "Ich heiße Jürgen.\n", "It’s a café – “quoted”."])
def test_short_latin1_text_files_are_not_garbled(tmp_path, text):
    from curate.stages.sources.read_files import ReadFiles

    (tmp_path / "a.txt").write_bytes(text.encode("cp1252"))
    row = ReadFiles(paths=[str(tmp_path / "a.txt")])().to_pylist()[0]
    assert row["text"] == text
    assert json.loads(row["metadata"])["charset"] == "cp1252"


@pytest.mark.parametrize("text,enc", [("Привет, как дела?", "cp1251"), ("Zażółć gęślą jaźń", "cp1250"),
                                      ("Příliš žluťoučký kůň", "cp1250"), ("café", "utf-8")])
def test_short_files_in_other_charsets_are_still_detected(text, enc):
    from curate.ingest.charset import decode_bytes

    assert decode_bytes(text.encode(enc), html=False).text == text


# -- 18.10: "did you mean" for typos in keys and stage names -----------------------------------------

def test_typos_in_keys_and_stage_names_get_suggestions(tmp_path):
    p = write_yaml(str(tmp_path / "p.yaml"), {
        "name": "x", "output": str(tmp_path / "out"), "wokers": 2,
        "inputs": {"pages": {"stage": "read_pydoc", "options": {"modules": ["json"]}}},
        "stages": [{"stage": "extract_htm"},
                   {"stage": "heuristic_filter", "optoins": {}},
                   {"name": "hf", "stage": "heuristic_filter", "options": {"c4": {"modify_txt": False},
                                                                          "text_colum": "text"}},
                   {"stage": "select", "options": {"top": 3, "zzz": 1}}]})
    r = cli("validate", p)
    assert r.exit_code == 2
    out = r.output
    assert "key 'wokers': unknown key (did you mean 'workers'?)" in out
    assert "key 'optoins': unknown key (did you mean 'options'?)" in out
    # the file's structure is checked first; then each step's stage and options
    spec = yaml.safe_load(open(p))
    del spec["wokers"]
    spec["stages"][1] = {"stage": "heuristic_filter"}
    r = cli("validate", write_yaml(p, spec))
    assert r.exit_code == 2
    out = r.output
    assert "unknown stage 'extract_htm' (did you mean 'extract_html'?)" in out
    assert "key 'options.c4.modify_txt': unknown key (did you mean 'modify_text'?)" in out
    assert "key 'options.text_colum': unknown key (did you mean 'text_column'?)" in out
    assert "key 'options.zzz': unknown key\n" in out + "\n" and "zzz': unknown key (did" not in out


# -- 18.10: inspect a whole document, count a column's values ------------------------------------------

def test_inspect_prints_a_whole_document_and_counts_values(tmp_path):
    long_text = "first line\n" + "word " * 100 + "\nlast line of the document"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": [long_text, "short", "other"],
                             "language": ["en", "de", "en"]}), tmp_path / "part-0.parquet")
    r = cli("inspect", str(tmp_path), "--id", "a")
    assert r.exit_code == 0, r.output
    assert long_text in r.output and "--- language: en" in r.output and "short" not in r.output
    r = cli("inspect", str(tmp_path), "--count", "language")
    assert r.exit_code == 0 and "2 distinct values of language" in r.output
    lines = [ln.split() for ln in r.output.splitlines()[1:]]
    assert lines == [["2", '"en"'], ["1", '"de"']]
    assert "last line of the document" in cli("inspect", str(tmp_path), "--full").output
    assert "last line of the document" not in cli("inspect", str(tmp_path)).output
    r = cli("inspect", str(tmp_path), "--id", "zzz")
    assert r.exit_code == 1 and "no row with id 'zzz'" in r.output
    r = cli("inspect", str(tmp_path), "--count", "nope")
    assert r.exit_code == 2 and "no column 'nope'" in r.output


# -- 18.4: heuristic_filter presets ---------------------------------------------------------------------

def test_presets_set_values_under_the_options_given():
    from curate.stages.clean.heuristic_filter import PRESETS, HeuristicFilter

    web = HeuristicFilter().config
    assert web.preset == "web" and web.c4.modify_text and web.gopher_quality.max_non_alpha_words_ratio == 0.8
    docs = HeuristicFilter(preset="docs").config
    assert not docs.c4.modify_text and docs.gopher_quality.max_non_alpha_words_ratio == \
        PRESETS["docs"]["gopher_quality"]["max_non_alpha_words_ratio"]
    # a key given next to the preset wins; the preset's other keys of that rule set stay
    mixed = HeuristicFilter(preset="docs", c4={"modify_text": True}, gopher_quality={"min_doc_words": 10}).config
    assert mixed.c4.modify_text and not mixed.c4.filter_curly_bracket and mixed.gopher_quality.min_doc_words == 10
    assert mixed.gopher_quality.max_non_alpha_words_ratio == docs.gopher_quality.max_non_alpha_words_ratio
    assert not HeuristicFilter(preset="code_docs").config.fineweb.enabled
    with pytest.raises(Exception, match="preset"):
        HeuristicFilter(preset="nope")


@pytest.mark.slow   # pydoc pages through extraction and three filter runs: ~20 s on a busy machine
def test_docs_preset_keeps_documentation_that_web_defaults_drop_or_rewrite():
    from curate.stages.clean.extract_html import ExtractHtml
    from curate.stages.clean.heuristic_filter import HeuristicFilter
    from curate.stages.sources.read_pydoc import ReadPydoc

    pages = ExtractHtml(date_extensive_search=False)(ReadPydoc(modules=["json", "csv", "textwrap", "heapq",
                                                                        "bisect", "shlex", "fnmatch", "glob"])())
    kept = {}
    for preset in ("web", "docs", "code_docs"):
        st = HeuristicFilter(preset=preset)
        out = st(pages)
        kept[preset] = (out.num_rows, st.counters.to_dict().get("heuristic_filter/c4_modified", 0), out)
    n = pages.num_rows
    assert kept["web"][0] < 0.5 * n                          # the web defaults drop most of it
    assert kept["web"][1] == kept["web"][0]                  # ... and rewrite all they keep
    assert kept["docs"][0] > kept["web"][0] and kept["code_docs"][0] >= kept["docs"][0]
    assert kept["docs"][1] == 0 and kept["code_docs"][1] == 0
    texts = dict(zip(pages.column("id").to_pylist(), pages.column("text").to_pylist()))
    out = kept["docs"][2]
    assert all(texts[i] == t for i, t in zip(out.column("id").to_pylist(), out.column("text").to_pylist()))
