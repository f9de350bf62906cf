"""extract_html: same text as plain trafilatura, metadata, bad pages counted, time limit."""

from __future__ import annotations

import json
import threading
import os
import time

import pyarrow as pa
import pytest
import trafilatura

from curate.pipeline.stage import StageError
from curate.stages.clean.extract_html import ExtractHtml

from pages import PROSE, article_page, article_pages, html_table, pydoc_pages

PAGES = pydoc_pages(["json", "csv", "textwrap", "bisect", "heapq", "shlex"]) + article_pages(6)


def _lost(stage: ExtractHtml, n_in: int, n_out: int) -> int:
    dropped = sum(v for k, v in stage.counters.to_dict().items() if k.startswith("dropped/"))
    return n_in - n_out - dropped


@pytest.mark.parametrize("opts", [
    {},
    {"output_format": "markdown", "favor_precision": True},
    {"favor_recall": True, "include_tables": False, "include_comments": True},
    {"fast": True},
])
def test_same_text_as_plain_trafilatura(opts):
    stage = ExtractHtml(**opts)
    out = stage(html_table(PAGES))
    assert out.num_rows == len(PAGES)
    plain_opts = {k: v for k, v in opts.items()}
    plain_opts.setdefault("include_comments", False)
    got = dict(zip(out.column("url").to_pylist(), out.column("text").to_pylist()))
    for url, html in PAGES:
        assert got[url] == trafilatura.extract(html, url=url, **plain_opts), url


def test_metadata_title_date_and_merge():
    url, html = article_pages(1)[0]
    t = html_table([(url, html)])
    t = t.set_column(t.schema.names.index("metadata"), "metadata",
                     pa.array([json.dumps({"warc": "a.warc.gz", "title": "from source"})]))
    out = ExtractHtml()(t)
    assert out.column("title")[0].as_py() == "Story number 0: rates on hold"
    assert out.column("date")[0].as_py() == "2024-03-01"
    meta = json.loads(out.column("metadata")[0].as_py())
    assert meta["warc"] == "a.warc.gz" and meta["title"] == "from source"  # source keys win
    assert meta["author"] == "Jane Doe" and meta["date"] == "2024-03-01"
    assert meta["page_url"] == url and meta["html_lang"] == "en"
    assert "rates unchanged" in out.column("text")[0].as_py() or "interest rate" in out.column("text")[0].as_py()
    # without metadata: no title/date columns, metadata untouched
    out2 = ExtractHtml(with_metadata=False)(t)
    assert "title" not in out2.schema.names
    assert out2.column("metadata")[0].as_py() == t.column("metadata")[0].as_py()


def test_bad_pages_are_counted_not_fatal():
    good = article_page("A good page", PROSE[:5])
    pages = [
        ("u:good", good),
        ("u:empty", ""),
        ("u:blank", "   \n  "),
        ("u:boiler", "<html><body><nav><a href='/'>Home</a></nav></body></html>"),
        ("u:no-body", "<html><head><title>t</title></head><body></body></html>"),
        ("u:tag-only", "<p>"),
        ("u:broken", "<html><body><div><p>" + PROSE[0] + "<p>" + PROSE[1] + "<table><tr><td>x"),
        ("u:garbage", "\x00\x01\x02 not html at all \x7f"),
        ("u:xml-decl", "<?xml version='1.0' encoding='iso-8859-1'?><html><body><p>x</p></body></html>"),
    ]
    t = html_table(pages)
    t = pa.concat_tables([t, pa.table({"id": ["nul"], "source": ["u:null"], "html": pa.array([None], pa.string()),
                                       "text": [""], "metadata": ["{}"], "url": ["u:null"]})])
    st = ExtractHtml(save_dropped=True)
    out = st(t)
    c = st.counters.to_dict()
    assert "u:good" in out.column("url").to_pylist()
    assert c["dropped/empty_html"] == 3  # empty, blank, null
    assert c["dropped/no_content"] == 2  # no-body, tag-only
    assert _lost(st, t.num_rows, out.num_rows) == 0
    side = st.take_side()["dropped"]
    assert side.num_rows == t.num_rows - out.num_rows
    assert set(side.column("drop_reason").to_pylist()) <= {"empty_html", "no_content", "parse_error", "timeout"}


