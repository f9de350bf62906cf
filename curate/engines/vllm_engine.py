"""In-process vLLM offline batch generation (``vllm.LLM``); needs the ``gpu`` extra and a GPU.

``vllm`` is imported lazily, in ``VLLMEngine.__init__``. Everything around the call is plain code
tested without a GPU: :func:`sampling_kwargs` (our SamplingParams -> ``vllm.SamplingParams``
keyword arguments) and :func:`completion_from_output` (``vllm.RequestOutput`` -> Completion).

Chat messages are rendered with the tokenizer's chat template by us (``chat_mode: tokenizer``, the
default: the prompt string is explicit and mixed chat/raw batches go through one ``LLM.generate``
call), or by vLLM (``chat_mode: vllm``: ``LLM.chat``). Under the Ray runner the stage asks for
``tensor_parallel_size`` GPUs, so each engine lives in a worker holding its GPUs.

Streaming (``submit`` / ``stream``): a background thread owns vLLM's ``LLMEngine`` (``llm.llm_engine``)
and keeps stepping it while the caller parses or writes earlier answers; new requests join the
running batch at the next step (vLLM schedules continuously), so the GPU is never idle while work
is queued. Each finished request comes back as soon as it finishes.

A request whose answer schema is to be enforced (``Request.constrained``) is decoded with vLLM's
structured outputs: ``SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))``
(``vllm.sampling_params``; the same names in every supported release).

Supported vLLM releases: :data:`SUPPORTED_VLLM` (the ``gpu`` extra's range). Every vLLM name and
argument this module uses is listed in :mod:`curate.engines.vllm_contract` and checked against
the real packages by ``make vllm-contract``; an engine started on another release fails at once.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import logging
import os
import queue
import sys
import threading
from typing import Any, Iterator, Sequence

from curate.engines.base import (AnswerSchema, Choice, Completion, Engine, Request, SamplingParams, TokenLogprob,
                                 _Backend)
from curate.engines.base import apply_chat_template, cache_key
from curate.engines.cache import RequestCache
from curate.engines.config import VLLMConfig

log = logging.getLogger("curate.engines")

# vLLM releases this adapter is checked against (`make vllm-contract`); the `gpu` extra pins the same
SUPPORTED_VLLM = ">=0.11,<0.34"


class UnsupportedVLLM(RuntimeError):
    """The installed vLLM is outside :data:`SUPPORTED_VLLM`."""


def vllm_version() -> str | None:
    """The installed vLLM version without importing it (an already imported module's
    ``__version__`` wins); None when vLLM is not installed."""
    mod = sys.modules.get("vllm")
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_vllm_version(version: str | None) -> str:
    """``version`` when it is a supported vLLM release; ImportError (not installed) or
    :class:`UnsupportedVLLM` with what to install."""
    if version is None:
        raise ImportError("the vllm engine needs vLLM: pip install 'curate[gpu]'")
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        ok = SpecifierSet(SUPPORTED_VLLM).contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise UnsupportedVLLM(
            f"vLLM {version} is not supported by curate's vllm engine (supported: vllm{SUPPORTED_VLLM}, "
            f"the releases its adapter is checked against by `make vllm-contract`); "
            f"install one with: pip install 'vllm{SUPPORTED_VLLM}'")
    return version


def sampling_kwargs(params: SamplingParams, schema: AnswerSchema | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams``. Greedy requests ask for one sequence (copies
    are made for ``n`` > 1: greedy samples are identical). A schema to enforce becomes
    ``structured_outputs``: here the keyword arguments of ``vllm.sampling_params.StructuredOutputsParams``
    (``{"json": schema}``), made into that object by the engine."""
    kw: dict[str, Any] = {
        "n": 1 if params.greedy else params.n,
        "temperature": params.temperature,
        "top_p": 1.0 if params.greedy else params.top_p,
        "max_tokens": params.max_tokens,
    }
    if params.stop:
        kw["stop"] = list(params.stop)
    if params.seed is not None and not params.greedy:
        kw["seed"] = params.seed
    if params.logprobs is not None:
        kw["logprobs"] = params.logprobs
    if schema is not None:
        kw["structured_outputs"] = {"json": schema.schema}
    return kw


