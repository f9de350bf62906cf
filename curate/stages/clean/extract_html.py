"""``extract_html``: main text (and metadata) of HTML pages with trafilatura.

Reads the ``html`` column (string, or binary: then decoded with :mod:`curate.ingest.charset`),
writes ``text`` (replacing the empty text of HTML rows), ``title`` and ``date``, and merges the
metadata trafilatura finds (title, author, url, hostname, sitename, description, date, language,
categories, tags, license, pagetype, image) into the ``metadata`` JSON. Keys the source already set
are kept as they are (the source wins); trafilatura's canonical URL is stored as ``page_url``.

The extracted text is exactly what ``trafilatura.extract(html, url=url, <same options>)`` returns:
the stage runs trafilatura's own extraction once with metadata and serialises the body without the
metadata header (checked by a test against the plain call). Two clean-ups before it, both on by
default and both described below, change pages that have permalink anchors or code inside lists.

Per-document time limit (``timeout_s``): trafilatura has no timeout and a thread cannot be killed,
so the stage arms ``signal.setitimer(ITIMER_REAL)`` around each page when it runs in the main
thread of its process (runner workers and library calls do). Elsewhere (another thread, a platform
without SIGALRM, or a timer already armed by someone else) it runs without a limit and logs a
warning once. The alarm is delivered between Python bytecodes, so a single long C call (lxml
parsing one huge document) finishes before the page is abandoned; trafilatura's own size limit
(``MAX_FILE_SIZE`` in its settings, 20 MB) and ``max_html_bytes`` bound that part.

The ``html`` column is dropped from the output once the text is extracted (``keep_html: true``
keeps it; dropped rows keep it in the ``_dropped/`` side output). Permalink anchors
(``<a class="headerlink">¶</a>`` of Sphinx and MkDocs pages) are removed before extraction
(``drop_headerlinks``), so headings and titles do not end in "¶". Lists whose items hold a ``<pre>`` (Python's documentation puts every
function's examples in a ``<dd>``) are rendered as plain blocks before extraction
(``keep_code_in_lists``; see :mod:`curate.ingest.code_blocks`): trafilatura joins a list item onto
one line, which flattened the code.

Rows are dropped (and counted) by reason, never lost silently:

``dropped/empty_html``   no HTML and no text (a row that already has text but no HTML is passed
                         through unchanged: ``extract_html/passthrough_text``)
``dropped/no_content``   trafilatura found no main text (empty, boilerplate-only or broken page)
``dropped/timeout``      the page took longer than ``timeout_s`` (also ``errors/timeout``)
``dropped/parse_error``  trafilatura or lxml raised (also ``errors/parse/<Exception>``)

Other counters: ``extract_html/decoded/<how>`` for binary HTML (see charset), ``extract_html/non_utf8`` for
pages whose bytes were not valid in their charset (bytes replaced by U+FFFD; the page is still
extracted), ``extract_html/chars_in`` and ``extract_html/chars_out``. Warnings and errors that trafilatura
and its helpers log (``parsed tree length ...``) are counted as
``extract_html/library_log/<library>/<what>`` and logged at debug level with the page's id.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from curate.ingest.code_blocks import has_code_in_list, unlist_code_blocks
from curate.pipeline.api import FilterStage, LibraryLogs, Resources, StageConfig, StageError, register, set_column

log = logging.getLogger("curate")

#: trafilatura Document attributes copied into the metadata JSON (metadata key = attribute name)
#: permalink anchors of documentation generators (Sphinx, MkDocs): <a class="headerlink" ...>¶</a>
_HEADERLINK = re.compile(r"<a\b[^>]*\bclass\s*=\s*[\"'][^\"']*\bheaderlink\b[^\"']*[\"'][^>]*>.*?</a\s*>",
                         re.I | re.S)
_HTML_LANG = re.compile(r"<html\b[^>]*?\blang\s*=\s*[\"']?\s*([A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*)", re.I)
#: libraries whose log records are counted and re-logged at debug level with the page (LibraryLogs)
_LIBRARY_LOGGERS = ("trafilatura", "htmldate", "justext", "courlan")
META_FIELDS = ("title", "author", "url", "hostname", "sitename", "description", "date", "language",
               "categories", "tags", "license", "pagetype", "image")


class ExtractHtmlConfig(StageConfig):
    html_column: str = Field("html", description="column holding the page HTML (string or bytes)")
    url_column: str = Field("url", description="column holding the page URL (optional; passed to "
                                               "trafilatura, which uses it to resolve links)")
    output_format: Literal["txt", "markdown"] = Field(
        "txt", description="plain text, or markdown (keeps headings, lists, emphasis, tables)")
    favor_precision: bool = Field(False, description="prefer less but cleaner text")
    favor_recall: bool = Field(False, description="when unsure, keep more text")
    fast: bool = Field(False, description="skip trafilatura's fallback extractors (readability, "
                                          "justext): about 1.5x faster, slightly lower recall")
    include_tables: bool = Field(True, description="keep the text of <table> elements")
    include_comments: bool = Field(False, description="keep the comment sections of pages "
                                                           "(trafilatura's own default is true)")
    include_links: bool = Field(False, description="keep link targets (markdown/xml output)")
    include_formatting: bool | None = Field(None, description="keep formatting; default: only "
                                                              "for markdown output")
    deduplicate: bool = Field(False, description="trafilatura's in-process segment dedup (stateful "
                                                 "across pages: makes output depend on page order)")
    target_language: str | None = Field(None, description="trafilatura's own language check "
                                                          "(ISO 639-1); use language_id instead")
    with_metadata: bool = Field(True, description="extract title/date/... and merge them into "
                                                  "metadata (adds the title and date columns)")
    date_extensive_search: bool | None = Field(
        None, description="htmldate's extensive date search (null: trafilatura's setting, on). It "
                          "parses every date-like string of the page with dateparser; false makes "
                          "metadata extraction much faster on long pages full of numbers")
    metadata_fields: list[str] = Field(list(META_FIELDS), description="trafilatura metadata kept")
    timeout_s: float | None = Field(10.0, gt=0, description="per-page time limit in seconds "
                                                            "(null: none)")
    max_html_bytes: int | None = Field(None, ge=1, description="pages larger than this (UTF-8 "
                                                               "bytes) are dropped as too_large")
    save_dropped: bool = Field(False, description="side output 'dropped' with the dropped rows")
    keep_html: bool = Field(False, description="keep the html column after extraction (by default "
                                               "it is dropped: 40-90 KB per row carried by every "
                                               "later step; dropped rows keep it in _dropped/)")
    drop_headerlinks: bool = Field(True, description="remove permalink anchors (Sphinx's ¶, "
                                                     "class headerlink) before extraction, so that "
                                                     "titles and headings do not end in ¶")
    keep_code_in_lists: bool = Field(True, description="render lists whose items hold a <pre> code "
                                                       "block as plain blocks, so trafilatura keeps "
                                                       "the code's lines (it joins a list item onto "
                                                       "one line)")

    @field_validator("metadata_fields")
    @classmethod
    def _known_fields(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(META_FIELDS))
        if unknown:
            raise ValueError(f"unknown metadata field(s) {unknown}; known: {list(META_FIELDS)}")
        return v


class ExtractionTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that no ``except Exception`` inside
    trafilatura/htmldate/lxml swallows it."""


