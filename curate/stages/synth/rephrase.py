"""``rephrase``: rephrased pre-training text in the styles peers ship (Nemotron-CC style tasks).

    - rephrase:
        style: wikipedia          # wikipedia | qa | knowledge_list  (prompt rephrase/<style>)
        max_tokens: 600
        context_tokens: 1600      # documents are chunked to fit context - max_tokens

Each style is a prompt file plus a little parsing:

- ``wikipedia``: the text rewritten in an encyclopedic style; the output row's text is the rewrite.
- ``qa``: diverse question-answer pairs; the output text is the original text followed by the pairs
  (at least one ``Question:``/``Answer:`` pair is required).
- ``knowledge_list``: the text's knowledge as a bullet list; the output text is the list.

Checks: the answer must start with the template's ``prefix`` (e.g. "Here is a paraphrased
version:"), which is removed; an answer without it is asked again (``parse_retries``, new seed) and
then counted ``errors/parse/wrong_prefix`` and saved in the side output ``failed``. An answer that
hit ``max_tokens`` is probably truncated and is dropped (``dropped/truncated``). One output row per
document chunk, with the provenance columns.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate.engines import Completion, Request
from curate.llm.parse import ParseError, parse_bullets
from curate.llm.stage import DropAnswer, LLMStage, LLMStageConfig
from curate.pipeline.api import register

_QA = re.compile(r"^\s*(?:\*\*)?Question\s*\d*\s*:(?:\*\*)?\s*\S.*?^\s*(?:\*\*)?Answer\s*\d*\s*:(?:\*\*)?\s*\S",
                 re.S | re.M | re.I)


class RephraseConfig(LLMStageConfig):
    style: Literal["wikipedia", "qa", "knowledge_list"] = Field("wikipedia", description="rephrasing style")
    template: str | None = Field(None, description="prompt template id (default: rephrase/<style>)")
    text_column: str = "text"
    columns: list[str] = Field(default_factory=list, description="extra row columns the template may use")
    max_tokens: int = Field(600, ge=1)
    context_tokens: int = Field(1600, ge=64, description="prompt + answer tokens; longer documents are chunked")
    keep_truncated: bool = Field(False, description="keep answers that hit max_tokens (default: drop them)")


@register
class Rephrase(LLMStage):
    """Rephrase documents with an LLM: Wikipedia-style paraphrase, appended QA pairs or a knowledge list."""

    name = "rephrase"
    recipe = "rephrase"
    Config = RephraseConfig
    reads = ("{text_column}",)
    writes = {"text": pa.string(), "style": pa.string()}
    provided_variables = frozenset({"text"})
    chunked = True  # one request per chunk: row[text_column] is the chunk

    def template_ids(self) -> list[str]:
        return [self.config.template or f"rephrase/{self.config.style}"]

    def requests(self, row: dict[str, Any]) -> list[Request]:
        return [self.ask(self.template_ids()[0], row=row, text=row[self.config.text_column])]

    def parse(self, row: dict[str, Any], completions: list[Completion]) -> list[dict[str, Any]]:
        cfg = self.config
        c = completions[0]
        answer = (c.text or "").strip()
        if c.finish_reason == "length" and not cfg.keep_truncated:
            raise DropAnswer("truncated")
        prefix = (self.template(self.template_ids()[0]).prefix or "").strip()
        if prefix:
            if not answer.lower().startswith(prefix.lower()):
                raise ParseError("wrong_prefix", f"the answer does not start with {prefix!r}")
            answer = answer[len(prefix):].strip()
        if not answer:
            raise ParseError("empty_answer", "nothing after the prefix")
        if cfg.style == "knowledge_list":
            text = "\n".join(f"- {item}" for item in parse_bullets(answer))
        elif cfg.style == "qa":
            if not _QA.search(answer):
                raise ParseError("no_qa_pairs", "no 'Question: ... Answer: ...' pair")
            text = f"{row[cfg.text_column]}\n\n{answer}"
        else:
            text = answer
        return [{"text": text, "style": cfg.style}]
