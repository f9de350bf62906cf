"""``generate``: one LLM completion per row, from a prompt column or a template over the row.

    - generate:
        engine: {kind: transformers}            # or {kind: vllm, model: ...} / {kind: openai, ...}
        template: "Summarize:\\n{text}"
        system: "You are a concise assistant."
        max_tokens: 128

Adds ``<output_column>`` (the text), ``<output_column>_finish_reason`` ("stop", "length"),
``<output_column>_prompt_tokens`` and ``<output_column>_tokens``. Built on the LLM stage layer
(:mod:`curate.llm.stage`): answers are cached in SQLite in the stage's work folder (keyed by engine,
model, prompt and sampling parameters), so a resumed run does not generate them again; budgets and
the engine sharing work as for every LLM stage. A request that fails for good (a bad prompt, HTTP
4xx) is counted under ``llm/failed`` and ``errors/llm/...``, saved with its reason in the side
output ``failed``, and its row is dropped (``on_error: drop``) or kept with a null completion
(``on_error: keep``); a request that failed transiently (timeouts, HTTP 5xx after the engine's
retries) is also deferred: the next plain run retries it. When more than ``max_failure_rate`` of
the requests fail, the stage stops with an error.

Library call::

    Generate(engine={"kind": "transformers"}, template="Summarize:\\n{text}", max_tokens=64)(table)
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate.engines import Completion, Request
from curate.llm.stage import JobResult, LLMStage, LLMStageConfig
from curate.pipeline.api import register


class GenerateConfig(LLMStageConfig):
    prompt_column: str | None = Field(
        None, description="column holding the prompt (default: 'text' when no template is given)")
    template: str | None = Field(None, description="prompt template over row columns, e.g. 'Summarize:\\n{text}'")
    template_style: Literal["format", "dollar"] = Field(
        "format", description="format: Python str.format ({col}); dollar: string.Template ($col)")
    system: str | None = Field(None, description="system prompt (chat mode)")
    chat: bool = Field(True, description="send chat messages (chat template applied); false: raw prompt")
    output_column: str = Field("completion", description="name of the completion column (and prefix of the others)")
    batch_size: int = Field(64, ge=1, description="local engines: requests per engine call")
    on_error: Literal["drop", "keep"] = Field("drop", description="rows whose request failed: drop or keep (null)")
    parse_retries: int = Field(0, ge=0, description="(generate accepts every answer)")

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "GenerateConfig":
        if self.prompt_column and self.template:
            raise ValueError("give either 'prompt_column' or 'template', not both")
        return self


def template_fields(template: str, style: str) -> list[str]:
    if style == "dollar":
        t = string.Template(template)
        names = t.get_identifiers() if hasattr(t, "get_identifiers") else []
        return list(dict.fromkeys(names))
    out = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None and field != "":
            name = field.split(".")[0].split("[")[0]
            if name and not name.isdigit():
                out.append(name)
    return list(dict.fromkeys(out))


@register
class Generate(LLMStage):
    """Generate one LLM completion per row (prompt column or template) with any engine; cached."""

    name = "generate"
    Config = GenerateConfig
    synthetic = False
    invalid_prompt_errors = (KeyError, ValueError, IndexError, TypeError)  # a row that cannot be a prompt
    writes = {"completion": pa.string(), "completion_finish_reason": pa.string(),
              "completion_prompt_tokens": pa.int32(), "completion_tokens": pa.int32()}

    def input_columns(self) -> tuple[str, ...]:
        cfg = self.config
        if cfg.template:
            return tuple(template_fields(cfg.template, cfg.template_style))
        return (cfg.prompt_column or "text",)

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        oc = self.config.output_column
        self.out_cols = {"text": oc, "finish": f"{oc}_finish_reason",
                         "prompt_tokens": f"{oc}_prompt_tokens", "tokens": f"{oc}_tokens"}
        self.writes = {oc: pa.string(), f"{oc}_finish_reason": pa.string(),
                       f"{oc}_prompt_tokens": pa.int32(), f"{oc}_tokens": pa.int32(),
                       self.provenance_column(): pa.string()}
        self.params = self.sampling()

    # -- work --------------------------------------------------------------------------------------
    def _prompt(self, row: dict[str, Any]) -> str:
        cfg = self.config
        if cfg.template:
            values = {c: row.get(c) for c in self.reads}
            nulls = [k for k, v in values.items() if v is None]
            if nulls:
                raise ValueError(f"null value in column(s) {nulls}")
            if cfg.template_style == "dollar":
                return string.Template(cfg.template).substitute(values)
            return cfg.template.format(**values)
        value = row[cfg.prompt_column or "text"]
        if value is None:
            raise ValueError("prompt is null")
        return str(value)

    def requests(self, row: dict[str, Any]) -> list[Request]:
        cfg = self.config
        prompt = self._prompt(row)
        if cfg.chat:
            msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else [])
            msgs.append({"role": "user", "content": prompt})
            return [Request(messages=msgs, params=self.params, id=row.get("id"))]
        text = f"{cfg.system}\n\n{prompt}" if cfg.system else prompt
        return [Request(prompt=text, params=self.params, id=row.get("id"))]

    def parse(self, row: dict[str, Any], completions: list[Completion]) -> list[dict[str, Any]]:
        c = completions[0]
        oc = self.out_cols
        return [{oc["text"]: c.text, oc["finish"]: c.finish_reason,
                 oc["prompt_tokens"]: c.prompt_tokens, oc["tokens"]: c.completion_tokens}]

    def failed_row(self, row: dict[str, Any], result: JobResult) -> dict[str, Any] | None:
        if self.config.on_error == "keep":
            return {self.out_cols["finish"]: "error"}
        self.drop("llm_failed")
        return None

    def provenance_column(self) -> str:
        return f"{self.config.output_column}_provenance"

    def prompt_hash(self) -> str:
        """The prompt is the ``template``/``system`` options (or a column): their content hash."""
        cfg = self.config
        blob = json.dumps([cfg.template, cfg.template_style, cfg.system, cfg.chat, cfg.prompt_column])
        return hashlib.sha256(blob.encode()).hexdigest()
