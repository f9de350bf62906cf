"""The ``generate`` map stage (library calls; SmolLM2 via the transformers engine or the test server)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from curate.pipeline.stage import StageError, get_stage
from curate.stages.synth.generate import Generate, template_fields

TRANSFORMERS = {"kind": "transformers"}


def docs(texts, ids=None) -> pa.Table:
    ids = ids or [f"d{i}" for i in range(len(texts))]
    return pa.table({"id": ids, "text": texts, "source": ["t"] * len(texts), "metadata": ["{}"] * len(texts)})


def test_registered_and_config():
    assert get_stage("generate") is Generate
    g = Generate(engine={"kind": "vllm", "model": "/models/m", "tensor_parallel_size": 2}, template="{text}")
    assert g.resources.gpus == 2
    assert Generate(engine={"kind": "transformers"}).resources.gpus == 0
    assert Generate().reads == ("text",)
    assert Generate(template="Q: {question}\nA: {answer}").reads == ("question", "answer")
    assert Generate(prompt_column="p", output_column="summary").writes == {
        "summary": pa.string(), "summary_finish_reason": pa.string(),
        "summary_prompt_tokens": pa.int32(), "summary_tokens": pa.int32(),
        "summary_provenance": pa.string()}
    assert template_fields("$a and ${b}", "dollar") == ["a", "b"]
    with pytest.raises(Exception):
        Generate(prompt_column="x", template="{text}")
    with pytest.raises(Exception):
        Generate(engine={"kind": "nope"})
    assert Generate(engine={"kind": "transformers", "model": "/no/such/model"}).check()


def test_library_call(smol, tmp_path):
    table = docs(["What is 2+2?", "Name a color."])
    g = Generate(engine=TRANSFORMERS, template="Answer briefly: {text}", system="Be brief.", max_tokens=6,
                 cache_path=str(tmp_path / "c.sqlite"))
    out = g(table)
    assert out.schema.names == ["id", "text", "source", "metadata", "completion",
                                "completion_finish_reason", "completion_prompt_tokens", "completion_tokens",
                                "completion_provenance"]
    rows = out.to_pylist()
    assert all(r["completion"] and r["completion_finish_reason"] in ("stop", "length") for r in rows)
    assert all(0 < r["completion_tokens"] <= 6 and r["completion_prompt_tokens"] > 10 for r in rows)
    c = g.counters.to_dict()
    assert c["llm/requests"] == 2 and "llm/cached" not in c
    assert c["llm/completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert c["llm/prompt_tokens"] == sum(r["completion_prompt_tokens"] for r in rows)
    # same answers as the engine called directly
    from curate.engines import Request, SamplingParams

    [direct] = smol.generate([Request(messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Answer briefly: What is 2+2?"}],
                                      params=SamplingParams(max_tokens=6))])
    assert rows[0]["completion"] == direct.text
    # a second run is answered from the cache
    g2 = Generate(engine=TRANSFORMERS, template="Answer briefly: {text}", system="Be brief.", max_tokens=6,
                  cache_path=str(tmp_path / "c.sqlite"))
    out2 = g2(table)
    assert out2.equals(out)
    assert g2.counters.to_dict() == {"llm/requests": 2, "llm/cached": 2}
    assert g2.engine.stats["generated"] == 0


def test_workdir_cache_and_raw_prompt(smol, tmp_path):
    g = Generate(engine=TRANSFORMERS, prompt_column="p", chat=False, max_tokens=4, stop=["\n"],
                 output_column="cont")
    g.workdir = str(tmp_path)
    out = g(pa.table({"p": ["1, 2, 3, 4,"]}))
    assert os.path.exists(tmp_path / "llm_cache.sqlite")
    assert out.column("cont")[0].as_py() and "\n" not in out.column("cont")[0].as_py()
    assert "cont_tokens" in out.schema.names
    # library call without workdir/cache_path: no cache file anywhere
    g3 = Generate(engine=TRANSFORMERS, prompt_column="p", chat=False, max_tokens=2)
    g3(pa.table({"p": ["a"]}))
    assert g3.engine.cache is None


def test_bad_rows_are_counted_and_skipped(smol):
    table = docs(["What is 2+2?", None, "Hi"])
    g = Generate(engine=TRANSFORMERS, template="Q: {text}", max_tokens=3, min_requests=100)
    out = g(table)
    assert out.column("id").to_pylist() == ["d0", "d2"]
    c = g.counters.to_dict()
    assert c["llm/failed"] == 1 and c["errors/llm/prompt"] == 1 and c["dropped/llm_failed"] == 1
    side = g.take_side()["failed"]
    assert side.column("id").to_pylist() == ["d1"] and "null" in side.column("llm_error")[0].as_py()
    # on_error=keep: the row stays with a null completion
    g2 = Generate(engine=TRANSFORMERS, template="Q: {text}", max_tokens=3, on_error="keep", min_requests=100)
    out2 = g2(table)
    assert out2.num_rows == 3 and out2.column("completion")[1].as_py() is None
    assert out2.column("completion_finish_reason")[1].as_py() == "error"


def test_empty_table(smol):
    out = Generate(engine=TRANSFORMERS, max_tokens=2)(docs([]))
    assert out.num_rows == 0 and "completion" in out.schema.names


def test_openai_engine_partial_and_total_failure(openai_server):
    st = openai_server.state
    st.backend = "echo"
    eng = {"kind": "openai", "model": "m", "base_url": openai_server.base_url, "max_retries": 0,
           "concurrency": 1, "backoff": 0.0}
    # one failure among many: counted, recorded, the run goes on; a 5xx after the retries may pass:
    # the row is deferred (errors/transient/..., the runner leaves the task for the next run)
    st.fail_next = ["500"]
    g = Generate(engine=eng, max_tokens=4, min_requests=2)
    out = g(docs([f"t{i}" for i in range(6)]))
    assert out.num_rows == 5
    c = g.counters.to_dict()
    assert c["llm/failed"] == 1 and c["errors/transient/llm_request"] == 1 and c["llm/requests"] == 6
    assert "errors/llm/request" not in c and g.deferred == 1
    # a client error (4xx) will not pass: counted as an error of the row, not deferred
    st.fail_next = ["400"]
    g4 = Generate(engine=eng, max_tokens=4, min_requests=2)
    assert g4(docs([f"t{i}" for i in range(3)])).num_rows == 2
    assert g4.counters.to_dict()["errors/llm/request"] == 1 and g4.deferred == 0
    assert "HTTP 500" in g.take_side()["failed"].column("llm_error")[0].as_py()
    # most requests fail: a clear StageError instead of an empty corpus
    st.fail_next = ["500"] * 100
    g2 = Generate(engine=eng, max_tokens=4, min_requests=4, batch_size=4)
    with pytest.raises(StageError, match="LLM requests failed"):
        g2(docs([f"t{i}" for i in range(8)]))


def test_in_a_pipeline_rerun_uses_the_cache(smol, tmp_path):
    import pyarrow.parquet as pq

    from curate.run import run_pipeline

    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"text": ["What is 2+2?", "Name a color.", "Say hi."]}), inp / "a.parquet")
    spec = {"name": "gen", "output": str(tmp_path / "out"), "workers": 1,
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(inp)}}},
            "stages": [{"stage": "generate", "options": {"engine": {"kind": "transformers"},
                                                         "template": "Answer: {text}", "max_tokens": 4}}]}
    first = run_pipeline(spec, progress=False)
    st = first.stats["generate"]["counters"]
    assert st["llm/requests"] == 3 and not st.get("llm/cached")
    assert os.path.exists(tmp_path / "out" / "_curate" / "work" / "generate" / "llm_cache.sqlite")
    # changed options re-run the step (not --force, which also clears the stage's work folder);
    # the batch size is not part of the request cache key: every answer comes from the cache
    spec["stages"][0]["options"]["batch_size"] = 2
    again = run_pipeline(spec, progress=False)
    st2 = again.stats["generate"]["counters"]
    assert st2["llm/cached"] == 3 and not st2.get("llm/completion_tokens")
    a = first.dataset("generate").to_table().sort_by("id")
    b = again.dataset("generate").to_table().sort_by("id")
    assert a.column("completion").to_pylist() == b.column("completion").to_pylist()


def test_llm_accounting_for_other_stages():
    from curate.engines import Choice, Completion
    from curate.llm import LLMAccounting
    from curate.pipeline.stage import MapStage

    class Rate(MapStage):
        name = "test_rate"

    st = Rate()
    acc = LLMAccounting(st, max_failure_rate=0.5, min_requests=4)
    ok = Completion(choices=[Choice("5", "stop", 2)], prompt_tokens=10)
    cached = Completion(choices=[Choice("4", "stop", 2)], prompt_tokens=10, cached=True)
    acc.record([ok, cached, Completion.failed("HTTP 500", request_id="d3")])
    acc.parse_failed("d4", "no score in 'banana'")
    c = st.counters.to_dict()
    assert c == {"llm/requests": 3, "llm/cached": 1, "llm/prompt_tokens": 10, "llm/completion_tokens": 2,
                 "llm/failed": 2, "errors/llm/request": 1, "errors/parse/unparseable": 1,
                 "llm/parse_failed": 1}
    acc.check()  # 2 of 3: too few requests to judge
    acc.record([Completion.failed("timeout")])
    with pytest.raises(StageError, match="3 of 4 LLM requests failed"):
        acc.check()
