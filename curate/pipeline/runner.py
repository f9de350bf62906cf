"""Runs a validated pipeline: plans segments, executes tasks, records completion, resumes.

Plan
  Consecutive map stages are fused into a *segment*: each task (a source task, or one Parquet
  shard of a materialised step) streams Arrow batches through every stage of the chain and writes
  ``<output>/<step>/part-<task>-<n>.parquet``. A step is materialised when it is a global stage, a
  source or step read by more than one step or by a global stage, a leaf, or marked ``save: true``.

Completion and resume
  Shards are written atomically (temp + rename). After all shards of a task are written, a
  completion record ``_curate/state/<step>/done/part-<task>.json`` (shards, row counts, sha256,
  counters) is written atomically. A step whose tasks are all recorded gets ``DONE.json``. On the
  next run, recorded tasks and finished steps are skipped; an unrecorded task's leftover shards are
  deleted and the task runs again, so a killed run ends with exactly the output of an
  uninterrupted one. Each step carries a fingerprint of its options and everything upstream;
  changed options invalidate that step and the steps below it. ``force=True`` recomputes all.

Executors
  The runner talks to an executor with ``submit(fn, *args) -> Future`` and ``map``: a process pool
  (local) or Ray (``runner: ray``). Stage instances are built inside workers from (name, options),
  set up once per worker and reused for every task of the segment.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from curate.pipeline.config import Pipeline, Step
from curate.pipeline.context import RunContext
from curate.pipeline.io import (Dataset, ShardWriter, atomic_write_bytes, get_fs, is_local, iter_parquet, slices,
                                join, to_url, write_parquet_atomic)
from curate.pipeline.stage import Stage, get_stage
from curate.pipeline.stats import Progress, StepStats, funnel_table

log = logging.getLogger("curate")


class PipelineError(Exception):
    """A run failed (a stage raised, or too many documents failed)."""


class TaskDeferred(Exception):
    """A task finished but some of its rows failed transiently (``Stage.defer``): its shards are
    kept but it is not recorded as complete, so the next run redoes it."""

    def __init__(self, rows: int, steps: dict):
        super().__init__(f"{rows} row(s) failed transiently")
        self.rows = rows
        self.steps = steps

    def __reduce__(self):  # crosses process boundaries
        return (TaskDeferred, (self.rows, self.steps))


# ------------------------------------------------------------------------------------------------
# output layout


class Layout:
    def __init__(self, output: str):
        self.fs, self.root = get_fs(output)
        self.url = output

    def step_dir(self, step: str) -> str:
        return join(self.root, step)

    def state_dir(self, step: str) -> str:
        return join(self.root, "_curate", "state", step)

    def workdir(self, step: str) -> str:
        """A local folder for a stage's own state (crawl frontier, LLM cache, dedup spill)."""
        if is_local(self.fs):
            return os.path.join(self.root, "_curate", "work", step)
        import hashlib
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        return os.path.join(os.path.expanduser("~/.cache/curate/work"), key, step)

    def url_of(self, path: str) -> str:
        return to_url(self.fs, path)

    def write_json(self, path: str, obj: Any) -> None:
        atomic_write_bytes(self.fs, path, json.dumps(obj, indent=1, default=str).encode())

    def read_json(self, path: str) -> Any | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def rm(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


# ------------------------------------------------------------------------------------------------
# worker side: built stages are cached per process; tasks are plain picklable payloads

_WORKER: dict[str, Any] = {"key": None, "stages": None, "queue": None}


def _init_worker(queue: Any, level: int, parent_pid: int, env: dict[str, str]) -> None:
    # the forkserver was started by the first pool of this process and kept its environment:
    # workers take the environment of the run that starts them (credentials, endpoints, paths)
    os.environ.clear()
    os.environ.update(env)
    _WORKER["queue"] = queue
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    _die_with_parent(parent_pid)


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
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(70)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="curate-parent-watchdog", daemon=True).start()


def _build(payload: dict) -> tuple[Stage | None, list[Stage]]:
    if _WORKER["key"] != payload["key"]:
        old = _WORKER.get("stages")
        if old:
            for st in ([old[0]] if old[0] else []) + old[1]:
                st.teardown()
        for mod in payload.get("plugins", []):
            __import__(mod)

        def make(spec: dict) -> Stage:
            st = get_stage(spec["stage"])(spec["options"])
            st.step_name = spec["name"]
            st.workdir = spec["workdir"]
            os.makedirs(st.workdir, exist_ok=True)
            return st

        src = make(payload["source"]) if payload["source"] else None
        _WORKER["stages"] = (src, [make(s) for s in payload["chain"]])
        _WORKER["key"] = payload["key"]
    src, chain = _WORKER["stages"]
    return src, chain


