"""The base of every LLM stage: a new recipe is a prompt file plus ``requests`` and ``parse``.

    @register
    class Summaries(LLMStage):
        name = "summaries"
        recipe = "summaries"
        Config = SummariesConfig              # LLMStageConfig + the recipe's own options
        reads = ("{text_column}",)
        writes = {"text": pa.string()}
        chunked = True                        # long texts in ``text_column`` split to fit the context

        def template_ids(self):
            return [self.config.template]     # e.g. "summaries/short" -> curate/prompts/summaries/short.yaml

        def requests(self, row):              # 0..N requests per input row (per chunk: row[text_column] is the chunk)
            return [self.ask(self.config.template, row=row, text=row["text"])]

        def parse(self, row, completions):    # 0..N output rows; ParseError(reason) when unusable
            return [{"text": parse_bullets(completions[0].text)[0]}]

No LLM stage overrides ``process()``: the base owns the loop, so deferral, the failed side output
and accounting cannot be forgotten. What a recipe may give besides ``requests``/``parse``:

- ``chunked = True``: the base splits ``config.text_column`` into chunks that fit
  ``context_tokens`` (``chunk_budget()``); ``requests``/``parse``/``jobs`` see one chunk at a time
  (``row[text_column]`` is the chunk, ``unit.chunk`` its index, ``chunk_index`` in provenance);
- ``jobs(unit) -> [Job]`` instead of ``requests``/``parse``, when a row's requests are parsed
  separately; a ``Job`` may carry ``then(result) -> [Job]``, a follow-up phase run as soon as
  that job is finished (entigraph's relation requests after its entity answer; instruction_synth's
  next round), with ``emit=False`` when its own rows are only input to the follow-up; a job and
  its follow-ups are for the unit's own row (a job for another row makes the table written at its
  end instead of as rows become final; one for a row already written is a ``StageError``);
- annotation stages (``synthetic = False``: the parse result becomes new columns of the input row)
  name what a row without text (``empty_row``) or with a failed request (``failed_row``) becomes.

The base class does the rest:

- engine: built from the ``engine`` option, shared in the process by stages with the same engine
  config (:mod:`curate.llm.pool`); a request cache in the step's work folder (or ``cache_path``),
  looked up once per request; what the engine kind needs (resources, checks, tokenizer) comes from
  the engine config/class;
- continuous flow: requests go to an engine :class:`~curate.engines.base.Stream` that keeps the
  engine's window full across rows (``concurrency`` x 2 for the openai engine; ``batch_size``
  requests per call for the local engines), a row's follow-up requests leave as soon as its first
  answer parsed, and output rows are written in input order as soon as a row is final (its jobs
  done, the rows before it written; the table's end only assembles columns), with the garbage
  collector paced while the stream runs (:mod:`curate.llm.gcpace`);
- one definition of the sampling options (``temperature``, ``top_p``, ``max_tokens``, ``stop``,
  ``seed``) -> :meth:`LLMStage.sampling`;
- answer schemas (:mod:`curate.llm.structured`): a recipe's ``answer_schema`` (a pydantic model;
  or ``ask(..., answer_schema=Model)`` per request) goes with its requests; engines with structured outputs
  (openai ``response_format``, vLLM) enforce it while decoding, and every answer is validated
  against it before ``parse``, which reads the model instance from ``completions[k].parsed``
  (``errors/parse/schema`` when it does not match; ``salvage`` may rescue an answer cut short);
- an answer that repeats the prompt's worked example (``example`` / ``example_answers`` of the
  prompt file) is a parse failure ``echoed_example`` (each one counted ``llm/echoed_examples``;
  ``check_echo = False`` for recipes whose answers are short commands);
- an answer that fails to parse, or a synthetic answer that parses to nothing, is asked again
  (``parse_retries`` times, each with a new seed, and ``retry_temperature`` when decoding is
  greedy), then counted ``errors/parse/<reason>`` and saved with the raw answer in the side output
  ``failed``; ``DropAnswer(reason)`` from a parse drops an answer on purpose (``dropped/<reason>``);
- a request that failed transiently (timeouts, HTTP 5xx after the engine's retries) or that the
  budget did not allow is deferred (``Stage.defer``): the task is not recorded as complete and the
  next plain run redoes exactly those rows, finished answers coming from the cache;
- budgets (``max_requests``, ``max_total_tokens``, ``max_cost``) persist in the work folder and are
  charged per answer, before the answer is cached (:class:`~curate.llm.accounting.Budget`), so
  they hold across resumes and kills; raising them and rerunning continues where the run stopped;
- the failure-rate stop (``max_failure_rate`` after ``min_requests``) names the failure reasons;
  ``min_yield``: a batch where fewer input rows produced output is counted ``warnings/low_yield``
  and logged; a library call logs a WARNING with what it dropped and what failed;
- provenance on every row an LLM touched: the ``PROVENANCE`` columns on synthetic rows (model,
  prompt id, version and content hash, sampling), one ``<...>_provenance`` JSON column on
  annotation stages; prompt templates whose content hash is part of the step fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable, ClassVar, Iterator, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from curate.engines import Completion, EngineConfig, Request, RequestCache, SamplingParams, parse_engine_config
from curate.llm import pool
from curate.llm.accounting import Budget, LLMAccounting
from curate.llm.chunking import split_text
from curate.llm.gcpace import paced
from curate.llm.parse import ParseError
from curate.llm.prompts import PromptTemplate, TemplateError, load_template
from curate.llm.structured import EchoCheck, validate_answer
from curate.llm.structured import answer_schema as _schema_of
from curate.pipeline.stage import MapStage, Resources, StageConfig, StageError

log = logging.getLogger("curate")

# provenance columns of every synthetic row
PROVENANCE: dict[str, pa.DataType] = {
    "source_id": pa.string(), "recipe": pa.string(), "template_id": pa.string(),
    "template_version": pa.int32(), "engine_kind": pa.string(), "engine_model": pa.string(),
    "sampling": pa.string(), "prompt_tokens": pa.int32(), "completion_tokens": pa.int32(),
    "chunk_index": pa.int32(), "template_hash": pa.string(),
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
    # flow, cache, failures
    batch_size: int = Field(256, ge=1, description="local engines (transformers, vllm): requests per engine call; "
                                                   "the openai engine keeps 2 x concurrency in flight instead")
    cache: bool = Field(True, description="cache answers in the stage work folder (runner) or cache_path")
    cache_path: str | None = Field(None, description="explicit SQLite cache file (also for library calls)")
    parse_retries: int = Field(2, ge=0, description="new tries (new seed) for an answer that does not parse")
    retry_temperature: float = Field(0.7, ge=0.0, description="temperature of retries when decoding is greedy")
    max_failure_rate: float = Field(0.5, ge=0.0, le=1.0, description="stop when more requests than this fail")
    min_requests: int = Field(8, ge=1, description="requests made before the failure rate is checked")
    min_yield: float | None = Field(
        None, ge=0.0, le=1.0, description="fraction of input rows that must produce output, else "
                                          "warnings/low_yield (default 0.5 for synthetic stages, 0 for annotation)")
    # budgets (new generations only; kept in the work folder across resumes)
    max_requests: int | None = Field(None, ge=0, description="stop after this many new requests")
    max_total_tokens: int | None = Field(None, ge=0, description="stop after this many new prompt+completion tokens")
    max_cost: float | None = Field(None, ge=0, description="stop at this cost (engine price_prompt/price_completion)")
    prompts_dir: str | None = Field(None, description="folder of <recipe>/<name>.yaml templates overriding the shipped ones")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        from curate.prompts import renamed_prompts_dir
        return renamed_prompts_dir(data, "an LLM stage")

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v: Any) -> Any:
        # `engine: NAME` is resolved by the pipeline loader (pipeline/refs.py); a string that gets
        # here is a library call, where there are no named engines
        if isinstance(v, str):
            from curate.engines.config import string_engine_message
            raise ValueError(string_engine_message(v))
        return v


class DropAnswer(Exception):
    """Raised by a parse function: a well-formed answer the recipe drops on purpose (counted
    ``dropped/<reason>``, not retried, not a failure)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Unit:
    """One piece of work of the input row ``index``: the row, or one chunk of its text (``chunk``;
    ``row[text_column]`` is then the chunk)."""

    index: int
    row: dict[str, Any]
    chunk: int | None = None


