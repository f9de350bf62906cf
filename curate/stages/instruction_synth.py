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
- Multi-round (``rounds`` > 1): the rows of a batch are split into rounds; a text of round r is
  prompted after the text of round r-1 at the same position (and that one's own chain) with its
  pairs, as few-shot examples, while the whole prompt fits ``context_tokens - max_tokens``.
- Long documents are split at paragraph/sentence boundaries into chunks that fit the context with
  the prompt and the answer; one output row per chunk (``chunk_index``).
- A text for which no pair parses is kept as raw text (``qa_count`` 0) and counted under
  ``instruction_synth/no_pairs``.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate.engines import Completion, Request
from curate.llm.parse import format_tagged_pairs, parse_tagged_pairs
from curate.llm.stage import Job, LLMStage, LLMStageConfig
from curate.pipeline.schema import seeded_rng
from curate.pipeline.stage import register

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
        if req.prompt is not None:
            return self.engine.count_tokens(req.prompt)
        if hasattr(self.engine.shared, "render"):  # the chat template, exactly
            return self.engine.count_tokens(self.engine.shared.render(req))
        return sum(self.engine.count_tokens(m["content"]) + 4 for m in req.messages or ())

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

    def _parse(self, row: dict[str, Any], text: str, chunk: int, completions: list[Completion]) -> list[dict]:
        pairs = parse_tagged_pairs(completions[0].text or "")
        if not pairs:
            self.count("instruction_synth/no_pairs")
            return [{"text": text, "qa_pairs": [], "qa_count": 0, "pairs": []}]
        self.count("instruction_synth/pairs", len(pairs))
        return [{"text": self.render(text, pairs, row.get("id"), chunk),
                 "qa_pairs": [{"question": q, "answer": a} for q, a in pairs], "qa_count": len(pairs),
                 "pairs": pairs}]

    # -- work ----------------------------------------------------------------------------------------
    def process(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        rows = self.rows(table)
        ids = [r.get("id") for r in rows]
        budget = self.chunk_budget() if rows else 0
        outputs: list[tuple[int, dict[str, Any]]] = []
        tmpl = self.template(cfg.template) if cfg.mode == "instruct" else None
        for batch in self.batches(rows):
            units = self.chunks_of(rows, batch, cfg.text_column, budget)  # (row, chunk index, text)
            per_round = -(-len(units) // cfg.rounds) if units else 0
            shots_of: dict[int, list[tuple[str, list[tuple[str, str]]]]] = {}  # unit -> its chain
            all_results = []
            for r in range(cfg.rounds):
                idx = list(range(r * per_round, min(len(units), (r + 1) * per_round)))
                jobs = []
                for u in idx:
                    i, k, text = units[u]
                    shots = self._chain(shots_of.get(u - per_round, []) if r else [], text, ids[i])
                    req = self.request(text, shots, ids[i])
                    jobs.append(Job(i, [req], lambda cs, row=rows[i], t=text, k=k: self._parse(row, t, k, cs),
                                    tmpl, {"chunk": k, "unit": u, "shots": len(shots)}))
                    if shots:
                        self.count("instruction_synth/chained")
                results = self.complete(jobs, ids)
                for res in results:
                    if res.status == "ok" and res.rows[0]["pairs"]:
                        u = res.job.meta["unit"]
                        prev = shots_of.get(u - per_round, []) if r else []
                        shots_of[u] = self._chain(prev, None, None) + [(units[u][2], res.rows[0]["pairs"])]
                all_results += results
            for res in all_results:
                for d in res.rows:
                    d.pop("pairs", None)
            outputs.extend(self.finish(table, rows, all_results))
        return self.assemble(table, outputs)

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