def _token_logprobs(token_ids: Any, logprobs: Any, k: int) -> list[TokenLogprob] | None:
    if logprobs is None:
        return None
    out = []
    for tid, pos in zip(token_ids, logprobs):
        if not pos:
            continue
        mine = pos.get(tid)
        top: dict[str, float] = {}
        if k:
            ranked = sorted(pos.values(), key=lambda lp: (getattr(lp, "rank", None) or 10**9))
            for lp in ranked[:k]:
                top[lp.decoded_token or ""] = float(lp.logprob)
        if mine is None:
            continue
        out.append(TokenLogprob(mine.decoded_token or "", float(mine.logprob), top))
    return out


def _finish(reason: Any) -> str:
    if reason in (None, "stop"):
        return "stop"
    return str(reason)  # "length", "abort"


def completion_from_output(output: Any, params: SamplingParams) -> Completion:
    """A ``vllm.RequestOutput`` (``prompt_token_ids``, ``outputs``: CompletionOutput with ``text``,
    ``token_ids``, ``finish_reason``, ``logprobs``) -> Completion."""
    choices = []
    outs = sorted(output.outputs, key=lambda o: getattr(o, "index", 0))
    for o in outs:
        token_ids = list(o.token_ids or [])
        lps = _token_logprobs(token_ids, o.logprobs, params.logprobs or 0) if params.logprobs is not None else None
        choices.append(Choice(text=o.text, finish_reason=_finish(o.finish_reason),
                              completion_tokens=len(token_ids), logprobs=lps))
    if choices and len(choices) < params.n:
        choices = [Choice(c.text, c.finish_reason, c.completion_tokens, c.logprobs)
                   for c in choices for _ in range(params.n // len(choices))]
    if not choices:
        return Completion.failed("vLLM returned no output")
    prompt_ids = getattr(output, "prompt_token_ids", None) or []
    return Completion(choices=choices, prompt_tokens=len(prompt_ids))


def llm_kwargs(cfg: VLLMConfig) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``."""
    kw: dict[str, Any] = {
        "model": cfg.model,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "dtype": cfg.dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "enforce_eager": cfg.enforce_eager,
        "seed": cfg.seed,
    }
    if cfg.tokenizer:
        kw["tokenizer"] = cfg.tokenizer
    if cfg.max_model_len:
        kw["max_model_len"] = cfg.max_model_len
    if cfg.quantization:
        kw["quantization"] = cfg.quantization
    kw["enable_prefix_caching"] = cfg.enable_prefix_caching
    for key in ("max_num_seqs", "max_num_batched_tokens", "speculative_config"):
        value = getattr(cfg, key)
        if value is not None:
            kw[key] = dict(value) if isinstance(value, dict) else value
    kw.update(cfg.engine_kwargs)
    return kw


_STOP = object()


class VLLMStream:
    """Requests submitted to a running engine (:meth:`VLLMEngine.submit`). Iterating yields
    ``(index, Completion)`` as each request finishes (cached ones first); answers are written to
    the request cache as they are yielded. :meth:`results` waits for all, in request order."""

    def __init__(self, engine: "VLLMEngine", requests: list[Request], cache: RequestCache | None):
        self.engine = engine
        self.requests = requests
        self.cache = cache
        self._q: queue.Queue = queue.Queue()
        self._left = len(requests)

    def _deliver(self, index: int, completion: Completion) -> None:   # called by the feeder thread
        self._q.put((index, completion))

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[tuple[int, Completion]]:
        extra = self.engine.cache_extra()
        while self._left:
            item = self._q.get()
            if isinstance(item, BaseException):
                self._left = 0
                raise item
            self._left -= 1
            i, c = item
            c.request_id = self.requests[i].id
            if not c.cached:
                if not c.ok:
                    self.engine.stats["failed"] += 1
                elif self.cache is not None:
                    self.cache.put(cache_key(self.engine.kind, self.engine.model_id, self.requests[i], extra),
                                   c.to_dict())
                    c.stored = True
            yield i, c

    def results(self) -> list[Completion]:
        out: list[Completion | None] = [None] * len(self.requests)
        for i, c in self:
            out[i] = c
        return out  # type: ignore[return-value]


class _Feeder:
    """The thread that owns ``LLMEngine``: adds submitted requests and steps the engine while any
    request is unfinished; waits (blocking, no polling) only when the engine has nothing to do."""

    def __init__(self, core: Any):
        self.core = core
        self.inbox: queue.Queue = queue.Queue()
        self.pending: dict[str, tuple[VLLMStream, int, SamplingParams]] = {}
        self.ids = itertools.count()
        # steps taken, and steps taken while requests were waiting in the inbox (0: never idle)
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="curate-vllm-feeder", daemon=True)
        self.thread.start()

    def put(self, stream: VLLMStream, items: list[tuple[int, Any, Any, SamplingParams]]) -> None:
        self.inbox.put((stream, items))

    def stop(self) -> None:
        self.inbox.put(_STOP)
        self.thread.join(timeout=60)

    def _add(self, stream: VLLMStream, items: list[tuple[int, Any, Any, SamplingParams]]) -> None:
        for index, prompt, vsp, params in items:
            rid = f"curate-{next(self.ids)}"
            try:
                self.core.add_request(rid, prompt, vsp)
            except Exception as exc:  # noqa: BLE001  (a prompt vLLM refuses: too long, bad ids)
                stream._deliver(index, Completion.failed(f"{type(exc).__name__}: {exc}"[:500]))
                continue
            self.pending[rid] = (stream, index, params)

    def _loop(self) -> None:
        while True:
            try:
                item = self.inbox.get(block=not self.pending)
            except queue.Empty:
                item = None
            while item is not None:
                if item is _STOP:
                    self._fail_pending(RuntimeError("vllm engine closed"))
                    return
                self._add(*item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            if not self.pending:
                continue
            try:
                outputs = self.core.step()
            except Exception as exc:  # noqa: BLE001  (the engine died: every waiting request fails)
                log.error("vllm: engine step failed: %s", exc)
                self._fail_pending(exc)
                continue
            self.steps += 1
            for ro in outputs:
                if not getattr(ro, "finished", True):
                    continue
                entry = self.pending.pop(ro.request_id, None)
                if entry is None:
                    continue
                stream, index, params = entry
                try:
                    c = completion_from_output(ro, params)
                except Exception as exc:  # noqa: BLE001
                    c = Completion.failed(f"{type(exc).__name__}: {exc}"[:500])
                stream._deliver(index, c)

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self.pending = self.pending, {}
        if pending:
            try:
                self.core.abort_request(list(pending))
            except Exception as abort_exc:  # noqa: BLE001
                log.warning("vllm: aborting requests failed: %s", abort_exc)
        for stream, index, _ in pending.values():
            stream._deliver(index, Completion.failed(f"{type(exc).__name__}: {exc}"[:500]))


class _FeederBackend(_Backend):
    """A :class:`~curate.engines.base.Stream`'s requests on the feeder thread: ``submit`` queues,
    ``wait`` hands what was queued to the engine and blocks until at least one answer is back."""

    def __init__(self, engine: "VLLMEngine"):
        self.engine = engine
        self.batch: list[tuple[int, Any, Any, SamplingParams]] = []
        self._q: queue.Queue = queue.Queue()

    def _deliver(self, index: int, completion: Completion) -> None:   # the feeder thread
        self._q.put((index, completion))

    def submit(self, number: int, request: Request) -> None:
        eng = self.engine
        try:
            self.batch.append((number, eng._prompt(request),
                               eng._sampling(request.params, final_only=True, schema=request.constrained),
                               request.params))
        except Exception as exc:  # noqa: BLE001  (a broken template/message: this request fails)
            self._deliver(number, Completion.failed(f"prompt: {type(exc).__name__}: {exc}"[:500]))

    def wait(self) -> list[tuple[int, Completion]]:
        if self.batch:
            batch, self.batch = self.batch, []
            self.engine.feeder.put(self, batch)  # type: ignore[arg-type]
        out = [self._q.get()]
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out


class VLLMEngine(Engine):
    kind = "vllm"
    max_logprobs = 20  # vLLM's default ``max_logprobs``
    supports_structured = True  # SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))

    def __init__(self, config: VLLMConfig | dict, cache: RequestCache | None = None, llm: Any = None):
        super().__init__(cache)
        self.config = config if isinstance(config, VLLMConfig) else VLLMConfig.model_validate(config)
        self.model_id = os.path.basename(self.config.model.rstrip("/")) or self.config.model
        # vllm.LLM starts on first use: a run answered from the cache never touches the GPU
        self._llm = llm
        if llm is None:
            self.vllm_version = check_vllm_version(vllm_version())
        self._sampling_cls: Any = None
        self._final_only: Any = None
        self._feeder: _Feeder | None = None
        self._feeder_lock = threading.Lock()

    @property
    def llm(self) -> Any:
        if self._llm is None:
            if self.config.model.endswith(".gguf") and not self.config.tokenizer:
                log.warning("vllm: GGUF model without 'tokenizer': vLLM converts the GGUF tokenizer (slow)")
            try:
                from vllm import LLM
            except ImportError as exc:
                raise ImportError("the vllm engine needs vLLM: pip install 'curate[gpu]'") from exc
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self._llm = LLM(**llm_kwargs(self.config))
        return self._llm

    def load(self) -> "VLLMEngine":
        """Start vLLM now (otherwise done on first use)."""
        self.llm  # noqa: B018
        return self

    def cache_extra(self) -> str:
        return f"{self.config.chat_mode}|{self.config.chat_template or ''}"

    def _sampling(self, params: SamplingParams, final_only: bool = False, schema: AnswerSchema | None = None) -> Any:
        if self._sampling_cls is None:
            from vllm import SamplingParams as VSP

            self._sampling_cls = VSP
        kw = sampling_kwargs(params, schema)
        if "structured_outputs" in kw:   # vLLM's structured-output decoding (xgrammar/guidance)
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
        if final_only:   # LLMEngine.step returns a request once, when it finishes
            if self._final_only is None:
                from vllm.sampling_params import RequestOutputKind

                self._final_only = RequestOutputKind.FINAL_ONLY
            kw["output_kind"] = self._final_only
        return self._sampling_cls(**kw)

    def _prompt(self, request: Request) -> Any:
        """What ``LLM.generate`` / ``LLMEngine.add_request`` take for a request: the rendered text,
        or token ids when a raw prompt carries its own BOS."""
        if request.is_chat or request.add_special_tokens:
            return self.render(request)
        tok = self.llm.get_tokenizer()
        return {"prompt_token_ids": tok.encode(request.prompt or "", add_special_tokens=False)}

    # -- streaming -------------------------------------------------------------------------------
    def submit(self, requests: Sequence[Request | dict], cache: RequestCache | None = None) -> VLLMStream:
        """Queue ``requests`` on the running engine and return at once. The engine works on them
        (together with everything submitted before) while the caller does other work; iterate the
        returned :class:`VLLMStream` for ``(index, Completion)`` as each finishes. Cached requests
        are answered without the engine. Chat requests are rendered with the tokenizer's template
        (``chat_mode`` does not apply here)."""
        reqs = [r if isinstance(r, Request) else Request.model_validate(r) for r in requests]
        cache = cache if cache is not None else self.cache
        stream = VLLMStream(self, reqs, cache)
        hits = self.cached(reqs, cache)
        self.stats["requests"] += len(reqs)
        items = []
        for i, (r, hit) in enumerate(zip(reqs, hits)):
            if hit is not None:
                self.stats["cached"] += 1
                stream._deliver(i, hit)
                continue
            try:
                items.append((i, self._prompt(r), self._sampling(r.params, final_only=True, schema=r.constrained),
                              r.params))
            except Exception as exc:  # noqa: BLE001  (a broken template/message: this request fails)
                stream._deliver(i, Completion.failed(f"prompt: {type(exc).__name__}: {exc}"[:500]))
        self.stats["generated"] += len(reqs) - sum(h is not None for h in hits)
        if items:
            self.feeder.put(stream, items)
        return stream

    def _backend(self) -> "_Backend":
        """The LLM stages' :class:`~curate.engines.base.Stream` feeds the running engine through the
        feeder thread (continuous batching across calls: the engine is never idle while the stage
        parses or writes); ``chat_mode: vllm`` (``LLM.chat``) keeps one ``LLM`` call per wait."""
        if self.config.chat_mode == "vllm" or not self.config.continuous:
            return super()._backend()
        return _FeederBackend(self)

    @property
    def feeder(self) -> _Feeder:
        with self._feeder_lock:
            if self._feeder is None or not self._feeder.thread.is_alive():
                self._feeder = _Feeder(self.llm.llm_engine)
            return self._feeder

    def render(self, request: Request) -> str:
        if request.messages is not None:
            return apply_chat_template(self.llm.get_tokenizer(), request.messages, self.config.chat_template)
        return request.prompt or ""

    def count_tokens(self, text: str) -> int:
        return len(self.llm.get_tokenizer().encode(text, add_special_tokens=False))

    def window(self, hint: int = 64) -> int:
        """Requests per ``LLM.generate`` call: at least 1,024, so vLLM's scheduler stays full (it
        batches continuously inside one call; fewer prompts leave it idle between calls)."""
        return max(hint, 1024)

    def prompt_tokens(self, request: Request) -> int:
        return self.count_tokens(self.render(request))  # the chat template applied, exactly

    def hf_tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def _generate(self, requests: list[Request], on_done: Any = None) -> list[Completion]:
        self.load()  # a failing start (no GPU memory...) is an error of the run, not of the requests
        out: list[Completion | None] = [None] * len(requests)
        if self.config.chat_mode == "vllm":
            chat = [i for i, r in enumerate(requests) if r.is_chat]
            plain = [i for i, r in enumerate(requests) if not r.is_chat]
        else:
            chat, plain = [], list(range(len(requests)))
        if plain:
            self._call(requests, plain, out, chat=False)
        if chat:
            self._call(requests, chat, out, chat=True)
        return out  # type: ignore[return-value]

    def _call(self, requests: list[Request], idx: list[int], out: list[Completion | None], chat: bool) -> None:
        def run(ids: list[int]) -> list[Any]:
            sps = [self._sampling(requests[i].params, schema=requests[i].constrained) for i in ids]
            if chat:
                kw: dict[str, Any] = {"use_tqdm": False}
                if self.config.chat_template:
                    kw["chat_template"] = self.config.chat_template
                convs = [[dict(m) for m in requests[i].messages] for i in ids]  # type: ignore[union-attr]
                return self.llm.chat(convs, sampling_params=sps, **kw)
            prompts = [self._prompt(requests[i]) for i in ids]
            return self.llm.generate(prompts, sampling_params=sps, use_tqdm=False)

        try:
            results = run(idx)
            if len(results) != len(idx):
                raise RuntimeError(f"vLLM returned {len(results)} outputs for {len(idx)} prompts")
            for i, ro in zip(idx, results):
                out[i] = completion_from_output(ro, requests[i].params)
        except Exception as exc:  # noqa: BLE001  (e.g. one prompt too long: isolate it)
            if len(idx) == 1:
                out[idx[0]] = Completion.failed(f"{type(exc).__name__}: {exc}"[:500])
                return
            log.warning("vllm: batch failed (%s); retrying requests one by one", exc)
            for i in idx:
                self._call(requests, [i], out, chat)

    def close(self) -> None:
        if self._feeder is not None:
            self._feeder.stop()
            self._feeder = None
        super().close()
        self._llm = None
