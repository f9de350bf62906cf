"""Gopher repetition, Gopher quality, C4 and FineWeb rules with datatrove's exact decisions, fast.

The rules are datatrove's (``datatrove.pipeline.filters``: ``GopherRepetitionFilter``,
``GopherQualityFilter``, ``C4QualityFilter``, ``FineWebQualityFilter``), evaluated in FineWeb's
order with the same expressions, thresholds, drop reasons and C4 text rewrite. What differs is how
the numbers are computed:

- the text is tokenized once per version (before and after C4's line filter) with
  :class:`~curate.text.spacy_words.SpacyWords` (spaCy's tokens, cached per chunk) and the words
  are shared by the rules, as integer ids into a token table with per-token flags;
- word statistics and the n-gram repetition measures run in compiled loops (numba) over those
  ids: ``top_n_gram`` counts word tuples (datatrove joins them with spaces, so equal strings are
  equal tuples), ``duplicated_n_grams`` compares the n-grams as datatrove does, as the strings
  the words make when concatenated *without* separator (hashes, then character comparison);
- C4 counts sentences only until ``min_num_sentences`` is reached (only the comparison with it
  matters), and FineWeb's words-per-newline rule skips tokenizing when the number of whitespace
  chunks (a lower bound of the number of words) already decides it;
- a huge document (over ``LONG_DOC_SHORTCUT_CHARS`` characters) that certainly has more than
  ``max_doc_words`` non-symbol words -- more whitespace chunks with a non-punctuation character
  than that; spaCy's tokens partition each chunk, so every such chunk yields at least one
  non-symbol word -- is dropped as ``gopher_quality:gopher_long_doc`` before it is tokenized
  (after Gopher repetition's paragraph and line checks). datatrove tokenizes it (a 30 MB document
  took over a minute) and runs Gopher repetition's n-gram checks first, so for such a document it
  may name one of those instead; the decision (drop) is the same. Below that size the reasons
  are datatrove's in every case.

tests/stages/clean/test_heuristic_filter_parity.py checks identical decisions, reasons and C4 text
against datatrove's filters called directly, at the defaults and with other options.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from curate.numba_cache import njit

from curate.text.spacy_words import SpacyWords

GOPHER_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]  # datatrove's default

_PARA = re.compile(r"\n{2,}")
_LINES = re.compile("\n+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
LONG_DOC_SHORTCUT_CHARS = 1_000_000


# ------------------------------------------------------------------------------------ kernels


@njit(cache=True)
def _table_bits(m):
    bits = 1
    while (1 << bits) < 2 * m:
        bits += 1
    return bits


@njit(cache=True)
def word_stats(wid, t_flags, t_len, t_stop, n_stop_words):
    """(non-symbol words, their total length, words with a letter, distinct stop words)."""
    n_ns = 0
    sum_ns = 0
    n_alpha = 0
    seen = np.zeros(max(n_stop_words, 1), np.bool_)
    n_stop = 0
    for t in wid:
        f = t_flags[t]
        if f & 1:
            n_ns += 1
            sum_ns += t_len[t]
        if f & 2:
            n_alpha += 1
        s = t_stop[t]
        if s >= 0 and not seen[s]:
            seen[s] = True
            n_stop += 1
    return n_ns, sum_ns, n_alpha, n_stop


@njit(cache=True)
def _same_ids(wid, a, b, n):
    """Are the n words from a and from b the same?"""
    for k in range(n):
        if wid[a + k] != wid[b + k]:
            return False
    return True


@njit(cache=True)
def top_ngram_chars(wid, t_len, n):
    """datatrove's ``find_top_duplicate(get_n_grams(words, n))``: length of the most frequent
    n-gram joined with spaces times its count (the first seen among equally frequent ones);
    -1 when there is no n-gram."""
    m = len(wid) - n + 1
    if m <= 0:
        return -1
    bits = _table_bits(m)
    mask = (1 << bits) - 1
    slots = np.full(1 << bits, -1, np.int64)
    e_win = np.empty(m, np.int64)
    e_cnt = np.zeros(m, np.int64)
    ne = 0
    for i in range(m):
        h = np.uint64(1469598103934665603)
        for k in range(n):
            h = (h ^ np.uint64(wid[i + k])) * np.uint64(1099511628211)
        s = np.int64((h * _MIX) >> np.uint64(64 - bits))
        while True:
            e = slots[s]
            if e == -1:
                slots[s] = ne
                e_win[ne] = i
                e_cnt[ne] = 1
                ne += 1
                break
            if _same_ids(wid, e_win[e], i, n):
                e_cnt[e] += 1
                break
            s = (s + 1) & mask
    best = 0
    for e in range(1, ne):
        if e_cnt[e] > e_cnt[best]:
            best = e
    j = e_win[best]
    length = n - 1
    for k in range(n):
        length += t_len[wid[j + k]]
    return length * e_cnt[best]


@njit(cache=True)
def _same_concat(wid, t_len, t_cstart, chars, a, b, n):
    """Do the n words from a and from b make the same string when concatenated?"""
    if _same_ids(wid, a, b, n):
        return True
    la = 0
    lb = 0
    for k in range(n):
        la += t_len[wid[a + k]]
        lb += t_len[wid[b + k]]
    if la != lb:
        return False
    ka = 0
    oa = 0
    kb = 0
    ob = 0
    for _ in range(la):
        while oa == t_len[wid[a + ka]]:
            ka += 1
            oa = 0
        while ob == t_len[wid[b + kb]]:
            kb += 1
            ob = 0
        if chars[t_cstart[wid[a + ka]] + oa] != chars[t_cstart[wid[b + kb]] + ob]:
            return False
        oa += 1
        ob += 1
    return True


@njit(cache=True)
def dup_ngram_chars(wid, t_len, t_hash, t_pow, t_cstart, chars, n):
    """datatrove's ``find_all_duplicate(words, n)``: scanning left to right, an n-gram (its words
    concatenated without separator) seen before adds its length and skips n words; otherwise it is
    remembered and the scan moves one word."""
    m = len(wid) - n + 1
    if m <= 0:
        return 0
    bits = _table_bits(m)
    mask = (1 << bits) - 1
    slots = np.full(1 << bits, -1, np.int64)
    slot_h = np.zeros(1 << bits, np.uint64)
    repeated = 0
    idx = 0
    while idx < m:
        h = np.uint64(0)
        length = 0
        for k in range(n):
            t = wid[idx + k]
            h = h * t_pow[t] + t_hash[t]
            length += t_len[t]
        s = np.int64((h * _MIX) >> np.uint64(64 - bits))
        found = False
        while slots[s] != -1:
            if slot_h[s] == h and _same_concat(wid, t_len, t_cstart, chars, slots[s], idx, n):
                found = True
                break
            s = (s + 1) & mask
        if found:
            repeated += length
            idx += n
        else:
            slots[s] = idx
            slot_h[s] = h
            idx += 1
    return repeated


# ------------------------------------------------------------------------------------ rules


def _dup_counts(items: list[str]) -> tuple[int, int]:
    """datatrove's ``find_duplicates``: (repeated items, their characters)."""
    uniq = set(items)
    return len(items) - len(uniq), sum(map(len, items)) - sum(map(len, uniq))


