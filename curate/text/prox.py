"""ProX ("Programming Every Example"): the programs a refining model writes, and their executor.

A model reads a document and answers with a small program; this module runs it. Two levels:

- document level: ``keep_doc()`` or ``drop_doc()``. As the reference, a program containing the
  word ``drop`` anywhere drops the document; everything else keeps it (:func:`doc_keeps`).
- chunk level: the document's lines are numbered ``[000]...`` (:func:`number_lines`), cut into
  chunks of at most 1,500 tokens on line boundaries (:func:`chunk_lines`), and the model answers
  each chunk with lines of ``remove_lines(line_start=.., line_end=..)``,
  ``normalize(source_str="..", target_str="..")`` or ``keep_chunk()``. The chunk programs are
  joined (:func:`join_programs`) and executed on the whole document (:func:`refine`).

The executor follows the reference (GAIR-NLP/ProX ``utils/chunk_utils.py``) decision for
decision, so that the same program gives the same text; ``tests/text/test_prox_parity.py`` checks
it against the reference's outputs on hundreds of generated cases. Its quirks are kept on purpose:

- each program line is one operation, recognised by its prefix (``remove_lines``, ``normalize``);
  other lines (``keep_chunk()``, prose, an indented call) are ignored without an error;
- the arguments are the text between the first ``(`` and the first ``)``; no ``(`` is one error
  operation (the line is skipped); no ``)`` is one error operation and the arguments run to the
  line's second-last character;
- ``remove_lines``: ``line_start`` / ``line_end`` are the text after the first ``=`` of the first
  two comma-separated arguments, read by Python's ``int`` (so `` 5 `` and ``1_0`` are numbers,
  ``5.0`` is not); a missing or unreadable number is an error operation. Line numbers are the
  0-based line indices of the document; both ends are included; a reversed range removes nothing.
  A line ``remove_lines`` containing ``all=True`` removes every line;
- ``normalize``: one argument removes its string everywhere in the document (even a single
  space); two arguments replace the first by the second everywhere, unless the first is empty or
  one space; three or more arguments (a comma inside a string) are ignored without an error. The
  strings are the text after the first ``=`` with double quotes stripped from both ends (no
  unescaping: ``\\"`` stays a backslash and a quote). Normalisations run in program order on the
  whole document, before the lines are removed;
- the remove ranges are sorted and merged (adjacent ranges join); a merged range starting past
  the last line is one error operation, one ending past it is one error operation (and clipped);
- the rules with their defaults (``threshold_1`` 0.0, ``threshold_2`` 0.95, ``error_op`` 2): in
  whitespace words, when the result keeps at most ``1 - threshold_2`` of the document and the
  program made fewer than ``error_op`` error operations, the document is dropped; else a result of
  at most 10 words is dropped; else, when the result keeps at least ``threshold_1`` of the words
  and there were fewer than ``error_op`` error operations, the result is the refined document;
  otherwise the program is ignored and the document is kept as it was.

One difference: the reference divides by the document's word count and fails on a document
without words; here such a document gets the decision ``empty`` (and an empty text).

Only the ranges are kept in memory (never one entry per line number), so a program naming line
10**12 costs nothing; and a normalisation that would make the text grow past 16 times its size
plus 1 MiB is not applied (one error operation), where the reference would exhaust memory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

# what a decision means for the document
DROPPED = frozenset({"mostly_removed", "short", "empty"})


@dataclass
class ProgramResult:
    """The outcome of a chunk-level program on a document."""

    text: str                       # the refined document ("" when dropped)
    decision: str                   # refined | ignored | mostly_removed | short | empty
    processed: str                  # the document after the program, before the rules
    error_ops: int                  # error operations (the reference's num_error_op)
    normalizations: list[tuple[str, str]] = field(default_factory=list)  # (source, target) applied
    removed_lines: list[str] = field(default_factory=list)               # lines the program removed
    remove_ranges: list[tuple[int, int]] = field(default_factory=list)   # merged, clipped ranges
    ops: Counter = field(default_factory=Counter)   # operation kind -> count (see op_kind)

    @property
    def dropped(self) -> bool:
        return self.decision in DROPPED


# --------------------------------------------------------------------------------------------------
# prompts: numbered lines in chunks


def number_lines(text: str, digits: int = 3) -> list[str]:
    """The document's lines (split on ``\\n``), each prefixed with its zero-padded index: ``[000]``."""
    return [f"[{i:0{digits}d}]{line}" for i, line in enumerate(text.split("\n"))]


def chunk_lines(text: str, count: Callable[[str], int], max_tokens: int = 1500, digits: int = 3) -> list[str]:
    """The numbered document in chunks of at most ``max_tokens`` (``count`` counts a numbered line's
    tokens), cut on line boundaries; a line longer than the budget is a chunk of its own."""
    chunks: list[str] = []
    cur: list[str] = []
    used = 0
    for line in number_lines(text, digits):
        n = count(line)
        if used + n <= max_tokens:
            cur.append(line)
            used += n
            continue
        if cur:
            chunks.append("\n".join(cur))
        if n > max_tokens:
            chunks.append(line)
            cur, used = [], 0
        else:
            cur, used = [line], n
    if cur:
        chunks.append("\n".join(cur))
    return chunks


def join_programs(answers: Sequence[str | None]) -> str:
    """One document program from its chunks' answers (spaces stripped from each, one per line)."""
    return "\n".join((a or "").strip(" ") for a in answers)


# --------------------------------------------------------------------------------------------------
# programs


def doc_keeps(program: str | None) -> bool:
    """The document-level decision: False (drop) when the program mentions ``drop`` at all."""
    return "drop" not in (program or "").strip(" ")


