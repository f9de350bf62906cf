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
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import time
import zlib
from datetime import datetime, timezone
from typing import Any, Iterator
from urllib.robotparser import RobotFileParser

import pyarrow as pa
from pydantic import Field, field_validator

from curate.ingest.charset import decode_bytes
from curate.ingest.urls import Allowlist, host_of, normalize_url, origin_of, url_scheme
from curate.pipeline.schema import WEB_DOC_SCHEMA, dumps_meta, make_id
from curate.pipeline.stage import Resources, SourceStage, StageConfig, StageError, Task, register

log = logging.getLogger("curate")

HTML_TYPES = ["text/html", "application/xhtml+xml"]
SKIP_EXTENSIONS = [
    ".7z", ".avi", ".bin", ".bmp", ".bz2", ".css", ".csv", ".doc", ".docx", ".dmg", ".eot", ".exe",
    ".flac", ".gif", ".gz", ".ico", ".iso", ".jar", ".jpeg", ".jpg", ".js", ".json", ".m4a", ".mkv",
    ".mov", ".mp3", ".mp4", ".mpeg", ".ogg", ".otf", ".pdf", ".png", ".ppt", ".pptx", ".rar", ".rss",
    ".svg", ".tar", ".tgz", ".tif", ".tiff", ".ttf", ".wav", ".webm", ".webp", ".woff", ".woff2",
    ".xls", ".xlsx", ".xml", ".xz", ".zip", ".zst",
]
ROBOTS_MAX_BYTES = 512 * 1024
MAX_CRAWL_DELAY = 60.0

OUTPUT_SCHEMA = WEB_DOC_SCHEMA

