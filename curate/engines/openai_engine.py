"""Any OpenAI-compatible server (OpenAI, ``vllm serve``, llama.cpp server, TGI, ...).

Requests go out concurrently (asyncio + httpx, at most ``concurrency`` in flight, each slot with its
own keep-alive connection), from one event loop in a background thread that lives as long as the
engine: connections and the ``requests_per_minute``/``tokens_per_minute`` buckets carry over from
one call to the next. Chat requests
use ``POST {base_url}/chat/completions``, raw prompts ``POST {base_url}/completions``. Timeouts,
network errors, 408/409/429 and 5xx answers are retried with exponential backoff and jitter
(``Retry-After`` is honoured); other 4xx answers fail the request at once. A request that still
fails becomes a ``Completion`` with ``error`` set; the batch goes on.

The API key is read from the environment variable named by ``api_key_env``; it is sent in the
``Authorization`` header only and never appears in logs, errors or outputs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import random
import threading
from typing import Any

from curate.engines.base import Choice, Completion, Engine, Request, TokenLogprob, _Backend
from curate.engines.cache import RequestCache
from curate.engines.config import OpenAIConfig

log = logging.getLogger("curate.engines")

RETRY_STATUS = {408, 409, 425, 429}


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def build_body(model: str, request: Request, extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(endpoint path, JSON body) for one request."""
    p = request.params
    body: dict[str, Any] = {"model": model, "temperature": p.temperature, "top_p": p.top_p,
                            "max_tokens": p.max_tokens, "n": p.n}
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed
    if not request.add_special_tokens:
        body["add_special_tokens"] = False  # a vLLM server extension: the prompt carries its BOS
    if request.messages is not None:
        path = "/chat/completions"
        body["messages"] = [dict(m) for m in request.messages]
        if p.logprobs is not None:
            body["logprobs"] = True
            if p.logprobs:
                body["top_logprobs"] = p.logprobs
    else:
        path = "/completions"
        body["prompt"] = request.prompt
        if p.logprobs is not None:
            body["logprobs"] = p.logprobs
    if extra:
        body.update(extra)
    return path, body


def parse_response(data: dict[str, Any], chat: bool) -> Completion:
    """An OpenAI (chat) completion response -> Completion. Raises ValueError when malformed."""
    raw = data.get("choices")
    if not isinstance(raw, list) or not raw:
        raise ValueError("response has no choices")
    raw = sorted(raw, key=lambda c: c.get("index", 0))
    usage = data.get("usage") or {}
    choices: list[Choice] = []
    for c in raw:
        if chat:
            msg = c.get("message") or {}
            text = msg.get("content")
            lps = _chat_logprobs(c.get("logprobs"))
        else:
            text = c.get("text")
            lps = _completion_logprobs(c.get("logprobs"))
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise ValueError("choice text is not a string")
        choices.append(Choice(text=text, finish_reason=c.get("finish_reason") or "stop",
                              completion_tokens=len(lps) if lps is not None else 0, logprobs=lps))
    total = usage.get("completion_tokens")
    if isinstance(total, int) and total >= 0:
        share, rest = divmod(total, len(choices))
        for i, ch in enumerate(choices):
            ch.completion_tokens = share + (1 if i < rest else 0)
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
    return Completion(choices=choices, prompt_tokens=prompt_tokens)


def _chat_logprobs(lp: Any) -> list[TokenLogprob] | None:
    if not isinstance(lp, dict) or lp.get("content") is None:
        return None
    out = []
    for t in lp["content"]:
        top = {a["token"]: float(a["logprob"]) for a in (t.get("top_logprobs") or [])}
        out.append(TokenLogprob(t["token"], float(t["logprob"]), top))
    return out


def _completion_logprobs(lp: Any) -> list[TokenLogprob] | None:
    if not isinstance(lp, dict) or lp.get("tokens") is None:
        return None
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    return [TokenLogprob(tok, float(v) if v is not None else float("nan"),
                         {k: float(x) for k, x in (top or {}).items()})
            for tok, v, top in zip(lp["tokens"], lp.get("token_logprobs") or [], tops)]


