"""The base of every LLM stage: a new recipe is a prompt file plus ``requests`` and ``parse``.

    @register
    class Summaries(LLMStage):
        name = "summaries"
        recipe = "summaries"
        Config = SummariesConfig              # LLMStageConfig + the recipe's own options

        def template_ids(self):
            return [self.config.template]     # e.g. "summaries/short" -> curate/prompts/summaries/short.yaml

        def requests(self, row):              # 0..N requests per input row
            return [self.ask(self.config.template, text=row["text"])]

        def parse(self, row, completions):    # 0..N output rows; ParseError(reason) when unusable
            return [{"text": parse_bullets(completions[0].text)[0]}]

The base class does the rest:

- engine: built from the ``engine`` option, shared in the process by stages with the same engine
  config (:mod:`curate.llm.pool`); a request cache in the step's work folder (or ``cache_path``);
- one definition of the sampling options (``temperature``, ``top_p``, ``max_tokens``, ``stop``,
  ``seed``) -> :meth:`LLMStage.sampling`;
- all requests of a batch go to the engine in one call (the openai engine keeps a window of
  ``concurrency`` requests in flight over all of them; vLLM batches them);
- an answer that fails to parse is asked again (``parse_retries`` times, each with a new seed, and
  ``retry_temperature`` when decoding is greedy), then counted ``errors/parse/<reason>`` and saved
  with the raw answer in the side output ``failed``;
- a request that failed transiently (timeouts, HTTP 5xx after the engine's retries) or that the
  budget did not allow is deferred (``Stage.defer``): the task is not recorded as complete and the
  next plain run redoes exactly those rows, finished answers coming from the cache;
- budgets (``max_requests``, ``max_total_tokens``, ``max_cost``) persist in the work folder, so
  they hold across resumes; raising them and rerunning continues where the run stopped;
- the failure-rate stop (``max_failure_rate`` after ``min_requests``) names the failure reasons;
- provenance columns on every synthetic row (``PROVENANCE``), prompt templates whose content hash
  is part of the step fingerprint, and chunking of long documents to a token budget.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Sequence

import pyarrow as pa
from pydantic import Field, field_validator

from curate.engines import Completion, EngineConfig, Request, RequestCache, SamplingParams, parse_engine_config
from curate.llm import pool
from curate.llm.accounting import Budget, LLMAccounting
from curate.llm.chunking import split_text
from curate.llm.parse import ParseError
from curate.llm.prompts import PromptTemplate, TemplateError, load_template
from curate.pipeline.stage import MapStage, Resources, StageConfig, StageError

log = logging.getLogger("curate")

# provenance columns of every synthetic row
PROVENANCE: dict[str, pa.DataType] = {
    "source_id": pa.string(), "recipe": pa.string(), "template_id": pa.string(),
    "template_version": pa.int32(), "engine_kind": pa.string(), "engine_model": pa.string(),
    "sampling": pa.string(), "prompt_tokens": pa.int32(), "completion_tokens": pa.int32(),
    "chunk_index": pa.int32(),
}


class LLMStageConfig(StageConfig):
    engine: EngineConfig = Field(default_factory=lambda: parse_engine_config({"kind": "transformers"}),
                                 description="engine: {kind: transformers|vllm|openai, model: ..., ...}")
    # sampling (one definition for every LLM stage)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (deterministic)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, description="maximum generated tokens per request")
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in the output)")
    seed: int | None = Field(None, description="sampling seed (temperature > 0)")
    # batching, cache, failures
    batch_size: int = Field(256, ge=1, description="input rows whose requests go to the engine in one call")
    cache: bool = Field(True, description="cache answers in the stage work folder (runner) or cache_path")
    cache_path: str | None = Field(None, description="explicit SQLite cache file (also for library calls)")
    parse_retries: int = Field(2, ge=0, description="new tries (new seed) for an answer that does not parse")
    retry_temperature: float = Field(0.7, ge=0.0, description="temperature of retries when decoding is greedy")
    max_failure_rate: float = Field(0.5, ge=0.0, le=1.0, description="stop when more requests than this fail")
    min_requests: int = Field(8, ge=1, description="requests made before the failure rate is checked")
    # budgets (new generations only; kept in the work folder across resumes)
    max_requests: int | None = Field(None, ge=0, description="stop after this many new requests")
    max_total_tokens: int | None = Field(None, ge=0, description="stop after this many new prompt+completion tokens")
    max_cost: float | None = Field(None, ge=0, description="stop at this cost (engine price_prompt/price_completion)")
    prompts_dir: str | None = Field(None, description="folder of <recipe>/<name>.yaml templates overriding the shipped ones")

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v


@dataclass
class Job:
    """Requests whose answers are parsed together, for the input row ``row``."""

    row: int
    requests: list[Request]
    parse: Callable[[list[Completion]], list[dict[str, Any]]]
    template: PromptTemplate | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0


@dataclass
class JobResult:
    job: Job
    status: Literal["ok", "failed", "deferred"]
    rows: list[dict[str, Any]] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    error: str = ""

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.completions)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions)


class LLMStage(MapStage):
    """Base class of LLM map stages (see the module docstring)."""

    Config: ClassVar[type[StageConfig]] = LLMStageConfig
    recipe: ClassVar[str] = ""
    # output rows are new synthetic documents (one input row -> 0..N rows, with provenance columns);
    # False: each input row gets the parse result as new columns (``generate``)
    synthetic: ClassVar[bool] = True
    # template variables the stage itself supplies (others must be listed in the `columns` option)
    provided_variables: ClassVar[frozenset[str]] = frozenset()
    # engines isolate failing requests; an exception from a batch is a real problem
    isolate_errors = False

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.config
        if cfg.engine.kind == "vllm":
            self.resources = Resources(cpus=1.0, gpus=float(cfg.engine.tensor_parallel_size))
        self.engine: Any = None
        self.cache: RequestCache | None = None
        self.budget: Budget | None = None
        self._templates: dict[str, PromptTemplate] = {}
        self.accounting = LLMAccounting(self, cfg.max_failure_rate, cfg.min_requests,
                                        prices=(cfg.engine.price_prompt, cfg.engine.price_completion))
        if self.synthetic:
            self.writes = {**type(self).writes, **PROVENANCE}

    # -- what a stage supplies -----------------------------------------------------------------------
    def template_ids(self) -> list[str]:
        """Ids (or paths) of the prompt templates this configured stage uses."""
        return []

    def requests(self, row: dict[str, Any]) -> list[Request]:
        raise NotImplementedError

    def parse(self, row: dict[str, Any], completions: list[Completion]) -> list[dict[str, Any]]:
        raise NotImplementedError

    # -- templates -------------------------------------------------------------------------------------
    def template(self, template_id: str) -> PromptTemplate:
        t = self._templates.get(template_id)
        if t is None:
            try:
                t = load_template(template_id, self.config.prompts_dir)
            except TemplateError as exc:
                raise StageError(f"stage {self.step_name!r}: {exc}") from None
            self._templates[template_id] = t
        return t

    def extra_columns(self) -> list[str]:
        return list(getattr(self.config, "columns", []) or [])

    def ask(self, template_id: str, *, row: dict[str, Any] | None = None, params: SamplingParams | None = None,
            **variables: Any) -> Request:
        """A chat request from a template; ``row`` supplies the extra ``columns`` (and the id)."""
        t = self.template(template_id)
        extra = {c: row.get(c) for c in self.extra_columns()} if row else {}
        msgs = t.messages(**{**extra, **variables})
        return Request(messages=msgs, params=params or self.sampling(), id=(row or {}).get("id"))

    def fingerprint_extra(self) -> str:
        out = []
        for tid in self.template_ids():
            try:
                t = self.template(tid)
                out.append(f"{t.label}:{t.hash}")
            except StageError as exc:
                out.append(f"{tid}:missing:{exc}")
        return "|".join(out)

    # -- sampling, chunking ------------------------------------------------------------------------
    def sampling(self, **overrides: Any) -> SamplingParams:
        cfg = self.config
        base = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                "stop": tuple(cfg.stop), "seed": cfg.seed}
        return SamplingParams(**{**base, **overrides})

    def text_budget(self, template: PromptTemplate | None, answer_tokens: int, margin: int = 32,
                    **variables: Any) -> int:
        """Tokens of document text per chunk: ``context_tokens`` (an option of chunking stages) minus
        the answer and the template around the text (with its worked examples); ``variables`` fill
        the template's other slots with typical values."""
        overhead = margin
        if template is not None:
            msgs = template.messages(**{"text": "", **variables})
            overhead += sum(self.engine.count_tokens(m["content"]) + 4 for m in msgs)
        return max(32, self.config.context_tokens - answer_tokens - overhead)

    def chunks_of(self, rows: list[dict[str, Any]], indices: range, column: str,
                  budget: int) -> list[tuple[int, int, str]]:
        """(row, chunk index, chunk text) for the rows ``indices``; empty texts are dropped and
        counted (``dropped/empty_text``)."""
        out: list[tuple[int, int, str]] = []
        for i in indices:
            text = rows[i].get(column)
            if text is None or not str(text).strip():
                self.drop("empty_text")
                continue
            out += [(i, k, c) for k, c in enumerate(self.split(str(text), budget))]
        return out

    def finish(self, table: pa.Table, rows: list[dict[str, Any]], results: Sequence[JobResult],
               numbering: dict[int, int] | None = None) -> list[tuple[int, dict[str, Any]]]:
        """End of a batch: failed rows to the side output, deferred rows counted, outputs collected."""
        self.failed_side(table, results)
        self.defer_rows(results)
        return self.collect(rows, results, numbering)

    def batches(self, rows: list[dict[str, Any]]) -> list[range]:
        n, size = len(rows), self.config.batch_size
        return [range(s, min(n, s + size)) for s in range(0, n, size)]

    def split(self, text: str, budget: int) -> list[str]:
        """``text`` in chunks of at most ``budget`` engine tokens, cut at paragraph/sentence
        boundaries (never truncated). Counted: ``<stage>/chunked_docs``, ``<stage>/chunks``."""
        chunks = split_text(text, budget, self.engine.count_tokens)
        if len(chunks) > 1:
            self.count(f"{self.name}/chunked_docs")
        self.count(f"{self.name}/chunks", len(chunks))
        return chunks

    # -- lifecycle -----------------------------------------------------------------------------------
    def check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        eng = self.config.engine
        if eng.kind == "transformers":
            from curate.engines.transformers_engine import ModelNotFound, resolve_model

            try:
                resolve_model(eng.model, eng.gguf_file)
            except ModelNotFound as exc:
                problems.append(("engine.model", str(exc)))
        elif eng.kind == "vllm" and not os.path.exists(os.path.expanduser(eng.model)):
            problems.append(("engine.model", f"{eng.model!r} is not a local path"))
        allowed = set(self.provided_variables) | set(self.extra_columns())
        for tid in self.template_ids():
            try:
                t = load_template(tid, self.config.prompts_dir)
            except TemplateError as exc:
                problems.append(("prompts_dir" if self.config.prompts_dir else "template", str(exc)))
                continue
            unknown = sorted(t.variables() - allowed)
            if unknown:
                problems.append(("columns", f"template {t.id!r} ({t.path}) uses {unknown}, which is neither "
                                            f"supplied by the stage ({sorted(self.provided_variables)}) "
                                            f"nor listed in `columns`"))
        return problems

    def input_columns(self) -> tuple[str, ...]:
        cols = list(super().input_columns())
        for c in self.extra_columns():
            if c not in cols:
                cols.append(c)
        return tuple(cols)

    def cache_file(self) -> str | None:
        cfg = self.config
        if cfg.cache_path:
            return cfg.cache_path
        if cfg.cache and self.workdir:
            return os.path.join(self.workdir, "llm_cache.sqlite")
        return None

    def setup(self) -> None:
        cfg = self.config
        for tid in self.template_ids():
            self.template(tid)
        path = self.cache_file()
        self.cache = RequestCache(path) if path else None
        try:
            self.engine = pool.EngineHandle(pool.acquire(cfg.engine), self.cache)
        except (FileNotFoundError, ImportError) as exc:
            raise StageError(f"stage {self.step_name!r}: cannot start the {cfg.engine.kind} engine: {exc}") from exc
        # rate limits hold for the whole run: their state lives in the run's work folder
        self.engine.share_limits(os.path.dirname(os.path.abspath(self.workdir)) if self.workdir else None)
        budget_path = None
        if self.workdir:
            budget_path = os.path.join(self.workdir, "llm_budget.sqlite")
        elif cfg.cache_path:
            budget_path = cfg.cache_path + ".budget"
        self.budget = Budget(budget_path, self.step_name, cfg.max_requests, cfg.max_total_tokens, cfg.max_cost)

    def teardown(self) -> None:
        if self.engine is not None:
            pool.release(self.engine.shared)
            self.engine = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        if self.budget is not None:
            self.budget.close()
        self._is_setup = False

    # -- the engine loop -----------------------------------------------------------------------------
    def _retry(self, job: Job) -> Job:
        cfg = self.config
        n = job.attempt + 1
        reqs = []
        for r in job.requests:
            p = r.params
            upd: dict[str, Any] = {"seed": (p.seed or 0) + 7919 * n}
            if p.temperature == 0.0:
                upd["temperature"] = cfg.retry_temperature
            reqs.append(r.model_copy(update={"params": p.model_copy(update=upd)}))
        return Job(job.row, reqs, job.parse, job.template, job.meta, n)

    def complete(self, jobs: Sequence[Job], row_ids: Sequence[Any]) -> list[JobResult]:
        """Run jobs to completion: one engine call per round (parse retries are further rounds)."""
        results: dict[int, JobResult] = {}
        pending = list(enumerate(jobs))
        budget_stop = False
        retry_round = False
        while pending:
            reqs = [r for _, j in pending for r in j.requests]
            comps: list[Completion | None] = self.engine.cached(reqs) if reqs else []
            misses = [k for k, c in enumerate(comps) if c is None]
            allowed = self.budget.allow(len(misses)) if self.budget else len(misses)
            send, denied = misses[:allowed], set(misses[allowed:])
            if send:
                new = self.engine.generate([reqs[k] for k in send])
                for k, c in zip(send, new):
                    comps[k] = c
                if self.budget is not None:
                    used = [c for c in new if c.ok and not c.cached]
                    self.budget.add(sum(c.prompt_tokens + c.completion_tokens for c in used),
                                    sum(self.accounting.cost(c.prompt_tokens, c.completion_tokens) for c in used))
            self.accounting.record([c for c in comps if c is not None], count_failures=False, retry=retry_round)
            nxt: list[tuple[int, Job]] = []
            k = 0
            for idx, job in pending:
                span = range(k, k + len(job.requests))
                k += len(job.requests)
                cs = [comps[i] for i in span]
                doc = row_ids[job.row]
                if any(i in denied for i in span):
                    budget_stop = True
                    results[idx] = JobResult(job, "deferred", error="budget")
                    continue
                bad = [c for c in cs if c is not None and not c.ok]
                if bad:
                    err = bad[0].error or "failed"
                    transient = all(c.transient for c in bad)
                    self.accounting.request_failed(doc, err, transient=transient)
                    status = "deferred" if transient else "failed"
                    results[idx] = JobResult(job, status, completions=cs, error=err)  # type: ignore[arg-type]
                    continue
                try:
                    rows = job.parse(cs)  # type: ignore[arg-type]
                except ParseError as exc:
                    if job.attempt < self.config.parse_retries:
                        self.count("llm/parse_retries")
                        nxt.append((idx, self._retry(job)))
                        continue
                    self.accounting.parse_failed(doc, f"{exc}; answer: {cs[0].text if cs else ''!r}"[:300],
                                                 reason=exc.reason)
                    results[idx] = JobResult(job, "failed", completions=cs,  # type: ignore[arg-type]
                                             error=f"parse/{exc.reason}: {exc.detail}")
                    continue
                results[idx] = JobResult(job, "ok", rows=rows, completions=cs)  # type: ignore[arg-type]
            self.accounting.check()
            pending, retry_round = nxt, True
        if budget_stop and self.budget is not None:
            log.warning("%s: budget reached (%s); rows left for the next run (raise the budget and run "
                        "again to continue)", self.step_name, self.budget.describe())
        return [results[i] for i in range(len(jobs))]

    # -- rows in, rows out ---------------------------------------------------------------------------
    def rows(self, table: pa.Table) -> list[dict[str, Any]]:
        cols = [c for c in dict.fromkeys((*self.reads, "id")) if c in table.schema.names]
        data = {c: table.column(c).to_pylist() for c in cols}
        return [{c: data[c][i] for c in cols} for i in range(table.num_rows)]

    def provenance(self, row: dict[str, Any], res: JobResult) -> dict[str, Any]:
        t = res.job.template
        eng = self.engine
        params = res.job.requests[0].params if res.job.requests else self.sampling()
        return {"source_id": row.get("id"), "recipe": self.recipe or self.name,
                "template_id": t.id if t else None, "template_version": t.version if t else None,
                "engine_kind": eng.kind, "engine_model": eng.model_id,
                "sampling": json.dumps(params.model_dump(mode="json"), sort_keys=True),
                "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                "chunk_index": res.job.meta.get("chunk")}

    def failed_side(self, table: pa.Table, results: Sequence[JobResult]) -> None:
        """Rows whose job failed (request error, or no parse after retries), with the reason and
        the raw answer, to the side output ``failed``."""
        bad = [r for r in results if r.status != "ok" and r.error != "budget"]
        if not bad:
            return
        side = table.take(pa.array([r.job.row for r in bad], pa.int64()))
        side = side.append_column("llm_error", pa.array([r.error for r in bad], pa.string()))
        raw = [r.completions[0].text if r.completions and r.completions[0] is not None else None for r in bad]
        side = side.append_column("llm_answer", pa.array(raw, pa.string()))
        self.side("failed", side)

    def score_rows(self, table: pa.Table, column: str, make_job: Callable[[int, dict[str, Any], str], Job],
                   on_error: str = "keep") -> pa.Table:
        """The loop of annotation stages (``synthetic = False``; one job per row, its parse result
        as new columns): ``make_job(i, row, text)`` for each row with text in ``column``. Rows with
        an empty text (counted ``<stage>/empty_text``) and rows whose job failed are kept with null
        columns, or failed rows are dropped with ``on_error: drop`` (``dropped/llm_failed``);
        deferred rows are left for the next run. Counted: ``<stage>/scored``."""
        rows = self.rows(table)
        ids = [r.get("id") for r in rows]
        outputs: list[tuple[int, dict[str, Any]]] = []
        for batch in self.batches(rows):
            jobs, empty = [], []
            for i in batch:
                text = rows[i].get(column)
                if text is None or not str(text).strip():
                    self.count(f"{self.name}/empty_text")
                    empty.append(i)
                    continue
                jobs.append(make_job(i, rows[i], str(text)))
            results = self.complete(jobs, ids)
            outputs.extend(self.finish(table, rows, results))
            self.count(f"{self.name}/scored", sum(r.status == "ok" for r in results))
            failed = [r.job.row for r in results if r.status == "failed"]
            if on_error == "drop" and failed:
                self.drop("llm_failed", len(failed))
                failed = []
            outputs.extend((i, {}) for i in [*empty, *failed])
        return self.assemble(table, outputs)

    def defer_rows(self, results: Sequence[JobResult]) -> None:
        rows_budget = {r.job.row for r in results if r.status == "deferred" and r.error == "budget"}
        rows_transient = {r.job.row for r in results if r.status == "deferred" and r.error != "budget"} - rows_budget
        if rows_budget:
            self.defer("budget", len(rows_budget), detail=self.budget.describe() if self.budget else "")
        if rows_transient:
            last = next(r.error for r in results if r.status == "deferred" and r.error != "budget")
            self.defer("llm_request", len(rows_transient), detail=last)

    def assemble(self, table: pa.Table, outputs: list[tuple[int, dict[str, Any]]]) -> pa.Table:
        """The output table: input row ``i`` (all its columns) with the columns of each dict."""
        outputs = sorted(outputs, key=lambda x: x[0])  # stable: keeps each row's order
        out = table.take(pa.array([i for i, _ in outputs], pa.int64()))
        names = list(self.writes)
        for _, d in outputs:
            names += [k for k in d if k not in names]
        for name in names:
            values = [d.get(name) for _, d in outputs]
            typ = self.writes.get(name)
            if typ is None and name in out.schema.names:
                typ = out.schema.field(name).type
            arr = pa.array(values, typ) if typ is not None else pa.array(values)
            if name in out.schema.names:
                out = out.set_column(out.schema.names.index(name), name, arr)
            else:
                out = out.append_column(name, arr)
        return out

    def jobs_for(self, i: int, row: dict[str, Any]) -> list[Job]:
        """Default: all of the row's requests in one job parsed by ``parse``."""
        reqs = self.requests(row)
        if not reqs:
            return []
        tids = self.template_ids()
        t = self.template(tids[0]) if tids else None
        return [Job(i, list(reqs), lambda cs, row=row: self.parse(row, cs), t)]

    def process(self, table: pa.Table) -> pa.Table:
        rows = self.rows(table)
        ids = [r.get("id") for r in rows]
        outputs: list[tuple[int, dict[str, Any]]] = []
        for batch in self.batches(rows):
            jobs = [j for i in batch for j in self.jobs_for(i, rows[i])]
            outputs.extend(self.finish(table, rows, self.complete(jobs, ids)))
        return self.assemble(table, outputs)

    def collect(self, rows: list[dict[str, Any]], results: Sequence[JobResult],
                numbering: dict[int, int] | None = None) -> list[tuple[int, dict[str, Any]]]:
        """Output dicts of the finished jobs; synthetic stages get ids (``<source id>#<recipe>-<k>``,
        k counting a row's outputs; pass one ``numbering`` dict to several calls for one batch) and
        provenance."""
        out: list[tuple[int, dict[str, Any]]] = []
        n_per_row: dict[int, int] = {} if numbering is None else numbering
        for res in results:
            if res.status != "ok":
                continue
            row = rows[res.job.row]
            for d in res.rows:
                if self.synthetic:
                    k = n_per_row.get(res.job.row, 0)
                    n_per_row[res.job.row] = k + 1
                    prov = self.provenance(row, res)
                    d = {**prov, **d, "id": f"{row.get('id')}#{self.recipe or self.name}-{k}"}
                out.append((res.job.row, d))
        return out
