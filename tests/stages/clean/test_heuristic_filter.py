"""heuristic_filter: datatrove's Gopher/C4/FineWeb rules through the adapter, reasons recorded."""

from __future__ import annotations

import pyarrow as pa
import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)

from curate.pipeline.stage import StageError
from curate.stages.clean.extract_html import ExtractHtml
from curate.stages.clean.heuristic_filter import HeuristicFilter
from curate.text.heuristics import HeuristicRules

from pages import article_pages, html_table, pydoc_pages

ALL_OFF = {k: {"enabled": False} for k in ("gopher_repetition", "gopher_quality", "c4", "fineweb")}


@pytest.fixture(scope="module")
def extracted():
    pages = pydoc_pages(["json", "textwrap", "bisect", "heapq", "shlex", "colorsys"]) + article_pages(8)
    return ExtractHtml()(html_table(pages))


def _dropped(st) -> dict[str, int]:
    return {k[len("dropped/"):]: v for k, v in st.counters.to_dict().items() if k.startswith("dropped/")}


def test_real_pages_reasons_and_side_output(extracted):
    st = HeuristicFilter(save_dropped=True)
    out = st(extracted)
    kept = out.column("url").to_pylist()
    assert 0 < out.num_rows < extracted.num_rows
    assert all(u.startswith("https://news.example.com/") for u in kept)  # the articles survive
    dropped = _dropped(st)
    assert sum(dropped.values()) == extracted.num_rows - out.num_rows  # nothing lost silently
    assert all(r.split(":")[0] in {"gopher_repetition", "gopher_quality", "c4", "fineweb"} for r in dropped)
    side = st.take_side()["dropped"]
    assert side.num_rows == sum(dropped.values())
    assert all(u.startswith("pydoc:") for u in side.column("url").to_pylist())
    assert sorted(side.column("drop_reason").to_pylist()) == sorted(
        r for r, n in dropped.items() for _ in range(n))


def _reference(text: str) -> tuple[bool, str]:
    """FineWeb's sequence of datatrove filters, called directly."""
    doc = Document(text=text, id="x")
    for name, f in (("gopher_repetition", GopherRepetitionFilter()), ("gopher_quality", GopherQualityFilter()),
                    ("c4", C4QualityFilter()), ("fineweb", FineWebQualityFilter())):
        res = f.filter(doc)
        if res is not True:
            return False, f"{name}:{res[1] if isinstance(res, tuple) else 'filtered'}"
    return True, doc.text


def test_same_decisions_as_datatrove(extracted):
    st = HeuristicFilter(save_dropped=True)
    out = st(extracted)
    kept = dict(zip(out.column("id").to_pylist(), out.column("text").to_pylist()))
    side = st.take_side()["dropped"]
    reasons = dict(zip(side.column("id").to_pylist(), side.column("drop_reason").to_pylist()))
    for doc_id, text in zip(extracted.column("id").to_pylist(), extracted.column("text").to_pylist()):
        ok, what = _reference(text)
        if ok:
            assert kept[doc_id] == what  # C4's line filtering written back
        else:
            assert reasons[doc_id] == what


def test_switches_and_tuning(extracted):
    st = HeuristicFilter(**ALL_OFF)
    out = st(extracted)
    assert out.num_rows == extracted.num_rows
    assert out.column("text").to_pylist() == extracted.column("text").to_pylist()
    st = HeuristicFilter(**{**ALL_OFF, "gopher_quality": {"min_doc_words": 100_000, "max_doc_words": None}})
    assert st(extracted).num_rows == 0
    assert _dropped(st) == {"gopher_quality:gopher_short_doc": extracted.num_rows}
    # C4 without rewriting the text
    arts = extracted.filter(pa.compute.starts_with(extracted.column("url"), "https://"))
    st = HeuristicFilter(**{**ALL_OFF, "c4": {"modify_text": False}})
    out = st(arts)
    assert out.column("text").to_pylist() == arts.column("text").to_pylist()
    st = HeuristicFilter(**{**ALL_OFF, "c4": {}})
    out = st(arts)
    assert out.num_rows == arts.num_rows
    assert st.counters.to_dict().get("heuristic_filter/c4_modified", 0) >= 1  # the title line has no period
    with pytest.raises(Exception):
        HeuristicFilter(gopher_quality={"min_doc_wordz": 3})  # unknown option


def test_bad_input_counted(monkeypatch):
    t = pa.table({"id": ["a", "b", "c"], "text": [None, "", "   "]})
    st = HeuristicFilter()
    assert st(t).num_rows == 0
    assert _dropped(st) == {"heuristic_filter:empty_text": 3}

    def boom(self, text, n_words=None):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(HeuristicRules, "fineweb", boom)
    st = HeuristicFilter(**{**ALL_OFF, "fineweb": {}})
    assert st(pa.table({"id": ["d"], "text": ["some text here."]})).num_rows == 0
    c = st.counters.to_dict()
    assert c["dropped/fineweb:error"] == 1 and c["errors/fineweb/ZeroDivisionError"] == 1


def test_clear_errors():
    with pytest.raises(StageError, match="needs column"):
        HeuristicFilter()(pa.table({"id": ["a"], "body": ["x"]}))
    with pytest.raises(StageError, match="expected text"):
        HeuristicFilter()(pa.table({"id": ["a"], "text": [3]}))
