"""Batch mode of the openai engine (``mode: batch``): the provider's batch API instead of one HTTP
request per prompt.

A stream's requests are written as JSONL (one line per request: ``custom_id`` = the request-cache
key, ``method: POST``, ``url: /v1/chat/completions`` or ``/v1/completions``, ``body``), uploaded
with ``POST /files`` (``purpose=batch``; at most ``batch_max_requests`` lines and
``batch_max_bytes`` per file, more make several batches) and started with ``POST /batches``
(``completion_window``). Every batch is recorded in SQLite in the step's work folder
(``llm_batches.sqlite``: input file id, batch id, status, and which cache keys it holds) as soon
as its file is uploaded, before it is created and polled, so a run killed while it waits finds its
batches again: a resumed run first looks each request up in the records, polls the batches that
hold it, and uploads only the requests no live batch holds. ``GET /batches/{id}`` is polled every
``batch_poll_interval`` seconds; a finished batch's output file (and error file) are read line by
line, answers go to the request cache (also those of requests another process is waiting for).

What becomes of each request of a finished batch:

- a 200 line: its answer;
- a failed line (error file, or a non-200 ``status_code``): sent again in a new batch while the
  error may pass (HTTP 408/409/429/5xx, ``request_timeout``, ``server_error``) and fewer than
  ``max_retries`` new tries were made (counted ``llm/batch_line_retries``); then a failed request,
  transient (the row is deferred to the next run) when the error may pass, else failed (the
  stage's failure-rate rules apply to both);
- a request an ``expired`` batch did not reach: sent again in a new batch (``llm/batch_expired``);
  the lines it finished are used;
- a ``cancelled`` batch (cancelled outside the run: curate never cancels a batch, not even when a
  stage stops, so that a rerun can use it): its finished lines are used, the others fail
  transiently, so their rows are deferred and the next run submits them again;
- a ``failed`` batch (the provider rejected the whole file: unknown model, bad format): every
  request fails with the batch's errors and the stage stops at once (like an endpoint that looks
  misconfigured); the record is kept, a rerun uploads the requests again.

- a recorded batch the server answers 404 for (deleted, another account) while its batch API
  answers: forgotten (marked failed in the records), its requests go out again
  (``llm/batches_lost``).

Counted (stage counters ``llm/<name>``): ``batches`` (created), ``batch_requests`` (lines
uploaded), ``batches_resumed`` (batches of an earlier run polled again), ``batch_expired``,
``batch_line_retries``, ``batch_cancelled``, ``batches_lost``. The progress line shows each batch's status and its
``request_counts``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from typing import Any, Iterator

from curate.engines.base import Completion, Request, _Backend, _notify, before_send, cache_key
from curate.engines.openai_engine import RETRY_STATUS, build_body, parse_response

log = logging.getLogger("curate.engines")

TERMINAL = ("completed", "expired", "failed", "cancelled")
RETRY_CODES = {"request_timeout", "server_error", "rate_limit_exceeded", "internal_error", "timeout"}

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS batches (
        file_id TEXT PRIMARY KEY, batch_id TEXT, endpoint TEXT NOT NULL, status TEXT NOT NULL,
        n INTEGER NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, error TEXT)""",
    """CREATE TABLE IF NOT EXISTS members (
        file_id TEXT NOT NULL, key TEXT NOT NULL, outcome TEXT, PRIMARY KEY (file_id, key))""",
    "CREATE INDEX IF NOT EXISTS members_key ON members (key)",
)


