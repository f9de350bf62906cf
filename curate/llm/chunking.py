"""Split long documents into chunks that fit a token budget, at natural boundaries.

Paragraphs (blank lines) are packed greedily into chunks of at most ``budget`` tokens; a paragraph
that alone is too long is split into sentences, and a sentence that is still too long into runs of
words. Nothing is dropped: joining the chunks gives back every word of the text. Token counts come
from the engine (``Engine.count_tokens``), so the budget is in the engine's own tokens.
"""

from __future__ import annotations

import re
from typing import Callable

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
