"""What a global stage gets from the runner: scratch space and a parallel ``map``.

``ctx.map(fn, items)`` runs ``fn(item)`` for every item on the runner's workers (a process pool
locally, Ray tasks under ``runner: ray``) and yields results in order. ``fn`` must be a picklable
top-level function. Use it for per-shard work inside a global stage (signatures, band keys...).
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from typing import Any, Callable, Iterable, Iterator


class RunContext:
    def __init__(self, workdir: str, workers: int = 1, executor: Executor | None = None,
                 mapper: Callable[[Callable, list], Iterator] | None = None,
                 progress: Callable[[int], None] | None = None, scratch_root: str | None = None,
                 inputs: dict[str, list[str]] | None = None):
        self.workdir = workdir
        # the files of each input step, for stages that treat their inputs differently (mix)
        self.inputs = inputs
        # where spill files go: under the output location (a URL for object stores), so workers
        # on every node can read them; the local workdir for library calls
        self.scratch_root = scratch_root or workdir
        self.workers = max(1, workers)
        self._executor = executor
        self._mapper = mapper
        self._progress = progress
        os.makedirs(workdir, exist_ok=True)

    @classmethod
    def inline(cls, workdir: str) -> "RunContext":
        return cls(workdir=workdir, workers=1)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        if self._mapper is not None:
            yield from self._mapper(fn, items)
        elif self._executor is not None and self.workers > 1 and len(items) > 1:
            yield from self._executor.map(fn, items)
        else:
            for it in items:
                yield fn(it)

    def progress(self, n: int) -> None:
        """Report ``n`` more documents processed (drives the progress bar)."""
        if self._progress is not None:
            self._progress(n)
