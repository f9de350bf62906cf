"""lm_yes_no_score: P(YES)/(P(YES)+P(NO)) from next-token logprobs, multiplied over questions; on
SmolLM2 (transformers: one forward pass), through the local OpenAI-compatible server (chat and
completions logprobs), and a clear error for an engine that returns none."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from curate.engines import Request, SamplingParams
from curate.llm.parse import ParseError
from curate.pipeline.stage import StageError
from curate.stages.score.lm_yes_no_score import LmYesNoScore, yes_no_probability

TEXTS = ["The derivative of x squared is 2x. To integrate 2x, raise the exponent by one and divide: "
         "the integral is x squared plus a constant.",
         "Our bakery opens at 8 am. Try the sourdough bread and the almond croissants, baked every morning."]
SMOL = {"kind": "transformers", "num_threads": 1}
Q1, Q2 = "lm_yes_no_score/contains", "lm_yes_no_score/useful"


def docs(texts=TEXTS) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": list(texts)})


def test_yes_no_probability_sums_variants():
    lp = {"Yes": math.log(0.3), " yes": math.log(0.1), "YES": math.log(0.1), "No": math.log(0.2),
          " NO": math.log(0.05), "The": math.log(0.2), "Y": math.log(0.05)}
    assert yes_no_probability(lp, {"yes"}, {"no"}) == pytest.approx(0.5 / 0.75)
    assert yes_no_probability({"Yes": -1.0}, {"yes"}, {"no"}) == 1.0
    with pytest.raises(ParseError) as exc:
        yes_no_probability({"The": -0.1, "A": -2.0}, {"yes"}, {"no"})
    assert exc.value.reason == "no_yes_no"


def test_single_forward_pass_matches_generation(smol):
    msgs = [{"role": "user", "content": "Is the sky blue? Reply with only YES or NO."}]
    fast = Request(messages=msgs, params=SamplingParams(max_tokens=1, logprobs=20))
    gen = Request(messages=msgs, params=SamplingParams(max_tokens=1, logprobs=20, stop=("\n\n\n",)))
    other = Request(messages=[{"role": "user", "content": "A much longer question, so that the batch is "
                                                          "padded: is water wet? Reply YES or NO."}],
                    params=fast.params)
    [a, _] = smol.generate([fast, other])   # forward pass, left-padded batch
    [b] = smol.generate([gen])              # model.generate
    assert a.text == b.text and a.completion_tokens == 1
    assert a.logprobs[0].logprob == pytest.approx(b.logprobs[0].logprob, abs=1e-4)
    top_a, top_b = a.logprobs[0].top, b.logprobs[0].top
    assert list(top_a)[:5] == list(top_b)[:5]
    assert all(top_a[k] == pytest.approx(top_b[k], abs=1e-4) for k in list(top_a)[:5])


@pytest.mark.slow
def test_smollm2_scores_and_product(smol):
    both = LmYesNoScore(engine=SMOL, domain="mathematics", questions=[Q1, Q2])(docs())
    one = LmYesNoScore(engine=SMOL, domain="mathematics", questions=[Q1])(docs())
    two = LmYesNoScore(engine=SMOL, domain="mathematics", questions=[Q2])(docs())
    assert both.schema.field("lm_score").type == pa.float32()
    assert set(one.schema.names) == {"id", "text", "lm_score", "lm_score_provenance"}  # no per-question column
    s, s1, s2 = (t.column("lm_score").to_pylist() for t in (both, one, two))
    for k in range(2):
        assert 0.0 <= s[k] <= 1.0 and 0.0 < s1[k] < 1.0 and 0.0 < s2[k] < 1.0
        assert s[k] == pytest.approx(s1[k] * s2[k], rel=1e-5)
        assert both.column("lm_score_q1")[k].as_py() == pytest.approx(s1[k], rel=1e-6)
    # a base-model style raw prompt ending in the template's prefix scores too, differently
    raw = LmYesNoScore(engine=SMOL, domain="mathematics", questions=[Q1], chat=False)(docs())
    r = raw.column("lm_score").to_pylist()
    assert all(0.0 < x < 1.0 for x in r) and r != s1
    # the on-topic/off-topic order is not asserted: SmolLM2-135M does not order them reliably


def test_long_text_cut_and_empty_rows(smol):
    s = LmYesNoScore(engine=SMOL, domain="mathematics", questions=[Q1], max_text_tokens=32)
    out = s(docs([" ".join(["integral"] * 300), "", None]))
    assert out.num_rows == 3 and out.column("lm_score").to_pylist()[1:] == [None, None]
    c = s.counters.to_dict()
    assert c["lm_yes_no_score/cut_docs"] == 1 and c["lm_yes_no_score/empty_text"] == 2


def _engine(server) -> dict:
    return {"kind": "openai", "model": "m", "base_url": server.base_url, "max_retries": 0}


def test_openai_server_with_logprobs_chat_and_completions(openai_server, smol):
    st = openai_server.state
    st.backend = "model"  # SmolLM2 behind the OpenAI API, returning logprobs
    via = LmYesNoScore(engine=_engine(openai_server), domain="mathematics", questions=[Q1, Q2])(docs())
    local = LmYesNoScore(engine=SMOL, domain="mathematics", questions=[Q1, Q2])(docs())
    assert via.column("lm_score").to_pylist() == pytest.approx(local.column("lm_score").to_pylist(), abs=1e-3)
    body = st.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    raw = LmYesNoScore(engine=_engine(openai_server), domain="mathematics", questions=[Q1], chat=False,
                       top_logprobs=5)(docs())
    assert st.bodies[-1]["logprobs"] == 5 and st.bodies[-1]["prompt"].endswith("\nAnswer:")
    assert all(x is not None and 0.0 <= x <= 1.0 for x in raw.column("lm_score").to_pylist())


def test_no_yes_no_among_alternatives_is_counted(openai_server, smol):
    st = openai_server.state
    st.backend = "model"
    s = LmYesNoScore(engine=_engine(openai_server), domain="mathematics", questions=[Q1],
                     yes_words=["zebra"], no_words=["giraffe"], max_failure_rate=1.0)
    out = s(docs())
    assert out.column("lm_score").to_pylist() == [None, None]
    assert s.counters.to_dict()["errors/parse/no_yes_no"] == 2
    assert s.take_side()["failed"].column("llm_error").to_pylist()[0].startswith("parse/no_yes_no")


def test_engine_without_logprobs_is_a_clear_error(openai_server, monkeypatch):
    st = openai_server.state
    st.backend = "script"  # a server that ignores the logprobs request
    st.responder = lambda body: "YES"
    with pytest.raises(StageError, match=r"openai engine .*returned no logprobs"):
        LmYesNoScore(engine=_engine(openai_server), domain="mathematics")(docs())
    # at validate time: an engine kind that cannot return logprobs, a top-k beyond its limit
    from curate.engines.openai_engine import OpenAIEngine

    monkeypatch.setattr(OpenAIEngine, "max_logprobs", 0)
    problems = dict(LmYesNoScore(engine=_engine(openai_server), domain="x").check())
    assert "the openai engine cannot return them" in problems["engine"]
    monkeypatch.setattr(OpenAIEngine, "max_logprobs", 5)
    problems = dict(LmYesNoScore(engine=_engine(openai_server), domain="x").check())
    assert "at most 5" in problems["top_logprobs"]


def test_vllm_request_is_one_token_with_logprobs():
    from curate.engines.vllm_engine import sampling_kwargs

    s = LmYesNoScore(domain="mathematics", questions=[Q1])
    req = s.request(Q1, {"id": "d0"}, "some text")
    assert sampling_kwargs(req.params) == {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 1,
                                           "logprobs": 20}
