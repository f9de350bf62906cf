"""Rate limits shared by every worker of a run, HTTP 429 handling, dead endpoints, duplicate
requests, and the progress of LLM steps; against curate.testing.fake_openai on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.engines import Request, SamplingParams, make_engine
from curate.testing.fake_openai import FakeOpenAI


def _reserve_many(path: str, n: int, out) -> None:
    from curate.llm.ratelimit import SqliteLimiter

    lim = SqliteLimiter(path, "endpoint", rpm=600, tpm=None)
    got = []
    while len(got) < n:
        wait = lim.acquire(1)
        if wait > 0:
            time.sleep(wait)
        else:
            got.append(time.time())
    out.put(got)


def test_sqlite_limiter_is_one_bucket_for_all_processes(tmp_path):
    """Three processes taking 20 requests each from one file at 600/min (10/s, burst 20): the 60
    are spaced as one bucket's, not three."""
    path = str(tmp_path / "rl.sqlite")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    t0 = time.time()
    procs = [ctx.Process(target=_reserve_many, args=(path, 20, q)) for _ in range(3)]
    for p in procs:
        p.start()
    slots = sorted(s for _ in procs for s in q.get(timeout=60))
    for p in procs:
        p.join(30)
    assert len(slots) == 60
    # a GCRA: at most burst + rate * t slots in any window of t seconds
    for i, s in enumerate(slots):
        within_1s = sum(1 for x in slots[i:] if x < s + 1.0)
        assert within_1s <= 20 + 10 + 1
    assert slots[-1] - slots[0] >= (60 - 20) / 10 - 0.5   # one bucket: ~4 s, not ~0


def docs(n: int) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(n)], "text": [f"text number {i}" for i in range(n)]})


def pipeline(tmp, srv, n_docs=40, workers=2, **engine) -> dict:
    pq.write_table(docs(n_docs), os.path.join(tmp, "docs.parquet"))
    eng = {"kind": "openai", "model": "fake", "base_url": srv.base_url, "api_key_env": None,
           "concurrency": 8, "timeout": 5, "backoff": 0.05, **engine}
    return {"name": "rl", "output": os.path.join(tmp, "out"), "workers": workers, "report": False,
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": os.path.join(tmp, "docs.parquet")}}},
            "stages": [{"stage": "select", "options": {"top": 100000}},
                       {"stage": "generate", "options": {"engine": eng, "template": "Say: {text}"}}]}


def test_requests_per_minute_holds_across_workers(tmp_path):
    """2 workers, requests_per_minute 600 (10/s): measured at the server, no window of a second holds
    more than the rate plus the 2 s burst, and 40 requests take at least (40 - 20) / 10 s. (Before:
    each worker had its own bucket, starting with a minute's burst: all 40 went at once.)"""
    from curate.run import run_pipeline

    with FakeOpenAI(latency=0.02) as srv:
        res = run_pipeline(pipeline(str(tmp_path), srv, requests_per_minute=600), progress=False)
        ts = sorted(e.t0 for e in srv.log)
    assert res.stats["generate"]["out"] == 40 and len(ts) == 40
    # + 0.3 s of the rate: a request's turn is taken in the client, its arrival is measured at the
    # server, and on a loaded machine two turns 0.1 s apart can arrive together
    assert srv.max_in_window(1.0) <= 10 * (1 + 2 + 0.3) + 1
    assert ts[-1] - ts[0] >= (40 - 20) / 10 - 0.3


@pytest.mark.slow
def test_tokens_per_minute_holds(tmp_path):
    """tokens_per_minute: each request is charged its estimate (prompt bytes / 4 + max_tokens)."""
    from curate.engines.openai_engine import estimate_tokens

    with FakeOpenAI() as srv:
        eng = make_engine({"kind": "openai", "model": "m", "base_url": srv.base_url, "api_key_env": None,
                           "tokens_per_minute": 6000, "concurrency": 8})
        reqs = [Request(prompt=f"prompt {i:03d}", params=SamplingParams(max_tokens=17)) for i in range(30)]
        per = estimate_tokens(reqs[0])
        assert per == 20
        t0 = time.monotonic()
        assert all(c.ok for c in eng.generate(reqs))
        took = time.monotonic() - t0
        eng.close()
    # 100 tokens/s, burst 2 s (200 tokens = 10 requests): 30 requests of 20 tokens need >= 4 s
    assert took >= (30 * per - 200) / 100 - 0.3
    assert srv.max_in_window(1.0) <= (100 * 3) // per + 1


