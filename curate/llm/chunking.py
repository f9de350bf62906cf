"""Split long documents into chunks that fit a token budget, at natural boundaries.

Paragraphs (blank lines) are packed greedily into chunks of at most ``budget`` tokens; a paragraph
that alone is too long is split into sentences, and a sentence that is still too long into runs of
words. Nothing is dropped: joining the chunks gives back every word of the text. Token counts come
from the engine (``Engine.count_tokens``), so the budget is in the engine's own tokens.
"""

from __future__ import annotations

import re
from typing import Any, Callable

_PARA = re.compile(r"\n\s*\n")
# a sentence ends at . ! ? (optionally followed by quotes/brackets) and whitespace
_SENT = re.compile(r"(?<=[.!?。！？])[\"')\]]*\s+")


def split_text(text: str, budget: int, count: Callable[[str], int]) -> list[str]:
    """Chunks of ``text`` with at most ``budget`` tokens each (``count`` counts tokens)."""
    if budget < 1:
        raise ValueError("budget must be >= 1")
    text = text.strip()
    if not text:
        return []
    if count(text) <= budget:
        return [text]
    units: list[tuple[str, str]] = []  # (piece, separator before it)
    for p in (p.strip() for p in _PARA.split(text)):
        if not p:
            continue
        if count(p) <= budget:
            units.append((p, "\n\n"))
            continue
        first = True
        for s in (s.strip() for s in _SENT.split(p)):
            if not s:
                continue
            sep = "\n\n" if first else " "
            first = False
            if count(s) <= budget:
                units.append((s, sep))
            else:
                for k, w in enumerate(_words(s, budget, count)):
                    units.append((w, sep if k == 0 else " "))
    chunks: list[str] = []
    cur = ""
    for piece, sep in units:
        cand = f"{cur}{sep}{piece}" if cur else piece
        if cur and count(cand) > budget:
            chunks.append(cur)
            cur = piece
        else:
            cur = cand
    if cur:
        chunks.append(cur)
    return chunks


def _words(sentence: str, budget: int, count: Callable[[str], int]) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    for w in sentence.split():
        if cur and count(" ".join(cur + [w])) > budget:
            out.append(" ".join(cur))
            cur = []
        cur.append(w)
    if cur:
        out.append(" ".join(cur))
    return out


def cut_text(text: str, budget: int, *, tokenizer: Any = None, count: Callable[[str], int] | None = None,
             keep: str = "head_tail", marker: str = "...") -> tuple[str, bool]:
    """``text`` cut to about ``budget`` tokens; returns (text, was it cut).

    ``keep="head_tail"`` keeps the first ``budget // 2`` and the last ``budget - budget // 2``
    tokens with ``marker`` between them (DataMan); ``keep="head"`` keeps the first ``budget`` tokens
    and appends ``marker`` (AutoMathText). With a Hugging Face ``tokenizer`` the cut is exact, on
    tokens (``tokenize`` -> slice -> ``convert_tokens_to_string``, the marker as one token, as the
    DataMan reference does); otherwise characters are cut so that ``count`` (an engine's token
    estimate) stays within the budget.
    """
    if budget < 1:
        raise ValueError("budget must be >= 1")
    if tokenizer is not None:
        toks = tokenizer.tokenize(text)
        if len(toks) <= budget:
            return text, False
        if keep == "head":
            return tokenizer.convert_tokens_to_string(toks[:budget]) + marker, True
        h = budget // 2
        out = toks[:h] + [marker] + toks[len(toks) - (budget - h):]
        return tokenizer.convert_tokens_to_string(out).strip(), True
    if count is None:
        raise ValueError("cut_text needs a tokenizer or a count function")
    if count(text) <= budget:
        return text, False
    if keep == "head":
        return text[:_fit(text, budget, count)] + marker, True
    h = budget // 2
    head = text[:_fit(text, h, count)]
    rev = text[::-1]
    tail = rev[:_fit(rev, budget - h, count)][::-1]
    return f"{head}{marker}{tail}", True


def _fit(text: str, budget: int, count: Callable[[str], int]) -> int:
    """The longest prefix length of ``text`` with at most ``budget`` tokens (binary search)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
