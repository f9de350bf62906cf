"""``llm_rate``: DataMan-style quality and domain ratings by an LLM (recipe 4).

    - llm_rate:
        engine: {kind: vllm, model: /models/DataMan-1.5B-EN}
        format: dataman             # the public DataMan model's own prompt and answer format
    - llm_rate:
        engine: {kind: transformers}  # any instruct model (the CPU default: SmolLM2)
        format: instruct            # our own wording, "Name: value" lines

Each document gets 14 criteria rated 1-5 and one of 15 domains, as typed columns:
``dataman_accuracy`` ... ``dataman_overall_score`` (int8) and ``dataman_domain`` (string; the
prefix is the ``column_prefix`` option). Scores are stored, not thresholded: ``select`` decides.

- ``format: dataman`` sends the reference request (``llm_rate/dataman``: system "You are a helpful
  assistant.", the ``all_rating`` request) and accepts only the model's answer format: one domain
  letter A-O and 14 integers 1-5, one per line (exactly 15 lines; anything else is unparseable).
  Greedy, 29 new tokens, as the reference annotator.
- ``format: instruct`` (``llm_rate/instruct``) asks for ``Domain: <name>`` and ``<Criterion>: <n>``
  lines; names are matched case-insensitively, bullets/numbering/bold and ``/5`` are tolerated,
  every criterion must be there once (a repeated identical line is fine), each score in 1-5.
  With an engine that enforces answer schemas (openai with ``structured_outputs``, the default;
  vllm), or ``structured: true``, it asks for one JSON object instead (``llm_rate/instruct_json``,
  schema :class:`Ratings`: ``domain`` and the 14 criteria as snake_case keys, scores 1-5), which
  the engine enforces while decoding; ``structured: false`` keeps the lines. Answers that repeat the
  prompt's worked example are parse failures (``echoed_example``), asked again.

Long texts are cut keeping the head and the tail: ``max_text_tokens`` (1,894 as the reference) in
the engine's own tokens, ``...`` in the middle; as the reference, texts longer than
``max_text_chars`` are first reduced to their first and last ``max_text_chars / 2`` characters, and
a leading quoted ellipsis and empty-alt Markdown image lines are removed (``cleanup``). With an
engine that has no tokenizer (``openai``), the cut uses its token estimate.

An answer that does not parse is asked again (``parse_retries``, new seed), then counted
``errors/parse/<reason>`` (``wrong_count``, ``bad_domain``, ``bad_score``, ``missing_criteria``,
``conflicting_scores``, ``no_domain``...) and saved with the raw answer in the side output
``failed``; its row is kept with null ratings (``on_error: keep``) or dropped (``drop``, counted
``dropped/llm_failed``). Counters ``llm_rate/cut_docs``, ``llm_rate/scored``, ``llm_rate/empty_text``.

Library call::

    LlmRate(engine={"kind": "transformers"}, format="instruct")(table)
"""

from __future__ import annotations

import re
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, Field, create_model, model_validator

from curate.engines import Completion
from curate.llm.chunking import cut_text
from curate.llm.parse import ParseError
from curate.llm.stage import Job, LLMStage, LLMStageConfig, Unit
from curate.pipeline.api import register

CRITERIA = ["Accuracy", "Coherence", "Language Consistency", "Semantic Density", "Knowledge Novelty",
            "Topic Focus", "Creativity", "Professionalism", "Style Consistency", "Grammatical Diversity",
            "Structural Standardization", "Originality", "Sensitivity", "Overall Score"]
DOMAINS = ["Medicine", "Finance", "Law", "Education", "Technology", "Entertainment", "Mathematics", "Coding",
           "Government", "Culture", "Transportation", "Retail E-commerce", "Telecommunication", "Agriculture",
           "Other"]
DOMAIN_LETTERS = {chr(ord("A") + i): d for i, d in enumerate(DOMAINS)}
KEYS = [re.sub(r"\W+", "_", c.lower()) for c in CRITERIA]  # accuracy ... overall_score

# the reference's cleanup: a leading quoted ellipsis, empty-alt Markdown image lines
_ELLIPSIS = re.compile(r'^["“”]…+["“”]|^["“”]\.\.\.+["“”]')
_LINK = re.compile(r"!\[\]\([\/]?[^\)]+\)\n")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z]+", "", name.lower())