def doc_op_kind(program: str | None) -> str:
    """``keep_doc``, ``drop_doc`` or ``other`` (an answer that names neither; kept unless it says
    "drop"), for counting."""
    p = (program or "").strip()
    if p.startswith("drop_doc"):
        return "drop_doc"
    if p.startswith("keep_doc"):
        return "keep_doc"
    return "other"


def op_kind(op: str) -> str:
    """How the executor reads one program line: ``remove_lines``, ``remove_all``, ``normalize``,
    ``keep_chunk``, ``blank`` or ``unknown`` (the last three do nothing)."""
    if op.startswith("remove_lines"):
        return "remove_all" if "all=True" in op else "remove_lines"
    if op.startswith("normalize"):
        return "normalize"
    if op.startswith("keep_chunk"):
        return "keep_chunk"
    return "blank" if not op.strip() else "unknown"


def _arguments(op: str) -> tuple[list[str] | None, int]:
    """(comma-separated arguments, error operations): None when the line has no ``(``."""
    start = op.find("(")
    if start < 0:
        return None, 1
    end = op.find(")")
    errors = 0
    if end < 0:  # unclosed: up to (not including) the last character
        errors, end = 1, len(op) - 1
    return op[start + 1:end].split(","), errors


def _value(arg: str) -> str:
    """The text after the first ``=`` (IndexError when there is none)."""
    return arg.split("=")[1]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges sorted by start (stable) and merged when they overlap or touch."""
    merged: list[tuple[int, int]] = []
    for s, e in sorted(ranges, key=lambda r: r[0]):
        if merged and s <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def growth_limit(text: str) -> int:
    """The longest text normalisations may make of ``text`` (see :func:`execute`)."""
    return 16 * len(text) + (1 << 20)


def execute(text: str, program: str, max_chars: int | None = None) -> ProgramResult:
    """Run a chunk-level ``program`` on ``text`` (no rules): the processed text and what the
    program did. ``decision`` is left empty; :func:`refine` applies the rules.

    Memory stays bounded: a normalisation that would make the text longer than ``max_chars``
    (default :func:`growth_limit`: 16 times the document plus 1 MiB; a looping model can write
    ``normalize(source_str="e", target_str="ee")`` many times) is not applied and counts as an error
    operation (counted in ``ops["too_long"]``). The reference has no such limit."""
    limit = growth_limit(text) if max_chars is None else max_chars
    ops = program.strip(" ").split("\n")
    ranges: list[tuple[int, int]] = []
    remove_all = False
    errors = 0
    pairs: list[tuple[str, str]] = []
    kinds: Counter = Counter()
    for op in ops:
        kind = op_kind(op)
        kinds[kind] += 1
        if kind == "remove_lines":
            args, err = _arguments(op)
            errors += err
            if args is None:
                continue
            try:
                start, end = int(_value(args[0])), int(_value(args[1]))
            except (IndexError, ValueError):
                errors += 1
                continue
            ranges.append((start, end))
        elif kind == "normalize":
            args, err = _arguments(op)
            errors += err
            if args is None:
                continue
            try:
                if len(args) == 1:
                    source, target = _value(args[0]).strip('"'), ""
                elif len(args) == 2:
                    source, target = _value(args[0]).strip('"'), _value(args[1]).strip('"')
                else:
                    continue  # a comma inside a string: ignored, as the reference
            except IndexError:
                errors += 1
                continue
            if len(args) == 1 or source not in (" ", ""):
                if source and len(target) > len(source) and \
                        len(text) + text.count(source) * (len(target) - len(source)) > limit:
                    errors += 1
                    kinds["too_long"] += 1
                    continue
                text = text.replace(source, target)
            pairs.append((source, target))
        elif kind == "remove_all":
            remove_all = True
    lines = text.split("\n")
    n = len(lines)
    removed = bytearray(n)
    if remove_all:
        removed[:] = b"\x01" * n
    for s, e in ranges:
        lo, hi = max(s, 0), min(e, n - 1)
        if lo <= hi:
            removed[lo:hi + 1] = b"\x01" * (hi - lo + 1)
    kept = [line for line, r in zip(lines, removed) if not r]
    noise = [line for line, r in zip(lines, removed) if r]
    clipped: list[tuple[int, int]] = []
    for s, e in _merge(ranges):
        if s >= n:
            errors += 1
            continue
        if e >= n:
            errors += 1
            e = n - 1
        clipped.append((s, e))
    return ProgramResult(text="", decision="", processed="\n".join(kept), error_ops=errors,
                         normalizations=pairs, removed_lines=noise, remove_ranges=clipped, ops=kinds)


def refine(text: str, program: str, threshold_1: float = 0.0, threshold_2: float = 0.95,
           error_op: int = 2, max_chars: int | None = None) -> ProgramResult:
    """Execute a chunk-level ``program`` on ``text`` and apply the reference's rules (see the module
    docstring): ``result.text`` is the refined document, the unchanged document (the program was
    ignored) or "" (dropped); ``result.decision`` says which."""
    res = execute(text, program, max_chars)
    words_out = len(res.processed.split())
    words_in = len(text.split())
    if words_in == 0:
        res.decision, res.text = "empty", ""
        return res
    ratio = words_out / words_in * 1.0
    if ratio <= (1 - threshold_2) and res.error_ops < error_op:
        res.decision, res.text = "mostly_removed", ""
    elif words_out <= 10:
        res.decision, res.text = "short", ""
    elif ratio >= threshold_1 and res.error_ops < error_op:
        res.decision, res.text = "refined", res.processed
    else:
        res.decision, res.text = "ignored", text
    return res
