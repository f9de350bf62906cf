"""``runner: ray``: the same tasks as the local runner, scheduled on a Ray cluster.

CPU segments become Ray tasks asking for the CPUs their stages declare; Ray reuses worker
processes and stages are cached per process, so ``setup()`` runs once per worker. A segment with a
GPU stage (an LLM engine) runs on a pool of Ray *actors*, each holding the GPUs it asked for
(``resources.gpus`` of the stage) for its whole life: the engine is loaded once per actor, on the
GPU it owns, and N GPUs run N/gpus engines over the tasks. A cluster without enough GPUs is a
clear error, not a hang. Completion records, atomic shards and resume are the same as
the local runner's: the output location must be reachable from every node (shared disk or an
object store such as ``s3://``).

Connects to ``RAY_ADDRESS`` when set (an existing cluster), otherwise starts a local Ray.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from typing import Any, Callable, Iterator

from curate.pipeline.worker import Job


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
        self._remote: dict[Callable, Any] = {}
        self._actors: dict[str, list] = {}
        self._sink: Callable[[tuple], None] | None = None

    def set_sink(self, sink: Callable[[tuple], None]) -> None:
        self._sink = sink

    def drain(self) -> None:
        """Ray workers do not stream per-batch progress; the runner counts finished tasks."""

    def _fn(self, fn: Callable) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn]

    def submit(self, fn: Callable, job: Job, *args: Any) -> Future:
        if job.gpus > 0:
            return self._next_actor(job.key, job).run.remote(fn, job, *args).future()
        ref = self._fn(fn).options(num_cpus=job.cpus, num_gpus=0,
                                   max_retries=2, retry_exceptions=False).remote(job, *args)
        return ref.future()

    def _next_actor(self, key: str, job: Job) -> Any:
        """Round-robin over this segment's actor pool (created on first use)."""
        pool = self._actors.get(key)
        if pool is None:
            for other in self._actors.values():  # one GPU segment at a time: free the previous pool
                for a in other[0]:
                    self.ray.kill(a)
            self._actors.clear()
            gpus = float(job.gpus)
            have = float(self.ray.cluster_resources().get("GPU", 0))
            if have < gpus:
                raise RuntimeError(f"a stage needs {gpus:g} GPU(s) per worker but the Ray cluster has "
                                   f"{have:g}; add GPU nodes or use a CPU engine")
            n = max(1, int(have // gpus))
            actor_cls = self.ray.remote(_TaskActor).options(num_cpus=job.cpus, num_gpus=gpus)
            pool = self._actors[key] = [[actor_cls.remote() for _ in range(n)], 0]
        actors, i = pool
        pool[1] = i + 1
        return actors[i % len(actors)]

    def map(self, fn: Callable, items: list) -> Iterator:
        refs = [self._fn(fn).remote(i) for i in items]
        for r in refs:
            yield self.ray.get(r)

    def shutdown(self) -> None:
        for pool in self._actors.values():
            for a in pool[0]:
                self.ray.kill(a)
        self._actors.clear()
        from curate.llm.ratelimit import kill_ray_limiters

        kill_ray_limiters(self.ray)   # the run's shared rate limiters (named, detached actors)
        if self._owns:
            self.ray.shutdown()


class _TaskActor:
    """Holds its GPUs for life; stages built in it (engines) are reused by every task it runs."""

    def run(self, fn: Callable, *args: Any) -> Any:
        return fn(*args)
