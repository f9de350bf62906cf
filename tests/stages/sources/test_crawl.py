"""crawl: a local site on 127.0.0.1 (tests/support/http_site.py) with links in and out of the allow-list,
robots.txt, redirects, errors, binary, slow and huge pages; determinism; resume after SIGKILL."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pydantic
import pytest

from curate.pipeline.schema import make_id
from curate.pipeline.stage import get_stage
from curate.stages.sources.crawl import Crawl

FAST = dict(per_host_delay=0.0, timeout=1.0, retries=0, max_response_bytes=1_000_000, trust_env=False)


def html(*links, body=""):
    return "<html><body>" + body + "".join(f'<a href="{h}">{h}</a>' for h in links) + "</body></html>"


def site_pages():
    return {
        "/robots.txt": {"body": "User-agent: *\nDisallow: /private/\n", "content_type": "text/plain"},
        "/": html("/a", "b.html", "http://other.example/x", "https://other.example/y", "mailto:me@example.com",
                  "javascript:void(0)", "ftp://127.0.0.1/file", "/private/p", "/old", "/missing", "/blob",
                  "/slow", "/huge", "/big", "/img.png", "/a#section", "./a", "/redirect-out"),
        "/a": html("/", "/c", "/deep1", "/a"),
        "/b.html": '<html><head><meta charset="iso-8859-1"></head><body>caf\xe9</body></html>'.encode("latin-1"),
        "/c": {"body": "<html><body>c page</body></html>", "content_type": "text/html"},
        "/deep1": html("/deep2", body="deep1"),
        "/deep2": html(body="deep2"),  # depth 3 > max_depth 2: never fetched
        "/old": {"location": "/new"},
        "/new": html(body="new page"),
        "/redirect-out": {"location": "http://other.example/"},
        "/private/p": html(body="secret"),
        "/blob": {"body": b"\x00\x01\x02binary", "content_type": "application/octet-stream"},
        "/slow": {"body": html(body="slow"), "delay": 3},
        "/huge": {"body": "<html>" + "x" * 3_000_000 + "</html>", "chunked": True},
        "/big": {"body": "<html>" + "y" * 2_000_000 + "</html>"},
        "/img.png": {"body": b"\x89PNG", "content_type": "image/png"},
    }


EMITTED = ["/", "/a", "/b.html", "/big", "/blob", "/huge", "/missing", "/old", "/redirect-out", "/slow"]
PAGES = ["/", "/a", "/b.html", "/c", "/deep1", "/new"]  # the HTML pages kept, in (depth, url) order
REQUESTED = ["/", "/a", "/b.html", "/big", "/blob", "/huge", "/missing", "/old", "/redirect-out", "/slow",
             "/c", "/deep1", "/new"]


def test_crawl_fetches_exactly_the_allowed_pages(serve_site, tmp_path):
    base, stop, hits = serve_site(site_pages())
    st = Crawl(seeds=[base + "/"], max_depth=2, concurrency=4, state_dir=str(tmp_path / "state"), **FAST)
    t = st()
    stop()
    assert t.schema.names == ["id", "text", "source", "metadata", "html", "url", "status", "fetched_at"]
    paths = [u[len(base):] for u in t.column("url").to_pylist()]
    assert paths == ["/", "/a", "/b.html", "/new", "/c", "/deep1"]  # depth 0, 1 (+redirect target), 2
    assert sorted(paths) == sorted(PAGES)
    # every allowed URL requested exactly once; nothing outside the allow-list / robots / depth
    assert dict(hits) == {"/robots.txt": 1, **{p: 1 for p in REQUESTED}}
    rows = {r["url"][len(base):]: r for r in t.to_pylist()}
    assert rows["/b.html"]["html"].endswith("<body>café</body></html>")
    assert all(r["text"] == "" and r["status"] == 200 and r["fetched_at"] is not None for r in rows.values())
    assert rows["/a"]["id"] == make_id(base + "/a") and rows["/a"]["source"] == base + "/a"
    meta = json.loads(rows["/new"]["metadata"])
    assert meta["via"] == base + "/old" and meta["depth"] == 1 and meta["status"] == 200
    assert json.loads(rows["/b.html"]["metadata"])["charset"] == "cp1252"
    c = st.counters.to_dict()
    assert c["crawl/pages_html"] == 6 and c["crawl/pages_requested"] == 13
    assert c["dropped/robots"] == 1
    assert c["dropped/content_type"] == 1
    assert c["dropped/too_large"] == 2
    assert c["dropped/http_status"] == 1
    assert c["errors/fetch/timeout"] == 1
    assert c["crawl/redirects"] == 2 and c["crawl/redirect/outside_allowlist"] == 1
    assert c["crawl/links/refused_scheme"] == 3  # mailto, javascript, ftp
    assert c["crawl/links/outside_allowlist"] == 2
    assert c["crawl/links/skipped_extension"] == 1
    log = st.take_side()["fetch_log"].to_pylist()
    outcomes = {r["url"][len(base):]: r["outcome"] for r in log if r["url"].startswith(base)}
    assert outcomes["/private/p"] == "dropped/robots" and outcomes["/missing"] == "dropped/http_status"
    assert "/deep2" not in outcomes  # beyond max_depth: never queued
    assert outcomes["/c"] == "crawl/pages_html" and outcomes["/old"] == "crawl/redirects"


def test_crawl_is_deterministic_across_concurrency_and_max_pages(serve_site, tmp_path):
    pages = site_pages()
    for p in ("/slow", "/huge", "/big"):
        pages.pop(p)
    base, stop, hits = serve_site(pages)
    a = Crawl(seeds=[base + "/"], max_depth=2, concurrency=1, **FAST)()
    b = Crawl(seeds=[base + "/"], max_depth=2, concurrency=8, **FAST)()
    assert a.column("url").to_pylist() == b.column("url").to_pylist()
    assert a.column("html").to_pylist() == b.column("html").to_pylist()
    hits.clear()
    # max_pages cuts the last level in URL order: "/", then "/a", "/b.html" of depth 1
    c = Crawl(seeds=[base + "/"], max_depth=2, concurrency=8, max_pages=3, **FAST)()
    assert [u[len(base):] for u in c.column("url").to_pylist()] == ["/", "/a", "/b.html"]
    assert sorted(p for p in hits if p != "/robots.txt") == ["/", "/a", "/b.html"]
    stop()


def test_per_host_delay_and_crawl_delay(serve_site):
    pages = {"/robots.txt": {"body": "User-agent: *\nCrawl-delay: 0.3\n", "content_type": "text/plain"},
             "/": html("/1", "/2", "/3"), "/1": html(), "/2": html(), "/3": html()}
    base, stop, hits = serve_site(pages)
    st = Crawl(seeds=[base + "/"], concurrency=4, per_host_delay=0.1, timeout=2.0, retries=0, trust_env=False)
    t0 = time.monotonic()
    t = st()
    took = time.monotonic() - t0
    stop()
    assert t.num_rows == 4
    starts = sorted(r["fetched_at"] for r in st.take_side()["fetch_log"].to_pylist())
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.25, gaps  # robots.txt Crawl-delay (0.3 s) > per_host_delay wins
    assert took >= 0.9


def test_crawl_resumes_after_sigkill_without_refetching(serve_site, tmp_path):
    # a tree of 1 + 4 + 16 pages; with 0.15 s between requests the crawl takes ~3 s
    pages = {"/": html(*[f"/p{i}" for i in range(4)])}
    for i in range(4):
        pages[f"/p{i}"] = html(*[f"/p{i}/q{j}" for j in range(4)], body=f"p{i}")
        for j in range(4):
            pages[f"/p{i}/q{j}"] = html(body=f"q{i}{j}")
    base, stop, hits = serve_site(pages)
    state = tmp_path / "state"
    opts = dict(seeds=[base + "/"], max_depth=2, concurrency=2, per_host_delay=0.15, timeout=5.0,
                state_dir=str(state), trust_env=False)
    code = textwrap.dedent(f"""
        from curate.stages.sources.crawl import Crawl
        Crawl(**{opts!r})()
        print("finished")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while sum(n for p, n in hits.items() if p != "/robots.txt") < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL and b"finished" not in out, err.decode()[-2000:]
    before = dict(hits)

    dbs = [f for f in os.listdir(state) if f.endswith(".sqlite")]
    assert len(dbs) == 1
    with sqlite3.connect(state / dbs[0]) as db:
        done = [u for (u,) in db.execute("SELECT url FROM urls WHERE requested=1")]
    assert 5 <= len(done) < len(pages)

    st = Crawl(**opts)
    t = st()
    stop()
    assert sorted(u[len(base):] for u in t.column("url").to_pylist()) == sorted(pages)
    for u in done:  # finished pages were not fetched again
        assert hits[u[len(base):]] == before[u[len(base):]] == 1
    assert all(hits[p] <= 2 for p in pages)  # at most the in-flight ones twice
    assert sum(hits[p] for p in pages) <= len(pages) + opts["concurrency"]
    assert st.counters.to_dict()["crawl/pages_html"] == len(pages)
    # a third call re-emits from the state without any request
    hits_now = dict(hits)
    again = Crawl(**opts)()
    assert again.column("url").to_pylist() == t.column("url").to_pylist()
    assert dict(hits) == hits_now


