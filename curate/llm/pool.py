"""One loaded engine per engine config per process.

Consecutive LLM stages with the same engine config (in a runner worker, or library calls in one
process) share the loaded model instead of loading it again; each stage passes its own request
cache to ``engine.generate``. An engine nobody holds is kept for the next stage, and closed when a
stage asks for a *different* GPU engine (two vLLM instances would not fit one GPU).
"""

from __future__ import annotations

import threading
from typing import Any

from curate.engines import Engine, make_engine, parse_engine_config

_POOL: dict[str, list[Any]] = {}   # identity -> [engine, holders]
_LOCK = threading.Lock()


def acquire(config: Any) -> Engine:
    cfg = parse_engine_config(config)
    key = cfg.identity()
    with _LOCK:
        if key in _POOL:
            _POOL[key][1] += 1
            return _POOL[key][0]
        if cfg.kind == "vllm":
            for k in [k for k, (e, n) in _POOL.items() if n == 0 and e.kind == "vllm"]:
                _POOL.pop(k)[0].close()
        engine = make_engine(cfg, cache=None)
        _POOL[key] = [engine, 1]
        return engine


def release(engine: Engine) -> None:
    with _LOCK:
        for entry in _POOL.values():
            if entry[0] is engine:
                entry[1] = max(0, entry[1] - 1)
                return


def clear() -> None:
    """Close every engine nobody holds (tests, end of a worker)."""
    with _LOCK:
        for k in [k for k, (e, n) in _POOL.items() if n == 0]:
            _POOL.pop(k)[0].close()


def loaded() -> dict[str, tuple[Engine, int]]:
    return {k: (e, n) for k, (e, n) in _POOL.items()}


class EngineHandle:
    """A stage's view of a shared engine: its own request cache and its own ``stats``; everything
    else (``kind``, ``model_id``, ``count_tokens``, ``prompt_tokens``, ``hf_tokenizer``, ``window``,
    ``stream``...) is the shared engine's."""

    def __init__(self, engine: Engine, cache: Any = None):
        self.shared = engine
        self.cache = cache
        self.stats: dict[str, int] = {"requests": 0, "cached": 0, "generated": 0, "failed": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.shared, name)

    def generate(self, requests: Any) -> list:
        before = dict(self.shared.stats)
        out = self.shared.generate(requests, cache=self.cache)
        for k in self.stats:
            self.stats[k] += self.shared.stats[k] - before[k]
        return out
