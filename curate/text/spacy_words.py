"""Fast, exact word splitting and sentence counting as datatrove does them with spaCy.

datatrove's ``split_into_words(text, language)`` runs a blank spaCy pipeline (rule-based tokenizer
plus sentencizer) over the whole text inside a memory zone, so every document re-creates a
lexeme for nearly every token, and then strips and drops whitespace tokens. C4's sentence count
(``len(split_into_sentences(line))``) runs the same pipeline once per kept line.

spaCy's tokenizer cuts the text at whitespace and tokenizes each whitespace-free *chunk* on its
own (prefixes, suffixes, infixes, special cases); a whitespace run becomes a token unless it is a
single ``" "`` after a chunk. The one step that looks across chunks is the special-case matcher
(a PhraseMatcher over the affix-split tokens): a match across a single space never rewrites
anything (no special case contains a space), but it can hide an overlapping match inside a chunk.
So the tokens of a text are the tokens of its chunks one after the other, except around a chunk
boundary where a matcher pattern could start. :class:`SpacyWords` tokenizes each distinct chunk
once with the same spaCy tokenizer (newlines between chunks, so that no pattern can cross), keeps
the tokens in a bounded cache, and tokenizes the text around a boundary that could take part in a
matcher pattern as one piece (a "run" of chunks joined by single spaces), as spaCy sees it there.

A boundary counts as such when the token pair across it (the last token of the left chunk, the
first of the right) occurs in a matcher pattern, or when the token at a chunk end may have been
rewritten by an in-chunk match (the chunk ends/starts with the tokens of a special case whose
tokens differ from its affix split) and the other side has a token that occurs in a pattern. This
is a superset of the boundaries where spaCy's output can differ from the chunks' tokens.

The sentence count is spaCy's sentencizer over those tokens (a token in ``punct_chars`` ends a
sentence; the next token that is neither punctuation nor in ``punct_chars`` starts one, a
whitespace token included), summarised per chunk for both states it can be entered in.

Texts containing ``IS_ALPHA`` (which makes spaCy fail; datatrove then retries without it, with
results that depend on the tokenizer's state) and languages whose datatrove tokenizer is not
spaCy's rule-based one use datatrove's own functions.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

import numpy as np
from curate.numba_cache import njit

# bits of the per-token flags
NONSYM = 1      # has a character outside datatrove's PUNCTUATION_SET (a "non-symbol word")
ALPHA = 2       # has an alphabetic character (str.isalpha)
PUNCT = 4       # spaCy's IS_PUNCT: every character is punctuation (Unicode category P*)
SENT_PUNCT = 8  # in the sentencizer's punct_chars

# bits of the per-entry (chunk or run) boundary flags
_LAST_IN = 1    # the last token (or what it was before a rewrite) occurs in a pattern, not last
_FIRST_IN = 2   # the first token likewise, not first
_LAST_ALT = 4   # the last token may have been rewritten by an in-chunk special case
_FIRST_ALT = 8  # the first token likewise

# bits of the per-token pattern flags
_P_LAST = 1       # occurs in a matcher pattern before its last position
_P_FIRST = 2      # occurs after its first position
_P_ALT_LAST = 4   # last token of a special case that the matcher rewrites
_P_ALT_FIRST = 8  # first token of such a special case

_HASH_P = 1099511628211
_CHUNKS = re.compile(r"\S+")
_WS_RUNS = re.compile(r"(\s+)")


def _is_punct(text: str) -> bool:
    """spaCy's lexeme attribute IS_PUNCT (``spacy.lang.lex_attrs.is_punct``)."""
    for ch in text:
        if not unicodedata.category(ch).startswith("P"):
            return False
    return True


class _Grow:
    """A numpy array that grows by appending (amortised doubling)."""

    def __init__(self, dtype, cap: int = 1024):
        self.a = np.zeros(cap, dtype)
        self.n = 0

    def extend(self, values) -> int:
        vals = np.asarray(values, self.a.dtype)
        start = self.n
        end = start + len(vals)
        if end > len(self.a):
            cap = len(self.a)
            while cap < end:
                cap *= 2
            b = np.zeros(cap, self.a.dtype)
            b[:start] = self.a[:start]
            self.a = b
        self.a[start:end] = vals
        self.n = end
        return start

    def view(self) -> np.ndarray:
        return self.a[:self.n]


