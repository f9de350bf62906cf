"""The LLM stage layer: provenance, shared engines, parse retries and failures, transient failures
and budgets across reruns, prompt fingerprints, validation of template variables, rate limits."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from facts_stage import Facts, facts_answer

from curate.llm import pool
from curate.llm.stage import PROVENANCE
from curate.pipeline.runner import PipelineError
from curate.run import run_pipeline
from curate.pipeline.stage import StageError

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = ["alpha beta gamma delta", "red green blue", "one two", "sun moon star sky"]


def docs(texts=DOCS) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts,
                     "title": [f"T{i}" for i in range(len(texts))]})


def engine(server, **kw) -> dict:
    return {"kind": "openai", "model": "m", "base_url": server.base_url, "max_retries": 0, "backoff": 0.0, **kw}


def test_rows_provenance_and_shared_engine(openai_server, prompts, tmp_path):
    st = openai_server.state
    st.backend, st.responder = "script", facts_answer
    a = Facts(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=32,
              cache_path=str(tmp_path / "c.sqlite"))
    out = a(docs())
    assert out.column("text").to_pylist() == ["alpha", "beta", "gamma", "red", "green", "blue", "one", "two",
                                              "sun", "moon", "star"]
    rows = out.to_pylist()
    assert rows[0]["id"] == "d0#facts-0" and rows[2]["id"] == "d0#facts-2" and rows[3]["id"] == "d1#facts-0"
    assert rows[0]["source_id"] == "d0" and rows[0]["title"] == "T0"  # input columns carried over
    assert set(PROVENANCE) <= set(out.schema.names)
    assert out.schema.field("template_version").type == pa.int32()
    r = rows[4]
    assert (r["recipe"], r["template_id"], r["template_version"], r["engine_kind"]) == ("facts", "facts/list", 1,
                                                                                       "openai")
    assert r["engine_model"].endswith("|m") and '"max_tokens": 32' in r["sampling"]
    assert r["prompt_tokens"] == 5 and r["completion_tokens"] == 3
    assert a.counters.to_dict()["llm/requests"] == 4
    # the prompt really came from the template file
    assert any("DOCUMENT: red green blue" in b["messages"][-1]["content"] for b in st.bodies)
    # a second stage with the same engine config shares the loaded engine, with its own cache/stats
    b = Facts(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=32)
    b(docs()[:1])
    assert b.engine.shared is a.engine.shared and b.engine.cache is None
    assert a.engine.stats["generated"] == 4 and b.engine.stats["generated"] == 1
    # empty input: the output schema all the same
    empty = a(docs()[:0])
    assert empty.num_rows == 0 and set(PROVENANCE) <= set(empty.schema.names)


def test_parse_retry_with_new_seed(openai_server, prompts):
    st = openai_server.state
    st.backend = "script"
    st.responder = lambda body: facts_answer(body) if body.get("seed") is not None else "Sorry, no JSON."
    s = Facts(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=32)
    out = s(docs()[:2])
    assert out.num_rows == 6
    c = s.counters.to_dict()
    assert c["llm/parse_retries"] == 2 and c["llm/requests"] == 4 and "llm/failed" not in c
    retry = st.bodies[-1]
    assert retry["temperature"] == 0.7 and retry["seed"] == 7919  # greedy first, then a new seed


def test_unparseable_rows_go_to_the_side_output(openai_server, prompts):
    st = openai_server.state
    st.backend = "script"
    st.responder = lambda body: "```json\n{\"facts\": [\"cut" if "red" in str(body["messages"]) else facts_answer(body)
    s = Facts(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=32, parse_retries=1)
    out = s(docs())
    assert "red" not in out.column("text").to_pylist() and out.num_rows == 8
    c = s.counters.to_dict()
    assert c["errors/parse/truncated_json"] == 1 and c["llm/parse_failed"] == 1 and c["llm/parse_retries"] == 1
    side = s.take_side()["failed"].to_pylist()
    assert [r["id"] for r in side] == ["d1"]
    assert side[0]["llm_error"].startswith("parse/truncated_json") and side[0]["llm_answer"].startswith("```json")


def test_wrong_format_every_time_stops_with_the_reasons(openai_server, prompts):
    st = openai_server.state
    st.backend = "echo"  # answers with the reversed prompt: never JSON
    s = Facts(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=8, parse_retries=1,
              min_requests=4)
    # the stop comes as soon as most of the requests failed (3 or 4 of 4, by arrival order)
    with pytest.raises(StageError, match=r"([34]) of 4 LLM requests failed .*errors/parse/\w+_json: \1"):
        s(docs())


def _pipeline(tmp_path, out, server, **options):
    inp = tmp_path / "in"
    if not inp.exists():
        inp.mkdir()
        pq.write_table(docs(), inp / "a.parquet")
    return {"name": "facts", "output": str(out), "workers": 1,
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(inp)}}},
            "stages": [{"stage": "test_facts", "options": {"engine": engine(server), "max_tokens": 32,
                                                           "batch_size": 2, **options}}]}


def _uninterrupted(server, prompts, tmp_path):
    """A whole run to compare with (the server then answers well-formed facts, hits reset)."""
    st = server.state
    st.backend, st.responder = "script", facts_answer
    whole = run_pipeline(_pipeline(tmp_path, tmp_path / "whole", server, prompts_dir=str(prompts)), progress=False)
    st.hits = 0
    return st, whole


def _table(result):
    return result.dataset("test_facts").to_table().sort_by("id").select(["id", "text", "source_id"])


def test_transient_failures_are_retried_by_a_plain_rerun(openai_server, prompts, tmp_path):
    st, whole = _uninterrupted(openai_server, prompts, tmp_path)
    st.fail_next = ["500", "500"]  # the first two requests fail (max_retries 0: given up at once)
    spec = _pipeline(tmp_path, tmp_path / "out", openai_server, prompts_dir=str(prompts))
    with pytest.raises(PipelineError, match=r"2 row\(s\).*may pass \(llm_request\).*Run the same command again"):
        run_pipeline(spec, progress=False)
    assert st.hits == 4
    st.hits = 0
    again = run_pipeline(spec, progress=False)
    assert st.hits == 2  # only the failed rows: the others come from the request cache
    c = again.stats["test_facts"]["counters"]
    assert c["llm/cached"] == 2 and c["llm/requests"] == 4
    assert _table(again).equals(_table(whole))


def test_budget_stops_cleanly_and_a_bigger_budget_continues(openai_server, prompts, tmp_path):
    st, whole = _uninterrupted(openai_server, prompts, tmp_path)
    spec = _pipeline(tmp_path, tmp_path / "out", openai_server, prompts_dir=str(prompts), max_requests=3)
    with pytest.raises(PipelineError, match=r"reached its budget \(max_requests=3.*1 row\(s\)"):  # BudgetReached
        run_pipeline(spec, progress=False)
    assert st.hits == 3
    with pytest.raises(PipelineError, match="budget"):  # same budget: nothing new is sent
        run_pipeline(spec, progress=False)
    assert st.hits == 3
    spec["stages"][0]["options"]["max_requests"] = 10
    again = run_pipeline(spec, progress=False)
    assert st.hits == 4
    assert _table(again).equals(_table(whole))
    # a token budget counts prompt + completion tokens of new generations (5 + 3 per request here)
    st.hits = 0
    spec = _pipeline(tmp_path, tmp_path / "tok", openai_server, prompts_dir=str(prompts), max_total_tokens=16,
                     cache=False, batch_size=1)
    with pytest.raises(PipelineError, match="budget"):
        run_pipeline(spec, progress=False)
    assert st.hits == 2


def test_cost_from_engine_prices(openai_server, prompts):
    st = openai_server.state
    st.backend, st.responder = "script", facts_answer
    s = Facts(engine=engine(openai_server, price_prompt=2.0, price_completion=10.0), prompts_dir=str(prompts))
    s(docs()[:2])
    assert s.counters.to_dict()["llm/cost"] == pytest.approx(2 * (5 * 2.0 + 3 * 10.0) / 1e6)
    s2 = Facts(engine=engine(openai_server, price_prompt=2.0, price_completion=10.0), prompts_dir=str(prompts),
               max_cost=30 / 1e6, batch_size=1)
    s2(docs())
    assert s2.counters.to_dict()["errors/transient/budget"] == 3 and s2.deferred == 3


def test_editing_a_prompt_recomputes_that_step_only(openai_server, prompts, tmp_path):
    from curate.pipeline.config import load_pipeline

    st = openai_server.state
    st.backend, st.responder = "script", facts_answer
    spec = _pipeline(tmp_path, tmp_path / "out", openai_server, prompts_dir=str(prompts))
    spec["stages"].insert(0, {"stage": "exact_dedup"})  # a finished step upstream of the LLM step
    first = run_pipeline(spec, progress=False)
    fp1 = {n: s.fingerprint for n, s in load_pipeline(spec).steps.items()}
    path = prompts / "facts" / "list.yaml"
    path.write_text(path.read_text().replace("version: 1", "version: 2").replace("up to three", "at most three"))
    fp2 = {n: s.fingerprint for n, s in load_pipeline(spec).steps.items()}
    assert fp1["exact_dedup"] == fp2["exact_dedup"] and fp1["test_facts"] != fp2["test_facts"]
    st.hits = 0
    second = run_pipeline(spec, progress=False)
    assert second.stats["exact_dedup"]["status"] == "skipped"
    assert second.stats["test_facts"]["status"] == "done"
    assert st.hits == 4 and "at most three" in st.bodies[-1]["messages"][-1]["content"]
    assert set(second.dataset("test_facts").to_table().column("template_version").to_pylist()) == {2}
    assert first.stats["test_facts"]["counters"]["llm/requests"] == 4


def test_template_naming_a_missing_column_fails_validation(prompts, tmp_path):
    from helpers import curate_bin

    path = prompts / "facts" / "titled.yaml"
    path.write_text("version: 1\nuser: 'Facts of {{ title }}: {{ text }}'\n")
    pq.write_table(docs(), tmp_path / "a.parquet")
    spec = {"name": "v", "output": str(tmp_path / "o"), "plugins": ["facts_stage"],
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path)}}},
            "stages": [{"stage": "test_facts", "options": {"template": "facts/titled", "prompts_dir": str(prompts)}}]}
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([curate_bin(), "validate", str(cfg)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "test_facts" in r.stderr and "['title']" in r.stderr and "columns" in r.stderr
    # listing the column makes it valid (and the stage then reads it)
    spec["stages"][0]["options"]["columns"] = ["title"]
    cfg.write_text(yaml.safe_dump(spec))
    r = subprocess.run([curate_bin(), "validate", str(cfg)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Facts(template="facts/titled", prompts_dir=str(prompts), columns=["title"]).reads == ("text", "title")
    # a template id that does not exist is a validation problem too
    assert Facts(template="facts/nope", prompts_dir=str(prompts)).check()


def test_rate_limiter():
    """The GCRA behind requests_per_minute/tokens_per_minute: a burst of ~2 s worth, then the rate.
    ``acquire`` returns 0 (go: charged) or the seconds to wait."""
    from curate.llm.ratelimit import LocalLimiter

    now = [0.0]
    lim = LocalLimiter(rpm=60, tpm=600, clock=lambda: now[0])  # 1 request/s, 10 tokens/s
    assert lim.acquire(5) == 0 and lim.acquire(5) == 0     # 2 s worth of requests at once
    assert lim.acquire(5) == pytest.approx(1.0)            # then one per second
    assert lim.acquire(5) == pytest.approx(1.0)            # (nothing was charged for the refusal)
    now[0] = 1.0
    assert lim.acquire(5) == 0 and lim.acquire(5) == pytest.approx(1.0)
    tok = LocalLimiter(rpm=None, tpm=600, clock=lambda: now[0])
    assert tok.acquire(100) == 0                           # a request bigger than the burst still goes
    assert tok.acquire(10) == pytest.approx(10.0 - 2.0)    # ... and the next waits for its tokens
    slow = LocalLimiter(rpm=2, tpm=None, clock=lambda: now[0])
    assert slow.acquire(1) == 0 and slow.acquire(1) == pytest.approx(30.0)  # no minute-long burst
    slow.hold(100.0)                                       # a 429's Retry-After holds everyone
    assert slow.acquire(1) == pytest.approx(99.0)


def test_openai_rate_limit_option(openai_server):
    from curate.engines import Request, SamplingParams, make_engine

    st = openai_server.state
    st.backend = "echo"
    eng = make_engine(engine(openai_server, requests_per_minute=1200, concurrency=8))
    import time

    t0 = time.monotonic()
    out = eng.generate([Request(prompt=f"p{i}", params=SamplingParams(max_tokens=2)) for i in range(30)])
    assert all(c.ok for c in out)
    assert time.monotonic() - t0 < 5  # a burst of 2 s worth (40 requests at 1200/min) is not slowed
    # the bucket carries over from one call (batch) to the next, and its burst is 2 s worth, not a
    # minute's: 31 requests at 600/min (burst 20) take at least (31 - 20) / 10 s
    eng = make_engine(engine(openai_server, requests_per_minute=600, concurrency=8))
    t0 = time.monotonic()
    assert all(c.ok for c in eng.generate([Request(prompt=f"q{i}", params=SamplingParams(max_tokens=2))
                                           for i in range(30)]))
    [c] = eng.generate([Request(prompt="one more", params=SamplingParams(max_tokens=2))])
    assert c.ok and 1.0 <= time.monotonic() - t0 < 4
    eng.close()
    assert eng._loop is None and not eng._thread.is_alive()


def test_pool_evicts_idle_gpu_engines(monkeypatch):
    closed = []

    class Fake:
        kind = "vllm"

        def __init__(self, cfg):
            self.cfg = cfg

        def close(self):
            closed.append(self.cfg.model)

    monkeypatch.setattr(pool, "make_engine", lambda cfg, cache=None: Fake(cfg))
    a = pool.acquire({"kind": "vllm", "model": "/m/a"})
    assert pool.acquire({"kind": "vllm", "model": "/m/a", "price_prompt": 1.0}) is a  # prices: same engine
    pool.release(a)
    pool.release(a)
    b = pool.acquire({"kind": "vllm", "model": "/m/b"})
    assert closed == ["/m/a"] and b is not a
    pool.release(b)
    pool.clear()
    assert closed == ["/m/a", "/m/b"]


def test_killed_run_resumes_without_new_calls_for_finished_rows(openai_server, prompts, tmp_path):
    import signal
    import sqlite3
    import time

    from helpers import curate_bin

    st = openai_server.state
    st.backend, st.responder = "script", facts_answer
    texts = [f"fact{i} alpha{i} beta{i}" for i in range(12)]
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(docs(texts), inp / "a.parquet")

    def spec(out):
        return {"name": "kill", "output": str(out), "workers": 1, "plugins": ["facts_stage"],
                "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(inp)}}},
                "stages": [{"stage": "test_facts", "options": {
                    "engine": engine(openai_server, concurrency=2), "prompts_dir": str(prompts),
                    "max_tokens": 32}}]}

    whole = run_pipeline(spec(tmp_path / "whole"), progress=False)
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(yaml.safe_dump(spec(tmp_path / "out")))
    st.hits, st.delay = 0, 0.3
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([curate_bin(), "run", "-q", str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while st.hits < 7 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert 7 <= st.hits < 12, "the run must be killed midway"
    time.sleep(0.5)  # answers in flight at the kill reach nobody
    cache = tmp_path / "out" / "_curate" / "work" / "test_facts" / "llm_cache.sqlite"
    finished = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM completions").fetchone()[0]
    assert finished >= 5  # written as each answer arrived, not at the end of the batch
    st.hits, st.delay = 0, 0.0
    again = run_pipeline(spec(tmp_path / "out"), progress=False)
    assert st.hits == 12 - finished  # no new call for a finished row
    assert _table(again).equals(_table(whole))
