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
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.pipeline.stage import MapStage, StageConfig, StageError, register

# --------------------------------------------------------------------------------------------------
# connectives and patterns (the reference's lists, in its order: alternation order decides which
# connective is captured)

ENTAIL = ["Yes", "Therefore", "Thus", "Accordingly", "Hence", "For this reason"]
CONTRADICT = ["No", "However", "But", "On the contrary", "In contrast", "Whereas"]
NEUTRAL = ["Maybe", "Also", "Furthermore", "Secondly", "Additionally", "Moreover", "In addition"]
CAUSE_EFFECT = ["Thus", "Therefore", "Accordingly", "Hence", "For this reason"]
EFFECT_CAUSE = ["due to", "on account of", "owing to"]
SIMILAR = ["In other words", "In other word", "Namely", "That is to say", "i.e.", "Scilicet",
           "Similarly", "Equally"]
DEFINITION = ["is defined as", "'s definition is"]
TOPIC = ["was about", "talks about", "is about", "'s topic is"]

# sentence bodies: >= 50 characters without these, then a run of end punctuation
_NO_COMMA = r"[^.!?\n,]{50,}[.!?]+"
_COMMA_OK = r"[^.!?\n]{50,}[.!?]+"
_NO_COMMA_SEMI = r"[^.!?;\n,]{50,}[.!?]+"
_COMMA_JOIN = r"\s*,\s+"
_SPACE_JOIN = r"\s+"

SUBTYPES = ["entail", "contradict", "neutral", "cause_effect", "effect_cause", "similar", "different",
            "definition", "topic", "keywords"]
FAMILIES = {"nli": ["entail", "contradict", "neutral"], "cause_effect": ["cause_effect", "effect_cause"],
            "paraphrase": ["similar", "different"], "word2text": ["definition", "topic", "keywords"]}
PAIR_SUBTYPES = ["entail", "contradict", "neutral", "cause_effect", "effect_cause", "similar", "different"]


_ODD_FOLDS = re.compile("[\u0130\u0131\u017f]")


def _alt(words: list[str], literal: bool = True) -> str:
    return "|".join(re.escape(w) if literal else w for w in words)


def _pair_pattern(sentence: str, connectives: str, join: str) -> str:
    # run of end punctuation, space, sentence 1, space, connective, joiner, sentence 2, space
    return rf"[.!?]+\s+({sentence})\s+({connectives}){join}({sentence})\s+"


