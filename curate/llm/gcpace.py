"""Python's cyclic garbage collector, paced for an LLM stream.

While a stage's requests are out, the process holds two kinds of objects that the collector walks
again and again for nothing: every in-flight request's HTTP and asyncio objects (alive for the
server's latency, so they survive the young collections and get walked by the older ones too) and
the rows already answered (kept until the table is assembled). Neither is garbage: the request path
makes no reference cycles (10,000 requests through the openai engine leave 15 objects for the
collector; everything else is freed by reference counting). With the default threshold (700) a
10,000-request stream at concurrency 512 spent 1.5 s of its 6.7 s in collections, up to 240 ms each,
and every pause holds every answer that arrived during it (``benchmarks/llm_stage.py``: 0.80 of the
concurrency bound; 0.89 with the collector off).

``paced()`` raises the young-generation threshold to ``CURATE_GC_THRESHOLD`` (default 500,000 net
new container objects; 0 leaves the collector alone) for as long as a stream runs, and puts the
previous thresholds back when the last stream of the process ends (streams nest and may run in
several threads). The collector stays on: a stage whose parse makes cycles is still collected, after
that many new objects instead of 700. A process whose collector is disabled (``gc.disable()``) or
whose threshold is already higher is left as it is.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Iterator

DEFAULT_THRESHOLD = 500_000

_lock = threading.Lock()
_depth = 0
_saved: tuple[int, int, int] | None = None


def threshold() -> int:
    """The young-generation threshold for streams (``CURATE_GC_THRESHOLD``; 0: leave it alone)."""
    raw = os.environ.get("CURATE_GC_THRESHOLD", "").strip()
    if not raw:
        return DEFAULT_THRESHOLD
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"CURATE_GC_THRESHOLD={raw!r}: expected a whole number (0 leaves the collector "
                         "as it is)") from None


def _after_fork_in_child() -> None:
    """A child forked while a stream ran: no stream runs in it, so its collector is put back."""
    global _lock, _depth, _saved
    _lock = threading.Lock()
    if _depth and _saved is not None:
        gc.set_threshold(*_saved)
    _depth, _saved = 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def paced() -> Iterator[None]:
    """Raise the collector's young threshold while the body runs (see the module's docstring)."""
    global _depth, _saved
    want = threshold()
    with _lock:
        _depth += 1
        if _depth == 1:
            current = gc.get_threshold()
            if want and gc.isenabled() and 0 < current[0] < want:
                _saved = current
                gc.set_threshold(want, *current[1:])
            else:
                _saved = None
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                if gc.get_threshold()[0] == want:   # nobody changed it meanwhile
                    gc.set_threshold(*_saved)
                _saved = None
