"""LLM engines behind one batch interface.

Stages never import a backend: they take an engine config (``{kind: vllm|openai|transformers,
model: ..., ...}``), build it with :func:`make_engine` in ``setup()``, and send batches of
:class:`Request` to ``engine.generate``. :class:`LLMAccounting` does the per-stage bookkeeping
(``llm/*`` counters, failed requests, stop when most requests fail).

    from curate.engines import make_engine, Request, SamplingParams
    engine = make_engine({"kind": "transformers"}, cache="/tmp/llm.sqlite")
    [c] = engine.generate([Request(messages=[{"role": "user", "content": "Hi"}],
                                   params=SamplingParams(max_tokens=16))])
    c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from curate.engines.base import (Choice, Completion, Engine, Request, SamplingParams, TokenLogprob,
                                 apply_chat_template, cache_key, truncate_at_stop)
from curate.engines.cache import RequestCache
from curate.engines.config import (EngineConfig, OpenAIConfig, TransformersConfig, VLLMConfig,
                                   parse_engine_config)

__all__ = [
    "Choice", "Completion", "Engine", "EngineConfig", "LLMAccounting", "OpenAIConfig", "Request",
    "RequestCache", "SamplingParams", "TokenLogprob", "TransformersConfig", "VLLMConfig",
    "apply_chat_template", "cache_key", "make_engine", "parse_engine_config", "truncate_at_stop",
]


def make_engine(config: Any, cache: "RequestCache | str | None" = None) -> Engine:
    """Build the engine a config names. ``cache``: a RequestCache, a SQLite path, or None."""
    cfg = parse_engine_config(config)
    rc = RequestCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
    if cfg.kind == "transformers":
        from curate.engines.transformers_engine import TransformersEngine

        return TransformersEngine(cfg, cache=rc)
    if cfg.kind == "openai":
        from curate.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(cfg, cache=rc)
    if cfg.kind == "vllm":
        from curate.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, cache=rc)
    raise ValueError(f"unknown engine kind {cfg.kind!r}")


class LLMAccounting:
    """Per-stage LLM bookkeeping shared by the generate/synthesis/rating stages.

    ``record(completions)`` counts ``llm/requests``, ``llm/cached``, ``llm/prompt_tokens``,
    ``llm/completion_tokens`` and ``llm/failed`` (+ ``errors/llm/<reason>`` with the first few
    reasons logged); ``parse_failed`` records an answer the stage could not use. ``check()``
    raises ``StageError`` once at least ``min_requests`` were made and more than
    ``max_failure_rate`` of them failed, so a broken endpoint does not produce an empty corpus.
    Prompt/completion tokens count new generations only (cached answers cost nothing).
    """

    def __init__(self, stage: Any, max_failure_rate: float = 0.5, min_requests: int = 8):
        self.stage = stage
        self.max_failure_rate = max_failure_rate
        self.min_requests = min_requests
        self.total = 0
        self.failed = 0
        self.failures: list[dict[str, Any]] = []  # the most recent failures (bounded)

    def record(self, completions: Sequence[Completion]) -> None:
        st = self.stage
        for c in completions:
            self.total += 1
            st.count("llm/requests")
            if c.cached:
                st.count("llm/cached")
            elif c.ok:
                st.count("llm/prompt_tokens", c.prompt_tokens)
                st.count("llm/completion_tokens", c.completion_tokens)
            if not c.ok:
                self._fail("request", c.request_id, c.error or "")

    def parse_failed(self, doc_id: str | None, detail: str = "") -> None:
        """The stage could not use an answer (malformed JSON, missing field...)."""
        self.stage.count("llm/parse_failed")
        self._fail("parse", doc_id, detail)

    def invalid_prompt(self, doc_id: str | None, detail: str = "") -> None:
        """A row could not be turned into a request (template field missing, null prompt)."""
        self.total += 1
        self._fail("prompt", doc_id, detail)

    def _fail(self, reason: str, doc_id: str | None, detail: str) -> None:
        self.failed += 1
        self.stage.count("llm/failed")
        self.stage.error(f"llm/{reason}", doc_id=doc_id, detail=_short(detail))
        self.failures.append({"id": doc_id, "reason": reason, "detail": _short(detail)})
        del self.failures[:-100]

    def check(self) -> None:
        from curate.pipeline.stage import StageError

        if self.total >= self.min_requests and self.failed > self.max_failure_rate * self.total:
            last = self.failures[-1]["detail"] if self.failures else ""
            raise StageError(
                f"stage {self.stage.step_name!r}: {self.failed} of {self.total} LLM requests failed "
                f"(more than {self.max_failure_rate:.0%}); last error: {last}")


def _short(s: str, n: int = 300) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[:n] + "..."
