"""Any OpenAI-compatible server (OpenAI, ``vllm serve``, llama.cpp server, TGI, ...).

Requests go out concurrently (asyncio + aiohttp, at most ``concurrency`` in flight over one
``ClientSession`` whose connector keeps up to ``concurrency`` keep-alive connections), from one event
loop (uvloop's where it is installed; ``uvloop: false`` for asyncio's) in a background thread that
lives as long as the engine. ``timeout`` bounds connecting and each
wait for data from the server; ``HTTP(S)_PROXY``/``NO_PROXY`` and ``SSL_CERT_FILE`` are honoured.
Chat requests use ``POST {base_url}/chat/completions``, raw prompts ``POST {base_url}/completions``.
Timeouts, network errors, 408/409/429 and 5xx answers are retried with exponential backoff and
jitter; other 4xx answers fail the request at once. A request that still fails becomes a
``Completion`` with ``error`` set (naming the endpoint); the batch goes on.

``requests_per_minute``/``tokens_per_minute`` hold for the whole run: every attempt takes its turn
from a limiter shared by all workers (:mod:`curate.llm.ratelimit`; the stage points it at the run's
work folder with ``share_limits``), with a burst of about 2 seconds' worth. An HTTP 429 holds every
worker for its ``Retry-After`` (seconds or an HTTP date), halves this process's concurrency, which
then grows back by one per window of successes (AIMD), and is counted on the completion
(``throttled``; the stage's ``llm/rate_limited``). When no request to the endpoint has succeeded yet
and it refuses connections, cannot be resolved, or answers 404/401/403, the error says the endpoint
looks unreachable or misconfigured (``endpoint_dead``) instead of asking for a rerun.

``mode: batch`` sends a stream's requests through the provider's batch API instead (``/v1/files`` +
``/v1/batches``, recorded in the step's work folder and polled; :mod:`curate.engines.openai_batch`).
A request with an answer schema to enforce (``Request.constrained``) carries it as
``response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict": true}}``
(``structured_outputs: true``, the default). A server that answers such a request HTTP 400/422 is
asked again without it; when that passes, the server is taken not to support it: logged once, and
no later request of the engine carries a schema (the stage validates the answers instead).

The API key is read from the environment variable named by ``api_key_env``; it is sent in the
``Authorization`` header only and never appears in logs, errors or outputs.
"""

from __future__ import annotations

import asyncio
import functools
import json as _json
import logging
import os
import queue
import random
import threading
import time
import weakref
from typing import Any

from curate.engines.base import Choice, Completion, Engine, Request, TokenLogprob, _Backend, before_send
from curate.engines.cache import RequestCache
from curate.engines.config import OpenAIConfig

log = logging.getLogger("curate.engines")

RETRY_STATUS = {408, 409, 425, 429}


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, status: int = 0,
                 unreachable: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.status = status
        self.unreachable = unreachable


