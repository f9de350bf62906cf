"""A minimal stage on the LLM layer, used by the layer tests: JSON facts, one output row each."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
from pydantic import Field

from curate.llm.parse import ParseError, parse_json_object, string_list
from curate.llm.stage import LLMStage, LLMStageConfig
from curate.pipeline.stage import register


class FactsConfig(LLMStageConfig):
    template: str = "facts/list"
    columns: list[str] = Field(default_factory=list)


@register
class Facts(LLMStage):
    """Test stage: a JSON list of facts per document, one row per fact."""

    name = "test_facts"
    recipe = "facts"
    Config = FactsConfig
    reads = ("text",)
    writes = {"text": pa.string()}
    provided_variables = frozenset({"text"})

    def template_ids(self) -> list[str]:
        return [self.config.template]

    def requests(self, row: dict[str, Any]):
        if not row["text"]:
            return []
        return [self.ask(self.config.template, row=row, text=row["text"])]

    def parse(self, row, completions):
        obj = parse_json_object(completions[0].text, required={"facts": list})
        facts = string_list(obj["facts"])
        if not facts:
            raise ParseError("no_facts", "empty list")
        return [{"text": f} for f in facts]


def facts_answer(body: dict) -> str:
    """A well-formed answer for ``facts/list`` (the words of the document as facts)."""
    msg = body["messages"][-1]["content"]
    doc = msg.split("DOCUMENT:", 1)[1].strip()
    return "Here you go:\n```json\n" + json.dumps({"facts": doc.split()[:3]}) + "\n```"
