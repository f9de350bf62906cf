"""The SQLite request cache: keys, round trip, and several processes writing at once."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import sqlite3

from curate.engines import Choice, Completion, Request, RequestCache, SamplingParams, TokenLogprob, cache_key


def _writer(path: str, worker: int, n: int) -> None:
    cache = RequestCache(path, busy_timeout=0.05, retries=50)  # short timeout: exercises the retries
    for i in range(n):
        cache.put_many({f"w{worker}-{i}-{j}": {"choices": [], "prompt_tokens": i} for j in range(5)})
        cache.get_many([f"w{worker}-{i}-0"])
    cache.close()


def test_concurrent_processes(tmp_path):
    path = str(tmp_path / "cache.sqlite")
    RequestCache(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    cache = RequestCache(path)
    assert len(cache) == 3 * 40 * 5
    assert cache.get("w2-39-4") == {"choices": [], "prompt_tokens": 39}
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_roundtrip_and_pickle(tmp_path):
    cache = RequestCache(str(tmp_path / "c.sqlite"))
    c = Completion(choices=[Choice("hi", "stop", 2, [TokenLogprob("h", -0.1, {"h": -0.1}),
                                                     TokenLogprob("i", -0.2, {})])], prompt_tokens=7)
    cache.put("k", c.to_dict())
    back = Completion.from_dict(pickle.loads(pickle.dumps(cache)).get("k"))
    assert back.text == "hi" and back.prompt_tokens == 7 and back.completion_tokens == 2
    assert back.logprobs[0].top == {"h": -0.1}
    assert cache.get("missing") is None


def test_cache_key():
    a = Request(messages=[{"role": "user", "content": "x"}], params=SamplingParams(max_tokens=5), id="doc1")
    b = Request(messages=[{"role": "user", "content": "x"}], params=SamplingParams(max_tokens=5), id="doc2")
    assert cache_key("vllm", "m", a) == cache_key("vllm", "m", b)  # the caller's id is not part of it
    assert cache_key("vllm", "m", a) != cache_key("openai", "m", a)
    assert cache_key("vllm", "m", a) != cache_key("vllm", "m2", a)
    seeded = Request(messages=a.messages, params=SamplingParams(max_tokens=5, seed=1))
    assert cache_key("vllm", "m", a) != cache_key("vllm", "m", seeded)
    raw = Request(prompt="x", params=SamplingParams(max_tokens=5))
    assert cache_key("vllm", "m", a) != cache_key("vllm", "m", raw)
    assert SamplingParams(stop="\n").stop == ("\n",)
