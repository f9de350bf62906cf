"""The ``curate`` command line.

  curate run [FILE] [--force] [--runner local|ray] [--workers N] [--output PATH] [--break-lock HOST:PID]
  curate validate FILE
  curate estimate FILE [--sample N] [--seed S] [--no-call] [--json OUT.json] [--scratch DIR]
  curate stages [NAME] [--plugins MODULE] [--file FILE]
  curate inspect PATH [--rows N]
  curate train-classifier --positive P --negative N --output DIR [--label L] [fastText options]
  curate report OUTPUT
  curate plan-mixture RUNS.csv --n N --d D [--max-general-increase PCT | --weight W] [--output DIR]

Exit codes: 0 success, 1 the run failed (a rerun resumes), 2 invalid pipeline file or usage,
3 an LLM budget was reached, 4 the output is locked by another run, 130/143 interrupted/terminated
(``curate.exit_codes``; README, "Failure semantics").
"""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib import resources

import click

from curate import __version__


def quickstart_path() -> str:
    """The quickstart pipeline shipped inside the package (``curate run`` with no file)."""
    return str(resources.files("curate") / "configs" / "quickstart.yaml")


def _setup_logging(quiet: bool, level: str | None = None, fmt: str | None = None) -> None:
    """Logging of this run (curate/logs.py): ``--log-level`` (default: warning with --quiet, else
    info) and ``--log-format``, from the command, the group, or CURATE_LOG_LEVEL / CURATE_LOG_FORMAT."""
    from curate import logs

    obj = click.get_current_context().find_root().obj or {}
    level = level or obj.get("log_level") or ("warning" if quiet else "info")
    fmt = fmt or obj.get("log_format") or logs.log_format()
    logs.setup(level, fmt)


def _say(text: str, *, err: bool = False, event: str = "message", level: int = logging.INFO,
         step: str | None = None, counters: dict | None = None) -> None:
    """A line for the user: printed (stdout, or stderr with ``err``), or in JSON log mode one
    JSON event on the log stream."""
    from curate import logs

    if logs.is_json():
        logs.event(_summary_log(), event, text.strip("\n"), step=step, counters=counters, level=level)
    else:
        click.echo(text, err=err)


def _summary_log() -> logging.Logger:
    # the run's summary and errors come out at any --log-level (the text mode prints them too)
    lg = logging.getLogger("curate.summary")
    lg.setLevel(logging.INFO)
    return lg


def _error(text: str) -> None:
    _say(f"error: {text}", err=True, event="error", level=logging.ERROR)


def _load_or_exit(file: str, overrides: dict | None = None):
    """The validated pipeline, or the problems on stderr and exit code 2."""
    from curate.pipeline.config import ConfigError, load_pipeline

    try:
        return load_pipeline(file, overrides=overrides)
    except ConfigError as exc:
        _error(str(exc))
        sys.exit(2)


def _output_or_exit(pipe) -> None:
    """Exit 2 with one line when the pipeline's output cannot be created or written (local
    folders, and object stores: a write and a delete with the run's credentials)."""
    from curate.pipeline.output_check import output_problem

    problem = output_problem(pipe.output)
    if problem:
        _error(f"{pipe.path}: {problem}")
        sys.exit(2)


LOG_FORMAT = click.Choice(["text", "json"], case_sensitive=False)
LOG_LEVEL = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="curate")
@click.option("--log-format", type=LOG_FORMAT, default=None, envvar="CURATE_LOG_FORMAT", show_envvar=True,
              help="text (default): human lines and, on a terminal, progress bars; json: one JSON object "
                   "per line (time, level, step, event, counters, message) on stderr.")
@click.option("--log-level", type=LOG_LEVEL, default=None, envvar="CURATE_LOG_LEVEL", show_envvar=True,
              help="Lowest level logged (default info; warning with `run --quiet`).")
