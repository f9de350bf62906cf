"""The openai engine against an OpenAI-compatible server on 127.0.0.1 (see conftest.py)."""

from __future__ import annotations

import logging
import time

import pytest

from curate.engines import Request, RequestCache, SamplingParams, make_engine
from curate.engines.openai_engine import build_body, parse_response


def engine(server, **kw):
    cache = kw.pop("cache", None)
    cfg = {"kind": "openai", "model": "smol", "base_url": server.base_url, "backoff": 0.01,
           "api_key_env": "CURATE_TEST_KEY", **kw}
    return make_engine(cfg, cache=cache)


def chat(q: str, **params) -> Request:
    return Request(messages=[{"role": "user", "content": q}], params=SamplingParams(**params))


def test_matches_local_engine(openai_server, smol):
    reqs = [chat("What is 2+2?", max_tokens=6),
            Request(prompt="The capital of France is", params=SamplingParams(max_tokens=6, stop=["."]))]
    remote = engine(openai_server).generate(reqs)
    local = smol.generate(reqs)
    for r, l in zip(remote, local):
        assert r.ok, r.error
        assert (r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens) == \
               (l.text, l.finish_reason, l.prompt_tokens, l.completion_tokens)
    kinds = [("messages" in b, "prompt" in b) for b in openai_server.state.bodies]
    assert sorted(kinds) == [(False, True), (True, False)]


def test_logprobs_roundtrip(openai_server):
    eng = engine(openai_server)
    [c, p] = eng.generate([chat("Hi", max_tokens=3, logprobs=2),
                           Request(prompt="1, 2, 3,", params=SamplingParams(max_tokens=3, logprobs=1))])
    assert c.ok and len(c.logprobs) == 3 and all(len(t.top) == 2 for t in c.logprobs)
    assert p.ok and len(p.logprobs) == 3 and all(len(t.top) == 1 for t in p.logprobs)


def test_retries_after_500_and_429(openai_server):
    openai_server.state.backend = "echo"
    openai_server.state.fail_next = ["500", "429", "500"]
    [c] = engine(openai_server).generate([chat("abc", max_tokens=4)])
    assert c.ok and c.text == "cba"
    assert openai_server.state.hits == 4


def test_retry_after_timeout(openai_server):
    openai_server.state.backend = "echo"
    openai_server.state.fail_next = ["sleep:1.5"]
    [c] = engine(openai_server, timeout=0.5).generate([chat("abc", max_tokens=4)])
    assert c.ok and c.text == "cba"
    assert openai_server.state.hits >= 2


def test_retry_after_malformed_body(openai_server):
    openai_server.state.backend = "echo"
    openai_server.state.fail_next = ["garbage"]
    [c] = engine(openai_server).generate([chat("xy", max_tokens=4)])
    assert c.ok and c.text == "yx"


def test_gives_up_without_raising(openai_server):
    openai_server.state.backend = "echo"
    openai_server.state.fail_next = ["500"] * 10
    eng = engine(openai_server, max_retries=2)
    out = eng.generate([chat("abc", max_tokens=4)])
    assert not out[0].ok and "HTTP 500" in out[0].error and "3 attempts" in out[0].error
    assert out[0].finish_reason == "error"
    assert openai_server.state.hits == 3
    assert eng.stats["failed"] == 1


def test_client_error_not_retried(openai_server):
    openai_server.state.backend = "echo"
    openai_server.state.fail_next = ["400"]
    [c] = engine(openai_server).generate([chat("abc", max_tokens=4)])
    assert not c.ok and "HTTP 400" in c.error
    assert openai_server.state.hits == 1