def test_crawl_bad_inputs(serve_site, tmp_path):
    with pytest.raises(pydantic.ValidationError, match="http"):
        Crawl(seeds=["ftp://example.com/"])
    with pytest.raises(pydantic.ValidationError):
        Crawl(seeds=[])
    st = Crawl(seeds=["http://a.example/"], allowed_domains=["b.example"])
    assert st.check() and "outside the allow-list" in st.check()[0][1]
    # nothing listens on this port: counted as a fetch error, no crash
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    st = Crawl(seeds=[f"http://127.0.0.1:{port}/"], obey_robots=False, **FAST)
    t = st()
    assert t.num_rows == 0
    assert st.counters.to_dict()["errors/fetch/ConnectError"] == 1
    # robots.txt answering 500: the site is not crawled (counted)
    base, stop, hits = serve_site({"/robots.txt": {"status": 500, "body": "oops"}, "/": html("/a")})
    st = Crawl(seeds=[base + "/"], **FAST)
    assert st().num_rows == 0
    assert st.counters.to_dict()["dropped/robots"] == 1
    assert "/" not in hits
    stop()
    assert get_stage("crawl") is Crawl


def test_raising_limits_continues_the_same_crawl(serve_site, tmp_path):
    pages = {"/": html("/a"), "/a": html("/b"), "/b": html("/c"), "/c": html()}
    base, stop, hits = serve_site(pages)
    opts = dict(seeds=[base + "/"], state_dir=str(tmp_path / "s"), **FAST)
    t1 = Crawl(max_depth=1, **opts)()
    assert [u[len(base):] for u in t1.column("url").to_pylist()] == ["/", "/a"]
    t2 = Crawl(max_depth=3, **opts)()  # links of the stored depth-1 page are read from the state
    assert [u[len(base):] for u in t2.column("url").to_pylist()] == ["/", "/a", "/b", "/c"]
    assert all(hits[p] == 1 for p in pages)
    stop()
