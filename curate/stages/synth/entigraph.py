"""``entigraph``: synthetic continued-pretraining texts from entity relations (EntiGraph, recipe 3).

    - entigraph:
        engine: {kind: openai, model: gpt-4o-mini, base_url: ...}
        temperature: 1.0
        max_relations_per_doc: 20           # and/or max_tokens_per_doc, tokens_per_source_token, target_tokens

Step 1, per document (or chunk of a long document): the LLM lists a summary and the salient
entities as JSON (``entigraph/entities``; schema :class:`EntitiesAnswer`, enforced by engines with
structured outputs, validated for the others); an answer cut at ``entities_max_tokens`` inside the
entity list keeps the entities written in full (``entigraph/truncated_entity_lists``); an answer
that is not valid JSON with at least two distinct entities, or that repeats the prompt's worked
example (``echoed_example``: its summary or its entity list), is asked again with a new seed, then
counted (``errors/parse/<reason>``) and saved in the side output ``failed``. Step 2: for entity pairs (all i<j, in a seeded random order) and then
triples (seeded random order), the LLM discusses how the entities relate in the context of the
document (``entigraph/pair``, ``entigraph/triple``). Each answer is one output row: ``text``,
``entities`` (the 2 or 3 entities), ``relation`` ("pair"/"triple"), the document's ``summary`` and
the provenance columns (``source_id``...).

The number of relation requests per document is fixed before anything is generated, so a rerun
asks the same questions (the cache answers them):

- ``max_relations_per_doc``: at most this many relation requests;
- ``max_tokens_per_doc``: prompt + answer tokens (prompt counted with the engine's tokenizer, the
  answer at ``max_tokens``) of the relation requests stay within this;
- ``tokens_per_source_token`` (or ``target_tokens`` with ``corpus_tokens``, the corpus-wide target
  split over documents in proportion to their length): answer tokens (``max_tokens`` each) of a
  document stay within its share.

The smallest of the limits given applies; the seed of the pair/triple order is derived from the
document id and ``seed``.
"""

from __future__ import annotations

import itertools
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, Field, field_validator, model_validator

from curate.engines import Completion, Request
from curate.llm.parse import ParseError, salvage_string, salvage_string_list, string_list
from curate.llm.stage import Job, JobResult, LLMStage, LLMStageConfig, Unit
from curate.pipeline.api import register, seeded_rng


class EntiGraphConfig(LLMStageConfig):
    text_column: str = "text"
    columns: list[str] = Field(default_factory=list, description="extra row columns the templates may use")
    entities_template: str = "entigraph/entities"
    pair_template: str = "entigraph/pair"
    triple_template: str = "entigraph/triple"
    entities_max_tokens: int = Field(512, ge=16, description="answer tokens of the entity extraction")
    max_tokens: int = Field(512, ge=1, description="answer tokens of each relation text")
    max_entities: int = Field(20, ge=2, description="entities kept from step 1 (in the model's order)")
    triples: bool = Field(True, description="ask about entity triples after the pairs")
    context_tokens: int = Field(4096, ge=128, description="context length: documents are chunked to fit")
    max_relations_per_doc: int | None = Field(10, ge=0, description="relation requests per document (chunk)")
    max_tokens_per_doc: int | None = Field(None, ge=1, description="prompt + answer tokens of a document's relations")
    tokens_per_source_token: float | None = Field(None, gt=0, description="answer tokens per token of the document")
    target_tokens: int | None = Field(None, ge=1, description="corpus-wide answer-token target (needs corpus_tokens)")
    corpus_tokens: int | None = Field(None, ge=1, description="tokens of the whole input corpus (for target_tokens)")
    emit_summary: bool = Field(False, description="also output each document's summary as a row")
    relation_seed: int = Field(0, description="seed of the pair/triple order (combined with the document id)")

    @model_validator(mode="after")
    def _target(self) -> "EntiGraphConfig":
        if (self.target_tokens is None) != (self.corpus_tokens is None):
            raise ValueError("target_tokens and corpus_tokens go together (the target is split over "
                             "documents in proportion to their share of corpus_tokens)")
        if all(x is None for x in (self.max_relations_per_doc, self.max_tokens_per_doc,
                                   self.tokens_per_source_token, self.target_tokens)):
            raise ValueError("give a budget: max_relations_per_doc, max_tokens_per_doc, "
                             "tokens_per_source_token or target_tokens (pairs and triples grow as n^2 and n^3)")
        return self


