"""rc_llm (the LLM mode of reading_comprehension): question-answer pairs from the engine, parsed,
rendered and assembled by reading_comprehension's own code (same wrapping, same seeding)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curate.llm.parse import ParseError, parse_qa_pairs
from curate.stages.synth.rc_llm import RcLlm
from curate.stages.synth.reading_comprehension import ReadingComprehension

DOC = ("Copper\nCopper is a soft metal with high electrical conductivity. It is used in wires, pipes and "
       "coins. Bronze is an alloy of copper and tin.")
# the miner finds a contradiction pair here (two sentences of >= 50 characters around "However,")
MINED = ("Notes\nIt began long ago. The first experiments were carried out in a small laboratory near the river. However, the "
         "later experiments were moved to a much larger building in the city centre. They ran for years.")
ANSWER = ("Question: What is copper used in?\nAnswer: Wires, pipes and coins.\n"
          "Question: What is bronze?\nAnswer: An alloy of copper\nand tin.")


def docs(texts) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": list(texts)})


def _engine(server) -> dict:
    return {"kind": "openai", "model": "m", "base_url": server.base_url, "max_retries": 0}


def test_parse_qa_pairs():
    assert parse_qa_pairs(ANSWER) == [("What is copper used in?", "Wires, pipes and coins."),
                                      ("What is bronze?", "An alloy of copper and tin.")]
    variants = ("Here you go:\n1. **Question 1:** Why?\n**Answer 1:** Because.\n- Q2: How?\n- A2: Slowly.\n"
                "Q: Why?\nA: Again.\nQuestion: Unanswered?")
    assert parse_qa_pairs(variants) == [("Why?", "Because."), ("How?", "Slowly.")]
    for bad in ("No questions here.", "Question: only a question?", "Answer: no question"):
        with pytest.raises(ParseError) as exc:
            parse_qa_pairs(bad)
        assert exc.value.reason == "no_qa_pairs"


def test_pairs_rendered_in_the_reading_comprehension_format(openai_server):
    st = openai_server.state
    st.backend, st.responder = "script", lambda body: ANSWER
    s = RcLlm(engine=_engine(openai_server), domain="materials", max_pairs=5)
    out = s(docs([DOC, ""]))
    rows = out.to_pylist()
    r = rows[0]
    assert r["rc_llm_pairs"] == 2 and r["source_text"] == DOC and r["rc_summarize"] + r["rc_completion"] >= 0
    assert "What is copper used in?" in r["text"] and "An alloy of copper and tin." in r["text"]
    assert "Copper is a soft metal" in r["text"] and r["text"] != DOC
    # the intro line comes from reading_comprehension's document templates
    rc = ReadingComprehension(domain="materials")
    rc.ensure_setup()
    intros = [i.format(domain="materials").strip() for i in rc.t["document"]["intros"]]
    assert any(i in r["text"] for i in intros)
    assert rows[1]["text"] == "" and rows[1]["rc_llm_pairs"] == 0
    assert s.counters.to_dict()["rc_llm/pairs"] == 2
    # the request holds the body cut by reading_comprehension (title line split off) and max_pairs
    user = st.bodies[0]["messages"][-1]["content"]
    assert "write 5 varied questions" in user and "Copper is a soft metal" in user
    # seeded by the document id: the same text again; max_pairs caps the pairs
    again = RcLlm(engine=_engine(openai_server), domain="materials", max_pairs=5)(docs([DOC]))
    assert again.column("text")[0].as_py() == r["text"]
    one = RcLlm(engine=_engine(openai_server), domain="materials", max_pairs=1)(docs([DOC]))
    assert one.column("rc_llm_pairs").to_pylist() == [1]


def test_without_pairs_the_text_is_reading_comprehension_s(openai_server):
    """A document whose answer never parses is assembled by the same code and the same seeded
    choices as reading_comprehension: with no tasks (and with the mined tasks) the texts are equal."""
    st = openai_server.state
    st.backend, st.responder = "script", lambda body: "I cannot think of any questions."
    s = RcLlm(engine=_engine(openai_server), domain="history", parse_retries=1)
    out = s(docs([DOC]))
    assert out.column("text").to_pylist() == ReadingComprehension(domain="history")(docs([DOC])).column("text").to_pylist()
    c = s.counters.to_dict()
    assert c["errors/parse/no_qa_pairs"] == 1 and c["llm/parse_retries"] == 1
    assert s.take_side()["failed"].column("llm_answer").to_pylist() == ["I cannot think of any questions."]
    mined = RcLlm(engine=_engine(openai_server), domain="history", parse_retries=0, mined_tasks=True)
    got = mined(docs([MINED]))
    ref = ReadingComprehension(domain="history")(docs([MINED]))
    assert got.column("rc_contradict").to_pylist() == ref.column("rc_contradict").to_pylist() == [1]
    assert got.column("text").to_pylist() == ref.column("text").to_pylist()
    dropped = RcLlm(engine=_engine(openai_server), domain="history", parse_retries=0, on_error="drop")
    assert dropped(docs([DOC])).num_rows == 0 and dropped.counters.to_dict()["dropped/llm_failed"] == 1


@pytest.mark.slow
def test_smollm2_end_to_end(smol):
    s = RcLlm(engine={"kind": "transformers", "num_threads": 1}, domain="materials", max_pairs=2, max_tokens=160)
    out = s(docs([DOC]))
    c = s.counters.to_dict()
    r = out.to_pylist()[0]
    assert out.num_rows == 1 and r["source_text"] == DOC
    if r["rc_llm_pairs"]:
        assert c["rc_llm/pairs"] == r["rc_llm_pairs"] <= 2 and "Copper is a soft metal" in r["text"]
    else:  # the small model wrote no pair: counted, the document kept
        assert c["errors/parse/no_qa_pairs"] == 1