class Miner:
    """The regex miner. ``mine(body)`` returns {sub-type: [captured tuples]} with the same matches,
    in the same order, as ``re.findall`` of the reference's patterns over the same body.

    Speed: the seven pair patterns are not run over the whole body. One scan finds every end-of-
    sentence mark followed by a connective; a match can only contain such a spot, and it lies
    between the punctuation run before the first sentence and the whitespace after the second, so
    each pattern is searched only in those windows (non-overlap is kept by searching from the end
    of its previous match)."""

    def __init__(self, exact_reference: bool = True):
        similar = _alt(SIMILAR) if not exact_reference else "|".join(
            w if w == "i.e." else re.escape(w) for w in SIMILAR)  # "i.e.": dots match any character
        contra = _alt(CONTRADICT)
        flags = re.IGNORECASE
        self.pairs: dict[str, re.Pattern] = {
            "entail": re.compile(_pair_pattern(_NO_COMMA, _alt(ENTAIL), _COMMA_JOIN), flags),
            "contradict": re.compile(_pair_pattern(_NO_COMMA, contra, _COMMA_JOIN), flags),
            "neutral": re.compile(_pair_pattern(_NO_COMMA, _alt(NEUTRAL), _COMMA_JOIN), flags),
            "cause_effect": re.compile(_pair_pattern(_NO_COMMA, _alt(CAUSE_EFFECT), _COMMA_JOIN), flags),
            "effect_cause": re.compile(_pair_pattern(_NO_COMMA_SEMI, _alt(EFFECT_CAUSE), _SPACE_JOIN), flags),
            "similar": re.compile(_pair_pattern(_COMMA_OK, similar, _COMMA_JOIN), flags),
            "different": re.compile(_pair_pattern(_COMMA_OK, contra, _COMMA_JOIN), flags),
        }
        every = _alt(ENTAIL + CONTRADICT + NEUTRAL + EFFECT_CAUSE + [w for w in SIMILAR if w != "i.e."])
        every += "|" + ("i.e." if exact_reference else re.escape("i.e."))
        # an end mark (the last of its run) followed by space and a connective: group 1 = connective
        self.spots = re.compile(rf"[.!?](?=\s+({every}))", flags)
        self.definition = re.compile(
            rf"\s+([^.!?,;\s\"]{{10,}})\s+({_alt(DEFINITION)})\s+([^.!?\n]{{20,}}[.!?]+)\s+", flags)
        self.topic = re.compile(
            rf"[.!?]+\s+([^.!?,;\n]{{20,}})\s+({_alt(TOPIC)})\s+([^.!?\n]{{20,}}[.!?]+)\s+", flags)
        # the phrases every definition (group 1) or topic (group 2) match contains
        self.gate = re.compile(r"(defined as|definition is)|(about|topic is)", flags)
        self.ws = re.compile(r"\s*")
        # which pair patterns can use a spot, by its connective (lowercased); others: try all
        self.by_connective: dict[str, list[str]] = {}
        for name, words in (("entail", ENTAIL), ("contradict", CONTRADICT), ("neutral", NEUTRAL),
                            ("cause_effect", CAUSE_EFFECT), ("effect_cause", EFFECT_CAUSE),
                            ("similar", SIMILAR), ("different", CONTRADICT)):
            for w in words:
                if w != "i.e.":
                    self.by_connective.setdefault(w.lower(), []).append(name)
        # "in other word" is a prefix of "in other words": the spot names the longer one
        self.by_connective["in other word"] = ["similar"]

    def mine(self, text: str) -> dict[str, list[tuple[str, str, str]]]:
        out: dict[str, list[tuple[str, str, str]]] = {k: [] for k in SUBTYPES if k != "keywords"}
        spots = list(self.spots.finditer(text))
        if spots:
            pos = dict.fromkeys(PAIR_SUBTYPES, 0)
            for m in spots:
                window = self._window(text, m.start(), m.end(1))
                if window is None:
                    continue
                lo, hi = window
                # no connective of one list is a prefix of one of another list, so the connective
                # the spot found tells which patterns can match here (unknown text: "i.e." or a
                # special case-folded character: try them all)
                for name in self.by_connective.get(m.group(1).lower(), PAIR_SUBTYPES):
                    start = max(lo, pos[name])
                    if start >= hi:
                        continue
                    hit = self.pairs[name].search(text, start, hi)
                    if hit is not None:
                        out[name].append(hit.groups())
                        pos[name] = hit.end()
        definitions, topics = self._gate(text)
        pos = 0
        for start, end in definitions:
            # the connective ("is defined as" / "'s definition is") starts 3 characters earlier
            window = self._definition_window(text, start - 3, end)
            if window is None or max(window[0], pos) >= window[1]:
                continue
            hit = self.definition.search(text, max(window[0], pos), window[1])
            if hit is not None:
                out["definition"].append(hit.groups())
                pos = hit.end()
        pos = 0
        for start, end in topics:
            # a topic match holds no end mark before its second sentence: same windows as pairs
            window = self._window(text, start, end)
            if window is None or max(window[0], pos) >= window[1]:
                continue
            hit = self.topic.search(text, max(window[0], pos), window[1])
            if hit is not None:
                out["topic"].append(hit.groups())
                pos = hit.end()
        return out

    def _definition_window(self, text: str, conn: int, conn_end: int) -> tuple[int, int] | None:
        """A definition match is ``space word space connective space sentence marks space``: it
        starts where the space before the word before the connective starts."""
        if conn < 2:
            return None
        k = conn
        while k > 0 and text[k - 1].isspace():
            k -= 1
        if k == conn:
            return None
        while k > 0 and not text[k - 1].isspace():
            k -= 1
        if k == 0:
            return None
        while k > 0 and text[k - 1].isspace():
            k -= 1
        hi = self._sentence_end(text, conn_end)
        return None if hi is None else (k, hi)

    def _gate(self, text: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Spans of the phrases every definition match ("defined as", "definition is") and every
        topic match ("about", "topic is") contains, in text order.

        A case-insensitive regex scan of literals is slow in Python's engine; ``str.lower`` and
        ``str.find`` are fast and agree with it for these words, unless the text has one of the
        few characters that fold to ``i`` or ``s`` under ``re.IGNORECASE`` but not under
        ``lower()`` (İ, ı, ſ): then the regex is used."""
        if _ODD_FOLDS.search(text):
            definitions, topics = [], []
            for g in self.gate.finditer(text):
                (definitions if g.group(1) is not None else topics).append(g.span())
            return definitions, topics
        low = text.lower()
        out = []
        for words in (("defined as", "definition is"), ("about", "topic is")):
            spans = []
            for word in words:
                i = low.find(word)
                while i >= 0:
                    spans.append((i, i + len(word)))
                    i = low.find(word, i + len(word))
            out.append(sorted(spans))
        return out[0], out[1]

    def _window(self, text: str, mark: int, conn_end: int) -> tuple[int, int] | None:
        q = mark  # first mark of the run that ends at `mark`
        while q > 0 and text[q - 1] in ".!?":
            q -= 1
        p = max(text.rfind(".", 0, q), text.rfind("!", 0, q), text.rfind("?", 0, q))
        if p < 0:
            return None  # no end mark before the first sentence: no match can use this spot
        while p > 0 and text[p - 1] in ".!?":
            p -= 1
        hi = self._sentence_end(text, conn_end)
        return None if hi is None else (p, hi)

    def _sentence_end(self, text: str, pos: int) -> int | None:
        """End of the whitespace after the first run of end marks at or after ``pos``: where a
        match whose last sentence starts after ``pos`` must end (its sentence holds no mark)."""
        e = [i for i in (text.find(".", pos), text.find("!", pos), text.find("?", pos)) if i >= 0]
        if not e:
            return None
        e = min(e)
        while e < len(text) and text[e] in ".!?":
            e += 1
        return self.ws.match(text, e).end()


# --------------------------------------------------------------------------------------------------
# sentences

_ABBREV = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "al", "fig", "figs",
    "eq", "eqs", "no", "nos", "vol", "vols", "pp", "p", "ch", "sec", "approx", "inc", "ltd", "co",
    "corp", "dept", "est", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
    "nov", "dec", "u.s", "u.k", "ref", "refs", "cf", "resp", "gen", "gov", "rev", "art", "ed", "eds",
}
# a run of end marks (+ closing quotes) and space before a capital, digit or opening quote; or a
# blank line. Written to start with one character class, which the regex engine scans for quickly.
_BOUNDARY = re.compile(r"""[.!?\n](?:(?<=[.!?])[.!?]*["'”’)\]]*\s+(?=["'“‘(\[]?[A-Z0-9])|(?<=\n)[ \t]*\n\s*)""")


def _sentence_ends(text: str):
    """End offsets (after the trailing space) of the sentences of ``text`` but the last."""
    start = 0
    for m in _BOUNDARY.finditer(text):
        i = m.start()
        if text[i] == "." and text[i + 1: i + 2] != ".":
            lo = max(start, i - 16)
            k = max(text.rfind(" ", lo, i), text.rfind("\n", lo, i), text.rfind("\t", lo, i)) + 1
            word = text[max(k, lo):i].lstrip("([{\"'“‘").lower()
            if (len(word) == 1 and word.isalpha()) or word in _ABBREV:
                continue
        if not text[start:m.start() + 1].strip():
            continue  # nothing but space so far: it belongs to the next sentence
        yield m.end()
        start = m.end()


def split_sentences(text: str) -> list[str]:
    """Sentences with their trailing whitespace: ``"".join(split_sentences(t)) == t``."""
    out: list[str] = []
    start = 0
    for end in _sentence_ends(text):
        out.append(text[start:end])
        start = end
    if start < len(text):
        if text[start:].strip() or not out:
            out.append(text[start:])
        else:
            out[-1] += text[start:]
    return out


def has_two_sentences(text: str) -> bool:
    """``len(split_sentences(text)) >= 2`` without splitting the whole text."""
    for end in _sentence_ends(text):
        return bool(text[end:].strip())
    return False


# --------------------------------------------------------------------------------------------------
# hard-wrapped lines and long documents

_LIST_ITEM = re.compile(r"(?:[-*•+]|\d+[.)]|[a-z][.)])\s")


def _prose_line(line: str) -> bool:
    """A line of running text (not code, a list item, a prompt or a table row)."""
    if not line or line[0].isspace() or line.startswith((">>>", "...", "$ ", "#", "|", "```")):
        return False
    if _LIST_ITEM.match(line) or " = " in line:
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in line)
    return letters >= 0.85 * len(line)


def unwrap_lines(text: str) -> tuple[str, int]:
    """(text with hard-wrapped prose lines joined, number of joins). A line is joined to the next
    when both are prose (see ``_prose_line``), the first does not end a sentence or a clause
    (``.!?:;``) and the next starts in lower case, or the first is long (>= 50 characters, as
    wrapped lines are) and ends in a word or a comma. Extraction keeps the line breaks of
    ``<pre>``-like or wrapped source text; the miner's sentences cannot span a line break, so
    wrapped paragraphs gave no tasks."""
    lines = text.split("\n")
    out: list[str] = []
    joins = 0
    prev_prose = False
    for line in lines:
        if out and prev_prose and line and _prose_line(line):
            a = out[-1].rstrip()
            if not a.endswith((".", "!", "?", ":", ";")) and (
                    line[0].islower() or (len(a) >= 50 and (a[-1].isalpha() or a[-1] == ","))):
                out[-1] = a + " " + line.lstrip()
                joins += 1
                continue
        out.append(line)
        prev_prose = _prose_line(line)
    return "\n".join(out), joins


def _boundary(text: str, end: int) -> int:
    """The best place to end a piece at or before ``end``: a paragraph end, else a line end, else
    a sentence end, else a space, in the second half of ``text[:end]``; ``end`` itself otherwise."""
    lo = end // 2
    for sep in ("\n\n", "\n"):
        i = text.rfind(sep, lo, end)
        if i > 0:
            return i + len(sep)
    for m in reversed(list(re.finditer(r"[.!?][\"')\]]*\s", text[lo:end]))):
        return lo + m.end()
    i = text.rfind(" ", lo, end)
    return i + 1 if i > 0 else end


def split_long(text: str, cutter: Any, n: int) -> list[str]:
    """``text`` in pieces of at most ``n`` tokens of ``cutter`` (``cutter.truncate``), cut at
    paragraph, line or sentence ends when possible; ``"".join(pieces) == text`` for tokenizers
    whose cut is a prefix of the text (whitespace)."""
    pieces: list[str] = []
    rest = text
    while rest.strip():
        head = cutter.truncate(rest, n)
        if len(head) >= len(rest) or head == rest:
            pieces.append(rest)
            break
        cut = _boundary(rest, max(1, len(head)))
        pieces.append(rest[:cut])
        rest = rest[cut:]
    return pieces


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
# keywords


class KeywordOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    general_tokenizer: str = Field(..., description="the general model's tokenizer: SentencePiece "
                                   ".model, tokenizer.json or model folder")
    domain_tokenizer: str | None = Field(None, description="SentencePiece model trained on the domain")
    train_from: str | list[str] | None = Field(
        None, description="instead of domain_tokenizer: train one on these Parquet/text files")
    train_column: str = Field("text", description="text column of train_from Parquet files")
    vocab_size: int = Field(32000, ge=100, description="vocabulary of the trained domain model")
    train_max_sentences: int = Field(2_000_000, ge=1000, description="lines used for training")
    min_keywords: int = Field(3, ge=1)
    max_sentence_pieces: int = Field(100, ge=1, description="at most this many distinct pieces")
    min_piece_chars: int = Field(11, ge=2, description="domain pieces (with the leading ▁) at least "
                                 "this long; the reference keeps len > 10")
    max_sentences: int = Field(2, ge=1, description="keyword sentences per document")

    @model_validator(mode="after")
    def _one(self) -> "KeywordOptions":
        if (self.domain_tokenizer is None) == (self.train_from is None):
            raise ValueError("give exactly one of domain_tokenizer and train_from")
        return self


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _word_local(model_path: str) -> bool:
    """Does the model segment each whitespace-separated word on its own (split on whitespace, one
    ``▁`` per word, runs of spaces collapsed)? Then a sentence's pieces are its words' pieces."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
        m = pb.ModelProto()
        with open(model_path, "rb") as fh:
            m.ParseFromString(fh.read())
        t, n = m.trainer_spec, m.normalizer_spec
        return (bool(t.split_by_whitespace) and not t.treat_whitespace_as_suffix
                and n.add_dummy_prefix and n.remove_extra_whitespaces)
    except Exception:  # noqa: BLE001 - unknown layout: encode every sentence (always correct)
        return False


def train_domain_tokenizer(texts, out_prefix: str, vocab_size: int, max_sentences: int) -> str:
    """Train a unigram SentencePiece model on ``texts`` (iterable of str); returns the model path.
    Deterministic for the same input (one thread, no input shuffling)."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise StageError("reading_comprehension: keyword training needs `sentencepiece`: "
                         "pip install 'curate[rc]'") from None

    def lines():
        n = 0
        for t in texts:
            for line in (t or "").splitlines():
                # SentencePiece skips lines over 4,192 bytes: give long lines sentence by sentence
                for piece in (split_sentences(line) if len(line) > 2000 else [line]):
                    if piece.strip():
                        yield piece.strip()
                        n += 1
                        if n >= max_sentences:
                            return

    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=out_prefix, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, hard_vocab_limit=False,
        max_sentencepiece_length=16, minloglevel=2)
    return out_prefix + ".model"


