"""Worker side: run one task of a segment end to end and record its completion.

A ``SegmentJob`` is everything a worker needs for the tasks of one segment (picklable, sent with
every task). Stage instances are built inside the worker from (stage name, options), set up once and
reused for every task of the same job; a new job tears the previous stages down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from curate.pipeline.io import ShardWriter, get_fs, iter_parquet, join, slices, write_parquet_atomic
from curate.pipeline.stage import Stage, get_stage
from curate.pipeline.state import StepRecord, TaskRecord

_WORKER: dict[str, Any] = {"key": None, "stages": None, "queue": None}

TOKENS_KEY = "llm/completion_tokens"


@dataclass(frozen=True)
class WorkerStep:
    """A step as a worker builds it: its stage and options (``StepSpec`` is the same step as written
    in pipeline.yaml, before validation)."""

    name: str          # the step name
    stage: str         # the registered stage name
    options: dict
    workdir: str


@dataclass(frozen=True)
class SegmentJob:
    """The tasks of one segment: a fused source/map chain writing one materialised step."""

    key: str                          # "<step>@<fingerprint>": workers rebuild stages when it changes
    fingerprint: str
    source: WorkerStep | None         # a source fused at the head (tasks are its Task objects)
    chain: tuple[WorkerStep, ...]     # map stages, in order (tasks are InputSlices when no source)
    out_dir: str                      # URL of the step folder
    state_dir: str                    # URL of the step's completion records
    side_dirs: dict[str, str]         # step -> URL where its side outputs go
    task_ids: tuple[str, ...]
    batch_size: int
    rows_per_shard: int
    plugins: tuple[str, ...] = ()
    plugin_dirs: tuple[str, ...] = ()   # where plugins are found besides sys.path (Ray workers
    cpus: float = 1.0                   # on other nodes do not inherit the driver's sys.path)
    gpus: float = 0.0
    memory_gb: float | None = None      # the rest of the segment's Resources (stage.py), for runners
    replicas: int | None = None
    max_retries: int = 2
    # a chain with an LLM step: small tables are joined up to batch_size (each batch ends with the
    # engine's window draining; a source's own batches can be smaller than the LLM step wants)
    coalesce: bool = False

    @property
    def specs(self) -> list[WorkerStep]:
        return ([self.source] if self.source else []) + list(self.chain)


@dataclass(frozen=True)
class InputSlice:
    """A task of a segment that reads a materialised step: rows [start, stop) of one shard."""

    path: str
    start: int = 0
    stop: int | None = None   # None: to the end

    @property
    def id(self) -> str:
        base = os.path.basename(self.path)
        return base if self.start == 0 and self.stop is None else f"{base}@{self.start}"

    def read(self, batch_size: int) -> Iterator[pa.Table]:
        return iter_parquet(self.path, batch_size=batch_size, start=self.start, stop=self.stop)


class TaskDeferred(Exception):
    """A task finished but some of its rows failed transiently (``Stage.defer``): its shards are
    kept but it is not recorded as complete, so the next run redoes it."""

    def __init__(self, rows: int, steps: dict):
        super().__init__(f"{rows} row(s) failed transiently")
        self.rows = rows
        self.steps = steps   # step -> StepRecord of the deferred task (counters for stats)

    def __reduce__(self):  # crosses process boundaries
        return (TaskDeferred, (self.rows, self.steps))


# ------------------------------------------------------------------------------------------------
# worker process set-up (local process pool)


def init_worker(queue: Any, level: int, parent_pid: int, env: dict[str, str],
                devices: Any = None) -> None:
    # the forkserver was started by the first pool of this process and kept its environment:
    # workers take the environment of the run that starts them (credentials, endpoints, paths)
    os.environ.clear()
    os.environ.update(env)
    if devices is not None:   # a worker of a GPU pool: its own devices, for life
        os.environ["CUDA_VISIBLE_DEVICES"] = devices.get()
    _WORKER["queue"] = queue
    from curate.logs import setup_worker   # the run's log format (CURATE_LOG_FORMAT in ``env``)

    setup_worker(level)
    _die_with_parent(parent_pid)
    from curate.engines.base import set_send_guard

    set_send_guard(lambda: _exit_if_orphan(parent_pid))
    _listen_to_requests()


def _exit_if_orphan(parent_pid: int) -> None:
    """Before each LLM request: exit now if the run that started this worker is gone (killed).
    The watchdog below notices within half a second, but in that time an orphan would send new
    requests that the resumed run then sends again (duplicates, paid twice)."""
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        os._exit(70)
    except PermissionError:
        pass


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive the run that started it (``kill -9`` of ``curate run``): an
    orphan would keep writing while the next run resumes. The forkserver exits when the run dies,
    so PR_SET_PDEATHSIG kills us at once on Linux; a watchdog thread covers other systems."""
    import signal
    import threading

    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            time.sleep(0.5)
            _exit_if_orphan(parent_pid)

    threading.Thread(target=watch, name="curate-parent-watchdog", daemon=True).start()


