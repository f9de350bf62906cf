"""``curate estimate``: LLM steps run on a seeded sample of their real input (or counted without a
call) and projected to the whole input; a run with an estimate shows estimate vs actual.

Checked against what the local OpenAI-compatible server (curate/testing/fake_openai.py) answered:
its ``usage`` per answer is recorded, so the projection's arithmetic is checked against the known
sample numbers, not against the estimator's own counters."""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from facts_stage import facts_answer  # noqa: F401  (registers the test_facts stage)

from curate.cli import main
from curate.pipeline.config import load_pipeline
from curate.pipeline.estimate import TokenCounter, default_scratch, estimate_pipeline, llm_numbers
from curate.pipeline.stats import Progress
from curate.testing.fake_openai import FakeOpenAI

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = os.path.join(HERE, "prompts")
WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()
PP, PC = 3.0, 15.0          # prices per million prompt / completion tokens
CT = 5                      # completion tokens per answer of the fake server


class Recording(FakeOpenAI):
    """The fake server, keeping the ``usage`` of every answer it gave."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.usages: list[dict] = []

    def answer(self, body, chat):
        out = super().answer(body, chat)
        with self.lock:
            self.usages.append(out["usage"])
        return out


@pytest.fixture
def server():
    with Recording(seed=1, completion_tokens=CT) as srv:
        yield srv


def write_docs(path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    texts = [f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for i in range(n)]
    pq.write_table(pa.table({"text": texts}), str(path))


def engine(srv, **kw) -> dict:
    return {"kind": "openai", "model": "fake", "base_url": srv.base_url, "api_key_env": None, "concurrency": 4,
            "timeout": 5, "max_retries": 1, "backoff": 0.01, "price_prompt": PP, "price_completion": PC, **kw}


def spec(tmp_path, srv_or_engine, *, n_docs=100, top=60, stages=None, **gen) -> dict:
    docs = tmp_path / "docs.parquet"
    if not docs.exists():
        write_docs(docs, n_docs)
    eng = srv_or_engine if isinstance(srv_or_engine, dict) else engine(srv_or_engine)
    gen_step = {"stage": "generate", "options": {"engine": eng, "template": "Summarize: {text}", "max_tokens": 10,
                                                 "output_column": "summary", **gen}}
    return {"name": "est", "output": str(tmp_path / "out"), "workers": 1, "report": True,
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(docs)}}},
            "stages": stages or [{"stage": "select", "options": {"top": top}}, gen_step]}


def test_sampled_estimate_projects_the_servers_numbers(server, tmp_path):
    # a budget far below what the sample costs: the estimate neither stops on it nor charges it
    s = spec(tmp_path, server, max_cost=1e-7, max_requests=1)
    est = estimate_pipeline(load_pipeline(s), sample=20, seed=7, json_path=str(tmp_path / "e.json"))
    g = est["steps"]["generate"]
    assert len(server.log) == 20 and len(server.usages) == 20      # the sample only, all of it
    pt = sum(u["prompt_tokens"] for u in server.usages)
    assert (g["input_rows"], g["input_rows_from"], g["sample_rows"]) == (60, "measured", 20)
    assert g["sample"]["prompt_tokens"] == pt and g["sample"]["completion_tokens"] == 20 * CT
    assert g["requests"] == 60
    assert g["prompt_tokens"] == round(pt * 3) and g["completion_tokens"] == 60 * CT
    assert g["cost"] == pytest.approx((pt * 3 * PP + 60 * CT * PC) / 1e6)
    assert g["output_rows"] == 60 and g["parse_failure_rate"] == 0.0
    # time: measured throughput (completion tokens / generation time) x 1 endpoint, plus start-up
    smp = g["sample"]
    assert g["throughput_tokens_per_s"] == pytest.approx(20 * CT / smp["generate_seconds"], rel=1e-3)
    assert g["seconds"] == pytest.approx(smp["startup_seconds"] + 60 * CT / g["throughput_tokens_per_s"], rel=1e-3)
    assert g["throughput_from"].startswith("measured")
    assert est["total"]["cost"] == pytest.approx(g["cost"]) and est["total"]["requests"] == 60
    # the JSON: --json and <output>.estimate/estimate.json, the same estimate
    scratch = default_scratch(s["output"])
    with open(tmp_path / "e.json") as f1, open(os.path.join(scratch, "estimate.json")) as f2:
        assert json.load(f1) == json.load(f2) == json.loads(json.dumps(est))
    # nothing was written into the real output (no shards, no budget or cache file)
    assert not os.path.exists(s["output"])
    # the same seed samples the same rows: the same numbers again (the upstream steps are not rerun)
    again = estimate_pipeline(load_pipeline(s), sample=20, seed=7)
    assert again["steps"]["generate"]["prompt_tokens"] == g["prompt_tokens"]
    assert len(server.log) == 40


def test_configured_throughput_and_no_prices(server, tmp_path):
    s = spec(tmp_path, engine(server, throughput_tokens_per_s=2.0, price_prompt=None, price_completion=None))
    est = estimate_pipeline(load_pipeline(s), sample=10, seed=1)
    g = est["steps"]["generate"]
    assert g["cost"] is None and est["total"]["cost"] is None
    assert g["throughput_from"].startswith("configured") and g["throughput_tokens_per_s"] == 2.0
    assert g["seconds"] == pytest.approx(g["sample"]["startup_seconds"] + 60 * CT / 2.0, rel=1e-3)
    # the library run compares with it too (no prices: no cost on either side)
    from curate.pipeline.runner import run_pipeline

    res = run_pipeline(s, progress=False, estimate=os.path.join(default_scratch(s["output"]), "estimate.json"))
    cmp = res.estimate["steps"]["generate"]
    assert cmp["actual"]["requests"] == cmp["estimated"]["requests"] == 60
    assert cmp["actual"]["cost"] is None and cmp["estimated"]["cost"] is None


def test_parse_failure_rate_of_the_sample(tmp_path):
    bad = {2, 5, 7}

    def answer(body):   # documents 2, 5 and 7 get an answer that never parses, retries included
        msg = body["messages"][-1]["content"]
        i = int(msg.split("DOCUMENT:", 1)[1].split()[1].rstrip("."))
        return "no json here" if i in bad else facts_answer(body)

    with Recording(seed=1, completion_tokens=CT, responder=answer) as srv:
        stages = [{"stage": "test_facts", "options": {"engine": engine(srv), "prompts_dir": PROMPTS,
                                                       "max_tokens": 32, "parse_retries": 2}}]
        est = estimate_pipeline(load_pipeline(spec(tmp_path, srv, n_docs=10, stages=stages)), sample=20)
    f = est["steps"]["test_facts"]
    # every row sampled (10 < 20): 7 good answers, 3 bad documents x 3 tries
    assert (f["input_rows"], f["sample_rows"]) == (10, 10)
    assert f["requests"] == 7 + 3 * 3 == len(srv.log)
    assert f["parse_failure_rate"] == pytest.approx(9 / 16)
    errors = f["sample"]["errors"]
    assert f["sample"]["parse_failures"] == 9 and sum(errors.values()) == 3
    assert all(k.startswith("parse/") for k in errors)
    assert f["output_rows"] == 7 * 3        # three facts per good document
    assert f["completion_tokens"] == 16 * CT


def test_a_step_below_an_llm_step_gets_a_projected_input(server, tmp_path):
    gen = {"engine": engine(server), "template": "Summarize: {text}", "max_tokens": 10}
    stages = [{"stage": "select", "options": {"top": 60}},
              {"name": "first", "stage": "generate", "options": {**gen, "output_column": "summary"}},
              {"name": "half", "stage": "select", "options": {"fraction": 0.5, "seed": 3}},
              {"name": "second", "stage": "generate", "options": {**gen, "output_column": "title"}}]
    est = estimate_pipeline(load_pipeline(spec(tmp_path, server, stages=stages)), sample=20, seed=2)
    first, second = est["steps"]["first"], est["steps"]["second"]
    assert first["input_rows_from"] == "measured" and first["input_rows"] == 60
    kept = second["sample_rows"]                       # what `half` kept of the 20 sampled rows
    assert 0 < kept < 20 and len(server.log) == 20 + kept
    assert second["input_rows_from"] == "projected" and second["input_rows"] == round(kept * 3)
    assert second["requests"] == round(kept * 3)
    assert est["total"]["requests"] == 60 + second["requests"]
    assert any("'half' (select, a global step) ran on the sample" in n for n in est["notes"])


def test_no_call_counts_prompts_and_takes_max_tokens(server, tmp_path):
    s = spec(tmp_path, server, n_docs=8, top=8)
    est = estimate_pipeline(load_pipeline(s), sample=20, no_call=True)
    g = est["steps"]["generate"]
    assert len(server.log) == 0                          # nothing sent
    texts = pq.read_table(tmp_path / "docs.parquet").column("text").to_pylist()
    # the openai engine has no tokenizer here: UTF-8 bytes / 4 per message, +4 per message
    expected = sum((len(f"Summarize: {t}".encode()) + 3) // 4 + 4 for t in texts)
    assert g["prompt_tokens"] == expected and g["requests"] == 8
    assert g["completion_tokens"] == 8 * 10 and "upper bound" in g["completion_tokens_from"]
    assert "bytes / 4" in g["method"] and g["parse_failure_rate"] is None and g["seconds"] is None
    assert g["cost"] == pytest.approx((expected * PP + 80 * PC) / 1e6)


def test_unreachable_engine_is_counted_instead(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                                   # nothing listens there
    eng = {"kind": "openai", "model": "fake", "base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": None,
           "max_retries": 0, "timeout": 2}
    est = estimate_pipeline(load_pipeline(spec(tmp_path, eng, n_docs=8, top=8)), sample=4)
    g = est["steps"]["generate"]
    assert g["method"].startswith("counted") and g["requests"] == 8
    assert any("could not be reached" in n for n in g["notes"])
    assert g["output_rows"] is None


def test_no_call_with_the_transformers_tokenizer(smol, tmp_path):
    from curate.engines.base import apply_chat_template

    eng = {"kind": "transformers", "batch_size": 2, "num_threads": 1}
    s = spec(tmp_path, eng, n_docs=6, top=6)
    est = estimate_pipeline(load_pipeline(s), sample=4, seed=5, no_call=True)
    g = est["steps"]["generate"]
    counter = TokenCounter(load_pipeline(s).steps["generate"].stage.config.engine)
    tok = counter.hf_tokenizer()
    counter.release()
    texts = pq.read_table(tmp_path / "docs.parquet").column("text").to_pylist()
    picked = sorted(random.Random(5).sample(range(6), 4))
    per = [len(tok(apply_chat_template(tok, [{"role": "user", "content": f"Summarize: {texts[i]}"}]),
                   add_special_tokens=False)["input_ids"]) for i in picked]
    assert g["sample"]["prompt_tokens"] == sum(per)
    assert g["prompt_tokens"] == round(sum(per) * 6 / 4)
    assert "the model's tokenizer" in g["method"] and g["completion_tokens"] == round(4 * 10 * 6 / 4)


def test_cli_estimate_then_run_shows_estimate_vs_actual(server, tmp_path):
    s = spec(tmp_path, server)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(s))
    r = CliRunner().invoke(main, ["estimate", str(cfg), "--sample", "20", "--json", str(tmp_path / "e.json"), "-q"])
    assert r.exit_code == 0, r.output
    assert "generate" in r.output and "total" in r.output and "parse fail" in r.output
    assert (tmp_path / "e.json").exists() and len(server.log) == 20
    r = CliRunner().invoke(main, ["run", str(cfg), "-q"])
    assert r.exit_code == 0, r.output
    assert "estimate vs actual" in r.output
    assert len(server.log) == 20 + 60                    # the estimate's sample was not cached into the run
    with open(tmp_path / "out" / "stats.json") as f:
        stats = json.load(f)
    cmp = stats["estimate"]["steps"]["generate"]
    pt = sum(u["prompt_tokens"] for u in server.usages[20:])
    assert cmp["actual"]["requests"] == 60 and cmp["actual"]["prompt_tokens"] == pt
    assert cmp["actual"]["completion_tokens"] == 60 * CT and cmp["estimated"]["requests"] == 60
    assert cmp["actual"]["cost"] == pytest.approx((pt * PP + 60 * CT * PC) / 1e6)
    assert cmp["estimated"]["completion_tokens"] == cmp["actual"]["completion_tokens"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "estimate vs actual" in html and html.count("<td>actual</td>") == 1
    # a changed step is not compared with a stale estimate
    s["stages"][1]["options"]["max_tokens"] = 11
    cfg.write_text(yaml.safe_dump(s))
    r = CliRunner().invoke(main, ["run", str(cfg), "-q"])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "out" / "stats.json") as f:
        assert json.load(f)["estimate"]["steps"]["generate"]["stale"] is True
    r = CliRunner().invoke(main, ["run", str(cfg), "-q", "--estimate", str(cfg)])
    assert r.exit_code == 2 and "not an estimate JSON" in r.output
    r = CliRunner().invoke(main, ["estimate", str(cfg), "--scratch", str(tmp_path / "out" / "x")])
    assert r.exit_code == 2 and "overlaps the pipeline's output" in r.output


def test_pipeline_without_llm_steps(tmp_path):
    write_docs(tmp_path / "docs.parquet", 5)
    s = {"name": "x", "output": str(tmp_path / "out"), "inputs": {"docs": {"stage": "read_parquet",
         "options": {"paths": str(tmp_path / "docs.parquet")}}}, "stages": [{"stage": "select", "options": {"top": 2}}]}
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(s))
    r = CliRunner().invoke(main, ["estimate", str(cfg), "-q"])
    assert r.exit_code == 0 and "no LLM steps" in r.output
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.estimate" / "upstream")


def test_progress_eta_and_cost_against_the_estimate():
    p = Progress("gen", total=None, enabled=False, tty=False)
    p.estimate = {"requests": 100, "cost": 2.0}
    p.llm({"sent": 30, "done": 25, "failed": 0, "tokens": 1000, "cost": 0.5})
    t = p.start + 10.0
    assert p.eta(t) == pytest.approx(75 * 10.0 / 25)
    text = p._llm_text()
    assert "25 of ~100 estimated done" in text and "cost 0.5000 of ~2.0000 estimated" in text
    p.llm({"done": 75})
    assert p.eta(t) is None


def test_llm_numbers_from_counters():
    n = llm_numbers({"llm/requests": 12, "llm/cached": 2, "llm/failed": 3, "llm/parse_failed": 2,
                     "llm/parse_retries": 4, "llm/prompt_tokens": 100, "llm/completion_tokens": 40})
    # 10 sent; answers received 12 - (3 failed - 2 of them parse failures) = 11; 6 did not parse
    assert n["requests"] == 10 and n["parse_failure_rate"] == pytest.approx(6 / 11) and n["cost"] is None


@pytest.mark.slow
def test_quickstart_estimate_with_smollm2_then_run(tmp_path):
    """The shipped quickstart with the real SmolLM2 engine: the estimate's sample (2 of the 3 rows
    its generate step gets) against the run; the counted path (--no-call) gives the same prompt
    tokens as the engine reported for the same sample."""
    from curate.cli import quickstart_path

    out = str(tmp_path / "qs")
    r = CliRunner().invoke(main, ["estimate", quickstart_path(), "--output", out, "--sample", "2", "-q"])
    assert r.exit_code == 0, r.output
    with open(os.path.join(out + ".estimate", "estimate.json")) as f:
        g = json.load(f)["steps"]["generate"]
    assert (g["input_rows"], g["input_rows_from"], g["sample_rows"]) == (3, "measured", 2)
    assert g["requests"] == 3 and g["sample"]["requests"] == 2
    assert 0 < g["sample"]["completion_tokens"] <= 2 * 48 and g["throughput_from"].startswith("measured")
    assert not os.path.exists(out)
    r = CliRunner().invoke(main, ["estimate", quickstart_path(), "--output", out, "--sample", "2", "--no-call", "-q",
                                  "--json", str(tmp_path / "counted.json")])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "counted.json") as f:
        c = json.load(f)["steps"]["generate"]
    assert c["sample"]["prompt_tokens"] == g["sample"]["prompt_tokens"]
    assert c["completion_tokens"] == 3 * 48 and "tokenizer" in c["method"]
    r = CliRunner().invoke(main, ["run", quickstart_path(), "--output", out, "-q"])
    assert r.exit_code == 0, r.output
    with open(os.path.join(out, "stats.json")) as f:
        cmp = json.load(f)["estimate"]["steps"]["generate"]
    est, act = cmp["estimated"], cmp["actual"]
    assert act["requests"] == est["requests"] == 3 and act["input_rows"] == 3
    # 2 of the 3 documents were sampled: the projection is within half of what the run used
    assert abs(est["prompt_tokens"] - act["prompt_tokens"]) <= 0.5 * act["prompt_tokens"]
    assert 0 < act["completion_tokens"] <= 3 * 48


def test_an_llm_step_without_input_rows_costs_nothing(server, tmp_path):
    s = spec(tmp_path, server, stages=[{"stage": "select", "options": {"where": "text == 'nothing'"}},
                                       {"stage": "generate", "options": {"engine": engine(server), "template": "{text}",
                                                                         "output_column": "summary"}}])
    est = estimate_pipeline(load_pipeline(s), sample=5)
    g = est["steps"]["generate"]
    assert (g["input_rows"], g["requests"], g["cost"], g["method"]) == (0, 0, 0, "no input rows")
    assert len(server.log) == 0 and est["total"]["requests"] == 0