class KeywordMiner:
    def __init__(self, opts: KeywordOptions, domain_model: str):
        from curate.text.tokens import SentencePieceTokenizer, TokenizerError, load_tokenizer

        try:
            general = load_tokenizer(opts.general_tokenizer)
            self.domain = SentencePieceTokenizer(domain_model)
            general_vocab = general.vocab()
        except (TokenizerError, OSError, RuntimeError) as exc:
            raise StageError(f"reading_comprehension: keywords: {exc}") from None
        self.opts = opts
        self.specific = {p for p in self.domain.vocab() - general_vocab
                         if p.startswith("▁") and len(p) >= opts.min_piece_chars}
        self.word_local = _word_local(domain_model)
        self._word_pieces: dict[str, str] = {}
        self.min_word = opts.min_piece_chars - 1   # "▁" + k characters come from a word of >= k

    def _first_pieces(self, sentence: str) -> set[str]:
        """The word-initial pieces of a plain-ASCII sentence, word by word: the model normalises
        nothing in such text and segments each whitespace-separated word on its own (words are
        cached: most recur across documents). Only words as long as a specific piece matter."""
        cache, out, lo = self._word_pieces, set(), self.min_word
        for w in sentence.split():
            if len(w) < lo:
                continue
            piece = cache.get(w)
            if piece is None:
                if len(cache) > 500_000:
                    cache.clear()
                pieces = self.domain.encode_pieces(w)
                piece = cache[w] = pieces[0] if pieces else ""
            out.add(piece)
        return out

    def mine(self, sentences: list[str], rng: random.Random) -> list[tuple[list[str], str]]:
        order = list(range(len(sentences)))
        rng.shuffle(order)
        found = []
        for i in order:
            if len(found) >= self.opts.max_sentences:
                break
            sent = sentences[i]
            if self.word_local and sent.isascii() and not _CONTROL.search(sent):
                # a cheap pre-check from cached word pieces; the sentence itself is encoded only
                # when it passes (pieces of a run of equal characters may tie and differ by context)
                if len(self.specific.intersection(self._first_pieces(sent))) < self.opts.min_keywords:
                    continue
            pieces = self.domain.encode_pieces(sent)
            distinct = set(pieces)
            if len(distinct) > self.opts.max_sentence_pieces:
                continue
            hits = [p for p in dict.fromkeys(pieces) if p in self.specific]  # in sentence order
            if len(hits) >= self.opts.min_keywords:
                found.append(([h.replace("▁", " ").strip() for h in hits], sentences[i].strip()))
        return found


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
    templates: str | None = Field(None, description="folder with your own reading_comprehension/*.yaml")
    exact_reference: bool = Field(True, description="keep the reference's `i.e.` pattern whose dots "
                                  "match any character (false: literal dots)")
    long_documents: Literal["split", "cut"] = Field(
        "split", description="split: a body longer than max_body_tokens becomes several output rows "
        "(pieces of at most max_body_tokens, cut at paragraph, line or sentence ends; ids <id>#<k>), "
        "each mined and wrapped; cut: keep only the first max_body_tokens, as the reference does")
    unwrap_lines: bool = Field(True, description="join prose lines that extraction wrapped (a line "
                               "continuing the sentence of the line before) before mining; code, "
                               "lists and indented lines are kept as they are")

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
            load_templates(self.config.templates)
        except StageError as exc:
            problems.append(("templates", str(exc)))
        return problems

    def fingerprint_extra(self) -> str:
        t = load_templates(self.config.templates)
        return "templates:" + ",".join(f"{k}={v['version']}" for k, v in sorted(t.items()))

    def setup(self) -> None:
        from curate.text.tokens import TokenizerError, load_tokenizer

        c = self.config
        self.miner = Miner(c.exact_reference)
        self.t = load_templates(c.templates)
        try:
            self.cutter = load_tokenizer(c.tokenizer)
        except (TokenizerError, OSError, RuntimeError) as exc:
            raise StageError(f"reading_comprehension: tokenizer: {exc}") from None
        by_words = c.tokenizer in (None, "whitespace")
        self.cut_n = max(1, int(c.max_body_tokens * c.words_per_token)) if by_words else c.max_body_tokens
        self.keywords = None
        if c.keywords is not None:
            model = c.keywords.domain_tokenizer or self._trained_domain_model()
            self.keywords = KeywordMiner(c.keywords, model)
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

        from curate.pipeline.io import Dataset, expand_paths, get_fs

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
                train_domain_tokenizer(texts(), prefix + ".tmp", k.vocab_size, k.train_max_sentences)
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


def _set_column(table: pa.Table, name: str, values) -> pa.Table:
    i = table.schema.get_field_index(name)
    if i >= 0:
        return table.set_column(i, name, values)
    return table.append_column(name, values)