def _report(key: str, rows: int, tokens: int = 0) -> None:
    q = _WORKER.get("queue")
    if q is not None:
        q.put((key, rows, tokens))


def _rebatch(tables: Iterator[pa.Table], size: int) -> Iterator[pa.Table]:
    for t in tables:
        if t.num_rows <= size:
            yield t
        else:
            yield from slices(t, size)


def run_task(payload: dict, index: int, item: Any) -> dict:
    """Run one task of a segment end to end and record its completion. Returns the record."""
    t0 = time.monotonic()
    src, chain = _build(payload)
    fs, out_dir = get_fs(payload["out_dir"])
    prefix = f"part-{index:05d}"
    for stale in fs.glob(join(out_dir, prefix + "-*")):
        fs.rm(stale)
    writer = ShardWriter(payload["out_dir"], prefix=prefix, rows_per_shard=payload["rows_per_shard"])
    steps: dict[str, dict] = {s.step_name: {"in": 0, "out": 0, "seconds": 0.0}
                              for s in ([src] if src else []) + chain}
    if src is not None:
        src.ensure_setup()
        tables = src.read(item)
    else:
        tables = iter_parquet(item, batch_size=payload["batch_size"])
    tok_key = "llm/completion_tokens"
    batches = _rebatch(tables, payload["batch_size"])
    while True:
        c0 = time.perf_counter()
        t = next(batches, None)
        if src is not None:
            steps[src.step_name]["seconds"] += time.perf_counter() - c0
        if t is None:
            break
        head = t.num_rows
        if src is not None:
            steps[src.step_name]["out"] += head
        for st in chain:
            steps[st.step_name]["in"] += t.num_rows
            before = st.counters.data.get(tok_key, 0)
            c0 = time.perf_counter()
            t = st.process_safe(t) if t.num_rows else t
            steps[st.step_name]["seconds"] += time.perf_counter() - c0
            steps[st.step_name]["out"] += t.num_rows
            tokens = st.counters.data.get(tok_key, 0) - before
            if tokens:
                _report(payload["key"] + "/tokens", 0, tokens)
        writer.write(t)
        _report(payload["key"], head)
    shards = [s.to_dict() for s in writer.close()]
    deferred = sum(st.take_deferred() for st in ([src] if src else []) + chain)
    if deferred:
        for st in ([src] if src else []) + chain:
            steps[st.step_name]["counters"] = st.counters.take()
            st.take_side()
        raise TaskDeferred(deferred, steps)
    side: dict[str, list[dict]] = {}
    for st in ([src] if src else []) + chain:
        steps[st.step_name]["counters"] = st.counters.take()
        for name, table in st.take_side().items():
            sfs, sdir = get_fs(payload["side_dirs"][st.step_name])
            info = write_parquet_atomic(sfs, join(sdir, f"_{name}", f"{prefix}.parquet"), table)
            side.setdefault(st.step_name, []).append({**info.to_dict(), "name": name})
    record = {"task_index": index, "task_id": payload["task_ids"][index], "fingerprint": payload["fingerprint"],
              "shards": shards, "side": side, "steps": steps, "seconds": round(time.monotonic() - t0, 3)}
    sfs, state = get_fs(payload["state_dir"])
    atomic_write_bytes(sfs, join(state, "done", f"{prefix}.json"), json.dumps(record, sort_keys=True).encode())
    return record


# ------------------------------------------------------------------------------------------------
# executors


class _InlineQueue:
    def __init__(self, sink: Callable[[tuple], None]):
        self.sink = sink

    def put(self, msg: tuple) -> None:
        self.sink(msg)


