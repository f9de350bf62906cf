"""Runs a validated pipeline: plans segments (``plan.py``), hands their tasks to an executor
(``local_executor.py``, ``ray_executor.py``), which runs them in workers (``worker.py``), and keeps the
run state (``state.py``) that makes a killed run resumable.

Completion and resume
  Shards are written atomically (temp + rename). After all shards of a task are written, a
  completion record ``_curate/state/<step>/done/part-<task>.json`` (shards, row counts, sha256,
  counters) is written atomically. A step whose tasks are all recorded gets ``DONE.json``. On the
  next run, recorded tasks and finished steps are skipped; an unrecorded task's leftover shards are
  deleted and the task runs again, so a killed run ends with exactly the output of an
  uninterrupted one. Each step carries a fingerprint of its options and everything upstream;
  changed options invalidate that step and the steps below it. ``force=True`` recomputes all.

Failure
  A step is finished only when its errors are within ``max_error_fraction``. Over it, the run
  stops and ``_curate/state/<step>/FAILED.json`` makes the next run redo the tasks whose records
  carry errors. A failed or interrupted run still writes stats.json, manifest.json and the report
  of what finished (``"complete": false``). The output's lease (``lease.py``) keeps a second run
  out. Exit codes: ``curate.exit_codes``; README, "Failure semantics".

Tasks
  A segment headed by a source runs one task per source task (file, byte range, crawl). A segment
  reading a materialised step runs one task per shard; when there are fewer shards than workers
  (a global step's output is often one shard), shards are split into row ranges so that every
  worker has work.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, Callable

from curate import exit_codes
from curate.pipeline.config import ConfigError, Pipeline, Step
from curate.pipeline.context import RunContext
from curate.pipeline.io import Dataset, ShardWriter, join
from curate.pipeline.plan import Segment, plan
from curate.pipeline.plugins import plugin_dirs
from curate.pipeline.stage import Resources
from curate.pipeline.stats import Progress, StepStats
from curate.pipeline.state import Layout, StepMarker, StepRecord, TaskRecord, read_task_records
from curate.pipeline.worker import InputSlice, SegmentJob, TaskDeferred, WorkerStep, run_task

log = logging.getLogger("curate")

__all__ = ["PipelineError", "BudgetReached", "OutputLocked", "Runner", "RunResult", "make_executor", "plan", "Segment"]


class PipelineError(Exception):
    """A run failed (a stage raised, or too many documents failed). ``exit_code`` is what
    ``curate run`` exits with (``curate.exit_codes``)."""

    exit_code = exit_codes.FAILED


class OutputLocked(PipelineError):
    """Another live run holds the output's lease (``lease.py``); nothing was written."""

    exit_code = exit_codes.LOCKED


class BudgetReached(PipelineError):
    """An LLM step reached its budget: rows are left, and a rerun with the same budget sends nothing."""

    exit_code = exit_codes.BUDGET


@dataclass
class RunResult:
    output: str
    stats: dict[str, dict]
    outputs: dict[str, list[str]]     # step -> Parquet shard URLs
    seconds: float
    complete: bool = True             # False: the run failed or was interrupted (see ``failure``)
    failure: dict | None = None       # {"kind", "step", "steps", "error"} of an incomplete run
    estimate: dict | None = None      # LLM steps, estimate vs actual (``curate.pipeline.estimate.compare``)

    def dataset(self, step: str) -> Dataset:
        return Dataset(self.outputs[step])


_PART = re.compile(r"^part-(\d+)")
_FAILED = "FAILED.json"   # in a step's state folder: the last run stopped on its error fraction


def _record_errors(rec: TaskRecord) -> int:
    return sum(v for st in rec.steps.values() for k, v in st.counters.items()
               if k.startswith("errors/") and not k.startswith("errors/transient/"))


