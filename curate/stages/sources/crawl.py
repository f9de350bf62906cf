"""``crawl``: a focused, polite, resumable web crawler that emits raw HTML pages.

The crawl starts from ``seeds`` and follows only ``http(s)`` links inside an allow-list (domains
and/or URL prefixes; by default the seeds' hosts). It obeys ``robots.txt`` (and its Crawl-delay),
keeps a per-host delay between requests, fetches at most ``concurrency`` pages at once with
``httpx.AsyncClient``, stops reading a body at ``max_response_bytes``, skips non-HTML content
types, and de-duplicates URLs after normalisation (``curate.ingest.urls.normalize_url``).

**Determinism.** The frontier is walked breadth-first, one depth level at a time, each level in URL
order; links found on level *d* form level *d+1* only after level *d* is finished. So the set of
pages fetched from a given site does not depend on timing or concurrency (when ``max_pages`` is hit,
the last level is cut in URL order). The output rows are ordered by (depth, url).

**State and resume.** Frontier, visited set (with status, outcome and fetch time) and stored pages
live in a SQLite file in the stage's work folder (``state_dir`` option, else the runner's workdir,
else a temporary folder for library calls). Every page is committed on its own, so a crawl killed
at any point resumes where it stopped: finished pages are re-emitted from the state without being
fetched again, and the frontier continues. Counters are derived from the state, so they describe
the whole crawl even after a resume. Raising ``max_pages``/``max_depth`` later continues the same
crawl; changing seeds or the allow-list starts a new one (another state file).

Rows: ``id`` (make_id(url)), ``source`` (= url), ``html`` (decoded with the detected charset),
``text`` ("" - ``extract_html`` fills it), ``metadata`` (JSON: status, content_type, charset,
fetched_at, depth, via, seconds), ``url``, ``status`` (int32), ``fetched_at`` (timestamp, UTC).
A side output ``fetch_log`` lists every URL the crawl decided on (fetched or not) with its outcome.

This module is the adapter (options, rows, counters); robots.txt, fetching and the SQLite frontier
are ``curate.ingest.crawler``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import zlib
from typing import Iterator

import pyarrow as pa
from pydantic import Field, field_validator

from curate.ingest.charset import decode_bytes
from curate.ingest.crawler import (HTML_TYPES, SKIP_EXTENSIONS, Crawler, connect, extract_links,  # noqa: F401
                                   lock_file, parse_iso, run_coroutine)
from curate.ingest.urls import Allowlist, host_of, normalize_url
from curate.pipeline.api import (WEB_DOC_SCHEMA, Resources, SourceStage, StageConfig, StageError, Task, dumps_meta,
                                 make_id, register)

OUTPUT_SCHEMA = WEB_DOC_SCHEMA


class CrawlConfig(StageConfig):
    seeds: list[str] = Field(description="start URLs (http/https)")
    allowed_domains: list[str] = Field(
        default_factory=list,
        description="hosts the crawl may fetch (a domain allows its sub-domains). When both this and "
                    "allowed_prefixes are empty, the seeds' hosts are used")
    allowed_prefixes: list[str] = Field(
        default_factory=list, description="URL prefixes the crawl may fetch (combined with domains by AND)")
    max_pages: int = Field(1000, ge=1, description="maximum number of page requests (any outcome; "
                                                   "robots.txt requests not counted)")
    max_depth: int = Field(3, ge=0, description="link hops from a seed (seeds are depth 0)")
    concurrency: int = Field(4, ge=1, le=256, description="pages fetched at the same time")
    per_host_delay: float = Field(1.0, ge=0, description="seconds between request starts to one host "
                                                         "(a larger robots.txt Crawl-delay wins, capped at 60)")
    timeout: float = Field(30.0, gt=0, description="seconds allowed for one whole request (connect+body)")
    max_response_bytes: int = Field(5_000_000, ge=1024, description="larger bodies are dropped (dropped/too_large)")
    user_agent: str = Field("curate-crawler/0.1",
                            description="User-Agent header (add a contact URL for real crawls); its first "
                                      "token is matched in robots.txt")
    obey_robots: bool = Field(True, description="obey robots.txt (only disable for sites you own)")
    content_types: list[str] = Field(default_factory=lambda: list(HTML_TYPES),
                                     description="accepted MIME types; others are dropped/content_type")
    skip_extensions: list[str] = Field(default_factory=lambda: list(SKIP_EXTENSIONS),
                                       description="links whose path ends with one of these are not fetched")
    max_redirects: int = Field(5, ge=0, description="redirect hops followed from one link")
    retries: int = Field(1, ge=0, description="extra attempts after a timeout, connection error, 429 or 5xx")
    state_dir: str | None = Field(None, description="folder for the crawl state (default: the runner's "
                                                     "workdir; a temporary folder for library calls)")
    trust_env: bool = Field(True, description="use proxy settings from the environment (HTTP_PROXY...)")
    fetch_log: bool = Field(True, description="emit the side output 'fetch_log' (one row per URL decided on)")
    batch_size: int = Field(256, ge=1, description="rows per emitted table")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one seed URL is needed")
        bad = [s for s in v if normalize_url(s) is None]
        if bad:
            raise ValueError(f"seeds must be absolute http(s) URLs; not: {bad}")
        return v

    @field_validator("skip_extensions")
    @classmethod
    def _exts(cls, v: list[str]) -> list[str]:
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in v]


@register
class Crawl(SourceStage):
    """Crawl web pages from seed URLs inside an allow-list (robots.txt, delays, resume); raw HTML."""

    name = "crawl"
    Config = CrawlConfig
    writes = {f.name: f.type for f in OUTPUT_SCHEMA}
    output_schema = OUTPUT_SCHEMA
    resources = Resources(cpus=1.0)

    # -- options -----------------------------------------------------------------------------------
    def _allowlist(self) -> Allowlist:
        cfg = self.config
        domains, prefixes = list(cfg.allowed_domains), list(cfg.allowed_prefixes)
        if not domains and not prefixes:
            domains = sorted({host_of(normalize_url(s)) for s in cfg.seeds})
        return Allowlist(domains, prefixes)

    def _scope_key(self) -> str:
        """What identifies one crawl: seeds and allow-list (limits may change and continue it)."""
        cfg = self.config
        allow = self._allowlist()
        blob = json.dumps({"seeds": sorted(normalize_url(s) for s in cfg.seeds), "domains": allow.domains,
                           "prefixes": allow.prefixes}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check(self) -> list[tuple[str, str]]:
        allow = self._allowlist()
        outside = [s for s in self.config.seeds if not allow.allows(normalize_url(s))]
        return [("seeds", f"seed(s) outside the allow-list: {outside}")] if outside else []

    def tasks(self) -> list[Task]:
        return [Task(id=f"crawl-{self._scope_key()}", payload=None)]

    # -- state -------------------------------------------------------------------------------------
    def _state_path(self, folder: str) -> str:
        return os.path.join(folder, f"crawl-{self._scope_key()}.sqlite")

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        return connect(path)

    # -- source ------------------------------------------------------------------------------------
    def read(self, task: Task) -> Iterator[pa.Table]:
        folder = self.config.state_dir or self.workdir
        tmp = None
        if not folder:
            tmp = folder = tempfile.mkdtemp(prefix="curate-crawl-")
        os.makedirs(folder, exist_ok=True)
        path = self._state_path(folder)
        lock = lock_file(path + ".lock", self.step_name)
        crawler = Crawler(self.config, self._allowlist(), self.step_name)
        try:
            db = self._connect(path)
            try:
                crawler.init_state(db)
            finally:
                db.close()
            run_coroutine(crawler.crawl(path))
            db = self._connect(path)
            try:
                yield from self._emit(db)
            finally:
                db.close()
        finally:
            lock.close()  # releases the lock
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    # -- output ------------------------------------------------------------------------------------
    def _emit(self, db: sqlite3.Connection) -> Iterator[pa.Table]:
        for outcome, n in db.execute("SELECT outcome, COUNT(*) FROM urls WHERE state='done' GROUP BY outcome"):
            self.count(outcome, n)
        requested = db.execute("SELECT COUNT(*) FROM urls WHERE requested=1").fetchone()[0]
        self.count("crawl/pages_requested", requested)
        left = db.execute("SELECT COUNT(*) FROM urls WHERE state='queued'").fetchone()[0]
        self.count("crawl/frontier_left", left)
        for k, n in db.execute("SELECT key, n FROM counters"):
            self.count(k, n)
        log_rows = [] if not self.config.fetch_log else db.execute("SELECT url, depth, via, state, requested, status, fetched_at, outcome, "
                              "content_type, seconds FROM urls ORDER BY depth, url").fetchall()
        if log_rows:
            cols = list(zip(*log_rows))
            self.side("fetch_log", pa.table({
                "url": pa.array(cols[0], pa.string()), "depth": pa.array(cols[1], pa.int32()),
                "via": pa.array(cols[2], pa.string()), "state": pa.array(cols[3], pa.string()),
                "requested": pa.array([bool(x) for x in cols[4]], pa.bool_()),
                "status": pa.array(cols[5], pa.int32()),
                "fetched_at": pa.array([parse_iso(x) for x in cols[6]], pa.timestamp("us", tz="UTC")),
                "outcome": pa.array(cols[7], pa.string()), "content_type": pa.array(cols[8], pa.string()),
                "seconds": pa.array(cols[9], pa.float64())}))
        cur = db.execute("SELECT url, depth, status, fetched_at, content_type, via, seconds, body "
                         "FROM pages ORDER BY depth, url")
        while True:
            rows = cur.fetchmany(self.config.batch_size)
            if not rows:
                break
            yield self._table(rows)

    def _table(self, rows: list[tuple]) -> pa.Table:
        ids, htmls, metas, urls, statuses, times = [], [], [], [], [], []
        for url, depth, status, fetched_at, ctype, via, seconds, body in rows:
            raw = zlib.decompress(body)
            dec = decode_bytes(raw, ctype, html=True)
            if dec.replaced:
                self.error("decode", doc_id=url, detail=f"bytes not valid {dec.charset}; replaced")
            ids.append(make_id(url))
            htmls.append(dec.text)
            urls.append(url)
            statuses.append(status)
            times.append(parse_iso(fetched_at))
            metas.append(dumps_meta({"status": status, "content_type": ctype, "charset": dec.charset,
                                     "charset_from": dec.how, "fetched_at": fetched_at, "depth": depth,
                                     "via": via, "seconds": seconds, "bytes": len(raw)}))
        n = len(rows)
        return pa.table([
            pa.array(ids, pa.string()), pa.array([""] * n, pa.string()), pa.array(urls, pa.string()),
            pa.array(metas, pa.string()), pa.array(htmls, pa.string()), pa.array(urls, pa.string()),
            pa.array(statuses, pa.int32()), pa.array(times, pa.timestamp("us", tz="UTC")),
        ], schema=OUTPUT_SCHEMA)


__all__ = ["Crawl", "CrawlConfig", "extract_links", "StageError"]
