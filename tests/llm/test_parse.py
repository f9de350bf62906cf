"""Parse helpers on well-formed and malformed answers."""

from __future__ import annotations

import pytest

from curate.llm.chunking import split_text
from curate.llm.parse import (ParseError, format_tagged_pairs, parse_bullets, parse_json_object,
                              parse_scored_lines, parse_tagged_pairs, string_list, strip_fences)


def reason(fn, *a, **k):
    with pytest.raises(ParseError) as e:
        fn(*a, **k)
    return e.value.reason


def test_json_object_tolerant_of_fences_and_prose():
    assert parse_json_object('{"a": 1}') == {"a": 1}
    assert parse_json_object('Sure! ```json\n{"a": [1, 2]}\n```\nHope this helps {not json}') == {"a": [1, 2]}
    assert parse_json_object('The answer is {"summary": "s", "entities": ["x"]} as requested.',
                             required={"summary": str, "entities": list})["entities"] == ["x"]
    # an unclosed fence (the model hit max_tokens after the object) still parses
    assert parse_json_object('```json\n{"a": "b"}') == {"a": "b"}
    # a non-object JSON value before the object is skipped
    assert parse_json_object('[1] then {"k": {"nested": true}}') == {"k": {"nested": True}}


def test_json_object_strict_about_the_result():
    assert reason(parse_json_object, "") == "empty_answer"
    assert reason(parse_json_object, None) == "empty_answer"
    assert reason(parse_json_object, "I cannot help with that.") == "no_json"
    assert reason(parse_json_object, '```json\n{"summary": "a long text that was cut') == "truncated_json"
    assert reason(parse_json_object, '{"entities": ["a", "b",') == "truncated_json"
    assert reason(parse_json_object, "{'single': 'quotes'}") == "invalid_json"
    assert reason(parse_json_object, '{"summary": "s"}', required={"entities": list}) == "missing_key"
    assert reason(parse_json_object, '{"entities": "a, b"}', required={"entities": list}) == "wrong_type"


def test_tagged_pairs_reference_rules():
    text = ("<QUE> What is X? <ANS> X is a thing. </END>\n\n<QUE> what is x? <ANS> Again. </END>\n\n"
            "<QUE> Empty? <ANS>  </END>\n\n<QUE> Two <ANS> answers <ANS> here </END>\n\n"
            "No tag <ANS> missing QUE </END>\n\n<QUE> Why? <ANS> Because. </END>\n\n<QUE> Cut off <ANS> mid")
    assert parse_tagged_pairs(text) == [("What is X?", "X is a thing."), ("Why?", "Because.")]
    # without dedupe the case-insensitive duplicate stays
    assert len(parse_tagged_pairs(text, dedupe=False)) == 3
    assert parse_tagged_pairs("") == [] and parse_tagged_pairs("no tags at all") == []
    # an answer ending exactly with </END> keeps its last pair; round trip
    pairs = [("Q1?", "A1."), ("Q2?", "A2.")]
    assert parse_tagged_pairs(format_tagged_pairs(pairs)) == pairs
    assert parse_tagged_pairs(format_tagged_pairs(pairs) + "\n") == pairs


def test_scored_lines():
    assert parse_scored_lines("Scores:\n1. 4 - clear\n2. 5 - novel\nThanks") == [(4.0, "clear"), (5.0, "novel")]
    assert parse_scored_lines("Accuracy: 4/5\nCoherence: 3", n=2, low=1, high=5) == [(4.0, "Accuracy"),
                                                                                  (3.0, "Coherence")]
    assert reason(parse_scored_lines, "no numbers here") == "no_scores"
    assert reason(parse_scored_lines, "a: 1\nb: 2", n=3) == "wrong_count"
    assert reason(parse_scored_lines, "a: 9", low=1, high=5) == "out_of_range"
    assert reason(parse_scored_lines, "   ") == "empty_answer"


def test_bullets():
    text = "Here are the facts:\n- one\n* two\n  continued\n3. three\n- One\nThat is all."
    assert parse_bullets(text) == ["one", "two continued", "three"]
    assert parse_bullets("```\n- a\n- b\n```") == ["a", "b"]
    assert reason(parse_bullets, "just a sentence") == "no_items"
    assert reason(parse_bullets, "- a", min_items=2) == "no_items"


def test_helpers():
    assert strip_fences("```python\nx = 1\n```") == "x = 1"
    assert strip_fences("plain") == "plain"
    assert string_list(["A", " a ", "", 3, "b", "x" * 300]) == ["A", "b"]


def test_split_text_never_truncates():
    count = lambda s: len(s.split())  # noqa: E731  (a word "tokenizer")
    paras = ["First paragraph has five words.", "Second one. It has two sentences here.",
             " ".join(f"w{i}" for i in range(25))]
    text = "\n\n".join(paras)
    chunks = split_text(text, 8, count)
    assert all(count(c) <= 8 for c in chunks)
    assert " ".join(chunks).split() == text.split()  # every word, in order
    assert chunks[0] == paras[0]  # paragraph boundary kept
    assert chunks[1] == paras[1]  # fits: one chunk
    # too long for one chunk: cut at the sentence boundary, never inside a sentence that fits
    assert split_text(paras[1], 5, count) == ["Second one.", "It has two sentences here."]
    # a run of words longer than the budget is cut into runs of words (not dropped)
    assert [count(c) for c in split_text(paras[2], 8, count)] == [8, 8, 8, 1]
    assert split_text("short", 8, count) == ["short"] and split_text("  ", 8, count) == []