@click.pass_context
def main(ctx: click.Context, log_format: str | None, log_level: str | None) -> None:
    """curate: clean, deduplicated, scored and synthetic corpora for continued pre-training."""
    ctx.ensure_object(dict)
    ctx.obj.update(log_format=log_format and log_format.lower(), log_level=log_level and log_level.lower())
    if ctx.obj["log_format"] == "json":   # every command's errors as JSON lines (`run` sets its level again)
        from curate import logs
        logs.setup(ctx.obj["log_level"] or "info", "json")


@main.command()
@click.argument("file", required=False)
@click.option("--force", is_flag=True, help="Recompute every step, ignoring finished shards.")
@click.option("--runner", type=click.Choice(["local", "ray"]), default=None, help="Override `runner:`.")
@click.option("--workers", type=int, default=None, help="Override `workers:` (processes).")
@click.option("--output", default=None, help="Override `output:` (local path or fsspec URL).")
@click.option("--quiet", "-q", is_flag=True, help="Warnings and the final table only.")
@click.option("--break-lock", default=None, metavar="HOST:PID",
              help="Take over the output's lease held by this run (as the lock error names it), known "
                   "to be dead, without waiting for the lease to expire.")
@click.option("--estimate", "estimate_file", default=None, metavar="FILE",
              help="An estimate JSON of `curate estimate` to compare with (default: "
                   "<output>.estimate/estimate.json when it exists).")
@click.option("--log-format", type=LOG_FORMAT, default=None,
              help="text or json (as `curate --log-format`); json: the funnel becomes `step` events.")
