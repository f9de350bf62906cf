"""Structured outputs (answer schemas) and echoed worked examples.

The openai engine sends a recipe's pydantic schema as ``response_format`` (json_schema, strict) to a
local fake server that checks it as OpenAI does; a server that refuses it (HTTP 400) is asked
again without it, once logged; engines without structured outputs (transformers, openai with
``structured_outputs: false``) get no schema and their answers are validated and retried; vLLM
(the fake ``vllm`` package) gets ``structured_outputs=StructuredOutputsParams(json=schema)``. An
answer repeating the prompt's worked example is ``errors/parse/echoed_example``."""

from __future__ import annotations

import json
import logging
import os

import pyarrow as pa
import pytest
from pydantic import BaseModel

from curate.engines import AnswerSchema, Request, cache_key, make_engine
from curate.llm.parse import ParseError
from curate.llm.prompts import load_template
from curate.llm.structured import EchoCheck, validate_answer
from curate.stages.synth.entigraph import EntiGraph, EntitiesAnswer
from curate.stages.score.llm_rate import KEYS, LlmRate, Ratings
from curate.testing.fake_openai import FakeOpenAI, check_response_format

TEXTS = ["The Danube flows through Vienna and Budapest before it reaches the Black Sea.",
         "Interest rates rose twice this year; bond prices fell as a result.",
         "A binary search halves the interval it searches at every step."]
INSULIN = load_template("llm_rate/instruct").example_turns()[0]   # (variables, answer) of the shipped example


def docs(texts=TEXTS) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": list(texts)})


def engine(srv, **kw) -> dict:
    return {"kind": "openai", "model": "m", "base_url": srv.base_url, "max_retries": 0, "concurrency": 1, **kw}


def ratings_json(body: dict) -> str:
    """A valid Ratings answer whose scores depend on the document (its length mod 5)."""
    n = len(body["messages"][-1]["content"]) % 5 + 1
    return json.dumps({"domain": "Technology", **{k: n for k in KEYS}})


def ratings_lines(body: dict) -> str:
    n = len(body["messages"][-1]["content"]) % 5 + 1
    names = ["Accuracy", "Coherence", "Language Consistency", "Semantic Density", "Knowledge Novelty",
             "Topic Focus", "Creativity", "Professionalism", "Style Consistency", "Grammatical Diversity",
             "Structural Standardization", "Originality", "Sensitivity", "Overall Score"]
    return "Domain: Technology\n" + "\n".join(f"{c}: {n}" for c in names)


# -- schemas on the wire -------------------------------------------------------------------------------
def test_openai_sends_the_schema_as_response_format_and_rows_come_from_the_json():
    with FakeOpenAI(responder=ratings_json) as srv:
        s = LlmRate(engine=engine(srv))
        out = s(docs())
        assert len(srv.response_formats) == 3
        rf = srv.response_formats[0]
        assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "Ratings"
        assert rf["json_schema"]["strict"] is True and check_response_format(rf) is None
        schema = rf["json_schema"]["schema"]
        assert schema["required"] == ["domain", *KEYS] == list(schema["properties"])  # the model's order
        assert schema["additionalProperties"] is False
        assert schema["properties"]["accuracy"]["enum"] == [1, 2, 3, 4, 5]
        assert "Medicine" in schema["properties"]["domain"]["enum"]
    # the JSON prompt and its answers became the rating columns
    assert s.template_id == "llm_rate/instruct_json"
    rows = out.to_pylist()
    for r, text in zip(rows, TEXTS):
        assert r["dataman_domain"] == "Technology"
        assert r["dataman_overall_score"] == r["dataman_accuracy"] in range(1, 6)
    assert len({r["dataman_accuracy"] for r in rows}) > 1   # parsed per answer, not a constant
    c = s.counters.to_dict()
    assert c["llm/structured"] == 3 and c["llm_rate/scored"] == 3 and "llm/structured_fallback" not in c