def test_network_error_is_a_failed_request():
    eng = make_engine({"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                       "max_retries": 1, "backoff": 0.01, "timeout": 2})
    [c] = eng.generate([chat("abc")])
    assert not c.ok and "cannot connect" in c.error
    # the error names the endpoint and, as nothing ever answered, says it looks unreachable
    assert "http://127.0.0.1:9/v1/chat/completions" in c.error and "unreachable or misconfigured" in c.error
    assert c.endpoint_dead and not c.transient


def test_concurrency_limit(openai_server):
    st = openai_server.state
    st.backend = "echo"
    st.delay = 0.3
    deadline = time.time() + 5
    while st.in_flight and time.time() < deadline:  # requests of earlier tests (timeouts) finish
        time.sleep(0.05)
    time.sleep(0.1)  # a handler thread may count itself out just after its client got the answer
    st.max_in_flight = 0
    reqs = [chat(f"q{i}", max_tokens=4) for i in range(12)]
    out = engine(openai_server, concurrency=3).generate(reqs)
    assert [c.text for c in out] == [f"q{i}"[::-1] for i in range(12)]  # order kept
    assert st.max_in_flight == 3
    st.max_in_flight = 0
    out = engine(openai_server, concurrency=1).generate(reqs[:4])
    assert all(c.ok for c in out), [c.error for c in out]
    assert st.max_in_flight == 1


def test_api_key_sent_but_never_logged(openai_server, monkeypatch, caplog):
    secret = "sk-test-SECRET-123"
    monkeypatch.setenv("CURATE_TEST_KEY", secret)
    openai_server.state.backend = "echo"
    openai_server.state.fail_next = ["500", "400"]
    with caplog.at_level(logging.DEBUG):
        out = engine(openai_server).generate([chat("abc", max_tokens=4)])
    assert openai_server.state.auth[0] == f"Bearer {secret}"
    assert secret not in caplog.text
    assert secret not in (out[0].error or "") and secret not in repr(out[0])


def test_cache(openai_server, tmp_path):
    openai_server.state.backend = "echo"
    path = str(tmp_path / "c.sqlite")
    reqs = [chat(f"q{i}", max_tokens=4, seed=1) for i in range(4)]
    a = engine(openai_server, cache=RequestCache(path)).generate(reqs)
    hits = openai_server.state.hits
    eng = engine(openai_server, cache=RequestCache(path))
    b = eng.generate(reqs)
    assert openai_server.state.hits == hits and eng.stats["generated"] == 0
    assert [x.text for x in a] == [x.text for x in b] and all(x.cached for x in b)


def test_build_body_and_parse():
    path, body = build_body("m", chat("hi", temperature=0.5, top_p=0.9, max_tokens=7, stop=["\n"],
                                      seed=3, n=2, logprobs=4), {"repetition_penalty": 1.1})
    assert path == "/chat/completions"
    assert body == {"model": "m", "temperature": 0.5, "top_p": 0.9, "max_tokens": 7, "n": 2,
                    "stop": ["\n"], "seed": 3, "messages": [{"role": "user", "content": "hi"}],
                    "logprobs": True, "top_logprobs": 4, "repetition_penalty": 1.1}
    path, body = build_body("m", Request(prompt="x", params=SamplingParams(logprobs=0)))
    assert path == "/completions" and body["prompt"] == "x" and body["logprobs"] == 0
    assert "seed" not in body and "stop" not in body
    c = parse_response({"choices": [{"index": 1, "message": {"content": "b"}, "finish_reason": "length"},
                                    {"index": 0, "message": {"content": "a"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 4, "completion_tokens": 5}}, chat=True)
    assert [ch.text for ch in c.choices] == ["a", "b"] and c.finish_reason == "stop"
    assert c.prompt_tokens == 4 and c.completion_tokens == 5
    with pytest.raises(ValueError):
        parse_response({"error": "x"}, chat=True)


def test_generate_from_inside_an_event_loop(openai_server):
    import asyncio

    openai_server.state.backend = "echo"
    eng = engine(openai_server)

    async def main():
        return eng.generate([chat("abc", max_tokens=4)])

    [c] = asyncio.run(main())
    assert c.ok and c.text == "cba"
