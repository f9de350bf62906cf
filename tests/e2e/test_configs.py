"""Every example pipeline in configs/ runs, through the real `curate run`, on real offline data."""

import glob
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.cli import quickstart_path
from helpers import ROOT, curate_bin

CONFIGS = os.path.join(ROOT, "configs")


def _load_site():
    sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
    from http_site import serve_site
    return serve_site


def run_cli(config, env):
    r = subprocess.run([curate_bin(), "run", "-q", config], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def step_table(out, step):
    files = sorted(glob.glob(os.path.join(out, step, "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def test_every_config_is_tested():
    tested = {"crawl_example.yaml", "warc_example.yaml",
              "domain_adaptation.yaml",   # tests/e2e/test_domain_adaptation.py
              "synthetic_example.yaml",   # tests/e2e/test_synthetic_example.py
              "prox_example.yaml",        # tests/e2e/test_prox_example.py
              "domain_classifier.yaml",   # tests/e2e/test_domain_classifier.py
              "decontaminate_example.yaml",   # tests/stages/clean/test_decontaminate.py
              "route_by_score.yaml"}   # tests/e2e/test_route_by_score.py
    assert {os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))} <= tested | set(
        os.environ.get("CURATE_EXTRA_TESTED_CONFIGS", "").split())


def test_the_quickstart_has_one_file():
    """The quickstart ships inside the package (``curate run`` runs it without a file); configs/ has
    no second copy to drift from it."""
    assert os.path.isfile(quickstart_path()) and not os.path.exists(os.path.join(CONFIGS, "quickstart.yaml"))


@pytest.mark.slow
def test_quickstart(tmp_path):
    out = str(tmp_path / "qs")
    r = run_cli(quickstart_path(), {"CURATE_OUTPUT": out})
    assert "minhash_dedup" in r.stdout
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]
    order = ["pages", "extract_html", "language_id", "exact_dedup", "minhash_dedup", "heuristic_filter", "pii",
             "select", "generate"]
    assert list(stats) == order
    assert stats["pages"]["out"] >= 150 and not stats["pages"]["errors"]
    for a, b in zip(order, order[1:]):
        assert stats[b]["in"] == stats[a]["out"], (a, b)
    # os.path is posixpath, collections.abc is _collections_abc: real exact duplicates
    assert stats["exact_dedup"]["dropped"].get("duplicate_text", 0) >= 2
    deduped = step_table(out, "exact_dedup")
    sources = set(deduped.column("source").to_pylist())
    assert not {"pydoc:os.path", "pydoc:posixpath"} <= sources
    final = step_table(out, "pii")
    assert final.num_rows == stats["pii"]["out"] > 20
    assert set(final.column("language").to_pylist()) == {"en"}
    assert len(set(final.column("id").to_pylist())) == final.num_rows
    assert all(len(t) > 200 for t in final.column("text").to_pylist())
    # the LLM step: the 3 documents with the best language score, each with a generated summary
    gen = step_table(out, "generate")
    scores = sorted(final.column("language_score").to_pylist(), reverse=True)
    assert gen.num_rows == 3 and sorted(gen.column("language_score").to_pylist(), reverse=True) == scores[:3]
    assert all(s and s.strip() for s in gen.column("summary").to_pylist())
    assert all(0 < n <= 48 for n in gen.column("summary_tokens").to_pylist())
    assert stats["generate"]["counters"]["llm/requests"] == 3
    assert stats["generate"]["counters"]["llm/completion_tokens"] == sum(gen.column("summary_tokens").to_pylist())
    # the same command again resumes: nothing recomputed, same stats
    run_cli(quickstart_path(), {"CURATE_OUTPUT": out})
    again = json.load(open(os.path.join(out, "stats.json")))["steps"]
    assert all(again[s]["status"] == "skipped" for s in again)
    assert {s: again[s]["out"] for s in again} == {s: stats[s]["out"] for s in stats}


GERMAN = ("Die Zentralbank hat ihren Leitzins am Dienstag unverändert gelassen und erklärt, dass die "
          "Inflation im Sommer zwar nachgelassen habe, aber weiterhin über dem Zielwert liege. Die "
          "meisten Analysten hatten mit dieser Entscheidung gerechnet, wiesen jedoch darauf hin, dass "
          "die Erklärung zum Arbeitsmarkt vorsichtiger formuliert war als nach der letzten Sitzung. "
          "Die Renditen der Staatsanleihen gaben nach der Ankündigung leicht nach.")


@pytest.mark.slow
def test_crawl_example(tmp_path):
    from pydoc_data.topics import topics

    from curate.stages.clean.extract_html import ExtractHtml
    from curate.stages.clean.heuristic_filter import HeuristicFilter
    from curate.stages.clean.language_id import LanguageId
    from curate.stages.sources.read_pydoc import topic_page

    names = sorted(topics)[:40]
    pages = {f"/docs/{n}.html": topic_page(n) for n in names}
    links = "".join(f'<li><a href="{n}.html">{n}</a></li>' for n in names)
    pages["/docs/index.html"] = (
        "<html><head><title>Docs</title></head><body><ul>" + links +
        '<li><a href="private/secret.html">secret</a></li><li><a href="/other/outside.html">out</a></li>'
        '<li><a href="copy.html">copy</a></li><li><a href="de.html">de</a></li>'
        '<li><a href="mailto:docs@example.org">mail</a></li></ul></body></html>')
    pages["/docs/copy.html"] = topic_page(names[3])                 # the same page at another URL
    pages["/docs/de.html"] = f"<html lang='de'><body><article><p>{GERMAN}</p></article></body></html>"
    pages["/docs/private/secret.html"] = topic_page(names[5])
    pages["/other/outside.html"] = topic_page(names[6])
    pages["/robots.txt"] = {"body": "User-agent: *\nDisallow: /docs/private/\n", "content_type": "text/plain"}
    base, stop, hits = _load_site()(pages)
    try:
        out = str(tmp_path / "crawl")
        env = {"CURATE_OUTPUT": out, "CRAWL_SEED": base + "/docs/index.html",
               "CRAWL_PREFIX": base + "/docs/", "CRAWL_DELAY": "0"}
        run_cli(os.path.join(CONFIGS, "crawl_example.yaml"), env)
    finally:
        stop()
    fetched = {p for p in hits if p != "/robots.txt"}
    assert fetched == {f"/docs/{n}.html" for n in names} | {"/docs/index.html", "/docs/copy.html", "/docs/de.html"}
    assert all(hits[p] == 1 for p in fetched)

    # expected: the same stages as library calls on the same pages, then one copy of each text
    rows = sorted((base + p, pages[p]) for p in fetched)
    t = pa.table({"id": [u for u, _ in rows], "url": [u for u, _ in rows], "html": [h for _, h in rows],
                  "text": [""] * len(rows), "source": [u for u, _ in rows], "metadata": ["{}"] * len(rows)})
    t = ExtractHtml(date_extensive_search=False)(t)
    t = LanguageId(languages=["en"])(t)
    t = HeuristicFilter(gopher_quality={"max_non_alpha_words_ratio": 0.6},
                        gopher_repetition={"top_n_grams": [[2, 0.3], [3, 0.3], [4, 0.3]]})(t)
    expected = {u for u in t.column("url").to_pylist() if not u.endswith("/docs/copy.html")}
    final = step_table(out, "minhash_dedup")
    got = set(final.column("url").to_pylist())
    assert got == expected and len(got) >= 10
    assert base + "/docs/de.html" not in got
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]
    assert stats["language_id"]["dropped"].get("wrong_language", 0) >= 1
    assert stats["exact_dedup"]["dropped"]  # the copy (or its original) was removed


