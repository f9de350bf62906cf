"""The ProX executor (curate/text/prox.py) gives the reference's outputs (GAIR-NLP/ProX
``utils/chunk_utils.py``, ``utils/doc_utils.py``, ``trunc_text``) on seeded generated cases:
malformed and out-of-range programs, escaped quotes, commas and parentheses inside strings,
unknown functions, overlapping/reversed/negative ranges, empty documents, numbered lines, joined
chunk answers, other thresholds. The expected outputs were recorded from the reference by
tests/tools/prox_fixture.py (regenerate it there with a ProX checkout)."""

from __future__ import annotations

import json
import os

import pytest

from curate.text.prox import chunk_lines, doc_keeps, execute, join_programs, refine

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prox_parity.json")
FIXTURE = os.environ.get("CURATE_PROX_FIXTURE") or DEFAULT  # other cases in the same format
CASES = json.load(open(FIXTURE, encoding="utf-8"))["cases"]
COUNTS = {"words+1": lambda s: len(s.split()) + 1, "chars/4": lambda s: (len(s) + 3) // 4}


def _by_kind(kind):
    return [c for c in CASES if c["kind"] == kind]


@pytest.mark.skipif(FIXTURE != DEFAULT, reason="coverage of the shipped fixture")
def test_fixture_covers_the_input_class():
    chunk = _by_kind("chunk")
    assert len(chunk) >= 500 and len(_by_kind("doc")) >= 50 and len(_by_kind("split")) >= 100
    progs = "\n".join(c["program"] for c in chunk)
    for needle in ('\\"', "all=True", "keep_chunk()", "delete_line(", "line_start=-", 'source_str=":)"',
                   "remove_lines line_start", "normalize(\"", "1_0", "\r"):
        assert needle in progs, needle
    outcomes = {("exception" in c["expected"]["refine"]) or
                ("dropped" if c["expected"]["refine"]["text"] == "" else
                 "unchanged" if c["expected"]["refine"]["text"] == c["text"] else "refined") for c in chunk}
    assert outcomes == {True, "dropped", "unchanged", "refined"}
    assert {c["expected"]["execute"].get("error_ops") for c in chunk} >= {0, 1, 2, 3, 4}
    assert any("answers" in c for c in chunk) and any(c["options"] for c in chunk)


@pytest.mark.parametrize("case", _by_kind("chunk"), ids=lambda c: c["id"])
def test_chunk_programs(case):
    text, program = case["text"], case["program"]
    if "answers" in case:
        assert join_programs(case["answers"]) == program
    exp = case["expected"]
    res = execute(text, program)
    got = {"processed": res.processed, "normalizations": [list(p) for p in res.normalizations],
           "removed_lines": res.removed_lines, "remove_ranges": [list(r) for r in res.remove_ranges],
           "error_ops": res.error_ops}
    assert got == exp["execute"]
    out = refine(text, program, **case["options"])
    if "exception" in exp["refine"]:
        # the reference divides by the document's word count: a document without words
        assert exp["refine"]["exception"] == "ZeroDivisionError" and not text.split()
        assert out.decision == "empty" and out.text == ""
    else:
        assert out.text == exp["refine"]["text"]
        if out.text == "":
            assert out.decision in ("mostly_removed", "short") and out.dropped
        elif out.decision == "refined":
            assert out.text == res.processed and not out.dropped
        else:
            assert out.decision == "ignored" and out.text == text


@pytest.mark.parametrize("case", _by_kind("doc"), ids=lambda c: c["id"])
def test_doc_programs(case):
    assert doc_keeps(case["program"]) == (case["expected"]["text"] == case["text"])
    if not doc_keeps(case["program"]):
        assert case["expected"]["text"] == ""


@pytest.mark.parametrize("case", _by_kind("split"), ids=lambda c: c["id"])
def test_numbered_chunks(case):
    got = chunk_lines(case["text"], COUNTS[case["tokenizer"]], case["max_tokens"], case["digits"])
    assert got == case["expected"]["chunks"]