def test_binary_and_non_utf8_html():
    good = article_page("Café prices rise", PROSE[:5])
    latin = good.replace('<meta charset="utf-8">', '<meta charset="iso-8859-1">').encode("cp1252")
    t = pa.table({"id": ["a", "b"], "html": pa.array([good.encode("utf-8"), latin], pa.binary()),
                  "text": ["", ""], "metadata": ["{}", "{}"], "url": ["u:a", "u:b"]})
    st = ExtractHtml()
    out = st(t)
    assert out.num_rows == 2
    texts = out.column("text").to_pylist()
    assert texts[0] == texts[1] == trafilatura.extract(good, include_comments=False)
    assert "Café" in texts[0]
    c = st.counters.to_dict()
    assert c["extract_html/decoded/meta"] == 2  # both pages declare their charset
    # invalid bytes: decoded by curate.ingest.charset (counted by how), the row is still extracted
    bad = good.encode("utf-8").replace(b"central bank", b"central \xff\xfe bank")
    st = ExtractHtml()
    out = st(pa.table({"id": ["c"], "html": pa.array([bad], pa.binary()), "text": [""]}))
    assert out.num_rows == 1 and "bank" in out.column("text")[0].as_py()
    assert sum(v for k, v in st.counters.to_dict().items() if k.startswith("extract_html/decoded/")) == 1
    # a string page that was decoded upstream with replacement characters is counted
    st = ExtractHtml()
    out = st(html_table([("u:r", good.replace("central bank", "central \ufffd bank"))]))
    assert out.num_rows == 1 and st.counters.to_dict()["extract_html/non_utf8"] == 1


def test_text_rows_pass_through_and_column_errors():
    t = pa.table({"id": ["t"], "html": pa.array([None], pa.string()), "text": ["already text"]})
    st = ExtractHtml()
    out = st(t)
    assert out.column("text").to_pylist() == ["already text"]
    assert st.counters.to_dict()["extract_html/passthrough_text"] == 1
    with pytest.raises(StageError, match="html"):
        ExtractHtml()(pa.table({"id": ["x"], "text": ["no html column"]}))
    with pytest.raises(StageError, match="expected string or binary"):
        ExtractHtml()(pa.table({"id": ["x"], "html": [1], "text": [""]}))


_extract_one = ExtractHtml.extract_one


def _slow_extract(self, html, url):
    if "SLOW" in html:
        time.sleep(30)
    return _extract_one(self, html, url)


def test_time_limit_drops_pathological_page(monkeypatch):
    monkeypatch.setattr(ExtractHtml, "extract_one", _slow_extract)
    pages = article_pages(2) + [("u:slow", article_page("SLOW", PROSE[:4]))]
    st = ExtractHtml(timeout_s=0.3)
    t0 = time.perf_counter()
    out = st(html_table(pages))
    assert time.perf_counter() - t0 < 10
    c = st.counters.to_dict()
    assert out.num_rows == 2 and c["dropped/timeout"] == 1 and c["errors/timeout"] == 1
    import signal
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0  # timer disarmed, handler restored
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None, signal.default_int_handler)


def test_no_time_limit_off_main_thread(caplog):
    res = {}

    def work():
        st = ExtractHtml(timeout_s=0.5)
        res["out"] = st(html_table(article_pages(2)))

    th = threading.Thread(target=work)
    th.start()
    th.join()
    assert res["out"].num_rows == 2


def test_benchmark_functions_run(tmp_path):
    """benchmarks/extract.py builds its page set and times each path (tiny run, no timing asserted)."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    spec = importlib.util.spec_from_file_location("bench_extract", os.path.join(root, "benchmarks", "extract.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = bench.build_pages(str(tmp_path / "pages.parquet"), articles=4, modules=["json", "bisect"])
    res = bench.run(path, ["plain", "stage_nometa", "stage"], rounds=1)
    assert {n for n, _, _ in res.values()} == {6}
    assert all(w > 0 and c > 0 for _, w, c in res.values())


def test_time_limit_on_a_real_slow_page():
    """pydoc's ipaddress page: its many IPv6 examples send htmldate's extensive date search into
    dateparser for seconds (measured 2.2 CPU-s vs 0.1 s without metadata)."""
    from pages import pydoc_page

    page = [("pydoc:ipaddress", pydoc_page("ipaddress"))]
    # in a fresh interpreter: the cost is dateparser's cold start, which earlier tests in this
    # process may already have paid
    import json
    import subprocess
    import sys
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from pages import pydoc_page, html_table; "
            "from curate.stages.clean.extract_html import ExtractHtml; st = ExtractHtml(timeout_s=0.3); "
            "out = st(html_table([('pydoc:ipaddress', pydoc_page('ipaddress'))])); "
            "print(json.dumps([out.num_rows, st.counters.to_dict()]))")
    t0 = time.perf_counter()
    support = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "support")
    r = subprocess.run([sys.executable, "-c", code, support],
                       capture_output=True, text=True, timeout=120, check=True)
    rows, counters = json.loads(r.stdout.strip().splitlines()[-1])
    assert rows == 0 and counters["dropped/timeout"] == 1
    assert time.perf_counter() - t0 < 30
    # the cheap date search avoids it, and the text is still plain trafilatura's
    st = ExtractHtml(timeout_s=30, date_extensive_search=False)
    out = st(html_table(page))
    assert out.column("text")[0].as_py() == trafilatura.extract(page[0][1], url=page[0][0], include_comments=False)