class _Patterns:
    """What the tokenizer's special-case matcher can match across a chunk boundary.

    ``pairs``: (token, next token) pairs inside a matcher pattern; ``last``/``first``: tokens that
    occur before the last / after the first position of a pattern; ``alt``: special cases that the
    matcher rewrites (their tokens differ from their affix split): (tokens, first and last token
    of the affix split).
    """

    def __init__(self, tokenizer):
        from spacy.attrs import ORTH
        from spacy.tokenizer import Tokenizer

        # the patterns are the special cases split by affixes alone, as spaCy adds them
        bare = Tokenizer(tokenizer.vocab, rules={}, prefix_search=tokenizer.prefix_search,
                         suffix_search=tokenizer.suffix_search,
                         infix_finditer=tokenizer.infix_finditer,
                         token_match=tokenizer.token_match, url_match=tokenizer.url_match)
        self.pairs: set[tuple[str, str]] = set()
        self.last: set[str] = set()
        self.first: set[str] = set()
        alt: list[tuple[tuple[str, ...], str, str]] = []
        self.ok = True
        for key, subs in (tokenizer.rules or {}).items():
            if any(c.isspace() for c in key) and not key.isspace():
                self.ok = False  # a special case across whitespace: chunks are not independent
            in_matcher = (not tokenizer.faster_heuristics or tokenizer.find_prefix(key)
                          or tokenizer.find_infix(key) or tokenizer.find_suffix(key) or " " in key)
            if not in_matcher:
                continue
            pat = [t.text for t in bare(key)]
            if len(pat) > 1:
                if any(t.isspace() for t in pat):
                    self.ok = False
                self.pairs.update(zip(pat, pat[1:]))
                self.last.update(pat[:-1])
                self.first.update(pat[1:])
            orth = tuple(s.get(ORTH, s.get("ORTH")) for s in subs)
            if list(orth) != pat:
                alt.append((orth, pat[0], pat[-1]))
        self._alt_by_last: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        self._alt_by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for orth, p0, p1 in alt:
            self._alt_by_last.setdefault(orth[-1], []).append((orth, p1))
            self._alt_by_first.setdefault(orth[0], []).append((orth, p0))
        self.token_bits: dict[str, int] = {}
        for bit, toks in ((_P_LAST, self.last), (_P_FIRST, self.first),
                          (_P_ALT_LAST, self._alt_by_last), (_P_ALT_FIRST, self._alt_by_first)):
            for t in toks:
                self.token_bits[t] = self.token_bits.get(t, 0) | bit

    def chunk_flags(self, toks: list[str]) -> int:
        """Boundary flags of a chunk whose first or last token ends a rewritten special case."""
        lasts = [toks[-1]]
        firsts = [toks[0]]
        flags = 0
        for orth, p1 in self._alt_by_last.get(toks[-1], ()):
            if len(orth) <= len(toks) and tuple(toks[-len(orth):]) == orth:
                lasts.append(p1)
                flags |= _LAST_ALT
        for orth, p0 in self._alt_by_first.get(toks[0], ()):
            if len(orth) <= len(toks) and tuple(toks[:len(orth)]) == orth:
                firsts.append(p0)
                flags |= _FIRST_ALT
        if any(t in self.last for t in lasts):
            flags |= _LAST_IN
        if any(t in self.first for t in firsts):
            flags |= _FIRST_IN
        return flags


# ------------------------------------------------------------------------------------ kernels


