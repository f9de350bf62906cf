"""instruction_synth: the synthesizer format and BOS rule, multi-round chaining within the context,
chunking, rendering seeded by document id, raw text kept when nothing parses; SmolLM2 end to end."""

from __future__ import annotations

import importlib.util
import os

import pyarrow as pa
import pytest

from curate.pipeline.stage import get_stage
from curate.stages.synth.instruction_synth import InstructionSynth

TEXTS = ["The Danube is the second-longest river in Europe. It ends in the Black Sea.",
         "Photosynthesis converts light energy into chemical energy. It releases oxygen."]


def docs(texts=TEXTS) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})


def engine(server) -> dict:
    return {"kind": "openai", "model": "m", "base_url": server.base_url, "max_retries": 0}


def synth_answer(body: dict) -> str:
    """Pairs about the last <CON> text of a synthesizer prompt (a duplicate and an unfinished pair too)."""
    text = body["prompt"].rsplit("<CON>", 1)[1].split("</CON>")[0].strip()
    first = text.split()[0]
    return (f"<QUE> What is {first}? <ANS> {text} </END>\n\n<QUE> what is {first}? <ANS> again </END>\n\n"
            f"<QUE> Where? <ANS> Europe </END>\n\n<QUE> Cut <ANS> off")


def test_synthesizer_format_bos_and_chaining(openai_server):
    st = openai_server.state
    st.backend, st.responder = "script", synth_answer
    s = InstructionSynth(mode="synthesizer", engine=engine(openai_server), rounds=2, max_tokens=20,
                         context_tokens=400)
    st.bodies.clear()
    out = s(docs())
    # this stage's requests only: the session's server may still get a late request of an earlier
    # test's stopped stage (a chat body)
    mine = [b for b in st.bodies if "<CON>" in str(b.get("prompt", ""))]
    first, second = sorted(mine, key=lambda b: len(b["prompt"]))
    assert first["prompt"] == f"<s> <CON> {TEXTS[0]} </CON>\n\n"  # the reference input, BOS as text
    assert first["add_special_tokens"] is False and first["temperature"] == 0 and first["max_tokens"] == 20
    # round 2: the round-1 text with its parsed pairs as a few-shot example, closed by </s>
    assert second["prompt"] == (f"<s> <CON> {TEXTS[0]} </CON>\n\n<QUE> What is The? <ANS> {TEXTS[0]} </END>\n\n"
                                f"<QUE> Where? <ANS> Europe </END></s><s> <CON> {TEXTS[1]} </CON>\n\n")
    rows = out.to_pylist()
    assert [r["qa_count"] for r in rows] == [2, 2]  # duplicate question and unfinished pair dropped
    assert rows[1]["qa_pairs"] == [{"question": "What is Photosynthesis?", "answer": TEXTS[1]},
                                   {"question": "Where?", "answer": "Europe"}]
    assert all(TEXTS[i] in rows[i]["text"] and "Europe" in rows[i]["text"] for i in range(2))
    assert rows[0]["id"] == "d0#instruction_synth-0" and rows[0]["source_id"] == "d0"
    assert rows[0]["template_id"] is None and rows[0]["engine_kind"] == "openai"
    c = s.counters.to_dict()
    assert c["instruction_synth/chained"] == 1 and c["instruction_synth/pairs"] == 4
    # a context too small for the chain: no few-shot example
    st.bodies.clear()
    InstructionSynth(mode="synthesizer", engine=engine(openai_server), rounds=2, max_tokens=20,
                     context_tokens=90)(docs())
    assert all(b["prompt"].count("<CON>") == 1 for b in st.bodies if "prompt" in b)


def test_rendering_is_varied_and_seeded_by_document_id():
    s = InstructionSynth()
    pairs = [("What is X?", "X is Y."), ("Why?", "Because.")]
    texts = {s.render("Body.", pairs, f"doc{i}", 0) for i in range(40)}
    assert len(texts) >= 6  # several formats in use
    assert s.render("Body.", pairs, "doc3", 0) == s.render("Body.", pairs, "doc3", 0)
    assert all("Body." in t and "X is Y." in t and "Because." in t for t in texts)
    before = [t for t in texts if not t.startswith("Body.")]
    assert before and len(before) < len(texts) / 2  # pairs sometimes come first
    assert InstructionSynth(render_seed=1).render("Body.", pairs, "doc3", 0) != s.render("Body.", pairs, "doc3", 0) \
        or InstructionSynth(render_seed=2).render("Body.", pairs, "doc3", 0) != s.render("Body.", pairs, "doc3", 0)


