"""The LLM stages' outputs do not change under refactoring of the loop: five stages (synthetic with
parse failures and retries, annotation with ``on_error: keep``, follow-ups, ``finish_table``, side
outputs) run against the fake OpenAI server with seeded HTTP 503s, and each one's output rows,
schema, side outputs and counters (but for the ``llm/`` request counters, which depend on timing:
identical prompts in flight at once share one answer) are compared with digests recorded from a
run (``CURATE_RECORD_GOLDEN=1`` rewrites them after an intended change). The answers are scripted,
so the digests do not depend on a model or the machine."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pyarrow as pa
import pytest

from curate.testing.fake_openai import FakeOpenAI
from helpers import recorded

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TESTS, "llm"))
from facts_stage import Facts, facts_answer  # noqa: E402  (the LLM layer tests' minimal stage)
GOLDEN = os.path.join(HERE, "data", "llm_digests.json")
DOC = ("Copper is a soft, malleable metal with very high thermal and electrical conductivity. It is used "
       "in wires, pipes and coins. Bronze is an alloy of copper and tin, harder than copper alone.")
QA = ("Question: What is copper used in?\nAnswer: Wires, pipes and coins.\n"
      "Question: What is bronze?\nAnswer: An alloy of copper and tin.")
ENTS = ["Marie Curie", "Paris", "Pierre Curie", "radium", "polonium"]
RATE_TEXTS = ["Photosynthesis turns light into sugar in the leaves of plants.", "The stock fell 3% today.",
              "Rude stock text", "buy cheap pills", "", "stock again"]


def responder(body: dict) -> str:
    text = json.dumps(body["messages"])
    user = body["messages"][-1]["content"]
    if "word7 " in text or "word13 " in text:
        return "no json here"   # a parse failure: retried, then the failed side output
    if "DOCUMENT:" in user:
        return facts_answer(body)
    if "### Entities:" in user:
        ents = [line[2:] for line in user.split("### Entities:")[1].splitlines() if line.startswith("- ")]
        return "### Discussion\n" + " relates to ".join(ents) + "."
    if "entities" in text.lower():
        return "```json\n" + json.dumps({"summary": "Curie's work.", "entities": ENTS + ["paris", ""]}) + "\n```"
    for key, letter in (("Photosynthesis", "A"), ("stock", "B"), ("cheap", "X")):
        if key in text:
            if "Rude" in text:
                return "I would rate this text quite highly overall."
            return letter + "\n" + "\n".join(str(i % 5 + 1) for i in range(14))
    if "copper" in text.lower():
        return QA
    return user[::-1]


def digest(stage, out: pa.Table, url: str) -> list:
    side = {k: v.to_pylist() for k, v in sorted((stage.take_side() or {}).items())}
    counters = {k: v for k, v in stage.counters.to_dict().items() if not k.startswith("llm/")}
    blob = (str(out.schema) + json.dumps(out.to_pylist(), default=str, ensure_ascii=False)
            + json.dumps(side, sort_keys=True, default=str, ensure_ascii=False)
            + json.dumps(counters, sort_keys=True)).replace(url, "URL")
    return [out.num_rows, hashlib.sha256(blob.encode()).hexdigest()]


def test_llm_stage_outputs_have_their_recorded_content():
    from curate.stages.score.llm_rate import LlmRate
    from curate.stages.synth.entigraph import EntiGraph
    from curate.stages.synth.generate import Generate
    from curate.stages.synth.rc_llm import RcLlm

    got = {}
    with FakeOpenAI(seed=3, faults={"503": 0.05}, responder=responder) as srv:
        url = srv.base_url
        eng = {"kind": "openai", "model": "m", "base_url": url, "max_retries": 4, "backoff": 0.0,
               "concurrency": 8}
        n = 60
        t = pa.table({"id": [f"d{i}" for i in range(n)],
                      "text": [f"word{i} alpha beta gamma" if i % 11 else "" for i in range(n)]})
        s = Facts(engine=eng, prompts_dir=os.path.join(TESTS, "llm", "prompts"), max_tokens=32, cache=False,
                  parse_retries=1, batch_size=7)
        got["facts"] = digest(s, s(t), url)
        # one empty prompt only: identical prompts would share answers depending on timing
        t = pa.table({"id": [f"g{i}" for i in range(40)], "text": [f"item {i} of the list" if i != 9 else ""
                                                                   for i in range(40)]})
        s = Generate(engine=eng, cache=False, max_tokens=16, on_error="keep")
        got["generate"] = digest(s, s(t), url)
        s = EntiGraph(engine=eng, max_relations_per_doc=6, max_tokens=64, cache=False)
        got["entigraph"] = digest(s, s(pa.table({"id": ["e0", "e1", "e2"],
                                                 "text": ["Curie text one.", "", "Curie two."]})), url)
        s = RcLlm(engine=eng, domain="materials", max_pairs=5, cache=False)
        got["rc_llm"] = digest(s, s(pa.table({"id": ["r0", "r1", "r2"], "text": [DOC, "", DOC + " More copper."]})),
                               url)
        s = LlmRate(engine=eng, format="dataman", parse_retries=1, cache=False)
        got["llm_rate"] = digest(s, s(pa.table({"id": [f"l{i}" for i in range(len(RATE_TEXTS))],
                                                "text": RATE_TEXTS})), url)
    assert got == recorded(GOLDEN, got)


@pytest.mark.parametrize("stage", ["facts", "generate", "entigraph", "rc_llm", "llm_rate"])
def test_golden_digests_cover_output(stage):
    """Each recorded stage produced rows (a digest of an empty output would pin nothing)."""
    with open(GOLDEN) as f:
        assert json.load(f)[stage][0] > 0