def _warc(path, records):
    """Write a .warc.gz of (url, html) HTTP responses with warcio."""
    from io import BytesIO

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        for url, html in records:
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=BytesIO(html.encode()),
                                                http_headers=headers))


NEWS = [
    "The regional water authority approved a plan on Monday to replace ageing pipes under the old "
    "town, a project that engineers say will take four years and cost more than the council expected.",
    "Residents have complained for years about low pressure and frequent repairs, and the authority "
    "admitted that about a fifth of the water it treats is lost through leaks before it reaches homes.",
    "Work will begin in the spring on the streets around the market square, where the oldest cast "
    "iron mains were laid more than a century ago and now break several times every winter.",
    "The council said that traffic would be diverted during the works, and that shops on the affected "
    "streets could apply for compensation if their takings fell while the roads were closed.",
    "Opposition members asked why the contract had been awarded without a second round of bids, and "
    "the chair of the committee promised to publish the full evaluation report next month.",
    "An independent engineer who reviewed the plan for the council described it as ambitious but "
    "realistic, provided that the supply of materials is not delayed by shortages at the factories.",
]


def _shingles(text, n=5):
    import re
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def make_warc_corpus(folder) -> None:
    """Two WARC files: six stories, a near-duplicate of each, an exact copy, a corrupt record."""
    # six distinct stories: the same six sentences in different orders behind different leads
    # (Jaccard of 5-word shingles well below 0.8), then for each a lightly edited copy (one word
    # changed: a near-duplicate), and one byte-identical copy of story 0 at another URL
    orders = [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 4, 1, 5, 3], [3, 5, 1, 4, 0, 2],
              [1, 3, 5, 0, 2, 4], [4, 2, 0, 5, 3, 1]]
    towns = ["Alder", "Birch", "Cedar", "Dogwood", "Elm", "Fir"]

    def article(i, edited=False):
        body = [f"Report {i} from the district of {towns[i]}, filed on a {'Friday' if edited else 'Tuesday'}."]
        body += [NEWS[k] for k in orders[i]]
        return ("<html lang='en'><head><title>Story</title></head><body><article>" +
                "".join(f"<p>{p}</p>" for p in body) + "</article></body></html>")

    pages = [(f"https://news.example.org/{i}", article(i)) for i in range(6)]
    pages += [(f"https://news.example.org/{i}-edited", article(i, edited=True)) for i in range(6)]
    _warc(str(folder / "a.warc.gz"), pages[:6])
    _warc(str(folder / "b.warc.gz"), pages[6:] + [("https://news.example.org/copy", pages[0][1])])
    with open(folder / "b.warc.gz", "ab") as fh:
        fh.write(b"\x1f\x8b\x08\x00garbage that is not a gzip member")   # a corrupt trailing record


