"""A fake OpenAI batch API on 127.0.0.1 (``/v1/files``, ``/v1/batches``) on top of
:class:`~curate.testing.fake_openai.FakeOpenAI` (whose chat/completions endpoints still work), for
tests of the openai engine's ``mode: batch``.

    with FakeBatchOpenAI(lines_per_poll=2, expire={0: 3}, fail_lines=0.2) as srv:
        engine = {"kind": "openai", "model": "fake", "base_url": srv.base_url, "mode": "batch",
                  "batch_poll_interval": 0.01}
        ...
    srv.uploads, srv.created, srv.lines     # files uploaded, batches created, lines submitted

Endpoints (OpenAI's formats): ``POST /v1/files`` (multipart: ``purpose=batch`` and a JSONL
``file``), ``GET /v1/files/{id}`` and ``/v1/files/{id}/content``; ``POST /v1/batches``
(``input_file_id``, ``endpoint``, ``completion_window`` "24h", ``metadata``), ``GET
/v1/batches/{id}``, ``GET /v1/batches`` (``limit``, ``after``; newest first),
``POST /v1/batches/{id}/cancel``. Input lines are ``{"custom_id", "method": "POST", "url", "body"}``;
output lines ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``.

A batch moves on each time it is retrieved (nothing happens between polls, so tests are
deterministic): ``validating`` (for ``validate_polls`` polls) -> ``in_progress`` (``lines_per_poll``
lines answered per poll; None: all at once) -> ``finalizing`` -> ``completed``, with
``request_counts``. Faults:

- ``expire={n: k}``: the n-th batch created (0-based) expires after answering k lines: its output
  file has those, its error file the rest with code ``batch_expired``;
- ``fail_lines``: the probability that a line fails (drawn from ``seed``, the request body and how
  many times that body was run before, so a retried line may pass and a test gets the same draws
  in every run): an error-file line with
  ``response.status_code`` ``fail_status`` (500), or with ``error.code`` ``request_timeout`` when
  ``fail_status`` is 0;
- ``fail_batches={n}``: the n-th batch fails validation (status ``failed``, ``errors``);
- ``lose_create=n``: the next n ``POST /v1/batches`` create the batch but answer 503 (an answer
  lost on the way: a client that simply retries pays twice);
- ``hold=True`` keeps batches ``in_progress`` without answering (a slow provider); set it back to
  False to let them go on;
- ``cancel`` (the endpoint): ``cancelling`` then ``cancelled``; lines not run go to the error file
  with code ``batch_cancelled``.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import random
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlparse

from curate.testing.fake_openai import FakeOpenAI, _Handler, body_hash, echo  # noqa: F401  (echo: re-exported)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


class FakeBatchOpenAI(FakeOpenAI):
    def __init__(self, *, validate_polls: int = 1, lines_per_poll: int | None = None,
                 expire: dict[int, int] | None = None, fail_lines: float = 0.0, fail_status: int = 500,
                 fail_batches: set[int] | None = None, hold: bool = False, lose_create: int = 0,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.validate_polls = validate_polls
        self.lines_per_poll = lines_per_poll
        self.expire = dict(expire or {})
        self.fail_lines = fail_lines
        self.fail_status = fail_status
        self.fail_batches = set(fail_batches or ())
        self.hold = hold
        self.lose_create = lose_create
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._work: dict[str, dict[str, Any]] = {}     # batch id -> lines, position, outputs
        self.uploads: list[str] = []     # file ids uploaded with purpose=batch
        self.created: list[str] = []     # batch ids, in creation order
        self.lines = 0                   # lines in the batches created
        self.polls = 0                   # GET /v1/batches/{id}
        self._runs: dict[str, int] = {}  # custom_id -> times run

    handler_class = None  # set below

    # -- files -----------------------------------------------------------------------------------------
    def _new_file(self, content: bytes, purpose: str, filename: str) -> dict[str, Any]:
        fid = "file-" + uuid.uuid4().hex[:24]
        meta = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose}
        self.files[fid] = {**meta, "content": content}
        return meta

    def _output_file(self, lines: list[dict[str, Any]], kind: str) -> str | None:
        if not lines:
            return None
        data = "".join(json.dumps(x) + "\n" for x in lines).encode()
        return self._new_file(data, "batch_output", f"batch_{kind}.jsonl")["id"]

    # -- batches ---------------------------------------------------------------------------------------
    def create_batch(self, req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        fid = req.get("input_file_id")
        if fid not in self.files or self.files[fid]["purpose"] != "batch":
            return 400, {"error": {"message": f"no batch input file {fid!r}", "type": "invalid_request_error"}}
        if req.get("endpoint") not in ENDPOINTS:
            return 400, {"error": {"message": f"endpoint {req.get('endpoint')!r} not supported"}}
        if req.get("completion_window") != "24h":
            return 400, {"error": {"message": "completion_window must be '24h'"}}
        with self.lock:
            bid = "batch_" + uuid.uuid4().hex[:24]
            b = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "errors": None, "input_file_id": fid,
                 "completion_window": "24h", "status": "validating", "output_file_id": None,
                 "error_file_id": None, "created_at": int(time.time()), "in_progress_at": None,
                 "expires_at": int(time.time()) + 86400, "finalizing_at": None, "completed_at": None,
                 "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": req.get("metadata")}
            self._work[bid] = {"index": len(self.created), "polls": 0, "pos": 0, "lines": [], "out": [], "err": []}
            self.batches[bid] = b
            self.created.append(bid)
        return 200, dict(b)

    def retrieve(self, bid: str) -> dict[str, Any] | None:
        with self.lock:
            b = self.batches.get(bid)
            if b is None:
                return None
            self.polls += 1
            self._advance(b, self._work[bid])
            return json.loads(json.dumps(b))

    def cancel(self, bid: str) -> dict[str, Any] | None:
        with self.lock:
            b = self.batches.get(bid)
            if b is None:
                return None
            if b["status"] in ("validating", "in_progress", "finalizing"):
                b["status"], b["cancelling_at"] = "cancelling", int(time.time())
            return dict(b)

    def _advance(self, b: dict[str, Any], w: dict[str, Any]) -> None:
        now = int(time.time())
        st = b["status"]
        if st == "validating":
            w["polls"] += 1
            if w["polls"] < self.validate_polls:
                return
            errors = self._validate(b, w)
            if errors:
                b.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
                return
            b.update(status="in_progress", in_progress_at=now)
            b["request_counts"]["total"] = len(w["lines"])
            self.lines += len(w["lines"])
        elif st == "in_progress":
            if self.hold:
                return
            k = len(w["lines"]) - w["pos"] if self.lines_per_poll is None else self.lines_per_poll
            stop_at = self.expire.get(w["index"])
            for _ in range(k):
                if w["pos"] >= len(w["lines"]) or (stop_at is not None and w["pos"] >= stop_at):
                    break
                self._run_line(b, w, w["lines"][w["pos"]])
                w["pos"] += 1
            if stop_at is not None and w["pos"] >= stop_at and w["pos"] < len(w["lines"]):
                self._not_run(b, w, "batch_expired",
                              "This request could not be executed before the completion window expired.")
                b.update(status="expired", expired_at=now)
                self._finish(b, w)
            elif w["pos"] >= len(w["lines"]):
                b.update(status="finalizing", finalizing_at=now)
        elif st == "finalizing":
            b.update(status="completed", completed_at=now)
            self._finish(b, w)
        elif st == "cancelling":
            self._not_run(b, w, "batch_cancelled", "This batch was cancelled before this request ran.")
            b.update(status="cancelled", cancelled_at=now)
            self._finish(b, w)

    def _validate(self, b: dict[str, Any], w: dict[str, Any]) -> list[dict[str, Any]]:
        if w["index"] in self.fail_batches:
            return [{"code": "model_not_found", "message": "The model 'fake' does not exist (injected).",
                     "param": "body.model", "line": 1}]
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        for n, raw in enumerate(self.files[b["input_file_id"]]["content"].decode().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                errors.append({"code": "invalid_json_line", "message": "not JSON", "line": n})
                continue
            cid = line.get("custom_id")
            if not isinstance(cid, str) or cid in seen:
                errors.append({"code": "duplicate_custom_id" if cid in seen else "missing_required_parameter",
                               "message": f"custom_id {cid!r}", "line": n})
            elif line.get("method") != "POST" or line.get("url") != b["endpoint"] or not isinstance(line.get("body"), dict):
                errors.append({"code": "invalid_request", "message": "method/url/body", "line": n})
            seen.add(cid)
            w["lines"].append(line)
        return errors

    def _run_line(self, b: dict[str, Any], w: dict[str, Any], line: dict[str, Any]) -> None:
        cid = line["custom_id"]
        h = body_hash(line["body"])   # not the custom_id: the draws do not depend on the server's port
        n = self._runs.get(h, 0)
        self._runs[h] = n + 1
        rid = "batch_req_" + uuid.uuid4().hex[:16]
        if self.fail_lines and random.Random(f"{self.seed}:{h}:{n}").random() < self.fail_lines:
            if self.fail_status:
                resp = {"status_code": self.fail_status, "request_id": rid,
                        "body": {"error": {"message": "injected line failure", "type": "server_error"}}}
                w["err"].append({"id": rid, "custom_id": cid, "response": resp, "error": None})
            else:
                w["err"].append({"id": rid, "custom_id": cid, "response": None,
                                 "error": {"code": "request_timeout", "message": "injected timeout"}})
            b["request_counts"]["failed"] += 1
            return
        body = self.answer(line["body"], b["endpoint"].endswith("/chat/completions"))
        w["out"].append({"id": rid, "custom_id": cid,
                         "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None})
        b["request_counts"]["completed"] += 1

    def _not_run(self, b: dict[str, Any], w: dict[str, Any], code: str, message: str) -> None:
        for line in w["lines"][w["pos"]:]:
            w["err"].append({"id": "batch_req_" + uuid.uuid4().hex[:16], "custom_id": line["custom_id"],
                             "response": None, "error": {"code": code, "message": message}})
            b["request_counts"]["failed"] += 1
        w["pos"] = len(w["lines"])

    def _finish(self, b: dict[str, Any], w: dict[str, Any]) -> None:
        b["output_file_id"] = self._output_file(w["out"], "output")
        b["error_file_id"] = self._output_file(w["err"], "error")


class _BatchHandler(_Handler):
    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode())

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self) -> None:  # noqa: N802
        fake: FakeBatchOpenAI = self.server.fake
        path = urlparse(self.path).path
        if path == "/v1/files":
            self._upload(fake)
        elif path == "/v1/batches":
            try:
                req = json.loads(self._body())
            except ValueError:
                return self._json(400, {"error": {"message": "not JSON"}})
            status, data = fake.create_batch(req)
            with fake.lock:
                lose = status == 200 and fake.lose_create > 0
                if lose:
                    fake.lose_create -= 1
            if lose:   # created, but the answer is lost on the way
                return self._json(503, {"error": {"message": "upstream timeout (injected)"}})
            self._json(status, data)
        elif path.startswith("/v1/batches/") and path.endswith("/cancel"):
            self._body()
            b = fake.cancel(path.split("/")[3])
            self._json(200, b) if b else self._json(404, {"error": {"message": "no such batch"}})
        else:
            super().do_POST()

    def _upload(self, fake: FakeBatchOpenAI) -> None:
        ctype = self.headers.get("Content-Type") or ""
        raw = self._body()
        if not ctype.startswith("multipart/form-data"):
            return self._json(400, {"error": {"message": "expected multipart/form-data"}})
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
        fields: dict[str, Any] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        if fields.get("purpose", (None, b""))[1] != b"batch":
            return self._json(400, {"error": {"message": "purpose must be 'batch'"}})
        if "file" not in fields:
            return self._json(400, {"error": {"message": "no file"}})
        filename, content = fields["file"]
        with fake.lock:
            meta = fake._new_file(content, "batch", filename or "upload.jsonl")
            fake.uploads.append(meta["id"])
        self._json(200, meta)

    def do_GET(self) -> None:  # noqa: N802
        fake: FakeBatchOpenAI = self.server.fake
        u = urlparse(self.path)
        parts = u.path.strip("/").split("/")   # v1, files|batches, id, content
        if parts[:2] == ["v1", "files"] and len(parts) in (3, 4):
            f = fake.files.get(parts[2])
            if f is None:
                return self._json(404, {"error": {"message": "no such file"}})
            if len(parts) == 4 and parts[3] == "content":
                return self._send(200, f["content"])
            return self._json(200, {k: v for k, v in f.items() if k != "content"})
        if parts[:2] == ["v1", "batches"] and len(parts) == 3:
            b = fake.retrieve(parts[2])
            return self._json(200, b) if b else self._json(404, {"error": {"message": "no such batch"}})
        if parts == ["v1", "batches"]:
            q = parse_qs(u.query)
            limit = int(q.get("limit", ["20"])[0])
            with fake.lock:
                ids = [i for i in reversed(fake.created) if i in fake.batches]
            if "after" in q and q["after"][0] in ids:
                ids = ids[ids.index(q["after"][0]) + 1:]
            page = [dict(fake.batches[i]) for i in ids[:limit]]
            return self._json(200, {"object": "list", "data": page, "has_more": len(ids) > limit,
                                    "first_id": page[0]["id"] if page else None,
                                    "last_id": page[-1]["id"] if page else None})
        self._json(404, {"error": {"message": "not found"}})


FakeBatchOpenAI.handler_class = _BatchHandler
