"""LLM engines behind one batch interface.

Stages never import a backend: they take an engine config (``{kind: vllm|openai|transformers,
model: ..., ...}``), build it with :func:`make_engine` in ``setup()``, and send batches of
:class:`Request` to ``engine.generate``. The stage-side machinery (accounting, parse retries,
budgets, prompt templates) lives in :mod:`curate.llm`.

    from curate.engines import make_engine, Request, SamplingParams
    engine = make_engine({"kind": "transformers"}, cache="/tmp/llm.sqlite")
    [c] = engine.generate([Request(messages=[{"role": "user", "content": "Hi"}],
                                   params=SamplingParams(max_tokens=16))])
    c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens

``engine.stream(cache)`` is the streaming form the LLM stages use: ``submit(tag, request)`` as
long as ``stream.pending < engine.window()``, ``stream.next()`` for the answers ready (at least
one) as (tag, completion), each request looked up in the cache once and each answer cached as it
arrives (see :class:`curate.engines.base.Stream`). What differs by kind lives on the engine config
(``resources()``, ``check()``) and class (``window``, ``prompt_tokens``, ``hf_tokenizer``,
``max_logprobs``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from curate.engines.base import (AnswerSchema, Choice, Completion, Engine, Request, SamplingParams, TokenLogprob,
                                 apply_chat_template, cache_key, truncate_at_stop)
from curate.engines.cache import RequestCache
from curate.engines.config import (EngineConfig, OpenAIConfig, TransformersConfig, VLLMConfig,
                                   parse_engine_config)

__all__ = [
    "AnswerSchema", "Choice", "Completion", "Engine", "EngineConfig", "OpenAIConfig", "Request",
    "RequestCache", "SamplingParams", "TokenLogprob", "TransformersConfig", "VLLMConfig",
    "apply_chat_template", "cache_key", "engine_class", "make_engine", "parse_engine_config", "truncate_at_stop",
]


def engine_class(kind: str) -> type[Engine]:
    """The engine class of a kind (importing it does not import its backend library)."""
    if kind == "transformers":
        from curate.engines.transformers_engine import TransformersEngine
        return TransformersEngine
    if kind == "openai":
        from curate.engines.base import quiet_http_logs
        from curate.engines.openai_engine import OpenAIEngine
        quiet_http_logs()
        return OpenAIEngine
    if kind == "vllm":
        from curate.engines.vllm_engine import VLLMEngine
        return VLLMEngine
    raise ValueError(f"unknown engine kind {kind!r}")


def make_engine(config: Any, cache: "RequestCache | str | None" = None) -> Engine:
    """Build the engine a config names. ``cache``: a RequestCache, a SQLite path, or None."""
    cfg = parse_engine_config(config)
    rc = RequestCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
    return engine_class(cfg.kind)(cfg, cache=rc)
