"""``runner: ray``: the same tasks as the local runner, scheduled on a Ray cluster.

CPU segments become Ray tasks asking for the CPUs (and memory) their stages declare; Ray reuses
worker processes and stages are cached per process, so ``setup()`` runs once per worker. A task
whose worker dies (a killed process, a lost node) is retried by Ray, ``max_retries`` times.

A segment with a GPU stage (an LLM engine), or with ``replicas`` set, runs on a pool of Ray
*actors* (replicas), each holding the GPUs, CPUs and memory of one worker for its whole life: the
engine is loaded once per actor, on the GPUs Ray gave it (``CUDA_VISIBLE_DEVICES``), and reused by
every task the actor runs. Replicas default to as many as the cluster's nodes hold and are started
as tasks wait for them. Tasks wait in one queue and go to whichever replica is free, so a slow or
busy replica never holds back rows another could run. A replica that dies (its process killed, the
node lost, out of memory, or a CUDA error that breaks its engine) is replaced by a fresh actor and
the task it held is redone from the start: its partial shards are rewritten, and answers already
received come back from the step's request cache; a task whose replicas died more than
``max_retries`` times stops the run, naming the step, the task and the cause.

A step's resources are checked against the cluster's nodes before any work (``prepare``). The
environment variables a pipeline needs (``env:``, engines' ``api_key_env``, ``AWS_*`` for s3
outputs) reach the workers as a task argument held in Ray's object store (``ray.put``), set in the
worker for the task's run (CPU tasks) or the actor's life (replicas). Not through the runtime
environment's ``env_vars``: Ray's runtime-env agent writes those, values included, to its log
(``runtime_env_agent.log``). Completion records, atomic shards and resume are the same as the local runner's: the output
location must be reachable from every node (shared disk or an object store such as ``s3://``).

Connects to ``RAY_ADDRESS`` when set (an existing cluster), otherwise starts a local Ray.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from curate.pipeline.resources import Node, check_resources, forwarded_env
from curate.pipeline.worker import SegmentJob

log = logging.getLogger("curate")


class WorkerDied(Exception):
    """A task's replicas died more often than its step allows (``resources.max_retries``)."""


class DeviceFailure(Exception):
    """Raised by a replica whose task hit a CUDA/accelerator error: its engine cannot be trusted
    any more, so the replica is replaced like one that died."""


_DEVICE_ERRORS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "cuDNN error", "NCCL error",
                  "device-side assert")
_DEVICE_TYPES = {"OutOfMemoryError", "AcceleratorError", "CudaError", "EngineDeadError"}


def is_device_failure(exc: BaseException) -> bool:
    text = str(exc)
    return type(exc).__name__ in _DEVICE_TYPES or any(s in text for s in _DEVICE_ERRORS)


@dataclass
class _Item:
    fn: Callable
    job: SegmentJob
    args: tuple
    future: Future
    attempts: int = 0   # replicas that died running it

    @property
    def what(self) -> str:
        step = self.job.key.split("@", 1)[0]
        idx = self.args[0] if self.args and isinstance(self.args[0], int) else None
        task = self.job.task_ids[idx] if idx is not None and idx < len(self.job.task_ids) else "?"
        return f"step {step!r}, task {task!r}"


class _Pool:
    """The replicas of one worker shape (GPUs, CPUs, memory, replicas) and the tasks waiting for them."""

    def __init__(self, shape: tuple, size: int, actor_cls: Any, env: Any):
        self.env = env              # ObjectRef of the forwarded variables (or None)
        self.shape = shape
        self.size = size            # replicas at most
        self.actor_cls = actor_cls
        self.idle: list[Any] = []
        self.busy: dict[Any, tuple[Any, _Item]] = {}   # ObjectRef -> (actor, item)
        self.queue: collections.deque[_Item] = collections.deque()
        self.live = 0               # actors started and not dead

    @property
    def empty(self) -> bool:
        return not self.busy and not self.queue