def test_entigraph_sends_its_entity_schema_only_with_the_entity_request():
    with FakeOpenAI() as srv:   # the default responder: a JSON value of the schema
        s = EntiGraph(engine=engine(srv), max_relations_per_doc=1, max_tokens=16)
        out = s(docs(TEXTS[:1]))
        entity_schema = AnswerSchema.of(EntitiesAnswer).schema
        assert [rf["json_schema"]["schema"] for rf in srv.response_formats] == [entity_schema]
        assert entity_schema["required"] == ["summary", "entities"]
    [row] = out.to_pylist()
    assert row["relation"] == "pair" and len(row["entities"]) == 2 and row["summary"]
    assert s.counters.to_dict()["llm/structured"] == 1


def test_a_server_that_refuses_response_format_is_asked_without_it(caplog):
    """HTTP 400 to a request with a schema: asked again without it, the refusal logged once; the
    requests already made with a schema (the window: 2 x concurrency) go out without it and are
    counted llm/structured_fallback, later ones are made without it, and all answers are validated."""
    docs6 = docs(TEXTS * 2)
    with FakeOpenAI(responder=ratings_json, structured="reject") as srv:
        url = srv.base_url
        s = LlmRate(engine=engine(srv))
        with caplog.at_level(logging.WARNING, logger="curate"):
            out = s(docs6)
        outcomes = [e.outcome for e in srv.log]
        refused = outcomes.count("bad_format")
        assert outcomes[0] == "bad_format" and refused in (1, 2) and outcomes.count("ok") == 6
        assert len(srv.response_formats) == refused    # nothing carried a schema after the refusal
    assert out.column("dataman_domain").to_pylist() == ["Technology"] * 6
    c = s.counters.to_dict()
    assert c["llm/structured_fallback"] == 2 and c.get("llm/structured", 0) == 0 and "llm/failed" not in c
    assert not s.structured
    refusals = [r for r in caplog.records if "refused response_format" in r.getMessage()]
    assert len(refusals) == 1 and url in refusals[0].getMessage()


def test_a_400_that_is_not_about_the_schema_stays_a_failure():
    with FakeOpenAI(status_for_path=400) as srv:
        eng = make_engine(engine(srv))
        try:
            [c] = eng.generate([Request(messages=[{"role": "user", "content": "x"}],
                                        answer_schema=AnswerSchema.of(Ratings))])
        finally:
            eng.close()
    assert not c.ok and "HTTP 400" in c.error
    assert eng.supports_structured  # not marked as refusing structured outputs