@click.option("--log-level", type=LOG_LEVEL, default=None, help="As `curate --log-level`.")
def run(file: str | None, force: bool, runner: str | None, workers: int | None, output: str | None,
        quiet: bool, break_lock: str | None, estimate_file: str | None, log_format: str | None,
        log_level: str | None) -> None:
    """Run a pipeline (default: the built-in quickstart). Finished shards are kept and skipped."""
    from curate.pipeline.config import ConfigError
    from curate.pipeline.runner import PipelineError, Runner
    from curate.pipeline.stats import funnel_table, funnel_warnings

    _setup_logging(quiet, log_level and log_level.lower(), log_format and log_format.lower())
    file = file or quickstart_path()
    pipe = _load_or_exit(file, {"runner": runner, "workers": workers, "output": output})
    _output_or_exit(pipe)
    logging.getLogger("curate").info("pipeline %r -> %s (%s runner)", pipe.spec.name, pipe.output,
                                     pipe.spec.runner)
    from curate import exit_codes
    from curate.pipeline.stats import error_lines

    from curate.pipeline.estimate import default_scratch, load_estimate

    est_path = estimate_file or os.path.join(default_scratch(pipe.output), "estimate.json")
    estimate = load_estimate(est_path)
    if estimate_file and estimate is None:
        click.echo(f"error: --estimate {estimate_file}: not an estimate JSON of `curate estimate`", err=True)
        sys.exit(exit_codes.INVALID)
    if estimate is not None:
        estimate["_path"] = est_path
        logging.getLogger("curate").info("comparing the LLM steps with the estimate %s", est_path)
    from curate.run import write_report

    runner_ = Runner(pipe, force=force, workers=workers, progress=not quiet, break_lock=break_lock,
                     estimate=estimate, report=write_report)

    def funnel(stats: dict) -> None:
        """The funnel table, or in JSON mode one ``step`` event per step."""
        from curate import logs

        if not logs.is_json():
            click.echo(funnel_table(stats))
            return
        from curate.pipeline.stats import step_time
        for name, st in stats.items():
            counters = {"in": st["in"], "out": st["out"], "dropped": dict(st["dropped"]),
                        "errors": dict(st["errors"]), "status": st.get("status"), "stage": st.get("stage"),
                        "time": step_time(st)}
            counters.update({k: v for k, v in (st.get("counters") or {}).items() if isinstance(v, (int, float))})
            _say(f"step {name}: {st['in']:,} in, {st['out']:,} out ({st.get('status')})", event="step", step=name,
                 counters=counters)

    def partial_funnel() -> None:   # what a failed or interrupted run finished (stats.json has it too)
        if runner_.partial is not None:
            funnel(runner_.partial.stats)
            _say(f"\noutput: {pipe.output}  (INCOMPLETE: stats.json, manifest.json"
                 + (", report.html" if pipe.spec.report else "") + " of what finished)", event="run",
                 counters={"output": pipe.output, "complete": False})
            for line in error_lines(runner_.partial.stats, pipe.output):
                _say(line, err=True, event="step_errors", level=logging.WARNING)

    previous = _terminate_as_interrupt()
    try:
        result = runner_.run()
    except PipelineError as exc:
        partial_funnel()
        _error(str(exc))
        sys.exit(exc.exit_code)
    except ConfigError as exc:  # steps ask for more than the machines offer (resources:), before any work
        _error(str(exc))
        sys.exit(exit_codes.INVALID)
    except OSError as exc:  # the output cannot be written (permissions, a full disk, --force on a locked folder)
        from curate.pipeline.output_check import describe_os_error
        partial_funnel()
        msg = describe_os_error(exc, f"cannot write the output {pipe.output}", root=pipe.output)
        _error(msg)
        sys.exit(exit_codes.FAILED)
    except KeyboardInterrupt as exc:
        partial_funnel()
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        _say(f"{how}: finished shards are kept; run the same command again to resume", err=True, event="run",
             level=logging.WARNING)
        sys.exit(exit_codes.TERMINATED if isinstance(exc, Terminated) else exit_codes.INTERRUPTED)
    finally:
        _restore_sigterm(previous)
    funnel(result.stats)
    if funnel_warnings(result.stats):
        from curate import logs
        if logs.is_json():
            for line in funnel_warnings(result.stats).splitlines():
                _say(line, err=True, event="warning", level=logging.WARNING)
        else:
            click.echo("\n" + funnel_warnings(result.stats), err=True)
    files = "stats.json, manifest.json" + (", report.html" if pipe.spec.report else "")
    if result.estimate and result.estimate.get("steps"):
        from curate.pipeline.estimate import comparison_table

        _say("\nLLM steps, estimate vs actual:\n" + comparison_table(result.estimate), event="estimate",
             counters={"steps": result.estimate["steps"]})
    _say(f"\noutput: {result.output}  ({files}; {result.seconds:.1f}s)", event="run",
         counters={"output": result.output, "complete": True, "seconds": round(result.seconds, 3),
                   "steps": len(result.stats)})
    for line in error_lines(result.stats, result.output):
        _say(line, err=True, event="step_errors", level=logging.WARNING)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the task): handled as Ctrl-C, so the run writes what finished."""


def _terminate_as_interrupt():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


@main.command()
@click.argument("file")
@click.option("--sample", "sample_size", type=click.IntRange(1), default=20, show_default=True,
              help="Rows of each LLM step's input to run (a seeded random sample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--no-call", is_flag=True,
              help="Do not call the engines: count prompt tokens with the engine's tokenizer and take "
                   "max_tokens as completion tokens (an upper bound).")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Also write the estimate here.")
@click.option("--scratch", default=None, metavar="DIR",
              help="Where the steps above the LLM steps run and estimate.json is written "
                   "(default: <output>.estimate; never the output itself).")
@click.option("--workers", type=int, default=None, help="Override `workers:` (processes).")
@click.option("--output", default=None, help="Override `output:` (the run the estimate is for).")
@click.option("--quiet", "-q", is_flag=True, help="Warnings and the table only.")
def estimate(file: str, sample_size: int, seed: int, no_call: bool, json_path: str | None, scratch: str | None,
             workers: int | None, output: str | None, quiet: bool) -> None:
    """Estimate requests, tokens, cost and time of the LLM steps before a run (nothing is charged)."""
    from curate.pipeline.estimate import EstimateError, estimate_notes, estimate_pipeline, estimate_table

    _setup_logging(quiet)
    pipe = _load_or_exit(file, {"workers": workers, "output": output})
    from curate.pipeline.estimate import scratch_problem

    problem = scratch_problem(scratch, pipe.output) if scratch else None
    if problem:
        click.echo(f"error: --scratch: {problem}", err=True)
        sys.exit(2)
    try:
        est = estimate_pipeline(pipe, sample=sample_size, seed=seed, no_call=no_call, scratch=scratch,
                                workers=workers, progress=not quiet, json_path=json_path)
    except EstimateError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if not est["steps"]:
        click.echo(f"{file}: no LLM steps; nothing to estimate")
        return
    click.echo(estimate_table(est))
    click.echo("")
    for line in estimate_notes(est):
        click.echo(line)
    where = os.path.join(est["scratch"], "estimate.json")
    click.echo(f"\nestimate: {where}" + (f" and {json_path}" if json_path else "")
               + f" (`curate run {file}` compares its LLM steps with it)")


@main.command()
@click.argument("file")
def validate(file: str) -> None:
    """Check a pipeline file without running it (stages, options, inputs)."""
    from curate.pipeline.runner import Segment, plan

    pipe = _load_or_exit(file)
    _output_or_exit(pipe)
    click.echo(f"{file}: valid pipeline {pipe.spec.name!r}, {len(pipe.steps)} steps, output {pipe.output}")
    for item in plan(pipe):
        if isinstance(item, Segment):
            chain = ([item.source.name] if item.source else [f"<{item.head.name}>"]) + [s.name for s in item.chain]
            click.echo(f"  map    {' -> '.join(dict.fromkeys(chain))}  => {item.target.name}/")
        else:
            click.echo(f"  global {item.name} ({item.stage.name}) <- {', '.join(item.inputs)}  => {item.name}/")


@main.command()
@click.argument("name", required=False)
@click.option("--plugins", "plugin_modules", multiple=True, metavar="MODULE",
              help="Also import this module of your own stages (repeatable).")
@click.option("--file", "-f", "pipeline_file", default=None, metavar="FILE",
              help="Also import the `plugins:` of this pipeline file.")
def stages(name: str | None, plugin_modules: tuple[str, ...], pipeline_file: str | None) -> None:
    """List registered stages, or show one stage's options."""
    from curate.pipeline.describe import describe_options
    from curate.pipeline.plugins import import_plugins
    from curate.pipeline.stage import get_stage, list_stages

    modules = list(plugin_modules)
    if pipeline_file:
        import yaml

        try:
            with open(pipeline_file, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            click.echo(f"error: {pipeline_file}: cannot read it: {exc}", err=True)
            sys.exit(2)
        listed = raw.get("plugins") if isinstance(raw, dict) else None
        modules += [str(m) for m in listed or []]
    problems = import_plugins(modules, pipeline_file)
    for mod, reason in problems:
        click.echo(f"error: plugin {mod!r}: cannot import it: {reason}", err=True)
    if problems:
        sys.exit(2)
    if name is None:
        reg = list_stages()
        width = max(map(len, reg)) if reg else 0
        cwidth = max(len(c.__name__) for c in reg.values()) if reg else 0
        for n, cls in reg.items():
            click.echo(f"{n.ljust(width)}  {cls.kind:<6}  {cls.__name__.ljust(cwidth)}  {cls.doc()}")
        click.echo("\n`curate stages NAME` shows a stage's options; the third column is its class for "
                   "library calls, or use curate.stage(NAME, **options).")
        return
    try:
        cls = get_stage(name)
    except KeyError as exc:
        click.echo(f"error: {exc.args[0]}", err=True)
        sys.exit(2)
    click.echo(f"{name} ({cls.kind} stage): {cls.doc()}\n")
    click.echo(f"class:  {cls.__module__}.{cls.__qualname__}")
    if cls.reads:
        click.echo(f"reads:  {', '.join(cls.reads)}")
    if cls.writes:
        click.echo(f"writes: {', '.join(f'{k} ({v})' for k, v in cls.writes.items())}")
    r = cls.resources
    click.echo(f"needs:  {r.cpus:g} CPU, {r.gpus:g} GPU" + (f", {r.memory_gb:g} GB" if r.memory_gb else ""))
    click.echo("\noptions:")
    for line in describe_options(cls.Config):
        click.echo(line)


def _fused_into(path: str) -> tuple[str, str] | None:
    """For ``<output>/<step>`` where ``step`` ran fused into a later step of its chain (consecutive
    map steps run as one task; only the chain's last step writes shards): (the folder of that
    step, a note saying so). None when ``path`` is not such a step."""
    from curate.pipeline.config import ConfigError, load_pipeline
    from curate.pipeline.io import get_fs, join
    from curate.pipeline.runner import Segment, plan

    fs, root = get_fs(path.rstrip("/"))
    parent, step = root.rsplit("/", 1) if "/" in root else ("", root)
    try:
        with fs.open(join(parent, "_curate", "pipeline.json")) as f:
            spec = json.load(f)
        pipe = load_pipeline(spec, check=False)
    except (OSError, ValueError, ConfigError):
        return None
    for item in plan(pipe):
        if not isinstance(item, Segment) or item.target.name == step:
            continue
        names = item.step_names
        if step in names:
            target = path.rstrip("/")[: -len(step)] + item.target.name
            later = names[names.index(step) + 1:]
            return target, (f"step {step!r} ran fused with {', '.join(later)} (consecutive steps run as one "
                            f"task; only the last one writes shards): showing {target}, the output of the "
                            f"chain. Add `save: true` to step {step!r} to keep its own output.")
    return None


def _empty_step(path: str) -> bool:
    """``<output>/<step>`` of a finished step that wrote no shards (0 rows)."""
    from curate.pipeline.io import get_fs, join

    fs, root = get_fs(path.rstrip("/"))
    parent, step = root.rsplit("/", 1) if "/" in root else ("", root)
    try:
        with fs.open(join(parent, "manifest.json")) as f:
            shards = json.load(f)["steps"][step]["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return not shards


def _read_json(fs, path: str):
    try:
        with fs.open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@main.command()
@click.argument("path")
@click.option("--rows", "-n", default=3, help="Sample rows to show.")
@click.option("--id", "doc_id", default=None, help="Print the whole row with this id (every column, untruncated).")
@click.option("--full", is_flag=True, help="Do not shorten the values of sample rows.")
@click.option("--count", "count_column", default=None, metavar="COLUMN",
              help="Count the values of COLUMN (most frequent first).")
def inspect(path: str, rows: int, doc_id: str | None, full: bool, count_column: str | None) -> None:
    """Row count, schema, column summaries and a sample of a Parquet dataset (file, folder, glob),
    or an overview of a pipeline's output folder."""
    _inspect(path, rows, doc_id, full, count_column)
    # about 1 run in 30 of this read-only command aborted at interpreter shutdown, after all its
    # output ("terminate called without an active exception", SIGABRT, from a native library's
    # thread teardown; not reproduced with pyarrow alone): it has nothing to clean up, so a process
    # of its own ends here (not a caller that invoked the command in-process: CliRunner, pytest)
    if sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _inspect(path: str, rows: int, doc_id: str | None, full: bool, count_column: str | None) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from curate.pipeline.io import list_parquet, get_fs, join, read_table

    fs, root = get_fs(path)
    manifest = join(root, "manifest.json")
    if fs.isdir(root) and (fs.exists(manifest) or fs.exists(join(root, "_curate", "pipeline.json"))):
        # a pipeline's output folder, finished or not: one line per step, never one merged dataset
        m = _read_json(fs, manifest) or {"steps": {}}
        stats = _read_json(fs, join(root, "stats.json")) or {}
        spec = _read_json(fs, join(root, "_curate", "pipeline.json")) or {}
        click.echo(f"{path}: output of pipeline {m.get('pipeline') or spec.get('name')!r}")
        incomplete = stats.get("complete") is False or not fs.exists(manifest) or m.get("complete") is False
        if incomplete:
            f = stats.get("failure") or {}
            why = (f"{f.get('kind', 'failed')} in step {f.get('step')!r}: {f.get('error', '')}" if f
                   else "no stats.json: the run was killed")
            click.echo(f"INCOMPLETE: the last run did not finish ({why[:300]}). Finished steps are listed; "
                       "run the same command again to resume.")
        for step, s in m["steps"].items():
            n = sum(sh["rows"] for sh in s["shards"])
            click.echo(f"  {step}/  {len(s['shards'])} shards, {n:,} rows")
        finished = {n for n, st in (stats.get("steps") or {}).items()
                    if st.get("status") in ("done", "skipped", "resumed")}   # incl. fused steps' side outputs
        unfinished = sorted(os.path.basename(d.rstrip("/")) for d in fs.ls(root, detail=False)
                            if incomplete and fs.isdir(d) and not os.path.basename(d.rstrip("/")).startswith("_")
                            and os.path.basename(d.rstrip("/")) not in set(m["steps"]) | finished)
        for step in unfinished:
            click.echo(f"  {step}/  unfinished (shards of tasks done so far; not part of the output)")
        click.echo(f"\n`curate inspect {os.path.join(path, '<step>')}` for one step (a step fused into a "
                   "later one shows that step's folder).")
        return
    try:
        files = list_parquet(path)
    except FileNotFoundError:
        files = None
    if not files:
        fused = _fused_into(path)
        if fused is not None:
            path, note = fused
            click.echo(f"note: {note}\n")
            files = list_parquet(path) if fs.exists(get_fs(path)[1]) else []
        elif _empty_step(path):
            click.echo(f"{path}: 0 rows (the step kept no rows and wrote no shards; see stats.json for why)")
            return
        elif files is None:
            click.echo(f"error: {path}: not found", err=True)
            sys.exit(2)
    if not files:
        click.echo(f"{path}: no Parquet files")
        return
    parts = []
    for f in files:
        try:
            parts.append(read_table(f))
        except (pa.ArrowException, OSError) as exc:
            click.echo(f"error: {f}: not a readable Parquet file ({type(exc).__name__}: {exc})", err=True)
            sys.exit(1)
    table = pa.concat_tables(parts, promote_options="permissive")
    if doc_id is not None or count_column is not None:
        _inspect_one(path, table, doc_id, count_column)
        return
    click.echo(f"{path}: {len(files)} files, {table.num_rows:,} rows\n\nschema:")
    for field in table.schema:
        col = table.column(field.name)
        nulls = col.null_count
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            lens = pc.utf8_length(col)
            summary = f"len mean {pc.mean(lens).as_py() or 0:,.0f}, max {pc.max(lens).as_py() or 0:,}"
        elif pa.types.is_integer(field.type) or pa.types.is_floating(field.type):
            mm = pc.min_max(col)
            summary = f"min {mm['min'].as_py()}, mean {pc.mean(col).as_py()}, max {mm['max'].as_py()}"
        elif pa.types.is_boolean(field.type):
            summary = f"true {pc.sum(col).as_py() or 0:,}"
        else:
            summary = ""
        click.echo(f"  {field.name}: {field.type}  {summary}" + (f", nulls {nulls:,}" if nulls else ""))
    click.echo("\nsample:")
    for row in table.slice(0, rows).to_pylist():
        short = row if full else {k: (v[:120] + "…" if isinstance(v, str) and len(v) > 120 else v)
                                  for k, v in row.items()}
        click.echo("  " + json.dumps(short, ensure_ascii=False, default=str))


def _inspect_one(path: str, table, doc_id: str | None, column: str | None) -> None:
    """``inspect --id``: one whole row, column by column; ``inspect --count``: value counts."""
    import pyarrow.compute as pc

    for name in ([column] if column else []) + (["id"] if doc_id is not None else []):
        if name not in table.schema.names:
            click.echo(f"error: {path}: no column {name!r} (columns: {', '.join(table.schema.names)})", err=True)
            sys.exit(2)
    if column is not None:
        counts = pc.value_counts(table.column(column)).to_pylist()
        counts.sort(key=lambda d: (-d["counts"], str(d["values"])))
        click.echo(f"{path}: {table.num_rows:,} rows, {len(counts):,} distinct values of {column}")
        for d in counts:
            click.echo(f"  {d['counts']:>8,}  {json.dumps(d['values'], ensure_ascii=False, default=str)}")
    if doc_id is not None:
        found = table.filter(pc.equal(table.column("id"), doc_id))
        if not found.num_rows:
            click.echo(f"error: {path}: no row with id {doc_id!r}", err=True)
            sys.exit(1)
        for row in found.to_pylist():
            for k, v in row.items():
                text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
                click.echo(f"--- {k}\n{text}" if isinstance(v, str) and "\n" in v else f"--- {k}: {text}")


@main.command("train-classifier")
@click.option("--positive", "-p", multiple=True, required=True,
              help="Documents of the label: Parquet/JSONL/text files, folders or globs (repeatable).")
@click.option("--negative", "-n", multiple=True, required=True,
              help="Documents of the other class, e.g. general web text (repeatable).")
@click.option("--output", "-o", required=True, help="Folder for model.bin and model.json.")
@click.option("--label", default="positive", show_default=True, help="Name of the positive label.")
@click.option("--negative-label", default="negative", show_default=True)
@click.option("--text-column", default="text", show_default=True, help="Text column of Parquet inputs.")
@click.option("--test-fraction", type=float, default=0.1, show_default=True, help="Held-out share.")
@click.option("--lr", type=float, default=None, help="Default: chosen from the data size (0.5 for small sets).")
@click.option("--epoch", type=int, default=None, help="Default: chosen from the data size (20 for small sets).")
@click.option("--dim", type=int, default=None, help="Default: chosen from the data size (32 for small sets).")
@click.option("--min-count", type=int, default=1, show_default=True)
@click.option("--word-ngrams", type=int, default=2, show_default=True)
@click.option("--bucket", type=int, default=None, help="Default: chosen from the data size (200,000 for small sets).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="1 is reproducible.")
def train_classifier(positive, negative, output, label, negative_label, text_column, test_fraction, lr, epoch,
                     dim, min_count, word_ngrams, bucket, seed, threads) -> None:
    """Train a fastText classifier (positives vs negatives); print held-out precision/recall/F1."""
    from pydantic import ValidationError

    from curate.pipeline.stage import StageError
    from curate.stages.score.train_classifier import TrainClassifier

    _setup_logging(True)
    try:
        st = TrainClassifier(positive=list(positive), negative=list(negative), output_dir=output, label=label,
                             negative_label=negative_label, text_column=text_column, test_fraction=test_fraction,
                             lr=lr, epoch=epoch, dim=dim, min_count=min_count, word_ngrams=word_ngrams,
                             bucket=bucket, seed=seed, threads=threads)
    except ValidationError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    problems = st.check()
    if problems:
        for key, msg in problems:
            click.echo(f"error: --{key}: {msg}" if key else f"error: {msg}", err=True)
        sys.exit(2)
    try:
        st([])
    except StageError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    card = st.card
    m = card["metrics"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    click.echo(f"trained on {card['data']['train']:,} documents ({card['data']['positive']:,} {label}, "
               f"{card['data']['negative']:,} {negative_label}); held out {m['test_docs']:,}")
    click.echo(f"precision {f(m['precision'])}  recall {f(m['recall'])}  F1 {f(m['f1'])}  "
               f"accuracy {f(m['accuracy'])}  (P({label}) >= {m['threshold']})")
    click.echo(f"model: {os.path.join(output, card['model'])}  sha256 {card['sha256']}  "
               f"({card['bytes'] / 1e6:,.0f} MB)")
    for w in card.get("warnings", []):
        click.echo(f"WARNING: {w['message']}", err=True)


@main.command()
@click.argument("output")
def report(output: str) -> None:
    """Write report.html (funnel, score histograms with thresholds, samples) into a run's output."""
    from curate.report import ReportError, write_report

    try:
        path = write_report(output)
    except ReportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(path)



@main.command("plan-mixture")
@click.argument("runs_csv")
@click.option("--n", "target_n", type=float, required=True, help="Parameters of the model to train (e.g. 7e9).")
@click.option("--d", "target_d", type=float, required=True, help="Tokens of the planned run (e.g. 1e11).")
@click.option("--max-general-increase", type=float, default=None,
              help="Constraint: general loss at most this % above its r=0 value (default 3).")
@click.option("--weight", type=float, default=None,
              help="Instead: minimise weight*domain + (1-weight)*general loss.")
@click.option("--holdout", default="0.2", show_default=True,
              help="Rows left out to measure the fit: a fraction (random, seeded) or largest_n.")
@click.option("--eps", type=float, default=0.01, show_default=True, help="The law's epsilon (fixed).")
@click.option("--grid-step", type=float, default=0.01, show_default=True, help="Step of the r grid.")
@click.option("--starts", type=int, default=16, show_default=True, help="Random starts of each fit.")
@click.option("--output", "-o", default="mixture_plan", show_default=True, help="Folder for plan.json and plan.html.")
@click.option("--domain-name", default="domain", show_default=True, help="Domain input name in the mix step.")
@click.option("--general-name", default="general", show_default=True, help="General input name in the mix step.")
def plan_mixture_cmd(runs_csv: str, target_n: float, target_d: float, max_general_increase: float | None,
                     weight: float | None, holdout: str, eps: float, grid_step: float, starts: int, output: str,
                     domain_name: str, general_name: str) -> None:
    """Choose the domain/general ratio from small runs (D-CPT Law fits of both losses)."""
    from curate.mixture.dcpt import (MixtureError, fit_text, mix_snippet, plan_mixture, read_runs, table_text,
                                     write_outputs)

    try:
        runs = read_runs(runs_csv)
        plan = plan_mixture(runs, target_n, target_d, max_general_increase=max_general_increase, weight=weight,
                            grid_step=grid_step, eps=eps, starts=starts,
                            holdout=holdout if holdout == "largest_n" else _float_or_exit(holdout, "--holdout"))
    except MixtureError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"{len(runs)} runs from {runs_csv}; general loss fitted against the general ratio 1 - r")
    click.echo(fit_text("general loss", plan.general))
    click.echo(fit_text("domain loss ", plan.domain))
    click.echo(f"\ntarget N={target_n:.3g}, D={target_d:.3g}; rule: {plan.rule}\n")
    click.echo(table_text(plan))
    click.echo(f"\nrecommended domain ratio r = {plan.recommended_r:g}" + (f" ({plan.note})" if plan.note else ""))
    click.echo("mix step (proportions by tokens):\n" + mix_snippet(plan.recommended_r, domain_name, general_name))
    paths = write_outputs(plan, runs_csv, output, domain_name, general_name)
    click.echo(f"wrote {paths['json']} and {paths['html']}")


def _float_or_exit(value: str, option: str) -> float:
    try:
        return float(value)
    except ValueError:
        click.echo(f"error: {option}: expected a number or largest_n, got {value!r}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