class OpenAIEngine(Engine):
    kind = "openai"
    max_logprobs = 20  # top_logprobs of the chat API (the legacy completions API allows 5)

    def __init__(self, config: OpenAIConfig | dict, cache: RequestCache | None = None,
                 transport: Any = None):
        super().__init__(cache)
        self.config = config if isinstance(config, OpenAIConfig) else OpenAIConfig.model_validate(config)
        self.model_id = f"{self.config.base_url.rstrip('/')}|{self.config.model}"
        self._transport = transport  # tests: httpx.MockTransport
        self._ssl: Any = None
        # one event loop in a background thread for the engine's life: HTTP connections and the
        # rate limiter's buckets carry over from one batch to the next
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._clients: "_ClientPool | None" = None
        self._rate: "RateLimiter | None" = None
        self._lock = threading.Lock()

    def cache_extra(self) -> str:
        import json

        return json.dumps(self.config.extra_body, sort_keys=True) if self.config.extra_body else ""

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        env = self.config.api_key_env
        key = os.environ.get(env) if env else None
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid() or not self._thread.is_alive():  # type: ignore[union-attr]
                loop = asyncio.new_event_loop()
                th = threading.Thread(target=loop.run_forever, name="curate-openai-engine", daemon=True)
                th.start()
                self._loop, self._thread, self._pid = loop, th, os.getpid()
                self._clients = _ClientPool(self._client, self.config.concurrency)
                self._rate = self._limiter()
            return self._loop

    def window(self, hint: int = 64) -> int:
        """Requests a stream keeps submitted: twice ``concurrency``, so a slot freed by an answer
        finds the next request already waiting (the stage's ``batch_size`` does not matter)."""
        return 2 * self.config.concurrency

    def _backend(self) -> "_AsyncBackend":
        return _AsyncBackend(self)

    def _generate(self, requests: list[Request], on_done: Any = None) -> list[Completion]:
        # works from any thread, also one that runs an event loop itself (Jupyter)
        loop = self._event_loop()
        return asyncio.run_coroutine_threadsafe(self._agenerate(requests, on_done), loop).result()

    async def _agenerate(self, requests: list[Request], on_done: Any = None) -> list[Completion]:
        clients, limiter = self._clients, self._rate
        assert clients is not None

        async def one(i: int, r: Request) -> Completion:
            c = await self._one(clients, r, limiter)
            if on_done is not None and c.ok:
                on_done(i, c)  # into the request cache now: an interrupted batch keeps it
                c.stored = True
            return c

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    def close(self) -> None:
        super().close()
        loop, self._loop = self._loop, None
        if loop is not None and self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            if self._clients is not None:
                try:
                    asyncio.run_coroutine_threadsafe(self._clients.aclose(), loop).result(10)
                except Exception as exc:  # noqa: BLE001  (closing: a broken connection does not matter)
                    log.debug("openai engine: closing connections: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)
            loop.close()
        self._clients = self._rate = None

    def _client(self) -> Any:
        """One HTTP client holding one keep-alive connection. ``concurrency`` of them are used side
        by side: httpx's shared connection pool costs O(requests x connections) per event, which
        capped a 64-connection pool at ~40 requests/s on this machine (benchmarks/llm_stage.py)."""
        import httpx

        cfg = self.config
        kwargs: dict[str, Any] = {}
        if self._transport is not None:
            kwargs["transport"] = self._transport
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()  # built once: loading the CA bundle per client is slow
        return httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), headers=self._headers(),
                                 timeout=httpx.Timeout(cfg.timeout), verify=self._ssl,
                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=1), **kwargs)

    def _limiter(self) -> "RateLimiter | None":
        cfg = self.config
        if cfg.requests_per_minute is None and cfg.tokens_per_minute is None:
            return None
        return RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)

    async def _one(self, clients: "_ClientPool", request: Request,
                   limiter: "RateLimiter | None" = None) -> Completion:
        cfg = self.config
        path, body = build_body(cfg.model, request, cfg.extra_body)
        if limiter is not None:
            await limiter.acquire(estimate_tokens(request))
        delay = cfg.backoff
        reason = ""
        for attempt in range(cfg.max_retries + 1):
            retry_after = None
            try:
                async with clients.lease() as client:  # at most `concurrency` requests in flight
                    return await self._post(client, path, body, request.is_chat)
            except _Retryable as exc:
                reason = str(exc)
                retry_after = exc.retry_after
            except _Fatal as exc:
                return Completion.failed(str(exc))
            if attempt < cfg.max_retries:
                wait = retry_after if retry_after is not None else delay * (0.5 + random.random())
                wait = min(wait, cfg.backoff_max)
                if attempt == 0:
                    log.info("openai engine: retrying after %s", reason)
                await asyncio.sleep(wait)
                delay = min(delay * 2, cfg.backoff_max)
        return Completion.failed(f"{reason} (after {cfg.max_retries + 1} attempts)", transient=True)

    async def _post(self, client: Any, path: str, body: dict[str, Any], chat: bool) -> Completion:
        import httpx

        try:
            resp = await client.post(path, json=body)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timeout ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"network error: {type(exc).__name__}: {exc}") from None
        status = resp.status_code
        if status in RETRY_STATUS or status >= 500:
            raise _Retryable(f"HTTP {status}: {_snippet(resp)}", _retry_after(resp))
        if status >= 400:
            raise _Fatal(f"HTTP {status}: {_snippet(resp)}")
        try:
            return parse_response(resp.json(), chat)
        except (ValueError, KeyError, TypeError) as exc:
            # a garbled body from a proxy is worth another try
            raise _Retryable(f"malformed response: {type(exc).__name__}: {exc}") from None


