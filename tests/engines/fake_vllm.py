"""A fake ``vllm`` package for the engine tests: it has only the names listed in
``curate.engines.vllm_contract.contract()`` (checked against real vLLM releases by
``make vllm-contract``) and rejects any other keyword, so the adapter cannot rely on a name the
contract check does not cover.

``LLM.llm_engine`` is a small continuous-batching engine: ``add_request`` queues a request,
each ``step()`` (taking ``step_seconds``, like a GPU forward) generates one character of the
reversed prompt for up to ``max_num_seqs`` running requests and returns the finished ones. A
request with ``structured_outputs`` gets, character by character, a JSON value of its schema
instead (``curate.testing.fake_openai.schema_instance``).
It records when each step ran and when each request finished.
"""

from __future__ import annotations

import enum
import importlib.machinery
import json
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any

from curate.engines.vllm_contract import contract
from curate.testing.fake_openai import schema_instance

SPEC = contract()["classes"]


def _only(where: str, allowed: list[str], kw: dict[str, Any]) -> None:
    extra = sorted(set(kw) - set(allowed))
    if extra:
        raise TypeError(f"{where} got unexpected keyword argument(s) {extra} (not in the vLLM contract)")


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class StructuredOutputsParams:
    def __init__(self, **kw: Any):
        _only("StructuredOutputsParams", SPEC["StructuredOutputsParams"]["fields"], kw)
        self.kw = kw
        self.json = kw.get("json")


class SamplingParams:
    def __init__(self, **kw: Any):
        _only("SamplingParams", SPEC["SamplingParams"]["fields"], kw)
        so = kw.get("structured_outputs")
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise TypeError(f"structured_outputs must be a StructuredOutputsParams, not {type(so).__name__}")
        self.kw = kw
        self.structured_outputs = so
        self.n = kw.get("n", 1)
        self.max_tokens = kw.get("max_tokens", 16)
        self.output_kind = kw.get("output_kind", RequestOutputKind.CUMULATIVE)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: Any
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class Tokenizer:
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i > 1)

    def tokenize(self, text: str) -> list[str]:   # one token per character, as encode
        return list(text)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


@dataclass
class _Running:
    rid: str
    prompt: str
    params: SamplingParams
    done: int = 0


@dataclass
class LLMEngine:
    step_seconds: float = 0.0
    max_num_seqs: int = 256
    fail_step: bool = False
    waiting: list[_Running] = field(default_factory=list)
    running: list[_Running] = field(default_factory=list)
    steps: list[tuple[float, int]] = field(default_factory=list)     # (time, requests running)
    finished_at: dict[str, float] = field(default_factory=dict)
    added_at: dict[str, float] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    received: dict[str, SamplingParams] = field(default_factory=dict)   # request id -> its params
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams, **kw: Any) -> None:
        if isinstance(prompt, dict):
            prompt = Tokenizer().decode(prompt["prompt_token_ids"])
        if "TOO LONG" in prompt:
            raise ValueError("prompt is longer than the maximum model length")
        with self.lock:
            self.received[request_id] = params
            self.added_at[request_id] = time.perf_counter()
            self.waiting.append(_Running(request_id, prompt, params))

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def abort_request(self, request_ids: list[str], internal: bool = False) -> None:
        self.aborted.extend(request_ids)
        with self.lock:
            self.running = [r for r in self.running if r.rid not in request_ids]
            self.waiting = [r for r in self.waiting if r.rid not in request_ids]

    def step(self) -> list[RequestOutput]:
        if self.fail_step:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        with self.lock:
            while self.waiting and len(self.running) < self.max_num_seqs:
                self.running.append(self.waiting.pop(0))
            batch = list(self.running)
        if self.step_seconds:
            time.sleep(self.step_seconds)
        self.steps.append((time.perf_counter(), len(batch)))
        out = []
        for r in batch:
            r.done += 1
            so = getattr(r.params, "structured_outputs", None)
            full = json.dumps(schema_instance(so.json, text=r.prompt)) if so is not None else r.prompt[::-1]
            if r.done >= min(r.params.max_tokens, len(full)):
                text = full[: r.done]
                outs = [CompletionOutput(k, text, list(range(len(text))), None, None, "length")
                        for k in range(r.params.n)]
                out.append(RequestOutput(r.rid, r.prompt, Tokenizer().encode(r.prompt), outs, True))
                self.finished_at[r.rid] = time.perf_counter()
                with self.lock:
                    self.running.remove(r)
        return out


class LLM:
    instances: list["LLM"] = []
    step_seconds = 0.0

    def __init__(self, **kw: Any):
        _only("LLM", SPEC["LLM"]["init"], kw)
        self.kwargs = kw
        self.llm_engine = LLMEngine(step_seconds=LLM.step_seconds, max_num_seqs=kw.get("max_num_seqs") or 256)
        LLM.instances.append(self)

    def get_tokenizer(self) -> Tokenizer:
        return Tokenizer()

    def generate(self, prompts: list[Any], sampling_params: Any = None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        eng = self.llm_engine
        ids = [f"g{i}" for i in range(len(prompts))]
        for rid, p, sp in zip(ids, prompts, sampling_params):
            eng.add_request(rid, p, sp)
        done: dict[str, RequestOutput] = {}
        while eng.has_unfinished_requests():
            for ro in eng.step():
                done[ro.request_id] = ro
        return [done[i] for i in ids]

    def chat(self, messages: list[Any], sampling_params: Any = None, use_tqdm: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        return self.generate([m[-1]["content"] for m in messages], sampling_params, use_tqdm=use_tqdm)


def install(monkeypatch: Any, version: str = "0.33.0", step_seconds: float = 0.0) -> types.ModuleType:
    """Put the fake ``vllm`` (and ``vllm.sampling_params``) in ``sys.modules`` for one test."""
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.__version__ = version
    mod.LLM = LLM
    mod.SamplingParams = SamplingParams
    sp = types.ModuleType("vllm.sampling_params")
    sp.SamplingParams = SamplingParams
    sp.RequestOutputKind = RequestOutputKind
    sp.StructuredOutputsParams = StructuredOutputsParams
    mod.sampling_params = sp
    LLM.instances = []
    LLM.step_seconds = step_seconds
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp)
    return mod
