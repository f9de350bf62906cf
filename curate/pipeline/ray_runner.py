"""``runner: ray``: the same tasks as the local runner, scheduled on a Ray cluster.

Each segment task becomes a Ray task asking for the CPUs/GPUs its stages declare (the largest
request of the chain), so a GPU stage gets one GPU per task and N GPUs run N tasks. Ray reuses
worker processes, and stages are cached per worker process, so ``setup()`` (model loading) runs
once per worker, not once per task. Completion records, atomic shards and resume are the same as
the local runner's: the output location must be reachable from every node (shared disk or an
object store such as ``s3://``).

Connects to ``RAY_ADDRESS`` when set (an existing cluster), otherwise starts a local Ray.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from typing import Any, Callable, Iterator


class RayExecutor:
    streams_progress = False

    def __init__(self, workers: int, plugins: list[str]):
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
        self._sink: Callable[[tuple], None] | None = None

    def set_sink(self, sink: Callable[[tuple], None]) -> None:
        self._sink = sink

    def drain(self) -> None:
        """Ray workers do not stream per-batch progress; the runner counts finished tasks."""

    def _fn(self, fn: Callable) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn]

    def submit(self, fn: Callable, *args: Any) -> Future:
        payload = args[0] if args and isinstance(args[0], dict) else {}
        res = payload.get("resources", {})
        ref = self._fn(fn).options(num_cpus=res.get("cpus", 1), num_gpus=res.get("gpus", 0),
                                   max_retries=2, retry_exceptions=False).remote(*args)
        return ref.future()

    def map(self, fn: Callable, items: list) -> Iterator:
        refs = [self._fn(fn).remote(i) for i in items]
        for r in refs:
            yield self.ray.get(r)

    def shutdown(self) -> None:
        if self._owns:
            self.ray.shutdown()
