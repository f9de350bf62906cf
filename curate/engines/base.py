"""The engine interface shared by every LLM backend.

A stage builds :class:`Request` objects (chat ``messages`` or a raw ``prompt`` plus
:class:`SamplingParams`) and calls ``engine.generate(requests)``; it gets one :class:`Completion`
per request, in order. Failed requests do not raise: their completion has ``error`` set and
``finish_reason == "error"``, so a batch always comes back whole.

``Engine.generate`` answers from the request cache (see :mod:`curate.engines.cache`) when one is
attached, and only sends the missing requests to the backend (``_generate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("curate.engines")


class SamplingParams(BaseModel):
    """How to sample. Defaults are greedy decoding (deterministic)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, description="0 = greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_tokens: int = Field(256, ge=1, description="maximum number of generated tokens")
    stop: tuple[str, ...] = Field((), description="stop strings (not included in the output)")
    seed: int | None = Field(None, description="sampling seed (for temperature > 0)")
    n: int = Field(1, ge=1, description="number of completions per request")
    logprobs: int | None = Field(
        None, ge=0, le=20,
        description="None: no logprobs; k: logprob of each generated token plus the top-k alternatives")

    @model_validator(mode="before")
    @classmethod
    def _stop_as_tuple(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("stop"), str):
            data = {**data, "stop": (data["stop"],)}
        elif isinstance(data, dict) and isinstance(data.get("stop"), list):
            data = {**data, "stop": tuple(data["stop"])}
        return data

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class AnswerSchema(BaseModel):
    """The JSON schema an answer must follow (a recipe's pydantic model, see
    :meth:`AnswerSchema.of`). ``constrain``: the engine should enforce it while decoding (OpenAI
    ``response_format`` json_schema, vLLM structured outputs); False: the answer is only validated
    after the fact (engines without structured outputs). Part of the cache key only when
    ``constrain`` (an unconstrained request is the same work as one without a schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$", description="schema name (OpenAI json_schema.name)")
    schema_text: str = Field(..., description="the JSON schema as canonical JSON text")
    strict: bool = True
    constrain: bool = True
    model: Any = Field(None, exclude=True, repr=False, description="the pydantic model answers are validated with")

    @classmethod
    def of(cls, model: type[BaseModel], *, constrain: bool = True, strict: bool = True) -> "AnswerSchema":
        """The schema of a pydantic model, in the form strict structured outputs need: every object
        closed (``additionalProperties: false``) with every property required."""
        return cls(name=re.sub(r"[^A-Za-z0-9_-]", "_", model.__name__)[:64] or "answer",
                   # properties keep the model's order: constrained decoding writes them in this order
                   schema_text=json.dumps(strict_schema(model.model_json_schema()), separators=(",", ":")),
                   strict=strict, constrain=constrain, model=model)

    @property
    def schema(self) -> dict[str, Any]:
        return json.loads(self.schema_text)

    def response_format(self) -> dict[str, Any]:
        """The OpenAI ``response_format`` of this schema."""
        return {"type": "json_schema",
                "json_schema": {"name": self.name, "schema": self.schema, "strict": self.strict}}


def strict_schema(schema: Any) -> Any:
    """A JSON schema with every object closed and all its properties required (OpenAI strict mode
    refuses schemas without; vLLM accepts them). ``title`` and ``default`` keywords are dropped."""
    if isinstance(schema, list):
        return [strict_schema(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k in ("title", "default"):
            continue
        if k in ("properties", "$defs", "definitions") and isinstance(v, dict):   # name -> schema
            out[k] = {name: strict_schema(sub) for name, sub in v.items()}
        else:
            out[k] = strict_schema(v)
    if isinstance(out.get("properties"), dict):
        out["additionalProperties"] = False
        out["required"] = list(out["properties"])
    return out


class Request(BaseModel):
    """One prompt: either chat ``messages`` ([{"role": ..., "content": ...}]) or a raw ``prompt``.
    ``answer_schema``: the JSON schema of the answer (see :class:`AnswerSchema`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    params: SamplingParams = SamplingParams()
    id: str | None = Field(None, description="caller's reference (a document id); not part of the cache key")
    add_special_tokens: bool = Field(
        True, description="raw prompts only: let the tokenizer add its special tokens (BOS). False when "
                          "the prompt text already starts with the BOS string (instruction synthesizer)")
    answer_schema: AnswerSchema | None = Field(
        None, description="the answer's JSON schema: enforced by engines with structured outputs when "
                          "``constrain``, validated by the LLM stage in any case")

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        if isinstance(data, dict):
            msgs = data.get("messages")
            if msgs is not None and not isinstance(msgs, tuple):
                data = {**data, "messages": tuple(dict(m) for m in msgs)}
            if (data.get("messages") is None) == (data.get("prompt") is None):
                raise ValueError("a request needs exactly one of 'messages' or 'prompt'")
        return data

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def payload(self) -> dict[str, Any]:
        """What identifies the work (without the caller's id)."""
        out = {"messages": [dict(m) for m in self.messages] if self.messages is not None else None,
               "prompt": self.prompt, "params": self.params.model_dump(mode="json")}
        if not self.add_special_tokens:  # only when set: older cache keys stay valid
            out["add_special_tokens"] = False
        if self.constrained is not None:  # likewise: a decoding constraint changes the answer
            s = self.constrained
            out["answer_schema"] = {"name": s.name, "schema": s.schema_text, "strict": s.strict}
        return out

    @property
    def constrained(self) -> AnswerSchema | None:
        """The schema the engine should enforce while decoding, or None."""
        s = self.answer_schema
        return s if s is not None and s.constrain else None

    def unconstrained(self) -> "Request":
        """This request without its decoding constraint (the schema is still validated)."""
        if self.constrained is None:
            return self
        return self.model_copy(update={"answer_schema": self.answer_schema.model_copy(update={"constrain": False})})


@dataclass
class TokenLogprob:
    """The logprob of one generated token and of the ``top`` alternatives at that position."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "top": self.top}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenLogprob":
        return cls(token=d["token"], logprob=float(d["logprob"]), top=dict(d.get("top") or {}))


@dataclass
class Choice:
    """One generated sequence. ``finish_reason``: "stop" (EOS or stop string), "length" or "error"."""

    text: str
    finish_reason: str
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason,
                "completion_tokens": self.completion_tokens,
                "logprobs": [t.to_dict() for t in self.logprobs] if self.logprobs is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Choice":
        lp = d.get("logprobs")
        return cls(text=d["text"], finish_reason=d["finish_reason"],
                   completion_tokens=int(d.get("completion_tokens") or 0),
                   logprobs=[TokenLogprob.from_dict(t) for t in lp] if lp is not None else None)


@dataclass
class Completion:
    """The answer to one request: ``choices`` (``n`` of them) or an ``error``."""

    choices: list[Choice]
    prompt_tokens: int = 0
    error: str | None = None
    cached: bool = False
    request_id: str | None = None
    # a failure that may pass on a later try (timeout, HTTP 5xx after the engine's retries)
    transient: bool = False
    # already written to the request cache by the backend as it arrived
    stored: bool = field(default=False, repr=False)
    # HTTP 429 answers met on the way (rate limited by the server)
    throttled: int = field(default=0, repr=False)
    # the endpoint never answered in this run and looks unreachable or misconfigured
    endpoint_dead: bool = field(default=False, repr=False)
    # not sent: the caller's budget did not admit it (``Stream`` with ``admit``)
    denied: bool = field(default=False, repr=False)
    # sent without a new reservation: a batch recorded by an earlier run already holds one (batch mode)
    prepaid: bool = field(default=False, repr=False)
    # the request's schema was not enforced: the server refused structured outputs (HTTP 400) and
    # the request went again without it
    unconstrained: bool = field(default=False, repr=False)
    # the answer validated against the request's schema (set by the LLM stage; not cached)
    parsed: Any = field(default=None, repr=False)
    # the HTTP status of a failed request (HTTP engines; 0: none or not HTTP)
    http_status: int = field(default=0, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str | None:
        return self.choices[0].text if self.choices else None

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason if self.choices else "error"

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.choices[0].logprobs if self.choices else None

    @classmethod
    def failed(cls, reason: str, request_id: str | None = None, transient: bool = False) -> "Completion":
        return cls(choices=[], error=reason, request_id=request_id, transient=transient)

    def to_dict(self) -> dict[str, Any]:
        return {"choices": [c.to_dict() for c in self.choices], "prompt_tokens": self.prompt_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Completion":
        return cls(choices=[Choice.from_dict(c) for c in d["choices"]],
                   prompt_tokens=int(d.get("prompt_tokens") or 0))


# --------------------------------------------------------------------------------------------------
# helpers shared by the backends


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; returns (text, stopped)."""
    cut = -1
    for s in stop:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return (text[:cut], True) if cut >= 0 else (text, False)


def apply_chat_template(tokenizer: Any, messages: Sequence[dict[str, str]],
                        chat_template: str | None = None) -> str:
    """Render chat messages to a prompt string with the tokenizer's (or the given) chat template,
    ending with the assistant turn header (``add_generation_prompt``)."""
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
    if chat_template:
        kwargs["chat_template"] = chat_template
    if not chat_template and not getattr(tokenizer, "chat_template", None):
        # no template: a plain, documented fallback instead of an error
        parts = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(parts) + "\nassistant:"
    return tokenizer.apply_chat_template([dict(m) for m in messages], **kwargs)


# called by HTTP backends right before each request goes out (see ``set_send_guard``)
_SEND_GUARD: "Callable[[], None] | None" = None


def set_send_guard(fn: "Callable[[], None] | None") -> None:
    """``fn()`` runs before every request an HTTP backend sends; it ends the process when the
    process must not send any more. A runner's worker sets it to exit at once when the run that
    started it is gone: an orphaned worker must not send requests the resumed run sends again."""
    global _SEND_GUARD
    _SEND_GUARD = fn


def before_send() -> None:
    if _SEND_GUARD is not None:
        _SEND_GUARD()


# told about requests as they go out and come back (progress of LLM steps; see ``set_request_listener``)
_LISTENER: "Callable[[Engine, str, Completion | None, int], None] | None" = None


def set_request_listener(fn: "Callable[[Engine, str, Completion | None, int], None] | None") -> None:
    """``fn(engine, event, completion, n)``: ``"sent"`` (n requests handed to the backend),
    ``"done"`` / ``"failed"`` (one completion, as each arrives). A runner's worker forwards these
    to the progress line: requests done, in flight, failed, tokens and cost."""
    global _LISTENER
    _LISTENER = fn


def _notify(engine: "Engine", event: str, completion: "Completion | None" = None, n: int = 1) -> None:
    if _LISTENER is not None:
        try:
            _LISTENER(engine, event, completion, n)
        except Exception as exc:  # noqa: BLE001  (progress must never fail a request)
            log.debug("request listener: %s", exc)


def cache_key(kind: str, model: str, request: Request, extra: str = "") -> str:
    """The request-cache key: engine kind, model identity, prompt/messages and sampling params
    (including the seed). ``extra`` is for anything else that changes the output (chat template)."""
    blob = json.dumps({"kind": kind, "model": model, "extra": extra, **request.payload()},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def quiet_http_logs() -> None:
    """httpx/httpcore log one INFO line per request: keep them at WARNING unless the ``curate``
    logger is at DEBUG (then the per-request lines show)."""
    if logging.getLogger("curate").isEnabledFor(logging.DEBUG):
        return
    for name in ("httpx", "httpcore"):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET or lg.level < logging.WARNING:
            lg.setLevel(logging.WARNING)


class Engine(ABC):
    """Base class of the backends. Subclasses implement ``_generate`` (uncached requests, in order,
    one Completion each, never raising for a single bad request) and set ``kind``/``model_id``."""

    kind: str = ""
    # the most alternatives per position the backend returns with ``SamplingParams.logprobs``
    # (0: the backend returns no logprobs); stages that score from logprobs check it at validate time
    max_logprobs: int = 0
    # the backend can enforce a request's JSON schema while decoding (``Request.answer_schema``);
    # False: answers are validated after the fact and asked again when they do not match
    supports_structured: bool = False

    def __init__(self, cache: "RequestCache | None" = None):
        self.cache = cache
        self.model_id: str = ""
        # lifetime totals of this engine: requests asked, answered from cache, sent to the backend
        self.stats: dict[str, int] = {"requests": 0, "cached": 0, "generated": 0, "failed": 0}

    def load(self) -> "Engine":
        """Load the model / start the backend now (engines otherwise do it on first use)."""
        return self

    def cache_extra(self) -> str:
        """Extra identity for the cache key (e.g. a custom chat template)."""
        return ""

    def share_limits(self, folder: str | None) -> None:
        """Keep rate-limit state in ``folder``, shared by every worker of a run (HTTP engines)."""

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for chunking and budgets. Backends with a tokenizer count exactly; the
        default is an estimate (UTF-8 bytes / 4, rounded up)."""
        return (len(text.encode("utf-8", "surrogatepass")) + 3) // 4

    def hf_tokenizer(self) -> Any:
        """The backend's Hugging Face tokenizer (``tokenize``/``convert_tokens_to_string``), or None
        when the engine has none (an HTTP server): exact token cuts use it, else ``count_tokens``."""
        return None

    def window(self, hint: int = 64) -> int:
        """How many requests a :class:`Stream` keeps submitted at once. Batch backends run what is
        pending in one call, so ``hint`` (the stage's ``batch_size``) sizes their calls; an HTTP
        backend overrides this with its own concurrency."""
        return max(1, hint)

    def prompt_tokens(self, request: Request) -> int:
        """Tokens of a request's prompt as the backend sees it (chat template applied when the
        engine has one, else each message counted plus a few tokens of framing)."""
        if request.prompt is not None:
            return self.count_tokens(request.prompt)
        return sum(self.count_tokens(m["content"]) + 4 for m in request.messages or ())

    def stream(self, cache: "RequestCache | None" = None, admit: "Callable[[Request], bool | None] | None" = None,
               charge: "Callable[[list[tuple[Request, Completion]]], None] | None" = None,
               stats: "Sequence[dict[str, int]]" = (), records: str | None = None) -> "Stream":
        """A :class:`Stream` over this engine: requests in, answers out as they finish. ``records``:
        where a batch backend records the batches it submitted (the step's work folder; default:
        beside the cache file)."""
        return Stream(self, cache if cache is not None else self.cache, admit, charge, stats, records)

    def _backend(self) -> "_Backend":
        """What a stream sends its misses to (default: pending requests run in one ``_generate``
        call when the stream waits)."""
        return _BatchBackend(self)

    def cached(self, requests: Sequence[Request], cache: "RequestCache | None" = None) -> list[Completion | None]:
        """The cached completion of each request, or None (no cache: all None). Does not generate."""
        cache = cache if cache is not None else self.cache
        out: list[Completion | None] = [None] * len(requests)
        if cache is None:
            return out
        extra = self.cache_extra()
        keys = [cache_key(self.kind, self.model_id, r, extra) for r in requests]
        hits = cache.get_many(keys)
        for i, k in enumerate(keys):
            if k in hits:
                c = Completion.from_dict(hits[k])
                c.cached = True
                c.request_id = requests[i].id
                out[i] = c
        return out

    def generate(self, requests: Sequence[Request | dict], cache: "RequestCache | None" = None) -> list[Completion]:
        """One completion per request, in order. ``cache`` overrides the engine's own cache (an
        engine shared by several stages, each with its cache). New answers are written to the cache
        as they arrive, so an interrupted call keeps what finished. (A :class:`Stream` with every
        request submitted at once.)"""
        reqs = [r if isinstance(r, Request) else Request.model_validate(r) for r in requests]
        stream = self.stream(cache)
        out: list[Completion | None] = [None] * len(reqs)
        try:
            for i, r in enumerate(reqs):
                stream.submit(i, r)
            while stream.pending:
                for i, c in stream.next():
                    out[i] = c
        finally:
            stream.close()
        return out  # type: ignore[return-value]

    @abstractmethod
    def _generate(self, requests: list[Request], on_done: "Callable[[int, Completion], None] | None" = None
                  ) -> list[Completion]:
        """Generate uncached requests. A backend that finishes requests one at a time (HTTP) calls
        ``on_done(index, completion)`` for each as it arrives (the stream stores it at once)."""
        ...

    def close(self) -> None:
        """Release the model / connections."""
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Backend:
    """Where a :class:`Stream` sends requests: ``submit`` may queue, ``wait`` blocks until at least
    one submitted request is answered and returns every answer ready then as (number, completion).
    ``on_done(number, completion)`` set by the stream stores an answer as soon as the backend has
    it (in the stream's thread); answers stored that way are marked ``stored``."""

    on_done: "Callable[[int, Completion], None] | None" = None
    # set by the stream: its request cache, and where a batch backend records its batches
    cache: "RequestCache | None" = None
    records: str | None = None
    # what the backend counts besides answers (batch mode: batches, expired...); a stage adds them
    # to its counters as ``llm/<name>``
    counters: "dict[str, int]" = {}

    def covers(self, key: str) -> bool:
        """True when an earlier run already submitted (and paid for) this request and its answer
        will come from there (batch mode: a recorded batch); the stream then sends it without a
        new budget reservation."""
        return False

    def submit(self, number: int, request: Request) -> None:
        raise NotImplementedError

    def wait(self) -> list[tuple[int, Completion]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _BatchBackend(_Backend):
    """Local engines (transformers, vLLM): everything pending goes to one ``_generate`` call."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.pending: list[tuple[int, Request]] = []

    def submit(self, number: int, request: Request) -> None:
        self.pending.append((number, request))

    def wait(self) -> list[tuple[int, Completion]]:
        todo, self.pending = self.pending, []
        if not todo:
            return []
        numbers = [n for n, _ in todo]

        def done(j: int, c: Completion) -> None:
            if self.on_done is not None:
                self.on_done(numbers[j], c)

        out = self.engine._generate([r for _, r in todo], done)
        if len(out) != len(todo):
            raise RuntimeError(f"{type(self.engine).__name__} returned {len(out)} completions "
                               f"for {len(todo)} requests")
        return list(zip(numbers, out))


class Stream:
    """Requests in, answers out as they finish (the loop of the LLM stages).

    ``submit(tag, request)`` looks the request up in the cache once (a hit is ready at once, marked
    ``cached``); a miss is offered to ``admit`` (a budget) which answers True (send it), False (not
    sent: answered with a failed completion marked ``denied``) or None (not now: held, offered
    again when answers have come back) and goes to the backend. ``next()`` blocks until at least
    one answer is ready and returns all ready answers as (tag, completion). New answers are charged
    (``charge``) *before* they are written to the cache, so a kill between the two can only
    over-count, never lose a charge. ``pending`` is the number of submitted requests not yet
    returned; a caller keeps it under ``engine.window()``. ``stats`` dicts (besides the engine's
    own) count ``requests``, ``cached``, ``generated`` and ``failed``. A request the backend says an
    earlier run already submitted (``backend.covers``: a recorded batch) is sent without asking
    ``admit`` (its reservation was made then) and its answer is marked ``prepaid``; ``records`` is
    where a batch backend records its batches."""

    def __init__(self, engine: "Engine", cache: "RequestCache | None" = None,
                 admit: "Callable[[Request], bool | None] | None" = None,
                 charge: "Callable[[list[tuple[Request, Completion]]], None] | None" = None,
                 stats: "Sequence[dict[str, int]]" = (), records: str | None = None):
        self.engine, self.cache, self.admit, self.charge = engine, cache, admit, charge
        self.stats = [engine.stats, *stats]
        self.extra = engine.cache_extra()
        self.backend = engine._backend()
        self.backend.on_done = self._store_one
        self.backend.cache = cache
        self.backend.records = records if records is not None else (
            cache.path + ".batches" if cache is not None else None)
        self.prepaid: set[int] = set()   # numbers sent without a reservation (``backend.covers``)
        self.ready: list[tuple[Any, Completion]] = []
        self.held: list[tuple[Any, Request, str | None]] = []
        self.sent: dict[int, tuple[Any, Request, str | None]] = {}
        # identical requests (same cache key: prompt, sampling, seed) go out once: the number in
        # flight per key, and the (tag, request) copies waiting for its answer
        self.inflight: dict[str, int] = {}
        self.copies: dict[int, list[tuple[Any, Request]]] = {}
        self.n = 0

    @property
    def pending(self) -> int:
        return len(self.ready) + len(self.held) + len(self.sent) + sum(len(v) for v in self.copies.values())

    def _count(self, key: str) -> None:
        for st in self.stats:
            st[key] = st.get(key, 0) + 1

    def submit(self, tag: Any, request: Request) -> None:
        self._count("requests")
        key = cache_key(self.engine.kind, self.engine.model_id, request, self.extra)
        if self.cache is not None:
            hit = self.cache.get(key)  # type: ignore[union-attr]
            if hit is not None:
                c = Completion.from_dict(hit)
                c.cached, c.request_id = True, request.id
                self._count("cached")
                self.ready.append((tag, c))
                return
        self._offer(tag, request, key)

    def _offer(self, tag: Any, request: Request, key: str | None) -> None:
        if key is not None and key in self.inflight:   # the same request is out: share its answer
            self.copies.setdefault(self.inflight[key], []).append((tag, request))
            return
        prepaid = key is not None and self.backend.covers(key)
        verdict = True if prepaid or self.admit is None else self.admit(request)
        if verdict is None:
            self.held.append((tag, request, key))
        elif not verdict:
            self.ready.append((tag, Completion(choices=[], error="budget", request_id=request.id, denied=True)))
        else:
            self._count("generated")
            self.n += 1
            self.sent[self.n] = (tag, request, key)
            if prepaid:
                self.prepaid.add(self.n)
            if key is not None:
                self.inflight[key] = self.n
            _notify(self.engine, "sent", None, 1)
            self.backend.submit(self.n, request)

    def _reoffer(self) -> None:
        held, self.held = self.held, []
        for tag, request, key in held:
            self._offer(tag, request, key)

    def _store(self, done: list[tuple[Request, Completion, str | None]]) -> None:
        new = [(r, c, k) for r, c, k in done if not c.stored]
        if new and self.charge is not None:
            self.charge([(r, c) for r, c, _ in new])  # failed ones too: they end a reservation
        if self.cache is not None:
            items = {k: c.to_dict() for _, c, k in new if k is not None and c.ok}
            if items:
                self.cache.put_many(items)
        for _, c, _ in new:
            c.stored = True

    def _store_one(self, number: int, c: Completion) -> None:
        entry = self.sent.get(number)
        if entry is not None:
            self._store([(entry[1], c, entry[2])])

    def next(self) -> list[tuple[Any, Completion]]:
        """All answers ready now (at least one; waits for the backend when none is)."""
        if not self.ready and not self.sent and self.held:
            self._reoffer()
        if self.ready:
            out, self.ready = self.ready, []
            return out
        if not self.sent:
            raise RuntimeError("Stream.next() with nothing submitted")
        done, out = [], []
        for number, c in self.backend.wait():
            tag, req, key = self.sent.pop(number)
            if key is not None and self.inflight.get(key) == number:
                del self.inflight[key]
            if number in self.prepaid:
                self.prepaid.discard(number)
                c.prepaid = True
            c.request_id = req.id
            if not c.ok:
                self._count("failed")
            _notify(self.engine, "done" if c.ok else "failed", c)
            done.append((req, c, key))
            out.append((tag, c))
            for tag2, req2 in self.copies.pop(number, ()):   # copies: the same answer, no new tokens
                copy = replace(c, cached=c.ok, throttled=0, stored=True)
                copy.request_id = req2.id
                self._count("cached")
                out.append((tag2, copy))
        self._store(done)
        if self.held:
            self._reoffer()
        return out

    def close(self) -> None:
        self.backend.close()


from curate.engines.cache import RequestCache  # noqa: E402  (typing + runtime use)