def build_body(model: str, request: Request, extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(endpoint path, JSON body) for one request. A request whose schema is to be enforced
    (``Request.constrained``) gets ``response_format: {"type": "json_schema", "json_schema": {name,
    schema, strict}}``."""
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
    if request.constrained is not None:
        body["response_format"] = request.constrained.response_format()
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
        self._transport = transport  # batch mode's httpx client only (tests: httpx.MockTransport)
        self._ssl: Any = None
        # one event loop in a background thread for the engine's life: HTTP connections and the
        # rate limiter's buckets carry over from one batch to the next
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._session: list[Any] = [None]     # [aiohttp.ClientSession of the loop] (made in the loop)
        self._finalizer: Any = None           # closes the session and stops the loop (close() or GC)
        self._proxy: tuple[Any, Any] = (None, None)   # (proxy URL, its BasicAuth) from the environment
        self._urls: dict[str, Any] = {}       # endpoint path -> yarl.URL
        self._rate: Any = None                # curate.llm.ratelimit limiter (shared by the run's workers)
        self._aimd: Any = None                # concurrency that halves on HTTP 429
        self._rate_folder: str | None = None  # where the shared limiter keeps its state
        self._ever_ok = False                 # a request to this endpoint succeeded (this process)
        self._structured_refused: str | None = None   # why the server refused response_format (HTTP 400)
        self._lock = threading.Lock()

    @property
    def supports_structured(self) -> bool:  # type: ignore[override]
        """``structured_outputs`` is on and the server has not refused a ``response_format``."""
        return self.config.structured_outputs and self._structured_refused is None

    def _refuse_structured(self, error: str) -> None:
        with self._lock:
            if self._structured_refused is not None:
                return
            self._structured_refused = error
        log.warning("openai engine: %s refused response_format (json_schema): %s; answers are asked for "
                    "without it from now on and validated against their schema (set structured_outputs: "
                    "false in the engine config to skip the first try)", self.config.base_url, error[:300])

    def share_limits(self, folder: str | None) -> None:
        """Keep the rate-limit state in ``folder`` (the run's work folder), shared with every
        worker process of the run (see :mod:`curate.llm.ratelimit`)."""
        with self._lock:
            if folder != self._rate_folder:
                self._rate_folder = folder
                if self._rate is not None:
                    self._rate.close()
                self._rate = None

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
                loop = new_event_loop(self.config.uvloop)
                th = threading.Thread(target=loop.run_forever, name="curate-openai-engine", daemon=True)
                th.start()
                if self._finalizer is not None:
                    if self._pid == os.getpid():
                        self._finalizer()  # the old loop (its thread died): close what is left
                    else:
                        # a forked child's copy of the parent's loop, thread and session: kept, never
                        # closed nor collected (closing them would unregister the parent's sockets
                        # from the epoll instance both processes share)
                        _ORPHANS.append(self._finalizer.detach())
                self._loop, self._thread, self._pid = loop, th, os.getpid()
                self._session = [None]
                self._finalizer = weakref.finalize(self, _shutdown, loop, th, self._pid, self._session)
                self._rate = None
                from curate.llm.ratelimit import AIMD

                self._aimd = AIMD(self.config.concurrency)
            if self._rate is None:
                self._rate = self._limiter()
            return self._loop

    def window(self, hint: int = 64) -> int:
        """Requests a stream keeps submitted: twice ``concurrency``, so a slot freed by an answer
        finds the next request already waiting (the stage's ``batch_size`` does not matter).
        Batch mode: everything a stage has (one table of rows, its follow-ups after): it all goes
        out in one upload (several batches when over ``batch_max_requests``)."""
        if self.config.mode == "batch":
            return 1_000_000
        return 2 * self.config.concurrency

    def _backend(self) -> "_Backend":
        if self.config.mode == "batch":
            from curate.engines.openai_batch import BatchBackend

            return BatchBackend(self)
        return _AsyncBackend(self)

    def _generate(self, requests: list[Request], on_done: Any = None) -> list[Completion]:
        # works from any thread, also one that runs an event loop itself (Jupyter)
        loop = self._event_loop()
        return asyncio.run_coroutine_threadsafe(self._agenerate(requests, on_done), loop).result()

    async def _agenerate(self, requests: list[Request], on_done: Any = None) -> list[Completion]:
        limiter = self._rate

        async def one(i: int, r: Request) -> Completion:
            c = await self._one(r, limiter)
            if on_done is not None and c.ok:
                on_done(i, c)  # into the request cache now: an interrupted batch keeps it
                c.stored = True
            return c

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    def close(self) -> None:
        super().close()
        self._loop = None
        if self._finalizer is not None:
            self._finalizer()
        if self._rate is not None:
            self._rate.close()
        self._rate = None

    def _client(self) -> Any:
        """The loop's HTTP session (made on first use, in the loop thread): one aiohttp
        ``ClientSession`` whose connector holds up to ``concurrency`` keep-alive connections (the
        AIMD gate keeps at most that many requests in flight). aiohttp costs ~0.3 ms of CPU per
        request at 512 in flight, where a single httpx pool cost ~20 ms (benchmarks/llm_stage.py).
        ``HTTP(S)_PROXY``/``NO_PROXY`` apply as they did with httpx (looked up once per session, not
        per request as aiohttp's ``trust_env`` does, in a thread each time; no ``.netrc``, as with
        httpx); the TLS context is httpx's (certifi, ``SSL_CERT_FILE``/``SSL_CERT_DIR``)."""
        session = self._session[0]
        if session is None or session.closed:
            import aiohttp

            cfg = self.config
            if self._ssl is None:
                self._ssl = _ssl_context()  # built once: loading the CA bundle is slow
            t = cfg.timeout
            # sock_connect: the TCP/TLS connect; sock_read: each wait for data (like httpx's read timeout)
            timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=t, sock_read=t)
            connector = aiohttp.TCPConnector(limit=cfg.concurrency, limit_per_host=0, ssl=self._ssl,
                                             force_close=False, enable_cleanup_closed=False)
            session = self._session[0] = aiohttp.ClientSession(
                connector=connector, headers=self._headers(), timeout=timeout, trust_env=False,
                auto_decompress=True, raise_for_status=False)
            self._proxy = env_proxy(cfg.base_url)
        return session

    def _limiter(self) -> Any:
        """The run-wide limiter when the config has rates (a SQLite file in the work folder, or a
        Ray actor), else one in this process that only holds requests after an HTTP 429."""
        from curate.llm.ratelimit import LocalLimiter, shared_limiter

        cfg = self.config
        if cfg.requests_per_minute is None and cfg.tokens_per_minute is None:
            return LocalLimiter(None, None)
        return shared_limiter(self._rate_folder, self.model_id, cfg.requests_per_minute, cfg.tokens_per_minute)

    def url(self, path: str) -> str:
        return self.config.base_url.rstrip("/") + path

    async def _one(self, request: Request, limiter: Any = None, stream: Any = None) -> Completion:
        """One request, with its schema as ``response_format`` while the server takes it (decided
        when the request goes out). An HTTP 400/422 to a request with a schema is asked once more
        without it: when that passes, the server does not do structured outputs (logged once; no
        later request carries it) and the answer is marked ``unconstrained`` (the stage validates
        it and counts ``llm/structured_fallback``). ``stream``: the ``_AsyncBackend`` it belongs to
        (nothing is sent once that stream is closed)."""
        c = await self._send(request, limiter, stream)
        if c.ok or request.constrained is None or c.unconstrained or c.http_status not in (400, 422):
            return c
        plain = await self._send(request.unconstrained(), limiter, stream)
        if plain.ok:
            self._refuse_structured(c.error or "")
            plain.unconstrained = True
        return plain

    async def _send(self, request: Request, limiter: Any = None, stream: Any = None) -> Completion:
        from curate.llm.ratelimit import wait_for_slot

        cfg = self.config
        path, body = build_body(cfg.model, request, cfg.extra_body)
        dropped = False   # the request's schema was left out (structured outputs off or refused)
        tokens = estimate_tokens(request)
        aimd = self._aimd
        delay = cfg.backoff
        reason = ""
        throttled = 0
        retries = cfg.max_retries
        attempt = 0
        unreachable = False
        while True:
            retry_after = None
            try:
                async with aimd:  # at most `concurrency` (lowered after 429s) requests in flight
                    session = self._client()  # (made before the rate limiter's turn is taken)
                    if limiter is not None:  # every attempt counts (the server counts it)
                        await wait_for_slot(limiter, tokens)
                    before_send()  # a runner's worker whose run is gone stops here
                    if stream is not None and stream.closed:   # its stage stopped: not sent
                        return Completion.failed("not sent: the stage stopped", request.id, transient=True)
                    if "response_format" in body and request.constrained is not None \
                            and not self.supports_structured:
                        path, body = build_body(cfg.model, request.unconstrained(), cfg.extra_body)
                        dropped = True
                    c = await self._post(session, path, body, request.is_chat)
                aimd.success()
                self._ever_ok = True
                c.throttled = throttled
                c.unconstrained = dropped
                return c
            except _Retryable as exc:
                reason = str(exc)
                retry_after = exc.retry_after
                unreachable = exc.unreachable
                if exc.status == 429:
                    throttled += 1
                    if aimd.throttled():
                        log.info("openai engine: HTTP 429 from %s: concurrency lowered to %d",
                                 self.url(path), int(aimd.limit))
                    if limiter is not None:  # every worker waits for the Retry-After
                        until = time.time() + (retry_after if retry_after is not None else delay)
                        await asyncio.get_running_loop().run_in_executor(None, limiter.hold, until)
                if unreachable and not self._ever_ok:
                    retries = min(retries, 2)  # a dead endpoint: do not spend a minute on it
            except _Fatal as exc:
                c = Completion.failed(self._describe(path, str(exc), exc.unreachable))
                c.http_status = exc.status
                c.unconstrained = dropped
                c.throttled = throttled
                c.endpoint_dead = exc.unreachable and not self._ever_ok
                return c
            if attempt >= retries:
                break
            wait = retry_after if retry_after is not None else delay * (0.5 + random.random())
            wait = min(wait, cfg.backoff_max)
            if attempt == 0:
                log.info("openai engine: retrying %s after %s", self.url(path), reason)
            await asyncio.sleep(wait)
            delay = min(delay * 2, cfg.backoff_max)
            attempt += 1
        dead = unreachable and not self._ever_ok
        c = Completion.failed(self._describe(path, f"{reason} (after {attempt + 1} attempts)", dead),
                              transient=not dead)
        c.throttled = throttled
        c.endpoint_dead = dead
        return c

    def _describe(self, path: str, error: str, unreachable: bool) -> str:
        """An error naming the endpoint; when no request to it ever succeeded in this process and
        the error says it cannot be reached (connection refused, DNS, 404, 401/403), says so."""
        msg = f"POST {self.url(path)}: {error}"
        if unreachable and not self._ever_ok:
            msg += (f"; no request to {self.config.base_url} has succeeded in this run: the endpoint looks "
                    "unreachable or misconfigured (check base_url, that the server is up, the model "
                    "name and api_key_env)")
        return msg

    async def _post(self, session: Any, path: str, body: dict[str, Any], chat: bool) -> Completion:
        import aiohttp

        try:
            proxy, proxy_auth = self._proxy
            url = self._urls.get(path)
            if url is None:  # parsed once per path, not per request
                from yarl import URL

                url = self._urls[path] = URL(self.url(path))
            async with session.post(url, data=_dumps(body), proxy=proxy, proxy_auth=proxy_auth) as resp:
                status = resp.status
                raw = await resp.read()
                headers = resp.headers
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise _Retryable(f"timeout ({_error_name(exc)})") from None
        except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS: nothing was sent
            raise _Retryable(f"cannot connect: {_error_name(exc)}: {exc}", unreachable=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Retryable(f"network error: {_error_name(exc)}: {exc}") from None
        if status in RETRY_STATUS or status >= 500:
            raise _Retryable(f"HTTP {status}: {_snippet(raw)}", parse_retry_after(headers.get("Retry-After")),
                             status=status)
        if status >= 400:
            raise _Fatal(f"HTTP {status}: {_snippet(raw)}", unreachable=status in (401, 403, 404), status=status)
        try:
            return parse_response(_loads(raw), chat)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # a garbled body from a proxy is worth another try
            raise _Retryable(f"malformed response: {type(exc).__name__}: {exc}") from None


class _Fatal(Exception):
    def __init__(self, reason: str, unreachable: bool = False, status: int = 0):
        super().__init__(reason)
        self.unreachable = unreachable
        self.status = status


class _AsyncBackend(_Backend):
    """A stream's requests as tasks on the engine's event loop (at most ``concurrency`` of them in
    HTTP at a time, over the engine's session); answers come back through a thread-safe queue.
    Submissions are handed to the loop in groups (each ``concurrency / 8`` submitted, and what is
    left at each ``wait``: the first requests go out while the stage still builds the rest), and
    answers are handed back in groups too: when ``concurrency / 8`` have gathered, when none is left
    running, or 2 ms after the first of a group (each hand-over wakes the stage's thread, and two threads trading
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
        self.closed = False

    def submit(self, number: int, request: Request) -> None:
        self.batch.append((number, request))
        if len(self.batch) >= self.group:
            batch, self.batch = self.batch, []
            self.loop.call_soon_threadsafe(self._start, batch)

    def _start(self, batch: list[tuple[int, Request]]) -> None:  # in the loop thread
        eng = self.engine
        for number, request in batch:
            task = self.loop.create_task(eng._one(request, eng._rate, self))
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
        self.closed = True   # requests still waiting for a connection are not sent
        if self.batch:
            self.batch = []


_ORPHANS: list[Any] = []  # see OpenAIEngine._event_loop


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread, pid: int, box: list[Any]) -> None:
    """Close the loop's HTTP session, then stop the loop (``close()``, or the engine garbage
    collected, or the interpreter exiting). Another process's (forked) copy is not touched."""
    if pid != os.getpid() or not thread.is_alive():
        return
    session, box[0] = box[0], None
    done = threading.Event()

    async def stop() -> None:
        try:
            if session is not None:
                await session.close()
        except Exception as exc:  # noqa: BLE001  (closing: a broken connection does not matter)
            log.debug("openai engine: closing connections: %s", exc)
        finally:
            loop.stop()
            done.set()

    try:
        loop.call_soon_threadsafe(lambda: loop.create_task(stop()))
    except RuntimeError:  # the loop is closed already
        return
    if threading.current_thread() is not thread:  # (a garbage collection may run in the loop's thread)
        done.wait(10)
        thread.join(10)
        if not thread.is_alive():
            loop.close()


def new_event_loop(use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    """The engine's event loop: uvloop's where it is installed (``use_uvloop``), else asyncio's.
    On 2 cores with 512 requests in flight it took the stage from 0.90 to 0.91 of the concurrency
    bound (benchmarks/llm_stage.py): less CPU per request in the loop thread, so answers wait less."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def estimate_tokens(request: Request) -> int:
    """Tokens a request may use, for tokens-per-minute limits: prompt bytes / 4 plus max_tokens."""
    text = request.prompt if request.prompt is not None else "".join(
        m.get("content") or "" for m in request.messages or ())
    return (len(text.encode("utf-8", "surrogatepass")) + 3) // 4 + request.params.max_tokens * request.params.n


def _snippet(raw: bytes) -> str:
    return " ".join(raw[:2000].decode("utf-8", "replace").split())[:200]


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return _json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escaped as \uXXXX, the body stays valid UTF-8
        return _json.dumps(body, separators=(",", ":")).encode("ascii")


def _loads(raw: bytes) -> Any:
    return _json.loads(raw)


# aiohttp's exceptions under the names httpx gave them (errors, logs and docs read the same as before)
_ERROR_NAMES = {
    "ClientConnectorError": "ConnectError", "ClientConnectorDNSError": "ConnectError",
    "ClientConnectorSSLError": "ConnectError", "ClientConnectorCertificateError": "ConnectError",
    "ClientProxyConnectionError": "ProxyError", "ConnectionTimeoutError": "ConnectTimeout",
    "SocketTimeoutError": "ReadTimeout", "ServerTimeoutError": "ReadTimeout", "TimeoutError": "ReadTimeout",
    "ServerDisconnectedError": "RemoteProtocolError", "ClientPayloadError": "RemoteProtocolError",
    "ClientResponseError": "RemoteProtocolError", "ClientOSError": "ReadError",
    "InvalidURL": "UnsupportedProtocol", "InvalidUrlClientError": "UnsupportedProtocol",
    "NonHttpUrlClientError": "UnsupportedProtocol",
}


def _error_name(exc: BaseException) -> str:
    name = type(exc).__name__
    return _ERROR_NAMES.get(name, name)


def env_proxy(url: str) -> tuple[Any, Any]:
    """(proxy URL, proxy BasicAuth) for ``url`` from ``HTTP_PROXY``/``HTTPS_PROXY`` (any case), none
    when ``NO_PROXY`` covers its host: aiohttp's own lookup (``trust_env``; ``ALL_PROXY`` is not read)."""
    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL

    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None


def _ssl_context() -> Any:
    """The TLS context httpx would use (certifi's CA bundle, ``SSL_CERT_FILE``/``SSL_CERT_DIR``)."""
    import httpx

    try:
        return httpx.create_ssl_context(trust_env=True)
    except TypeError:  # older httpx
        return httpx.create_ssl_context()


def parse_retry_after(v: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta seconds or an HTTP date."""
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(v.strip()).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))