@dataclass
class Job:
    """Requests whose answers are parsed together, for the input row ``row``.

    ``then(result) -> [Job]``: a follow-up phase, called when this job is finished (any status);
    its jobs go to the engine at once. ``emit``: this job's parsed rows are output rows (False: they
    are only for ``then``). ``order``: where its rows go among the row's outputs (default: in the
    order jobs were made; a follow-up after its parent)."""

    row: int
    requests: list[Request]
    parse: Callable[[list[Completion]], list[dict[str, Any]]]
    template: PromptTemplate | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0
    then: Callable[["JobResult"], list["Job"]] | None = None
    emit: bool = True
    order: tuple = ()


@dataclass
class JobResult:
    job: Job
    status: Literal["ok", "failed", "deferred"]
    rows: list[dict[str, Any]] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    error: str = ""

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.completions if c is not None)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions if c is not None)


class LLMStage(MapStage):
    """Base class of LLM map stages (see the module docstring)."""

    Config: ClassVar[type[StageConfig]] = LLMStageConfig
    recipe: ClassVar[str] = ""
    # output rows are new synthetic documents (one input row -> 0..N rows, with provenance columns);
    # False: each input row gets the parse result as new columns (annotation stages)
    synthetic: ClassVar[bool] = True
    # split ``config.text_column`` into chunks that fit the context (one unit of work per chunk)
    chunked: ClassVar[bool] = False
    # template variables the stage itself supplies (others must be listed in the `columns` option)
    provided_variables: ClassVar[frozenset[str]] = frozenset()
    # exceptions of ``jobs()``/``requests()`` that mean "this row cannot become a request" (counted
    # ``errors/llm/prompt``, the row failed); others propagate
    invalid_prompt_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    # annotation stages: count ``<stage>/scored`` (rows whose answer parsed)
    count_scored: ClassVar[bool] = False
    # the JSON form of an answer (a pydantic model): sent with each request of ``ask`` (engines with
    # structured outputs enforce it) and validated before ``parse`` (``completions[k].parsed``)
    answer_schema: ClassVar[Any] = None
    # reject answers that repeat the prompt file's worked example (``errors/parse/echoed_example``)
    check_echo: ClassVar[bool] = True
    # engines isolate failing requests; an exception from a batch is a real problem
    isolate_errors = False

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.config
        res = cfg.engine.resources()
        if res:
            self.resources = Resources(**res)
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

    def jobs(self, unit: Unit) -> list[Job]:
        """The jobs of one unit. Default: all of ``requests(row)`` in one job parsed by ``parse``."""
        reqs = self.requests(unit.row)
        if not reqs:
            return []
        tids = self.template_ids()
        t = self.template(tids[0]) if tids else None
        return [Job(unit.index, list(reqs), lambda cs, row=unit.row: self.parse(row, cs), t)]

    def empty_row(self, unit: Unit) -> dict[str, Any] | None:
        """Annotation stages: the columns of a row whose ``text_column`` is empty (None: drop it).
        Default: kept with null columns, counted ``<stage>/empty_text``."""
        self.count(f"{self.name}/empty_text")
        return {}

    def failed_row(self, row: dict[str, Any], result: JobResult) -> dict[str, Any] | None:
        """Annotation stages: the columns of a row whose job failed (None: drop it, counted
        ``dropped/llm_failed``). Default: ``on_error`` keep (null columns) or drop."""
        if getattr(self.config, "on_error", "keep") == "drop":
            self.drop("llm_failed")
            return None
        return {}

    def finish_table(self, table: pa.Table, out: pa.Table, kept: list[int]) -> pa.Table:
        """Last touch on a batch's output (``kept``: the input rows in it, annotation stages)."""
        return out

    def provenance_column(self) -> str:
        """Annotation stages: the JSON provenance column (model, prompt id/version/hash, sampling)."""
        return f"{self.name}_provenance"

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
            answer_schema: Any = "default", **variables: Any) -> Request:
        """A chat request from a template; ``row`` supplies the extra ``columns`` (and the id).
        ``answer_schema``: the pydantic model of the answer (default: the class's ``answer_schema``;
        None: a free-text answer), enforced by the engine when it has structured outputs."""
        t = self.template(template_id)
        extra = {c: row.get(c) for c in self.extra_columns()} if row else {}
        msgs = t.messages(**{**extra, **variables})
        model = self.answer_schema if isinstance(answer_schema, str) and answer_schema == "default" else answer_schema
        return Request(messages=msgs, params=params or self.sampling(), id=(row or {}).get("id"),
                       answer_schema=_schema_of(model, self.structured) if model is not None else None)

    @property
    def structured(self) -> bool:
        """The engine enforces answer schemas while decoding (structured outputs): openai unless
        its ``structured_outputs`` is false or the server refused one, vLLM; not transformers."""
        if self.engine is not None:
            return bool(getattr(self.engine, "supports_structured", False))
        return self.config.engine.structured()

    def salvage(self, request: Request, completion: Completion, error: ParseError) -> Any:
        """An answer that failed its schema (``error``): return a model instance made from what is
        usable (an answer cut at ``max_tokens``...), or raise ``error`` (the default)."""
        raise error

    def echo_check(self, template: PromptTemplate) -> EchoCheck:
        """The worked-example check of a template (built once per template)."""
        memo = self.__dict__.setdefault("_echo_checks", {})
        key = (template.id, template.hash)
        if key not in memo:
            memo[key] = EchoCheck.of_template(template)
        return memo[key]

    def check_answers(self, job: "Job", completions: list[Completion]) -> None:
        """Before ``parse``: reject an answer that repeats the template's worked example
        (``echoed_example``), validate answers against their request's schema (``schema``...) and
        attach the instances (``completion.parsed``). Raises ParseError."""
        echo = self.echo_check(job.template) if self.check_echo and job.template is not None else None
        for req, c in zip(job.requests, completions):
            if echo:
                what = echo.check(c.text, req.messages)
                if what:
                    self.count("llm/echoed_examples")
                    raise ParseError("echoed_example", f"the answer repeats {what} of the prompt "
                                                       f"{job.template.id!r}")  # type: ignore[union-attr]
            schema = req.answer_schema
            if schema is None or schema.model is None:
                continue
            if c.unconstrained:
                self.count("llm/structured_fallback")
            elif schema.constrain:
                self.count("llm/structured")
            try:
                c.parsed = validate_answer(c.text, schema.model)
            except ParseError as exc:
                c.parsed = self.salvage(req, c, exc)

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

    def chunk_budget(self) -> int:
        """Tokens of text per chunk (chunked stages). Default: ``text_budget`` of the first template."""
        tids = self.template_ids()
        return self.text_budget(self.template(tids[0]) if tids else None, self.config.max_tokens)

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
        problems: list[tuple[str, str]] = [(f"engine.{k}" if k else "engine", msg)
                                           for k, msg in self.config.engine.check()]
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

    def batch_records(self) -> str | None:
        """Where the engine's batch mode records the batches it submitted (the step's work folder,
        so a resumed run polls them instead of paying again); None: beside the cache file, or in
        memory."""
        if self.workdir:
            return os.path.join(self.workdir, "llm_batches.sqlite")
        if self.config.cache_path:
            return self.config.cache_path + ".batches"
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

    # -- budget hooks of the stream ------------------------------------------------------------------
    def _estimate(self, request: Request) -> tuple[int, float]:
        """Tokens and cost a request may use: its prompt plus ``max_tokens`` per answer."""
        prompt = self.engine.prompt_tokens(request)
        answer = request.params.max_tokens * request.params.n
        return prompt + answer, self.accounting.cost(prompt, answer)

    def _admit(self, request: Request) -> bool | None:
        budget = self.budget
        if budget is None or not budget.active:
            return True
        return budget.reserve(*self._estimate(request))

    def _charge(self, answers: list[tuple[Request, Completion]]) -> None:
        budget = self.budget
        if budget is None or not budget.active:
            return
        for req, c in answers:
            est_tokens, est_cost = self._estimate(req)
            if c.prepaid:   # reserved by the run that submitted its batch: only the difference
                if c.ok:
                    budget.adjust(est_tokens, est_cost, c.prompt_tokens + c.completion_tokens,
                                  self.accounting.cost(c.prompt_tokens, c.completion_tokens))
            elif c.ok:
                budget.settle(est_tokens, est_cost, c.prompt_tokens + c.completion_tokens,
                              self.accounting.cost(c.prompt_tokens, c.completion_tokens))
            else:  # a failed request may have cost something: its estimate stays charged
                budget.settle(est_tokens, est_cost, est_tokens, est_cost)

    # -- rows in, rows out ---------------------------------------------------------------------------
    def min_batch_rows(self) -> int:
        """Rows a runner batch (and task) of this step should hold at least (0: no minimum). A table
        ends with its engine's window draining (the last answers arriving one by one, fewer and
        fewer in flight), so a table should be several windows long: 8 windows of the openai engine
        (16 x ``concurrency``; batch mode uploads a table at once) and of vLLM (1,024 requests a call).
        With 1,000-row batches, ``concurrency: 512`` ran ``curate run`` at 0.47 of the bound."""
        eng = self.config.engine
        kind = getattr(eng, "kind", "")
        if kind == "openai" and getattr(eng, "mode", "online") == "online":
            return 16 * int(eng.concurrency)
        if kind == "vllm":
            return 8 * 1024
        return 0

    def rows(self, table: pa.Table) -> list[dict[str, Any]]:
        cols = [c for c in dict.fromkeys((*self.reads, "id")) if c in table.schema.names]
        data = {c: table.column(c).to_pylist() for c in cols}
        return [{c: data[c][i] for c in cols} for i in range(table.num_rows)]

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
        return Job(job.row, reqs, job.parse, job.template, job.meta, n, job.then, job.emit, job.order)

    def provenance(self, row: dict[str, Any], res: JobResult) -> dict[str, Any]:
        t = res.job.template
        eng = self.engine
        params = res.job.requests[0].params if res.job.requests else self.sampling()
        return {"source_id": row.get("id"), "recipe": self.recipe or self.name,
                "template_id": t.id if t else None, "template_version": t.version if t else None,
                "engine_kind": eng.kind, "engine_model": eng.model_id,
                "sampling": json.dumps(params.model_dump(mode="json"), sort_keys=True),
                "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                "chunk_index": res.job.meta.get("chunk"), "template_hash": t.hash if t else self.prompt_hash()}

    def prompt_hash(self) -> str | None:
        """Content hash of a prompt that is not a template file (``generate``'s template option)."""
        return None

    def annotation_provenance(self, res: JobResult) -> str:
        """The JSON provenance of an annotated row (one string per template and sampling)."""
        t = res.job.template
        params = res.job.requests[0].params if res.job.requests else self.sampling()
        # the jobs of a stage share one params object: the last one's answer, by identity, before
        # the memo by value (hashing a pydantic model for each of 10,000 rows cost 27 ms)
        last = self.__dict__.get("_provenance_last")
        if last is not None and last[0] is t and last[1] is params:
            return last[2]
        key = (t.id if t else None, t.hash if t else None, params)
        memo = self.__dict__.setdefault("_provenance_memo", {})
        out = memo.get(key)
        if out is None:
            eng = self.engine
            out = memo[key] = json.dumps(
                {"engine": eng.kind, "model": eng.model_id, "template": t.id if t else None,
                 "version": t.version if t else None, "hash": t.hash if t else self.prompt_hash(),
                 "sampling": params.model_dump(mode="json")}, sort_keys=True)
        self._provenance_last = (t, params, out)
        return out

    def assemble(self, table: pa.Table, outputs: list[tuple[int, dict[str, Any]]]) -> pa.Table:
        """The output table: input row ``i`` (all its columns) with the columns of each dict."""
        index = [i for i, _ in outputs]
        if any(a > b for a, b in zip(index, index[1:])):
            outputs = sorted(outputs, key=itemgetter(0))  # stable: keeps each row's order
            index = [i for i, _ in outputs]
        out = table.take(pa.array(index, pa.int64()))
        names = dict.fromkeys(self.writes)
        for keys in dict.fromkeys(tuple(d) for _, d in outputs):  # the distinct key sequences
            names.update(dict.fromkeys(keys))
        dicts = [d for _, d in outputs]
        for name in names:
            values = [d.get(name) for d in dicts]
            typ = self.writes.get(name)
            if typ is None and name in out.schema.names:
                typ = out.schema.field(name).type
            arr = pa.array(values, typ) if typ is not None else pa.array(values)
            if name in out.schema.names:
                out = out.set_column(out.schema.names.index(name), name, arr)
            else:
                out = out.append_column(name, arr)
        return out

    def units(self, rows: list[dict[str, Any]], empty: list[int]) -> Iterator[Unit]:
        """The units of work, lazily (chunking as it goes). Rows whose ``text_column`` is empty are
        appended to ``empty``."""
        column = getattr(self.config, "text_column", None)
        budget = None
        for i, row in enumerate(rows):
            if column is not None:
                text = row.get(column)
                if text is None or not str(text).strip():
                    empty.append(i)
                    continue
                if self.chunked:
                    if budget is None:
                        budget = self.chunk_budget()
                    for k, chunk in enumerate(self.split(str(text), budget)):
                        yield Unit(i, {**row, column: chunk}, k)
                    continue
            yield Unit(i, row)

    def process(self, table: pa.Table) -> pa.Table:
        # no collector pauses while answers are arriving (curate.llm.gcpace); the flow's rows and
        # answers are freed before the threshold goes back, so that does not set off a collection
        with paced():
            return _Flow(self, table).run()

    # -- library calls ---------------------------------------------------------------------------------
    def __call__(self, data: Any) -> pa.Table:
        """Library call; logs a WARNING naming what was dropped and what failed (counts by reason)."""
        before = dict(self.counters.data)
        out = super().__call__(data)
        delta = {k: v - before.get(k, 0) for k, v in self.counters.data.items() if v != before.get(k, 0)}
        lost = {k: v for k, v in delta.items() if k.startswith(("dropped/", "errors/", "warnings/"))}
        if lost:
            log.warning("%s: %d row(s) out; %s", self.step_name, out.num_rows,
                        ", ".join(f"{k} {v:g}" for k, v in sorted(lost.items(), key=lambda kv: -kv[1])))
        return out


@dataclass(slots=True)
class _Out:
    """What a finished "ok" job gives the output (see ``_Flow._out``)."""

    row: int
    dicts: list[dict[str, Any]]


class _Flow:
    """One ``process()`` call: units -> jobs -> engine stream -> parse/retry/follow-ups -> output.

    Rows are written out in input order while answers still arrive: a row is final once the units
    have moved past it and none of its jobs is open (follow-ups and retries count as open), and its
    output dicts are made then, so the end of the table only assembles columns (the answers of a
    10,000-row table were walked again at its end: 0.13 s, which the last answer waited for). This
    needs rows whose units come in order and jobs for their own row (the base ``units``; a job made
    for another row turns it off for the rest of the table: everything is then written at the end)."""

    def __init__(self, stage: LLMStage, table: pa.Table):
        self.stage, self.table = stage, table
        self.rows = stage.rows(table)
        self.live: dict[int, tuple[Job, list[Completion | None]]] = {}
        self.todo: deque[Job] = deque()
        self.seq = 0
        # a row's finished jobs, until the row is final: (sort key, seq, result); a result is the
        # JobResult of a job that did not end "ok", or an emitting job's output dicts (``_Out``:
        # its job, requests and answers are freed at once)
        self.by_row: dict[int, list[tuple[tuple, int, JobResult | _Out]]] = {}
        self.failures: list[tuple[tuple, int, JobResult]] = []   # every job that did not end "ok"
        self.open: dict[int, int] = {}     # row -> its jobs made and not finished
        self.in_order = type(stage).units is LLMStage.units
        self.frontier = 0                  # rows below it have all their units made
        self.cursor = 0                    # rows below it are final (in ``outputs``)
        self.outputs: list[tuple[int, dict[str, Any]]] = []
        self.produced = 0
        self.empty: list[int] = []
        self.empty_set: set[int] = set()   # ``empty`` as a set, up to ``empty_seen`` of it
        self.empty_seen = 0

    def run(self) -> pa.Table:
        st = self.stage
        cfg = st.config
        units = st.units(self.rows, self.empty)
        eng = st.engine
        stream = eng.shared.stream(eng.cache, st._admit, st._charge, stats=[eng.stats], records=st.batch_records())
        window = eng.window(cfg.batch_size)
        more = True
        try:
            while True:
                while stream.pending < window:
                    if not self.todo:
                        if not more:
                            break
                        unit = next(units, None)
                        if unit is None:
                            more = False
                            self.frontier = len(self.rows)
                            continue
                        self.frontier = max(self.frontier, unit.index)
                        self.todo.extend(self._jobs(unit))
                        continue
                    self._submit(stream, self.todo.popleft())
                if not stream.pending:
                    if self.todo or more:
                        continue
                    break
                for (jid, k), c in stream.next():
                    job, comps = self.live[jid]
                    comps[k] = c
                    if all(x is not None for x in comps):
                        del self.live[jid]
                        self._resolve(job, comps)  # type: ignore[arg-type]
                self._advance()
        finally:
            stream.close()
            for k, v in stream.backend.counters.items():   # batch mode: batches, expired, resumed...
                if v:
                    st.count(f"llm/{k}", v)
            if st.budget is not None:
                st.budget.release()
        self.in_order, self.frontier = True, len(self.rows)
        self._advance()
        return self._output()

    def _jobs(self, unit: Unit) -> list[Job]:
        st = self.stage
        try:
            jobs = st.jobs(unit)
        except st.invalid_prompt_errors as exc:  # type: ignore[misc]
            reason = f"prompt: {type(exc).__name__}: {exc}"
            st.accounting.invalid_prompt(self.rows[unit.index].get("id"), reason)
            res = JobResult(Job(unit.index, [], lambda cs: []), "failed", error=reason)
            self._record((unit.index,), res)
            st.accounting.check()
            return []
        for n, job in enumerate(jobs):
            if unit.chunk is not None:
                job.meta.setdefault("chunk", unit.chunk)
            if not job.order:
                job.order = (unit.chunk or 0, n)
            self._opened(job, unit.index)
        return jobs

    def _opened(self, job: Job, expected: int) -> None:
        """Count ``job`` open for its row (made for row ``expected``: another row stops writing
        rows before the end)."""
        if job.row != expected:
            if job.row < self.cursor:
                raise StageError(f"stage {self.stage.step_name!r}: a job for row {job.row}, which was "
                                 "already written; jobs and follow-ups must be for their own row")
            self.in_order = False
        self.open[job.row] = self.open.get(job.row, 0) + 1

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _submit(self, stream: Any, job: Job) -> None:
        if not job.requests:
            self._closed(job.row)   # nothing to ask: the job gives nothing
            return
        jid = self._next_seq()
        self.live[jid] = (job, [None] * len(job.requests))
        for k, r in enumerate(job.requests):
            stream.submit((jid, k), r)

    def _closed(self, row: int) -> None:
        left = self.open.get(row, 0) - 1
        if left > 0:
            self.open[row] = left
        else:
            self.open.pop(row, None)

    def _record(self, key: tuple, res: "JobResult | _Out") -> None:
        entry = (key, self._next_seq(), res)
        self.by_row.setdefault(key[0], []).append(entry)
        if isinstance(res, JobResult):
            self.failures.append(entry)  # type: ignore[arg-type]

    def _finished(self, res: JobResult) -> None:
        job = res.job
        if res.status != "ok":
            self._record((job.row, *job.order), res)
        elif job.emit:
            self._record((job.row, *job.order), self._out(res))
        if job.then is not None:
            follow = job.then(res)
            for n, f in enumerate(follow):
                if not f.order:
                    f.order = (*job.order, n)
                self._opened(f, job.row)
            self.todo.extendleft(reversed(follow))  # before new rows: finish what was started
        self._closed(job.row)

    def _out(self, res: JobResult) -> "_Out":
        """An "ok" emitting job's contribution to the output: synthetic stages, one dict per parsed
        row with the provenance columns (the id is given when the row is written); annotation
        stages, the parsed rows merged with the provenance column."""
        st = self.stage
        if st.synthetic:
            if not res.rows:
                return _Out(res.job.row, [])
            prov = st.provenance(self.rows[res.job.row], res)
            return _Out(res.job.row, [{**prov, **d} for d in res.rows])
        d: dict[str, Any] = {}
        for r in res.rows:
            d.update(r)
        d[st.provenance_column()] = st.annotation_provenance(res)
        return _Out(res.job.row, [d])

    def _resolve(self, job: Job, cs: list[Completion]) -> None:
        st = self.stage
        acc = st.accounting
        doc = self.rows[job.row].get("id")
        acc.record([c for c in cs if not c.denied], count_failures=False, retry=job.attempt > 0)
        if any(c.denied for c in cs):
            self._finished(JobResult(job, "deferred", completions=cs, error="budget"))
            return
        bad = [c for c in cs if not c.ok]
        if bad:
            err = bad[0].error or "failed"
            transient = all(c.transient for c in bad)
            acc.request_failed(doc, err, transient=transient)
            self._finished(JobResult(job, "deferred" if transient else "failed", completions=cs, error=err))
            acc.check()
            return
        try:
            st.check_answers(job, cs)
            rows = job.parse(cs)
            if not rows and job.emit and job.then is None and st.synthetic:
                raise ParseError("no_output", "the answer gave no output row")
        except DropAnswer as exc:
            st.drop(exc.reason)
            self._finished(JobResult(job, "ok", rows=[], completions=cs))
            return
        except ParseError as exc:
            if job.attempt < st.config.parse_retries:
                st.count("llm/parse_retries")
                self.todo.appendleft(st._retry(job))
                return
            acc.parse_failed(doc, f"{exc}; answer: {cs[0].text if cs else ''!r}"[:300], reason=exc.reason)
            self._finished(JobResult(job, "failed", completions=cs, error=f"parse/{exc.reason}: {exc.detail}"))
            acc.check()
            return
        self._finished(JobResult(job, "ok", rows=rows, completions=cs))

    # -- the batch's output --------------------------------------------------------------------------
    def _advance(self) -> None:
        """Write the rows that are final, in input order."""
        if not self.in_order:
            return
        if len(self.empty) > self.empty_seen:
            self.empty_set.update(self.empty[self.empty_seen:])
            self.empty_seen = len(self.empty)
        open_, frontier = self.open, self.frontier
        while self.cursor < frontier and self.cursor not in open_:
            self._write(self.cursor)
            self.cursor += 1

    def _write(self, i: int) -> None:
        """Row ``i``'s outputs (its jobs all finished), as the end of the table would make them."""
        st = self.stage
        entries = self.by_row.pop(i, None)
        if entries is None:
            entries = []
        elif len(entries) > 1:
            entries.sort(key=itemgetter(0, 1))
        if st.synthetic:
            k = 0
            name = st.recipe or st.name
            source = self.rows[i].get("id")
            for _, _, res in entries:
                if isinstance(res, _Out):
                    for d in res.dicts:
                        d["id"] = f"{source}#{name}-{k}"
                        self.outputs.append((i, d))
                        k += 1
            if k:
                self.produced += 1
            return
        failed: JobResult | None = None
        merged: dict[str, Any] | None = None
        for _, _, res in entries:
            if isinstance(res, JobResult):
                if res.status == "deferred":
                    return   # the row is left for the next run
                if failed is None and res.status == "failed":
                    failed = res
            elif merged is None:
                merged = res.dicts[0]
            else:
                merged.update(res.dicts[0])
        if failed is not None:
            d = st.failed_row(self.rows[i], failed)
        elif merged is not None:
            d = merged
            self.produced += 1
        elif i in self.empty_set:
            d = st.empty_row(Unit(i, self.rows[i]))
        else:
            return
        if d is not None:
            self.outputs.append((i, d))

    def _output(self) -> pa.Table:
        st = self.stage
        rows, table = self.rows, self.table
        self.failures.sort(key=itemgetter(0, 1))
        results = [r for _, _, r in self.failures]   # the jobs that did not end "ok", in order
        deferred_budget = {r.job.row for r in results if r.status == "deferred" and r.error == "budget"}
        transient = [r for r in results if r.status == "deferred" and r.error != "budget"]
        deferred = deferred_budget | {r.job.row for r in transient}
        if deferred_budget:
            log.warning("%s: budget reached (%s); rows left for the next run (raise the budget and run "
                        "again to continue)", st.step_name, st.budget.describe() if st.budget else "")
            st.defer("budget", len(deferred_budget), detail=st.budget.describe() if st.budget else "")
        rows_transient = {r.job.row for r in transient} - deferred_budget
        if rows_transient:
            st.defer("llm_request", len(rows_transient), detail=transient[0].error)
        # failed jobs (request errors, no parse after retries) to the side output, with the raw answer
        bad = [r for r in results if r.status != "ok" and r.error != "budget"]
        if bad:
            side = table.take(pa.array([r.job.row for r in bad], pa.int64()))
            side = side.append_column("llm_error", pa.array([r.error for r in bad], pa.string()))
            raw = [r.completions[0].text if r.completions and r.completions[0] is not None else None for r in bad]
            side = side.append_column("llm_answer", pa.array(raw, pa.string()))
            st.side("failed", side)
        outputs, self.outputs = self.outputs, []
        if st.synthetic:
            if self.empty:
                st.drop("empty_text", len(self.empty))
            out = st.assemble(table, outputs)
        else:
            if st.count_scored:
                st.count(f"{st.name}/scored", self.produced)
            pcol = st.provenance_column()
            if pcol not in st.writes:
                st.writes = {**st.writes, pcol: pa.string()}
            out = st.assemble(table, outputs)
            out = st.finish_table(table, out, [i for i, _ in outputs])
        self._check_yield(len(rows) - len(deferred), self.produced, results)
        return out

    def _check_yield(self, n_in: int, produced: int, results: list[JobResult]) -> None:
        st = self.stage
        min_yield = st.config.min_yield
        if min_yield is None:
            min_yield = 0.5 if st.synthetic else 0.0
        if n_in <= 0 or produced >= min_yield * n_in:
            return
        st.count("warnings/low_yield")
        reasons = Counter(r.error.split(":")[0] for r in results if r.status == "failed")
        drops = {k[len("dropped/"):]: v for k, v in st.counters.data.items() if k.startswith("dropped/")}
        log.warning("%s: only %d of %d input rows produced output (min_yield %.2f); failed: %s; dropped: %s",
                    st.step_name, produced, n_in, min_yield,
                    ", ".join(f"{k} {v}" for k, v in reasons.most_common(5)) or "none",
                    ", ".join(f"{k} {v:g}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])[:5]) or "none")
