"""prox_refine on the local OpenAI-compatible test server (scripted answers): the ProX requests
(numbered lines in [doc] chunks, the reference's system prompt), chunk programs joined and executed,
keep/drop documents, bad programs counted as error operations (never a crash), provenance."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from curate.stages.synth.prox_refine import ProxRefine

SYSTEM = "You are a helpful, respectful and honest assistant."
ARTICLE = "\n".join([
    "Home | News | Contact",                                                            # 0
    "Copper is a soft and ductile metal with very high thermal and electrical conductivity.",  # 1
    "It is used as a conductor of heat and electricity and as a building material today.",     # 2
    "Share on Facebook",                                                                # 3
    "The metal &amp; its alloys have been used for thousands of years by many peoples.",  # 4
])


def engine(server) -> dict:
    return {"kind": "openai", "model": "prox", "base_url": server.base_url, "max_retries": 0}


def docs(*texts, ids=None) -> pa.Table:
    return pa.table({"id": ids or [f"d{i}" for i in range(len(texts))], "text": list(texts),
                     "url": [f"https://e.org/{i}" for i in range(len(texts))]})


def script(server, fn):
    server.state.backend = "script"
    server.state.responder = fn


def test_chunk_program_is_executed_with_provenance(openai_server):
    script(openai_server, lambda body: 'remove_lines(line_start=0, line_end=0)\nremove_lines(line_start=3, line_end=3)\n'
                                       'normalize(source_str="&amp;", target_str="&")')
    s = ProxRefine(engine=engine(openai_server))
    out = s(docs(ARTICLE)).to_pylist()
    [body] = openai_server.state.bodies
    assert body["messages"] == [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": "[doc]\n" + "\n".join(
                                    f"[{i:03d}]{line}" for i, line in enumerate(ARTICLE.split("\n"))) + "\n[/doc]"}]
    assert body["temperature"] == 0.0 and body["top_p"] == 0.9 and body["max_tokens"] == 256
    [row] = out
    lines = ARTICLE.split("\n")
    assert row["text"] == "\n".join([lines[1], lines[2], lines[4].replace("&amp;", "&")])
    assert row["prox_chunk_decision"] == "refined" and row["prox_chunk_error_ops"] == 0
    assert row["prox_chunk_removed_lines"] == 2 and row["prox_chunk_program"].startswith("remove_lines(line_start=0")
    assert row["source_id"] == "d0" and row["id"] == "d0#prox-0" and row["url"] == "https://e.org/0"
    assert row["template_id"] == "prox/chunk" and row["recipe"] == "prox" and row["engine_kind"] == "openai"
    c = s.counters.to_dict()
    assert c["prox_refine/ops/remove_lines"] == 2 and c["prox_refine/ops/normalize"] == 1
    assert c["prox_refine/removed_lines"] == 2
    assert c["prox_refine/removed_chars"] == len(lines[0]) + len(lines[3]) + 2
    assert c["prox_refine/refined"] == 1 and c["prox_refine/chunks"] == 1 and c["llm/requests"] == 1
    assert c["prox_refine/chars_out"] == len(row["text"]) and "prox_refine/error_ops" not in c


def test_long_document_chunks_keep_global_line_numbers(openai_server):
    lines = [f"Line {i} of a long page says something about copper wires and their many uses." for i in range(40)]
    lines[7] = lines[31] = "Click here to subscribe!"

    def answer(body):
        chunk = body["messages"][-1]["content"]
        nums = [int(n) for n in re.findall(r"^\[(\d{3})\]", chunk, re.M)]
        bad = [n for n in nums if "subscribe" in lines[n]]
        return "\n".join(f"remove_lines(line_start={n}, line_end={n})" for n in bad) or "keep_chunk()"

    script(openai_server, answer)
    s = ProxRefine(engine=engine(openai_server), chunk_tokens=150)  # openai: tokens ~ bytes / 4
    [row] = s(docs("\n".join(lines))).to_pylist()
    bodies = openai_server.state.bodies
    assert len(bodies) > 2 and s.counters.to_dict()["prox_refine/chunks"] == len(bodies)
    numbered = sorted([int(n) for n in re.findall(r"^\[(\d{3})\]", b["messages"][-1]["content"], re.M)]
                      for b in bodies)  # requests run concurrently: sort the chunks
    assert [n for ns in numbered for n in ns] == list(range(40))  # every line once, consecutive per chunk
    assert all(s.engine.count_tokens(b["messages"][-1]["content"][6:-7]) <= 150 for b in bodies)
    assert row["text"] == "\n".join(ln for i, ln in enumerate(lines) if i not in (7, 31))
    assert row["prox_chunk_program"].count("keep_chunk()") == len(bodies) - 2
    assert s.counters.to_dict()["prox_refine/chunked_docs"] == 1


def test_doc_level_keeps_and_drops(openai_server):
    script(openai_server, lambda body: "drop_doc()" if "BUY" in body["prompt"] else "keep_doc()")
    s = ProxRefine(engine=engine(openai_server), level="doc", save_dropped=True)
    out = s(docs(ARTICLE + "  \n", "BUY NOW cheap watches", "   ")).to_pylist()
    assert s.take_side()["dropped"].to_pylist() == [{"id": "d1", "text": "BUY NOW cheap watches",
                                                     "drop_reason": "prox_drop_doc", "prox_doc_program": "drop_doc()"}]
    assert [r["source_id"] for r in out] == ["d0"] and out[0]["text"] == ARTICLE + "  \n"
    assert out[0]["prox_doc_program"] == "keep_doc()" and out[0]["prox_doc_decision"] == "keep"
    assert "prox_chunk_program" not in out[0]
    # the reference's request: Llama-2 chat format (trailing whitespace stripped), its own BOS
    body = next(b for b in openai_server.state.bodies if "Copper" in b["prompt"])
    assert body["prompt"] == f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{ARTICLE} [/INST]"
    assert body["add_special_tokens"] is False and body["max_tokens"] == 2000
    # as chat messages instead (chat: messages), the engine applies the model's chat template
    m = ProxRefine(engine=engine(openai_server), level="doc", chat="messages")
    openai_server.state.responder = lambda body: "keep_doc()"
    m(docs(ARTICLE))
    assert openai_server.state.bodies[-1]["messages"] == [{"role": "system", "content": SYSTEM},
                                                          {"role": "user", "content": ARTICLE}]
    c = s.counters.to_dict()
    assert c["dropped/prox_drop_doc"] == 1 and c["dropped/empty_text"] == 1
    assert c["prox_refine/ops/keep_doc"] == 1 and c["prox_refine/ops/drop_doc"] == 1 and c["llm/requests"] == 2


def test_long_document_request_keeps_the_head(openai_server):
    script(openai_server, lambda body: "keep_doc()")
    text = " ".join(f"word{i}" for i in range(3000))
    s = ProxRefine(engine=engine(openai_server), level="doc", doc_prompt_tokens=200)
    [row] = s(docs(text)).to_pylist()
    sent = openai_server.state.bodies[0]["prompt"]
    assert sent.endswith(" [/INST]") and s.engine.count_tokens(sent) <= 200
    head = sent.split("<</SYS>>\n\n")[1][:-len(" [/INST]")]
    assert text.startswith(head) and len(head) > 100
    assert row["text"] == text and s.counters.to_dict()["prox_refine/cut_docs"] == 1


@pytest.mark.parametrize("answer, decision, error_ops", [
    ("remove_lines(line_start=2, line_end=x)\nremove_lines(line_start=40, line_end=50)", "ignored", 2),
    # unclosed: one error op, the arguments end before the last character (as the reference)
    ("remove_lines(line_start=0, line_end=00\nnormalize(source_str=\"Copper\", target_str=\"Cu\")", "refined", 1),
    ("remove_lines(line_start=0, line_end=0\nnormalize(source_str=\"Copper\", target_str=\"Cu\")", "ignored", 2),
    ("I think this text is fine.\ndelete_line(3)\n```", "unchanged", 0),
    ("remove_lines(line_start=3, line_end=1)", "unchanged", 0),
    ("remove_lines(line_start=0, line_end=4)", None, 0),
    ("", "unchanged", 0),
])
def test_bad_programs_are_counted_not_fatal(openai_server, answer, decision, error_ops):
    script(openai_server, lambda body: answer)
    s = ProxRefine(engine=engine(openai_server))
    out = s(docs(ARTICLE)).to_pylist()
    c = s.counters.to_dict()
    assert c.get("prox_refine/error_ops", 0) == error_ops
    assert c.get("prox_refine/docs_with_error_ops", 0) == (1 if error_ops else 0)
    if decision is None:
        assert out == [] and c["dropped/prox_mostly_removed"] == 1
        return
    [row] = out
    assert row["prox_chunk_decision"] == decision and row["prox_chunk_error_ops"] == error_ops
    if decision == "ignored":
        assert row["text"] == ARTICLE and c["prox_refine/program_ignored"] == 1
    if decision == "refined":  # one error op is tolerated (error_op: 2)
        assert row["text"].startswith("Cu is a soft") and "Home" not in row["text"]
    if "delete_line" in answer:
        assert c["prox_refine/ops/unknown"] == 3 and row["text"] == ARTICLE
    assert not s.take_side()  # nothing failed


def test_strict_answers_without_operations_are_parse_errors(openai_server):
    script(openai_server, lambda body: "Sure! Here is the cleaned text." if "Copper" in body["messages"][-1]["content"]
           else "keep_chunk()")
    s = ProxRefine(engine=engine(openai_server), strict=True, parse_retries=1)
    out = s(docs(ARTICLE, "\n".join(["A fine line of text about rivers and their long courses today."] * 3))).to_pylist()
    assert [r["source_id"] for r in out] == ["d1"]
    c = s.counters.to_dict()
    assert c["errors/parse/no_operation"] == 1 and c["llm/parse_retries"] == 1
    failed = s.take_side()["failed"].to_pylist()
    assert failed[0]["id"] == "d0" and failed[0]["llm_answer"] == "Sure! Here is the cleaned text."
    # not strict (the reference): the same answer is a program without operations, the text is kept
    s2 = ProxRefine(engine=engine(openai_server))
    assert s2(docs(ARTICLE)).column("text").to_pylist() == [ARTICLE]


def test_short_results_are_dropped(openai_server):
    script(openai_server, lambda body: "keep_chunk()")
    s = ProxRefine(engine=engine(openai_server))
    assert s(docs("Too short to keep, ten words or fewer here.")).num_rows == 0
    assert s.counters.to_dict()["dropped/prox_short"] == 1


def test_instruct_prompts_are_few_shot(openai_server):
    script(openai_server, lambda body: "keep_chunk()")
    s = ProxRefine(engine=engine(openai_server), format="instruct")
    s(docs(ARTICLE))
    msgs = openai_server.state.bodies[0]["messages"]
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert "remove_lines(line_start=N, line_end=M)" in msgs[0]["content"]
    assert msgs[-1]["content"].startswith("[doc]\n[000]Home | News")
    assert openai_server.state.bodies[0]["top_p"] == 1.0
    d = ProxRefine(engine=engine(openai_server), format="instruct", level="doc")
    assert d.config.max_tokens == 16 and d.template_ids() == ["prox/doc_instruct"]


def test_raw_prompt_needs_a_template_that_has_one():
    s = ProxRefine(level="chunk", format="instruct", chat="raw")
    assert any(key == "chat" and "no raw_prompt" in msg for key, msg in s.check())
    assert not [p for p in ProxRefine(level="doc").check() if p[0] != "engine.model"]
