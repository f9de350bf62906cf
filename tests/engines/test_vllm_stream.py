"""The vllm engine's options, version check and streaming submission, on a fake ``vllm`` module
that accepts only the names of the vLLM contract (tests/engines/fake_vllm.py)."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fake_vllm  # noqa: E402

from curate.engines import Request, RequestCache, SamplingParams, VLLMConfig  # noqa: E402
from curate.engines.vllm_engine import SUPPORTED_VLLM, UnsupportedVLLM, VLLMEngine, llm_kwargs  # noqa: E402


def reqs(prefix: str, n: int, max_tokens: int) -> list[Request]:
    return [Request(prompt=f"{prefix}{i:02d}" + "x" * 40, id=f"{prefix}{i}", params=SamplingParams(max_tokens=max_tokens))
            for i in range(n)]


def test_throughput_options_reach_vllm(monkeypatch):
    fake_vllm.install(monkeypatch)
    cfg = VLLMConfig(model="/models/x", max_num_seqs=64, max_num_batched_tokens=8192, gpu_memory_utilization=0.85,
                     speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4})
    eng = VLLMEngine(cfg).load()
    kw = fake_vllm.LLM.instances[0].kwargs
    assert kw["enable_prefix_caching"] is True and kw["max_num_seqs"] == 64
    assert kw["max_num_batched_tokens"] == 8192 and kw["gpu_memory_utilization"] == 0.85
    assert kw["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    # unset options are left to vLLM; prefix caching can be switched off
    kw = llm_kwargs(VLLMConfig(model="/m", enable_prefix_caching=False))
    assert kw["enable_prefix_caching"] is False
    assert not {"max_num_seqs", "max_num_batched_tokens", "speculative_config"} & set(kw)
    eng.close()


@pytest.mark.parametrize("version", ["0.10.2", "0.34.0", "1.0.0", "not-a-version"])
def test_unsupported_vllm_fails_at_start(monkeypatch, version):
    fake_vllm.install(monkeypatch, version=version)
    with pytest.raises(UnsupportedVLLM, match=f"vLLM {version} is not supported.*vllm{SUPPORTED_VLLM}"):
        VLLMEngine({"model": "/models/x"})
    assert not fake_vllm.LLM.instances


@pytest.mark.parametrize("version", ["0.11.0", "0.33.0", "0.33.1.dev12+g1234abc"])
def test_supported_vllm_starts(monkeypatch, version):
    fake_vllm.install(monkeypatch, version=version)
    assert VLLMEngine({"model": "/models/x"}).vllm_version == version


def test_requests_stay_queued_while_the_caller_parses(monkeypatch):
    """Batch B is submitted before the caller starts parsing batch A's answers (slowly): the
    engine works on B during that parsing, so B is finished when the parsing ends."""
    fake_vllm.install(monkeypatch, step_seconds=0.005)
    eng = VLLMEngine({"model": "/models/x", "max_num_seqs": 64})
    a = eng.submit(reqs("a", 6, 2))
    b = eng.submit(reqs("b", 6, 30))
    parse_start = time.perf_counter()
    got_a = {}
    for i, c in a:                  # parsing an answer takes 0.1 s
        got_a[i] = c
        time.sleep(0.1)
    parse_end = time.perf_counter()
    core = fake_vllm.LLM.instances[0].llm_engine
    busy_steps = [t for t, n in core.steps if parse_start <= t <= parse_end and n > 0]
    assert len(busy_steps) >= 25                    # B's 30 steps ran while A was being parsed
    b_ids = [rid for rid in core.finished_at if rid not in {f"curate-{k}" for k in range(6)}]
    assert len(b_ids) == 6 and max(core.finished_at[r] for r in b_ids) < parse_end
    assert sorted(got_a) == list(range(6)) and all(c.ok and c.text == ("x" * 2) for c in got_a.values())
    got_b = b.results()
    assert [c.text for c in got_b] == ["x" * 30] * 6 and [c.request_id for c in got_b] == [f"b{i}" for i in range(6)]
    # the engine never waited with work queued: every step while requests were unfinished
    # followed the previous one within a few step times (no wait for the caller)
    times = [t for t, _ in core.steps]
    assert max(t2 - t1 for t1, t2 in zip(times, times[1:])) < 0.08
    eng.close()


def test_results_come_back_as_they_finish_and_are_cached(monkeypatch, tmp_path):
    fake_vllm.install(monkeypatch)
    cache = RequestCache(str(tmp_path / "c.sqlite"))
    eng = VLLMEngine({"model": "/models/x"}, cache=cache)
    rs = [Request(prompt="long" + "y" * 50, params=SamplingParams(max_tokens=40)),
          Request(prompt="short" + "z" * 50, params=SamplingParams(max_tokens=3)),
          Request(prompt="TOO LONG", params=SamplingParams(max_tokens=3)),
          Request(messages=[{"role": "user", "content": "hi"}], params=SamplingParams(max_tokens=5))]
    order = [i for i, _ in eng.submit(rs)]
    assert order.index(1) < order.index(0) and order[0] == 2       # the refused prompt fails at once
    out = eng.submit(rs).results()
    assert [c.cached for c in out] == [True, True, False, True]     # the failure is not cached
    assert not out[2].ok and "maximum model length" in out[2].error
    assert out[3].text == "user: hi\nassistant:"[::-1][:5]          # rendered with the plain fallback
    assert eng.stats["failed"] == 2 and eng.stats["cached"] == 3
    eng.close()


def test_a_failing_engine_step_fails_the_waiting_requests(monkeypatch):
    fake_vllm.install(monkeypatch)
    eng = VLLMEngine({"model": "/models/x"}).load()
    core = fake_vllm.LLM.instances[0].llm_engine
    core.fail_step = True
    out = eng.submit(reqs("a", 3, 5)).results()
    assert all(not c.ok and "illegal memory access" in c.error for c in out)
    assert len(core.aborted) == 3
    core.fail_step = False                          # the engine goes on with later requests
    assert all(c.ok for c in eng.submit(reqs("b", 2, 3)).results())
    eng.close()


def test_generate_still_batches_through_llm_generate(monkeypatch):
    fake_vllm.install(monkeypatch)
    eng = VLLMEngine({"model": "/models/x"})
    out = eng.generate(reqs("a", 4, 3))
    assert [c.text for c in out] == ["xxx"] * 4
    eng.close()


def test_the_stages_stream_feeds_the_running_engine(monkeypatch, tmp_path):
    """The LLM stages' loop (``Engine.stream``) goes through the feeder thread: requests submitted
    to the stream keep the engine stepping while the caller parses earlier answers, answers are
    cached as they come, and identical requests go out once."""
    fake_vllm.install(monkeypatch, step_seconds=0.005)
    eng = VLLMEngine({"model": "/models/x"}, cache=RequestCache(str(tmp_path / "c.sqlite")))
    st = eng.stream()
    for i, r in enumerate(reqs("a", 4, 2) + reqs("b", 4, 30) + reqs("a", 1, 2)):   # the last repeats a0
        st.submit(i, r)
    got = {}
    parse_start = time.perf_counter()
    while st.pending:
        for i, c in st.next():
            got[i] = c
            time.sleep(0.05)        # parsing
    parse_end = time.perf_counter()
    st.close()
    core = fake_vllm.LLM.instances[0].llm_engine
    assert len(core.finished_at) == 8                               # a0 went out once
    assert got[8].text == got[0].text == "xx" and got[8].cached
    assert [got[i].text for i in range(4, 8)] == ["x" * 30] * 4
    busy = [t for t, n in core.steps if parse_start <= t <= parse_end and n > 0]
    assert len(busy) >= 25                                          # B decoded while A was parsed
    again = eng.generate(reqs("b", 4, 30))
    assert all(c.cached for c in again)                              # cached as they arrived
    eng.close()
