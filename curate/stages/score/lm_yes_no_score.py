"""``lm_yes_no_score``: zero-shot YES/NO scoring from next-token logprobs (AutoMathText, recipe 6).

    - lm_yes_no_score:
        engine: {kind: vllm, model: /models/qwen2.5-7b}
        domain: mathematics
        questions: [lm_yes_no_score/contains, lm_yes_no_score/useful]   # prompt template ids
        column: math_score

For each question (a chat template over ``{{ text }}`` and ``{{ domain }}``), the
engine is asked for one token with the ``top_logprobs`` most likely alternatives. From them,

    P(YES) = sum of exp(logprob) over tokens that read "yes" after stripping spaces and case
    P(NO)  = the same for "no"
    score  = P(YES) / (P(YES) + P(NO))

and the document's score is the product over the questions (``<column>``, float32), each
question's score also in ``<column>_q<k>`` (k = 1, 2, ...) when there are several. Words other
than yes/no: ``yes_words``/``no_words``. Chat models get the template as chat messages; with
``chat: false`` (a base model, as the reference) the prompt is the system and user text followed
by the template's ``prefix`` (e.g. "Answer:") and the next token is read there.

Engines: ``transformers`` computes the next-token log-softmax in one forward pass (no generation);
``vllm`` asks ``SamplingParams(logprobs=k, max_tokens=1)``; ``openai`` sends ``logprobs`` /
``top_logprobs`` (chat) or ``logprobs`` (completions; OpenAI's own API allows at most 5 there).
An engine that returns no logprobs is an error at validate time (by kind) or at the first answer
(a server that ignores the request), naming the engine.

Texts are cut to ``max_text_tokens`` (head kept, "..." appended, as the reference). When neither a
yes nor a no token is among the alternatives, the row's score is unknown: counted
``errors/parse/no_yes_no`` and saved in the side output ``failed``; the row is kept with a null
score (``on_error: keep``) or dropped (``drop``).

Library call::

    LmYesNoScore(engine={"kind": "transformers"}, domain="mathematics")(table)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate.engines import Completion, Request
from curate.llm.chunking import cut_text
from curate.llm.parse import ParseError
from curate.llm.stage import Job, LLMStage, LLMStageConfig, Unit
from curate.pipeline.api import StageError, register


class LmYesNoScoreConfig(LLMStageConfig):
    questions: list[str] = Field(["lm_yes_no_score/contains", "lm_yes_no_score/useful"], min_length=1,
                                 description="prompt template ids (or .yaml paths), one per YES/NO question")
    domain: str = Field(..., min_length=1, description="fills {{ domain }} in the question templates, e.g. mathematics")
    text_column: str = "text"
    columns: list[str] = Field(default_factory=list, description="extra row columns the templates may use")
    column: str = Field("lm_score", description="output column (product over questions)")
    chat: bool = Field(True, description="chat messages (instruct models); false: raw prompt + prefix (base models)")
    top_logprobs: int = Field(20, ge=1, le=20, description="alternatives read at the answer position")
    yes_words: list[str] = Field(["yes"], min_length=1, description="answer tokens counted as YES (case/space-insensitive)")
    no_words: list[str] = Field(["no"], min_length=1, description="answer tokens counted as NO")
    max_text_tokens: int = Field(1024, ge=16, description="longer texts are cut (head kept, '...' appended)")
    on_error: Literal["keep", "drop"] = Field("keep", description="rows without a score: keep (null) or drop")
    parse_retries: int = Field(0, ge=0, description="(logprobs of a greedy step do not change on retry)")
    batch_size: int = Field(64, ge=1)


def yes_no_probability(top: dict[str, float], yes: set[str], no: set[str]) -> float:
    """P(YES) / (P(YES) + P(NO)) from the alternatives at the answer position (token -> logprob);
    variants that differ in case or surrounding space are summed. ``ParseError("no_yes_no")`` when
    neither is among them."""
    p_yes = sum(math.exp(lp) for tok, lp in top.items() if tok.strip().lower() in yes)
    p_no = sum(math.exp(lp) for tok, lp in top.items() if tok.strip().lower() in no)
    if p_yes + p_no <= 0.0:
        raise ParseError("no_yes_no", f"no yes/no token among the {len(top)} alternatives")
    return p_yes / (p_yes + p_no)


@register
class LmYesNoScore(LLMStage):
    """Zero-shot YES/NO scoring: P(YES)/(P(YES)+P(NO)) from next-token logprobs, multiplied over questions."""

    name = "lm_yes_no_score"
    recipe = "lm_yes_no_score"
    Config = LmYesNoScoreConfig
    synthetic = False
    count_scored = True
    reads = ("{text_column}",)
    provided_variables = frozenset({"text", "domain"})

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.config
        self.score_columns = [f"{cfg.column}_q{k + 1}" for k in range(len(cfg.questions))] \
            if len(cfg.questions) > 1 else []
        self.writes = {cfg.column: pa.float32(), **{c: pa.float32() for c in self.score_columns},
                       self.provenance_column(): pa.string()}
        self.yes = {w.strip().lower() for w in cfg.yes_words}
        self.no = {w.strip().lower() for w in cfg.no_words}

    def template_ids(self) -> list[str]:
        return list(self.config.questions)

    def check(self) -> list[tuple[str, str]]:
        from curate.engines import engine_class

        problems = super().check()
        kind = self.config.engine.kind
        cap = engine_class(kind).max_logprobs
        if cap == 0:
            problems.append(("engine", f"lm_yes_no_score needs next-token logprobs; the {kind} engine cannot "
                                       "return them"))
        elif self.config.top_logprobs > cap:
            problems.append(("top_logprobs", f"the {kind} engine returns at most {cap} alternatives"))
        return problems

    def request(self, tid: str, row: dict[str, Any], text: str) -> Request:
        cfg = self.config
        params = self.sampling(max_tokens=1, temperature=0.0, logprobs=cfg.top_logprobs, stop=())
        variables = {"text": text, "domain": cfg.domain}
        if cfg.chat:
            return self.ask(tid, row=row, params=params, **variables)
        t = self.template(tid)
        extra = {c: row.get(c) for c in self.extra_columns()}
        system, user = t.render(**{**extra, **variables})
        prompt = (f"{system}\n\n" if system else "") + user + (f"\n{t.prefix}" if t.prefix else "")
        return Request(prompt=prompt, params=params, id=row.get("id"))

    def parse_answer(self, completions: list[Completion]) -> list[dict[str, Any]]:
        scores = []
        for c in completions:
            if not c.logprobs:
                eng = self.engine
                raise StageError(f"stage {self.step_name!r}: the {eng.kind} engine ({eng.model_id}) returned no "
                                 "logprobs; lm_yes_no_score needs an engine/server that returns them")
            scores.append(yes_no_probability(c.logprobs[0].top, self.yes, self.no))
        out = {self.config.column: math.prod(scores)}
        out.update(zip(self.score_columns, scores))
        return [out]

    def jobs(self, unit: Unit) -> list[Job]:
        cfg = self.config
        text, cut = cut_text(str(unit.row[cfg.text_column]), cfg.max_text_tokens, tokenizer=self.engine.hf_tokenizer(),
                             count=self.engine.count_tokens, keep="head")
        if cut:
            self.count("lm_yes_no_score/cut_docs")
        return [Job(unit.index, [self.request(tid, unit.row, text) for tid in cfg.questions], self.parse_answer,
                    self.template(cfg.questions[0]))]

    def provenance_column(self) -> str:
        return f"{self.config.column}_provenance"
