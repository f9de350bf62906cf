"""``instruction_synth``: instruction-augmented corpora (Instruction Pre-Training, recipe 2).

    - instruction_synth:
        mode: instruct                      # CPU default: a general instruct model (SmolLM2)
        engine: {kind: transformers}
        max_tokens: 400
    - instruction_synth:
        mode: synthesizer                   # the fine-tuned synthesizer on a GPU
        engine: {kind: vllm, model: /models/instruction-synthesizer, max_model_len: 4096}

Each document (or each chunk of a long one) gets question-answer pairs about it, and the output
text is the raw text followed (sometimes preceded) by its pairs, rendered with varied templates
chosen by a seed derived from the document id.

- ``synthesizer`` mode sends the reference input format as a raw prompt, ``<s> <CON> {text}
  </CON>\\n\\n``, with the BOS written in the text and the engine told not to add another
  (``Request.add_special_tokens = False``); the model answers ``<QUE> q <ANS> a </END>`` repeated.
- ``instruct`` mode asks a chat model (prompt ``instruction_synth/instruct``, whose worked example
  is sent as an earlier turn) for the same tagged format; both are read by the reference parsing rules (:func:`curate.llm.parse.parse_tagged_pairs`:
  split on ``</END>``, drop an unfinished last piece, exactly one ``<ANS>``, ``<QUE>`` first, no
  empty answers, no case-insensitive duplicate questions).
- Multi-round (``rounds`` > 1): the chunks of each ``batch_size`` rows are split into rounds; a
  text of round r is prompted after the text of round r-1 at the same position (and that one's
  own chain) with its pairs, as few-shot examples, while the whole prompt fits
  ``context_tokens - max_tokens``; it is asked as soon as that one is answered.
- Long documents are split at paragraph/sentence boundaries into chunks that fit the context with
  the prompt and the answer; one output row per chunk (``chunk_index``).
- An answer in which no pair parses is asked again (``parse_retries``, new seed), then counted
  ``errors/parse/no_pairs`` and saved with the raw answer in the side output ``failed``; no row
  is written for it (a small model that never closes a pair with ``</END>`` gives nothing, and
  ``warnings/low_yield`` says so).
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Literal

import pyarrow as pa
from pydantic import Field

from curate.engines import Completion, Request
from curate.llm.parse import ParseError, format_tagged_pairs, parse_tagged_pairs
from curate.llm.stage import Job, JobResult, LLMStage, LLMStageConfig, Unit
from curate.pipeline.api import register, seeded_rng

QA_TYPE = pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string())]))

# ways to render one pair: (question prefix, answer prefix); {n} is the 1-based pair number
PAIR_FORMATS: tuple[tuple[str, str], ...] = (
    ("Q: ", "A: "),
    ("Question: ", "Answer: "),
    ("", ""),
    ("User: ", "Assistant: "),
    ("{n}. ", "Answer: "),
    ("### Question\n", "### Answer\n"),
    ("Question {n}: ", "Answer {n}: "),
)
INTROS_AFTER = ("", "", "Answer the questions based on the text above.",
                "Questions about the passage above, with answers:", "Now answer some questions about the text.",
                "Use the text above to answer the following.")
INTROS_BEFORE = ("Read the questions, then the text that answers them.", "Questions and answers first; the text follows.",
                 "")


class InstructionSynthConfig(LLMStageConfig):
    mode: Literal["instruct", "synthesizer"] = Field(
        "instruct", description="instruct: a chat model prompted for the tagged format; synthesizer: the "
                                "fine-tuned instruction synthesizer (raw prompt, greedy)")
    template: str = Field("instruction_synth/instruct", description="prompt template of instruct mode")
    text_column: str = "text"
    columns: list[str] = Field(default_factory=list, description="extra row columns the template may use")
    max_tokens: int = Field(400, ge=1, description="answer tokens (the reference: 400)")
    context_tokens: int = Field(4096, ge=64, description="context length: prompt + answer (the reference: 4096)")
    rounds: int = Field(1, ge=1, description="multi-round few-shot chaining within a batch (1 = off)")
    bos: str = Field("<s>", description="synthesizer mode: the BOS string written at the start of each text")
    eos: str = Field("</s>", description="synthesizer mode: the EOS string closing a few-shot example")
    pairs_first: float = Field(0.1, ge=0.0, le=1.0, description="share of texts rendered with the pairs before the text")
    render_seed: int = Field(0, description="seed of the rendering choices (combined with the document id)")


@register
class InstructionSynth(LLMStage):
    """Instruction-augmented texts: LLM-written question-answer pairs about each document (Instruction Pre-Training)."""

    name = "instruction_synth"
    recipe = "instruction_synth"
    Config = InstructionSynthConfig
    reads = ("{text_column}",)
    writes = {"text": pa.string(), "qa_pairs": QA_TYPE, "qa_count": pa.int32()}
    provided_variables = frozenset({"text"})
    chunked = True

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        self._plan: dict[int, Any] = {}  # rounds > 1: unit -> (its batch's units, position, units per round)

    def template_ids(self) -> list[str]:
        return [self.config.template] if self.config.mode == "instruct" else []

    # -- prompts -----------------------------------------------------------------------------------
    def _read(self, text: str) -> str:
        cfg = self.config
        return f"{cfg.bos} <CON> {text} </CON>\n\n"

    def _shot(self, text: str, pairs: list[tuple[str, str]]) -> str:
        return self._read(text) + format_tagged_pairs(pairs) + self.config.eos

    def request(self, text: str, shots: list[tuple[str, list[tuple[str, str]]]], doc_id: Any) -> Request:
        cfg = self.config
        if cfg.mode == "synthesizer":
            prompt = "".join(self._shot(t, p) for t, p in shots) + self._read(text)
            return Request(prompt=prompt, params=self.sampling(), id=doc_id, add_special_tokens=False)
        t = self.template(cfg.template)
        msgs: list[dict[str, str]] = []
        turns = [(ex.get("text", ""), answer) for ex, answer in t.example_turns()]  # the template's examples
        turns += [(shot_text, format_tagged_pairs(pairs)) for shot_text, pairs in shots]
        for i, (shot_text, answer) in enumerate(turns):
            system, user = t.render(text=shot_text)
            if i == 0 and system:
                msgs.append({"role": "system", "content": system})
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        system, user = t.render(text=text)
        if not msgs and system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": user})
        return Request(messages=msgs, params=self.sampling(), id=doc_id)

    def _prompt_tokens(self, req: Request) -> int:
        return self.engine.prompt_tokens(req)  # the chat template applied when the engine has one

    def chunk_budget(self) -> int:
        """Tokens of text per chunk: the context minus the answer and the prompt around the text
        (counted on the request itself: the synthesizer prompt is not a template)."""
        overhead = self._prompt_tokens(self.request("", [], None)) + 16
        return max(32, self.config.context_tokens - self.config.max_tokens - overhead)

    # -- parsing and rendering ---------------------------------------------------------------------
    def _rng(self, doc_id: Any, chunk: int) -> random.Random:
        return seeded_rng(self.config.render_seed, doc_id, chunk)

    def render(self, text: str, pairs: list[tuple[str, str]], doc_id: Any, chunk: int) -> str:
        """The training text: raw text and pairs in a format chosen by the document id."""
        rng = self._rng(doc_id, chunk)
        qp, ap = rng.choice(PAIR_FORMATS)
        sep = rng.choice(("\n\n", "\n"))
        body = sep.join(f"{qp.format(n=i)}{q}\n{ap.format(n=i)}{a}" for i, (q, a) in enumerate(pairs, 1))
        if rng.random() < self.config.pairs_first:
            intro = rng.choice(INTROS_BEFORE)
            return "\n\n".join(x for x in (intro, body, text) if x)
        intro = rng.choice(INTROS_AFTER)
        return "\n\n".join(x for x in (text, intro, body) if x)

    def _parse(self, unit: Unit, meta: dict[str, Any], completions: list[Completion]) -> list[dict]:
        pairs = parse_tagged_pairs(completions[0].text or "")
        if not pairs:
            raise ParseError("no_pairs", "no complete <QUE> ... <ANS> ... </END> pair")
        self.count("instruction_synth/pairs", len(pairs))
        meta["pairs"] = pairs
        text = unit.row[self.config.text_column]
        return [{"text": self.render(text, pairs, unit.row.get("id"), unit.chunk or 0),
                 "qa_pairs": [{"question": q, "answer": a} for q, a in pairs], "qa_count": len(pairs)}]

    # -- work ----------------------------------------------------------------------------------------
    def units(self, rows: list[dict[str, Any]], empty: list[int]) -> Iterator[Unit]:
        """With ``rounds`` > 1, the chunks of each ``batch_size`` rows are split into rounds: only
        the first round's units start; each of them, once answered, starts the unit at the same
        position of the next round (``then``), with its chain as few-shot examples."""
        if self.config.rounds == 1:
            yield from super().units(rows, empty)
            return
        size = self.config.batch_size
        for start in range(0, len(rows), size):
            sub: list[int] = []
            batch = [Unit(u.index + start, u.row, u.chunk) for u in super().units(rows[start:start + size], sub)]
            empty.extend(start + i for i in sub)
            per_round = -(-len(batch) // self.config.rounds) if batch else 0
            for u in range(per_round):
                self._plan[id(batch[u])] = (batch, u, per_round)
                yield batch[u]

    def jobs(self, unit: Unit) -> list[Job]:
        plan = self._plan.pop(id(unit), None)
        return [self._job(unit, [], plan)]

    def _job(self, unit: Unit, chain: list[tuple[str, list[tuple[str, str]]]], plan: Any) -> Job:
        text = unit.row[self.config.text_column]
        shots = self._chain(chain, text, unit.row.get("id"))
        if shots:
            self.count("instruction_synth/chained")
        meta: dict[str, Any] = {"chunk": unit.chunk or 0, "chain": chain}
        tmpl = self.template(self.config.template) if self.config.mode == "instruct" else None
        return Job(unit.index, [self.request(text, shots, unit.row.get("id"))],
                   lambda cs: self._parse(unit, meta, cs), tmpl, meta,
                   then=(lambda res: self._next_round(unit, res, plan)) if plan else None,
                   order=(unit.chunk or 0, 0))

    def _next_round(self, unit: Unit, res: JobResult, plan: Any) -> list[Job]:
        """The unit at the same position of the next round, after this one's answer."""
        batch, u, per_round = plan
        v = u + per_round
        if v >= len(batch):
            return []
        chain = res.job.meta["chain"] + [(unit.row[self.config.text_column], res.job.meta["pairs"])] \
            if res.status == "ok" else []
        return [self._job(batch[v], chain, (batch, v, per_round))]

    def _chain(self, shots: list[tuple[str, list[tuple[str, str]]]], text: str | None, doc_id: Any):
        """The longest tail of ``shots`` whose prompt with ``text`` fits the context (reference rule:
        the chain is kept only while the whole fits context - max_tokens)."""
        if text is None or not shots:
            return list(shots)
        limit = self.config.context_tokens - self.config.max_tokens
        for start in range(len(shots)):
            if self._prompt_tokens(self.request(text, shots[start:], doc_id)) <= limit:
                return shots[start:]
        return []