class LocalExecutor:
    """A process pool (forkserver workers) or, with one worker, the calling process itself."""

    def __init__(self, workers: int, preload: list[str] | None = None):
        self.workers = workers
        self.queue = None
        self._pool = None
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            # forkserver: workers fork from a clean server process that has already imported
            # curate and pyarrow: fast start, and no threads of this process are forked.
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["curate.pipeline.runner", *(preload or [])])
            self.queue = ctx.Queue()
            self._pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                             initargs=(self.queue, logging.getLogger().level, os.getpid(),
                                                       dict(os.environ)))

    def set_sink(self, sink: Callable[[tuple], None]) -> None:
        if self._pool is None:
            _WORKER["queue"] = _InlineQueue(sink)
        self._sink = sink

    def drain(self) -> None:
        if self.queue is None:
            return
        import queue as _q
        while True:
            try:
                msg = self.queue.get_nowait()
            except _q.Empty:
                return
            self._sink(msg)

    def submit(self, fn: Callable, *args: Any) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001
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
        _WORKER.update({"key": None, "stages": None, "queue": None})


# ------------------------------------------------------------------------------------------------
# planning


@dataclass
class Segment:
    target: Step                      # the materialised step
    source: Step | None               # a source step fused at the head, or None
    head: Step | None                 # a materialised step read as input, or None
    chain: list[Step] = field(default_factory=list)


def plan(pipe: Pipeline) -> list[Segment | Step]:
    """Materialised steps in run order: Segments (source/map chains) and global Steps."""
    steps = pipe.steps
    mat: set[str] = set()
    for s in steps.values():
        cons = pipe.consumers(s.name)
        if (s.kind == "global" or s.save or not cons or len(cons) > 1
                or any(c.kind == "global" for c in cons)):
            mat.add(s.name)
    order: list[Segment | Step] = []
    for s in steps.values():  # file order is a topological order (inputs must come first)
        if s.name not in mat:
            continue
        if s.kind == "global":
            order.append(s)
            continue
        chain: list[Step] = []
        cur = s
        while cur.kind == "map":
            chain.insert(0, cur)
            prev = steps[cur.inputs[0]]
            if prev.name in mat or prev.kind != "map":
                break
            cur = prev
        first_in = steps[chain[0].inputs[0]] if chain else None
        if not chain:                            # a materialised source
            order.append(Segment(target=s, source=s, head=None))
        elif first_in.kind == "source" and first_in.name not in mat:
            order.append(Segment(target=s, source=first_in, head=None, chain=chain))
        else:
            order.append(Segment(target=s, source=None, head=first_in, chain=chain))
    return order


# ------------------------------------------------------------------------------------------------
# the run


@dataclass
class RunResult:
    output: str
    stats: dict[str, dict]
    outputs: dict[str, list[str]]     # step -> Parquet shard URLs
    seconds: float

    def dataset(self, step: str) -> Dataset:
        return Dataset(self.outputs[step])


