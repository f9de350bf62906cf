"""Stages for the Ray replica tests (loaded through `plugins:`).

``replica_probe`` (map, needs one GPU) stands for an LLM stage: ``setup()`` "loads the engine"
once per process and leaves a marker file saying so; every row gets the process id and the
``CUDA_VISIBLE_DEVICES`` its worker was given. Faults, each once per run (a marker file remembers
it happened; ``crash_always``: every time): ``crash_id`` makes the process die (``os._exit``) on that row, as an OOM kill or a
lost node does; ``cuda_error_id`` raises a CUDA error from the "engine". ``slow_device`` makes
the replica holding that device sleep per task, as a busy or slower GPU does.

``env_probe`` (map) records whether each worker sees an environment variable with the expected
value, without writing the value anywhere: only its sha256 is compared. Both record the memory Ray
reserved for the worker (bytes: ``memory``,
``env_memory``) and the worker's process id (``pid``, ``env_pid``).
"""

from __future__ import annotations

import hashlib
import os
import time

import pyarrow as pa

from curate.pipeline.stage import MapStage, Resources, StageConfig, register


class ReplicaProbeConfig(StageConfig):
    marker_dir: str
    crash_id: str | None = None
    crash_always: bool = False      # die on every try, not only the first
    cuda_error_id: str | None = None
    slow_device: str | None = None
    slow_seconds: float = 0.0


@register
class ReplicaProbe(MapStage):
    """Records the worker's pid and CUDA_VISIBLE_DEVICES per row; engine loaded once per worker."""
    name = "replica_probe"
    Config = ReplicaProbeConfig
    resources = Resources(cpus=1, gpus=1)
    isolate_errors = False          # as LLM stages: an engine error is not a per-document error

    def setup(self):
        os.makedirs(self.config.marker_dir, exist_ok=True)
        open(os.path.join(self.config.marker_dir, f"load-{os.getpid()}-{time.time_ns()}"), "w").close()

    def _once(self, what: str) -> bool:
        """True the first time ``what`` is asked for in this marker folder (atomic create)."""
        try:
            fd = os.open(os.path.join(self.config.marker_dir, f"fault-{what}"), os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def process(self, table):
        cfg = self.config
        device = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = set(table.column("id").to_pylist())
        if cfg.slow_device is not None and device == cfg.slow_device:
            time.sleep(cfg.slow_seconds)
        if cfg.crash_id in ids and (self._once("crash") or cfg.crash_always):
            os._exit(3)                                   # the worker process dies mid-task
        if cfg.cuda_error_id in ids and self._once("cuda"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        n = table.num_rows
        return table.append_column("pid", pa.array([os.getpid()] * n, pa.int64())).append_column(
            "device", pa.array([device] * n, pa.string())).append_column(
            "memory", pa.array([_ray_memory()] * n, pa.float64()))


def _ray_memory() -> float | None:
    """The memory (bytes) Ray reserved for this worker, None outside Ray."""
    import ray
    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_assigned_resources().get("memory")


class EnvProbeConfig(StageConfig):
    variable: str
    sha256: str           # of the value the worker should see


@register
class EnvProbe(MapStage):
    """Adds ``env_ok``: whether the worker sees ``variable`` with the expected value."""
    name = "env_probe"
    Config = EnvProbeConfig

    def process(self, table):
        value = os.environ.get(self.config.variable)
        ok = value is not None and hashlib.sha256(value.encode()).hexdigest() == self.config.sha256
        n = table.num_rows
        return table.append_column("env_ok", pa.array([ok] * n, pa.bool_())).append_column(
            "env_memory", pa.array([_ray_memory()] * n, pa.float64())).append_column(
            "env_pid", pa.array([os.getpid()] * n, pa.int64()))


from curate.stages.synth.generate import Generate, GenerateConfig  # noqa: E402


class CrashGenerateConfig(GenerateConfig):
    marker_dir: str
    crash_id: str | None = None


@register
class CrashGenerate(Generate):
    """``generate`` whose worker dies once, right after the answers of the batch holding
    ``crash_id`` came back (and were cached), before the task's shards are written."""
    name = "crash_generate"
    Config = CrashGenerateConfig

    def process(self, table):
        out = super().process(table)
        if self.config.crash_id in set(table.column("id").to_pylist()):
            os.makedirs(self.config.marker_dir, exist_ok=True)
            try:
                fd = os.open(os.path.join(self.config.marker_dir, "fault-crash"), os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return out
            os.close(fd)
            os._exit(3)
        return out