@pytest.mark.slow
def test_429_honours_retry_after_date_and_is_counted(tmp_path):
    """A 429 with an HTTP-date Retry-After: the retry waits for it, the stage counts
    llm/rate_limited, and concurrency is halved (AIMD) then grows back."""
    from curate.stages.synth.generate import Generate

    with FakeOpenAI(seed=1, faults={"429": 0.4}, retry_after="date:2") as srv:
        eng = {"kind": "openai", "model": "m", "base_url": srv.base_url, "api_key_env": None,
               "concurrency": 4, "backoff": 0.01, "max_retries": 12}
        st = Generate(engine=eng, template="Say: {text}", cache=False)
        out = st(docs(6))
        counters = st.counters.to_dict()
        log = list(srv.log)
    assert out.num_rows == 6
    limited = [e for e in log if e.outcome == "429"]
    assert limited and counters["llm/rate_limited"] == len(limited)
    for e in limited:  # the next attempt of that request came after the date (1 s resolution)
        nxt = min(x.t0 for x in log if x.hash == e.hash and x.t0 > e.t0)
        assert nxt - e.t1 >= 0.9


def test_aimd():
    from curate.llm.ratelimit import AIMD

    a = AIMD(8, cooldown=0.0)
    assert a.throttled() and a.limit == 4
    a.throttled()
    assert a.limit == 2
    for _ in range(10):
        a.success()
    assert 4 < a.limit <= 8   # +1 per window of successes

    async def peak() -> int:
        b = AIMD(8, cooldown=0.0)
        b.throttled()
        b.throttled()           # limit 2
        top = 0

        async def one():
            nonlocal top
            async with b:
                top = max(top, b.in_flight)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(one() for _ in range(10)))
        return top

    assert asyncio.run(peak()) <= 3   # 2, growing back while the requests succeed


def test_parse_retry_after():
    from email.utils import formatdate

    from curate.engines.openai_engine import parse_retry_after

    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None
    assert parse_retry_after(formatdate(1000.0 + 30, usegmt=True), now=1000.0) == pytest.approx(30.0)
    assert parse_retry_after("soon") is None


@pytest.mark.parametrize("status", [404, 401])
def test_dead_endpoint_is_named_and_stops_the_run(tmp_path, status):
    """A server that answers every request 404 (a wrong base_url path) or 401: the run stops at once
    with an error naming the URL and saying it looks unreachable or misconfigured."""
    from curate.pipeline.runner import PipelineError
    from curate.run import run_pipeline

    with FakeOpenAI(status_for_path=status) as srv:
        url = srv.base_url
        with pytest.raises(PipelineError) as ei:
            run_pipeline(pipeline(str(tmp_path), srv, n_docs=3, workers=1), progress=False)
        assert len(srv.log) <= 3   # not retried
    msg = str(ei.value)
    assert f"{url}/chat/completions" in msg and f"HTTP {status}" in msg
    assert "unreachable or misconfigured" in msg


def test_connection_refused_is_named_quickly(tmp_path):
    from curate.pipeline.runner import PipelineError
    from curate.run import run_pipeline

    srv = FakeOpenAI().start()
    spec = pipeline(str(tmp_path), srv, n_docs=3, workers=1)
    srv.stop()  # nothing listens there any more
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as ei:
        run_pipeline(spec, progress=False)
    assert "cannot connect" in str(ei.value) and "unreachable or misconfigured" in str(ei.value)
    assert spec["stages"][1]["options"]["engine"]["base_url"] in str(ei.value)
    assert time.monotonic() - t0 < 15   # not a minute of retries


def test_identical_requests_in_a_batch_go_out_once():
    with FakeOpenAI() as srv:
        eng = make_engine({"kind": "openai", "model": "m", "base_url": srv.base_url, "api_key_env": None})
        reqs = [Request(prompt=p, params=SamplingParams(max_tokens=3), id=str(i))
                for i, p in enumerate(["a", "b", "a", "a"])]
        out = eng.generate(reqs)
        eng.close()
    assert [c.text for c in out] == ["a", "b", "a", "a"] and [c.request_id for c in out] == ["0", "1", "2", "3"]
    assert len(srv.log) == 2
    assert [c.cached for c in out] == [False, False, True, True]   # no new tokens for the copies


