"""The AdaptLLM miner (Cheng et al., ICLR 2024; reference code microsoft/LMOps,
``adaptllm/utils/read.py``), with our own code: the connectives and regular expressions that mine
sentence pairs, the rule sentence splitter, hard-wrapped line joining and long-document splitting,
and the domain keyword miner with its SentencePiece training.

Plain functions and classes over strings, no Arrow and no stage: ``curate.stages.synth.
reading_comprehension`` (rendering and assembly of the tasks) and ``rc_llm`` use them. Errors are
``AdaptLLMError`` with the message a person reads.
"""

from __future__ import annotations

import random
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AdaptLLMError(Exception):
    """A keyword model cannot be loaded or trained (the message names what is missing)."""


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
        raise AdaptLLMError("reading_comprehension: keyword training needs `sentencepiece`: "
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
            raise AdaptLLMError(f"reading_comprehension: keywords: {exc}") from None
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
