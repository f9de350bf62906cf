"""The openai engine's HTTP transport (aiohttp): hundreds of requests really in flight at once, and
HTTP(S)_PROXY / NO_PROXY from the environment honoured. Servers are asyncio servers on 127.0.0.1
in a thread of the test process."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from curate.engines import Request, SamplingParams, make_engine
from curate.testing.fake_openai import chat_response, read_request


class _SlowServer:
    """Answers every chat completion after ``delay`` seconds (keep-alive HTTP/1.1); records the
    most requests it held at once and each request line."""

    def __init__(self, delay: float):
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.lines: list[bytes] = []
        self.connections = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while True:
                line, body = await read_request(reader)
                self.lines.append(line)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    await asyncio.sleep(self.delay)
                finally:
                    self.in_flight -= 1
                writer.write(chat_response(body, body["messages"][-1]["content"][::-1], tokens=3))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
            self.port = self.server.sockets[0].getsockname()[1]
            self.ready.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()

    def __enter__(self) -> "_SlowServer":
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            self.server.close()
            for w in list(self.writers):
                w.close()
            await asyncio.sleep(0.05)  # the handlers see their connections closed

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


def _chat(i: int) -> Request:
    return Request(messages=[{"role": "user", "content": f"question {i}"}], params=SamplingParams(max_tokens=4))


def test_512_requests_in_flight_at_once():
    """concurrency 512 against a server that holds each request 0.5 s: ~512 are held at once, never
    more, on at most 512 connections (one session, one connector), and 1,024 requests take about two
    rounds (a single httpx pool managed ~40 requests/s at this concurrency: 25 s)."""
    with _SlowServer(0.5) as srv:
        eng = make_engine({"kind": "openai", "model": "m", "base_url": f"http://127.0.0.1:{srv.port}/v1",
                           "api_key_env": None, "concurrency": 512, "timeout": 30})
        try:
            t0 = time.monotonic()
            out = eng.generate([_chat(i) for i in range(1024)])
            took = time.monotonic() - t0
        finally:
            eng.close()
    assert [c.text for c in out] == [f"question {i}"[::-1] for i in range(1024)]
    assert 450 <= srv.max_in_flight <= 512, srv.max_in_flight
    assert srv.connections <= 512
    assert took < 8, took   # ideal 1.0 s


def test_proxy_from_environment(monkeypatch):
    """HTTP_PROXY sends the request to the proxy (absolute-form request line naming the endpoint);
    NO_PROXY covering the host sends it straight to the server."""
    with _SlowServer(0.0) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("http_proxy", raising=False)
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        eng = make_engine({"kind": "openai", "model": "m", "base_url": "http://llm.invalid:8000/v1",
                           "api_key_env": None, "max_retries": 0})
        try:
            [c] = eng.generate([_chat(1)])
        finally:
            eng.close()
        assert c.ok, c.error
        assert c.text == "question 1"[::-1]
        assert proxy.lines == [b"POST http://llm.invalid:8000/v1/chat/completions HTTP/1.1"]

        with _SlowServer(0.0) as direct:
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            eng = make_engine({"kind": "openai", "model": "m", "base_url": f"http://127.0.0.1:{direct.port}/v1",
                               "api_key_env": None, "max_retries": 0})
            try:
                [c] = eng.generate([_chat(2)])
            finally:
                eng.close()
            assert c.ok, c.error
            assert direct.lines == [b"POST /v1/chat/completions HTTP/1.1"]
            assert len(proxy.lines) == 1   # the proxy saw nothing more


def test_error_names_stay_httpx_names():
    """A refused connection reads ``cannot connect: ConnectError`` (as with httpx) and a read
    timeout ``timeout (ReadTimeout)``: errors, logs and docs that quote them stay valid."""
    eng = make_engine({"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                       "api_key_env": None, "max_retries": 0})
    [c] = eng.generate([_chat(0)])
    eng.close()
    assert not c.ok and "cannot connect: ConnectError:" in c.error and c.endpoint_dead
    with _SlowServer(2.0) as srv:
        eng = make_engine({"kind": "openai", "model": "m", "base_url": f"http://127.0.0.1:{srv.port}/v1",
                           "api_key_env": None, "max_retries": 0, "timeout": 0.3})
        [c] = eng.generate([_chat(0)])
        eng.close()
    assert not c.ok and "timeout (ReadTimeout)" in c.error and c.transient and not c.endpoint_dead


@pytest.mark.parametrize("text", ["caf\u00e9 \u4e2d\u6587", "lone \udc80 surrogate"])
def test_body_encoding(text):
    """Non-ASCII goes as UTF-8; a lone surrogate (which UTF-8 cannot carry) goes escaped instead of
    failing the request."""
    with _SlowServer(0.0) as srv:
        eng = make_engine({"kind": "openai", "model": "m", "base_url": f"http://127.0.0.1:{srv.port}/v1",
                           "api_key_env": None, "max_retries": 0})
        [c] = eng.generate([Request(messages=[{"role": "user", "content": text}],
                                    params=SamplingParams(max_tokens=4))])
        eng.close()
    assert c.ok, c.error
    assert c.text == text[::-1]


@pytest.mark.parametrize("use_uvloop", [True, False])
def test_event_loop_uvloop_or_asyncio(use_uvloop):
    """The engine's loop is uvloop's when it is installed (the default), asyncio's with ``uvloop:
    false``; requests go through either, with the stage's stream (the loop thread's task path)."""
    pytest.importorskip("uvloop")
    with _SlowServer(0.01) as srv:
        eng = make_engine({"kind": "openai", "model": "m", "base_url": f"http://127.0.0.1:{srv.port}/v1",
                           "api_key_env": None, "concurrency": 8, "timeout": 30, "uvloop": use_uvloop})
        try:
            out = eng.generate([_chat(i) for i in range(20)])
            kind = type(eng._loop).__module__.split(".")[0]
            stream = eng.stream()
            for i in range(20, 40):
                stream.submit(i, _chat(i))
            got: dict[int, str] = {}
            while len(got) < 20:
                got.update((tag, c.text) for tag, c in stream.next())
            stream.close()
        finally:
            eng.close()
    assert kind == ("uvloop" if use_uvloop else "asyncio")
    assert [c.text for c in out] == [f"question {i}"[::-1] for i in range(20)]
    assert got == {i: f"question {i}"[::-1] for i in range(20, 40)}