def _on_alarm(signum, frame):  # noqa: ARG001
    raise ExtractionTimeout()


class _TimeLimit:
    """Per-call wall-clock limit with SIGALRM, installed for one batch."""

    _warned = False

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.active = False
        self._old = None

    def __enter__(self) -> "_TimeLimit":
        if not self.seconds:
            return self
        reason = None
        if not hasattr(signal, "setitimer") or not hasattr(signal, "SIGALRM"):
            reason = "this platform has no SIGALRM/setitimer"
        elif threading.current_thread() is not threading.main_thread():
            reason = "not running in the main thread"
        elif signal.getitimer(signal.ITIMER_REAL)[0] > 0:
            reason = "a real-time timer is already armed in this process"
        if reason:
            if not _TimeLimit._warned:
                log.warning("extract_html: no per-page time limit (%s)", reason)
                _TimeLimit._warned = True
            return self
        self._old = signal.signal(signal.SIGALRM, _on_alarm)
        self.active = True
        return self

    def call(self, fn, *args):
        if not self.active:
            return fn(*args)
        # After the limit the alarm repeats every 50 ms: a library that swallows one interruption
        # (a callback from C code, a broad except) is interrupted again until control is back here.
        signal.setitimer(signal.ITIMER_REAL, self.seconds, 0.05)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old if self._old is not None else signal.SIG_DFL)
            self.active = False


