"""``runner: local``: a pool of forkserver worker processes on this machine (or, with one worker,
the calling process itself).

Executors share one small interface with the Ray executor (``ray_runner.py``):
``submit(fn, job, index, item) -> Future``, ``map(fn, items)`` for global stages' parallel work,
``set_sink(fn)`` / ``drain()`` for per-batch progress messages, and ``shutdown()``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from typing import Any, Callable, Iterator

from curate.pipeline import worker


class _InlineQueue:
    def __init__(self, sink: Callable[[tuple], None]):
        self.sink = sink

    def put(self, msg: tuple) -> None:
        self.sink(msg)


class LocalExecutor:
    """A process pool (forkserver workers) or, with one worker, the calling process itself.

    A job that needs GPUs runs on at most ``gpus_available // gpus_per_worker`` workers at a time
    (one engine per GPU, never more engines than GPUs); ``CUDA_VISIBLE_DEVICES`` tells how many
    GPUs this machine lends (none: one worker, the engine decides what to do without a GPU).
    """

    streams_progress = True

    def __init__(self, workers: int, preload: list[str] | None = None):
        self.workers = workers
        self.queue = None
        self._pool = None
        self._sink: Callable[[tuple], None] | None = None
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            # forkserver: workers fork from a clean server process that has already imported
            # curate and pyarrow: fast start, and no threads of this process are forked.
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["curate.pipeline.worker", *(preload or [])])
            self.queue = ctx.Queue()
            self._pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker.init_worker,
                                             initargs=(self.queue, logging.getLogger().level, os.getpid(),
                                                       dict(os.environ)))

    def set_sink(self, sink: Callable[[tuple], None]) -> None:
        if self._pool is None:
            worker.set_progress_sink(_InlineQueue(sink))
        self._sink = sink

    def drain(self) -> None:
        if self.queue is None or self._sink is None:
            return
        import queue as _q
        while True:
            try:
                msg = self.queue.get_nowait()
            except _q.Empty:
                return
            self._sink(msg)

    def slots(self, job: "worker.Job") -> int:
        """How many tasks of ``job`` may run at once."""
        if job.gpus > 0:
            return max(1, min(self.workers, int(gpu_count() // job.gpus) or 1))
        return self.workers

    def submit(self, fn: Callable, *args: Any) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(exc)
        return fut

    def map(self, fn: Callable, items: list) -> Iterator:
        if self._pool is not None and len(items) > 1:
            return self._pool.map(fn, items)
        return map(fn, items)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        worker.reset_worker()


def gpu_count() -> int:
    """GPUs visible to this process: ``CUDA_VISIBLE_DEVICES`` when set, else the devices
    ``nvidia-smi -L`` lists, else 0 (torch is not imported here: it is slow and starts threads)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    import shutil
    import subprocess
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))
