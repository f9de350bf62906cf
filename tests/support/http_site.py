"""A tiny local web site for ingest tests: ``serve_site(pages) -> (base_url, stop, hits)``.

``pages`` maps a path (with its query string, e.g. ``"/a?x=1"``) to either a body (``str`` or
``bytes``, served as ``200 text/html; charset=utf-8``) or a dict with the keys

``body``          str or bytes (default "")
``status``        HTTP status (default 200)
``content_type``  Content-Type header (default ``text/html; charset=utf-8``; None = no header)
``headers``       extra headers (dict)
``location``      shortcut for a redirect: status 301 (unless given) + Location header
``delay``         seconds to wait before answering (a slow page)
``chunked``       True: send the body in pieces without Content-Length (connection closes at end)

Unknown paths answer 404. ``hits`` is a ``collections.Counter`` of requests per path (with query),
updated by the server threads. ``stop()`` shuts the server down (idempotent). The server binds
127.0.0.1 on a free port and runs in daemon threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


def serve_site(pages: dict[str, Any]) -> tuple[str, Callable[[], None], Counter]:
    hits: Counter = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            with lock:
                hits[self.path] += 1
            spec = pages.get(self.path)
            if spec is None:
                self._send(404, b"<html><body>not found</body></html>", "text/html", {}, False)
                return
            if not isinstance(spec, dict):
                spec = {"body": spec}
            if spec.get("delay"):
                time.sleep(spec["delay"])
            body = spec.get("body", b"")
            if isinstance(body, str):
                body = body.encode("utf-8")
            headers = dict(spec.get("headers") or {})
            status = spec.get("status", 200)
            if "location" in spec:
                headers["Location"] = spec["location"]
                status = spec.get("status", 301)
            ctype = spec.get("content_type", "text/html; charset=utf-8")
            self._send(status, body, ctype, headers, bool(spec.get("chunked")))

        def _send(self, status: int, body: bytes, ctype: str | None, headers: dict, chunked: bool) -> None:
            try:
                self.send_response(status)
                if ctype is not None:
                    self.send_header("Content-Type", ctype)
                for k, v in headers.items():
                    self.send_header(k, v)
                if chunked:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if chunked:
                    step = 64 * 1024
                    for off in range(0, len(body), step):
                        self.wfile.write(body[off:off + step])
                else:
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, too large)
                self.close_connection = True

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        block_on_close = False

        def handle_error(self, request: Any, client_address: Any) -> None:  # client went away
            pass

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stopped = []

    def stop() -> None:
        if not stopped:
            stopped.append(True)
            server.shutdown()
            server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}", stop, hits
