"""``reading_comprehension``: turn each document into a reading-comprehension text (AdaptLLM).

The method of "Adapting Large Language Models via Reading Comprehension" (Cheng et al., ICLR 2024;
reference code: microsoft/LMOps, ``adaptllm/utils/read.py``), with our own code and wording. No LLM:
regular expressions mine sentence pairs from the document, each pair becomes a question and its
answer, and the tasks are appended after the document.

Per document:

1. Title = first line (``title: first_line``; a document without a newline or with an empty first
   line has no title), body = the rest (with ``title_column``, a first body line equal to the title
   is removed: a page's heading repeats its title). Prose lines that extraction hard-wrapped are
   joined (``unwrap_lines``; code, lists, prompts and indented lines are kept). A body longer than
   ``max_body_tokens`` (1,848 = 2,048 − 200, as the reference) of ``tokenizer`` (without one,
   ``max_body_tokens × words_per_token`` whitespace words) is split into pieces at paragraph, line
   or sentence ends, each an output row (id ``<id>#<k>``, ``source_text`` = the piece) mined and
   wrapped on its own (``long_documents: split``, default), or cut to its first piece as the
   reference does (``long_documents: cut``: a SentencePiece ``.model`` cuts exactly as the
   reference, ``decode(encode(body)[:n])``; the text left out is counted as ``chars_cut``).
2. Mining, case-insensitive, over the cut body (the patterns are the reference's, character for
   character, so the raw matches are the same):
   ``entail`` / ``contradict`` / ``neutral`` (``<sentence> <connective>, <sentence>``, sentences of
   >= 50 characters without ``, . ! ? newline``), ``cause_effect``, ``effect_cause`` (``due to`` ...,
   no comma, ``;`` excluded), ``similar`` / ``different`` paraphrases (commas allowed), ``definition``
   (``<word of >= 10 chars> is defined as ...``), ``topic`` (``... is about ...``) and, when
   ``keywords`` is set, ``keywords``: sentences with >= 3 domain-specific pieces (pieces of a domain
   SentencePiece model that start a word, are longer than 10 characters with the ``▁``, and are not
   in the general tokenizer's vocabulary) and at most 100 distinct pieces; at most 2 per document.
   As in the reference, ``i.e.`` is a pattern whose dots match any character (``exact_reference``).
3. At most ``max_per_subtype`` (2) examples per sub-type, drawn with the document's seed; each is
   rendered with a template of its type from ``curate/prompts/reading_comprehension/*.yaml``
   (NLI: 80% ask for the relation, 20% generate the second sentence). Examples of one task family
   (nli, cause_effect, paraphrase, word2text) form a block; blocks are shuffled and put after an
   intro line.
4. Wrapping: with a title and >= 2 sentences the document is wrapped with title summarisation
   (p=0.4), text completion (0.1), both (0.4) or neither (0.1); with only one of the two, that one
   or neither at 0.5 each. Runs of spaces inside a line become one space (as the reference; a
   line's indentation is kept).

Every random choice comes from ``random.Random("<seed>|<document id>")``: the same id and seed give
the same text byte for byte, whatever the sharding, worker count or Python hash seed.

Sentences (for completion cuts and keyword sentences) come from a fast rule splitter (split after
``.!?`` followed by space and a capital, digit or quote, not after common abbreviations or
initials; and at blank lines), not pysbd: the regex mining does not use sentences at all, so its
matches do not depend on the splitter; only ``keywords`` and the completion cut do.

Writes ``output_column`` (default ``text``: the assembled text), keeps the source text in
``source_text_column``, and one int32 column per sub-type with the number of raw matches found
(before the cap): ``rc_entail`` ... ``rc_keywords``, plus ``rc_summarize`` / ``rc_completion``
(1 when the document was wrapped so). Counters: ``reading_comprehension/mined/<sub-type>``,
``reading_comprehension/used/<sub-type>``, ``reading_comprehension/wrap/<choice>``,
``reading_comprehension/no_tasks`` (rows without a mined task; a warning when most are),
``reading_comprehension/chars_in``, ``chars_cut``, ``cut_documents``, ``split_documents``,
``pieces``, ``unwrapped_lines``, ``title_line_removed``; documents with no text are passed through and counted as
``reading_comprehension/empty``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import re
import string
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate.pipeline.api import MapStage, StageConfig, StageError, register, set_column as _set_column
from curate.text.adaptllm import (FAMILIES, SUBTYPES, AdaptLLMError, KeywordMiner, KeywordOptions, Miner,
                                  has_two_sentences, split_long, split_sentences, train_domain_tokenizer,
                                  unwrap_lines)

# --------------------------------------------------------------------------------------------------
# templates

PROMPT_IDS = {"nli": "reading_comprehension/nli", "cause_effect": "reading_comprehension/cause_effect",
              "paraphrase": "reading_comprehension/paraphrase", "word2text": "reading_comprehension/word2text",
              "document": "reading_comprehension/document"}

_FIELDS = {
    ("nli", "classify"): {"premise", "hypothesis", "options", "answer", "connective_answer", "relation"},
    ("nli", "generate_entail"): {"premise", "hypothesis", "verbalizer"},
    ("nli", "generate_neutral"): {"premise", "hypothesis", "verbalizer"},
    ("nli", "generate_contradict"): {"premise", "hypothesis", "verbalizer"},
    ("cause_effect", "cause_effect"): {"cause", "effect", "verbalizer"},
    ("cause_effect", "effect_cause"): {"cause", "effect", "verbalizer"},
    ("paraphrase", "similar"): {"sentence1", "sentence2", "verbalizer"},
    ("paraphrase", "different"): {"sentence1", "sentence2", "verbalizer"},
    ("word2text", "keywords"): {"keywords", "domain", "sentence"},
    ("word2text", "definition"): {"word", "verbalizer", "definition"},
    ("word2text", "topic"): {"sentence", "verbalizer", "topic"},
    ("document", "summarize"): {"body", "title", "domain", "tasks"},
    ("document", "completion"): {"first", "second", "domain", "tasks"},
    ("document", "summarize_completion"): {"first", "second", "title", "domain", "tasks"},
    ("document", "plain"): {"text", "domain", "tasks"},
    ("document", "intros"): {"domain"},
}


def load_templates(folder: str | None = None) -> dict[str, dict[str, Any]]:
    """The template files, checked: every list present and non-empty, only known placeholders."""
    from curate.prompts import PromptError, load_prompt

    out = {}
    for family, pid in PROMPT_IDS.items():
        try:
            out[family] = load_prompt(pid, folder)
        except PromptError as exc:
            raise StageError(f"reading_comprehension: {exc}") from None
    fmt = string.Formatter()
    for (family, key), allowed in _FIELDS.items():
        items = out[family].get(key)
        if not items:
            raise StageError(f"reading_comprehension: templates {PROMPT_IDS[family]!r} need a "
                             f"non-empty list {key!r}")
        for t in items:
            parts = [t] if isinstance(t, str) else list(t)
            if family != "document" and len(parts) != 2:
                raise StageError(f"reading_comprehension: {PROMPT_IDS[family]}.{key}: a template is "
                                 f"[question, answer], got {t!r}")
            for s in parts:
                used = {f for _, f, _, _ in fmt.parse(s) if f}
                if used - allowed:
                    raise StageError(f"reading_comprehension: {PROMPT_IDS[family]}.{key}: unknown "
                                     f"placeholder(s) {sorted(used - allowed)} in {s!r}")
    return out


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_INNER_SPACES = re.compile(r"(?<=[^\s]) {2,}")


def _one_space(s: str) -> str:
    """Runs of spaces inside a line become one space (the reference's last step), but a line's
    leading indentation is kept (the reference flattened code blocks)."""
    if "  " not in s:
        return s
    return _INNER_SPACES.sub(" ", s)


# --------------------------------------------------------------------------------------------------
# the stage


class ReadingComprehensionConfig(StageConfig):
    domain: str = Field(..., min_length=1, description="domain name used in the wording, e.g. biomedicine")
    text_column: str = Field("text", description="column holding the document text")
    id_column: str = Field("id", description="document id: seeds every random choice")
    output_column: str = Field("text", description="where the assembled text goes")
    source_text_column: str | None = Field("source_text", description="copy of the source text "
                                           "(null: not kept; needed when output_column is text_column)")
    title: str = Field("first_line", pattern="^(first_line|none)$",
                       description="first_line: the first line is the title; none: no title")
    title_column: str | None = Field(None, description="take the title from this column instead "
                                     "(the whole text is then the body)")
    max_body_tokens: int = Field(1848, ge=1, description="cut the body to this many tokens before mining")
    tokenizer: str | None = Field(None, description="tokenizer for the cut: SentencePiece .model, "
                                  "tokenizer.json or model folder; null: whitespace words")
    words_per_token: float = Field(0.75, gt=0, le=10, description="without a tokenizer: keep "
                                   "max_body_tokens × this many words")
    max_per_subtype: int = Field(2, ge=1, description="examples per sub-type per document")
    seed: int = Field(0, description="mixed with the document id for every random choice")
    keywords: KeywordOptions | None = Field(None, description="domain keyword tasks (optional)")
    prompts_dir: str | None = Field(None, description="folder with your own reading_comprehension/*.yaml "
                                    "(old name: templates)")
    exact_reference: bool = Field(True, description="keep the reference's `i.e.` pattern whose dots "
                                  "match any character (false: literal dots)")
    long_documents: Literal["split", "cut"] = Field(
        "split", description="split: a body longer than max_body_tokens becomes several output rows "
        "(pieces of at most max_body_tokens, cut at paragraph, line or sentence ends; ids <id>#<k>), "
        "each mined and wrapped; cut: keep only the first max_body_tokens, as the reference does")
    unwrap_lines: bool = Field(True, description="join prose lines that extraction wrapped (a line "
                               "continuing the sentence of the line before) before mining; code, "
                               "lists and indented lines are kept as they are")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        from curate.prompts import renamed_prompts_dir
        return renamed_prompts_dir(data, "reading_comprehension")

    @model_validator(mode="after")
    def _source_kept(self) -> "ReadingComprehensionConfig":
        if self.output_column == self.text_column and self.source_text_column == self.text_column:
            raise ValueError("source_text_column must differ from text_column")
        return self


COUNT_COLUMNS = [f"rc_{s}" for s in SUBTYPES] + ["rc_summarize", "rc_completion"]


@register
class ReadingComprehension(MapStage):
    """AdaptLLM reading comprehension: regex-mined tasks appended to each document (no LLM)."""

    name = "reading_comprehension"
    Config = ReadingComprehensionConfig
    reads = ("{text_column}", "{id_column}")
    writes = {"text": pa.string(), "source_text": pa.string(),
              **{c: pa.int32() for c in COUNT_COLUMNS}}
    preload = ("curate.stages.synth.reading_comprehension",)

    def input_columns(self) -> tuple[str, ...]:
        cols = super().input_columns()
        return cols + ((self.config.title_column,) if self.config.title_column else ())

    def check(self) -> list[tuple[str, str]]:
        from curate.text.tokens import TokenizerError, resolve_tokenizer_path
        problems = []
        for key, spec in (("tokenizer", self.config.tokenizer),
                          ("keywords.general_tokenizer", self.config.keywords and self.config.keywords.general_tokenizer),
                          ("keywords.domain_tokenizer", self.config.keywords and self.config.keywords.domain_tokenizer)):
            if spec and spec != "whitespace":
                try:
                    resolve_tokenizer_path(spec)
                except TokenizerError as exc:
                    problems.append((key, str(exc)))
        try:
            load_templates(self.config.prompts_dir)
        except StageError as exc:
            problems.append(("prompts_dir", str(exc)))
        return problems

    def fingerprint_extra(self) -> str:
        t = load_templates(self.config.prompts_dir)
        return "templates:" + ",".join(f"{k}={v['version']}" for k, v in sorted(t.items()))

    def setup(self) -> None:
        from curate.text.tokens import TokenizerError, load_tokenizer

        c = self.config
        self.miner = Miner(c.exact_reference)
        self.t = load_templates(c.prompts_dir)
        try:
            self.cutter = load_tokenizer(c.tokenizer)
        except (TokenizerError, OSError, RuntimeError) as exc:
            raise StageError(f"reading_comprehension: tokenizer: {exc}") from None
        by_words = c.tokenizer in (None, "whitespace")
        self.cut_n = max(1, int(c.max_body_tokens * c.words_per_token)) if by_words else c.max_body_tokens
        self.keywords = None
        if c.keywords is not None:
            model = c.keywords.domain_tokenizer or self._trained_domain_model()
            try:
                self.keywords = KeywordMiner(c.keywords, model)
            except AdaptLLMError as exc:
                raise StageError(str(exc)) from None
        probs = self.t["document"].get("wrap_probabilities", {})
        self.wrap_p = {k: (list(v), [float(x) for x in v.values()]) for k, v in probs.items()}
        for key in ("title_and_sentences", "title_only", "sentences_only"):
            if key not in self.wrap_p:
                raise StageError(f"reading_comprehension: document templates need "
                                 f"wrap_probabilities.{key}")
        self.gen_p = float(self.t["nli"].get("generate_probability", 0.2))

    # -- keyword model -----------------------------------------------------------------------------
    def _trained_domain_model(self) -> str:
        """Train (once, under a lock, cached by options and input sizes) a domain SentencePiece
        model on ``keywords.train_from``."""
        import tempfile

        from curate.pipeline.api import Dataset, expand_paths, get_fs

        k = self.config.keywords
        paths = [k.train_from] if isinstance(k.train_from, str) else list(k.train_from)
        try:
            files = expand_paths(paths, None)
        except FileNotFoundError as exc:
            raise StageError(f"reading_comprehension: keywords.train_from: not found: {exc.args[0]}") from None
        if not files:
            raise StageError(f"reading_comprehension: keywords.train_from: no files in {paths}")
        h = hashlib.blake2b(digest_size=8)
        for f in files:
            fs, p = get_fs(f)
            h.update(f"{f}:{fs.size(p)}".encode())
        h.update(f"{k.vocab_size}:{k.train_max_sentences}:{k.train_column}".encode())
        base = self.workdir or os.path.join(tempfile.gettempdir(), "curate-rc")
        os.makedirs(base, exist_ok=True)
        prefix = os.path.join(base, f"domain-{h.hexdigest()}")
        with open(prefix + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(prefix + ".model"):
                def texts():
                    for f in files:
                        if f.endswith(".parquet"):
                            for t in Dataset([f]).iter_tables(columns=[k.train_column]):
                                yield from t.column(k.train_column).to_pylist()
                        else:
                            fs, p = get_fs(f)
                            with fs.open(p, "rt", encoding="utf-8") as fh:
                                yield fh.read()
                try:
                    train_domain_tokenizer(texts(), prefix + ".tmp", k.vocab_size, k.train_max_sentences)
                except AdaptLLMError as exc:
                    raise StageError(str(exc)) from None
                os.replace(prefix + ".tmp.model", prefix + ".model")
        return prefix + ".model"

    # -- per document ------------------------------------------------------------------------------
    def split(self, text: str, title: str | None) -> tuple[str | None, str]:
        if self.config.title_column is not None:
            return (title.strip() or None) if title else None, text
        if self.config.title == "first_line":
            head, nl, rest = text.partition("\n")
            if nl and head.strip():
                return head, rest
        return None, text

    def mine(self, body: str) -> dict[str, list]:
        return self.miner.mine(body)

    def prepare(self, text: str, title: str | None = None) -> tuple[str | None, str]:
        """(title, body cut to ``max_body_tokens``): what the tasks are mined from and wrapped around."""
        title, body = self.split(text, title)
        return title, self.cutter.truncate(body, self.cut_n)

    def render(self, doc_id: str, text: str, title: str | None = None) -> tuple[str, dict[str, int], dict[str, int], str]:
        """(assembled text, raw counts per sub-type, used counts per sub-type, wrap choice)."""
        rng = self.rng(doc_id)
        title, body = self.prepare(text, title)
        blocks, raw, used, sents = self.mined_blocks(body, rng)
        out, wrap = self.assemble(title, body, blocks, rng, sents)
        return out, raw, used, wrap

    def rng(self, doc_id: str) -> random.Random:
        """The document's random source: every choice for it comes from here, in a fixed order."""
        return random.Random(f"{self.config.seed}|{doc_id}")

    def mined_blocks(self, body: str, rng: random.Random) -> tuple[list[str], dict[str, int], dict[str, int],
                                                                    list[str] | None]:
        """(task blocks, raw counts per sub-type, used counts, sentences when they were split)."""
        c = self.config
        mined: dict[str, list] = self.miner.mine(body)
        sents = None  # split only when needed (keywords, a completion cut)
        if self.keywords is not None:
            sents = split_sentences(body)
            mined["keywords"] = self.keywords.mine(sents, rng)
        else:
            mined["keywords"] = []
        raw = {k: len(v) for k, v in mined.items()}
        used = {}
        blocks = []
        for family, subs in FAMILIES.items():
            examples = []
            for sub in subs:
                items = mined[sub]
                if not items:
                    continue
                chosen = rng.sample(items, min(c.max_per_subtype, len(items)))
                used[sub] = len(chosen)
                examples.extend(self._example(family, sub, item, rng) for item in chosen)
            if examples:
                blocks.append("\n\n".join(examples))
        return blocks, raw, used, sents

    def assemble(self, title: str | None, body: str, blocks: list[str], rng: random.Random,
                 sents: list[str] | None = None) -> tuple[str, str]:
        """The output text from the task blocks (shuffled, after an intro line) and the wrapping
        (title summarisation / text completion / plain); returns (text, wrap choice). Used by the
        regex miner and by ``rc_llm`` (question-answer pairs from an LLM)."""
        domain = self.config.domain
        blocks = list(blocks)
        rng.shuffle(blocks)
        doc_t = self.t["document"]
        if blocks:
            intro = rng.choice(doc_t["intros"]).format(domain=domain)
            tasks = intro + "\n\n".join(blocks)
        else:
            tasks = ""
        has_title = title is not None
        has_sents = len(sents) >= 2 if sents is not None else has_two_sentences(body)
        key = ("title_and_sentences" if has_title and has_sents else "title_only" if has_title
               else "sentences_only" if has_sents else None)
        if key is None:
            wrap = "plain"
        else:
            names, weights = self.wrap_p[key]
            wrap = rng.choices(names, weights)[0]
        template = rng.choice(doc_t[wrap])
        if wrap in ("completion", "summarize_completion"):
            sents = sents if sents is not None else split_sentences(body)
            cut = rng.randint(1, len(sents) - 1)
            first = "".join(sents[:cut]).strip()
            if wrap == "completion" and title is not None:
                first = title + "\n" + first
            out = template.format(first=first, second="".join(sents[cut:]).strip(), title=title,
                                  domain=domain, tasks=tasks)
        elif wrap == "summarize":
            out = template.format(body=body.strip(), title=title, domain=domain, tasks=tasks)
        else:
            head = title + "\n" if title is not None else ""
            out = template.format(text=head + body.strip(), domain=domain, tasks=tasks)
        return _one_space(out), wrap

    def _example(self, family: str, sub: str, item, rng: random.Random) -> str:
        t = self.t[family]
        domain = self.config.domain
        if family == "nli":
            premise, verbalizer, hypothesis = item
            ans = t["answers"][sub]
            kw = {"premise": premise, "hypothesis": _cap(hypothesis), "verbalizer": verbalizer,
                  "options": t["options"], **ans}
            pool = t[f"generate_{sub}"] if rng.random() < self.gen_p else t["classify"]
        elif family == "cause_effect":
            s1, verbalizer, s2 = item
            if sub == "cause_effect":
                kw = {"cause": s1, "effect": _cap(s2), "verbalizer": verbalizer}
            else:
                kw = {"cause": _cap(s2), "effect": s1, "verbalizer": verbalizer}
            pool = t[sub]
        elif family == "paraphrase":
            s1, verbalizer, s2 = item
            kw = {"sentence1": s1, "sentence2": _cap(s2), "verbalizer": verbalizer}
            pool = t[sub]
        elif sub == "keywords":
            words, sentence = item
            kw = {"keywords": ", ".join(words[: self.config.keywords.min_keywords]), "domain": domain,
                  "sentence": sentence}
            pool = t[sub]
        elif sub == "definition":
            word, verbalizer, definition = item
            kw = {"word": word, "verbalizer": verbalizer, "definition": definition}
            pool = t[sub]
        else:
            sentence, verbalizer, topic = item
            kw = {"sentence": sentence, "verbalizer": verbalizer, "topic": topic}
            pool = t[sub]
        q, a = rng.choice(pool)
        question = q.format(**kw)
        # one space joins question and answer (the reference's delimiter), but never onto the last
        # item of an option list ("- Maybe Yes")
        sep = "\n" if question.rsplit("\n", 1)[-1].lstrip().startswith(("- ", "* ")) else " "
        return question + sep + a.format(**kw)

    def pieces(self, text: str, title: str | None = None) -> list[tuple[str | None, str]]:
        """(title, body) pieces of one document, to mine and wrap each: the body with a repeated
        title line removed, wrapped lines joined (``unwrap_lines``), then split into pieces of at
        most ``max_body_tokens`` (``long_documents: split``) or cut to its first piece (``cut``).
        Counts ``chars_in`` / ``chars_cut`` (text left out), ``unwrapped_lines``,
        ``split_documents`` and ``pieces``."""
        c = self.config
        title, body = self.split(text, title)
        if c.title_column is not None and title:
            head, nl, rest = body.lstrip("\n").partition("\n")
            if head.strip().rstrip("¶").strip() == title.strip().rstrip("¶").strip():
                body = rest   # the page's heading repeats its title: keep it once
                self.count("reading_comprehension/title_line_removed")
        if c.unwrap_lines:
            body, joins = unwrap_lines(body)
            if joins:
                self.count("reading_comprehension/unwrapped_lines", joins)
        self.count("reading_comprehension/chars_in", len(body))
        if c.long_documents == "cut":
            cut = self.cutter.truncate(body, self.cut_n)
            if len(cut) < len(body):
                self.count("reading_comprehension/chars_cut", len(body) - len(cut))
                self.count("reading_comprehension/cut_documents")
            return [(title, cut)]
        parts = split_long(body, self.cutter, self.cut_n) or [body]
        if len(parts) > 1:
            self.count("reading_comprehension/split_documents")
        self.count("reading_comprehension/pieces", len(parts))
        return [(title, p) for p in parts]

    def render_piece(self, piece_id: str, title: str | None, body: str) -> tuple[str, dict[str, int], dict[str, int], str]:
        """(assembled text, raw counts, used counts, wrap choice) of one piece."""
        rng = self.rng(piece_id)
        blocks, raw, used, sents = self.mined_blocks(body, rng)
        out, wrap = self.assemble(title, body, blocks, rng, sents)
        return out, raw, used, wrap

    def process(self, table: pa.Table) -> pa.Table:
        c = self.config
        texts = table.column(c.text_column).to_pylist()
        ids = table.column(c.id_column).to_pylist()
        titles = table.column(c.title_column).to_pylist() if c.title_column else [None] * len(texts)
        outs: list[str | None] = []
        sources: list[str | None] = []
        rows: list[int] = []          # input row of each output row
        out_ids: list[Any] = []
        counts = {col: [] for col in COUNT_COLUMNS}
        totals: dict[str, int] = {}
        for i, (doc_id, text, title) in enumerate(zip(ids, texts, titles)):
            if not text or not text.strip():
                self.count("reading_comprehension/empty")
                outs.append(text)
                sources.append(text)
                rows.append(i)
                out_ids.append(doc_id)
                for col in COUNT_COLUMNS:
                    counts[col].append(0)
                continue
            if doc_id is None:
                raise StageError(f"reading_comprehension: a document has no {c.id_column!r}; ids seed "
                                 "the output")
            pieces = self.pieces(text, title)
            for k, (piece_title, body) in enumerate(pieces):
                piece_id = str(doc_id) if len(pieces) == 1 else f"{doc_id}#{k}"
                out, raw, used, wrap = self.render_piece(piece_id, piece_title, body)
                outs.append(out)
                sources.append(text if len(pieces) == 1 else body)
                rows.append(i)
                out_ids.append(doc_id if len(pieces) == 1 else piece_id)
                for s in SUBTYPES:
                    counts[f"rc_{s}"].append(raw[s])
                    if raw[s]:
                        totals[f"mined/{s}"] = totals.get(f"mined/{s}", 0) + raw[s]
                        totals[f"used/{s}"] = totals.get(f"used/{s}", 0) + used[s]
                counts["rc_summarize"].append(int(wrap in ("summarize", "summarize_completion")))
                counts["rc_completion"].append(int(wrap in ("completion", "summarize_completion")))
                totals[f"wrap/{wrap}"] = totals.get(f"wrap/{wrap}", 0) + 1
                if not used:
                    totals["no_tasks"] = totals.get("no_tasks", 0) + 1
        for k, v in totals.items():
            self.count(f"reading_comprehension/{k}", v)
        out_t = table
        if len(rows) != table.num_rows:   # some documents were split: one row per piece
            out_t = table.take(pa.array(rows, pa.int64()))
            id_type = table.schema.field(c.id_column).type
            out_t = _set_column(out_t, c.id_column, pa.array([str(x) for x in out_ids]).cast(id_type))
        if c.source_text_column:
            out_t = _set_column(out_t, c.source_text_column, pa.array(sources, pa.string()))
        out_t = _set_column(out_t, c.output_column, pa.array(outs, pa.string()))
        for col in COUNT_COLUMNS:
            out_t = _set_column(out_t, col, pa.array(counts[col], pa.int32()))
        return out_t