class Runner:
    def __init__(self, pipe: Pipeline, *, force: bool = False, workers: int | None = None,
                 progress: bool = True, executor: Any = None):
        self.pipe = pipe
        self.spec = pipe.spec
        self.layout = Layout(pipe.spec.output)
        self.force = force
        self.workers = workers or pipe.spec.workers or os.cpu_count() or 1
        self.progress_enabled = progress
        self.stats: dict[str, StepStats] = {}
        self.outputs: dict[str, list[str]] = {}
        self._shards: dict[str, list[dict]] = {}  # step -> shard records, for manifest.json
        self._executor = executor
        self._bars: dict[str, Progress] = {}

    # -- helpers -----------------------------------------------------------------------------------
    def _stage_spec(self, step: Step) -> dict:
        return {"name": step.name, "stage": step.stage.name, "options": step.options(),
                "workdir": self.layout.workdir(step.name)}

    def _done_marker(self, step: Step) -> dict | None:
        m = self.layout.read_json(join(self.layout.state_dir(step.name), "DONE.json"))
        return m if m and m.get("fingerprint") == step.fingerprint else None

    def _reset_step(self, step: Step, workdir: bool = False) -> None:
        """Delete a step's output and completion records. A stage's own working folder (crawl
        frontier, LLM request cache) is kept unless ``workdir`` (``--force``); a global stage's
        scratch is always cleared."""
        self.layout.rm(self.layout.step_dir(step.name))
        self.layout.rm(self.layout.state_dir(step.name))
        if workdir or step.stage.kind == "global":
            shutil.rmtree(self.layout.workdir(step.name), ignore_errors=True)

    def _sink(self, msg: tuple) -> None:
        key, rows, tokens = msg
        bar = self._bars.get(key.removesuffix("/tokens"))
        if bar is not None:
            bar.update(rows, tokens)

    def _check_errors(self, step_names: list[str]) -> None:
        for name in step_names:
            st = self.stats[name]
            errors = st.errors()
            seen = max(st.rows_in, st.rows_out + errors)
            if seen >= 20 and errors / seen > self.spec.max_error_fraction:
                top = sorted(((k, v) for k, v in st.counters.items() if k.startswith("errors/")),
                             key=lambda kv: -kv[1])[:3]
                raise PipelineError(
                    f"step {name!r}: {errors:,} of {seen:,} documents failed "
                    f"(more than max_error_fraction={self.spec.max_error_fraction}); top reasons: "
                    + ", ".join(f"{k[7:]} {v:,}" for k, v in top)
                    + ". Fix the cause and run again: finished shards are kept.")

    def _inputs_files(self, step: Step) -> list[str]:
        files: list[str] = []
        for inp in step.inputs:
            files.extend(self.outputs[inp])
        return files

    # -- the run -----------------------------------------------------------------------------------
    def _lock(self) -> Any:
        """Refuse to run when another live run writes the same (local) output."""
        if not is_local(self.layout.fs):
            return None
        import fcntl
        os.makedirs(os.path.join(self.layout.root, "_curate"), exist_ok=True)
        fh = open(os.path.join(self.layout.root, "_curate", "lock"), "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise PipelineError(f"another curate run is writing {self.layout.url}; wait for it or stop it") from None
        return fh

    def run(self) -> RunResult:
        lock = self._lock()
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.close()

    def _run(self) -> RunResult:
        t0 = time.monotonic()
        fs = self.layout.fs
        if self.force:
            for s in self.pipe.steps.values():
                self._reset_step(s, workdir=True)
        fs.makedirs(self.layout.root, exist_ok=True)
        self.layout.write_json(join(self.layout.root, "_curate", "pipeline.json"),
                               self.spec.model_dump(mode="json"))
        for s in self.pipe.steps.values():
            self.stats[s.name] = StepStats(s.name, s.stage.name)
        own = self._executor is None
        if own:
            preload = [*self.spec.plugins]
            for st in self.pipe.steps.values():
                preload += [type(st.stage).__module__, *type(st.stage).preload]
            self._executor = make_executor(self.spec.runner, self.workers, list(dict.fromkeys(preload)))
        self._executor.set_sink(self._sink)
        try:
            for item in plan(self.pipe):
                if isinstance(item, Segment):
                    self._run_segment(item)
                else:
                    self._run_global(item)
        finally:
            if own:
                self._executor.shutdown()
        stats = {n: s.to_dict() for n, s in self.stats.items()}
        for name, st in stats.items():
            if st["in"] and not st["out"]:
                top = ", ".join(f"{k} {v:,}" for k, v in sorted(st["dropped"].items(), key=lambda kv: -kv[1])[:3])
                log.warning("step %s kept none of its %s documents (%s): check its options", name,
                            f"{st['in']:,}", top or "no reason recorded")
        result = RunResult(self.spec.output, stats, dict(self.outputs), time.monotonic() - t0)
        self.layout.write_json(join(self.layout.root, "stats.json"),
                               {"pipeline": self.spec.name, "seconds": round(result.seconds, 3),
                                "steps": stats})
        manifest = {"pipeline": self.spec.name,
                    "steps": {s.name: {"fingerprint": s.fingerprint, "shards": self._shards[s.name]}
                              for s in self.pipe.steps.values() if s.name in self._shards}}
        self.layout.write_json(join(self.layout.root, "manifest.json"), manifest)
        return result

    def _finish(self, step: Step, shards: list[dict], steps_stats: dict[str, dict]) -> None:
        # workers wrote files this process may have listed before (object stores cache listings)
        self.layout.fs.invalidate_cache()
        self._shards[step.name] = shards
        marker = {"fingerprint": step.fingerprint, "step": step.name, "stage": step.stage.name,
                  "shards": shards, "stats": steps_stats}
        self.layout.write_json(join(self.layout.state_dir(step.name), "DONE.json"), marker)

    def _load_finished(self, step: Step, marker: dict) -> None:
        self._shards[step.name] = marker["shards"]
        d = self.layout.step_dir(step.name)
        self.outputs[step.name] = [self.layout.url_of(join(d, s["path"])) for s in marker["shards"]]
        for name, st in marker["stats"].items():
            S = self.stats[name]
            S.rows_in, S.rows_out = st["in"], st["out"]
            S.counters.clear()
            S.counters.update(st.get("counters", {}))
            S.seconds = st.get("seconds", 0.0)
            S.shards = st.get("shards", 0)
            S.status = "done (resumed)"

    def _run_segment(self, seg: Segment) -> None:
        target = seg.target
        names = ([seg.source.name] if seg.source else []) + [s.name for s in seg.chain]
        marker = self._done_marker(target)
        if marker:
            log.info("step %s: finished earlier, skipped (use --force to recompute)", target.name)
            self._load_finished(target, marker)
            return
        state = self.layout.state_dir(target.name)
        fs = self.layout.fs
        # tasks
        if seg.source is not None:
            src = seg.source.stage
            tasks: list[Any] = src.tasks()
            task_ids = [t.id for t in tasks]
        else:
            tasks = list(self.outputs[seg.head.name])
            task_ids = [os.path.basename(f) for f in tasks]
        # existing completion records
        records: dict[int, dict] = {}
        stale = False
        for f in sorted(fs.glob(join(state, "done", "part-*.json"))):
            rec = self.layout.read_json(f)
            if not rec:
                continue
            if rec.get("fingerprint") != target.fingerprint:
                stale = True
                break
            i = rec["task_index"]
            if i < len(task_ids) and rec["task_id"] == task_ids[i]:
                records[i] = rec
        if stale:
            log.info("step %s: options or inputs changed since the last run; recomputing", target.name)
            self._reset_step(target)
            records = {}
        else:
            for tmp in fs.glob(join(self.layout.step_dir(target.name), "*.tmp-*")):
                fs.rm(tmp)
        if records:
            log.info("step %s: resuming, %d of %d tasks already done", target.name, len(records), len(tasks))
        pending = [i for i in range(len(tasks)) if i not in records]
        payload = {
            "key": f"{target.name}@{target.fingerprint}",
            "plugins": list(self.spec.plugins),
            "source": self._stage_spec(seg.source) if seg.source else None,
            "chain": [self._stage_spec(s) for s in seg.chain],
            "out_dir": self.layout.url_of(self.layout.step_dir(target.name)),
            "state_dir": self.layout.url_of(state),
            "side_dirs": {n: self.layout.url_of(self.layout.step_dir(n)) for n in names},
            "fingerprint": target.fingerprint,
            "task_ids": task_ids,
            "batch_size": self.spec.batch_size,
            "rows_per_shard": self.spec.rows_per_shard,
            "resources": {"cpus": max([s.stage.resources.cpus for s in seg.chain] + [1.0]),
                          "gpus": max([s.stage.resources.gpus for s in seg.chain] + [0.0])},
        }
        total = None
        if seg.head is not None:
            total = self.stats[seg.head.name].rows_out
        bar = Progress(target.name, total=total, enabled=self.progress_enabled)
        self._bars[payload["key"]] = bar
        for rec in records.values():
            self._add_record(rec)
            head = rec["steps"][names[0]]
            bar.update(head["out"] if seg.source is not None else head["in"])
        bar.tasks(len(records), len(tasks))
        try:
            futures = {self._executor.submit(run_task, payload, i, tasks[i]): i for i in pending}
        except RuntimeError as exc:  # the executor cannot place the tasks (e.g. no GPUs)
            bar.close()
            raise PipelineError(f"step {target.name!r}: {exc}") from exc
        deferred: dict[str, int] = {}
        try:
            while futures:
                done, _ = wait(list(futures), timeout=0.25, return_when=FIRST_COMPLETED)
                self._executor.drain()
                for f in done:
                    i = futures.pop(f)
                    try:
                        rec = f.result()
                    except TaskDeferred as exc:
                        deferred[task_ids[i]] = exc.rows
                        for name, st in exc.steps.items():
                            self.stats[name].counters.update(st.get("counters") or {})
                        continue
                    except Exception as exc:
                        raise PipelineError(f"step {target.name!r}: task {task_ids[i]!r} failed: "
                                            f"{type(exc).__name__}: {exc}") from exc
                    records[i] = rec
                    self._add_record(rec)
                    if not getattr(self._executor, "streams_progress", True):
                        head = rec["steps"][names[0]]
                        bar.update(head["out"] if seg.source is not None else head["in"])
                    bar.tasks(len(records), len(tasks))
                    self._check_errors(names)
        finally:
            for f in futures:
                f.cancel()
            self._executor.drain()
            bar.close()
        if deferred:
            reasons = sorted(k[7:] for k, v in self.stats[target.name].counters.items()
                             if k.startswith("errors/transient/"))
            raise PipelineError(
                f"step {target.name!r}: {sum(deferred.values()):,} row(s) in {len(deferred)} task(s) failed "
                f"for reasons that may pass ({', '.join(reasons) or 'transient'}); finished work is kept. "
                "Run the same command again to retry exactly those rows.")
        shards = []
        for i in sorted(records):
            shards.extend(records[i]["shards"])
        for n in names:
            self.stats[n].status = "done"
        self.stats[target.name].shards = len(shards)
        d = self.layout.step_dir(target.name)
        self.outputs[target.name] = [self.layout.url_of(join(d, s["path"])) for s in shards]
        self._finish(target, shards, {n: {"in": self.stats[n].rows_in, "out": self.stats[n].rows_out,
                                          "counters": dict(self.stats[n].counters),
                                          "seconds": self.stats[n].seconds,
                                          "shards": self.stats[n].shards} for n in names})

    def _add_record(self, rec: dict) -> None:
        for name, st in rec["steps"].items():
            self.stats[name].add(st["in"], st["out"], st.get("counters"))
            self.stats[name].seconds += st.get("seconds", 0.0)

    def _run_global(self, step: Step) -> None:
        marker = self._done_marker(step)
        if marker:
            log.info("step %s: finished earlier, skipped (use --force to recompute)", step.name)
            self._load_finished(step, marker)
            return
        self._reset_step(step)
        files = self._inputs_files(step)
        ds = Dataset(files)
        rows_in = sum(self.stats[i].rows_out for i in step.inputs)
        stage = step.stage
        stage.workdir = self.layout.workdir(step.name)
        os.makedirs(stage.workdir, exist_ok=True)
        bar = Progress(step.name, total=rows_in or None, enabled=self.progress_enabled)
        ctx = RunContext(stage.workdir, workers=self.workers, mapper=self._executor.map,
                         progress=bar.update)
        writer = ShardWriter(self.layout.url_of(self.layout.step_dir(step.name)), prefix="part",
                             rows_per_shard=self.spec.rows_per_shard)
        t0 = time.monotonic()
        try:
            stage.ensure_setup()
            stage.run(ds, writer, ctx)
            shards = [s.to_dict() for s in writer.close()]
            for name, table in stage.take_side().items():
                sw = ShardWriter(self.layout.url_of(join(self.layout.step_dir(step.name), f"_{name}")),
                                 prefix="part", rows_per_shard=self.spec.rows_per_shard)
                sw.write(table)
                sw.close()
        except Exception as exc:
            raise PipelineError(f"step {step.name!r} ({stage.name}) failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if bar.n == 0:
                bar.update(rows_in)
            bar.close()
        S = self.stats[step.name]
        S.add(rows_in, sum(s["rows"] for s in shards), stage.counters.take())
        S.seconds = time.monotonic() - t0
        S.shards = len(shards)
        S.status = "done"
        self._check_errors([step.name])
        d = self.layout.step_dir(step.name)
        self.outputs[step.name] = [self.layout.url_of(join(d, s["path"])) for s in shards]
        self._finish(step, shards, {step.name: {"in": S.rows_in, "out": S.rows_out,
                                                "counters": dict(S.counters), "seconds": S.seconds,
                                                "shards": S.shards}})


def make_executor(runner: str, workers: int, preload: list[str] | None = None) -> Any:
    """Stage plugins reach workers through each task's payload; ``preload`` only warms them up."""
    if runner == "ray":
        from curate.pipeline.ray_runner import RayExecutor
        return RayExecutor(workers)
    return LocalExecutor(workers, preload)


def run_pipeline(source: str | dict | Pipeline, *, force: bool = False, runner: str | None = None,
                 workers: int | None = None, output: str | None = None, progress: bool = True,
                 print_funnel: bool = False) -> RunResult:
    """Validate and run a pipeline file/dict. The library equivalent of ``curate run``."""
    from curate.pipeline.config import load_pipeline

    pipe = source if isinstance(source, Pipeline) else load_pipeline(
        source, overrides={"runner": runner, "workers": workers, "output": output})
    result = Runner(pipe, force=force, workers=workers, progress=progress).run()
    if print_funnel:
        print(funnel_table(result.stats))
    return result
