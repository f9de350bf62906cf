"""The LLM layer's loop: budgets charged per answer across kill -9, continuous flow across rows,
follow-ups without a batch barrier, answers that give nothing, min_yield, library-call warnings, rows
written in order while answers still arrive."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest

from facts_stage import Facts, facts_answer

from curate.engines import RequestCache
from curate.llm.accounting import Budget
from curate.llm.stage import Job
from curate.pipeline.stage import StageError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def docs(n: int) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(n)], "text": [f"word{i} alpha beta gamma" for i in range(n)]})


def engine(server, **kw) -> dict:
    return {"kind": "openai", "model": "m", "base_url": server.base_url, "max_retries": 0, "backoff": 0.0, **kw}


_SCRIPT = """
import sys, pyarrow as pa
sys.path[:0] = [{here!r}, {root!r}]
from facts_stage import Facts
n = {n}
t = pa.table({{"id": [f"d{{i}}" for i in range(n)], "text": [f"word{{i}} alpha beta gamma" for i in range(n)]}})
s = Facts(engine={engine!r}, prompts_dir={prompts!r}, max_tokens=8, cache_path={cache!r},
          max_total_tokens={budget}, min_requests=1000)
s(t)
print("DONE", s.deferred)
"""


def test_budget_is_charged_per_answer_across_kills(openai_server, prompts, tmp_path):
    """SIGKILL mid-run: every answer the server gave is charged in the budget store (tokens, not
    just requests), and runs after kills never let the server serve more than the budget."""
    st = openai_server.state
    st.backend, st.delay = "script", 0.15
    served: list[int] = []
    lock = threading.Lock()

    def responder(body):
        with lock:
            served.append(1)
        return facts_answer(body)

    st.responder = responder
    cache = str(tmp_path / "c.sqlite")
    per_answer = 5 + 3  # the test server's usage per answer
    # ~25 requests' reservations (prompt estimate + max_tokens): a first run killed after 6 answers may
    # have reserved 15 of them, and the second run still has room for its 5 before the kill
    budget = 90 * per_answer
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(here=HERE, root=ROOT, n=120, engine=engine(openai_server, concurrency=4),
                                     prompts=str(prompts), cache=cache, budget=budget))
    env = {**os.environ, "PYTHONPATH": ROOT}

    def run_and_kill(after: int) -> None:
        start = len(served)
        p = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while len(served) < start + after and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert p.poll() is None, p.communicate()[1][-2000:]
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        time.sleep(st.delay + 0.2)  # answers the server was writing when the client died

    run_and_kill(6)
    used = Budget(cache + ".budget", "test_facts", max_tokens=budget).used()
    cached = len(RequestCache(cache))
    assert cached >= 1
    # every answer the server gave (received or not) is charged: actual tokens or the reservation
    assert used[1] >= per_answer * len(served) and used[0] >= len(served)
    run_and_kill(5)
    used = Budget(cache + ".budget", "test_facts", max_tokens=budget).used()
    assert used[1] >= per_answer * len(served)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DONE" in r.stdout and int(r.stdout.split()[-1]) > 0  # the budget stopped it: rows left
    assert per_answer * len(served) <= budget  # never more served than the budget, kills or not
    used = Budget(cache + ".budget", "test_facts", max_tokens=budget).used()
    assert used[1] >= per_answer * len(served)


def test_window_stays_full_across_rows(openai_server, prompts):
    """No batch barrier: with batch_size 2 the engine still has `concurrency` requests in flight."""
    st = openai_server.state
    st.backend, st.responder, st.delay = "script", facts_answer, 0.1
    s = Facts(engine=engine(openai_server, concurrency=6), prompts_dir=str(prompts), max_tokens=32, batch_size=2)
    out = s(docs(24))
    assert st.max_in_flight == 6
    # rows in input order, whatever order the answers came in
    assert out.column("source_id").to_pylist() == [f"d{i}" for i in range(24) for _ in range(3)]


def test_follow_up_leaves_without_waiting_for_the_batch(openai_server):
    """entigraph: a document's relation request goes out as soon as its entity answer parsed,
    while a slow entity answer of another document is still out."""
    from curate.stages.synth.entigraph import EntiGraph

    st = openai_server.state
    st.backend = "script"
    order: list[str] = []

    def responder(body):
        msg = body["messages"][-1]["content"]
        if "salient entities" in msg:
            if "slowdoc" in msg:
                time.sleep(1.0)
            order.append("entities:" + ("slow" if "slowdoc" in msg else "fast"))
            return '{"summary": "s", "entities": ["Alpha", "Beta", "Gamma"]}'
        order.append("relation")
        return "Alpha and Beta relate."

    st.responder = responder
    t = pa.table({"id": ["a", "b"], "text": ["slowdoc Alpha Beta Gamma.", "Alpha Beta Gamma fast."]})
    s = EntiGraph(engine=engine(openai_server, concurrency=4), max_relations_per_doc=1, triples=False,
                  temperature=1.0, seed=1)
    out = s(t)
    assert out.num_rows == 2
    assert order.index("relation") < order.index("entities:slow")


def test_answers_that_give_nothing_are_retried_counted_and_warned(openai_server, prompts, caplog):
    """A synthetic recipe whose answers parse to no row: retried, errors/parse/no_output, the
    side output, warnings/low_yield and a WARNING from the library call naming the counts."""
    from curate.llm.parse import string_list
    from curate.llm.stage import LLMStage

    st = openai_server.state
    st.backend, st.responder = "script", lambda body: '{"facts": []}'

    class Empty(Facts):
        def parse(self, row, completions):
            return [{"text": f} for f in string_list(["x"] if False else [])]

    s = Empty(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=32, parse_retries=1,
              min_requests=100)
    assert isinstance(s, LLMStage)
    with caplog.at_level(logging.WARNING, logger="curate"):
        out = s(docs(3))
    c = s.counters.to_dict()
    assert out.num_rows == 0
    assert c["errors/parse/no_output"] == 3 and c["llm/parse_retries"] == 3 and c["warnings/low_yield"] == 1
    assert len(s.take_side()["failed"]) == 3
    text = caplog.text
    assert "only 0 of 3 input rows produced output" in text
    assert "0 row(s) out" in text and "errors/parse/no_output 3" in text


def test_min_yield_option(openai_server, prompts):
    st = openai_server.state
    st.backend = "script"
    st.responder = lambda body: facts_answer(body) if "word0" in body["messages"][-1]["content"] else "no json"
    s = Facts(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=32, parse_retries=0,
              min_requests=100, min_yield=0.2)
    s(docs(4))  # 1 of 4 rows gave output: 0.25 >= 0.2
    assert "warnings/low_yield" not in s.counters.to_dict()
    s2 = Facts(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=32, parse_retries=0,
               min_requests=100)
    s2(docs(4))  # default 0.5 for synthetic stages
    assert s2.counters.to_dict()["warnings/low_yield"] == 1


def test_httpx_request_lines_are_quiet(openai_server, prompts, caplog):
    st = openai_server.state
    st.backend, st.responder = "script", facts_answer
    with caplog.at_level(logging.INFO):
        Facts(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=32)(docs(2))
    assert logging.getLogger("httpx").level == logging.WARNING
    assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]


def test_provenance_names_the_prompt_content_and_annotation_rows_carry_it(openai_server, prompts):
    """template_hash follows the prompt file's content (template_version is whatever the file
    says); annotation stages carry a JSON provenance column."""
    import json

    from curate.stages.synth.generate import Generate

    st = openai_server.state
    st.backend, st.responder = "script", facts_answer
    first = Facts(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=32)(docs(1)).to_pylist()[0]
    path = prompts / "facts" / "list.yaml"
    path.write_text(path.read_text().replace("up to three", "at most three"))  # same `version: 1`
    second = Facts(engine=engine(openai_server), prompts_dir=str(prompts), max_tokens=32)(docs(1)).to_pylist()[0]
    assert first["template_version"] == second["template_version"] == 1
    assert len(first["template_hash"]) == 64 and first["template_hash"] != second["template_hash"]
    st.backend = "echo"
    g = Generate(engine=engine(openai_server), template="Say {text}", output_column="summary", max_tokens=8)
    out = g(docs(2))
    prov = [json.loads(p) for p in out.column("summary_provenance").to_pylist()]
    assert all(p["engine"] == "openai" and p["model"].endswith("|m") and p["sampling"]["max_tokens"] == 8
               for p in prov)
    assert prov[0]["hash"] and prov[0]["hash"] != json.loads(
        Generate(engine=engine(openai_server), template="Tell {text}", output_column="summary", max_tokens=8)(
            docs(1)).column("summary_provenance")[0].as_py())["hash"]


def test_the_readme_recipe_runs(openai_server, tmp_path):
    """The recipe written in README.md ("Writing an LLM recipe"), as it is printed there."""
    import re

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("### Writing an LLM recipe", 1)[1]
    prompt = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "glossary").mkdir()
    (tmp_path / "glossary" / "terms.yaml").write_text(prompt)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102  (our own README)
    st = openai_server.state
    st.backend = "script"
    st.responder = lambda body: "- cache: a store of answers\n- budget: a cap on spending\n- nothing here"
    s = ns["Glossary"](engine=engine(openai_server), prompts_dir=str(tmp_path))
    out = s(docs(2))
    assert out.column("text").to_pylist() == ["cache: a store of answers", "budget: a cap on spending"] * 2
    assert out.column("id").to_pylist()[:2] == ["d0#glossary-0", "d0#glossary-1"]
    assert out.column("template_id").to_pylist()[0] == "glossary/terms"


def test_a_stage_stopped_mid_flight_leaves_the_shared_engine_usable(openai_server, prompts):
    """A failure-rate stop with requests still out: they finish on the engine's loop (not cut
    mid-request), so the next stage on the same engine gets every answer."""
    from curate.pipeline.stage import StageError

    st = openai_server.state
    st.backend, st.delay = "echo", 0.2  # never JSON; slow, so that many requests are out at the stop
    s = Facts(engine=engine(openai_server, concurrency=16), prompts_dir=str(prompts), max_tokens=8,
              parse_retries=0, min_requests=2)
    with pytest.raises(StageError, match="LLM requests failed"):
        s(docs(40))
    at_stop = st.hits
    time.sleep(0.6)     # requests that were waiting for a connection at the stop are not sent
    # the server counts a request when its handler starts: on a loaded machine some already on the
    # wire at the stop (at most the concurrency, 16) are counted after it; the 40 - 16 queued
    # behind them must never go out
    assert st.hits - at_stop <= 16 and st.hits < 40, (at_stop, st.hits)
    st.backend, st.responder, st.delay = "script", facts_answer, 0.0
    s2 = Facts(engine=engine(openai_server, concurrency=16), prompts_dir=str(prompts), max_tokens=8)
    out = s2(docs(40))
    c = s2.counters.to_dict()
    assert out.num_rows == 120 and not [k for k in c if k.startswith("errors/")] and s2.deferred == 0


def _spy_flows(monkeypatch) -> list:
    import curate.llm.stage as stage_mod

    flows: list = []
    init = stage_mod._Flow.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        flows.append(self)

    monkeypatch.setattr(stage_mod._Flow, "__init__", spy)
    return flows


def test_rows_are_written_while_answers_still_arrive(openai_server, prompts, monkeypatch):
    """A row is written (its output dicts made, its answers freed) once the rows before it are and
    its own jobs are done, not at the end of the table: while the last row's answer is held, every
    other row is already written; the output is the same rows in input order."""
    flows = _spy_flows(monkeypatch)
    n = 30
    seen_written: list[int] = []

    def responder(body):
        if f"word{n - 1} alpha" in body["messages"][-1]["content"]:
            deadline = time.time() + 20
            while time.time() < deadline and (not flows or flows[-1].cursor < n - 1):
                time.sleep(0.01)
            seen_written.append(flows[-1].cursor)
        return facts_answer(body)

    st = openai_server.state
    st.backend, st.responder = "script", responder
    s = Facts(engine=engine(openai_server, concurrency=6), prompts_dir=str(prompts), max_tokens=32, cache=False)
    out = s(docs(n))
    assert seen_written == [n - 1]
    assert out.column("source_id").to_pylist() == [f"d{i}" for i in range(n) for _ in range(3)]
    assert out.column("id").to_pylist() == [f"d{i}#facts-{k}" for i in range(n) for k in range(3)]
    assert not flows[-1].by_row and not flows[-1].open   # nothing left behind


class _FollowUpElsewhere(Facts):
    """A stage whose follow-up job is for another row (``target``) than its parent's (row 0)."""

    name = "test_facts_elsewhere"
    target = 0

    def jobs(self, unit):
        jobs = super().jobs(unit)
        if unit.index == 3:
            for job in jobs:
                job.then = lambda res: [Job(self.target, [self.ask(self.config.template, row={"id": "x"},
                                                                   text="word0 again")],
                                            lambda cs: self.parse({"id": "x"}, cs))]
        return jobs