def test_a_malformed_response_format_is_refused_by_the_fake_server():
    assert check_response_format({"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}})
    loose = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert "additionalProperties" in check_response_format(
        {"type": "json_schema", "json_schema": {"name": "a", "schema": loose, "strict": True}})
    assert check_response_format({"type": "json_schema", "json_schema": {
        "name": "Ratings", "schema": AnswerSchema.of(Ratings).schema, "strict": True}}) is None


# -- engines without structured outputs: validated, retried, counted ----------------------------------
def test_without_structured_outputs_answers_are_validated_and_retried():
    """openai with structured_outputs: false (as transformers): no schema is sent, an answer that is
    not the schema's JSON is asked again (new seed) and then counted errors/parse/schema."""
    def responder(body):
        if "Danube" in body["messages"][-1]["content"]:
            return '```json\n{"summary": "A river.", "entities": "Danube, Vienna"}\n```'   # a string, not a list
        return json.dumps({"summary": "s", "entities": ["interest rates", "bond prices", 7]})

    with FakeOpenAI(responder=responder) as srv:
        s = EntiGraph(engine=engine(srv, structured_outputs=False), max_relations_per_doc=1, max_tokens=16,
                      parse_retries=2)
        out = s(docs(TEXTS[:2]))
        assert srv.response_formats == []
    c = s.counters.to_dict()
    assert c["errors/parse/schema"] == 1 and c["llm/parse_retries"] == 2 and "llm/structured" not in c
    side = s.take_side()["failed"].to_pylist()
    assert side[0]["id"] == "d0" and side[0]["llm_error"].startswith("parse/schema: EntitiesAnswer: entities")
    # the other document validated (its non-text entity left out) and gave its relation row
    assert out.column("source_id").to_pylist() == ["d1"]
    assert out.column("entities").to_pylist()[0] in (["interest rates", "bond prices"], ["bond prices", "interest rates"])


def test_llm_rate_keeps_its_lines_without_structured_outputs():
    with FakeOpenAI(responder=ratings_lines) as srv:
        s = LlmRate(engine=engine(srv, structured_outputs=False))
        out = s(docs())
        assert srv.response_formats == []
    assert s.template_id == "llm_rate/instruct"
    assert out.column("dataman_domain").to_pylist() == ["Technology"] * 3
    assert LlmRate(engine={"kind": "transformers"}).template_id == "llm_rate/instruct"
    assert LlmRate(engine={"kind": "openai", "model": "m"}, structured=False).template_id == "llm_rate/instruct"
    with pytest.raises(Exception, match="structured: true is for format: instruct"):
        LlmRate(format="dataman", structured=True)


def test_the_transformers_engine_gets_no_schema_and_its_cache_keys_do_not_change():
    from curate.engines.transformers_engine import TransformersEngine

    assert TransformersEngine.supports_structured is False
    s = EntiGraph(engine={"kind": "transformers"}, max_relations_per_doc=1)
    assert s.structured is False
    msgs = [{"role": "user", "content": "x"}]
    plain = Request(messages=msgs)
    validated_only = Request(messages=msgs, answer_schema=AnswerSchema.of(EntitiesAnswer, constrain=False))
    constrained = Request(messages=msgs, answer_schema=AnswerSchema.of(EntitiesAnswer))
    key = lambda r: cache_key("transformers", "smol", r)   # noqa: E731
    assert key(validated_only) == key(plain)          # shipped configs on transformers: same cache
    assert key(constrained) != key(plain)             # an enforced schema changes the answer
    other = Request(messages=msgs, answer_schema=AnswerSchema.of(Ratings))
    assert key(other) != key(constrained)


# -- vLLM ----------------------------------------------------------------------------------------------
def test_vllm_gets_structured_outputs_params(monkeypatch, tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "engines"))
    import fake_vllm

    fake_vllm.install(monkeypatch)
    from curate.llm import pool

    model = tmp_path / "model"
    model.mkdir()
    # the streaming feeder, one LLM.generate per batch, and LLM.chat
    for opts in ({"continuous": True}, {"continuous": False}, {"chat_mode": "vllm"}):
        pool.clear()
        s = LlmRate(engine={"kind": "vllm", "model": str(model), **opts}, max_tokens=400)
        out = s(docs())
        [llm] = fake_vllm.LLM.instances[-1:]
        received = list(llm.llm_engine.received.values())   # vllm.SamplingParams of each request
        assert len(received) == 3
        for sp in received:
            so = sp.structured_outputs
            assert isinstance(so, fake_vllm.StructuredOutputsParams) and so.json == AnswerSchema.of(Ratings).schema
        # the fake decodes under the schema: a JSON value of it, parsed into the columns
        assert out.column("dataman_domain").to_pylist() == ["Medicine"] * 3
        assert out.column("dataman_accuracy").to_pylist() == [1, 1, 1]
        assert s.counters.to_dict()["llm/structured"] == 3
        s.teardown()
    pool.clear()


# -- echoed worked examples ----------------------------------------------------------------------------
def test_an_answer_repeating_the_worked_example_is_retried_and_counted():
    """llm_rate's text prompt: every answer is the example's (as a small model did): asked again,
    then errors/parse/echoed_example with the raw answer saved; the rows are kept unrated."""
    with FakeOpenAI(responder=lambda body: INSULIN[1]) as srv:
        s = LlmRate(engine=engine(srv, structured_outputs=False), parse_retries=1)
        out = s(docs())
    c = s.counters.to_dict()
    assert c["errors/parse/echoed_example"] == 3 and c["llm/echoed_examples"] == 6 and c["llm/parse_retries"] == 3
    assert out.column("dataman_domain").to_pylist() == [None] * 3
    side = s.take_side()["failed"].to_pylist()
    assert side[0]["llm_error"].startswith("parse/echoed_example: the answer repeats the whole example answer")


def test_an_echo_then_a_real_answer_keeps_the_real_one():
    def responder(body):   # greedy first try echoes; the retry (temperature > 0) answers
        return INSULIN[1] if body["temperature"] == 0 else ratings_lines(body)

    with FakeOpenAI(responder=responder) as srv:
        s = LlmRate(engine=engine(srv, structured_outputs=False), parse_retries=1)
        out = s(docs())
    assert out.column("dataman_domain").to_pylist() == ["Technology"] * 3
    c = s.counters.to_dict()
    assert c["llm/echoed_examples"] == 3 and not any(k.startswith("errors/") for k in c)


def test_echoes_in_json_and_formatting_variants_and_the_example_document_itself():
    ex = load_template("entigraph/entities").example_turns()[0][1]
    obj = json.loads(ex)
    check = EchoCheck.of_template(load_template("entigraph/entities"))
    # the example's summary with other entities (what a small model did), and its entity list
    assert check.check(json.dumps({"summary": obj["summary"], "entities": ["Danube", "Vienna"]})) == \
        "the example's 'summary'"
    assert check.check(json.dumps({"summary": "The Danube.", "entities": obj["entities"]})) == \
        "the example's 'entities'"
    assert check.check("```json\n" + ex.upper() + "\n```") == "the whole example answer"
    assert check.check(json.dumps({"summary": "The Danube flows east.", "entities": ["Danube", "Vienna"]})) is None
    # llm_rate's lines with bullets and bold, or the example followed by more text
    lines = EchoCheck([INSULIN[1]])
    assert lines.check("\n".join(f"- **{ln}**" for ln in INSULIN[1].splitlines())) == "the whole example answer"
    assert lines.check(INSULIN[1] + "\nThe text is about insulin.") == "the example answer, with more around it"
    assert lines.check(INSULIN[1].replace("Overall Score: 4", "Overall Score: 3")) is None
    # short examples (a verdict, a one-call program) are never held against an answer
    assert not EchoCheck(["keep_doc()", "Yes"])
    # the document is the example's own: its answer may be the example's
    t = load_template("llm_rate/instruct")
    msgs = t.messages(text=INSULIN[0]["text"])
    assert EchoCheck.of_template(t).check(INSULIN[1], msgs) is None
    assert EchoCheck.of_template(t).check(INSULIN[1], t.messages(text=TEXTS[0])) == "the whole example answer"


def test_an_entigraph_summary_copied_from_the_example_is_a_parse_failure():
    summary = json.loads(load_template("entigraph/entities").example_turns()[0][1])["summary"]
    with FakeOpenAI(responder=lambda body: json.dumps({"summary": summary, "entities": ["a river", "a city"]})) as srv:
        s = EntiGraph(engine=engine(srv), max_relations_per_doc=1, parse_retries=0)
        out = s(docs(TEXTS[:1]))
    assert out.num_rows == 0 and s.counters.to_dict()["errors/parse/echoed_example"] == 1


def test_echoed_examples_in_the_run_summary(tmp_path):
    import pyarrow.parquet as pq

    from curate.pipeline.runner import run_pipeline
    from curate.pipeline.stats import funnel_warnings

    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(docs(), inp / "a.parquet")
    with FakeOpenAI(responder=lambda body: INSULIN[1]) as srv:
        spec = {"name": "rate", "output": str(tmp_path / "out"), "workers": 1,
                "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(inp)}}},
                "stages": [{"stage": "llm_rate", "options": {"engine": engine(srv, structured_outputs=False),
                                                             "parse_retries": 1, "max_failure_rate": 1.0}}]}
        res = run_pipeline(spec, progress=False)
    stats = json.load(open(tmp_path / "out" / "stats.json"))["steps"]
    assert stats["llm_rate"]["errors"] == {"parse/echoed_example": 3}
    assert stats["llm_rate"]["counters"]["llm/echoed_examples"] == 6
    assert "errors/parse/echoed_example 3" in funnel_warnings(res.stats)


# -- validation helper -----------------------------------------------------------------------------------
def test_validate_answer_reasons():
    class A(BaseModel):
        name: str
        n: int

    assert validate_answer('Sure:\n```json\n{"name": "x", "n": 2}\n```', A) == A(name="x", n=2)
    for text, reason in [("", "empty_answer"), ("no json here", "no_json"), ('{"name": "x", "n": ', "truncated_json"),
                         ('{"name": "x"}', "schema"), ('{"name": "x", "n": "many"}', "schema")]:
        with pytest.raises(ParseError) as exc:
            validate_answer(text, A)
        assert exc.value.reason == reason, text


# -- the README's recipe with a schema -------------------------------------------------------------------
def test_the_readme_structured_recipe_runs(tmp_path):
    """README "Structured outputs and echoed examples": the JSON glossary recipe as printed there."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    base = text.split("### Writing an LLM recipe", 1)[1]
    section = base.split("### Structured outputs and echoed examples", 1)[1].split("\n## ", 1)[0]
    (tmp_path / "glossary").mkdir()
    (tmp_path / "glossary" / "terms.yaml").write_text(re.search(r"```yaml\n(.*?)```", base, re.S).group(1))
    (tmp_path / "glossary" / "terms_json.yaml").write_text(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    ns: dict = {}
    for block in (re.search(r"```python\n(.*?)```", base, re.S).group(1),
                  re.search(r"```python\n(.*?)```", section, re.S).group(1)):
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102  (our own README)

    def responder(body):
        words = body["messages"][-1]["content"].split()
        return "```json\n" + json.dumps({"terms": [f"{words[-1]}: the last word", "no definition"]}) + "\n```"

    for structured in (True, False):
        with FakeOpenAI(responder=responder) as srv:
            s = ns["GlossaryJson"](engine=engine(srv, structured_outputs=structured), prompts_dir=str(tmp_path))
            out = s(docs(TEXTS[:2]))
            sent = [rf["json_schema"]["schema"] for rf in srv.response_formats]
        assert sent == ([AnswerSchema.of(ns["Terms"]).schema] * 2 if structured else [])
        assert out.column("text").to_pylist() == ["Sea.: the last word", "result.: the last word"]
        assert out.column("template_id").to_pylist() == ["glossary/terms_json"] * 2
        assert out.column("id").to_pylist() == ["d0#glossary_json-0", "d1#glossary_json-0"]


def test_example_answers_declared_in_a_prompt_file_are_checked(tmp_path):
    from curate.llm.prompts import TemplateError

    (tmp_path / "facts").mkdir()
    (tmp_path / "facts" / "shown.yaml").write_text(
        "version: 1\nuser: |-\n  Answer like {\"facts\": [\"water boils at 100 degrees\"]}\n\n  {{ text }}\n"
        "example_answers:\n  - '{\"facts\": [\"water boils at 100 degrees\"]}'\n")
    check = EchoCheck.of_template(load_template("facts/shown", str(tmp_path)))
    assert check.check('{"facts": ["Water boils at 100 degrees."]}') == "the whole example answer"
    assert check.check('{"facts": ["The Danube reaches the Black Sea"]}') is None
    (tmp_path / "facts" / "bad.yaml").write_text("version: 1\nuser: x\nexample_answers: {a: 1}\n")
    with pytest.raises(TemplateError, match="'example_answers' must be a string or a list"):
        load_template("facts/bad", str(tmp_path))