class _Fatal(Exception):
    pass


class _AsyncBackend(_Backend):
    """A stream's requests as tasks on the engine's event loop (at most ``concurrency`` of them in
    HTTP at a time, through the client pool); answers come back through a thread-safe queue.
    Submissions are handed to the loop in groups (one wake-up per ``wait``), and answers are handed
    back in groups too: when ``concurrency / 8`` have gathered, when none is left running, or 2 ms
    after the first of a group (each hand-over wakes the stage's thread, and two threads trading
    the GIL per answer cost more CPU than the requests themselves)."""

    FLUSH_AFTER = 0.002

    def __init__(self, engine: OpenAIEngine):
        self.engine = engine
        self.loop = engine._event_loop()
        self.answers: "queue.SimpleQueue[list[tuple[int, Completion]]]" = queue.SimpleQueue()
        self.batch: list[tuple[int, Request]] = []
        # touched in the loop thread only
        self.tasks: set[asyncio.Task] = set()
        self.done: list[tuple[int, Completion]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.group = max(1, engine.config.concurrency // 8)

    def submit(self, number: int, request: Request) -> None:
        self.batch.append((number, request))

    def _start(self, batch: list[tuple[int, Request]]) -> None:  # in the loop thread
        eng = self.engine
        for number, request in batch:
            task = self.loop.create_task(eng._one(eng._clients, request, eng._rate))  # type: ignore[arg-type]
            self.tasks.add(task)
            task.add_done_callback(functools.partial(self._done, number))

    def _done(self, number: int, task: asyncio.Task) -> None:  # in the loop thread
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        c = Completion.failed(f"{type(exc).__name__}: {exc}"[:500]) if exc is not None else task.result()
        self.done.append((number, c))
        if len(self.done) >= self.group or not self.tasks:
            self._flush()
        elif self.timer is None:
            self.timer = self.loop.call_later(self.FLUSH_AFTER, self._flush)

    def _flush(self) -> None:  # in the loop thread
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.done:
            done, self.done = self.done, []
            self.answers.put(done)

    def wait(self) -> list[tuple[int, Completion]]:
        if self.batch:
            batch, self.batch = self.batch, []
            self.loop.call_soon_threadsafe(self._start, batch)
        out = self.answers.get()
        while True:
            try:
                out += self.answers.get_nowait()
            except queue.Empty:
                return out

    def close(self) -> None:
        """Requests still out (a stage that stopped early) finish on the loop and are dropped:
        cancelling one mid-request would leave its pooled connection broken for the next."""
        if self.batch:
            self.batch = []


class _Lease:
    """``async with pool.lease() as client``: a free client (waits while all are in use)."""

    def __init__(self, pool: "_ClientPool"):
        self.pool = pool
        self.client: Any = None

    async def __aenter__(self) -> Any:
        pool = self.pool
        async with pool.cond:
            while not pool.free and len(pool.all) >= pool.size:
                await pool.cond.wait()
            if pool.free:
                self.client = pool.free.pop()
            else:
                self.client = pool.factory()
                pool.all.append(self.client)
        return self.client

    async def __aexit__(self, *exc: Any) -> None:
        pool = self.pool
        async with pool.cond:
            pool.free.append(self.client)
            pool.cond.notify()


class _ClientPool:
    """At most ``size`` HTTP clients, each used by one request at a time (created on demand)."""

    def __init__(self, factory: Any, size: int):
        self.factory = factory
        self.size = size
        self.free: list[Any] = []
        self.all: list[Any] = []
        self.cond = asyncio.Condition()

    def lease(self) -> "_Lease":
        return _Lease(self)

    async def aclose(self) -> None:
        clients, self.all, self.free = self.all, [], []
        for c in clients:
            await c.aclose()


def estimate_tokens(request: Request) -> int:
    """Tokens a request may use, for tokens-per-minute limits: prompt bytes / 4 plus max_tokens."""
    text = request.prompt if request.prompt is not None else "".join(
        m.get("content") or "" for m in request.messages or ())
    return (len(text.encode("utf-8", "surrogatepass")) + 3) // 4 + request.params.max_tokens * request.params.n


class RateLimiter:
    """Token buckets for requests and tokens per minute (each refills continuously; a bucket holds
    at most one minute of its rate). ``acquire`` waits until both allow the request."""

    def __init__(self, rpm: float | None, tpm: float | None, clock: Any = None):
        import time

        self.rpm, self.tpm = rpm, tpm
        self.clock = clock or time.monotonic
        self.req = float(rpm or 0)
        self.tok = float(tpm or 0)
        self.t = self.clock()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        dt, self.t = now - self.t, now
        if self.rpm:
            self.req = min(float(self.rpm), self.req + dt * self.rpm / 60.0)
        if self.tpm:
            self.tok = min(float(self.tpm), self.tok + dt * self.tpm / 60.0)

    def wait_time(self, tokens: int) -> float:
        """Seconds until a request of ``tokens`` may go (0: now, and the buckets are charged)."""
        self._refill()
        tokens = min(tokens, int(self.tpm)) if self.tpm else tokens
        waits = [0.0]
        if self.rpm and self.req < 1:
            waits.append((1 - self.req) * 60.0 / self.rpm)
        if self.tpm and self.tok < tokens:
            waits.append((tokens - self.tok) * 60.0 / self.tpm)
        w = max(waits)
        if w == 0.0:
            if self.rpm:
                self.req -= 1
            if self.tpm:
                self.tok -= tokens
        return w

    async def acquire(self, tokens: int) -> None:
        async with self.lock:  # first come, first served
            while (w := self.wait_time(tokens)) > 0:
                await asyncio.sleep(w)


def _snippet(resp: Any) -> str:
    try:
        return " ".join(resp.text.split())[:200]
    except Exception:  # noqa: BLE001
        return ""


def _retry_after(resp: Any) -> float | None:
    v = resp.headers.get("retry-after")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        return None
