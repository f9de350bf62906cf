"""The ProX executor on hand-made cases (the parity test covers the reference's behaviour at large):
the rules and their thresholds, and what curate adds: bounded memory, the ``empty`` decision."""

from __future__ import annotations

import time

from curate.text.prox import chunk_lines, doc_keeps, doc_op_kind, execute, number_lines, refine

TEXT = "\n".join(f"line {i} has a few more words to count here" for i in range(10))  # 9 words a line


def test_rules_and_thresholds():
    keep_two = "remove_lines(line_start=2, line_end=9)"
    assert refine(TEXT, keep_two).decision == "refined"                       # 18 words kept
    assert refine(TEXT, "remove_lines(line_start=1, line_end=9)").decision == "short"   # 9 words <= 10
    assert refine(TEXT, "remove_lines(line_start=0, line_end=9)").decision == "mostly_removed"
    # threshold_1: a program that keeps less than this share of the words is ignored
    res = refine(TEXT, keep_two, threshold_1=0.5)
    assert res.decision == "ignored" and res.text == TEXT
    # threshold_2: removing at least this share drops the document
    assert refine(TEXT, keep_two, threshold_2=0.75).decision == "mostly_removed"
    # the same float arithmetic as the reference: 1 - 0.8 < 0.2, so 18/90 words is not "at most 0.2"
    assert refine(TEXT, keep_two, threshold_2=0.8).decision == "refined"
    # two error operations: the program is ignored, even one that removes everything
    bad = "remove_lines(line_start=x, line_end=1)\nremove_lines(line_start=50, line_end=60)\n"
    assert refine(TEXT, bad + "remove_lines(line_start=0, line_end=9)").decision == "short"
    assert refine(TEXT, bad + keep_two).decision == "ignored"
    assert refine(TEXT, bad + keep_two, error_op=3).decision == "refined"
    # no words at all (the reference divides by zero)
    assert refine(" \n\t", "keep_chunk()").decision == "empty"


def test_program_lines():
    res = execute(TEXT, 'remove_lines(line_start=8, line_end=20)\nremove_lines(line_start=0, line_end=1)\n'
                        'remove_lines(line_start=1, line_end=2)\nnormalize(source_str="line", target_str="row")\n'
                        'keep_chunk()\nfoo()')
    assert res.remove_ranges == [(0, 2), (8, 9)] and res.error_ops == 1    # merged; 20 clipped (one error)
    assert res.processed.split("\n")[0] == "row 3 has a few more words to count here"
    assert res.normalizations == [("line", "row")] and len(res.removed_lines) == 5
    assert dict(res.ops) == {"remove_lines": 3, "normalize": 1, "keep_chunk": 1, "unknown": 1}
    assert execute(TEXT, "remove_lines(all=True)").processed == ""
    assert execute(TEXT, "remove_lines(line_start=0, line_end=10**9)").error_ops == 1  # not a number


def test_huge_ranges_and_growth_stay_bounded():
    t0 = time.perf_counter()
    res = execute(TEXT, f"remove_lines(line_start=0, line_end={10 ** 15})")
    assert res.processed == "" and res.remove_ranges == [(0, 9)] and time.perf_counter() - t0 < 1
    # a looping model: 8**7 times the e's, ~100 MB without the limit
    looping = "\n".join(['normalize(source_str="e", target_str="eeeeeeee")'] * 7)
    res = execute(TEXT, looping)
    assert res.ops["too_long"] > 0 and res.error_ops == res.ops["too_long"]
    assert len(res.processed) <= 16 * len(TEXT) + (1 << 20)


def test_doc_programs_and_numbering():
    assert doc_keeps("keep_doc()") and not doc_keeps("drop_doc()") and not doc_keeps("keep_doc() # dropped")
    assert doc_op_kind(" drop_doc()\n") == "drop_doc" and doc_op_kind("Keep it") == "other"
    assert number_lines("a\nb", 3) == ["[000]a", "[001]b"]
    chunks = chunk_lines("\n".join(["w w w"] * 5), lambda s: len(s.split()), max_tokens=7)
    assert chunks == ["[000]w w w\n[001]w w w", "[002]w w w\n[003]w w w", "[004]w w w"]
