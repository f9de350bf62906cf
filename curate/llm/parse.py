"""Parsers for LLM answers, shared by every LLM stage.

Each helper is tolerant of the usual wrapping (Markdown code fences, a sentence before or after
the payload) and strict about the result: when the payload is not there or is malformed it raises
:class:`ParseError` with a short snake_case ``reason`` (counted as ``errors/parse/<reason>``).

    parse_json_object('Sure! ```json\\n{"a": 1}\\n``` Hope it helps', required={"a": int})  -> {"a": 1}
    parse_tagged_pairs("<QUE> q <ANS> a </END>")                   -> [("q", "a")]
    parse_scored_lines("1. 4 - clear\\n2. 5 - novel", n=2)         -> [(4.0, "clear"), (5.0, "novel")]
    parse_bullets("- one\\n* two\\n3. three")                       -> ["one", "two", "three"]
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable


class ParseError(ValueError):
    """An answer the stage cannot use. ``reason`` is a counter-friendly snake_case word."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)(?:```|$)", re.S)


def strip_fences(text: str) -> str:
    """The content of the first fenced block when the answer has one (also an unclosed fence),
    else the text itself, stripped."""
    m = _FENCE.search(text)
    return (m.group(1) if m else text).strip()


def _check_text(text: Any) -> str:
    if text is None or not isinstance(text, str):
        raise ParseError("empty_answer", "no text")
    if not text.strip():
        raise ParseError("empty_answer", "the answer is blank")
    return text


# -- JSON ------------------------------------------------------------------------------------------

