"""``rc_llm``: the LLM mode of ``reading_comprehension`` (AdaptLLM output format, LLM-written tasks).

    - rc_llm:
        engine: {kind: vllm, model: /models/qwen2.5-7b-instruct}
        domain: biomedicine
        max_pairs: 5
        mined_tasks: false        # true: the regex miner's tasks too, in the same block list

The document is split and cut exactly as ``reading_comprehension`` does (title = first line, body
cut to ``max_body_tokens``); the engine is asked for ``max_pairs`` question-answer pairs about the
body (prompt ``reading_comprehension/llm_qa``), parsed from ``Question:``/``Answer:`` lines. The
pairs (at most ``max_pairs``; a pair cut by ``max_tokens`` is dropped) are rendered with the
``reading_comprehension/qa`` template set and become one task block, assembled with
``reading_comprehension``'s own code: shuffled with the mined blocks (``mined_tasks``), after an
intro line, with the same title/completion wrapping, every choice seeded by the document id (and
``seed``, default 0). Output columns as ``reading_comprehension``: ``output_column`` (the text),
``source_text_column``, ``rc_llm_pairs`` (pairs used), ``rc_summarize``, ``rc_completion`` and,
with ``mined_tasks``, the ``rc_<sub-type>`` counts.

An answer without a pair is asked again (``parse_retries``), then counted ``errors/parse/no_qa_pairs``
and saved in the side output ``failed``; the document is still written, with the mined tasks only
(``rc_llm_pairs`` = 0), or dropped with ``on_error: drop``. Empty documents pass through
(``reading_comprehension/empty``).

Library call::

    RcLlm(engine={"kind": "transformers"}, domain="chemistry")(table)
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, create_model

from curate.engines import Completion
from curate.llm.parse import parse_qa_pairs
from curate.llm.stage import Job, JobResult, LLMStage, LLMStageConfig, Unit
from curate.pipeline.api import StageError, register, set_column as _set_column
from curate.stages.synth.reading_comprehension import ReadingComprehension, ReadingComprehensionConfig
from curate.text.adaptllm import SUBTYPES

# reading_comprehension's own options (``seed`` is the LLM layer's: None means 0 for the choices)
RC_OPTIONS = ("domain", "text_column", "id_column", "output_column", "source_text_column", "title",
              "title_column", "max_body_tokens", "tokenizer", "words_per_token",
              "max_per_subtype", "keywords", "exact_reference")
_Base = create_model("_RcLlmBase", __base__=LLMStageConfig,  # type: ignore[call-overload]
                     **{k: (ReadingComprehensionConfig.model_fields[k].annotation,
                            ReadingComprehensionConfig.model_fields[k]) for k in RC_OPTIONS})


class RcLlmConfig(_Base):  # type: ignore[misc, valid-type]
    template: str = Field("reading_comprehension/llm_qa", description="chat template asking for the pairs")
    max_pairs: int = Field(5, ge=1, le=50, description="question-answer pairs asked for (and kept) per document")
    mined_tasks: bool = Field(False, description="also append the regex miner's tasks")
    columns: list[str] = Field(default_factory=list, description="extra row columns the template may use")
    max_tokens: int = Field(512, ge=1)
    on_error: Literal["keep", "drop"] = Field("keep", description="documents without pairs: keep (mined tasks only) or drop")
    batch_size: int = Field(64, ge=1)


@register
class RcLlm(LLMStage):
    """Reading comprehension with LLM-written question-answer pairs, in reading_comprehension's output format."""

    name = "rc_llm"
    recipe = "rc_llm"
    Config = RcLlmConfig
    synthetic = False
    reads = ("{text_column}", "{id_column}")
    provided_variables = frozenset({"text", "title", "domain", "max_pairs"})

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.config
        rc = {k: getattr(cfg, k) for k in RC_OPTIONS}
        rc["prompts_dir"] = cfg.prompts_dir   # one folder for the template sets and the chat template
        self.rc = ReadingComprehension(rc, seed=cfg.seed or 0)
        self.count_columns = ([f"rc_{s}" for s in SUBTYPES] if cfg.mined_tasks else []) + \
            ["rc_llm_pairs", "rc_summarize", "rc_completion"]
        self.writes = {cfg.output_column: pa.string(), **{c: pa.int32() for c in self.count_columns},
                       self.provenance_column(): pa.string()}

    def input_columns(self) -> tuple[str, ...]:
        cols = super().input_columns()
        return cols + ((self.config.title_column,) if self.config.title_column else ())

    def template_ids(self) -> list[str]:
        return [self.config.template]

    def check(self) -> list[tuple[str, str]]:
        return super().check() + self.rc.check()

    def fingerprint_extra(self) -> str:
        return f"{super().fingerprint_extra()}|{self.rc.fingerprint_extra()}|qa:{self.qa_templates()[1]}"

    def qa_templates(self) -> tuple[list[list[str]], int]:
        """The pair renderings (``reading_comprehension/qa``: the ``prompts_dir`` folder's, else ours)."""
        from curate.prompts import PromptError, load_prompt

        folder = self.config.prompts_dir
        try:
            data = load_prompt("reading_comprehension/qa", folder) if folder else None
        except PromptError:
            data = None
        data = data or load_prompt("reading_comprehension/qa")
        items = data.get("qa") or []
        if not items or any(not isinstance(t, list) or len(t) != 2 for t in items):
            raise StageError("rc_llm: reading_comprehension/qa needs a non-empty list 'qa' of [question, answer]")
        return items, int(data["version"])

    def setup(self) -> None:
        super().setup()
        self.rc.workdir, self.rc.step_name = self.workdir, self.step_name  # a trained keyword model goes there
        self.rc.ensure_setup()
        self.qa = self.qa_templates()[0]

    def parse_answer(self, completions: list[Completion]) -> list[dict[str, Any]]:
        pairs = parse_qa_pairs(completions[0].text or "")
        if completions[0].finish_reason == "length" and len(pairs) > 1:
            pairs = pairs[:-1]  # the last pair may be cut short
            self.count("rc_llm/truncated")
        return [{"pairs": pairs[: self.config.max_pairs]}]

    def render(self, doc_id: str, title: str | None, body: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        """The output columns of one document from its LLM pairs (and mined tasks)."""
        cfg = self.config
        rng = self.rc.rng(doc_id)
        blocks, raw, sents = [], {}, None
        if cfg.mined_tasks:
            blocks, raw, used, sents = self.rc.mined_blocks(body, rng)
            for s, n in used.items():
                self.count(f"reading_comprehension/used/{s}", n)
        if pairs:
            examples = []
            for q, a in pairs:
                tq, ta = rng.choice(self.qa)
                examples.append(tq.format(question=q) + " " + ta.format(answer=a))
            blocks.append("\n\n".join(examples))
        else:
            self.count("reading_comprehension/no_tasks" if not blocks else "rc_llm/no_pairs")
        text, wrap = self.rc.assemble(title, body, blocks, rng, sents)
        self.count(f"reading_comprehension/wrap/{wrap}")
        self.count("rc_llm/pairs", len(pairs))
        out = {cfg.output_column: text, "rc_llm_pairs": len(pairs),
               "rc_summarize": int(wrap in ("summarize", "summarize_completion")),
               "rc_completion": int(wrap in ("completion", "summarize_completion"))}
        if cfg.mined_tasks:
            out.update({f"rc_{s}": raw.get(s, 0) for s in SUBTYPES})
        return out

    def jobs(self, unit: Unit) -> list[Job]:
        cfg = self.config
        row = unit.row
        doc_id = row.get(cfg.id_column)
        if doc_id is None:
            raise StageError(f"rc_llm: a document has no {cfg.id_column!r}; ids seed the output")
        title, body = self.rc.prepare(str(row[cfg.text_column]), row.get(cfg.title_column) if cfg.title_column else None)
        req = self.ask(cfg.template, row=row, text=body, title=title or "", domain=cfg.domain, max_pairs=cfg.max_pairs)
        return [Job(unit.index, [req],
                    lambda cs: [self.render(str(doc_id), title, body, self.parse_answer(cs)[0]["pairs"])],
                    self.template(cfg.template), {"title": title, "body": body})]

    def empty_row(self, unit: Unit) -> dict[str, Any] | None:
        self.count("reading_comprehension/empty")
        return {self.config.output_column: unit.row.get(self.config.text_column),
                **{c: 0 for c in self.count_columns}}

    def failed_row(self, row: dict[str, Any], result: JobResult) -> dict[str, Any] | None:
        """No pairs after the retries: the document with the mined tasks only, or dropped."""
        if self.config.on_error == "drop":
            self.drop("llm_failed")
            return None
        m = result.job.meta
        return self.render(str(row.get(self.config.id_column)), m["title"], m["body"], [])

    def finish_table(self, table: pa.Table, out: pa.Table, kept: list[int]) -> pa.Table:
        cfg = self.config
        if cfg.source_text_column:
            src = table.take(pa.array(kept, pa.int64())).column(cfg.text_column)
            out = _set_column(out, cfg.source_text_column, src)
        return out
