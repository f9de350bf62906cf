"""A fake OpenAI-compatible server on 127.0.0.1 for tests and benchmarks, with seeded fault
injection and a log of every request.

    with FakeOpenAI(seed=1, faults={"503": 0.1, "429": 0.05, "timeout": 0.02, "drop": 0.02,
                                    "malformed": 0.03}, retry_after="1") as srv:
        engine = {"kind": "openai", "model": "fake", "base_url": srv.base_url, "timeout": 1}
        ...
    srv.log          # [Entry(t0, t1, path, hash, outcome, answered, status, answer)], in arrival order

Answers are a pure function of the request body (``responder(body) -> text``; by default the last
message or prompt, reversed), so a run with faults must give the same output as a run without.
Which fault a request gets is drawn from ``seed``, the body hash and how many times that body was
seen before, so a given request meets the same faults in every run (the scheduling of requests does
not change them). Faults:

- ``503`` / ``500``: an error answer; ``429``: too many requests with ``Retry-After: <retry_after>``
  (seconds, or an HTTP date when ``retry_after`` is ``"date:<s>"``);
- ``timeout``: the request is held ``hold`` seconds (longer than the client's timeout) and the
  connection closed without an answer;
- ``drop``: the connection is closed without an answer;
- ``malformed``: HTTP 200 with a body that is not JSON.

Structured outputs: a request with ``response_format`` is checked as OpenAI does (``type:
json_schema`` with ``json_schema: {name, schema, strict}``; a malformed one is answered HTTP 400
naming the problem) and recorded in ``response_formats``; with the default responder the answer is
a JSON value of the schema (:func:`schema_instance`). ``structured="reject"`` answers every request
that has a ``response_format`` with HTTP 400, as a server without structured outputs does.

``latency`` (seconds, or a function of the body) holds each answer that long. ``answered`` in the log means a complete 200 answer was written. ``rpm`` makes the server itself
enforce a requests-per-minute limit (answering 429 beyond it, counted in the log as ``limited``).
``status_for_path`` answers every request with one status (a dead or misconfigured endpoint: 404,
401). Nothing here needs pytest.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
from dataclasses import asdict, dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

FAULTS = ("503", "500", "429", "timeout", "drop", "malformed")


def body_hash(body: dict[str, Any]) -> str:
    """sha256 of a request body (canonical JSON): identical requests have the same hash."""
    blob = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def schema_instance(schema: dict[str, Any], root: dict[str, Any] | None = None, text: str = "") -> Any:
    """A JSON value a schema-constrained decoder could write: the first ``enum`` value, the last
    words of ``text`` for strings, two items for arrays, ``minimum`` (or 1) for numbers."""
    root = root or schema
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    if "enum" in schema:
        return schema["enum"][0]
    t = schema.get("type")
    if t == "object":
        return {k: schema_instance(v, root, text) for k, v in (schema.get("properties") or {}).items()}
    if t == "array":
        return [schema_instance(schema.get("items") or {}, root, f"{text} {i}") for i in range(2)]
    if t == "integer":
        return int(schema.get("minimum", 1))
    if t == "number":
        return float(schema.get("minimum", 1))
    if t == "boolean":
        return True
    return " ".join(text.split()[-3:])


def check_response_format(rf: Any) -> str | None:
    """What is wrong with a ``response_format`` (OpenAI's rules for json_schema), or None."""
    import re

    if not isinstance(rf, dict) or rf.get("type") not in ("json_schema", "json_object", "text"):
        return "response_format.type must be one of json_schema, json_object, text"
    if rf["type"] != "json_schema":
        return None
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        return "response_format.json_schema is required"
    if not isinstance(js.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", js["name"]):
        return "response_format.json_schema.name must match ^[a-zA-Z0-9_-]{1,64}$"
    schema = js.get("schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return "response_format.json_schema.schema must be a JSON schema of type object"
    if js.get("strict"):
        stack = [schema, *((schema.get("$defs") or {}).values())]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                props = node.get("properties")
                if isinstance(props, dict):
                    if node.get("additionalProperties") is not False:
                        return "strict schemas need 'additionalProperties': false on every object"
                    if sorted(node.get("required") or []) != sorted(props):
                        return "strict schemas need every property in 'required'"
                stack.extend(v for k, v in node.items() if k != "$defs")
            elif isinstance(node, list):
                stack.extend(node)
    return None


def echo(body: dict[str, Any]) -> str:
    """The default answer: the last message (or the prompt), reversed; with a json_schema
    ``response_format``, a JSON value of the schema (:func:`schema_instance`)."""
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        last = str(body["messages"][-1].get("content") or "") if "messages" in body else str(body.get("prompt") or "")
        return json.dumps(schema_instance(rf["json_schema"]["schema"], text=last))
    if "messages" in body:
        return str(body["messages"][-1].get("content") or "")[::-1]
    return str(body.get("prompt") or "")[::-1]


async def read_request(reader: Any) -> tuple[bytes, dict[str, Any]]:
    """One request from an asyncio HTTP/1.1 keep-alive connection (the minimal servers of
    benchmarks/llm_stage.py and the transport tests): (request line, JSON body). Raises
    ``asyncio.IncompleteReadError`` when the client closed the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return lines[0], json.loads(await reader.readexactly(length))


def chat_response(body: dict[str, Any], text: str, tokens: int = 8) -> bytes:
    """An HTTP/1.1 200 answer with a chat completion of ``text`` for request ``body``."""
    data = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": tokens, "completion_tokens": tokens,
                                 "total_tokens": 2 * tokens}}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(data)).encode() + b"\r\n\r\n" + data)


@dataclass
class Entry:
    t0: float          # time.time() the request arrived
    t1: float          # time.time() the handler finished
    path: str
    hash: str
    outcome: str       # ok | 503 | 500 | 429 | timeout | drop | malformed | limited | status | bad_format
    answered: bool     # a complete 200 answer was written
    status: int        # HTTP status sent (0: none)
    answer: str = ""   # the text of a 200 answer (first choice)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FakeOpenAI:
    handler_class: Any = None   # a subclass of _Handler (curate/testing/fake_batch.py)

    def __init__(self, *, seed: int = 0, faults: dict[str, float] | None = None,
                 responder: Callable[[dict[str, Any]], str] = echo,
                 latency: "float | Callable[[dict[str, Any]], float]" = 0.0,
                 retry_after: str | None = "0.2", hold: float = 2.0, rpm: float | None = None,
                 status_for_path: int | None = None, completion_tokens: int = 4,
                 log_path: str | None = None, structured: str = "accept"):
        bad = set(faults or {}) - set(FAULTS)
        if bad:
            raise ValueError(f"unknown fault(s) {sorted(bad)}; known: {FAULTS}")
        self.seed = seed
        self.faults = dict(faults or {})
        self.responder = responder
        self.latency = latency
        self.retry_after = retry_after
        self.hold = hold
        self.rpm = rpm
        self.status_for_path = status_for_path
        self.completion_tokens = completion_tokens
        self.log_path = log_path
        if structured not in ("accept", "reject"):
            raise ValueError(f"structured must be 'accept' or 'reject', not {structured!r}")
        self.structured = structured
        self.response_formats: list[Any] = []   # the response_format of each request that had one
        self.log: list[Entry] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen: dict[str, int] = {}
        self._served: list[float] = []   # arrival times of requests counted by the server's own rpm
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life ----------------------------------------------------------------------------------------
    def start(self) -> "FakeOpenAI":
        srv = _Server(("127.0.0.1", 0), self.handler_class or _Handler)
        srv.daemon_threads = True
        srv.fake = self  # type: ignore[attr-defined]
        self._server = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)  # type: ignore[union-attr]
            self._server = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # -- what tests read -------------------------------------------------------------------------------
    def answered(self) -> list[Entry]:
        with self.lock:
            return [e for e in self.log if e.answered]

    def requests_in(self, t0: float, t1: float) -> int:
        """Requests that arrived in [t0, t1)."""
        with self.lock:
            return sum(1 for e in self.log if t0 <= e.t0 < t1)

    def max_in_window(self, seconds: float, outcome: str | None = None) -> int:
        """The most requests (with ``outcome``, or any) that arrived within any ``seconds`` window."""
        with self.lock:
            ts = sorted(e.t0 for e in self.log if outcome is None or e.outcome == outcome)
        best, j = 0, 0
        for i, t in enumerate(ts):
            while ts[j] <= t - seconds:
                j += 1
            best = max(best, i - j + 1)
        return best

    def clear(self) -> None:
        with self.lock:
            self.log.clear()
            self._served.clear()
            self.max_in_flight = 0

    # -- internals -----------------------------------------------------------------------------------
    def _fault(self, h: str) -> str | None:
        with self.lock:
            n = self._seen.get(h, 0)
            self._seen[h] = n + 1
        rng = random.Random(f"{self.seed}:{h}:{n}")
        x = rng.random()
        for name in FAULTS:
            p = self.faults.get(name, 0.0)
            if x < p:
                return name
            x -= p
        return None

    def _limited(self, now: float) -> bool:
        if self.rpm is None:
            return False
        with self.lock:
            self._served = [t for t in self._served if t > now - 60.0]
            if len(self._served) >= self.rpm:
                return True
            self._served.append(now)
            return False

    def _record(self, e: Entry) -> None:
        with self.lock:
            self.log.append(e)
            if self.log_path:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(e.to_dict()) + "\n")

    def answer(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        text = self.responder(body)
        n = int(body.get("n") or 1)
        choices = []
        for i in range(n):
            ch: dict[str, Any] = {"index": i, "finish_reason": "stop"}
            if chat:
                ch["message"] = {"role": "assistant", "content": text}
            else:
                ch["text"] = text
            choices.append(ch)
        prompt = json.dumps(body.get("messages") or body.get("prompt") or "")
        pt = (len(prompt.encode()) + 3) // 4
        ct = self.completion_tokens * n
        return {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
                "model": body.get("model"), "choices": choices,
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], OSError):  # a client killed or gone: part of the tests
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as real servers
    server: Any

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> bool:
        """Headers and body in one write (two small writes on a keep-alive connection meet Nagle
        and delayed ACKs: 40 ms per call)."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self._headers_buffer.append(b"\r\n")
            buf = b"".join(self._headers_buffer) + data
            self._headers_buffer = []
            self.wfile.write(buf)
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            return False

    def _close(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_POST(self) -> None:  # noqa: N802
        fake: FakeOpenAI = self.server.fake
        t0 = time.time()
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"raw": raw.decode("utf-8", "replace")}
        h = body_hash(body)
        with fake.lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        outcome, answered, status, text = "ok", False, 0, ""
        try:
            if fake.status_for_path is not None:
                outcome, status = "status", fake.status_for_path
                self._send(status, json.dumps({"error": {"message": f"status {status}"}}).encode())
                return
            chat = self.path.endswith("/chat/completions")
            if not chat and not self.path.endswith("/completions"):
                outcome, status = "status", 404
                self._send(404, b'{"error": {"message": "not found"}}')
                return
            if "response_format" in body:
                with fake.lock:
                    fake.response_formats.append(body["response_format"])
                problem = ("response_format is not supported by this server" if fake.structured == "reject"
                           else check_response_format(body["response_format"]))
                if problem:
                    outcome, status = "bad_format", 400
                    self._send(400, json.dumps({"error": {"message": problem, "param": "response_format",
                                                          "type": "invalid_request_error"}}).encode())
                    return
            if fake._limited(t0):
                outcome, status = "limited", 429
                self._send(429, b'{"error": {"message": "rate limit"}}', {"Retry-After": "1"})
                return
            fault = fake._fault(h)
            wait = fake.latency(body) if callable(fake.latency) else fake.latency
            if wait:
                time.sleep(wait)
            if fault in ("503", "500"):
                outcome, status = fault, int(fault)
                self._send(status, b'{"error": {"message": "injected"}}')
            elif fault == "429":
                outcome, status = "429", 429
                ra = fake.retry_after
                headers = {}
                if ra is not None and ra.startswith("date:"):
                    headers["Retry-After"] = formatdate(time.time() + float(ra[5:]), usegmt=True)
                elif ra is not None:
                    headers["Retry-After"] = ra
                self._send(429, b'{"error": {"message": "slow down"}}', headers)
            elif fault == "timeout":
                outcome = "timeout"
                time.sleep(fake.hold)
                self._close()
            elif fault == "drop":
                outcome = "drop"
                self._close()
            elif fault == "malformed":
                outcome, status = "malformed", 200
                self._send(200, b"<html>502 bad gateway</html>")
            else:
                status = 200
                ans = fake.answer(body, chat)
                choice = (ans.get("choices") or [{}])[0]
                text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
                answered = self._send(200, json.dumps(ans).encode())
        finally:
            with fake.lock:
                fake.in_flight -= 1
            fake._record(Entry(t0, time.time(), self.path, h, outcome, answered, status, text or ""))