_BY_NAME = {_norm(c): k for c, k in zip(CRITERIA, KEYS)}
_DOMAIN_BY_NAME = {_norm(d): d for d in DOMAINS}


def parse_dataman(text: str | None) -> tuple[str, list[int]]:
    """(domain, 14 scores) from the DataMan model's answer: exactly 15 lines, a domain letter A-O,
    then 14 integers 1-5. Reasons: ``empty_answer``, ``wrong_count``, ``bad_domain``, ``bad_score``."""
    if not text or not text.strip():
        raise ParseError("empty_answer", "the answer is blank")
    lines = [ln.strip() for ln in text.strip().split("\n")]
    if len(lines) != 15:
        raise ParseError("wrong_count", f"{len(lines)} lines, expected a domain and 14 scores")
    domain = DOMAIN_LETTERS.get(lines[0])
    if domain is None:
        raise ParseError("bad_domain", f"{lines[0]!r} is not a domain letter A-O")
    scores = []
    for ln in lines[1:]:
        if not re.fullmatch(r"[1-5]", ln):
            raise ParseError("bad_score", f"{ln!r} is not a score 1-5")
        scores.append(int(ln))
    return domain, scores


_LINE = re.compile(r"^[\s>*#-]*(?:\[?\d{1,2}[\].)]\s*)?\**(?P<name>[A-Za-z][A-Za-z &/-]*?)\**\s*[:=]\s*\**\s*"
                   r"(?P<value>.+?)\s*$")


def parse_named(text: str | None) -> tuple[str, list[int]]:
    """(domain, 14 scores) from ``Domain: <name>`` and ``<Criterion>: <1-5>`` lines (any order,
    other lines ignored). Reasons: ``empty_answer``, ``no_domain``, ``bad_domain``, ``bad_score``,
    ``conflicting_scores``, ``missing_criteria``."""
    if not text or not text.strip():
        raise ParseError("empty_answer", "the answer is blank")
    scores: dict[str, int] = {}
    domain: str | None = None
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        name, value = _norm(m.group("name")), m.group("value").strip().strip("*").strip()
        if name in ("domain", "domaintype"):
            v = re.sub(r"^\[?([A-O])[\]).:]\s*", "", value)  # "[E] Technology" / "E) Technology"
            d = _DOMAIN_BY_NAME.get(_norm(v)) or (DOMAIN_LETTERS.get(value) if len(value) == 1 else None)
            if d is None:
                raise ParseError("bad_domain", f"{value!r} is not one of the 15 domains")
            if domain is not None and d != domain:
                raise ParseError("conflicting_domains", f"{domain} and {d}")
            domain = d
            continue
        key = _BY_NAME.get(name)
        if key is None:
            continue
        sm = re.match(r"(\d+(?:\.\d+)?)\s*(?:/\s*5)?(?!\d)", value)
        if not sm or float(sm.group(1)) != int(float(sm.group(1))) or not 1 <= int(float(sm.group(1))) <= 5:
            raise ParseError("bad_score", f"{m.group('name').strip()}: {value!r} is not a whole score 1-5")
        s = int(float(sm.group(1)))
        if scores.get(key, s) != s:
            raise ParseError("conflicting_scores", f"{m.group('name').strip()} rated {scores[key]} and {s}")
        scores[key] = s
    if domain is None:
        raise ParseError("no_domain", "no 'Domain:' line")
    missing = [c for c, k in zip(CRITERIA, KEYS) if k not in scores]
    if missing:
        raise ParseError("missing_criteria", f"no score for {missing}")
    return domain, [scores[k] for k in KEYS]