def set_progress_sink(queue: Any) -> None:
    _WORKER["queue"] = queue
    _listen_to_requests()


# LLM requests of this worker, summed between progress messages (see curate.engines.base)
_LLM: dict[str, Any] = {"sent": 0, "done": 0, "failed": 0, "tokens": 0, "cost": 0.0, "at": 0.0}
_LLM_LOCK = threading.Lock()
# batch mode: the last status of each batch this worker polls, id -> [status, completed, failed, total]
_BATCHES: dict[str, list[Any]] = {}


def _listen_to_requests() -> None:
    from curate.engines.base import set_request_listener

    set_request_listener(_on_request)


def _on_request(engine: Any, event: str, c: Any, n: int) -> None:
    with _LLM_LOCK:
        if event == "batch":
            if isinstance(c, dict) and c.get("id"):
                _BATCHES[c["id"]] = [c.get("status"), c.get("completed", 0), c.get("failed", 0), c.get("total", 0)]
                _LLM["batches"] = True
        elif event == "sent":
            _LLM["sent"] += n
        elif event == "done" and c is not None:
            _LLM["done"] += 1
            _LLM["tokens"] += c.prompt_tokens + c.completion_tokens
            cfg = getattr(engine, "config", None)
            pp, pc = getattr(cfg, "price_prompt", None), getattr(cfg, "price_completion", None)
            if pp or pc:
                _LLM["cost"] += (c.prompt_tokens * (pp or 0) + c.completion_tokens * (pc or 0)) / 1e6
        else:
            _LLM["failed"] += n
        due = time.monotonic() - _LLM["at"] >= 0.5
    if due:
        _flush_requests()


def _flush_requests() -> None:
    """Send the summed request counts to the runner's progress line."""
    q, key = _WORKER.get("queue"), _WORKER.get("key")
    with _LLM_LOCK:
        delta: dict[str, Any] = {k: _LLM[k] for k in ("sent", "done", "failed", "tokens", "cost")}
        if _LLM.get("batches"):   # not a sum: the latest status of each batch
            delta["batches"] = {k: list(v) for k, v in _BATCHES.items()}
            _LLM["batches"] = False
            for k in [k for k, v in _BATCHES.items() if v[0] in ("completed", "expired", "failed", "cancelled")]:
                del _BATCHES[k]   # sent once finished, then forgotten (the next step starts clean)
        if not any(delta.values()):
            return
        for k in ("sent", "done", "failed", "tokens"):
            _LLM[k] = 0
        _LLM["cost"] = 0.0
        _LLM["at"] = time.monotonic()
    if q is not None and key is not None:
        q.put((key, 0, 0, delta))


def _teardown_stages() -> None:
    for st in _WORKER.get("stages") or []:
        st.teardown()
    _WORKER.update({"key": None, "stages": None})


def reset_worker() -> None:
    _teardown_stages()
    _WORKER["queue"] = None


# ------------------------------------------------------------------------------------------------
# tasks