class Runner:
    def __init__(self, pipe: Pipeline, *, force: bool = False, workers: int | None = None,
                 progress: bool = True, executor: Any = None, break_lock: str | None = None,
                 estimate: dict | None = None, report: Callable[[str], str] | None = None):
        self.pipe = pipe
        self.estimate = estimate          # a `curate estimate` JSON: stats.json/report show estimate vs actual
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
        self._current: list[str] = []     # the steps running now (named when the run fails)
        self.break_lock = break_lock      # take over the lease of this holder ("host:pid")
        self._lease: Any = None
        self.partial: RunResult | None = None   # what a failed/interrupted run finished
        # writes report.html into an output, returns its path; given by the caller (the CLI,
        # curate.run.run_pipeline), so that the runner does not depend on the report
        self.report = report

    # -- helpers -----------------------------------------------------------------------------------
    def _worker_step(self, step: Step) -> WorkerStep:
        return WorkerStep(name=step.name, stage=step.stage.name, options=step.options(),
                         workdir=self.layout.workdir(step.name))

    def _reset_step(self, step: Step, workdir: bool = False) -> None:
        """Delete a step's output and completion records. A stage's own working folder (crawl
        frontier, LLM request cache) is kept unless ``workdir`` (``--force``); a global stage's
        scratch is always cleared."""
        self.layout.rm(self.layout.step_dir(step.name))
        self.layout.rm(self.layout.state_dir(step.name))
        if workdir or step.stage.kind == "global":
            shutil.rmtree(self.layout.workdir(step.name), ignore_errors=True)

    def _sink(self, msg: tuple) -> None:
        key, rows, tokens = msg[:3]
        bar = self._bars.get(key.removesuffix("/tokens"))
        if bar is not None:
            if len(msg) > 3:   # LLM requests of a worker (curate/pipeline/worker.py)
                bar.llm(msg[3])
            else:
                bar.update(rows, tokens)

    def _error_problem(self, step_names: list[str], limit: float | None = None) -> str | None:
        """Why these steps failed on errors (more than ``max_error_fraction`` of their documents,
        or than ``limit``), or None."""
        limit = self.spec.max_error_fraction if limit is None else limit
        for name in step_names:
            st = self.stats[name]
            # rows deferred for a reason that may pass (errors/transient/*) are not lost: their
            # task stays unfinished and a rerun redoes it
            lost = {k: v for k, v in st.counters.items()
                    if k.startswith("errors/") and not k.startswith("errors/transient/")}
            errors = sum(lost.values())
            seen = max(st.rows_in, st.rows_out + errors)
            if seen >= 20 and errors / seen > limit:
                top = sorted(lost.items(), key=lambda kv: -kv[1])[:3]
                return (f"step {name!r}: {errors:,} of {seen:,} documents failed "
                        f"(more than max_error_fraction={self.spec.max_error_fraction}); top reasons: "
                        + ", ".join(f"{k[7:]} {v:,}" for k, v in top)
                        + ". Fix the cause and run again: tasks without errors are kept, the tasks "
                        "that had errors are redone.")
        return None

    def _check_errors(self, step_names: list[str], target: Step, early: bool = False) -> None:
        """Raise when too many documents failed. The step is then not complete: a marker makes the
        next run redo the tasks whose records carry errors (``_drop_errored``), so a plain rerun
        fails the same way while the cause is there and recovers every document once it is fixed.
        ``early`` (while tasks are still running, on partial counts): stop only when at least half
        of the documents so far failed; the exact threshold is checked when all tasks are done."""
        problem = self._error_problem(step_names, max(0.5, self.spec.max_error_fraction) if early else None)
        if problem is None:
            return
        self.layout.write_json(join(self.layout.state_dir(target.name), _FAILED),
                               {"fingerprint": target.fingerprint, "reason": problem})
        raise PipelineError(problem)

    def _drop_errored(self, target: Step, records: dict[int, TaskRecord]) -> dict[int, TaskRecord]:
        """After a run that stopped on ``max_error_fraction``: the records without errors (the
        others' tasks run again)."""
        marker = self.layout.read_json(join(self.layout.state_dir(target.name), _FAILED))
        if not marker or marker.get("fingerprint") != target.fingerprint:
            return records
        keep = {i: r for i, r in records.items() if not _record_errors(r)}
        if len(keep) < len(records):
            log.info("step %s: the last run stopped on max_error_fraction; redoing the %d task(s) that had errors",
                     target.name, len(records) - len(keep))
        return keep

    # -- the run -----------------------------------------------------------------------------------
    def _lock(self) -> Any:
        """Take the output's lease (``lease.py``): refused while another live run holds it."""
        from curate.pipeline.lease import Lease, LeaseHeld

        try:
            return Lease(self.layout, break_lock=self.break_lock).acquire()
        except LeaseHeld as exc:
            raise OutputLocked(str(exc)) from None

    def _check_lease(self) -> None:
        from curate.pipeline.lease import LeaseHeld

        if self._lease is not None:
            try:
                self._lease.check()
            except LeaseHeld as exc:
                raise OutputLocked(str(exc)) from None

    def run(self) -> RunResult:
        self._lease = self._lock()
        try:
            return self._run()
        except BaseException as exc:
            # a failed or interrupted run still leaves stats.json, manifest.json and the report of
            # what finished, marked incomplete (``curate inspect`` and the funnel read them)
            if not isinstance(exc, OutputLocked):   # a run that lost its lease writes nothing more
                self._write_incomplete(exc)
            raise
        finally:
            self._lease.release()
            self._lease = None

    def _run(self) -> RunResult:
        self._t0 = time.monotonic()
        own = self._executor is None
        if own:
            preload = [*self.spec.plugins]
            for st in self.pipe.steps.values():
                preload += [type(st.stage).__module__, *type(st.stage).preload]
            self._executor = make_executor(self.spec.runner, self.workers, list(dict.fromkeys(preload)))
        interrupted = False
        try:
            # what the steps ask of the machines (GPUs, memory, replicas), checked before any work
            problems = self._executor.prepare(self.pipe) if hasattr(self._executor, "prepare") else []
            if problems:
                raise ConfigError(self.pipe.path, problems)
            if self.force:
                for s in self.pipe.steps.values():
                    self._reset_step(s, workdir=True)
            self.layout.fs.makedirs(self.layout.root, exist_ok=True)
            self.layout.write_json(join(self.layout.root, "_curate", "pipeline.json"), self.pipe.written_spec())
            for s in self.pipe.steps.values():
                self.stats[s.name] = StepStats(s.name, s.stage.name)
            self._executor.set_sink(self._sink)
            for item in plan(self.pipe):
                self._check_lease()
                self._current = item.step_names if isinstance(item, Segment) else [item.name]
                if isinstance(item, Segment):
                    self._run_segment(item)
                else:
                    self._run_global(item)
            self._current = []
        except (KeyboardInterrupt, SystemExit):
            interrupted = True
            raise
        finally:
            if own:
                if interrupted and hasattr(self._executor, "abort"):
                    self._executor.abort()   # do not wait for running tasks: they are redone
                else:
                    self._executor.shutdown()
        stats = {n: s.to_dict() for n, s in self.stats.items()}
        for name, st in stats.items():
            if st["in"] and not st["out"]:
                top = ", ".join(f"{k} {v:,}" for k, v in sorted(st["dropped"].items(), key=lambda kv: -kv[1])[:3])
                log.warning("step %s kept none of its %s documents (%s): check its options", name,
                            f"{st['in']:,}", top or "no reason recorded")
        return self._write_outputs(complete=True)

    def _write_outputs(self, complete: bool, failure: dict | None = None) -> RunResult:
        """stats.json, manifest.json (the finished steps' shards) and report.html."""
        stats = {n: s.to_dict() for n, s in self.stats.items()}
        cmp = None
        if self.estimate:
            from curate.pipeline.estimate import compare
            cmp = compare(self.estimate, self.pipe, stats)
        result = RunResult(self.spec.output, stats, dict(self.outputs), time.monotonic() - self._t0,
                           complete=complete, failure=failure, estimate=cmp)
        self.layout.write_json(join(self.layout.root, "stats.json"),
                               {"pipeline": self.spec.name, "seconds": round(result.seconds, 3),
                                "complete": complete, **({"failure": failure} if failure else {}),
                                **({"estimate": cmp} if cmp else {}), "steps": stats})
        manifest = {"pipeline": self.spec.name, "complete": complete,
                    "steps": {s.name: {"fingerprint": s.fingerprint, "shards": self._shards[s.name]}
                              for s in self.pipe.steps.values() if s.name in self._shards}}
        self.layout.write_json(join(self.layout.root, "manifest.json"), manifest)
        if self.spec.report and self.report is not None:
            self._write_report()
        return result

    def _write_incomplete(self, exc: BaseException) -> None:
        """Record what a failed or interrupted run finished; never hides the original error."""
        self.partial = None
        if not self.stats or not hasattr(self, "_t0"):
            return   # stopped before any step started (a lock, an unwritable output)
        running = list(getattr(self, "_current", []) or [])
        for name in running:
            if self.stats[name].status in ("pending", "done", "resumed"):
                self.stats[name].status = "failed"
        kind = ("interrupted" if isinstance(exc, KeyboardInterrupt)
                else "budget" if isinstance(exc, BudgetReached) else "failed")
        failure = {"kind": kind, "step": running[-1] if running else None,
                   "steps": running, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        try:
            self.partial = self._write_outputs(complete=False, failure=failure)
        except Exception as werr:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("could not write stats.json of the incomplete run (%s: %s)", type(werr).__name__, werr)

    def _write_report(self) -> None:
        """``report.html`` next to stats.json (the data is already safe: a report that cannot be
        drawn is a warning, not a failed run)."""
        try:
            path = self.report(self.layout.url)
            log.info("report: %s", path)
        except Exception as exc:  # noqa: BLE001 - reported, and `curate report` can retry it
            log.warning("the run report could not be written (%s: %s); try `curate report %s`",
                        type(exc).__name__, exc, self.layout.url)

    def _set_output(self, step: Step, shards: list[dict]) -> None:
        self._shards[step.name] = shards
        self.outputs[step.name] = self.layout.shard_urls(step.name, shards)

    def _finish(self, step: Step, shards: list[dict], names: list[str]) -> None:
        # workers wrote files this process may have listed before (object stores cache listings)
        self.layout.fs.invalidate_cache()
        self._check_lease()
        self._set_output(step, shards)
        self.layout.rm(join(self.layout.state_dir(step.name), _FAILED))
        StepMarker(fingerprint=step.fingerprint, step=step.name, stage=step.stage.name, shards=shards,
                   stats={n: self.stats[n].record() for n in names}).write(self.layout)

    def _skip_finished(self, step: Step) -> bool:
        """Load a step finished by an earlier run (same fingerprint); False when there is none."""
        marker = StepMarker.read(self.layout, step.name, step.fingerprint)
        if marker is None:
            return False
        log.info("step %s: finished earlier, skipped (use --force to recompute)", step.name)
        self._set_output(step, marker.shards)
        for name, rec in marker.stats.items():
            self.stats[name].load(rec)
            self.stats[name].status = "skipped"
        return True

    # -- segments ----------------------------------------------------------------------------------
    def _head_tasks(self, head: Step, llm: bool = False, min_rows: int = 0) -> list[InputSlice]:
        """One task per shard of the materialised input; shards are split into row ranges when
        there are fewer of them than workers. A chain with an LLM stage is split into
        ``LLM_TASKS_PER_WORKER`` tasks per worker: the work of a row varies a lot (chunks, retries,
        answer lengths), and small tasks pulled as workers free up keep every worker busy; but not
        below ``min_rows`` rows a task (the LLM steps' ``min_batch_rows``: each task ends with its
        engine's window draining) unless that leaves a worker without a task."""
        shards = self._shards[head.name]
        urls = self.outputs[head.name]
        total = sum(s["rows"] for s in shards)
        if total < 2 or (len(shards) >= self.workers and not llm):
            return [InputSlice(u) for u in urls]
        n = self.workers * (LLM_TASKS_PER_WORKER if llm else 1)
        if llm and min_rows:   # fewer, longer tasks, but one per worker at least
            n = max(min(self.workers, n), min(n, total // min_rows))
        chunk = max(1, math.ceil(total / n))
        tasks = []
        for url, sh in zip(urls, shards):
            starts = range(0, sh["rows"], chunk)
            if len(starts) <= 1:
                tasks.append(InputSlice(url))
            else:
                tasks += [InputSlice(url, s, min(s + chunk, sh["rows"])) for s in starts]
        return tasks

    def _remove_unrecorded(self, names: list[str], records: dict[int, TaskRecord]) -> None:
        """Delete files of tasks without a valid record (a killed task, or tasks of an earlier
        split): what the step folders hold is exactly what the records name."""
        fs = self.layout.fs
        for name in names:
            d = self.layout.step_dir(name)
            if not fs.exists(d):
                continue
            for f in fs.find(d):
                base = os.path.basename(f)
                m = _PART.match(base)
                if ".tmp-" in base or (m and int(m.group(1)) not in records):
                    fs.rm(f)

    def _run_segment(self, seg: Segment) -> None:
        target = seg.target
        names = seg.step_names
        if self._skip_finished(target):
            return
        t_start = time.monotonic()
        # a chain with an LLM step: tasks of at least its min_batch_rows, read in one batch each
        # (up to twice that; a batch ends with the engine's window draining: many small batches
        # keep it half empty)
        min_rows = max([s.stage.min_batch_rows() for s in seg.chain if _calls_llm(s.stage)], default=0)
        if seg.source is not None:
            tasks: list[Any] = seg.source.stage.tasks()
            task_ids = [t.id for t in tasks]
        else:
            tasks = self._head_tasks(seg.head, llm=any(_calls_llm(s.stage) for s in seg.chain),
                                     min_rows=min_rows)
            task_ids = [t.id for t in tasks]
        records, stale = read_task_records(self.layout, target.name, target.fingerprint, task_ids)
        if stale:
            log.info("step %s: options or inputs changed since the last run; recomputing", target.name)
            self._reset_step(target)
        records = self._drop_errored(target, records)
        self._remove_unrecorded(names, records)
        if records:
            log.info("step %s: resuming, %d of %d tasks already done", target.name, len(records), len(tasks))
        pending = [i for i in range(len(tasks)) if i not in records]
        res = Resources.combine([s.stage.resources for s in ([seg.source] if seg.source else []) + list(seg.chain)])
        job = SegmentJob(key=f"{target.name}@{target.fingerprint}", fingerprint=target.fingerprint,
                  source=self._worker_step(seg.source) if seg.source else None,
                  chain=tuple(self._worker_step(s) for s in seg.chain),
                  out_dir=self.layout.url_of(self.layout.step_dir(target.name)),
                  state_dir=self.layout.url_of(self.layout.state_dir(target.name)),
                  side_dirs={n: self.layout.url_of(self.layout.step_dir(n)) for n in names},
                  task_ids=tuple(task_ids), batch_size=max(self.spec.batch_size, 2 * min_rows),
                  coalesce=min_rows > 0,
                  rows_per_shard=self.spec.rows_per_shard, plugins=tuple(self.spec.plugins),
                  plugin_dirs=tuple(plugin_dirs(self.pipe.path if os.path.exists(self.pipe.path) else None)),
                  cpus=res.cpus, gpus=res.gpus, memory_gb=res.memory_gb,
                  replicas=res.replicas, max_retries=res.max_retries)
        total = self.stats[seg.head.name].rows_out if seg.head is not None else None
        bar = Progress(target.name, total=total, enabled=self.progress_enabled)
        if self.estimate:
            from curate.pipeline.estimate import progress_estimate
            bar.estimate = progress_estimate(self.estimate, seg.chain)
        self._bars[job.key] = bar

        def head_rows(rec: TaskRecord) -> int:
            head = rec.steps[names[0]]
            return head.rows_out if seg.source is not None else head.rows_in

        for rec in records.values():
            self._add_record(rec)
            bar.update(head_rows(rec))
        bar.tasks(len(records), len(tasks))
        this_run = {n: 0.0 for n in names}   # worker seconds of this run, per step
        deferred: dict[str, int] = {}
        window = self._executor.slots(job) if hasattr(self._executor, "slots") else len(pending)
        queue = list(pending)
        futures: dict[Future, int] = {}

        def fill() -> None:
            while queue and len(futures) < max(1, window):
                i = queue.pop(0)
                futures[self._executor.submit(run_task, job, i, tasks[i])] = i

        try:
            fill()
        except RuntimeError as exc:  # the executor cannot place the tasks (e.g. no GPUs)
            bar.close()
            raise PipelineError(f"step {target.name!r}: {exc}") from exc
        try:
            while futures:
                done, _ = wait(list(futures), timeout=0.25, return_when=FIRST_COMPLETED)
                self._executor.drain()
                bar.update(0)   # a log line every interval, also while no batch finishes
                for f in done:
                    i = futures.pop(f)
                    try:
                        rec = f.result()
                    except TaskDeferred as exc:
                        deferred[task_ids[i]] = exc.rows
                        for name, st in exc.steps.items():
                            self.stats[name].counters.update(st.counters)
                        continue
                    except Exception as exc:
                        raise PipelineError(f"step {target.name!r}: task {task_ids[i]!r} failed: "
                                            f"{type(exc).__name__}: {exc}") from exc
                    records[i] = rec
                    self._add_record(rec)
                    for n in names:
                        this_run[n] += rec.steps[n].seconds
                    if not getattr(self._executor, "streams_progress", True):
                        bar.update(head_rows(rec))
                    bar.tasks(len(records), len(tasks))
                    self._check_errors(names, target, early=True)
                fill()
        finally:
            for f in futures:
                f.cancel()
            self._executor.drain()
            bar.close()
        wall = time.monotonic() - t_start
        cpu = sum(this_run.values())
        resumed = len(pending) < len(tasks)
        for n in names:
            self.stats[n].seconds = wall * this_run[n] / cpu if cpu else (wall if n == target.name else 0.0)
            self.stats[n].status = "resumed" if resumed else "done"
        self._check_errors(names, target)   # also when every task was recorded by an earlier run
        if deferred:
            reasons = sorted({k[len("errors/transient/"):] for n in names for k in self.stats[n].counters
                              if k.startswith("errors/transient/")})
            if reasons == ["budget"]:
                raise BudgetReached(self._budget_message(seg, sum(deferred.values()), len(deferred)))
            raise PipelineError(
                f"step {target.name!r}: {sum(deferred.values()):,} row(s) in {len(deferred)} task(s) failed "
                f"for reasons that may pass ({', '.join(reasons) or 'transient'}); finished work is kept. "
                "Run the same command again to retry exactly those rows.")
        shards = [sh for i in sorted(records) for sh in records[i].shards]
        self.stats[target.name].shards = len(shards)
        self._finish(target, shards, names)

    def _budget_message(self, seg: Segment, rows: int, tasks: int) -> str:
        """What an LLM step spent, which budget stopped it and how to raise it."""
        parts = []
        for step in seg.chain:
            n = self.stats[step.name].counters.get("errors/transient/budget", 0)
            if not n:
                continue
            opts = step.options()
            limits = {k: opts.get(k) for k in ("max_requests", "max_total_tokens", "max_cost")
                      if opts.get(k) is not None}
            c = self.stats[step.name].counters
            spent = (f"{c.get('llm/requests', 0):,} requests, "
                     f"{c.get('llm/prompt_tokens', 0) + c.get('llm/completion_tokens', 0):,} tokens"
                     + (f", cost {c['llm/cost']:.4g}" if "llm/cost" in c else ""))
            where = self.pipe.path if self.pipe.path != "<dict>" else "the pipeline"
            parts.append(f"step {step.name!r} reached its budget "
                         f"({', '.join(f'{k}={v}' for k, v in limits.items()) or 'budget'}; this output's "
                         f"recorded work so far: {spent}); raise "
                         f"{' or '.join(f'options.{k}' for k in limits) or 'the budget'} of step "
                         f"{step.name!r} in {where} and run again to continue")
        return ("; ".join(parts) or f"step {seg.target.name!r} reached its LLM budget") + (
            f". {rows:,} row(s) in {tasks} task(s) were not sent; finished work is kept. Running the "
            "same command again with the same budget sends nothing (exit code 3).")

    def _add_record(self, rec: TaskRecord) -> None:
        for name, st in rec.steps.items():
            self.stats[name].add(st)

    # -- global steps ------------------------------------------------------------------------------
    def _run_global(self, step: Step) -> None:
        if self._skip_finished(step):
            return
        self._reset_step(step)
        ds = Dataset([f for inp in step.inputs for f in self.outputs[inp]])
        rows_in = sum(self.stats[i].rows_out for i in step.inputs)
        stage = step.stage
        stage.workdir = self.layout.workdir(step.name)
        os.makedirs(stage.workdir, exist_ok=True)
        bar = Progress(step.name, total=rows_in or None, enabled=self.progress_enabled)
        ctx = RunContext(stage.workdir, workers=self.workers, mapper=self._executor.map,
                         progress=bar.update, scratch_root=self.layout.scratch_url(step.name),
                         inputs={inp: list(self.outputs[inp]) for inp in step.inputs})
        step_dir = self.layout.url_of(self.layout.step_dir(step.name))
        writer = ShardWriter(step_dir, prefix="part", rows_per_shard=self.spec.rows_per_shard)
        t0 = time.monotonic()
        try:
            stage.ensure_setup()
            stage.run(ds, writer, ctx)
            shards = [s.to_dict() for s in writer.close()]
            for name, table in stage.take_side().items():
                sw = ShardWriter(join(step_dir, f"_{name}"), prefix="part", rows_per_shard=self.spec.rows_per_shard)
                sw.write(table)
                sw.close()
        except Exception as exc:
            raise PipelineError(f"step {step.name!r} ({stage.name}) failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if bar.n == 0:
                bar.update(rows_in)
            bar.close()
        S = self.stats[step.name]
        S.add(StepRecord(rows_in=rows_in, rows_out=sum(s["rows"] for s in shards),
                         counters=stage.counters.take(), seconds=time.monotonic() - t0))
        S.seconds = S.cpu_seconds
        S.shards = len(shards)
        S.status = "done"
        self._check_errors([step.name], step)
        self._finish(step, shards, [step.name])


LLM_TASKS_PER_WORKER = 4


def _calls_llm(stage: Any) -> bool:
    from curate.llm.stage import LLMStage

    return isinstance(stage, LLMStage)


def make_executor(runner: str, workers: int, preload: list[str] | None = None) -> Any:
    """Stage plugins reach workers through each task's job; ``preload`` only warms them up."""
    if runner == "ray":
        from curate.pipeline.ray_executor import RayExecutor
        return RayExecutor(workers)
    from curate.pipeline.local_executor import LocalExecutor
    return LocalExecutor(workers, preload)


def __getattr__(name: str) -> Any:
    # ``run_pipeline`` lived here; it is ``curate.run.run_pipeline`` now (it adds the report, which
    # the runner does not import). The old name keeps working for existing code.
    if name == "run_pipeline":
        from curate.run import run_pipeline
        return run_pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