def test_follow_up_for_a_written_row_is_an_error_and_for_a_later_row_writes_at_the_end(openai_server, prompts):
    """Jobs are for their own row. A follow-up for a row already written cannot join it: a clear
    error naming the step. One for a row not written yet turns writing-as-you-go off: all rows come
    out at the end, in order, the follow-up's rows with its target row."""
    def responder(body):
        if "word3 alpha" in body["messages"][-1]["content"]:
            time.sleep(0.5)   # row 0 is written by the time row 3's answer comes back
        return facts_answer(body)

    st = openai_server.state
    st.backend, st.responder = "script", responder
    s = _FollowUpElsewhere(engine=engine(openai_server, concurrency=4), prompts_dir=str(prompts), max_tokens=32,
                           cache=False)
    with pytest.raises(StageError, match="test_facts_elsewhere.*row 0, which was already written"):
        s(docs(8))
    s = _FollowUpElsewhere(engine=engine(openai_server, concurrency=4), prompts_dir=str(prompts), max_tokens=32,
                           cache=False)
    s.target = 7
    out = s(docs(8))
    src = out.column("source_id").to_pylist()
    assert src == sorted(src, key=lambda x: int(x[1:])) and src.count("d7") == 3 + 2 and src.count("d3") == 3   # "word0 again": 2 facts
