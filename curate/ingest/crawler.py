"""The crawler behind the ``crawl`` stage: robots.txt, politeness (per-host delays, Crawl-delay),
fetching with httpx (size caps, content types, retries, redirects), link extraction and the SQLite
frontier (urls, pages, counters) that makes a crawl resumable.

``Crawler(options, allowlist, name)`` is driven by the stage: ``init_state(db)`` once per run,
then ``crawl(path)`` (a coroutine) until the budget or the frontier is spent. The stage reads the
finished pages back from the state (``pages`` table) and turns them into rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
import zlib
from datetime import datetime, timezone
from typing import Any
from urllib.robotparser import RobotFileParser

from curate.ingest.charset import decode_bytes
from curate.ingest.urls import Allowlist, normalize_url, origin_of, url_scheme

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



def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def parse_iso(s: str | None) -> datetime | None:
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


def connect(path: str) -> sqlite3.Connection:
    """The crawl state at ``path`` (created when new): WAL journal, the frontier's tables."""
    db = sqlite3.connect(path, timeout=60)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_DDL)
    return db


class Crawler:
    """One crawl over one state file: the frontier walk, robots.txt, per-host delays, fetching and
    the bookkeeping of each finished URL. ``config`` is the stage's options (``CrawlConfig``)."""

    def __init__(self, config: Any, allow: Allowlist, step_name: str):
        self.config, self._allow, self.step_name = config, allow, step_name

    def init_state(self, db: sqlite3.Connection) -> None:
        allow = self._allow
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
    async def crawl(self, path: str) -> None:
        import httpx

        cfg = self.config
        db = connect(path)
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


def _bump(db: sqlite3.Connection, key: str, n: int = 1) -> None:
    db.execute("INSERT INTO counters(key, n) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET n = n + ?", (key, n, n))


def lock_file(path: str, who: str) -> Any:
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


def run_coroutine(coro: Any) -> Any:
    """asyncio.run, also from code that already runs an event loop (then in a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()
