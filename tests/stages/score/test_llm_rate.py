"""llm_rate: DataMan-style ratings. Parsers on well-formed and malformed answers; the DataMan
request rendered exactly as the reference builds it; head/tail cutting on real tokenizers; failures
retried, counted and kept; SmolLM2 end to end; the DataMan model on vLLM when a GPU and the model
are there."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from curate.llm.chunking import cut_text
from curate.llm.parse import ParseError
from curate.stages.score.llm_rate import CRITERIA, DOMAINS, LlmRate, parse_dataman, parse_named

COLS = ["dataman_" + c.lower().replace(" ", "_") for c in CRITERIA]
TEXTS = ["Photosynthesis converts light energy into chemical energy. Plants use chlorophyll to capture "
         "sunlight and make glucose from carbon dioxide and water.",
         "The stock market fell 3% on Monday as investors worried about interest rates."]


def docs(texts=TEXTS) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": list(texts)})


def named(domain="Technology", scores=range(1, 15), extra=""):
    lines = [f"Domain: {domain}"] + [f"{c}: {(s - 1) % 5 + 1}" for c, s in zip(CRITERIA, scores)]
    return "\n".join(lines) + extra


# -- parsers --------------------------------------------------------------------------------------

def test_parse_dataman_well_formed():
    assert parse_dataman("E\n5\n4\n5\n3\n2\n4\n1\n3\n5\n3\n4\n3\n5\n4") == (
        "Technology", [5, 4, 5, 3, 2, 4, 1, 3, 5, 3, 4, 3, 5, 4])
    assert parse_dataman("  O\n" + "\n".join(["1"] * 14) + "\n")[0] == "Other"  # surrounding space


@pytest.mark.parametrize("answer, reason", [
    ("", "empty_answer"),
    ("E\n5\n4", "wrong_count"),                                      # cut short
    ("E\n" + "\n".join(["3"] * 15), "wrong_count"),                 # 15 scores
    ("E\n" + "\n".join(["3"] * 14) + "\nE", "wrong_count"),         # two domains
    ("Z\n" + "\n".join(["3"] * 14), "bad_domain"),                  # not A-O
    ("Technology\n" + "\n".join(["3"] * 14), "bad_domain"),          # a name, not the model's letter
    ("E\n" + "\n".join(["3"] * 13) + "\n6", "bad_score"),            # out of range
    ("E\n" + "\n".join(["3"] * 13) + "\n4.5", "bad_score"),
])
def test_parse_dataman_malformed(answer, reason):
    with pytest.raises(ParseError) as exc:
        parse_dataman(answer)
    assert exc.value.reason == reason


def test_parse_named_well_formed_variants():
    d, s = parse_named(named())
    assert d == "Technology" and s == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4]
    # bullets, numbering, bold, "/5", a sentence around, a repeated identical line, a domain letter
    wrapped = ("Sure, here are the ratings:\n- **Domain:** [G] Mathematics\n"
               + "\n".join(f"{i}. **{c}**: {3}/5" for i, c in enumerate(CRITERIA, 1))
               + "\n14. Overall Score: 3/5\nHope this helps!")
    assert parse_named(wrapped) == ("Mathematics", [3] * 14)
    assert parse_named(named(domain="retail e-commerce"))[0] == "Retail E-commerce"


@pytest.mark.parametrize("answer, reason", [
    ("I cannot rate this.", "no_domain"),
    (named().replace("Domain: Technology", "Domain: Astrology"), "bad_domain"),
    (named().replace("Creativity: 2", "Creativity: 7"), "bad_score"),
    (named().replace("Creativity: 2", "Creativity: 2.5"), "bad_score"),
    (named().replace("Creativity: 2", "Creativity: high"), "bad_score"),
    (named(extra="\nCreativity: 4"), "conflicting_scores"),
    ("\n".join(named().splitlines()[:-1]), "missing_criteria"),      # cut before Overall Score
])
def test_parse_named_malformed(answer, reason):
    with pytest.raises(ParseError) as exc:
        parse_named(answer)
    assert exc.value.reason == reason


def test_fifteen_domains_and_fourteen_criteria():
    assert len(DOMAINS) == 15 and len(CRITERIA) == 14
    assert LlmRate().writes == {**{c: pa.int8() for c in COLS}, "dataman_domain": pa.string(),
                                "dataman_provenance": pa.string()}


# -- the DataMan request and text cut --------------------------------------------------------------

def test_dataman_request_is_the_reference_request():
    s = LlmRate(format="dataman")
    msgs = s.template("llm_rate/dataman").messages(text="Some text.")
    criteria = "\n".join(f"[{i}]{c}:_/5" for i, c in enumerate(CRITERIA, 1))
    assert msgs == [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Please score the text on fourteen evaluation criteria and "
                                                "specify its domain:\nText: Some text.\nDomain:_\n" + criteria}]
    assert s.config.max_tokens == 29 and s.config.temperature == 0.0
    assert LlmRate(format="dataman", max_tokens=40).config.max_tokens == 40


def test_head_tail_cut_on_the_engine_tokenizer(smol):
    tok = smol.hf_tokenizer()
    words = [f"w{i}" for i in range(600)]
    text = " ".join(words)
    out, cut = cut_text(text, 100, tokenizer=tok)
    assert cut and out.startswith("w0 w1 w2") and out.endswith("w598 w599") and "..." in out
    head, _, tail = out.partition("...")
    toks = tok.tokenize(text)
    assert head == tok.convert_tokens_to_string(toks[:50])
    assert tail == tok.convert_tokens_to_string(toks[-50:]).strip() and len(toks) > 200
    assert cut_text("short text", 100, tokenizer=tok) == ("short text", False)
    # without a tokenizer (an HTTP engine): characters cut to the engine's estimate
    out, cut = cut_text(text, 100, count=lambda t: (len(t) + 3) // 4)
    head, _, tail = out.partition("...")
    assert cut and (len(head) + 3) // 4 <= 50 and (len(tail) + 3) // 4 <= 50 and text.endswith(tail)


def test_prepare_cleans_and_cuts_like_the_reference(smol):
    s = LlmRate(engine={"kind": "transformers", "num_threads": 1}, max_text_tokens=64, max_text_chars=1000)
    s.ensure_setup()
    try:
        text = '"..."Intro. ![](/img/a.png)\n' + " ".join(f"x{i}" for i in range(2000))
        out = s.prepare(text)
        assert out.startswith("Intro. x0 x1") and "![]" not in out and out.endswith("x1999")
        assert " x300 " not in out  # the middle is gone
        assert s.counters.to_dict()["llm_rate/cut_docs"] == 1
    finally:
        s.teardown()


# -- through an engine ----------------------------------------------------------------------------

def _engine(server) -> dict:
    return {"kind": "openai", "model": "m", "base_url": server.base_url, "max_retries": 0}


def test_failures_are_retried_counted_and_kept(openai_server):
    st = openai_server.state
    st.backend = "script"
    letters = {"Photosynthesis": "A", "stock": "B", "cheap": "X"}

    def responder(body):
        text = body["messages"][-1]["content"]
        letter = next(v for k, v in letters.items() if k in text)
        if "Rude" in text:
            return "I would rate this text quite highly overall."
        return letter + "\n" + "\n".join(str(i % 5 + 1) for i in range(14))

    st.responder = responder
    s = LlmRate(engine=_engine(openai_server), format="dataman", parse_retries=1)
    out = s(docs(TEXTS + ["Rude stock text", "buy cheap pills", ""]))
    rows = out.to_pylist()
    assert [r["dataman_domain"] for r in rows] == ["Medicine", "Finance", None, None, None]
    assert rows[0]["dataman_accuracy"] == 1 and rows[0]["dataman_overall_score"] == 4
    assert out.schema.field("dataman_accuracy").type == pa.int8()
    c = s.counters.to_dict()
    assert c["errors/parse/wrong_count"] == 1 and c["errors/parse/bad_domain"] == 1
    assert c["llm/parse_retries"] == 2 and c["llm_rate/scored"] == 2 and c["llm_rate/empty_text"] == 1
    side = s.take_side()["failed"].to_pylist()
    assert [r["id"] for r in side] == ["d2", "d3"] and side[0]["llm_error"].startswith("parse/wrong_count")
    assert side[1]["llm_answer"].startswith("X\n")
    # the DataMan request went out greedy with 29 tokens
    assert st.bodies[0]["max_tokens"] == 29 and st.bodies[0]["temperature"] == 0.0
    assert st.bodies[0]["messages"][0]["content"] == "You are a helpful assistant."
    dropped = LlmRate(engine=_engine(openai_server), format="dataman", parse_retries=0, on_error="drop")
    assert dropped(docs(TEXTS + ["Rude stock text"])).num_rows == 2
    assert dropped.counters.to_dict()["dropped/llm_failed"] == 1


@pytest.mark.slow
def test_smollm2_end_to_end(smol):
    s = LlmRate(engine={"kind": "transformers", "num_threads": 1}, parse_retries=0)
    out = s(docs())
    assert out.num_rows == 2 and set(COLS) <= set(out.schema.names)
    c = s.counters.to_dict()
    rated = c.get("llm_rate/scored", 0)
    failed = sum(v for k, v in c.items() if k.startswith("errors/parse/"))
    assert rated + failed == 2  # every document is either rated or counted
    for r in out.to_pylist():
        if r["dataman_domain"] is not None:
            assert r["dataman_domain"] in DOMAINS and all(1 <= r[k] <= 5 for k in COLS)
        else:
            assert all(r[k] is None for k in COLS)
    # an answer budget too small for 15 lines: every answer is cut short, counted, kept unrated
    short = LlmRate(engine={"kind": "transformers", "num_threads": 1}, parse_retries=0, max_tokens=12)
    out = short(docs()[:1])
    assert out.num_rows == 1 and out.column("dataman_overall_score").to_pylist() == [None]
    assert short.counters.to_dict()["errors/parse/missing_criteria"] == 1
    assert short.take_side()["failed"].num_rows == 1


DATAMAN = os.environ.get("CURATE_DATAMAN_MODEL")


def _gpu_reason() -> str | None:
    if not DATAMAN:
        return "set CURATE_DATAMAN_MODEL to a local copy of RuPeng/DataMan-1.5B-EN to run this test"
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return "needs vLLM (pip install 'curate[gpu]')"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_dataman_model_on_vllm(tmp_path):  # pragma: no cover - needs a GPU and the model
    s = LlmRate(engine={"kind": "vllm", "model": DATAMAN}, format="dataman", cache_path=str(tmp_path / "c.sqlite"))
    out = s(docs(TEXTS + ["buy cheap pills now!!! click here click here best price"]))
    c = s.counters.to_dict()
    assert c.get("llm_rate/scored") == 3, c  # the model's own format parses every time
    assert all(r["dataman_domain"] in DOMAINS for r in out.to_pylist())
    assert out.column("dataman_overall_score")[0].as_py() > out.column("dataman_overall_score")[2].as_py()


def test_through_the_runner_with_a_transient_failure(openai_server, tmp_path):
    """A pipeline step: ratings and unrated rows in the output, the failed answer in _failed/, a
    request that failed transiently redone by a plain rerun (the rest from the request cache)."""
    import pyarrow.parquet as pq

    from curate.pipeline.runner import PipelineError
    from curate.run import run_pipeline

    st = openai_server.state
    st.backend = "script"
    st.responder = lambda body: ("nonsense" if "cheap" in body["messages"][-1]["content"]
                                 else "J\n" + "\n".join(["4"] * 14))
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(docs(TEXTS + ["buy cheap pills"]), inp / "a.parquet")
    spec = {"name": "rate", "output": str(tmp_path / "out"), "workers": 1,
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(inp)}}},
            "stages": [{"stage": "llm_rate", "options": {"engine": _engine(openai_server), "format": "dataman",
                                                         "parse_retries": 0, "max_failure_rate": 1.0}}]}
    st.fail_next = ["500"]
    with pytest.raises(PipelineError, match=r"1 row\(s\).*llm_request"):
        run_pipeline(spec, progress=False)
    st.hits = 0
    res = run_pipeline(spec, progress=False)
    assert st.hits == 1  # only the row whose request failed
    out = res.dataset("llm_rate").to_table().sort_by("id").to_pylist()
    assert [r["dataman_domain"] for r in out] == ["Culture", "Culture", None]
    assert [r["dataman_overall_score"] for r in out] == [4, 4, None]
    c = res.stats["llm_rate"]["counters"]
    assert res.stats["llm_rate"]["errors"] == {"parse/wrong_count": 1} and c["llm_rate/scored"] == 2
    failed = pq.read_table(str(tmp_path / "out" / "llm_rate" / "_failed")).to_pylist()
    assert [r["id"] for r in failed] == ["d2"] and failed[0]["llm_answer"] == "nonsense"