def parse_json_object(text: str, required: dict[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """The first complete JSON object in ``text`` (fences and surrounding prose ignored).

    ``required`` maps keys to the type(s) their value must have. Reasons: ``empty_answer``,
    ``no_json`` (no ``{``), ``truncated_json`` (an object starts but never closes), ``invalid_json``,
    ``missing_key``, ``wrong_type``.
    """
    text = _check_text(text)
    candidates = [strip_fences(text), text]
    saw_open = False
    last_err = ""
    for cand in candidates:
        dec = json.JSONDecoder()
        for m in re.finditer(r"\{", cand):
            saw_open = True
            try:
                obj, _ = dec.raw_decode(cand, m.start())
            except json.JSONDecodeError as exc:
                last_err = str(exc)
                continue
            if isinstance(obj, dict):
                return _check_keys(obj, required)
    if not saw_open:
        raise ParseError("no_json", "the answer has no JSON object")
    if _unbalanced(strip_fences(text)):
        raise ParseError("truncated_json", last_err)
    raise ParseError("invalid_json", last_err)


def _unbalanced(text: str) -> bool:
    return text.count("{") > text.count("}") or text.count("[") > text.count("]")


def _check_keys(obj: dict[str, Any], required: dict[str, Any] | None) -> dict[str, Any]:
    for key, typ in (required or {}).items():
        if key not in obj:
            raise ParseError("missing_key", f"no {key!r} in the JSON object")
        if not isinstance(obj[key], typ):
            raise ParseError("wrong_type", f"{key!r} is {type(obj[key]).__name__}")
    return obj


_JSON_STR = r'"(?:[^"\\\n]|\\.)*"'


def salvage_string_list(text: str, key: str) -> list[str]:
    """The complete string items of the JSON list under ``key`` in an answer cut short (the model
    hit max_tokens inside the list): ``{"entities": ["a", "b", "c`` -> ["a", "b"]. Items must be
    whole JSON strings followed by a comma or the list's end; nothing is guessed."""
    m = re.search(rf'"{re.escape(key)}"\s*:\s*\[', text)
    if not m:
        return []
    out = []
    for item in re.finditer(rf"\s*({_JSON_STR})\s*(,|\])", text[m.end():]):
        try:
            out.append(json.loads(item.group(1)))
        except ValueError:
            break
        if item.group(2) == "]":
            break
    return out


def salvage_string(text: str, key: str) -> str | None:
    """A complete JSON string value under ``key`` in a possibly cut answer, or None."""
    m = re.search(rf'"{re.escape(key)}"\s*:\s*({_JSON_STR})', text)
    if not m:
        return None
    try:
        return json.loads(m.group(1))
    except ValueError:
        return None


def string_list(values: Iterable[Any], *, max_len: int = 200) -> list[str]:
    """Strings from a JSON list: stripped, non-empty, at most ``max_len`` characters, case-insensitive
    duplicates removed (first kept). Non-strings are ignored."""
    out: list[str] = []
    seen: set[str] = set()
    for v in values:
        if not isinstance(v, str):
            continue
        v = " ".join(v.split())
        if not v or len(v) > max_len or v.lower() in seen:
            continue
        seen.add(v.lower())
        out.append(v)
    return out


# -- tagged pairs (instruction synthesizer format) --------------------------------------------------

QUE, ANS, END = "<QUE>", "<ANS>", "</END>"


def parse_tagged_pairs(text: str, *, dedupe: bool = True) -> list[tuple[str, str]]:
    """Question/answer pairs in the synthesizer format ``<QUE> q <ANS> a </END>`` (repeated).

    Rules of the reference parser: split on ``</END>``; a last piece without ``</END>`` is
    unfinished and dropped; a piece must split in exactly two on ``<ANS>`` and its question part
    must start with ``<QUE>``; empty answers are dropped; with ``dedupe`` questions repeated
    case-insensitively are dropped (first kept). Invalid pieces are skipped. Returns possibly [].
    """
    if not text:
        return []
    pieces = text.split(END)
    if not text.rstrip().endswith(END):
        pieces = pieces[:-1]
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for piece in pieces:
        parts = piece.split(ANS)
        if len(parts) != 2:
            continue
        q, a = parts[0].strip(), parts[1].strip()
        if not q.startswith(QUE) or not a:
            continue
        q = q[len(QUE):].strip()
        if not q:
            continue
        if dedupe:
            if q.lower() in seen:
                continue
            seen.add(q.lower())
        out.append((q, a))
    return out


def format_tagged_pairs(pairs: Iterable[tuple[str, str]]) -> str:
    """The inverse of :func:`parse_tagged_pairs` (pairs separated by a blank line)."""
    return "\n\n".join(f"{QUE} {q} {ANS} {a} {END}" for q, a in pairs)


# -- scored lines and bullet lists -------------------------------------------------------------------

_NUM = r"[-+]?\d+(?:\.\d+)?"
_SCORED = re.compile(rf"^\s*(?:[-*•]\s*|\(?\d+[.)]\s+)?(?:\*\*)?(?P<label>[^:\n]*?)(?:\*\*)?\s*[:=]?\s*"
                     rf"(?P<score>{_NUM})\s*(?:/\s*\d+)?\s*(?:[-–—:,]\s*(?P<rest>.*))?$")


def parse_scored_lines(text: str, *, n: int | None = None, low: float | None = None,
                       high: float | None = None) -> list[tuple[float, str]]:
    """Lines holding a score: ``4``, ``2. 4 - reason``, ``Accuracy: 4/5``, ``- 3: reason``. Returns
    (score, label or reason) per scored line. Strict: with ``n``, exactly ``n`` scored lines
    (``wrong_count``); with ``low``/``high``, every score within bounds (``out_of_range``); none at all
    is ``no_scores``."""
    text = strip_fences(_check_text(text))
    out: list[tuple[float, str]] = []
    for line in text.splitlines():
        m = _SCORED.match(line)
        if not m:
            continue
        score = float(m.group("score"))
        label = (m.group("rest") or m.group("label") or "").strip()
        out.append((score, label))
    if not out:
        raise ParseError("no_scores", "no line with a score")
    if n is not None and len(out) != n:
        raise ParseError("wrong_count", f"{len(out)} scores, expected {n}")
    for s, _ in out:
        if (low is not None and s < low) or (high is not None and s > high):
            raise ParseError("out_of_range", f"score {s} outside [{low}, {high}]")
    return out


_BULLET = re.compile(r"^\s*(?:[-*•+]|\(?\d+[.)]|\(?[a-zA-Z][.)])\s+(?P<item>.+?)\s*$")


def parse_bullets(text: str, *, min_items: int = 1, dedupe: bool = True) -> list[str]:
    """Items of a bullet or numbered list (``-``, ``*``, ``•``, ``1.``, ``a)``); lines that are not
    list items (an intro sentence, a closing remark) are ignored. Continuation lines indented under
    an item are joined to it. ``no_items`` when fewer than ``min_items`` remain."""
    text = strip_fences(_check_text(text))
    items: list[str] = []
    for line in text.splitlines():
        m = _BULLET.match(line)
        if m:
            items.append(m.group("item").strip())
        elif items and line.startswith((" ", "\t")) and line.strip():
            items[-1] = f"{items[-1]} {line.strip()}"
    items = [i for i in items if i]
    if dedupe:
        items = string_list(items, max_len=10_000)
    if len(items) < min_items:
        raise ParseError("no_items", f"{len(items)} list item(s), need {min_items}")
    return items


# -- question/answer lines -----------------------------------------------------------------------------

_QA_TAG = re.compile(r"^\s*(?:[-*•]\s*|\d+[.)]\s*)?(?:\*\*)?(?:(?P<long>Question|Answer)\s*\d*\s*[:.]|"
                     r"(?P<short>Q|A)\s*\d*\s*:)(?:\*\*)?\s*(?P<rest>.*)$", re.I)


def parse_qa_pairs(text: str, *, min_pairs: int = 1, dedupe: bool = True) -> list[tuple[str, str]]:
    """Pairs written as ``Question: ...`` / ``Answer: ...`` lines (also ``Q1:``/``A1:``, numbered,
    bulleted or bold tags); lines without a tag continue the question or answer above them. A
    question without an answer is dropped; with ``dedupe`` repeated questions (case-insensitive)
    are dropped. ``no_qa_pairs`` when fewer than ``min_pairs`` remain."""
    text = strip_fences(_check_text(text))
    pairs: list[tuple[str, str]] = []
    q: str | None = None
    a: str | None = None
    for line in text.splitlines():
        m = _QA_TAG.match(line)
        if m:
            tag = (m.group("long") or m.group("short"))[0].lower()
            rest = m.group("rest").strip()
            if tag == "q":
                if q and a:
                    pairs.append((q, a))
                q, a = rest, None
            elif q is not None:
                a = f"{a} {rest}".strip() if a else rest
            continue
        if line.strip() and q is not None:
            if a is None:
                q = f"{q} {line.strip()}".strip()
            else:
                a = f"{a} {line.strip()}"
    if q and a:
        pairs.append((q, a))
    if dedupe:
        seen: set[str] = set()
        pairs = [p for p in pairs if not (p[0].lower() in seen or seen.add(p[0].lower()))]
    if len(pairs) < min_pairs:
        raise ParseError("no_qa_pairs", f"{len(pairs)} question-answer pair(s), need {min_pairs}")
    return pairs
