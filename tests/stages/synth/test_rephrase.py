"""rephrase: each style is a prompt file plus a little parsing; truncated or wrongly prefixed
answers are dropped (counted), the rest become rows with provenance."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curate.stages.synth.rephrase import Rephrase

TEXT = "Copper conducts electricity well. It is used in wires."


def docs(texts=(TEXT,)) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": list(texts)})


def engine(server) -> dict:
    return {"kind": "openai", "model": "m", "base_url": server.base_url, "max_retries": 0}


def test_styles(openai_server):
    st = openai_server.state
    st.backend = "script"
    answers = {
        "encyclopedia": "Here is a paraphrased version: Copper is a good electrical conductor used in wiring.",
        "diverse questions": "Here are the questions and answers:\nQuestion: What is copper used in?\nAnswer: Wires.",
        "bullet points": "Here is the knowledge list:\n- Copper conducts electricity well.\n- Copper is used in wires.",
    }
    st.responder = lambda body: next(v for k, v in answers.items() if k in body["messages"][-1]["content"])
    wiki = Rephrase(engine=engine(openai_server))(docs()).to_pylist()
    assert wiki[0]["text"] == "Copper is a good electrical conductor used in wiring."
    assert wiki[0]["style"] == "wikipedia" and wiki[0]["template_id"] == "rephrase/wikipedia"
    qa = Rephrase(engine=engine(openai_server), style="qa")(docs()).to_pylist()
    assert qa[0]["text"] == TEXT + "\n\nQuestion: What is copper used in?\nAnswer: Wires."
    kl = Rephrase(engine=engine(openai_server), style="knowledge_list")(docs()).to_pylist()
    assert kl[0]["text"] == "- Copper conducts electricity well.\n- Copper is used in wires."
    assert kl[0]["source_id"] == "d0" and kl[0]["id"] == "d0#rephrase-0"


def test_wrong_prefix_answers_are_retried_then_saved(openai_server):
    st = openai_server.state
    st.backend = "script"

    def responder(body):
        text = body["messages"][-1]["content"]
        if "Rude" in text:
            return "Sure! Copper is nice."
        return "Here is a paraphrased version: Fine."

    st.responder = responder
    s = Rephrase(engine=engine(openai_server), parse_retries=1)
    out = s(docs([TEXT, "Rude text.", ""]))
    c = s.counters.to_dict()
    assert out.column("text").to_pylist() == ["Fine."]
    assert c["errors/parse/wrong_prefix"] == 1 and c["dropped/empty_text"] == 1
    assert s.take_side()["failed"].column("llm_answer").to_pylist() == ["Sure! Copper is nice."]


def test_truncated_answer_dropped():
    from curate.engines import Choice, Completion

    from curate.llm.stage import DropAnswer

    s = Rephrase()
    cut = Completion(choices=[Choice("Here is a paraphrased version: Copper is", "length", 3)])
    with pytest.raises(DropAnswer, match="truncated"):
        s.parse({"text": TEXT}, [cut])
    s2 = Rephrase(keep_truncated=True)
    assert s2.parse({"text": TEXT}, [cut])[0]["text"] == "Copper is"