class _RatingsBase(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _lenient(cls, data: Any) -> Any:
        """Unconstrained answers: a domain named in another case or by its letter, scores as "4"."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        d = out.get("domain")
        if isinstance(d, str):
            out["domain"] = _DOMAIN_BY_NAME.get(_norm(d)) or DOMAIN_LETTERS.get(d.strip(), d)
        for k in KEYS:
            v = out.get(k)
            if isinstance(v, str) and v.strip() in ("1", "2", "3", "4", "5"):
                out[k] = int(v.strip())
        return out


# the JSON answer of format instruct with structured outputs: {"domain": ..., "accuracy": 1-5, ...}
Ratings = create_model(
    "Ratings", __base__=_RatingsBase,
    domain=(Literal[tuple(DOMAINS)], ...),  # type: ignore[valid-type]
    **{k: (Literal[1, 2, 3, 4, 5], ...) for k in KEYS})


class LlmRateConfig(LLMStageConfig):
    format: Literal["dataman", "instruct"] = Field(
        "instruct", description="dataman: the DataMan model's own prompt/answer; instruct: any instruct model")
    template: str | None = Field(None, description="prompt template id (default: llm_rate/<format>)")
    text_column: str = "text"
    column_prefix: str = Field("dataman_", description="prefix of the output columns")
    max_text_tokens: int = Field(1894, ge=16, description="longer texts keep head and tail, '...' between")
    max_text_chars: int | None = Field(20000, ge=100, description="first cut: first and last half of this many characters")
    cleanup: bool = Field(True, description="remove a leading quoted ellipsis and empty-alt image lines (as the reference)")
    on_error: Literal["keep", "drop"] = Field("keep", description="rows whose answer never parsed: keep (null ratings) or drop")
    structured: bool | None = Field(
        None, description="format instruct: answer as JSON (schema Ratings, prompt llm_rate/instruct_json); "
                          "None: when the engine enforces answer schemas (openai structured_outputs, vllm)")
    batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _answer_tokens(self) -> "LlmRateConfig":
        if self.structured and self.format == "dataman":
            raise ValueError("structured: true is for format: instruct (the DataMan model answers in its own format)")
        if "max_tokens" not in self.model_fields_set:
            # DataMan answers in 29 tokens (a letter, 14 digits, 14 newlines); named lines need more
            self.max_tokens = 29 if self.format == "dataman" else 160
        return self


@register
class LlmRate(LLMStage):
    """DataMan-style LLM rating: 14 quality criteria (1-5) and one of 15 domains per document."""

    name = "llm_rate"
    recipe = "llm_rate"
    Config = LlmRateConfig
    synthetic = False
    count_scored = True
    reads = ("{text_column}",)
    provided_variables = frozenset({"text"})

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        p = self.config.column_prefix
        self.columns = [p + k for k in KEYS]
        self.writes = {**{c: pa.int8() for c in self.columns}, p + "domain": pa.string(),
                       self.provenance_column(): pa.string()}

    @property
    def json_answer(self) -> bool:
        """Answers are JSON (schema :data:`Ratings`) rather than lines."""
        cfg = self.config
        if cfg.format == "dataman":
            return False
        return cfg.structured if cfg.structured is not None else cfg.engine.structured()

    @property
    def template_id(self) -> str:
        cfg = self.config
        return cfg.template or ("llm_rate/instruct_json" if self.json_answer else f"llm_rate/{cfg.format}")

    def template_ids(self) -> list[str]:
        return [self.template_id]

    def prepare(self, text: str) -> str:
        """The text as the rater sees it: cleaned, cut to the budget keeping head and tail."""
        cfg = self.config
        if cfg.cleanup:
            text = _LINK.sub("", _ELLIPSIS.sub("", text))
        n = cfg.max_text_chars
        if n and len(text) > n:
            text = text[: n // 2] + text[-(n // 2):]
        tok = self.engine.hf_tokenizer()
        out, cut = cut_text(text, cfg.max_text_tokens, tokenizer=tok, count=self.engine.count_tokens)
        if cut:
            self.count("llm_rate/cut_docs")
        elif tok is not None and cfg.format == "dataman":
            # the reference passes every text through its tokenizer (normalisation) and strips it
            out = tok.convert_tokens_to_string(tok.tokenize(out)).strip()
        return out

    def parse_answer(self, completions: list[Completion]) -> list[dict[str, Any]]:
        if self.json_answer:   # validated against Ratings by the base
            obj = completions[0].parsed
            domain, scores = obj.domain, [getattr(obj, k) for k in KEYS]
        else:
            parse = parse_dataman if self.config.format == "dataman" else parse_named
            domain, scores = parse(completions[0].text)
        return [{**dict(zip(self.columns, scores)), self.config.column_prefix + "domain": domain}]

    def jobs(self, unit: Unit) -> list[Job]:
        text = str(unit.row[self.config.text_column])
        req = self.ask(self.template_id, row=unit.row, text=self.prepare(text),
                       answer_schema=Ratings if self.json_answer else None)
        return [Job(unit.index, [req], self.parse_answer, self.template(self.template_id))]

    def provenance_column(self) -> str:
        return self.config.column_prefix + "provenance"