def test_no_pairs_is_a_parse_failure_and_long_documents_are_chunked(openai_server):
    st = openai_server.state
    st.backend = "script"
    st.responder = lambda body: ("I did not follow the format." if body["messages"][-1]["content"].endswith("Short text.")
                                 else "<QUE> What is it about? <ANS> Topics. </END>")
    long_text = "\n\n".join(f"Paragraph {i} talks about topic {i} in some detail here." for i in range(30))
    s = InstructionSynth(engine=engine(openai_server), max_tokens=16, context_tokens=420, min_requests=100)
    out = s(docs([long_text, "", "Short text."]))
    rows = out.to_pylist()
    assert len(rows) > 2 and [r["chunk_index"] for r in rows] == list(range(len(rows)))
    assert all(r["qa_count"] == 1 and r["source_id"] == "d0" for r in rows)
    # chunks keep every paragraph, each in exactly one request
    asked = [b["messages"][-1]["content"] for b in st.bodies]
    assert all(sum(f"Paragraph {i} talks" in m for m in asked) == 1 for i in range(30))
    c = s.counters.to_dict()
    # the answer without pairs: asked again (new seed), then a parse failure, saved, no row written
    assert c["errors/parse/no_pairs"] == 1 and c["llm/parse_retries"] == 2 and c["dropped/empty_text"] == 1
    assert "instruction_synth/no_pairs" not in c
    side = s.take_side()["failed"].to_pylist()
    assert [r["id"] for r in side] == ["d2"] and side[0]["llm_error"].startswith("parse/no_pairs")
    assert c["instruction_synth/chunked_docs"] == 1
    # the instruct prompt: the template's worked example as an earlier turn, then the text
    msgs = [b["messages"] for b in st.bodies if b["messages"][-1]["content"].endswith("Short text.")][0]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "<QUE>" in msgs[2]["content"] and "tide" in msgs[1]["content"]


@pytest.mark.slow
def test_smollm2_end_to_end(smol, tmp_path):
    s = InstructionSynth(engine={"kind": "transformers", "num_threads": 1}, max_tokens=40, context_tokens=700,
                         cache_path=str(tmp_path / "c.sqlite"), parse_retries=0)
    out = s(docs(TEXTS[:1]))
    c = s.counters.to_dict()
    assert c["llm/requests"] == 1 and 0 < c["llm/completion_tokens"] <= 40 and c["llm/prompt_tokens"] > 100
    # whatever the small model wrote was parsed by the reference rules: pairs rendered, or a
    # counted parse failure with the raw answer saved (no raw text passed off as synthetic)
    if out.num_rows:
        [row] = out.to_pylist()
        assert row["engine_kind"] == "transformers" and row["template_id"] == "instruction_synth/instruct"
        assert TEXTS[0] in row["text"] and row["qa_count"] > 0 and c["instruction_synth/pairs"] == row["qa_count"]
    else:
        assert c["errors/parse/no_pairs"] == 1 and c["warnings/low_yield"] == 1
        assert s.take_side()["failed"].column("llm_answer")[0].as_py()
    assert get_stage("instruction_synth") is InstructionSynth


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not os.environ.get("CURATE_SYNTHESIZER_MODEL"),
                    reason="needs vLLM, a CUDA GPU and CURATE_SYNTHESIZER_MODEL=<local instruction-synthesizer folder>")
def test_real_synthesizer_on_vllm():  # pragma: no cover - needs a GPU
    s = InstructionSynth(mode="synthesizer", engine={"kind": "vllm", "model": os.environ["CURATE_SYNTHESIZER_MODEL"],
                                                     "max_model_len": 4096})
    out = s(docs())
    assert sum(out.column("qa_count").to_pylist()) > 0