def _build(job: SegmentJob) -> list[Stage]:
    if _WORKER["key"] != job.key:
        _teardown_stages()
        if job.plugins:
            import sys
            sys.path.extend(d for d in job.plugin_dirs if d not in sys.path)
        for mod in job.plugins:
            __import__(mod)

        def make(spec: WorkerStep) -> Stage:
            st = get_stage(spec.stage)(spec.options)
            st.step_name = spec.name
            st.workdir = spec.workdir
            os.makedirs(st.workdir, exist_ok=True)
            return st

        _WORKER["stages"] = [make(s) for s in job.specs]
        _WORKER["key"] = job.key
    return _WORKER["stages"]


def _report(key: str, rows: int, tokens: int = 0) -> None:
    q = _WORKER.get("queue")
    if q is not None:
        q.put((key, rows, tokens))


def _rebatch(tables: Iterator[pa.Table], size: int, coalesce: bool = False) -> Iterator[pa.Table]:
    """Tables of at most ``size`` rows; ``coalesce``: consecutive small tables joined up to it."""
    if not coalesce:
        for t in tables:
            if t.num_rows <= size:
                yield t
            else:
                yield from slices(t, size)
        return
    held: list[pa.Table] = []
    rows = 0
    for t in tables:
        for part in (slices(t, size) if t.num_rows > size else (t,)):
            if held and rows + part.num_rows > size:
                yield _concat(held)
                held, rows = [], 0
            held.append(part)
            rows += part.num_rows
    if held:
        yield _concat(held)


def _concat(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")


def run_task(job: SegmentJob, index: int, item: Any) -> TaskRecord:
    """Run task ``index`` of ``job`` (a source Task or an InputSlice), write its shards and side
    outputs, then its completion record. Returns the record."""
    t0 = time.monotonic()
    stages = _build(job)
    src, chain = (stages[0], stages[1:]) if job.source else (None, stages)
    fs, out_dir = get_fs(job.out_dir)
    prefix = f"part-{index:05d}"
    for stale in fs.glob(join(out_dir, prefix + "-*")):
        fs.rm(stale)
    writer = ShardWriter(job.out_dir, prefix=prefix, rows_per_shard=job.rows_per_shard)
    steps = {s.step_name: StepRecord() for s in stages}
    if src is not None:
        src.ensure_setup()
        tables = src.read(item)
    else:
        tables = item.read(job.batch_size)
    batches = _rebatch(tables, job.batch_size, job.coalesce)
    while True:
        c0 = time.perf_counter()
        t = next(batches, None)
        if src is not None:
            steps[src.step_name].seconds += time.perf_counter() - c0
        if t is None:
            break
        head = t.num_rows
        if src is not None:
            steps[src.step_name].rows_out += head
        for st in chain:
            rec = steps[st.step_name]
            rec.rows_in += t.num_rows
            before = st.counters.data.get(TOKENS_KEY, 0)
            c0 = time.perf_counter()
            t = st.process_safe(t) if t.num_rows else t
            rec.seconds += time.perf_counter() - c0
            rec.rows_out += t.num_rows
            tokens = st.counters.data.get(TOKENS_KEY, 0) - before
            if tokens:
                _report(job.key + "/tokens", 0, tokens)
        writer.write(t)
        _report(job.key, head)
    _flush_requests()
    shards = [s.to_dict() for s in writer.close()]
    for st in stages:
        steps[st.step_name].counters = st.counters.take()
    deferred = sum(st.take_deferred() for st in stages)
    if deferred:
        for st in stages:
            st.take_side()
        raise TaskDeferred(deferred, steps)
    side: dict[str, list[dict]] = {}
    for st in stages:
        for name, table in st.take_side().items():
            sfs, sdir = get_fs(job.side_dirs[st.step_name])
            info = write_parquet_atomic(sfs, join(sdir, f"_{name}", f"{prefix}.parquet"), table)
            side.setdefault(st.step_name, []).append({**info.to_dict(), "name": name})
    record = TaskRecord(task_index=index, task_id=job.task_ids[index], fingerprint=job.fingerprint,
                        shards=shards, side=side, steps=steps, seconds=round(time.monotonic() - t0, 3))
    record.write(job.state_dir)
    return record
