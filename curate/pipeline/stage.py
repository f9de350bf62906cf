"""The stage contract.

A stage is a small class with:

- a registered ``name`` (the word used in pipeline.yaml),
- a pydantic ``Config`` (its options; unknown keys are rejected),
- the columns it ``reads`` and ``writes`` (name -> Arrow type),
- the ``resources`` it needs (CPUs, GPUs, memory),
- ``setup()``, run once per worker before the first batch (load models here),
- and one method that does the work.

Three kinds exist:

``SourceStage``  lists independent ``tasks`` (files, byte ranges, a crawl) and ``read(task)`` yields
                 Arrow tables of documents for one task.
``MapStage``     ``process(table) -> table`` for one batch; streamable, runs in parallel over shards.
                 A filter returns fewer rows; the runner counts rows in/out, the stage names reasons.
``GlobalStage``  ``run(dataset, writer, ctx)`` must see the whole dataset (dedup, top-k selection).

Runners know nothing else about a stage. Every stage is also a library call::

    from curate.stages.clean.language_id import LanguageId
    table = LanguageId(languages=["en"])(table_or_parquet_path)

Columns: ``reads`` may name an option in braces, ``("{text_column}",)``; each instance resolves it
from its config (``self.reads``). Override ``input_columns()`` when it depends on more than that.

Counter names (one convention for every stage; the runner adds ``in``/``out`` itself):

``dropped/<reason>``           a row removed on purpose. ``reason`` is snake_case
                               (``duplicate_text``, ``near_duplicate``, ``not_selected``,
                               ``low_language_score``, ``too_large``); a stage with several rule
                               sets prefixes the set: ``dropped/gopher_quality:gopher_short_doc``.
``errors/<category>[/<detail>]`` a row (or record, page, answer) that could not be processed and
                               was skipped: ``errors/exception/ValueError``, ``errors/parse/no_json``,
                               ``errors/links/<reason>``, ``errors/decode``, ``errors/timeout``.
                               Always logged (the first few of each kind) through ``Stage.error``.
``errors/transient/<reason>``  a row that failed for a reason that may pass (an endpoint timeout):
                               counted by ``Stage.defer``; its task is not recorded as complete, so
                               the next plain run retries exactly those rows.
``<stage name>/<metric>``      anything else a stage measures: ``extract_html/chars_in``,
                               ``read_warc/records/response``, ``minhash_dedup/verified_pairs``.
``llm/<metric>``               engine accounting shared by every LLM stage (``llm/prompt_tokens``,
                               ``llm/completion_tokens``, ``llm/requests``, ``llm/cached``).
``warnings/<code>``            something a person should look at (``warnings/low_yield``): shown as
                               a warning below the funnel, in stats.json and in the report
                               (curate/pipeline/warnings.py computes the others from the counters).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Protocol

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:   # io and context import this module: their names are for annotations only
    from curate.pipeline.context import RunContext
    from curate.pipeline.io import Dataset

log = logging.getLogger("curate")


class Writer(Protocol):
    """Where a global stage writes its output rows (``ShardWriter`` in a run, ``MemoryWriter`` in a
    library call): tables in, in any number of calls."""

    def write(self, table: pa.Table | pa.RecordBatch) -> None: ...


class StageConfig(BaseModel):
    """Base class of every stage's options. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class Resources(BaseModel):
    """What one worker of a stage needs. Runners use it to size pools and ask Ray for slots."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    # a step's `resources:` in pipeline.yaml overrides any of these (``Resources.override``)
    replicas: int | None = Field(None, ge=1)   # workers (engine replicas) at once; None: all that fit
    max_retries: int = Field(2, ge=0)          # times a task is redone after its worker died

    def override(self, other: "Resources | None") -> "Resources":
        """These resources with the fields ``other`` sets explicitly (a step's `resources:`)."""
        if other is None:
            return self
        return self.model_copy(update={k: getattr(other, k) for k in other.model_fields_set})

    @classmethod
    def combine(cls, items: "list[Resources]") -> "Resources":
        """What a fused chain of stages needs from one worker: the most of each, the fewest replicas."""
        reps = [r.replicas for r in items if r.replicas]
        mems = [r.memory_gb for r in items if r.memory_gb]
        return cls(cpus=max([r.cpus for r in items] or [1.0]), gpus=max([r.gpus for r in items] or [0.0]),
                   memory_gb=max(mems) if mems else None, replicas=min(reps) if reps else None,
                   max_retries=min([r.max_retries for r in items] or [2]))


@dataclass(frozen=True)
class Task:
    """One independent unit of work of a source stage (a file, a byte range, a crawl).

    ``id`` must be stable across runs: it names the output shard and the completion record.
    """

    id: str
    payload: Any = None


class StageError(Exception):
    """A stage cannot run: bad input schema, missing model file, ... (a clear, user-facing error)."""


# --------------------------------------------------------------------------------------------------
# registry

REGISTRY: dict[str, type["Stage"]] = {}


def register(cls: type["Stage"]) -> type["Stage"]:
    """Class decorator: make a stage available by its ``name`` in pipeline.yaml."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__qualname__} has no stage name")
    other = REGISTRY.get(name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise TypeError(f"stage name {name!r} is taken by {other.__module__}.{other.__qualname__}")
    REGISTRY[name] = cls
    return cls


def load_builtin_stages() -> None:
    """Import every stage module under ``curate.stages`` (one folder per family) so that their
    stages register themselves. Modules whose name starts with ``_`` are helpers, not stages."""
    import importlib

    from curate.stages import stage_modules

    for module in stage_modules():
        importlib.import_module(module)


def get_stage(name: str) -> type["Stage"]:
    """The stage class registered as ``name``. Tries the module ``curate.stages.<family>.<name>``
    first (one module per stage), so workers import only what they run; then scans all stage modules."""
    import importlib

    from curate.stages import module_of

    if name not in REGISTRY and name.isidentifier():
        module = module_of(name)
        if module is not None:
            importlib.import_module(module)
    if name not in REGISTRY:
        load_builtin_stages()
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"unknown stage {name!r}; known stages: {known}") from None


def list_stages() -> dict[str, type["Stage"]]:
    load_builtin_stages()
    return dict(sorted(REGISTRY.items()))


# --------------------------------------------------------------------------------------------------
# counters


class Counters:
    """Per-stage counters, merged by the runner into stats.json.

    Keys are plain strings; by convention ``dropped/<reason>``, ``errors/<reason>`` and free keys
    (``tokens/prompt``, ``pages/fetched``...). ``in``/``out`` rows are counted by the runner.
    """

    def __init__(self, data: dict[str, int] | None = None):
        self.data: Counter[str] = Counter(data or {})

    def add(self, key: str, n: int | float = 1) -> None:
        if n:
            self.data[key] += n

    def merge(self, other: "Counters | dict[str, int]") -> None:
        self.data.update(other.data if isinstance(other, Counters) else other)

    def take(self) -> dict[str, int]:
        """Return and reset (the runner takes them after each task)."""
        out = dict(self.data)
        self.data.clear()
        return out

    def to_dict(self) -> dict[str, int]:
        return dict(self.data)


# --------------------------------------------------------------------------------------------------
# stages


class Stage:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    reads: ClassVar[tuple[str, ...]] = ()   # "{option}" entries are resolved from the config
    writes: ClassVar[dict[str, pa.DataType]] = {}
    resources: ClassVar[Resources] = Resources()
    # modules a runner may import before forking workers, so that workers start warm (only modules
    # that start no threads at import: parsers, tokenizers; not torch or an engine)
    preload: ClassVar[tuple[str, ...]] = ()
    # modules the stage cannot work without: imported when a pipeline is loaded (``curate validate``,
    # the start of ``curate run``), so that a broken install fails once, at start, naming the module
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: StageConfig | dict | None = None, **options: Any):
        if isinstance(config, StageConfig):
            if options:
                config = config.model_copy(update=options)
            self.config = self.Config.model_validate(config.model_dump())
        else:
            self.config = self.Config.model_validate({**(config or {}), **options})
        self.counters = Counters()
        self.reads = self.input_columns()
        self.deferred = 0
        self._is_setup = False
        self._side: dict[str, list[pa.Table]] = {}
        # Set by the runner: where this stage may keep scratch/state files (local path), and the
        # step name in the pipeline. Library calls leave them unset.
        self.workdir: str | None = None
        self.step_name: str = self.name

    # -- lifecycle ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models/resources once per worker. Override; keep it idempotent."""

    def ensure_setup(self) -> None:
        if not self._is_setup:
            self.setup()
            self._is_setup = True

    def teardown(self) -> None:
        """Release resources (engines, pools). Called by runners at the end of a worker's life."""

    # -- bookkeeping helpers -----------------------------------------------------------------------
    def drop(self, reason: str, n: int = 1) -> None:
        self.counters.add(f"dropped/{reason}", n)

    def error(self, reason: str, n: int = 1, *, doc_id: str | None = None, detail: str = "") -> None:
        """Count (and log) a per-document error that was skipped; never silent."""
        self.counters.add(f"errors/{reason}", n)
        if self.counters.data[f"errors/{reason}"] <= 5:  # log the first few of each kind
            log.warning("%s: %s%s%s", self.step_name, reason,
                        f" (doc {doc_id})" if doc_id else "", f": {detail}" if detail else "")

    def count(self, key: str, n: int | float = 1) -> None:
        self.counters.add(key, n)

    def defer(self, reason: str, n: int = 1, *, detail: str = "") -> None:
        """``n`` rows failed for a reason that may pass (timeouts, HTTP 5xx after retries) and were
        left out of this batch's output. They are counted under ``errors/transient/<reason>`` and
        the runner does not record the task as complete: the next run of the same command redoes
        the task (finished rows come back from caches) instead of losing those rows."""
        self.deferred += n
        self.error(f"transient/{reason}", n, detail=detail)

    def take_deferred(self) -> int:
        n, self.deferred = self.deferred, 0
        return n

    def side(self, name: str, table: pa.Table) -> None:
        """Emit a side table (e.g. dropped documents, cluster tables). The runner writes it to
        ``<output>/<step>/_<name>/`` with the same shard naming as the main output."""
        if table.num_rows:
            self._side.setdefault(name, []).append(table)

    def take_side(self) -> dict[str, pa.Table]:
        out = {k: pa.concat_tables(v, promote_options="permissive") for k, v in self._side.items()}
        self._side.clear()
        return out

    # -- validation --------------------------------------------------------------------------------
    def check(self) -> list[tuple[str, str]]:
        """Problems found before any work starts, as (option key, message) pairs: missing input
        files, unreachable model paths... Called by ``curate validate`` and before ``curate run``."""
        return []

    @classmethod
    def missing_requirements(cls) -> list[str]:
        """``requires`` modules that cannot be imported, as "module: reason" lines."""
        import importlib

        out = []
        for mod in cls.requires:
            try:
                importlib.import_module(mod)
            except ImportError as exc:
                out.append(f"{mod}: {exc}")
        return out

    def fingerprint_extra(self) -> str:
        """Anything beyond the options that should invalidate finished outputs when it changes
        (e.g. a source's file sizes). Part of the step fingerprint used for resume."""
        return ""

    # -- introspection -----------------------------------------------------------------------------
    def input_columns(self) -> tuple[str, ...]:
        """The columns this configured stage reads: ``reads`` with ``{option}`` entries replaced by
        the option's value (a list-valued option adds each of its items)."""
        out: list[str] = []
        for col in type(self).reads:
            if col.startswith("{") and col.endswith("}"):
                value = getattr(self.config, col[1:-1])
                out.extend([value] if isinstance(value, str) else list(value))
            else:
                out.append(col)
        return tuple(out)

    @classmethod
    def doc(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def check_columns(self, table: pa.Table | pa.RecordBatch) -> None:
        missing = [c for c in self.reads if c not in table.schema.names]
        if missing:
            raise StageError(
                f"stage {self.step_name!r} ({self.name}) needs column(s) {missing}; "
                f"the input has {table.schema.names}")


class SourceStage(Stage):
    kind = "source"
    # the schema of what read() yields, when fixed: an empty result keeps it
    output_schema: ClassVar[pa.Schema | None] = None

    def tasks(self) -> list[Task]:
        raise NotImplementedError

    def read(self, task: Task) -> Iterator[pa.Table]:
        raise NotImplementedError

    def __call__(self) -> pa.Table:
        """Library call: read everything into one table."""
        from curate.pipeline.schema import empty_docs

        self.ensure_setup()
        parts = [t for task in self.tasks() for t in self.read(task) if t.num_rows]
        if parts:
            return pa.concat_tables(parts, promote_options="permissive")
        return self.output_schema.empty_table() if self.output_schema is not None else empty_docs()


class FileSource(SourceStage):
    """A source reading files: one task per file. Its Config must have ``paths`` (a path, folder,
    glob or URL, or a list of them); ``suffixes`` selects files inside folders."""

    suffixes: ClassVar[tuple[str, ...] | None] = None

    def paths(self) -> list[str]:
        p = self.config.paths  # type: ignore[attr-defined]
        return [p] if isinstance(p, str) else list(p)

    def files(self) -> list[str]:
        from curate.pipeline.io import expand_paths
        return expand_paths(self.paths(), self.suffixes)

    def _files_and_problem(self) -> tuple[list[str], str | None]:
        try:
            found = self.files()
        except FileNotFoundError as exc:
            return [], f"not found: {exc.args[0]}"
        return found, None if found else f"no matching files in {self.paths()}"

    def check(self) -> list[tuple[str, str]]:
        problem = self._files_and_problem()[1]
        return [("paths", problem)] if problem else []

    def files_or_error(self) -> list[str]:
        """The files, or the error ``curate validate`` reports (a path or glob that matches nothing)."""
        found, problem = self._files_and_problem()
        if problem:
            raise StageError(f"{self.step_name}: key 'options.paths': {problem}")
        return found

    def tasks(self) -> list[Task]:
        return [Task(id=f, payload=f) for f in self.files_or_error()]

    def relpath(self, path: str) -> str:
        """``path`` relative to the input root (the folder or glob base of ``paths``): derived ids
        and ``source`` use it, so the same files give the same output wherever they live."""
        from curate.pipeline.io import input_root, relative_to
        if getattr(self, "_input_root", None) is None:
            self._input_root = input_root(self.paths())
        return relative_to(path, self._input_root)

    def fingerprint_extra(self) -> str:
        from curate.pipeline.io import get_fs
        out = ["ids:relative"]   # ids from paths under the input root (older outputs used absolute ones)
        try:
            for f in self.files():
                fs, p = get_fs(f)
                out.append(f"{f}:{fs.size(p)}")
        except FileNotFoundError:
            pass
        return "|".join(out)


class MapStage(Stage):
    kind = "map"
    # When a batch raises, retry its rows one by one and skip (count) only the rows that fail.
    isolate_errors: ClassVar[bool] = True

    def process(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError

    def removes(self) -> tuple[str, ...]:
        """Columns this configured stage removes on purpose (extract_html's ``html``); every other
        column it receives must be in its output."""
        return ()

    def process_safe(self, table: pa.Table) -> pa.Table:
        """What runners call: checks columns, isolates failing documents, keeps every column."""
        self.ensure_setup()
        self.check_columns(table)
        try:
            out = self.process(table)
        except StageError:
            raise
        except Exception as exc:  # noqa: BLE001
            if not self.isolate_errors or table.num_rows == 0:
                raise
            if table.num_rows == 1:
                doc_id = table.column("id")[0].as_py() if "id" in table.schema.names else None
                self.error(f"exception/{type(exc).__name__}", doc_id=doc_id, detail=str(exc)[:300])
                return self._empty_like(table)
            parts = [self.process_safe(table.slice(i, 1)) for i in range(table.num_rows)]
            out = pa.concat_tables(parts, promote_options="permissive")
        lost = [c for c in table.schema.names if c not in out.schema.names and c not in self.removes()]
        if lost:
            raise StageError(f"stage {self.step_name!r} ({self.name}) dropped column(s) {lost}; "
                             "stages add columns but must keep the ones they receive")
        return out

    def _empty_like(self, table: pa.Table) -> pa.Table:
        # an empty result with the output schema, obtained by running on zero rows
        try:
            return self.process(table.slice(0, 0))
        except Exception:  # noqa: BLE001
            return table.slice(0, 0)

    def __call__(self, data: "pa.Table | pa.RecordBatch | str | list[str]") -> pa.Table:
        """Library call on a table, a record batch, or a Parquet file/folder/glob path(s)."""
        from curate.pipeline.io import as_table_iter

        parts = [self.process_safe(t) for t in as_table_iter(data)]
        parts = [p for p in parts if p.num_rows] or parts[:1]
        return pa.concat_tables(parts, promote_options="permissive")


DROP_SAMPLES = 3            # dropped documents kept as examples, per reason and task
DROP_SAMPLE_CHARS = 2000    # of each one's text
DROP_SAMPLES_SIDE = "drop_samples"


def drop_sample_key(doc_id: str) -> int:
    """The seeded rank of a dropped document among the examples of its reason (lowest kept)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"drop-samples\x00{doc_id}".encode(), digest_size=8).digest(), "big")


class FilterStage(MapStage):
    """A map stage that keeps or drops rows. Implement ``keep(table) -> (mask, reasons)``.

    ``mask`` is a sequence of bools (True = keep); ``reasons`` gives, for each dropped row, the
    reason string (None for kept rows). The base class counts ``dropped/<reason>`` and, when the
    option ``save_dropped`` exists and is true, emits dropped rows (with a ``drop_reason`` column)
    as the side output ``dropped``. Score columns should be added in ``annotate`` so thresholds
    can be re-tuned later without recomputing.

    Examples for the run report: of the documents a task drops, the ``DROP_SAMPLES`` per reason
    with the lowest seeded hash of their id (a bottom-k sample: bounded memory, the same documents
    whatever the batch sizes) are written as the side output ``drop_samples`` (``id``,
    ``drop_reason``, ``text`` cut to ``DROP_SAMPLE_CHARS``, ``text_chars``, ``sample_key``), one
    file per task like every side output, so a resumed or redone task replaces its file.
    """

    def annotate(self, table: pa.Table) -> pa.Table:
        """Optionally add score columns before deciding. Default: unchanged."""
        return table

    def keep(self, table: pa.Table) -> tuple[Iterable[bool], list[str | None]]:
        raise NotImplementedError

    def process(self, table: pa.Table) -> pa.Table:
        table = self.annotate(table)
        if table.num_rows == 0:
            return table
        mask, reasons = self.keep(table)
        mask = pa.array(list(mask), type=pa.bool_())
        for r in reasons:
            if r is not None:
                self.drop(r)
        if getattr(self.config, "save_dropped", False):
            dropped = table.filter(pa.compute.invert(mask))
            if dropped.num_rows:
                dropped = dropped.append_column(
                    "drop_reason", pa.array([r for r in reasons if r is not None], pa.string()))
                self.side("dropped", dropped)
        self._sample_dropped(table, mask, reasons)
        return table.filter(mask)

    def _sample_dropped(self, table: pa.Table, mask: pa.Array, reasons: list[str | None]) -> None:
        kept: dict[str, dict[str, tuple[int, dict]]] = self.__dict__.setdefault("_drop_examples", {})
        if not any(r is not None for r in reasons):
            return
        names = table.schema.names
        ids = table.column("id") if "id" in names else None
        texts = table.column("text") if "text" in names else None
        dropped_rows = [i for i, m in enumerate(mask.to_pylist()) if not m]
        for i, reason in zip(dropped_rows, (r for r in reasons if r is not None)):
            doc_id = str(ids[i].as_py()) if ids is not None else None
            text = texts[i].as_py() if texts is not None else None
            if doc_id is None:
                doc_id = f"text:{hashlib_hex(text or '')}"
            key = drop_sample_key(doc_id)
            got = kept.setdefault(reason, {})
            if doc_id in got or (len(got) >= DROP_SAMPLES and key >= max(k for k, _ in got.values())):
                continue
            got[doc_id] = (key, {"id": doc_id, "drop_reason": reason,
                                 "text": None if text is None else str(text)[:DROP_SAMPLE_CHARS],
                                 "text_chars": None if text is None else len(str(text)), "sample_key": key})
            if len(got) > DROP_SAMPLES:
                del got[max(got, key=lambda d: got[d][0])]

    def take_side(self) -> dict[str, pa.Table]:
        kept = self.__dict__.pop("_drop_examples", None)
        if kept:
            rows = [row for reason in sorted(kept) for _, row in sorted(kept[reason].values(), key=lambda kv: kv[0])]
            self.side(DROP_SAMPLES_SIDE, pa.Table.from_pylist(rows, schema=pa.schema([
                ("id", pa.string()), ("drop_reason", pa.string()), ("text", pa.string()),
                ("text_chars", pa.int64()), ("sample_key", pa.uint64())])))
        return super().take_side()


def hashlib_hex(text: str) -> str:
    import hashlib

    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class GlobalStage(Stage):
    """A stage that must see all shards. ``run`` reads ``dataset`` (streaming, any number of
    passes), writes results through ``writer`` and may parallelise with ``ctx.map``."""

    kind = "global"

    def run(self, dataset: Dataset, writer: Writer, ctx: RunContext) -> None:
        raise NotImplementedError

    def local_scratch(self, ctx: RunContext, name: str) -> str:
        """A fresh, empty folder on this machine's disk (under the step's work folder), for files
        only this process reads (e.g. a training file a library wants as a local path)."""
        return self._fresh_folder(getattr(ctx, "workdir", None) or self.workdir, name)

    def scratch(self, ctx: RunContext, name: str) -> str:
        """A fresh, empty folder for this run's spill files, under the output location
        (``<output>/_curate/work/<step>/<name>``; a URL when the output is an object store, so
        workers on other nodes can read what each wrote). Read and write it with
        ``curate.pipeline.scratch`` (``spill_join``, ``spill_writer``, ``spill_read``...)."""
        base = getattr(ctx, "scratch_root", None) or getattr(ctx, "workdir", None) or self.workdir
        return self._fresh_folder(base, name)

    def _fresh_folder(self, base: str | None, name: str) -> str:
        from curate.pipeline.scratch import spill_join, spill_makedirs, spill_rmtree

        if not base:
            raise StageError(f"{self.name} needs a work folder")
        path = spill_join(base, name)
        spill_rmtree(path)
        spill_makedirs(path)
        return path

    def __call__(self, data: "pa.Table | str | list[str]", workdir: str | None = None) -> pa.Table:
        """Library call: run on a table or Parquet path(s) in this process; returns a table."""
        import tempfile

        from curate.pipeline.io import Dataset, MemoryWriter
        from curate.pipeline.context import RunContext

        self.ensure_setup()
        ds = Dataset.from_any(data)
        writer = MemoryWriter()
        with tempfile.TemporaryDirectory(prefix=f"curate-{self.name}-") as tmp:
            self.workdir = workdir or tmp
            self.run(ds, writer, RunContext.inline(self.workdir))
        return writer.table()