class BatchRecords:
    """The batches of one step, in SQLite (``path``; in memory when None). An uploaded file is
    recorded with its keys before the batch is created (status ``uploaded``), then its batch id;
    each key gets its outcome (``ok``, ``error``, ``missing``) once the batch is finished. Several
    worker processes share the file."""

    def __init__(self, path: str | None):
        self.path = path
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            if self.path:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
            c = sqlite3.connect(self.path or ":memory:", timeout=60, isolation_level=None,
                                check_same_thread=False)
            if self.path:
                c.execute("PRAGMA journal_mode=WAL")
            for q in _SCHEMA:
                c.execute(q)
            self._conn, self._pid = c, os.getpid()
        return self._conn

    def _tx(self, fn: Any) -> Any:
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return out

    def add_file(self, file_id: str, endpoint: str, keys: list[str]) -> None:
        now = time.time()

        def fn(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO batches VALUES (?, NULL, ?, 'uploaded', ?, ?, ?, NULL)",
                       (file_id, endpoint, len(keys), now, now))
            db.executemany("INSERT OR IGNORE INTO members (file_id, key) VALUES (?, ?)",
                           [(file_id, k) for k in keys])
        self._tx(fn)

    def set_batch(self, file_id: str, batch_id: str | None, status: str, error: str | None = None) -> None:
        self._tx(lambda db: db.execute(
            "UPDATE batches SET batch_id = COALESCE(?, batch_id), status = ?, error = COALESCE(?, error), "
            "updated = ? WHERE file_id = ?", (batch_id, status, error, time.time(), file_id)))

    def set_outcomes(self, file_id: str, outcomes: dict[str, str]) -> None:
        self._tx(lambda db: db.executemany("UPDATE members SET outcome = ? WHERE file_id = ? AND key = ?",
                                           [(o, file_id, k) for k, o in outcomes.items()]))

    def covering(self, keys: list[str]) -> dict[str, str]:
        """key -> file id of a recorded batch that holds it and may still answer it (not finished
        yet, or finished with an answer for it)."""
        out: dict[str, str] = {}
        with self._lock:
            db = self._db()
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                q = ("SELECT m.key, m.file_id FROM members m JOIN batches b ON b.file_id = m.file_id "
                     f"WHERE m.key IN ({','.join('?' * len(chunk))}) AND b.status != 'failed' "
                     "AND (m.outcome IS NULL OR m.outcome = 'ok') ORDER BY b.created DESC")
                for k, f in db.execute(q, chunk).fetchall():
                    out.setdefault(k, f)
        return out

    def batch(self, file_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db().execute("SELECT file_id, batch_id, endpoint, status, n FROM batches WHERE file_id = ?",
                                     (file_id,)).fetchone()
        return dict(zip(("file_id", "batch_id", "endpoint", "status", "n"), row)) if row else None

    def members(self, file_id: str) -> list[str]:
        with self._lock:
            return [k for (k,) in self._db().execute("SELECT key FROM members WHERE file_id = ? ORDER BY rowid",
                                                     (file_id,))]

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db().execute("SELECT file_id, batch_id, endpoint, status, n FROM batches "
                                      "ORDER BY created").fetchall()
        return [dict(zip(("file_id", "batch_id", "endpoint", "status", "n"), r)) for r in rows]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class BatchError(Exception):
    """A batch API call failed for good (after retries where they may help)."""

    def __init__(self, message: str, unreachable: bool = False, retryable: bool = True):
        super().__init__(message)
        self.unreachable = unreachable
        self.retryable = retryable   # False: an HTTP 4xx answer, which a new try would not change


class BatchBackend(_Backend):
    """Where a stream sends requests in batch mode (see the module docstring). ``wait`` uploads
    what was submitted since the last call, then polls until a batch holding a submitted request
    finishes, and returns every answer it has then."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.config = engine.config
        self.pending: list[tuple[int, Request]] = []
        self.waiting: dict[str, list[tuple[int, Request]]] = {}   # key -> stream numbers waiting for it
        self.requests: dict[str, Request] = {}                    # key -> the request (for resubmits)
        self.tries: Counter[str] = Counter()                      # key -> new tries after failed lines
        self.active: dict[str, dict[str, Any]] = {}               # file id -> the batch polled
        self.ready: list[tuple[int, Completion]] = []
        self.counters: dict[str, int] = Counter()
        self._records: BatchRecords | None = None
        self._client: Any = None
        self._extra = engine.cache_extra()

    # -- plumbing --------------------------------------------------------------------------------------
    @property
    def store(self) -> BatchRecords:
        if self._records is None:
            self._records = BatchRecords(self.records)
            if self.records is None:
                log.warning("openai engine (mode: batch): no work folder or cache file: batches are recorded in "
                            "memory only, a killed run cannot find them again")
        return self._records

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            headers = {k: v for k, v in self.engine._headers().items() if k != "Content-Type"}
            kwargs: dict[str, Any] = {}
            if self.engine._transport is not None:
                kwargs["transport"] = self.engine._transport
            self._client = httpx.Client(base_url=self.config.base_url.rstrip("/"), headers=headers,
                                        timeout=httpx.Timeout(self.config.timeout), **kwargs)
        return self._client

    def _call(self, method: str, path: str, retries: int | None = None, **kwargs: Any) -> Any:
        """One batch API call, retried on network errors, 408/409/429 and 5xx (``max_retries``,
        exponential backoff); the response (2xx) or BatchError naming the URL."""
        import httpx

        cfg = self.config
        retries = cfg.max_retries if retries is None else retries
        delay = cfg.backoff
        url = self.engine.url(path)
        reason, retryable = "", True
        for attempt in range(retries + 1):
            if method == "POST":
                before_send()   # a runner's worker whose run is gone uploads nothing
            try:
                resp = self._http().request(method, path, **kwargs)
            except httpx.ConnectError as exc:
                reason, unreachable = f"cannot connect: {type(exc).__name__}: {exc}", True
            except httpx.TransportError as exc:
                reason, unreachable = f"network error: {type(exc).__name__}: {exc}", False
            else:
                st = resp.status_code
                if st < 400:
                    return resp
                text = " ".join(resp.text.split())[:200]
                reason, unreachable = f"HTTP {st}: {text}", st in (401, 403, 404)
                if not (st in RETRY_STATUS or st >= 500):
                    retryable = False
                    break
            if attempt < retries and not (unreachable and attempt >= 2):
                time.sleep(min(delay * (0.5 + random.random()), cfg.backoff_max))
                delay = min(delay * 2, cfg.backoff_max)
            else:
                break
        msg = f"{method} {url}: {reason}"
        if unreachable:
            msg += (f"; the batch API of {cfg.base_url} looks unreachable or misconfigured (check base_url, that the "
                    "server implements /v1/files and /v1/batches, the model name and api_key_env)")
        raise BatchError(msg, unreachable, retryable and not unreachable)

    def _key(self, request: Request) -> str:
        return cache_key(self.engine.kind, self.engine.model_id, request, self._extra)

    # -- the stream's side -----------------------------------------------------------------------------
    def covers(self, key: str) -> bool:
        return key in self.store.covering([key])

    def submit(self, number: int, request: Request) -> None:
        self.pending.append((number, request))

    def wait(self) -> list[tuple[int, Completion]]:
        if self.pending:
            self._dispatch()
        while not self.ready:
            if not self.active:
                if not self.waiting:
                    return []
                raise RuntimeError(f"openai batch mode: {len(self.waiting)} request(s) wait for no batch")
            if not self._poll():
                time.sleep(self.config.batch_poll_interval)
        out, self.ready = self.ready, []
        return out

    def close(self) -> None:
        """Batches still running are left running (a rerun polls them); nothing is cancelled."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._records is not None:
            self._records.close()

    # -- submitting ------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        todo, self.pending = self.pending, []
        fresh: list[str] = []
        for number, request in todo:
            key = self._key(request)
            if key not in self.waiting:
                fresh.append(key)
            self.waiting.setdefault(key, []).append((number, request))
            self.requests[key] = request
        covered = self.store.covering(fresh)
        for fid in dict.fromkeys(covered.values()):
            if fid not in self.active:
                self._track(fid)
        self._upload([k for k in fresh if k not in covered])

    def _track(self, file_id: str) -> None:
        """Poll a batch recorded by an earlier run (or another worker)."""
        rec = self.store.batch(file_id)
        if rec is None:
            return
        self.counters["batches_resumed"] += 1
        if rec["batch_id"] is None:   # uploaded, but killed before the batch id was recorded
            rec["batch_id"] = self._adopt(file_id, rec["endpoint"])
        log.info("openai engine (mode: batch): polling batch %s of an earlier run (%d requests, %s)",
                 rec["batch_id"], rec["n"], rec["status"])
        self.active[file_id] = rec

    def _adopt(self, file_id: str, endpoint: str) -> str:
        """The batch created from an uploaded file (found with GET /batches), or a new one."""
        return self._find(file_id) or self._create(file_id, endpoint)

    def _find(self, file_id: str) -> str | None:
        """The id of a batch made from ``file_id`` (GET /batches, newest first), recorded; or None."""
        after = None
        for _ in range(100):   # at most 10,000 batches back
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            page = self._call("GET", "/batches", params=params).json()
            for b in page.get("data") or []:
                if b.get("input_file_id") == file_id:
                    self.store.set_batch(file_id, b["id"], b.get("status") or "validating")
                    return b["id"]
            if not page.get("has_more") or not page.get("data"):
                break
            after = page["data"][-1]["id"]
        return None

    def _create(self, file_id: str, endpoint: str) -> str:
        """POST /batches, once per try: a try whose answer was lost (timeout, 5xx) may have created
        the batch, so before the next one the batch is looked for by its input file (a batch is
        paid for; a second one for the same requests would be paid twice)."""
        cfg = self.config
        body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": cfg.batch_completion_window,
                "metadata": {"created_by": "curate"}}
        delay = cfg.backoff
        for attempt in range(cfg.max_retries + 1):
            try:
                b = self._call("POST", "/batches", retries=0, json=body).json()
                break
            except BatchError as exc:
                if not exc.retryable or attempt >= cfg.max_retries:
                    raise
                time.sleep(min(delay * (0.5 + random.random()), cfg.backoff_max))
                delay = min(delay * 2, cfg.backoff_max)
                found = self._find(file_id)
                if found:
                    return found
        self.store.set_batch(file_id, b["id"], b.get("status") or "validating")
        self.counters["batches"] += 1
        return b["id"]

    def _upload(self, keys: list[str]) -> None:
        """Upload the requests of ``keys`` in as many batches as the limits need (one endpoint per
        batch), record each before it is created."""
        cfg = self.config
        groups: dict[str, list[tuple[str, bytes]]] = {}
        for key in keys:
            path, body = build_body(cfg.model, self.requests[key], cfg.extra_body)
            url = "/v1" + path
            line = json.dumps({"custom_id": key, "method": "POST", "url": url, "body": body},
                              ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"
            groups.setdefault(url, []).append((key, line))
        for url, lines in groups.items():
            chunk: list[tuple[str, bytes]] = []
            size = 0
            for key, line in lines:
                if chunk and (len(chunk) >= cfg.batch_max_requests or size + len(line) > cfg.batch_max_bytes):
                    self._submit_file(url, chunk)
                    chunk, size = [], 0
                chunk.append((key, line))
                size += len(line)
            if chunk:
                self._submit_file(url, chunk)

    def _submit_file(self, url: str, chunk: list[tuple[str, bytes]]) -> None:
        keys = [k for k, _ in chunk]
        try:
            f = self._call("POST", "/files", data={"purpose": "batch"},
                           files={"file": ("curate-batch.jsonl", b"".join(l for _, l in chunk), "application/jsonl")})
            file_id = f.json()["id"]
            self.store.add_file(file_id, url, keys)   # recorded before the batch exists
            batch_id = self._create(file_id, url)
        except BatchError as exc:
            # network trouble after the retries: the rows are deferred to the next run; an HTTP
            # 4xx (no batch API there, a file the provider refuses) stops the stage
            for k in keys:
                self._fail(k, str(exc), transient=exc.retryable, dead=not exc.retryable)
            return
        self.counters["batch_requests"] += len(keys)
        log.info("openai engine (mode: batch): batch %s: %d requests to %s", batch_id, len(keys), url)
        self.active[file_id] = {"file_id": file_id, "batch_id": batch_id, "endpoint": url,
                                "status": "validating", "n": len(keys)}

    # -- polling ---------------------------------------------------------------------------------------
    def _poll(self) -> bool:
        """Poll every active batch once; True when one finished (answers may be ready)."""
        finished = False
        for fid, rec in list(self.active.items()):
            try:
                b = self._call("GET", f"/batches/{rec['batch_id']}").json()
            except BatchError as exc:
                if "HTTP 404" in str(exc) and self._has_batch_api():
                    # the server has a batch API but not this batch (deleted, another account):
                    # forget it and send its requests again
                    self._forget(rec, str(exc))
                    finished = True
                    continue
                if not exc.unreachable:
                    log.warning("openai engine (mode: batch): polling %s: %s", rec["batch_id"], exc)
                    continue
                raise
            status = b.get("status") or "?"
            counts = b.get("request_counts") or {}
            _notify(self.engine, "batch", {"id": rec["batch_id"], "status": status,  # type: ignore[arg-type]
                                           "total": int(counts.get("total") or rec["n"]),
                                           "completed": int(counts.get("completed") or 0),
                                           "failed": int(counts.get("failed") or 0)})
            if status != rec["status"]:
                self.store.set_batch(fid, None, status)
                rec["status"] = status
            if status in TERMINAL:
                del self.active[fid]
                self._harvest(rec, b)
                finished = True
        return finished

    def _has_batch_api(self) -> bool:
        try:
            self._call("GET", "/batches", params={"limit": 1})
            return True
        except BatchError:
            return False

    def _forget(self, rec: dict[str, Any], reason: str) -> None:
        """A recorded batch the server does not know: marked failed in the records (no longer
        covers its requests) and the requests waiting for it go out in a new batch."""
        fid = rec["file_id"]
        del self.active[fid]
        log.warning("openai engine (mode: batch): batch %s is unknown to the server (%s); its requests go out "
                    "again", rec["batch_id"], reason)
        self.store.set_batch(fid, None, "failed", f"unknown to the server: {reason}")
        keys = self.store.members(fid)
        self.store.set_outcomes(fid, {k: "missing" for k in keys})
        still = self.store.covering([k for k in keys if k in self.waiting])   # held by another batch
        for f in dict.fromkeys(still.values()):
            if f not in self.active:
                self._track(f)
        again = [k for k in keys if k in self.waiting and k not in still]
        self.counters["batches_lost"] += 1
        if again:
            self._upload(again)

    def _lines(self, file_id: str | None) -> Iterator[dict[str, Any]]:
        if not file_id:
            return
        import httpx

        url = f"/files/{file_id}/content"
        try:
            with self._http().stream("GET", url) as resp:
                if resp.status_code >= 400:
                    log.warning("openai engine (mode: batch): GET %s: HTTP %d", self.engine.url(url), resp.status_code)
                    return
                for line in resp.iter_lines():
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            log.warning("openai engine (mode: batch): a malformed line in %s", file_id)
        except httpx.TransportError as exc:
            log.warning("openai engine (mode: batch): GET %s: %s", self.engine.url(url), exc)

    def _harvest(self, rec: dict[str, Any], b: dict[str, Any]) -> None:
        fid, status, batch_id = rec["file_id"], b.get("status"), rec["batch_id"]
        chat = rec["endpoint"].endswith("/chat/completions")
        keys = self.store.members(fid)
        if status == "failed":
            errs = ((b.get("errors") or {}).get("data") or [])
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" + (f" (line {e['line']})" if e.get("line") else "")
                               for e in errs[:3]) or "no reason given"
            msg = f"batch {batch_id} ({self.engine.url('/batches')}) failed: {detail}"
            log.error("openai engine (mode: batch): %s", msg)
            self.store.set_batch(fid, None, "failed", msg)
            self.store.set_outcomes(fid, {k: "error" for k in keys})
            for k in keys:
                self._fail(k, msg, transient=False, dead=True)
            return
        answers: dict[str, Completion] = {}
        errors: dict[str, tuple[str, bool]] = {}   # key -> (message, may pass on a new try)
        for line in self._lines(b.get("output_file_id")):
            self._line(line, chat, answers, errors)
        for line in self._lines(b.get("error_file_id")):
            self._line(line, chat, answers, errors)
        outcomes = {k: ("ok" if k in answers else "error" if k in errors else "missing") for k in keys}
        # answers for requests nobody here waits for (another worker's, an earlier run's): cached now
        others = {k: c.to_dict() for k, c in answers.items() if k not in self.waiting}
        if others and self.cache is not None:
            self.cache.put_many(others)
        self.store.set_outcomes(fid, outcomes)
        again: list[str] = []
        for k in keys:
            if k not in self.waiting:
                continue
            if k in answers:
                for number, _ in self.waiting.pop(k):
                    c = Completion(choices=list(answers[k].choices), prompt_tokens=answers[k].prompt_tokens)
                    self.ready.append((number, c))
            elif k in errors:
                msg, may_pass = errors[k]
                if may_pass and self.tries[k] < self.config.max_retries:
                    self.tries[k] += 1
                    self.counters["batch_line_retries"] += 1
                    again.append(k)
                else:
                    self._fail(k, f"batch {batch_id}: {msg}", transient=may_pass)
            elif status == "cancelled":
                self.counters["batch_cancelled"] += 1
                self._fail(k, f"batch {batch_id} was cancelled before this request ran (a rerun submits it again)",
                           transient=True)
            else:   # expired (or a finished batch without a line for it): a new batch
                if self.tries[k] >= self.config.max_retries + 3:
                    self._fail(k, f"batch {batch_id} ({status}) has no answer for this request after "
                                  f"{self.tries[k]} new tries", transient=True)
                    continue
                self.tries[k] += 1
                self.counters["batch_expired" if status == "expired" else "batch_line_retries"] += 1
                again.append(k)
        if status == "expired":
            log.warning("openai engine (mode: batch): batch %s expired with %d of %d requests answered; the rest "
                        "go out in a new batch", batch_id, sum(o == "ok" for o in outcomes.values()), len(keys))
        if again:
            self._upload(again)

    def _line(self, line: dict[str, Any], chat: bool, answers: dict[str, Completion],
              errors: dict[str, tuple[str, bool]]) -> None:
        key = line.get("custom_id")
        if not isinstance(key, str):
            return
        resp = line.get("response") or {}
        err = line.get("error")
        code = resp.get("status_code")
        if err is None and code == 200:
            try:
                answers[key] = parse_response(resp.get("body") or {}, chat)
                return
            except (ValueError, KeyError, TypeError) as exc:
                errors[key] = (f"malformed answer: {type(exc).__name__}: {exc}", True)
                return
        if key in answers:
            return
        if isinstance(err, dict):
            ecode = str(err.get("code") or "")
            if ecode in ("batch_expired", "batch_cancelled"):
                return   # not run: "missing"
            errors[key] = (f"{ecode}: {err.get('message')}", ecode in RETRY_CODES)
            return
        body = resp.get("body") or {}
        detail = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        st = int(code or 0)
        errors[key] = (f"HTTP {st}: {detail or ''}".strip(), st in RETRY_STATUS or st >= 500 or st == 0)

    def _fail(self, key: str, msg: str, transient: bool, dead: bool = False) -> None:
        for number, _ in self.waiting.pop(key, ()):
            c = Completion.failed(msg, transient=transient)
            c.endpoint_dead = dead
            self.ready.append((number, c))