class EntitiesAnswer(BaseModel):
    """The step-1 answer: ``{"summary": "...", "entities": ["...", ...]}``. Lenient where the
    answer is only validated (no structured outputs): a summary that is not text becomes "" and
    entities that are not text are left out."""

    summary: str = ""
    entities: list[str]

    @field_validator("summary", mode="before")
    @classmethod
    def _summary(cls, v: Any) -> Any:
        return v if isinstance(v, str) else ""

    @field_validator("entities", mode="before")
    @classmethod
    def _entities(cls, v: Any) -> Any:
        return [x for x in v if isinstance(x, str)] if isinstance(v, list) else v


@register
class EntiGraph(LLMStage):
    """EntiGraph: entity extraction, then LLM texts on how entity pairs and triples relate in each document."""

    name = "entigraph"
    recipe = "entigraph"
    Config = EntiGraphConfig
    reads = ("{text_column}",)
    writes = {"text": pa.string(), "entities": pa.list_(pa.string()), "relation": pa.string(),
              "summary": pa.string()}
    provided_variables = frozenset({"text", "entities", "summary"})
    chunked = True

    def template_ids(self) -> list[str]:
        cfg = self.config
        return [cfg.entities_template, cfg.pair_template] + ([cfg.triple_template] if cfg.triples else [])

    # -- step 1 --------------------------------------------------------------------------------------
    def parse_entities(self, completions: list[Completion]) -> list[dict[str, Any]]:
        """The summary and entities of a step-1 answer (validated by the base: ``parsed``)."""
        obj = completions[0].parsed
        entities = string_list(obj.entities)[: self.config.max_entities]
        if len(entities) < 2:
            raise ParseError("too_few_entities", f"{len(entities)} usable entities")
        return [{"summary": obj.summary, "entities": entities}]

    def salvage(self, request: Request, completion: Completion, error: ParseError) -> Any:
        """An entity answer cut at max_tokens inside the list keeps the entities written in full
        (nothing guessed); anything else stays a parse failure."""
        text = completion.text or ""
        salvaged = salvage_string_list(text, "entities") if error.reason == "truncated_json" else []
        if len(string_list(salvaged)) < 2 or completion.finish_reason != "length":
            raise error
        self.count("entigraph/truncated_entity_lists")
        return EntitiesAnswer(summary=salvage_string(text, "summary") or "", entities=salvaged)

    # -- step 2 --------------------------------------------------------------------------------------
    def relation_sets(self, entities: list[str], doc_id: Any, chunk: int) -> list[tuple[str, ...]]:
        """Pairs (seeded order) then triples (seeded order): every candidate, in the order asked."""
        rng = seeded_rng(self.config.relation_seed, doc_id, chunk)
        pairs = list(itertools.combinations(entities, 2))
        rng.shuffle(pairs)
        triples: list[tuple[str, ...]] = []
        if self.config.triples:
            triples = list(itertools.combinations(entities, 3))
            rng.shuffle(triples)
        return [*pairs, *triples]

    def relation_budget(self, text: str, prompt_tokens: list[int]) -> int:
        """How many of the candidate relation requests (with these prompt sizes) a document gets."""
        cfg = self.config
        n = len(prompt_tokens)
        if cfg.max_relations_per_doc is not None:
            n = min(n, cfg.max_relations_per_doc)
        answer_budget = None
        if cfg.tokens_per_source_token is not None or cfg.target_tokens is not None:
            doc_tokens = self.engine.count_tokens(text)
            shares = []
            if cfg.tokens_per_source_token is not None:
                shares.append(cfg.tokens_per_source_token * doc_tokens)
            if cfg.target_tokens is not None and cfg.corpus_tokens:
                shares.append(cfg.target_tokens * doc_tokens / cfg.corpus_tokens)
            answer_budget = min(shares)
            n = min(n, int(answer_budget // cfg.max_tokens))
        if cfg.max_tokens_per_doc is not None:
            used, k = 0, 0
            for p in prompt_tokens[:n]:
                if used + p + cfg.max_tokens > cfg.max_tokens_per_doc:
                    break
                used += p + cfg.max_tokens
                k += 1
            n = k
        return max(0, n)

    def parse_relation(self, ents: tuple[str, ...], summary: str, completions: list[Completion]) -> list[dict]:
        text = (completions[0].text or "").strip()
        if not text:
            raise ParseError("empty_answer", "no relation text")
        if completions[0].finish_reason == "length":
            self.count("entigraph/truncated")  # kept: a relation text cut at max_tokens is still text
        return [{"text": text, "entities": list(ents), "relation": "pair" if len(ents) == 2 else "triple",
                 "summary": summary}]

    # -- work ----------------------------------------------------------------------------------------
    def chunk_budget(self) -> int:
        # the relation prompts hold the document too: leave room for their entities and summary
        return self.text_budget(self.template(self.config.pair_template), self.config.max_tokens, margin=64,
                                entities=["x" * 40] * 3, summary="x" * 400)

    def jobs(self, unit: Unit) -> list[Job]:
        """Step 1 (the entities of one chunk); its follow-up is step 2 for that chunk."""
        cfg = self.config
        chunk, k = unit.row[cfg.text_column], unit.chunk or 0
        req = self.ask(cfg.entities_template, row=unit.row, text=chunk, answer_schema=EntitiesAnswer,
                       params=self.sampling(max_tokens=cfg.entities_max_tokens))
        meta: dict[str, Any] = {"chunk": k}
        return [Job(unit.index, [req], lambda cs: self._entities(meta, cs), self.template(cfg.entities_template),
                    meta, then=lambda res: self.relation_jobs(unit, res), order=(0, k))]

    def _entities(self, meta: dict[str, Any], completions: list[Completion]) -> list[dict[str, Any]]:
        parsed = self.parse_entities(completions)[0]
        meta.update(parsed)
        summary, entities = parsed["summary"], parsed["entities"]
        if self.config.emit_summary and summary:
            return [{"text": summary, "entities": entities, "relation": "summary", "summary": summary}]
        return []

    def relation_jobs(self, unit: Unit, res: JobResult) -> list[Job]:
        """Step 2 for one chunk whose entities parsed: its relation requests, within the budget."""
        if res.status != "ok":
            return []
        cfg = self.config
        i, k, chunk = unit.index, unit.chunk or 0, unit.row[cfg.text_column]
        summary, entities = res.job.meta["summary"], res.job.meta["entities"]
        self.count("entigraph/entities", len(entities))
        cands = self.relation_sets(entities, unit.row.get("id"), k)
        reqs = []
        for ents in cands:
            tid = cfg.pair_template if len(ents) == 2 else cfg.triple_template
            reqs.append((tid, ents, self.ask(tid, row=unit.row, text=chunk, entities=list(ents), summary=summary,
                                             answer_schema=None)))
            if len(reqs) >= (cfg.max_relations_per_doc or len(cands)):
                break
        n = self.relation_budget(chunk, [self._tokens(r) for _, _, r in reqs])
        self.count("entigraph/relations_planned", n)
        if n < len(cands):
            self.count("entigraph/relations_over_budget", len(cands) - n)
        return [Job(i, [req], lambda cs, e=ents: self.parse_relation(e, summary, cs), self.template(tid),
                    {"chunk": k}, order=(1, k, j))
                for j, (tid, ents, req) in enumerate(reqs[:n])]

    def _tokens(self, req: Any) -> int:
        return sum(self.engine.count_tokens(m["content"]) for m in req.messages)