@njit(cache=True)
def _token_rows(chars, cstart, lens, table, flags, hashes, powers):
    """Flags (from the per-character ``table``), polynomial hash and P**len of new tokens.
    Returns the number of tokens with a character outside the table (flags left to Python)."""
    outside = 0
    p = np.uint64(_HASH_P)
    for i in range(len(lens)):
        h = np.uint64(0)
        pw = np.uint64(1)
        nonsym = False
        alpha = False
        punct = True
        out = False
        s = cstart[i]
        for k in range(lens[i]):
            c = chars[s + k]
            h = h * p + np.uint64(c)
            pw = pw * p
            if c >= len(table):
                out = True
                continue
            b = table[c]
            if (b & 1) == 0:
                nonsym = True
            if b & 2:
                alpha = True
            if (b & 4) == 0:
                punct = False
        hashes[i] = h
        powers[i] = pw
        f = 0
        if nonsym:
            f |= 1
        if alpha:
            f |= 2
        if punct:
            f |= 4
        if lens[i] == 1 and not out and (table[chars[s]] & 8):
            f |= 8
        flags[i] = f
        if out:
            flags[i] = 255
            outside += 1
    return outside


@njit(cache=True)
def _entry_rows(tids, bounds, t_flags, t_pbits, sent, eflags):
    """Per new entry: the sentencizer summary and the boundary flags (rewrites aside)."""
    for e in range(len(bounds) - 1):
        a = bounds[e]
        b = bounds[e + 1]
        out = np.uint64(0)
        for seen0 in range(2):
            seen = seen0 == 1
            added = 0
            for k in range(a, b):
                f = t_flags[tids[k]]
                if seen and (f & 4) == 0 and (f & 8) == 0:
                    added += 1
                    seen = False
                elif f & 8:
                    seen = True
            out |= np.uint64((added << 1) | (1 if seen else 0)) << np.uint64(32 * seen0)
        sent[e] = out
        f = 0
        if t_pbits[tids[b - 1]] & 1:
            f |= 1
        if t_pbits[tids[a]] & 2:
            f |= 2
        eflags[e] = f


@njit(cache=True)
def _expand(eids, e_start, e_count, flat):
    """Token ids of a sequence of entries."""
    total = 0
    for e in eids:
        total += e_count[e]
    out = np.empty(total, np.int32)
    k = 0
    for e in eids:
        s = e_start[e]
        for j in range(e_count[e]):
            out[k] = flat[s + j]
            k += 1
    return out


@njit(cache=True)
def _risky(eids, e_flags, e_last, e_first, pair_keys):
    """Per boundary between eids[i] and eids[i+1]: could a matcher pattern cross it?"""
    n = len(eids)
    out = np.zeros(max(n - 1, 0), np.bool_)
    for i in range(n - 1):
        a = eids[i]
        b = eids[i + 1]
        fa = e_flags[a]
        fb = e_flags[b]
        if (fa & 1) == 0 or (fb & 2) == 0:
            continue
        if (fa & 4) != 0 or (fb & 8) != 0:
            out[i] = True
            continue
        key = (np.int64(e_last[a]) << 32) | np.int64(e_first[b])
        j = np.searchsorted(pair_keys, key)
        if j < len(pair_keys) and pair_keys[j] == key:
            out[i] = True
    return out


@njit(cache=True)
def _count_sentences(units, seps_plain, trailing_ws, e_sent):
    """spaCy's sentence count over a line's units; ``seps_plain[k]``: the separator before unit
    k+1 is a single space (no whitespace token); ``trailing_ws``: whitespace token at the end."""
    count = 1
    seen = 0
    for k in range(len(units)):
        if seen == 1 and k > 0 and not seps_plain[k - 1]:
            count += 1  # a whitespace token after a sentence end starts a sentence
            seen = 0
        s = np.int64((e_sent[units[k]] >> np.uint64(32 * seen)) & np.uint64(0xFFFFFFFF))
        count += s >> 1
        seen = s & 1
    if seen == 1 and trailing_ws:
        count += 1
    return count


# ------------------------------------------------------------------------------------ words


