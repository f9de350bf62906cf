"""In-process vLLM offline batch generation (``vllm.LLM``); needs the ``gpu`` extra and a GPU.

``vllm`` is imported lazily, in ``VLLMEngine.__init__``. Everything around the call is plain code
tested without a GPU: :func:`sampling_kwargs` (our SamplingParams -> ``vllm.SamplingParams``
keyword arguments) and :func:`completion_from_output` (``vllm.RequestOutput`` -> Completion).

Chat messages are rendered with the tokenizer's chat template by us (``chat_mode: tokenizer``, the
default: the prompt string is explicit and mixed chat/raw batches go through one ``LLM.generate``
call), or by vLLM (``chat_mode: vllm``: ``LLM.chat``). Under the Ray runner the stage asks for
``tensor_parallel_size`` GPUs, so each engine lives in a worker holding its GPUs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from curate.engines.base import Choice, Completion, Engine, Request, SamplingParams, TokenLogprob
from curate.engines.base import apply_chat_template
from curate.engines.cache import RequestCache
from curate.engines.config import VLLMConfig

log = logging.getLogger("curate.engines")


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams``. Greedy requests ask for one sequence (copies
    are made for ``n`` > 1: greedy samples are identical)."""
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
    kw.update(cfg.engine_kwargs)
    return kw


class VLLMEngine(Engine):
    kind = "vllm"
    max_logprobs = 20  # vLLM's default ``max_logprobs``

    def __init__(self, config: VLLMConfig | dict, cache: RequestCache | None = None, llm: Any = None):
        super().__init__(cache)
        self.config = config if isinstance(config, VLLMConfig) else VLLMConfig.model_validate(config)
        self.model_id = os.path.basename(self.config.model.rstrip("/")) or self.config.model
        # vllm.LLM starts on first use: a run answered from the cache never touches the GPU
        self._llm = llm
        if llm is None and importlib.util.find_spec("vllm") is None:
            raise ImportError("the vllm engine needs vLLM: pip install 'curate[gpu]'")
        self._sampling_cls: Any = None

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

    def _sampling(self, params: SamplingParams) -> Any:
        if self._sampling_cls is None:
            from vllm import SamplingParams as VSP

            self._sampling_cls = VSP
        return self._sampling_cls(**sampling_kwargs(params))

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
            sps = [self._sampling(requests[i].params) for i in ids]
            if chat:
                kw: dict[str, Any] = {"use_tqdm": False}
                if self.config.chat_template:
                    kw["chat_template"] = self.config.chat_template
                convs = [[dict(m) for m in requests[i].messages] for i in ids]  # type: ignore[union-attr]
                return self.llm.chat(convs, sampling_params=sps, **kw)
            prompts: list[Any] = []
            for i in ids:
                r = requests[i]
                if r.is_chat or r.add_special_tokens:
                    prompts.append(self.render(r))
                else:  # the prompt carries its own BOS: tokenize without adding another
                    tok = self.llm.get_tokenizer()
                    prompts.append({"prompt_token_ids": tok.encode(r.prompt or "", add_special_tokens=False)})
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
        super().close()
        self._llm = None
