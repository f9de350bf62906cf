"""``prox_refine``: ProX (Programming Every Example) -- a model writes a small program per document,
and :mod:`curate.text.prox` runs it.

    - prox_refine:                      # 1. keep or drop whole documents
        level: doc
        engine: {kind: vllm, model: /models/web-doc-refining-lm}
    - prox_refine:                      # 2. remove noisy lines, fix strings
        level: chunk
        engine: {kind: vllm, model: /models/web-chunk-refining-lm}

- ``level: doc``: one request per document; the answer is ``keep_doc()`` or ``drop_doc()`` (an
  answer containing "drop" drops the document, as the reference). Dropped: ``dropped/prox_drop_doc``.
- ``level: chunk``: the document's lines are numbered ``[000]...`` and cut into chunks of at most
  ``chunk_tokens`` (1,500) tokens on line boundaries (tokens as the reference counts them: the
  engine tokenizer's ``encode`` of each numbered line; an engine without a tokenizer, ``openai``,
  uses its estimate); one request per chunk; the answers
  (``remove_lines(line_start=.., line_end=..)``, ``normalize(source_str="..", target_str="..")``,
  ``keep_chunk()`` lines) are joined into one program and executed on the whole document with the
  reference's rules (``threshold_1``, ``threshold_2``, ``error_op``, the 10-word rule; see
  :mod:`curate.text.prox`). Dropped: ``dropped/prox_mostly_removed``, ``dropped/prox_short``.

``format: prox`` sends the refining models' own request (prompt files ``prox/doc``,
``prox/chunk``: the reference's system prompt, the raw document / ``[doc]\\n<chunk>\\n[/doc]``;
greedy, top_p 0.9, 2,000 / 256 new tokens as the reference). The chunk request goes as chat
messages (the engine applies the model's chat template, as the reference). The document request
is one prompt string in the Llama-2 chat format the reference renders it with
(``meta-llama/Llama-2-7b-chat-hf``'s template, BOS included, sent without another BOS: the
template file's ``raw_prompt``, ``chat: auto``); documents longer than ``doc_prompt_tokens``
(2,000, the reference's truncation) are cut to their head in the request (counted
``prox_refine/cut_docs``; the reference cuts the rendered request, ``[/INST]`` included), and the
decision applies to the whole document. ``format: instruct`` asks any instruct model with our few-shot
prompts (``prox/doc_instruct``, ``prox/chunk_instruct``); ``template`` names another file.

A malformed program never fails a row: the executor counts its error operations (too many and the
program is ignored, the document kept as it was), unknown lines are ignored. With ``strict: true``
an answer with no operation at all is a parse error (``errors/parse/no_operation``): asked again
(``parse_retries``), then saved in the side output ``failed``.

With ``save_dropped: true`` the dropped documents go to the side output ``dropped`` (``id``, the
text, ``drop_reason``, the program).

Output rows: the refined text in ``text_column``, the program in ``prox_<level>_program`` (the
joined chunk programs), ``prox_<level>_decision`` (doc: ``keep``; chunk: ``refined``, ``unchanged``
or ``ignored``), for chunks ``prox_chunk_error_ops`` and ``prox_chunk_removed_lines``, and the
provenance columns of every LLM stage (``source_id`` = the input id; the row's id becomes
``<id>#prox-0``).

Counters: ``prox_refine/ops/<kind>`` (``keep_doc``, ``drop_doc``, ``other``; ``remove_lines``,
``remove_all``, ``normalize``, ``keep_chunk``, ``unknown``; ``too_long``: a normalisation not
applied because the text would outgrow :func:`curate.text.prox.growth_limit`, also an error
operation), ``prox_refine/error_ops``,
``prox_refine/docs_with_error_ops``, ``prox_refine/refined``, ``prox_refine/unchanged``,
``prox_refine/program_ignored``, ``prox_refine/removed_lines``, ``prox_refine/removed_chars``
(characters of the removed lines, with their newlines, in refined documents),
``prox_refine/normalizations`` (normalize operations run in refined documents), ``prox_refine/chars_in`` / ``chars_out`` (documents
answered / kept), ``prox_refine/chunks``, ``prox_refine/chunked_docs``,
``prox_refine/truncated_programs`` (an answer that hit ``max_tokens``), ``dropped/empty_text``.

Library call::

    ProxRefine(level="chunk", format="instruct", engine={"kind": "transformers"})(table)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate.engines import Completion, Request
from curate.llm.chunking import cut_text
from curate.llm.parse import ParseError
from curate.llm.prompts import TemplateError, load_template
from curate.llm.stage import PROVENANCE, DropAnswer, LLMStage, LLMStageConfig
from curate.pipeline.api import StageError, register
from curate.text import prox

_CHUNK_OPS = ("remove_lines", "remove_all", "normalize", "keep_chunk")


@lru_cache(maxsize=32)
def _jinja(source: str) -> Any:
    """A compiled Jinja template that keeps its text as written (no stripping, no escaping)."""
    from jinja2 import Environment, StrictUndefined

    return Environment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False).from_string(source)


class ProxRefineConfig(LLMStageConfig):
    min_yield: float | None = Field(0.0, ge=0.0, le=1.0, description="dropping documents is what this stage is "
                                    "for: no low-yield warning by default (set a fraction to get one)")
    level: Literal["doc", "chunk"] = Field(
        "chunk", description="doc: keep_doc()/drop_doc() per document; chunk: line programs per chunk")
    format: Literal["prox", "instruct"] = Field(
        "prox", description="prox: the ProX refining models' own request; instruct: any instruct model, few-shot")
    template: str | None = Field(
        None, description="prompt template id (default: prox/<level> for prox, prox/<level>_instruct)")
    text_column: str = Field("text", description="column with the document (replaced by the refined text)")
    chunk_tokens: int = Field(1500, ge=16, description="chunk level: tokens of numbered lines per request")
    line_digits: int = Field(3, ge=1, le=12, description="chunk level: zero-padded width of line numbers ([000])")
    doc_prompt_tokens: int = Field(
        2000, ge=64, description="doc level: longer requests keep the head of the document (the reference truncates at 2000)")
    threshold_1: float = Field(
        0.0, ge=0.0, le=1.0, description="apply a program only when the result keeps at least this share of the words")
    threshold_2: float = Field(
        0.95, ge=0.0, le=1.0, description="drop the document when the program removes at least this share of the words")
    error_op: int = Field(
        2, ge=1, description="this many error operations (unparseable, out-of-range) make the program ignored")
    chat: Literal["auto", "messages", "raw"] = Field(
        "auto", description="raw: one prompt string from the template's raw_prompt (prox/doc: the Llama-2 chat "
                            "format of the reference, BOS included); messages: chat messages, the engine applies "
                            "its chat template; auto: raw when the template has a raw_prompt")
    bos: str = Field("<s>", description="the BOS string a raw_prompt starts with (Llama-2: <s>)")
    save_dropped: bool = Field(False, description="side output 'dropped': dropped documents with drop_reason and program")
    strict: bool = Field(
        False, description="an answer without any operation is a parse error (retried, then saved in 'failed')")
    batch_size: int = Field(64, ge=1, description="documents whose requests go to the engine in one call")
    max_tokens: int = Field(256, ge=1, description="new tokens per request (default: 256 per chunk; per document "
                                                   "2000 with format prox as the reference, 16 with instruct)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass (default 0.9 with format prox, as the reference)")

    @model_validator(mode="after")
    def _reference_sampling(self) -> "ProxRefineConfig":
        if "max_tokens" not in self.model_fields_set:
            # the reference: 2000 new tokens for documents, 256 per chunk; an instruct model's
            # keep_doc()/drop_doc() needs a few
            self.max_tokens = 256 if self.level == "chunk" else (2000 if self.format == "prox" else 16)
        if "top_p" not in self.model_fields_set and self.format == "prox":
            self.top_p = 0.9
        return self


@register
class ProxRefine(LLMStage):
    """ProX refining: a model writes a program per document (keep/drop, or remove_lines/normalize per chunk), executed as the reference."""

    name = "prox_refine"
    # programs are short commands: a real answer is often exactly a worked example's (keep_doc(),
    # remove_lines(...) of a navigation header), so answers are not checked for echoed examples
    check_echo = False
    recipe = "prox"
    Config = ProxRefineConfig
    reads = ("{text_column}",)
    provided_variables = frozenset({"text"})

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.config
        lv = cfg.level
        self.columns = {"program": f"prox_{lv}_program", "decision": f"prox_{lv}_decision",
                        "error_ops": f"prox_{lv}_error_ops", "removed_lines": f"prox_{lv}_removed_lines"}
        writes: dict[str, pa.DataType] = {cfg.text_column: pa.string(), self.columns["program"]: pa.string(),
                                          self.columns["decision"]: pa.string()}
        if lv == "chunk":
            writes[self.columns["error_ops"]] = pa.int32()
            writes[self.columns["removed_lines"]] = pa.int32()
        self.writes = {**writes, **PROVENANCE}

    @property
    def template_id(self) -> str:
        cfg = self.config
        return cfg.template or (f"prox/{cfg.level}" if cfg.format == "prox" else f"prox/{cfg.level}_instruct")

    def template_ids(self) -> list[str]:
        return [self.template_id]

    # -- requests ----------------------------------------------------------------------------------
    def check(self) -> list[tuple[str, str]]:
        problems = super().check()
        if self.config.chat == "raw":
            try:
                t = load_template(self.template_id, self.config.prompts_dir)
            except TemplateError:
                return problems  # reported by the base class
            if not t.extra.get("raw_prompt"):
                problems.append(("chat", f"template {t.id!r} ({t.path}) has no raw_prompt for chat: raw"))
        return problems

    def _raw(self) -> str | None:
        """The template's ``raw_prompt`` when requests are one prompt string (``chat``)."""
        t = self.template(self.template_id)
        raw = t.extra.get("raw_prompt")
        if self.config.chat == "messages":
            return None
        if self.config.chat == "raw" and not raw:
            raise StageError(f"stage {self.step_name!r}: template {t.id!r} has no raw_prompt (chat: raw)")
        return str(raw) if raw else None

    def _request(self, row: dict[str, Any], text: str) -> Request:
        raw = self._raw()
        if raw is None:
            return self.ask(self.template_id, row=row, text=text)
        t = self.template(self.template_id)
        variables = {"text": text, **{c: row.get(c) for c in self.extra_columns()}}
        system = _jinja(t.system).render(**variables).strip() if t.system else ""
        user = _jinja(t.user).render(**variables)  # unstripped: the raw_prompt says what is cut
        prompt = _jinja(raw).render(bos=self.config.bos, system=system, user=user)
        return Request(prompt=prompt, params=self.sampling(), id=row.get("id"), add_special_tokens=False)

    def _token_counter(self) -> Any:
        tok = self.engine.hf_tokenizer()
        if tok is not None:
            return lambda s: len(tok.encode(s))  # as the reference (special tokens included)
        return self.engine.count_tokens

    def _doc_text(self, text: str) -> str:
        """The document as the document model sees it: its head when the request would be too long."""
        empty = self._request({}, "")
        if empty.prompt is not None:
            overhead = self.engine.count_tokens(empty.prompt)
        else:
            overhead = sum(self.engine.count_tokens(m["content"]) + 4 for m in empty.messages or ())
        budget = max(16, self.config.doc_prompt_tokens - overhead)
        out, cut = cut_text(text, budget, tokenizer=self.engine.hf_tokenizer(), count=self.engine.count_tokens,
                            keep="head", marker="")
        if cut:
            self.count(f"{self.name}/cut_docs")
        return out

    def requests(self, row: dict[str, Any]) -> list[Request]:
        cfg = self.config
        text = row.get(cfg.text_column)
        if text is None or not str(text).split():
            self.drop("empty_text")
            return []
        text = str(text)
        if cfg.level == "doc":
            return [self._request(row, self._doc_text(text))]
        chunks = prox.chunk_lines(text, self._token_counter(), cfg.chunk_tokens, cfg.line_digits)
        self.count(f"{self.name}/chunks", len(chunks))
        if len(chunks) > 1:
            self.count(f"{self.name}/chunked_docs")
        return [self._request(row, c) for c in chunks]

    # -- answers -----------------------------------------------------------------------------------
    def parse(self, row: dict[str, Any], completions: list[Completion]) -> list[dict[str, Any]]:
        cfg = self.config
        text = str(row[cfg.text_column])
        answers = [c.text or "" for c in completions]
        if cfg.level == "doc":
            return self._parse_doc(row, text, answers[0].strip(" "), completions)
        return self._parse_chunks(row, text, answers, completions)

    def _dropped(self, row: dict[str, Any], reason: str, program: str) -> list[dict[str, Any]]:
        """A document the program drops: a deliberate drop (``dropped/<reason>``, counted by the
        LLM base from ``DropAnswer``), not an answer that gave nothing."""
        if self.config.save_dropped:
            self.side("dropped", pa.table({
                "id": pa.array([row.get("id")], pa.string()),
                self.config.text_column: pa.array([str(row[self.config.text_column])], pa.string()),
                "drop_reason": pa.array([reason], pa.string()),
                self.columns["program"]: pa.array([program], pa.string())}))
        raise DropAnswer(reason)

    def _common(self, text: str, completions: list[Completion]) -> None:
        self.count(f"{self.name}/chars_in", len(text))
        self.count(f"{self.name}/truncated_programs", sum(c.finish_reason == "length" for c in completions))

    def _parse_doc(self, row: dict[str, Any], text: str, program: str,
                   completions: list[Completion]) -> list[dict[str, Any]]:
        kind = prox.doc_op_kind(program)
        if self.config.strict and kind == "other":
            raise ParseError("no_operation", "the answer is neither keep_doc() nor drop_doc()")
        self._common(text, completions)
        self.count(f"{self.name}/ops/{kind}")
        if not prox.doc_keeps(program):
            return self._dropped(row, "prox_drop_doc", program)
        self.count(f"{self.name}/chars_out", len(text))
        c = self.columns
        return [{self.config.text_column: text, c["program"]: program, c["decision"]: "keep"}]

    def _parse_chunks(self, row: dict[str, Any], text: str, answers: list[str],
                      completions: list[Completion]) -> list[dict[str, Any]]:
        cfg = self.config
        if cfg.strict:
            for k, a in enumerate(answers):
                if not any(prox.op_kind(op) in _CHUNK_OPS for op in a.strip(" ").split("\n")):
                    raise ParseError("no_operation", f"chunk {k}: no remove_lines/normalize/keep_chunk line")
        program = prox.join_programs(answers)
        res = prox.refine(text, program, cfg.threshold_1, cfg.threshold_2, cfg.error_op)
        self._common(text, completions)
        for kind, n in res.ops.items():
            if kind != "blank":
                self.count(f"{self.name}/ops/{kind}", n)
        self.count(f"{self.name}/error_ops", res.error_ops)
        if res.error_ops:
            self.count(f"{self.name}/docs_with_error_ops")
        if res.dropped:
            return self._dropped(row, f"prox_{res.decision}", program)
        decision = res.decision
        removed = 0
        if decision == "refined":
            removed = len(res.removed_lines)
            self.count(f"{self.name}/removed_lines", removed)
            self.count(f"{self.name}/removed_chars", sum(len(line) + 1 for line in res.removed_lines))
            self.count(f"{self.name}/normalizations", len(res.normalizations))
            if res.text == text:
                decision = "unchanged"
        self.count(f"{self.name}/{'program_ignored' if decision == 'ignored' else decision}")
        self.count(f"{self.name}/chars_out", len(res.text))
        c = self.columns
        return [{cfg.text_column: res.text, c["program"]: program, c["decision"]: decision,
                 c["error_ops"]: res.error_ops, c["removed_lines"]: removed}]