@pytest.mark.slow
def test_warc_example(tmp_path):
    import itertools

    make_warc_corpus(tmp_path)
    out = str(tmp_path / "out")
    run_cli(os.path.join(CONFIGS, "warc_example.yaml"), {"CURATE_OUTPUT": out,
                                                          "WARC_PATHS": str(tmp_path / "*.warc.gz")})
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]
    assert stats["warc"]["out"] == 13
    assert stats["warc"]["errors"] == {"truncated": 1}            # counted, not fatal
    assert stats["heuristic_filter"]["out"] == 13                  # real prose passes the defaults
    assert stats["exact_dedup"]["dropped"] == {"duplicate_text": 1}
    final = step_table(out, "minhash_dedup")
    texts = dict(zip(final.column("url").to_pylist(), final.column("text").to_pylist()))
    # ground truth by brute force: no two kept texts are near-duplicates, and every story survives
    for (u, a), (v, b) in itertools.combinations(texts.items(), 2):
        sa, sb = _shingles(a), _shingles(b)
        assert len(sa & sb) / len(sa | sb) < 0.8, (u, v)
    assert final.num_rows == 6 and stats["minhash_dedup"]["dropped"] == {"near_duplicate": 6}
    removed = step_table(out, "minhash_dedup/_removed")
    assert sorted(removed.column("duplicate_of").to_pylist()) == sorted(final.column("id").to_pylist())