class RuleError(Exception):
    """A rule set raised on a document: ``rule`` names it, ``__cause__`` is the exception."""

    def __init__(self, rule: str, exc: Exception):
        super().__init__(f"{rule}: {type(exc).__name__}: {exc}")
        self.rule = rule
        self.exc = exc


class HeuristicRules:
    """The four rule sets of the ``heuristic_filter`` stage; ``check(text)`` gives
    ``(rule set, reason)`` of the first rule that drops the document (None if kept) and the text
    after C4's line filter."""

    def __init__(self, cfg: Any, language: str, words: SpacyWords | None = None):
        from datatrove.pipeline.filters.c4_filters import (CITATION_REGEX, ELLIPSIS,
                                                           END_PUNCTUATION, POLICY_SUBSTRINGS)
        from datatrove.utils.text import PUNCTUATION_SET, TERMINAL_PUNCTUATION

        self.cfg = cfg
        self.language = language
        q = cfg.gopher_quality
        stop = GOPHER_STOP_WORDS if q.stop_words is None else q.stop_words
        self.stop_words = set(stop)
        self.words = words or SpacyWords(language, stop_words=sorted(self.stop_words))
        for n, _ in (*cfg.gopher_repetition.top_n_grams, *cfg.gopher_repetition.dup_n_grams):
            if n < 1:
                raise ValueError(f"n-gram sizes must be >= 1, got {n}")
        self._citation = CITATION_REGEX
        self._ellipsis = ELLIPSIS
        self._end_punct = END_PUNCTUATION
        self._policy = POLICY_SUBSTRINGS
        self._stop_chars = tuple(TERMINAL_PUNCTUATION)
        self._punct_chars = "".join(sorted(PUNCTUATION_SET))
        self.shortcuts = 0  # documents dropped by the length bound before tokenizing

    # -------------------------------------------------------------- helpers

    def _word_ids(self, text: str) -> np.ndarray:
        return self.words.word_ids(text)

    def _certainly_long(self, text: str) -> bool:
        """A huge text with more than max_doc_words non-symbol words for sure (and at least
        min_doc_words)?"""
        q = self.cfg.gopher_quality
        if not (q.enabled and q.max_doc_words and self.words.fast_words):
            return False
        need = q.max_doc_words + 1
        if q.min_doc_words:
            need = max(need, q.min_doc_words)
        # need chunks take 2 * need - 1 characters at least
        if len(text) <= max(LONG_DOC_SHORTCUT_CHARS, 2 * need - 2) or "IS_ALPHA" in text:
            return False
        punct = self._punct_chars
        count = 0
        pos = 0
        step = 1 << 22
        end = len(text)
        while pos < end:
            cut = min(pos + step, end)
            while cut < end and not text[cut].isspace():
                cut += 1
            count += sum(1 for c in text[pos:cut].split() if c.strip(punct))
            if count >= need:
                return True
            pos = cut
        return False

    # -------------------------------------------------------------- rule sets

    def gopher_repetition_cheap(self, text: str) -> str | None:
        r = self.cfg.gopher_repetition
        if not text:
            return "empty"
        paragraphs = _PARA.split(text.strip())
        dup, dup_chars = _dup_counts(paragraphs)
        if r.dup_para_frac and dup / len(paragraphs) > r.dup_para_frac:
            return "dup_para_frac"
        if r.dup_para_char_frac and dup_chars / len(text) > r.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES.split(text)
        dup, dup_chars = _dup_counts(lines)
        if r.dup_line_frac and dup / len(lines) > r.dup_line_frac:
            return "dup_line_frac"
        if r.dup_line_char_frac and dup_chars / len(text) > r.dup_line_char_frac:
            return "dup_line_char_frac"
        return None

    def gopher_repetition_ngrams(self, text: str, wid: np.ndarray) -> str | None:
        r = self.cfg.gopher_repetition
        w = self.words
        t_len = w.t_len.view()
        for n, frac in r.top_n_grams:
            top = top_ngram_chars(wid, t_len, n)
            if top < 0:
                continue
            if top / len(text) > frac:
                return f"top_{n}_gram"
        for n, frac in r.dup_n_grams:
            rep = dup_ngram_chars(wid, t_len, w.t_hash.view(), w.t_pow.view(), w.t_cstart.view(),
                                  w.chars.view(), n)
            if rep / len(text) > frac:
                return f"duplicated_{n}_n_grams"
        return None

    def gopher_quality(self, text: str, wid: np.ndarray) -> str | None:
        q = self.cfg.gopher_quality
        w = self.words
        n_words = len(wid)
        n_ns, sum_ns, n_alpha, n_stop = word_stats(wid, w.t_flags.view(), w.t_len.view(),
                                                   w.t_stop.view(), len(w.stop_ids))
        if q.min_doc_words and n_ns < q.min_doc_words:
            return "gopher_short_doc"
        if q.max_doc_words and n_ns > q.max_doc_words:
            return "gopher_long_doc"
        avg = sum_ns / n_ns if n_ns else math.nan  # == np.mean of the lengths (exact int sum)
        if q.min_avg_word_length and avg < q.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if q.max_avg_word_length and avg > q.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if q.max_symbol_word_ratio and text.count("#") / n_words > q.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if q.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > q.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines()
        if q.max_bullet_lines_ratio and sum(
                s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > q.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        if q.max_ellipsis_lines_ratio and sum(
                s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > q.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        if q.max_non_alpha_words_ratio and n_alpha / n_words < q.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if q.min_stop_words and n_stop < q.min_stop_words:
            return "gopher_enough_stop_words"
        return None

    def c4(self, text: str) -> tuple[str | None, str]:
        c = self.cfg.c4
        if c.split_paragraph:
            lines = text.splitlines()
        else:
            from datatrove.utils.text import split_into_sentences

            lines = split_into_sentences(text, self.language)
        num_sentences = 0
        kept: list[str] = []
        mwl = c.max_word_length
        cite = self._citation
        end_punct = self._end_punct
        ellipsis = self._ellipsis
        count_sentences = self.words.count_sentences
        for line in lines:
            line = line.strip()
            words = line.split()
            if mwl != -1 and words and max(map(len, words)) > mwl:
                continue
            if c.remove_citations and "[" in line:
                line = cite.sub("", line)
            if c.filter_no_terminal_punct and (not line.endswith(end_punct) or line.endswith(ellipsis)):
                continue
            if len(words) < c.min_words_per_line:
                continue
            line_l = line.lower()
            if c.filter_lorem_ipsum and "lorem ipsum" in line_l:
                return "lorem_ipsum", text
            if c.filter_javascript and "javascript" in line_l:
                continue
            if c.filter_curly_bracket and "{" in line:
                return "curly_bracket", text
            if c.filter_policy and any(p in line_l for p in self._policy):
                continue
            # only "num_sentences < min_num_sentences" is used: stop counting once it is reached
            if c.min_num_sentences != -1 and num_sentences < c.min_num_sentences:
                num_sentences += count_sentences(line) if c.split_paragraph else 1
            kept.append(line)
        if num_sentences < c.min_num_sentences:
            return "too_few_sentences", text
        return None, ("\n" if c.split_paragraph else " ").join(kept).strip()

    def fineweb(self, text: str, n_words: int | None = None) -> str | None:
        f = self.cfg.fineweb
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if len(lines) == 0:
            return "empty"
        ratio = sum(1 for line in lines if line.endswith(self._stop_chars)) / len(lines)
        if ratio < f.line_punct_thr and not (ratio == 0 and f.line_punct_exclude_zero):
            return "line_punct_ratio"
        ratio = sum(1 for line in lines if len(line) <= f.short_line_length) / len(lines)
        if ratio > f.short_line_thr:
            return "short_line_ratio"
        ratio = _dup_counts(lines)[1] / len(text.replace("\n", ""))
        if ratio > f.char_duplicates_ratio:
            return "char_dup_ratio"
        new_line = text.count("\n")
        if n_words is None and self.words.fast_words and "IS_ALPHA" not in text:
            # words >= whitespace chunks (each chunk is one or more words); division is monotonic
            if not new_line / len(text.split()) > f.new_line_ratio:
                return None
        if n_words is None:
            n_words = len(self._word_ids(text))
        if new_line / n_words > f.new_line_ratio:
            return "list_ratio"
        return None

    def warm_up(self) -> None:
        """Load the tokenizer and compile the loops (numba caches them on disk) before the first
        document."""
        text = ("The first words of a warm-up text. It has two sentences with the stop words.\n"
                "The first words of a warm-up text repeated on a second line...")
        self.words.count_sentences(text.splitlines()[0])
        wid = self._word_ids(text)
        self.gopher_repetition_ngrams(text, wid)
        self.gopher_quality(text, wid)
        self._word_ids(text.replace("first", "last"))

    # -------------------------------------------------------------- all of them

    def check(self, text: str) -> tuple[str | None, str | None, str]:
        """``(rule set, reason, text)``: the first rule set that drops the document and its
        reason (both None when kept), and the text after C4's line filter (``c4.modify_text``)
        or the input. Raises :class:`RuleError` when a rule set fails on the document."""
        cfg = self.cfg
        rule = "gopher_repetition"
        try:
            wid = None
            if cfg.gopher_repetition.enabled:
                why = self.gopher_repetition_cheap(text)
                if why:
                    return rule, why, text
            if self._certainly_long(text):
                self.shortcuts += 1
                return "gopher_quality", "gopher_long_doc", text
            if cfg.gopher_repetition.enabled:
                wid = self._word_ids(text)
                why = self.gopher_repetition_ngrams(text, wid)
                if why:
                    return rule, why, text
            rule = "gopher_quality"
            if cfg.gopher_quality.enabled:
                if wid is None:
                    wid = self._word_ids(text)
                why = self.gopher_quality(text, wid)
                if why:
                    return rule, why, text
            rule = "c4"
            out = text
            if cfg.c4.enabled:
                why, new = self.c4(text)
                if why:
                    return rule, why, text
                if cfg.c4.modify_text and new != text:
                    out = new
            rule = "fineweb"
            if cfg.fineweb.enabled:
                why = self.fineweb(out, len(wid) if wid is not None and out == text else None)
                if why:
                    return rule, why, text
            return None, None, out
        except RuleError:
            raise
        except Exception as exc:  # noqa: BLE001 - one rule set failing on one document
            raise RuleError(rule, exc) from exc