_DDL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS urls(
    url TEXT PRIMARY KEY,
    depth INTEGER NOT NULL,
    hops INTEGER NOT NULL DEFAULT 0,     -- redirects followed to reach this url
    via TEXT,                            -- page that linked/redirected here
    state TEXT NOT NULL,                 -- queued | done
    requested INTEGER NOT NULL DEFAULT 0,-- an HTTP request was made (counts toward max_pages)
    status INTEGER,
    fetched_at TEXT,
    outcome TEXT,                        -- a counter key: crawl/pages_html, dropped/..., errors/...
    content_type TEXT,
    seconds REAL
);
CREATE INDEX IF NOT EXISTS urls_frontier ON urls(state, depth, url);
CREATE TABLE IF NOT EXISTS pages(
    url TEXT PRIMARY KEY,
    depth INTEGER NOT NULL,
    status INTEGER NOT NULL,
    fetched_at TEXT NOT NULL,
    content_type TEXT,
    via TEXT,
    seconds REAL,
    body BLOB NOT NULL                   -- zlib-compressed raw bytes
);
CREATE TABLE IF NOT EXISTS counters(key TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""


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


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _parse_iso(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None


def _looks_like_html(body: bytes) -> bool:
    head = body[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--")) or b"<html" in head


_XML_DECLARATION = re.compile(r"^\ufeff?\s*<\?xml[^>]*\?>")


def parse_html_text(html: str):
    """The lxml document of an already decoded page. An XML declaration (``<?xml version="1.0"
    encoding="UTF-8"?>``, as XHTML/DocBook pages start) is removed first: lxml refuses a str that
    declares an encoding, and the text is decoded already. Raises on a document lxml cannot parse."""
    import lxml.html

    return lxml.html.document_fromstring(_XML_DECLARATION.sub("", html, count=1))


def extract_links(html: str, base_url: str) -> tuple[list[tuple[str, str]], bool]:
    """([(href, base url to resolve it against)] of the <a>/<area> elements, nofollow) of a page;
    honours <base href>, rel=nofollow and ``<meta name=robots content=nofollow>``. An empty page has
    no links; a page lxml cannot parse raises (the crawler counts it under ``errors/links/``)."""
    if not _XML_DECLARATION.sub("", html, count=1).strip():
        return [], False
    doc = parse_html_text(html)
    for meta in doc.xpath("//meta[@name]"):
        if (meta.get("name") or "").lower() == "robots" and "nofollow" in (meta.get("content") or "").lower():
            return [], True
    base = base_url
    bases = doc.xpath("//base/@href")
    if bases:
        base = normalize_url(str(bases[0]), base_url) or base_url
    out = []
    for el in doc.xpath("//a[@href] | //area[@href]"):
        rel = (el.get("rel") or "").lower().split()
        if "nofollow" in rel:
            continue
        out.append((str(el.get("href")), base))
    return out, False


def robots_crawl_delay(robots_txt: str, user_agent: str) -> float | None:
    """The Crawl-delay (seconds, fractions allowed) robots.txt asks of ``user_agent`` (or of ``*``).
    ``urllib.robotparser`` only understands whole numbers; this reads the group rules the same way."""
    token = user_agent.split("/")[0].strip().lower()
    delays: dict[str, float] = {}
    agents: list[str] = []
    in_rules = False
    for line in robots_txt.splitlines():
        line = line.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        key, value = (x.strip() for x in line.split(":", 1))
        key = key.lower()
        if key == "user-agent":
            if in_rules:
                agents, in_rules = [], False
            agents.append(value.lower())
        elif key == "crawl-delay":
            in_rules = True
            try:
                d = float(value)
            except ValueError:
                continue
            for a in agents:
                delays.setdefault(a, d)
        elif key in ("allow", "disallow"):
            in_rules = True
    for a, d in delays.items():
        if a != "*" and a in token:
            return d
    return delays.get("*")


class _Result:
    __slots__ = ("status", "content_type", "body", "outcome", "location", "detail", "fetched_at", "seconds")

    def __init__(self, outcome: str, status: int | None = None, content_type: str = "",
                 body: bytes | None = None, location: str | None = None, detail: str = ""):
        self.outcome, self.status, self.content_type = outcome, status, content_type
        self.body, self.location, self.detail = body, location, detail
        self.fetched_at, self.seconds = "", 0.0


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
        db = sqlite3.connect(path, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_DDL)
        return db

    # -- source ------------------------------------------------------------------------------------
    def read(self, task: Task) -> Iterator[pa.Table]:
        folder = self.config.state_dir or self.workdir
        tmp = None
        if not folder:
            tmp = folder = tempfile.mkdtemp(prefix="curate-crawl-")
        os.makedirs(folder, exist_ok=True)
        path = self._state_path(folder)
        lock = _lock_file(path + ".lock", self.step_name)
        try:
            db = self._connect(path)
            try:
                self._init_state(db)
            finally:
                db.close()
            _run_coroutine(self._crawl(path))
            db = self._connect(path)
            try:
                yield from self._emit(db)
            finally:
                db.close()
        finally:
            lock.close()  # releases the lock
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    def _init_state(self, db: sqlite3.Connection) -> None:
        allow = self._allowlist()
        with db:
            old = db.execute("SELECT value FROM meta WHERE key='scope'").fetchone()
            if old is None:
                db.execute("INSERT INTO meta VALUES('scope', ?)", (json.dumps({
                    "seeds": self.config.seeds, "domains": allow.domains, "prefixes": allow.prefixes}),))
            else:
                done = db.execute("SELECT COUNT(*) FROM urls WHERE requested=1").fetchone()[0]
                log.info("%s: resuming the crawl state (%d pages requested before)", self.step_name, done)
            for s in self.config.seeds:
                u = normalize_url(s)
                if not allow.allows(u):
                    log.warning("%s: seed %s is outside the allow-list; not fetched", self.step_name, u)
                    _bump(db, "dropped/seed_outside_allowlist")
                    continue
                db.execute("INSERT OR IGNORE INTO urls(url, depth, state) VALUES(?, 0, 'queued')", (u,))
            # max_depth grew since the last run: the stored pages at the old limit had their links
            # ignored; read them from the stored bodies now (no refetch)
            row = db.execute("SELECT value FROM meta WHERE key='max_depth'").fetchone()
            old_depth = int(row[0]) if row else self.config.max_depth
            if self.config.max_depth > old_depth:
                self._allow = allow
                cur = db.execute("SELECT url, depth, content_type, body FROM pages WHERE depth >= ? AND depth < ?",
                                 (old_depth, self.config.max_depth))
                for url, depth, ctype, body in cur.fetchall():
                    new: list = []
                    bumps: dict[str, int] = {}
                    self._links_of(url, depth, zlib.decompress(body), ctype, new, bumps)
                    db.executemany("INSERT OR IGNORE INTO urls(url, depth, hops, via, state) "
                                   "VALUES(?,?,?,?,'queued')", new)
                    for k, n in bumps.items():
                        _bump(db, k, n)
            db.execute("INSERT OR REPLACE INTO meta VALUES('max_depth', ?)",
                       (str(max(old_depth, self.config.max_depth)),))

    async def _crawl(self, path: str) -> None:
        import httpx

        cfg = self.config
        db = self._connect(path)
        self._allow = self._allowlist()
        self._robots: dict[str, RobotFileParser | None] = {}
        self._robots_lock = asyncio.Lock()
        self._host_locks: dict[str, asyncio.Lock] = {}
        self._next_time: dict[str, float] = {}
        self._delays: dict[str, float] = {}
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        try:
            async with httpx.AsyncClient(headers={"User-Agent": cfg.user_agent}, follow_redirects=False,
                                         timeout=httpx.Timeout(cfg.timeout), limits=limits,
                                         trust_env=cfg.trust_env) as client:
                while True:
                    requested = db.execute("SELECT COUNT(*) FROM urls WHERE requested=1").fetchone()[0]
                    budget = cfg.max_pages - requested
                    if budget <= 0:
                        break
                    depth = db.execute("SELECT MIN(depth) FROM urls WHERE state='queued'").fetchone()[0]
                    if depth is None:
                        break
                    level = db.execute("SELECT url, hops, via FROM urls WHERE state='queued' AND depth=? "
                                       "ORDER BY url", (depth,)).fetchall()
                    batch = []
                    for url, hops, via in level:
                        if len(batch) >= budget:
                            break
                        if cfg.obey_robots and not await self._robots_allow(client, url):
                            with db:
                                db.execute("UPDATE urls SET state='done', outcome='dropped/robots' WHERE url=?",
                                           (url,))
                            continue
                        batch.append((url, hops, via))
                    if batch:
                        await self._fetch_level(client, db, depth, batch)
        finally:
            db.close()

    async def _fetch_level(self, client: Any, db: sqlite3.Connection, depth: int,
                           batch: list[tuple[str, int, str | None]]) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for item in batch:
            queue.put_nowait(item)

        async def worker() -> None:
            while True:
                try:
                    url, hops, via = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                res = await self._fetch_with_retries(client, url)
                self._record(db, url, depth, hops, via, res.fetched_at, res.seconds, res)

        await asyncio.gather(*(worker() for _ in range(min(self.config.concurrency, len(batch)))))

    # -- politeness --------------------------------------------------------------------------------
    async def _wait_turn(self, url: str) -> None:
        host = origin_of(url)
        lock = self._host_locks.setdefault(host, asyncio.Lock())
        async with lock:
            loop = asyncio.get_running_loop()
            wait = self._next_time.get(host, 0.0) - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next_time[host] = loop.time() + self._delays.get(host, self.config.per_host_delay)

    async def _robots_allow(self, client: Any, url: str) -> bool:
        origin = origin_of(url)
        if origin not in self._robots:
            async with self._robots_lock:
                if origin not in self._robots:
                    self._robots[origin] = await self._load_robots(client, origin)
        rp = self._robots[origin]
        return True if rp is None else rp.can_fetch(self.config.user_agent, url)

    async def _load_robots(self, client: Any, origin: str) -> RobotFileParser | None:
        """The parsed robots.txt of an origin; None = everything allowed (no robots.txt)."""
        rp = RobotFileParser(origin + "/robots.txt")
        status, text = None, ""
        for attempt in range(self.config.retries + 1):
            await self._wait_turn(origin + "/")
            try:
                r = await asyncio.wait_for(client.get(origin + "/robots.txt", follow_redirects=True),
                                           self.config.timeout)
                status, text = r.status_code, r.content[:ROBOTS_MAX_BYTES].decode("utf-8", "replace")
                if status < 500:
                    break
            except Exception as exc:  # noqa: BLE001 - unreachable robots.txt: handled below
                status, text = None, repr(exc)
        if status is not None and 200 <= status < 300:
            rp.parse(text.splitlines())
            rp.modified()
            delay = rp.crawl_delay(self.config.user_agent) or robots_crawl_delay(text, self.config.user_agent)
            if delay:
                self._delays[origin] = max(self.config.per_host_delay, min(float(delay), MAX_CRAWL_DELAY))
            return rp
        if status is not None and status in (401, 403):
            log.warning("%s: %s/robots.txt answered %s: nothing is fetched there", self.step_name, origin, status)
            rp.disallow_all = True
            return rp
        if status is not None and 400 <= status < 500:
            return None
        # 5xx or unreachable: assume a temporary full disallow (as the robots.txt RFC 9309 says)
        log.warning("%s: %s/robots.txt unreachable (%s): nothing is fetched there",
                    self.step_name, origin, status if status is not None else text[:200])
        rp.disallow_all = True
        return rp

    # -- fetching ----------------------------------------------------------------------------------
    async def _fetch_with_retries(self, client: Any, url: str) -> _Result:
        res = _Result("errors/fetch/unknown")
        for attempt in range(self.config.retries + 1):
            if attempt:
                await asyncio.sleep(min(2.0 ** (attempt - 1), 10.0))
            await self._wait_turn(url)
            fetched_at, t0 = _now_iso(), time.monotonic()
            try:
                res = await asyncio.wait_for(self._fetch(client, url), self.config.timeout)
            except (asyncio.TimeoutError, TimeoutError):
                res = _Result("errors/fetch/timeout", detail=f"no complete answer in {self.config.timeout}s")
            except Exception as exc:  # noqa: BLE001 - any transport error is recorded for this URL
                name = type(exc).__name__
                if "Timeout" in name:
                    res = _Result("errors/fetch/timeout", detail=str(exc)[:200])
                else:
                    res = _Result(f"errors/fetch/{name}", detail=str(exc)[:200])
            res.fetched_at, res.seconds = fetched_at, time.monotonic() - t0
            retry = res.outcome.startswith("errors/fetch/") or (res.status is not None and (
                res.status == 429 or res.status >= 500))
            if not retry:
                break
        return res

    async def _fetch(self, client: Any, url: str) -> _Result:
        cfg = self.config
        async with client.stream("GET", url) as r:
            status = r.status_code
            ctype = r.headers.get("content-type", "")
            if 300 <= status < 400 and r.headers.get("location"):
                return _Result("crawl/redirects", status, ctype, location=r.headers["location"])
            if not 200 <= status < 300:
                return _Result("dropped/http_status", status, ctype)
            mime = ctype.split(";")[0].strip().lower()
            if mime and mime not in cfg.content_types:
                return _Result("dropped/content_type", status, ctype)
            length = r.headers.get("content-length")
            if length and length.isdigit() and int(length) > cfg.max_response_bytes:
                return _Result("dropped/too_large", status, ctype, detail=f"content-length {length}")
            buf = bytearray()
            async for chunk in r.aiter_bytes():
                buf += chunk
                if len(buf) > cfg.max_response_bytes:
                    return _Result("dropped/too_large", status, ctype,
                                   detail=f"more than {cfg.max_response_bytes} bytes")
            body = bytes(buf)
            if not mime and not _looks_like_html(body):
                return _Result("dropped/content_type", status, ctype, detail="no content-type, not HTML")
            return _Result("crawl/pages_html", status, ctype, body=body)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _record(self, db: sqlite3.Connection, url: str, depth: int, hops: int, via: str | None,
                fetched_at: str, seconds: float, res: _Result) -> None:
        """Commit one finished URL: its outcome, the page, and the URLs it leads to."""
        cfg = self.config
        if res.outcome.startswith("errors/"):
            log.warning("%s: %s: %s %s", self.step_name, url, res.outcome, res.detail)
        bumps: dict[str, int] = {}
        new: list[tuple[str, int, int, str]] = []
        outcome = res.outcome
        if res.outcome == "crawl/pages_html":
            self._links_of(url, depth, res.body, res.content_type, new, bumps)
        elif res.outcome == "crawl/redirects":
            if hops >= cfg.max_redirects:
                outcome = "dropped/too_many_redirects"
            else:
                self._consider(res.location, url, depth, hops + 1, url, new, bumps, redirect=True)
        with db:
            db.execute("UPDATE urls SET state='done', requested=1, status=?, fetched_at=?, outcome=?, "
                       "content_type=?, seconds=? WHERE url=?",
                       (res.status, fetched_at, outcome, res.content_type, round(seconds, 4), url))
            if res.outcome == "crawl/pages_html":
                db.execute("INSERT OR REPLACE INTO pages VALUES(?,?,?,?,?,?,?,?)",
                           (url, depth, res.status, fetched_at, res.content_type, via, round(seconds, 4),
                            zlib.compress(res.body, 6)))
            if new:
                db.executemany("INSERT OR IGNORE INTO urls(url, depth, hops, via, state) "
                               "VALUES(?,?,?,?,'queued')", new)
            for k, n in bumps.items():
                _bump(db, k, n)

    def _links_of(self, url: str, depth: int, body: bytes, ctype: str, new: list, bumps: dict[str, int]) -> None:
        if depth >= self.config.max_depth:
            return
        dec = decode_bytes(body, ctype, html=True)
        try:
            links, nofollow = extract_links(dec.text, url)
        except Exception as exc:  # noqa: BLE001 - counted and logged: the page is kept, its links are lost
            reason = type(exc).__name__
            key = f"errors/links/{reason}"
            bumps[key] = bumps.get(key, 0) + 1
            logged = self.__dict__.setdefault("_link_errors_logged", set())
            if reason not in logged:  # once per reason and crawl: the counter has the total
                logged.add(reason)
                log.warning("%s: links of %s cannot be parsed (%s: %s); counted under %s", self.step_name,
                            url, reason, str(exc)[:200], key)
            return
        if nofollow:
            bumps["crawl/pages_nofollow"] = bumps.get("crawl/pages_nofollow", 0) + 1
        for href, base in links:
            self._consider(href, base, depth + 1, 0, url, new, bumps)

    def _consider(self, href: str, base: str, depth: int, hops: int, via: str,
                  new: list, bumps: dict[str, int], redirect: bool = False) -> None:
        kind = "redirect" if redirect else "links"
        u = normalize_url(href, base)
        if u is None:
            scheme = url_scheme(href)
            if scheme and scheme not in ("http", "https"):
                key = f"crawl/{kind}/refused_scheme"
            else:
                key = f"crawl/{kind}/invalid"
            bumps[key] = bumps.get(key, 0) + 1
            return
        if not self._allow.allows(u):
            bumps[f"crawl/{kind}/outside_allowlist"] = bumps.get(f"crawl/{kind}/outside_allowlist", 0) + 1
            return
        path = u.split("?", 1)[0].lower()
        if not redirect and any(path.endswith(e) for e in self.config.skip_extensions):
            bumps["crawl/links/skipped_extension"] = bumps.get("crawl/links/skipped_extension", 0) + 1
            return
        new.append((u, depth, hops, via))

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
                "fetched_at": pa.array([_parse_iso(x) for x in cols[6]], pa.timestamp("us", tz="UTC")),
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
            times.append(_parse_iso(fetched_at))
            metas.append(dumps_meta({"status": status, "content_type": ctype, "charset": dec.charset,
                                     "charset_from": dec.how, "fetched_at": fetched_at, "depth": depth,
                                     "via": via, "seconds": seconds, "bytes": len(raw)}))
        n = len(rows)
        return pa.table([
            pa.array(ids, pa.string()), pa.array([""] * n, pa.string()), pa.array(urls, pa.string()),
            pa.array(metas, pa.string()), pa.array(htmls, pa.string()), pa.array(urls, pa.string()),
            pa.array(statuses, pa.int32()), pa.array(times, pa.timestamp("us", tz="UTC")),
        ], schema=OUTPUT_SCHEMA)



def _bump(db: sqlite3.Connection, key: str, n: int = 1) -> None:
    db.execute("INSERT INTO counters(key, n) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET n = n + ?", (key, n, n))


def _lock_file(path: str, who: str) -> Any:
    """Hold an exclusive lock on ``path`` (one crawl per state file: a second process - e.g. a
    worker orphaned by a killed run - would fetch the same pages). Waits for the other holder."""
    f = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process guard
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.warning("%s: another process is using the crawl state %s; waiting for it to finish", who, path)
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    return f


def _run_coroutine(coro: Any) -> Any:
    """asyncio.run, also from code that already runs an event loop (then in a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


__all__ = ["Crawl", "CrawlConfig", "extract_links", "StageError"]