def _json_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    return v if isinstance(v, (str, int, float, bool)) else str(v)


@register
class ExtractHtml(FilterStage):
    """Main text and metadata of HTML pages (trafilatura), with a per-page time limit."""

    name = "extract_html"
    preload = ("trafilatura",)
    # jusText (inside trafilatura) imports lxml.html.clean, a separate package since lxml 5.2
    requires = ("trafilatura", "lxml.html.clean")
    Config = ExtractHtmlConfig
    reads = ("{html_column}",)
    writes = {"text": pa.string(), "title": pa.string(), "date": pa.string(), "metadata": pa.string()}
    resources = Resources(cpus=1.0)

    def setup(self) -> None:
        import trafilatura  # noqa: F401 - import once per worker (loads lxml, htmldate, justext)
        from trafilatura.settings import DEFAULT_CONFIG

        self._tconfig = DEFAULT_CONFIG
        self._date_params = None
        if self.config.date_extensive_search is not None:
            from trafilatura.settings import set_date_params

            self._date_params = set_date_params(self.config.date_extensive_search)

    # -- one page ----------------------------------------------------------------------------------
    def _options(self, url: str | None):
        from trafilatura.settings import Extractor

        c = self.config
        return Extractor(config=self._tconfig, output_format=c.output_format, fast=c.fast,
                         precision=c.favor_precision, recall=c.favor_recall,
                         comments=c.include_comments, formatting=c.include_formatting,
                         links=c.include_links, images=False, tables=c.include_tables,
                         dedup=c.deduplicate, lang=c.target_language, url=url,
                         with_metadata=c.with_metadata, date_params=self._date_params)

    def extract_one(self, html: str, url: str | None) -> tuple[str | None, dict]:
        """(text or None, metadata) of one page, exactly as trafilatura.extract gives the text."""
        from trafilatura.core import bare_extraction, determine_returnstring

        opts = self._options(url)
        if self.config.drop_headerlinks and "headerlink" in html:
            html = _HEADERLINK.sub("", html)
        page = html
        if self.config.keep_code_in_lists and has_code_in_list(html):
            from trafilatura.utils import load_html

            tree = load_html(html)
            if tree is not None and unlist_code_blocks(tree):
                self.count("extract_html/code_lists_unlisted")
                page = tree
        doc = bare_extraction(page, options=opts)
        if doc is None:
            return None, {}
        opts.with_metadata = False  # serialise the body only (no metadata header)
        text = determine_returnstring(doc, opts)
        meta: dict[str, Any] = {}
        if self.config.with_metadata:
            for f in self.config.metadata_fields:
                v = getattr(doc, f, None)
                if v not in (None, "", [], ()):
                    meta[f] = _json_value(v)
            m = _HTML_LANG.search(html, 0, 4096)
            if m:
                meta["html_lang"] = m.group(1).lower().replace("_", "-")
        return text, meta

    # -- a batch -----------------------------------------------------------------------------------
    def _html_values(self, table: pa.Table) -> list[str | None]:
        col = table.column(self.config.html_column)
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t):
            return col.to_pylist()
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            from curate.ingest.charset import decode_bytes

            out: list[str | None] = []
            for v in col.to_pylist():
                if v is None:
                    out.append(None)
                    continue
                d = decode_bytes(v)
                self.count(f"extract_html/decoded/{d.how}")
                if d.replaced:
                    self.count("extract_html/non_utf8")
                out.append(d.text)
            return out
        raise StageError(f"extract_html: column {self.config.html_column!r} has type {t}; "
                         "expected string or binary HTML")

    def annotate(self, table: pa.Table) -> pa.Table:
        c = self.config
        n = table.num_rows
        names = table.schema.names
        htmls = self._html_values(table) if n else []
        urls = (table.column(c.url_column).cast(pa.string()).to_pylist()
                if c.url_column in names and n else [None] * n)
        old_text = table.column("text").to_pylist() if "text" in names else [None] * n
        metas_in = table.column("metadata").to_pylist() if "metadata" in names else [None] * n
        ids = table.column("id").to_pylist() if "id" in names else [None] * n

        texts: list[str | None] = []
        titles: list[str | None] = []
        dates: list[str | None] = []
        metas: list[str] = []
        self._reasons: list[str | None] = []
        with _TimeLimit(c.timeout_s) as limit, LibraryLogs(self, _LIBRARY_LOGGERS) as library_logs:
            for i in range(n):
                library_logs.doc_id = ids[i]
                html, reason, meta = htmls[i], None, {}
                text = None
                if html is None or not html.strip():
                    if old_text[i]:
                        text = old_text[i]  # a text row: pass through
                        self.count("extract_html/passthrough_text")
                    else:
                        reason = "empty_html"
                elif c.max_html_bytes and len(html) > c.max_html_bytes and \
                        len(html.encode("utf-8", "replace")) > c.max_html_bytes:
                    reason = "too_large"
                else:
                    if "\ufffd" in html and not pa.types.is_binary(table.schema.field(c.html_column).type):
                        self.count("extract_html/non_utf8")
                    try:
                        text, meta = limit.call(self.extract_one, html, urls[i])
                    except ExtractionTimeout:
                        self.error("timeout", doc_id=ids[i], detail=f"> {c.timeout_s}s")
                        reason = "timeout"
                    except Exception as exc:  # noqa: BLE001 - one broken page is not fatal
                        self.error(f"parse/{type(exc).__name__}", doc_id=ids[i],
                                   detail=str(exc)[:200])
                        reason = "parse_error"
                    else:
                        self.count("extract_html/chars_in", len(html))
                        if not text or not text.strip():
                            text, reason = None, "no_content"
                        else:
                            self.count("extract_html/chars_out", len(text))
                self._reasons.append(reason)
                texts.append(text if reason is None else (old_text[i] or ""))
                titles.append(meta.get("title"))
                dates.append(meta.get("date"))
                metas.append(self._merge_meta(metas_in[i], meta))

        out = table
        for name, values in (("text", texts), ("title", titles), ("date", dates), ("metadata", metas)):
            if name == "title" or name == "date":
                if not c.with_metadata:
                    continue
            out = set_column(out, name, pa.array(values, pa.string()))
        return out

    @staticmethod
    def _merge_meta(old: str | None, found: dict) -> str:
        if not found:
            return old if old is not None else "{}"
        try:
            base = json.loads(old) if old else {}
            if not isinstance(base, dict):
                base = {"source_metadata": base}
        except (TypeError, ValueError):
            base = {"source_metadata": old}
        found = dict(found)
        if "url" in found:
            found["page_url"] = found.pop("url")
        for k, v in found.items():
            base.setdefault(k, v)
        return json.dumps(base, ensure_ascii=False, sort_keys=True)

    def removes(self) -> tuple[str, ...]:
        return () if self.config.keep_html else (self.config.html_column,)

    def process(self, table: pa.Table) -> pa.Table:
        out = super().process(table)
        c = self.config
        if not c.keep_html and c.html_column in out.schema.names:
            out = out.drop_columns([c.html_column])
        return out

    def keep(self, table: pa.Table):
        reasons = self._reasons
        return [r is None for r in reasons], reasons
