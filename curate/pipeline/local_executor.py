"""``runner: local``: a pool of forkserver worker processes on this machine (or, with one worker,
the calling process itself).

Executors share one small interface with the Ray executor (``ray_executor.py``):
``submit(fn, job, index, item) -> Future``, ``map(fn, items)`` for global stages' parallel work,
``set_sink(fn)`` / ``drain()`` for per-batch progress messages, ``shutdown()``, and optionally
``prepare(pipe) -> [(where, problem)]``: what the steps' ``resources`` ask that the machines cannot
give, checked by the runner before any work.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import Future
from typing import Any, Callable, Iterator

from curate.pipeline import worker

log = logging.getLogger("curate")


class _InlineQueue:
    def __init__(self, sink: Callable[[tuple], None]):
        self.sink = sink

    def put(self, msg: tuple) -> None:
        self.sink(msg)


class LocalExecutor:
    """A process pool (forkserver workers) or, with one worker, the calling process itself.

    A job that needs GPUs runs on a pool of its own: ``gpus_available // gpus_per_worker``
    processes, each pinned to its own devices (``CUDA_VISIBLE_DEVICES``) for life, so each loads
    its engine once and there are never more engines than GPUs. Visible GPUs come from
    ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``; with none, GPU jobs run one task at a time in
    the ordinary pool (the engine says what it lacks).
    """

    streams_progress = True

    def __init__(self, workers: int, preload: list[str] | None = None):
        self.workers = workers
        self.queue = None
        self._pool = None
        self._gpu_pool: tuple[str, Any] | None = None   # (job key, pool) of the current GPU job
        self._preload = preload or []
        self._sink: Callable[[tuple], None] | None = None
        if workers > 1:
            self._pool = self._new_pool(workers)

    def _new_pool(self, n: int, gpu_groups: list[str] | None = None) -> Any:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        # forkserver: workers fork from a clean server process that has already imported
        # curate and pyarrow: fast start, and no threads of this process are forked.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["curate.pipeline.worker", *self._preload])
        if self.queue is None:
            self.queue = ctx.Queue()
        devices = None
        if gpu_groups:
            devices = ctx.Queue()
            for g in gpu_groups:
                devices.put(g)
        return ProcessPoolExecutor(n, mp_context=ctx, initializer=worker.init_worker,
                                   initargs=(self.queue, logging.getLogger().level, os.getpid(),
                                             dict(os.environ), devices))

    def _pool_for(self, job: Any) -> Any:
        """The pool a job's tasks run on: a pinned GPU pool for GPU jobs when GPUs are visible."""
        if not isinstance(job, worker.SegmentJob) or job.gpus <= 0 or gpu_count() == 0:
            return self._pool
        if self._gpu_pool is None or self._gpu_pool[0] != job.key:
            if self._gpu_pool is not None:
                self._gpu_pool[1].shutdown(wait=True)
            n = self.slots(job)
            per = max(1, int(job.gpus))
            ids = visible_gpu_ids()
            groups = [",".join(ids[i * per:(i + 1) * per]) for i in range(n)]
            self._gpu_pool = (job.key, self._new_pool(n, groups))
        return self._gpu_pool[1]

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

    def slots(self, job: "worker.SegmentJob") -> int:
        """How many tasks of ``job`` may run at once (at most its ``replicas`` when set)."""
        limit = job.replicas or self.workers
        if job.gpus > 0:
            return max(1, min(self.workers, limit, int(gpu_count() // job.gpus) or 1))
        return min(self.workers, limit)

    def prepare(self, pipe: Any) -> list[tuple[str, str]]:
        """Problems of steps this machine cannot hold (config errors, before any work). With no GPU
        visible, GPU steps still run, one worker at a time (their engine says what it lacks)."""
        from curate.pipeline.resources import Node, check_resources, step_where, worker_steps

        gpus = gpu_count()
        if gpus == 0:
            for step in worker_steps(pipe):
                if step.stage.resources.gpus > 0:
                    log.warning("%s asks for %g GPU(s) per worker but no GPU is visible (CUDA_VISIBLE_DEVICES, "
                                "nvidia-smi): it runs one worker at a time", step_where(pipe, step.name),
                                step.stage.resources.gpus)
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError, AttributeError):
            mem = None
        return check_resources(pipe, [Node(cpus=None, gpus=float(gpus) or 1e9, memory_gb=mem)], "this machine")

    def submit(self, fn: Callable, *args: Any) -> Future:
        pool = self._pool_for(args[0]) if args else self._pool
        if pool is not None:
            return pool.submit(fn, *args)
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
        if self._gpu_pool is not None:
            self._gpu_pool[1].shutdown(wait=True, cancel_futures=True)
            self._gpu_pool = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        worker.reset_worker()


    def abort(self) -> None:
        """Stop at once (Ctrl-C, SIGTERM): kill the workers instead of waiting for their tasks;
        an unfinished task has no completion record and is redone by the next run."""
        for pool in [self._pool, self._gpu_pool[1] if self._gpu_pool else None]:
            if pool is None:
                continue
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=5)
        self._pool = None
        self._gpu_pool = None
        worker.reset_worker()


def visible_gpu_ids() -> list[str]:
    """GPUs visible to this process: ``CUDA_VISIBLE_DEVICES`` when set, else the devices
    ``nvidia-smi -L`` lists, else none (torch is not imported here: it is slow and starts threads)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    return list(_nvidia_smi_gpus())


@functools.lru_cache(maxsize=1)
def _nvidia_smi_gpus() -> tuple[str, ...]:
    """The devices ``nvidia-smi -L`` lists, asked once per process (not once per task)."""
    import shutil
    import subprocess
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(str(i) for i, _ in enumerate(l for l in out.splitlines() if l.startswith("GPU ")))


def gpu_count() -> int:
    return len(visible_gpu_ids())
