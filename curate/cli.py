"""The ``curate`` command line.

  curate run [FILE] [--force] [--runner local|ray] [--workers N] [--output PATH]
  curate validate FILE
  curate stages [NAME] [--plugins MODULE] [--file FILE]
  curate inspect PATH [--rows N]
  curate train-classifier --positive P --negative N --output DIR [--label L] [fastText options]
  curate report OUTPUT

Exit codes: 0 success, 1 the run failed, 2 invalid pipeline file or usage.
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


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "trafilatura", "datasketch", "numba", "filelock", "datatrove"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_or_exit(file: str, overrides: dict | None = None):
    """The validated pipeline, or the problems on stderr and exit code 2."""
    from curate.pipeline.config import ConfigError, load_pipeline

    try:
        return load_pipeline(file, overrides=overrides)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _output_or_exit(pipe) -> None:
    """Exit 2 with one line when the pipeline's output cannot be created or written."""
    from curate.pipeline.output_check import output_problem

    problem = output_problem(pipe.output)
    if problem:
        click.echo(f"error: {pipe.path}: {problem}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="curate")
def main() -> None:
    """curate: clean, deduplicated, scored and synthetic corpora for continued pre-training."""


@main.command()
@click.argument("file", required=False)
@click.option("--force", is_flag=True, help="Recompute every step, ignoring finished shards.")
@click.option("--runner", type=click.Choice(["local", "ray"]), default=None, help="Override `runner:`.")
@click.option("--workers", type=int, default=None, help="Override `workers:` (processes).")
@click.option("--output", default=None, help="Override `output:` (local path or fsspec URL).")
@click.option("--quiet", "-q", is_flag=True, help="Warnings and the final table only.")
def run(file: str | None, force: bool, runner: str | None, workers: int | None, output: str | None,
        quiet: bool) -> None:
    """Run a pipeline (default: the built-in quickstart). Finished shards are kept and skipped."""
    from curate.pipeline.runner import PipelineError, Runner
    from curate.pipeline.stats import funnel_table, funnel_warnings

    _setup_logging(quiet)
    file = file or quickstart_path()
    pipe = _load_or_exit(file, {"runner": runner, "workers": workers, "output": output})
    _output_or_exit(pipe)
    logging.getLogger("curate").info("pipeline %r -> %s (%s runner)", pipe.spec.name, pipe.output,
                                     pipe.spec.runner)
    try:
        result = Runner(pipe, force=force, workers=workers, progress=not quiet).run()
    except PipelineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # the output cannot be written (permissions, a full disk, --force on a locked folder)
        from curate.pipeline.output_check import describe_os_error
        msg = describe_os_error(exc, f"cannot write the output {pipe.output}", root=pipe.output)
        click.echo(f"error: {msg}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted: finished shards are kept; run the same command again to resume", err=True)
        sys.exit(130)
    click.echo(funnel_table(result.stats))
    if funnel_warnings(result.stats):
        click.echo("\n" + funnel_warnings(result.stats), err=True)
    files = "stats.json, manifest.json" + (", report.html" if pipe.spec.report else "")
    click.echo(f"\noutput: {result.output}  ({files}; {result.seconds:.1f}s)")


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
    import pyarrow as pa
    import pyarrow.compute as pc

    from curate.pipeline.io import list_parquet, get_fs, join, read_table

    fs, root = get_fs(path)
    manifest = join(root, "manifest.json")
    if fs.isdir(root) and fs.exists(manifest):
        with fs.open(manifest) as f:
            m = json.load(f)
        click.echo(f"{path}: output of pipeline {m.get('pipeline')!r}")
        for step, s in m["steps"].items():
            n = sum(sh["rows"] for sh in s["shards"])
            click.echo(f"  {step}/  {len(s['shards'])} shards, {n:,} rows")
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
    from curate.stages.train_classifier import TrainClassifier

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


if __name__ == "__main__":
    main()
