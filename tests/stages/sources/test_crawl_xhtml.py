"""The crawler on XHTML pages that start with an XML declaration (DocBook-generated documentation
sites emit one on every page), and pages whose links cannot be parsed: counted and logged, never
silently empty."""

import logging

from curate.stages.sources.crawl import Crawl
from curate.stages.clean.extract_html import ExtractHtml

FAST = dict(per_host_delay=0.0, timeout=2.0, retries=0, trust_env=False)

DECL = '<?xml version="1.0" encoding="UTF-8"?>\n'
DOCTYPE = ('<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" '
           '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n')


def xhtml(title, *links, content_type="application/xhtml+xml; charset=utf-8"):
    body = "".join(f'<p>{title}: a paragraph about configuring the resolver caché, section {i}. '
                   "The resolver reads its settings once at start and keeps them for every lookup "
                   "that follows, so changes need a restart.</p>" for i in range(4))
    nav = "".join(f'<a href="{h}" class="link">{h}</a> ' for h in links)
    page = (f'{DECL}{DOCTYPE}<html xmlns="http://www.w3.org/1999/xhtml"><head><meta http-equiv="Content-Type" '
            f'content="text/html; charset=UTF-8" /><title>{title}</title></head><body><div class="navheader">{nav}'
            f'</div><div class="chapter"><h1 class="title">{title}</h1>{body}</div></body></html>')
    return {"body": page, "content_type": content_type}


def docbook_site():
    return {
        "/robots.txt": {"body": "User-agent: *\n", "content_type": "text/plain"},
        "/index.html": xhtml("Guide", "ch01.html", "ch02.html"),
        "/ch01.html": xhtml("Chapter 1", "index.html", "ch01s01.html", "ch01s02.html"),
        "/ch01s01.html": xhtml("Section 1.1", "ch01.html", "ch01s02.html", content_type="text/html"),
        "/ch01s02.html": xhtml("Section 1.2", "ch02.html"),
        "/ch02.html": xhtml("Chapter 2", "apa.html"),
        "/apa.html": xhtml("Appendix A", "index.html"),
    }


def test_crawl_follows_links_of_xhtml_pages_with_xml_declaration(serve_site, tmp_path):
    pages = docbook_site()
    base, stop, hits = serve_site(pages)
    st = Crawl(seeds=[base + "/index.html"], max_depth=5, state_dir=str(tmp_path / "s"), **FAST)
    t = st()
    stop()
    fetched = sorted(u[len(base):] for u in t.column("url").to_pylist())
    assert fetched == sorted(p for p in pages if p != "/robots.txt")
    assert all(hits[p] == 1 for p in fetched)
    c = st.counters.to_dict()
    assert c["crawl/pages_html"] == 6
    assert not [k for k in c if k.startswith("errors/")], c

    # the other lxml user on the same pages: extraction keeps the text and the title
    out = ExtractHtml()(t)
    assert out.num_rows == 6
    rows = {r["url"][len(base):]: r for r in out.to_pylist()}
    assert rows["/ch01s02.html"]["title"] == "Section 1.2"
    assert "resolver caché" in rows["/ch02.html"]["text"]


def test_pages_whose_links_cannot_be_parsed_are_counted_and_logged_once(serve_site, tmp_path, caplog):
    pages = {
        "/": xhtml("Home", "/empty1", "/empty2", "/ok"),
        # served as HTML, but lxml finds no document in them: the links are lost, so it is an error
        "/empty1": {"body": "<!-- generated: nothing here -->", "content_type": "text/html"},
        "/empty2": {"body": "<?php include 'nav.php' ?>", "content_type": "text/html"},
        "/ok": xhtml("Ok", "/"),
    }
    base, stop, _ = serve_site(pages)
    st = Crawl(seeds=[base + "/"], max_depth=3, obey_robots=False, state_dir=str(tmp_path / "s"), **FAST)
    with caplog.at_level(logging.WARNING, logger="curate"):
        t = st()
    stop()
    assert t.num_rows == 4  # the pages themselves are kept
    c = st.counters.to_dict()
    assert c["errors/links/ParserError"] == 2
    logged = [r for r in caplog.records if "cannot be parsed" in r.getMessage()]
    assert len(logged) == 1 and "errors/links/ParserError" in logged[0].getMessage()
