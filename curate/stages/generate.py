"""``generate``: one LLM completion per row, from a prompt column or a template over the row.

    - generate:
        engine: {kind: transformers}            # or {kind: vllm, model: ...} / {kind: openai, ...}
        template: "Summarize:\\n{text}"
        system: "You are a concise assistant."
        max_tokens: 128

Adds ``<output_column>`` (the text), ``<output_column>_finish_reason`` ("stop", "length"),
``<output_column>_prompt_tokens`` and ``<output_column>_tokens``. Answers are cached in SQLite in
the stage's work folder (keyed by engine, model, prompt and sampling parameters), so a resumed run
does not generate them again. A request that fails (after the engine's retries) is counted under
``llm/failed`` and ``errors/llm/...``, saved with its reason in the side output ``failed``, and its
row is dropped (``on_error: drop``) or kept with a null completion (``on_error: keep``). When more
than ``max_failure_rate`` of the requests fail, the stage stops with an error.

Library call::

    Generate(engine={"kind": "transformers"}, template="Summarize:\\n{text}", max_tokens=64)(table)
"""

from __future__ import annotations

import os
import string
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from curate.engines import (EngineConfig, LLMAccounting, Request, RequestCache, SamplingParams,
                            make_engine, parse_engine_config)
from curate.pipeline.stage import MapStage, Resources, StageConfig, StageError, register