class SpacyWords:
    """``split_into_words`` / ``len(split_into_sentences(line))`` of datatrove, fast and exact.

    Words are returned as int32 ids into a token table (arrays ``t_flags``, ``t_len``, ``t_hash``,
    ``t_pow``, ``t_cstart`` into ``chars``, ``t_stop``; ``text_of(id)``). Ids are valid until the
    next :meth:`word_ids` call, which empties the cache when it has grown past ``max_entries``.
    """

    def __init__(self, language: str, max_entries: int = 300_000, stop_words: Iterable[str] = ()):
        from datatrove.utils.text import PUNCTUATION_SET
        from datatrove.utils.word_tokenizers import (SpaCyTokenizer, WhitespaceTokenizer,
                                                     load_word_tokenizer)

        self.language = language
        self.max_entries = max_entries
        self._punct_set = PUNCTUATION_SET
        self._stop_words = list(dict.fromkeys(stop_words))
        ref = load_word_tokenizer(language)
        nlp = None
        spacy_lang = None
        if type(ref) is SpaCyTokenizer and ref.language != "ja" and ref.config is None:
            nlp, spacy_lang = ref.tokenizer, ref.language
        elif type(ref) is WhitespaceTokenizer:
            nlp, spacy_lang = ref._spacy_xx.tokenizer, "xx"
        self.fast_words = False
        self.fast_sentences = False
        self._sent_punct: frozenset[str] = frozenset()
        self._is_punct = _is_punct
        if nlp is not None:
            import spacy
            from spacy.attrs import IS_PUNCT
            from spacy.tokenizer import Tokenizer

            if type(nlp.tokenizer) is Tokenizer:
                # our own pipeline of the same language (datatrove's stays untouched)
                self._nlp = spacy.blank(spacy_lang)
                self._tok = self._nlp.tokenizer
                pats = _Patterns(self._tok)
                if pats.ok:
                    self._pats = pats
                    self.fast_words = True
                    getters = self._nlp.vocab.lex_attr_getters
                    self._is_punct = getters.get(IS_PUNCT, _is_punct)
                    # lexeme attributes play no part in tokenizing: skip computing them
                    self._nlp.vocab.lex_attr_getters = {}
            if type(ref) is SpaCyTokenizer and self.fast_words:
                self._sent_punct = frozenset(nlp.get_pipe("sentencizer").punct_chars)
                self.fast_sentences = True
        self._table = self._char_table()
        self.tokenizer_calls = 0  # spaCy calls made by the fast path (tests look at it)
        self.reset()

    def _char_table(self) -> np.ndarray:
        """Per BMP character: 1 in PUNCTUATION_SET, 2 alphabetic, 4 punctuation category,
        8 a sentencizer punct_char (characters beyond the BMP take the Python path)."""
        from spacy.lang.lex_attrs import is_punct as spacy_is_punct

        table = np.zeros(0x10000, np.uint8)
        if self._is_punct not in (_is_punct, spacy_is_punct):
            return table[:0]  # a language-specific IS_PUNCT: compute flags in Python
        for i in range(0x10000):
            ch = chr(i)
            b = 0
            if ch in self._punct_set:
                b |= 1
            if ch.isalpha():
                b |= 2
            if unicodedata.category(ch).startswith("P"):
                b |= 4
            if ch in self._sent_punct:
                b |= 8
            table[i] = b
        return table

    # ------------------------------------------------------------------ tables

    def reset(self) -> None:
        """Empty the cache and the token table."""
        self._tok_id: dict[str, int] = {}
        self._tok_text: list[str] = []
        self.t_flags = _Grow(np.uint8)
        self.t_pbits = _Grow(np.uint8)
        self.t_len = _Grow(np.int64)
        self.t_hash = _Grow(np.uint64)
        self.t_pow = _Grow(np.uint64)
        self.t_cstart = _Grow(np.int64)
        self.t_stop = _Grow(np.int32)
        self.chars = _Grow(np.uint32, 1 << 16)
        self._entry: dict[str, int] = {}
        self.e_start = _Grow(np.int64)
        self.e_count = _Grow(np.int64)
        self.e_flags = _Grow(np.uint8)
        self.e_last = _Grow(np.int64)
        self.e_first = _Grow(np.int64)
        # sentencizer summary per entry: entered with seen=0 in bits 0-31, seen=1 in bits 32-63,
        # each (sentence starts added << 1) | seen after
        self.e_sent = _Grow(np.uint64)
        self.flat = _Grow(np.int32, 1 << 16)
        self._synced = 0  # tokens already in the arrays
        self.stop_ids = np.array([self._intern(w) for w in self._stop_words], np.int32)
        self._pair_keys = np.zeros(0, np.int64)
        if self.fast_words:
            keys = sorted((self._intern(a) << 32) | self._intern(b) for a, b in self._pats.pairs)
            self._pair_keys = np.array(keys, np.int64)
        self._sync()
        for i, t in enumerate(self.stop_ids):
            self.t_stop.a[t] = i

    def _intern(self, text: str) -> int:
        """Id of a token string (new ids reach the arrays at the next ``_sync``)."""
        tid = self._tok_id.get(text)
        if tid is None:
            tid = self._tok_id[text] = len(self._tok_text)
            self._tok_text.append(text)
        return tid

    def _sync(self) -> None:
        """Append the rows of newly interned tokens to the token arrays."""
        new = self._tok_text[self._synced:]
        if not new:
            return
        first = self._synced
        self._synced = len(self._tok_text)
        lens = np.array([len(t) for t in new], np.int64)
        cstart = self.chars.extend(np.frombuffer("".join(new).encode("utf-32-le"), np.uint32))
        cstarts = cstart + np.concatenate(([0], np.cumsum(lens[:-1])))
        flags = np.zeros(len(new), np.uint8)
        hashes = np.zeros(len(new), np.uint64)
        powers = np.zeros(len(new), np.uint64)
        outside = _token_rows(self.chars.a, cstarts, lens, self._table, flags, hashes, powers)
        if outside:
            for i in np.flatnonzero(flags == 255):
                flags[i] = self._py_flags(new[i])
        bits = self._pats.token_bits if self.fast_words else {}
        self.t_flags.extend(flags)
        self.t_pbits.extend([bits.get(t, 0) for t in new] if bits else np.zeros(len(new)))
        self.t_len.extend(lens)
        self.t_hash.extend(hashes)
        self.t_pow.extend(powers)
        self.t_cstart.extend(cstarts)
        self.t_stop.extend(np.full(len(new), -1, np.int32))
        assert self.t_len.n == len(self._tok_text) and first + len(new) == self.t_len.n

    def _py_flags(self, text: str) -> int:
        f = 0
        if any(ch not in self._punct_set for ch in text):
            f |= NONSYM
        if any(ch.isalpha() for ch in text):
            f |= ALPHA
        if self._is_punct(text):
            f |= PUNCT
        if text in self._sent_punct:
            f |= SENT_PUNCT
        return f

    def text_of(self, tid: int) -> str:
        return self._tok_text[tid]

    def _add_entries(self, pieces: list[str]) -> None:
        """Tokenize new chunks (or runs of chunks joined by single spaces) with spaCy, each on its
        own (newlines between them stop any matcher pattern), and add them to the cache."""
        from spacy.attrs import IDX, LENGTH

        self.tokenizer_calls += 1
        joined = "\n".join(pieces)
        with self._nlp.memory_zone():
            spans = self._tok(joined).to_array([IDX, LENGTH]).astype(np.int64).reshape(-1, 2)
        starts = np.cumsum([0] + [len(p) + 1 for p in pieces[:-1]], dtype=np.int64)
        # the only whitespace tokens are the newlines between pieces
        newline = np.zeros(len(joined) + 1, np.bool_)
        newline[starts[1:] - 1] = True
        spans = spans[~newline[spans[:, 0]]]
        owner = np.searchsorted(starts, spans[:, 0], "right") - 1
        bounds = np.searchsorted(owner, np.arange(len(pieces) + 1))
        if np.any(np.diff(bounds) <= 0):
            raise RuntimeError("chunk tokenization did not line up")  # never expected
        intern = self._intern
        tids = np.array([intern(joined[a:a + n]) for a, n in spans.tolist()], np.int32)
        self._sync()
        n = len(pieces)
        first_entry = self.e_start.n
        sent = np.zeros(n, np.uint64)
        eflags = np.zeros(n, np.uint8)
        _entry_rows(tids, bounds, self.t_flags.a, self.t_pbits.a, sent, eflags)
        last_tok = tids[bounds[1:] - 1]
        first_tok = tids[bounds[:-1]]
        # chunks whose end tokens may come from a rewritten special case: exact flags in Python
        pb = self.t_pbits.a
        for e in np.flatnonzero((pb[last_tok] & _P_ALT_LAST) | (pb[first_tok] & _P_ALT_FIRST)):
            toks = [self._tok_text[t] for t in tids[bounds[e]:bounds[e + 1]]]
            eflags[e] = self._pats.chunk_flags(toks)
        self.e_start.extend(self.flat.extend(tids) + bounds[:-1])
        self.e_count.extend(np.diff(bounds))
        self.e_flags.extend(eflags)
        self.e_last.extend(last_tok)
        self.e_first.extend(first_tok)
        self.e_sent.extend(sent)
        self._entry.update(zip(pieces, range(first_entry, first_entry + n)))

    def _entries(self, pieces: list[str]) -> np.ndarray:
        get = self._entry.__getitem__
        try:
            return np.fromiter(map(get, pieces), np.int64, len(pieces))
        except KeyError:
            entry = self._entry
            self._add_entries([p for p in dict.fromkeys(pieces) if p not in entry])
            return np.fromiter(map(get, pieces), np.int64, len(pieces))

    def _units(self, chunks: list[str], seps=None) -> tuple[np.ndarray, list[str] | None]:
        """Entry ids of a text split into ``chunks``, with a risky boundary (see the module
        docstring) joined into a run when its separator is a single space; and the separators
        between the units. ``seps``: the separators between the chunks, or a function giving
        them (called only when some boundary is risky), or None when all are single spaces."""
        eids = self._entries(chunks)
        if len(eids) < 2:
            return eids, (seps() if callable(seps) else seps)
        risky = _risky(eids, self.e_flags.a, self.e_last.a, self.e_first.a, self._pair_keys)
        if not risky.any():
            return eids, (None if callable(seps) else seps)
        if callable(seps):
            seps = seps()
        pieces: list[str] = []
        unit_seps: list[str] = []
        i = 0
        n = len(chunks)
        while i < n:
            j = i
            while j < n - 1 and risky[j] and (seps is None or seps[j] == " "):
                j += 1
            pieces.append(chunks[i] if j == i else " ".join(chunks[i:j + 1]))
            if j < n - 1:
                unit_seps.append(" " if seps is None else seps[j])
            i = j + 1
        return self._entries(pieces), (None if seps is None else unit_seps)

    # ------------------------------------------------------------------ public

    def word_ids(self, text: str) -> np.ndarray:
        """Token ids of datatrove's ``split_into_words(text, language)``."""
        if len(self._entry) > self.max_entries or self.chars.n > 16 * self.max_entries:
            self.reset()
        if not self.fast_words or "IS_ALPHA" in text:
            from datatrove.utils.text import split_into_words

            ids = np.array([self._intern(w) for w in split_into_words(text, self.language)], np.int32)
            self._sync()
            return ids
        chunks = text.split()

        def seps() -> list[str]:
            parts = _WS_RUNS.split(text)  # [chunk, sep, chunk, ...], "" before/after end spaces
            lo = 3 if parts[0] == "" else 1
            hi = len(parts) - 2 if parts[-1] == "" else len(parts)
            return parts[lo:hi:2]

        eids, _ = self._units(chunks, seps)
        return _expand(eids, self.e_start.a, self.e_count.a, self.flat.a)

    def count_sentences(self, line: str) -> int:
        """``len(split_into_sentences(line, language))`` (C4's sentence count of a kept line)."""
        if not self.fast_sentences or "IS_ALPHA" in line:
            from datatrove.utils.text import split_into_sentences

            return len(split_into_sentences(line, self.language))
        chunks = line.split()
        if not chunks:
            return 1
        if " ".join(chunks) == line:
            trailing = ""
            units, seps = self._units(chunks)
        else:
            # leading whitespace is a token that cannot start a sentence (nothing before it)
            spans = [m.span() for m in _CHUNKS.finditer(line)]
            trailing = line[spans[-1][1]:]
            units, seps = self._units(chunks, [line[a[1]:b[0]] for a, b in zip(spans, spans[1:])])
        plain = (np.ones(max(len(units) - 1, 0), np.bool_) if seps is None
                 else np.array([s == " " for s in seps], np.bool_))
        return int(_count_sentences(units, plain, trailing not in ("", " "), self.e_sent.a))