class RayExecutor:
    streams_progress = False

    def __init__(self, workers: int):
        try:
            import ray
        except ImportError:
            raise RuntimeError("runner: ray needs Ray: pip install 'curate[ray]'") from None
        self.ray = ray
        self.workers = workers
        self._owns = False
        if not ray.is_initialized():
            env = {"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}
            if os.environ.get("RAY_ADDRESS"):
                ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, runtime_env=env,
                         log_to_driver=False, configure_logging=False)
                self._owns = True
        self._task = ray.remote(_call_with_env)
        self._env_ref: Any = None        # ObjectRef of {name: value} of the forwarded variables
        self._sink: Callable[[tuple], None] | None = None
        self._env_names: list[str] = []
        self._pool: _Pool | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        e = ray.exceptions
        self._died = tuple(getattr(e, n) for n in ("RayActorError", "WorkerCrashedError", "OutOfMemoryError",
                                                   "NodeDiedError", "LocalRayletDiedError") if hasattr(e, n))

    # -- before any work ---------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        out = []
        for n in self.ray.nodes():
            if n.get("Alive"):
                r = n.get("Resources", {})
                mem = r.get("memory")
                out.append(Node(cpus=float(r.get("CPU", 0.0)), gpus=float(r.get("GPU", 0.0)),
                                memory_gb=mem / 2**30 if mem else None))
        return out

    def prepare(self, pipe: Any) -> list[tuple[str, str]]:
        """Problems of steps the cluster cannot hold (config errors), and the environment variables
        to forward to workers."""
        self._env_names = forwarded_env(pipe)
        values = {k: os.environ[k] for k in self._env_names if k in os.environ}
        self._env_ref = self.ray.put(values) if values else None
        return check_resources(pipe, self.nodes(), "the Ray cluster")

    @staticmethod
    def _memory(job: SegmentJob) -> dict[str, Any]:
        return {"memory": int(job.memory_gb * 2**30)} if job.memory_gb else {}

    # -- executor interface ------------------------------------------------------------------------
    def set_sink(self, sink: Callable[[tuple], None]) -> None:
        self._sink = sink

    def drain(self) -> None:
        """Ray workers do not stream per-batch progress; the runner counts finished tasks."""

    def submit(self, fn: Callable, job: SegmentJob, *args: Any) -> Future:
        if job.gpus > 0 or job.replicas:
            fut: Future = Future()
            with self._lock:
                pool = self._pool_for(job)
                pool.queue.append(_Item(fn, job, args, fut))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="curate-ray-replicas", daemon=True)
                    self._thread.start()
            self._wake.set()
            return fut
        self._release_pool()
        ref = self._task.options(num_cpus=job.cpus, num_gpus=0, max_retries=job.max_retries, retry_exceptions=False,
                                 **self._memory(job)).remote(self._env_ref, fn, job, *args)
        return ref.future()

    def map(self, fn: Callable, items: list) -> Iterator:
        self._release_pool()
        refs = [self._task.remote(self._env_ref, fn, i) for i in items]
        for r in refs:
            yield self.ray.get(r)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            self._kill_pool(pool)
            for item in list(pool.queue) + [it for _, it in pool.busy.values()]:
                item.future.cancel() or item.future.done() or item.future.set_exception(
                    RuntimeError("the run stopped before this task finished"))
        from curate.llm.ratelimit import kill_ray_limiters

        kill_ray_limiters(self.ray)   # the run's shared rate limiters (named, detached actors)
        if self._owns:
            self.ray.shutdown()

    # -- replicas ----------------------------------------------------------------------------------
    def _pool_for(self, job: SegmentJob) -> _Pool:
        """The replicas for ``job``'s worker shape; a pool of another shape is released first (one
        segment runs at a time). Same shape, same replicas: an engine stays loaded across steps."""
        shape = (float(job.gpus), float(job.cpus), job.memory_gb, job.replicas, tuple(self._env_names))
        if self._pool is not None and self._pool.shape == shape:
            return self._pool
        if self._pool is not None:
            if not self._pool.empty:
                raise RuntimeError("internal error: a new step started while replicas of another were busy")
            self._kill_pool(self._pool)
            self._pool = None
        room = sum(self._room(n, job) for n in self.nodes())
        if room == 0:
            raise RuntimeError(f"a worker needs {job.gpus:g} GPU(s), {job.cpus:g} CPU(s)"
                               + (f" and {job.memory_gb:g} GB of memory" if job.memory_gb else "")
                               + " but no node of the Ray cluster has that; add nodes or lower `resources:`")
        size = min(job.replicas or room, room)
        opts: dict[str, Any] = {"num_cpus": job.cpus, "num_gpus": float(job.gpus), "max_restarts": 0,
                                **self._memory(job)}
        actor_cls = self.ray.remote(_TaskActor).options(**opts)
        self._pool = _Pool(shape, max(1, size), actor_cls, self._env_ref)
        return self._pool

    @staticmethod
    def _room(n: Node, job: SegmentJob) -> int:
        """How many workers of ``job`` one node holds."""
        fits = [n.gpus // job.gpus if job.gpus > 0 else float("inf"),
                n.cpus // job.cpus if job.cpus > 0 and n.cpus is not None else float("inf"),
                n.memory_gb // job.memory_gb if job.memory_gb and n.memory_gb else float("inf")]
        m = min(fits)
        return 1_000_000 if m == float("inf") else int(m)

    def _release_pool(self) -> None:
        """Free idle replicas (their GPUs, CPUs) when other work comes: CPU tasks need those CPUs."""
        with self._lock:
            pool = self._pool
            if pool is None or not pool.empty:
                return
            self._pool = None
        self._kill_pool(pool)

    def _kill_pool(self, pool: _Pool) -> None:
        for actor in pool.idle + [a for a, _ in pool.busy.values()]:
            self._kill(actor)
        pool.idle.clear()

    def _kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except (ValueError, self.ray.exceptions.RayError) as exc:   # already gone
            log.debug("ray.kill: %s", exc)

    def _dispatch(self, pool: _Pool) -> None:
        """Hand waiting tasks to idle replicas, starting new ones up to the pool's size."""
        while pool.queue and (pool.idle or pool.live < pool.size):
            item = pool.queue.popleft()
            if item.attempts == 0 and not item.future.set_running_or_notify_cancel():
                continue                                    # cancelled by the runner
            if pool.idle:
                actor = pool.idle.pop()
            else:
                actor = pool.actor_cls.remote(pool.env)
                pool.live += 1
            ref = actor.run.remote(item.fn, item.job, *item.args)
            pool.busy[ref] = (actor, item)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                pool = self._pool
                if pool is not None:
                    self._dispatch(pool)
                refs = list(pool.busy) if pool is not None else []
            if not refs:
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=0.1, fetch_local=False)
            for ref in ready:
                self._settle(pool, ref)

    def _settle(self, pool: _Pool, ref: Any) -> None:
        with self._lock:
            actor, item = pool.busy.pop(ref)
        try:
            result = self.ray.get(ref)
        except self._died + (DeviceFailure,) as exc:
            self._replica_failed(pool, actor, item, exc)
            return
        except BaseException as exc:  # noqa: BLE001 - the task's own error: handed to the runner
            with self._lock:
                pool.idle.append(actor)
            item.future.set_exception(exc)
            return
        with self._lock:
            pool.idle.append(actor)
        item.future.set_result(result)

    def _replica_failed(self, pool: _Pool, actor: Any, item: _Item, exc: BaseException) -> None:
        self._kill(actor)
        item.attempts += 1
        cause = _cause(exc)
        with self._lock:
            pool.live -= 1
            if item.attempts <= item.job.max_retries:
                log.warning("%s: its worker (Ray actor) failed (%s); the task is redone on a new worker "
                            "(retry %d of %d)", item.what, cause, item.attempts, item.job.max_retries)
                pool.queue.appendleft(item)
                self._wake.set()
                return
        item.future.set_exception(WorkerDied(
            f"its worker (a Ray actor with {item.job.gpus:g} GPU(s)) failed {item.attempts} time(s), more than "
            f"resources.max_retries={item.job.max_retries} allows; last cause: {cause}"))


def _cause(exc: BaseException) -> str:
    """A short, single-line account of why a replica failed (Ray's advice paragraphs left out)."""
    if isinstance(exc, DeviceFailure):
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return (lines[-1] if lines else "DeviceFailure")[:300]
    text = " ".join(str(exc).split())
    for cut in (" Some common causes", " To troubleshoot", " If the process was killed"):
        text = text.split(cut)[0]
    return f"{type(exc).__name__}: {text}"[:400]


def _call_with_env(env: dict[str, str] | None, fn: Callable, *args: Any) -> Any:
    """A Ray task: ``fn(*args)`` with the forwarded variables set, as they were afterwards."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return fn(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _TaskActor:
    """Holds its GPUs for life; stages built in it (engines) are reused by every task it runs."""

    def __init__(self, env: dict[str, str] | None = None):
        os.environ.update(env or {})    # the forwarded variables, for the actor's life

    def run(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            if is_device_failure(exc):
                raise DeviceFailure(f"{type(exc).__name__}: {exc}") from None
            raise