class GenerateConfig(StageConfig):
    engine: EngineConfig = Field(default_factory=lambda: parse_engine_config({"kind": "transformers"}),
                                 description="engine: {kind: transformers|vllm|openai, model: ..., ...}")
    prompt_column: str | None = Field(
        None, description="column holding the prompt (default: 'text' when no template is given)")
    template: str | None = Field(None, description="prompt template over row columns, e.g. 'Summarize:\\n{text}'")
    template_style: Literal["format", "dollar"] = Field(
        "format", description="format: Python str.format ({col}); dollar: string.Template ($col)")
    system: str | None = Field(None, description="system prompt (chat mode)")
    chat: bool = Field(True, description="send chat messages (chat template applied); false: raw prompt")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (deterministic)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in the output)")
    seed: int | None = Field(None, description="sampling seed (temperature > 0)")
    output_column: str = Field("completion", description="name of the completion column (and prefix of the others)")
    batch_size: int = Field(64, ge=1, description="rows sent to the engine at once")
    cache: bool = Field(True, description="cache answers in the stage work folder (runner) or cache_path")
    cache_path: str | None = Field(None, description="explicit SQLite cache file (also for library calls)")
    on_error: Literal["drop", "keep"] = Field("drop", description="rows whose request failed: drop or keep (null)")
    max_failure_rate: float = Field(0.5, ge=0.0, le=1.0, description="stop when more requests than this fail")
    min_requests: int = Field(8, ge=1, description="requests made before the failure rate is checked")

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v

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
class Generate(MapStage):
    """Generate one LLM completion per row (prompt column or template) with any engine; cached."""

    name = "generate"
    Config = GenerateConfig
    writes = {"completion": pa.string(), "completion_finish_reason": pa.string(),
              "completion_prompt_tokens": pa.int32(), "completion_tokens": pa.int32()}
    # the engine already isolates failing requests; a batch exception is a real problem
    isolate_errors = False

    def input_columns(self) -> tuple[str, ...]:
        cfg = self.config
        if cfg.template:
            return tuple(template_fields(cfg.template, cfg.template_style))
        return (cfg.prompt_column or "text",)

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.config
        oc = cfg.output_column
        self.out_cols = {"text": oc, "finish": f"{oc}_finish_reason",
                         "prompt_tokens": f"{oc}_prompt_tokens", "tokens": f"{oc}_tokens"}
        self.writes = {oc: pa.string(), f"{oc}_finish_reason": pa.string(),
                       f"{oc}_prompt_tokens": pa.int32(), f"{oc}_tokens": pa.int32()}
        if cfg.engine.kind == "vllm":
            self.resources = Resources(cpus=1.0, gpus=float(cfg.engine.tensor_parallel_size))
        self.params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                     stop=tuple(cfg.stop), seed=cfg.seed)
        self.engine: Any = None
        self.accounting = LLMAccounting(self, cfg.max_failure_rate, cfg.min_requests)

    # -- lifecycle ---------------------------------------------------------------------------------
    def check(self) -> list[tuple[str, str]]:
        eng = self.config.engine
        if eng.kind == "transformers":
            from curate.engines.transformers_engine import ModelNotFound, resolve_model

            try:
                resolve_model(eng.model, eng.gguf_file)
            except ModelNotFound as exc:
                return [("engine.model", str(exc))]
        elif eng.kind == "vllm" and not os.path.exists(os.path.expanduser(eng.model)):
            return [("engine.model", f"{eng.model!r} is not a local path")]
        return []

    def cache_file(self) -> str | None:
        cfg = self.config
        if cfg.cache_path:
            return cfg.cache_path
        if cfg.cache and self.workdir:
            return os.path.join(self.workdir, "llm_cache.sqlite")
        return None

    def setup(self) -> None:
        path = self.cache_file()
        try:
            self.engine = make_engine(self.config.engine, cache=RequestCache(path) if path else None)
        except (FileNotFoundError, ImportError) as exc:
            raise StageError(f"stage {self.step_name!r}: cannot start the {self.config.engine.kind} "
                             f"engine: {exc}") from exc

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self._is_setup = False

    # -- work --------------------------------------------------------------------------------------
    def _prompt(self, row: dict[str, Any]) -> str:
        cfg = self.config
        if cfg.template:
            nulls = [k for k, v in row.items() if v is None]
            if nulls:
                raise ValueError(f"null value in column(s) {nulls}")
            if cfg.template_style == "dollar":
                return string.Template(cfg.template).substitute(row)
            return cfg.template.format(**row)
        value = row[cfg.prompt_column or "text"]
        if value is None:
            raise ValueError("prompt is null")
        return str(value)

    def _request(self, prompt: str, doc_id: str | None) -> Request:
        cfg = self.config
        if cfg.chat:
            msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else [])
            msgs.append({"role": "user", "content": prompt})
            return Request(messages=msgs, params=self.params, id=doc_id)
        text = f"{cfg.system}\n\n{prompt}" if cfg.system else prompt
        return Request(prompt=text, params=self.params, id=doc_id)

    def process(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        n = table.num_rows
        ids = table.column("id").to_pylist() if "id" in table.schema.names else [None] * n
        texts: list[str | None] = [None] * n
        finish: list[str | None] = [None] * n
        ptoks: list[int | None] = [None] * n
        ctoks: list[int | None] = [None] * n
        failed: dict[int, str] = {}
        if n:
            cols = {c: table.column(c).to_pylist() for c in self.reads}
            for start in range(0, n, cfg.batch_size):
                rows = range(start, min(n, start + cfg.batch_size))
                reqs: list[Request] = []
                where: list[int] = []
                for i in rows:
                    try:
                        prompt = self._prompt({c: cols[c][i] for c in self.reads})
                    except (KeyError, ValueError, IndexError, TypeError) as exc:
                        reason = f"prompt: {type(exc).__name__}: {exc}"
                        failed[i] = reason
                        self.accounting.invalid_prompt(ids[i], reason)
                        continue
                    reqs.append(self._request(prompt, ids[i]))
                    where.append(i)
                comps = self.engine.generate(reqs) if reqs else []
                self.accounting.record(comps)
                for i, c in zip(where, comps):
                    if not c.ok:
                        failed[i] = c.error or "failed"
                        continue
                    texts[i], finish[i] = c.text, c.finish_reason
                    ptoks[i], ctoks[i] = c.prompt_tokens, c.completion_tokens
                self.accounting.check()
        oc = self.out_cols
        out = table
        for name, values, typ in ((oc["text"], texts, pa.string()), (oc["finish"], finish, pa.string()),
                                  (oc["prompt_tokens"], ptoks, pa.int32()), (oc["tokens"], ctoks, pa.int32())):
            arr = pa.array(values, typ)
            if name in out.schema.names:
                out = out.set_column(out.schema.names.index(name), name, arr)
            else:
                out = out.append_column(name, arr)
        if failed:
            bad = sorted(failed)
            side = table.take(pa.array(bad, pa.int64()))
            side = side.append_column("llm_error", pa.array([failed[i] for i in bad], pa.string()))
            self.side("failed", side)
            if cfg.on_error == "drop":
                self.drop("llm_failed", len(bad))
                keep = pa.array([i not in failed for i in range(n)], pa.bool_())
                out = out.filter(keep)
            else:
                err = pa.array(["error" if i in failed else f for i, f in enumerate(finish)], pa.string())
                out = out.set_column(out.schema.names.index(oc["finish"]), oc["finish"], err)
        return out