def test_llm_progress_and_finer_tasks(tmp_path, caplog):
    """An LLM step's progress line counts requests (done, in flight, failed) and tokens, and the
    step is split into 4 tasks per worker so workers pull work as they free up, as long as a task
    keeps at least 16 x concurrency rows (each task ends with the engine's window draining); with
    fewer rows, one task per worker."""
    from curate.run import run_pipeline
    from curate.pipeline.stats import Progress

    caplog.set_level(logging.INFO, logger="curate")
    with FakeOpenAI(latency=0.01) as srv:
        res = run_pipeline(pipeline(str(tmp_path), srv, n_docs=128, concurrency=1, price_prompt=1.0,
                                    price_completion=2.0))
    assert res.stats["generate"]["out"] == 128
    done = os.listdir(os.path.join(str(tmp_path), "out", "_curate", "state", "generate", "done"))
    assert len(done) == 2 * 4   # 128 rows = 8 tasks of 16 x concurrency
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[generate]")]
    assert any("LLM requests 128 done, 0 in flight, 0 failed" in l for l in lines), lines
    with FakeOpenAI(latency=0.01) as srv:
        (tmp_path / "few").mkdir()
        res = run_pipeline(pipeline(str(tmp_path / "few"), srv, n_docs=30), progress=False)
    assert res.stats["generate"]["out"] == 30
    done = os.listdir(os.path.join(str(tmp_path / "few"), "out", "_curate", "state", "generate", "done"))
    assert len(done) == 2       # 30 rows at concurrency 8: one task per worker
    # the ETA comes from the first answers, before any batch of rows is finished
    p = Progress("g", total=100, tty=False, interval=1e9)
    p.tasks(0, 4)
    p.start -= 10
    p.llm({"sent": 20, "done": 10, "failed": 1, "tokens": 500, "cost": 0.25})
    assert p.n == 0 and p.eta() == pytest.approx(90.0, rel=0.05)
    with caplog.at_level(logging.INFO, logger="curate"):
        p._log(time.monotonic())
    assert "LLM requests 10 done, 9 in flight, 1 failed, 500 tokens, cost 0.2500" in caplog.records[-1].getMessage()
    assert "ETA" in caplog.records[-1].getMessage()


@pytest.mark.ray
@pytest.mark.slow
def test_requests_per_minute_holds_across_ray_workers(tmp_path):
    """runner: ray: the Ray workers share one limiter (a named Ray actor)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'curate[ray]')")
    from curate.run import run_pipeline

    with FakeOpenAI(latency=0.02) as srv:
        spec = pipeline(str(tmp_path), srv, requests_per_minute=600)
        spec["runner"] = "ray"
        res = run_pipeline(spec, progress=False)
        ts = sorted(e.t0 for e in srv.log)
    assert res.stats["generate"]["out"] == 40 and len(ts) == 40
    # + 0.3 s of the rate: a request's turn is taken in the client, its arrival is measured at the
    # server, and on a loaded machine two turns 0.1 s apart can arrive together
    assert srv.max_in_window(1.0) <= 10 * (1 + 2 + 0.3) + 1
    assert ts[-1] - ts[0] >= (40 - 20) / 10 - 0.3
    assert not os.path.exists(os.path.join(str(tmp_path), "out", "_curate", "work", "llm_ratelimit.sqlite"))


def test_orphaned_worker_sends_nothing(tmp_path):
    """A runner worker whose run is gone exits before sending a request (before: it went on for up
    to half a second, and the resumed run sent the same requests again)."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    code = ("import sys; from curate.pipeline import worker; from curate.engines.base import set_send_guard, before_send; "
            f"set_send_guard(lambda: worker._exit_if_orphan({dead.pid})); before_send(); sys.exit(0)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 70
    alive = "import os, sys; from curate.pipeline import worker; worker._exit_if_orphan(os.getppid()); sys.exit(0)"
    assert subprocess.run([sys.executable, "-c", alive], env=env).returncode == 0
