"""Failure semantics of the runner (README, "Failure semantics"): a step over its error fraction
stays unfinished until a rerun redoes its errored tasks; budget stops have their own exit code;
failed and interrupted runs leave stats, funnel and report of what finished; no secret from the
environment is written to the output."""

import json
import os
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.pipeline.runner import PipelineError
from curate.run import run_pipeline
from helpers import curate_bin, read_step, write_yaml

PLUGINS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins")


def _env():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, PLUGINS, os.environ.get("PYTHONPATH", "")])}


def _cli(*args, **kw):
    return subprocess.run([curate_bin(), *args], capture_output=True, text=True, env=_env(), timeout=300, **kw)


def _two_files(folder, bad="EXPLODE"):
    """a.parquet: 30 good documents; b.parquet: 30 documents containing ``bad``."""
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({"text": [f"good document {i} with words" for i in range(30)]}),
                   os.path.join(folder, "a.parquet"))
    pq.write_table(pa.table({"text": [f"other document {i} {bad}" for i in range(30)]}),
                   os.path.join(folder, "b.parquet"))


def _fragile_pipeline(tmp_path, **over):
    broken = tmp_path / "BROKEN"
    d = {"name": "fragile", "output": str(tmp_path / "out"), "workers": 1, "max_error_fraction": 0.2,
         "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "fragile", "options": {"broken_file": str(broken)}}]}
    d.update(over)
    return d, broken


def test_a_rerun_after_too_many_errors_fails_again_then_recovers_every_document(tmp_path):
    """The failed step's task records used to make a plain rerun exit 0 with the 30
    failed documents gone (and a rerun after the fix kept them gone)."""
    _two_files(str(tmp_path / "in"))
    d, broken = _fragile_pipeline(tmp_path)
    broken.write_text("")
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    for attempt in range(2):        # the cause is not fixed: every plain rerun fails the same way
        r = _cli("run", "-q", cfg)
        assert r.returncode == 1, (attempt, r.stderr)
        assert "30 of 60 documents failed" in r.stderr and "max_error_fraction=0.2" in r.stderr
        assert "30 rows failed in step fragile" in r.stderr
        stats = json.load(open(tmp_path / "out" / "stats.json"))
        assert stats["complete"] is False and stats["failure"]["step"] == "fragile"
        assert stats["steps"]["fragile"]["errors"] == {"exception/ValueError": 30}
        assert not (tmp_path / "out" / "_curate" / "state" / "fragile" / "DONE.json").exists()
    good = tmp_path / "out" / "fragile" / "part-00000-00000.parquet"
    mtime = os.stat(good).st_mtime_ns
    broken.unlink()                 # the cause is fixed: the rerun redoes exactly the errored task
    r = _cli("run", "-q", cfg)
    assert r.returncode == 0, r.stderr
    assert "rows failed" not in r.stderr
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["complete"] is True and stats["steps"]["fragile"]["status"] == "resumed"
    assert stats["steps"]["fragile"]["out"] == 60 and stats["steps"]["fragile"]["errors"] == {}
    out = pa.concat_tables(read_step(str(tmp_path / "out"), "fragile").values())
    assert out.num_rows == 60 and len(set(out.column("id").to_pylist())) == 60
    assert os.stat(good).st_mtime_ns == mtime      # the error-free task was kept, not redone


def test_error_fraction_default_and_loud_summary(tmp_path):
    """The default threshold reads as "almost nothing lost" (1%); exactly at it passes, above it
    fails; errored rows of a passing run are named on stderr after the funnel."""
    from curate.pipeline.config import PipelineSpec

    assert PipelineSpec(output="x").max_error_fraction == 0.01
    os.makedirs(tmp_path / "in")
    texts = [f"document {i}" + (" EXPLODE" if i < 2 else "") for i in range(200)]  # 1% fail
    pq.write_table(pa.table({"text": texts}), str(tmp_path / "in" / "a.parquet"))
    d = {"name": "x", "output": str(tmp_path / "out"), "workers": 1, "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "explode"}]}
    r = _cli("run", "-q", write_yaml(str(tmp_path / "p.yaml"), d))
    assert r.returncode == 0, r.stderr
    assert "2 rows failed in step explode (exception/ValueError 2;" in r.stderr
    assert "explode" in r.stdout and "2 rows failed" not in r.stdout
    texts[2] += " EXPLODE"          # 3 of 200: more than 1%
    pq.write_table(pa.table({"text": texts}), str(tmp_path / "in" / "a.parquet"))
    with pytest.raises(PipelineError, match="3 of 200 documents failed"):
        run_pipeline({**d, "output": str(tmp_path / "out2")}, progress=False)


def _three_step(tmp_path, last):
    from helpers import write_corpus
    write_corpus(str(tmp_path / "in"), files=2, rows=200)
    return {"name": "partial", "output": str(tmp_path / "out"), "workers": 2, "batch_size": 50,
            "plugins": ["runner_stages"],
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
            "stages": [{"stage": "word_count"}, {"stage": "min_words", "options": {"min_words": 10}},
                       {"name": "top", "stage": "top_k", "options": {"k": 20}}, {**last, "input": "top"}]}


def test_a_failed_run_leaves_stats_funnel_report_and_inspect_per_step(tmp_path):
    """A failed run wrote no stats.json, funnel or report, and `curate inspect` merged
    every step's shards into one dataset."""
    d = _three_step(tmp_path, {"name": "boom", "stage": "explode", "options": {"bad_word": " "}})
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    r = _cli("run", "-q", cfg)
    assert r.returncode == 1 and "step 'boom': 20 of 20 documents failed" in r.stderr
    out = tmp_path / "out"
    stats = json.load(open(out / "stats.json"))
    assert stats["complete"] is False
    assert stats["failure"]["step"] == "boom" and stats["failure"]["kind"] == "failed"
    st = stats["steps"]
    assert st["min_words"]["status"] == "done" and st["min_words"]["in"] == 400
    assert st["top"]["status"] == "done" and st["top"]["out"] == 20
    assert st["boom"]["status"] == "failed" and st["boom"]["errors"] == {"exception/ValueError": 20}
    # the funnel of what finished is on the terminal, marked
    assert "min_words" in r.stdout and "top_k" in r.stdout and "INCOMPLETE" in r.stdout
    assert "failed" in [l for l in r.stdout.splitlines() if l.startswith("boom")][0]
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["complete"] is False and set(manifest["steps"]) == {"min_words", "top"}
    assert "INCOMPLETE RUN" in open(out / "report.html").read()
    r = _cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "INCOMPLETE" in r.stdout and "step 'boom'" in r.stdout
    assert "  top/  1 shards, 20 rows" in r.stdout and "  boom/  unfinished" in r.stdout
    assert "schema:" not in r.stdout          # an overview per step, not one merged dataset
    # the same output, killed before any stats were written: still per step
    os.remove(out / "stats.json")
    os.remove(out / "manifest.json")
    r = _cli("inspect", str(out))
    assert "INCOMPLETE" in r.stdout and "schema:" not in r.stdout and "  top/  unfinished" in r.stdout


@pytest.mark.slow
def test_sigterm_writes_what_finished_and_a_rerun_resumes(tmp_path):
    markers = tmp_path / "markers"
    d = _three_step(tmp_path, {"name": "slow", "stage": "slow",
                               "options": {"seconds_per_batch": 2.0, "marker_dir": str(markers)}})
    d["batch_size"] = 2
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    proc = subprocess.Popen([curate_bin(), "run", "-q", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and not (markers.is_dir() and os.listdir(markers)):
        time.sleep(0.05)
    assert os.listdir(markers), "the slow step never started"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)          # what Airflow, Kubernetes and `docker stop` send
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert time.time() - t0 < 15              # the workers are stopped, not waited for
    assert "terminated: finished shards are kept" in err and "INCOMPLETE" in out
    assert "leaked semaphore" not in err and "Traceback" not in err, err
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["complete"] is False and stats["failure"]["kind"] == "interrupted"
    assert stats["failure"]["step"] == "slow" and stats["steps"]["top"]["status"] == "done"
    d["stages"][-1]["options"]["seconds_per_batch"] = 2.0   # same options: the rerun resumes
    r = _cli("run", "-q", cfg)
    assert r.returncode == 0, r.stderr
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["complete"] is True and stats["steps"]["top"]["status"] == "skipped"
    assert stats["steps"]["slow"]["out"] == 20


class _EchoOpenAI:
    """A minimal OpenAI-compatible server on 127.0.0.1 (chat completions answer "ok <n>"); it
    records the Authorization headers and bodies it receives."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                seen.append((self.headers.get("Authorization"), body))
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": f"ok {len(seen)}"}}],
                                   "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def echo_server():
    srv = _EchoOpenAI()
    yield srv
    srv.close()


def _generate_pipeline(tmp_path, server, n=12, **options):
    os.makedirs(tmp_path / "in", exist_ok=True)
    pq.write_table(pa.table({"text": [f"document number {i}" for i in range(n)]}),
                   str(tmp_path / "in" / "a.parquet"))
    return {"name": "llm", "output": str(tmp_path / "out"), "workers": 1,
            "engines": {"api": {"kind": "openai", "model": "echo", "base_url": server.base_url}},
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
            "stages": [{"name": "gen", "stage": "generate",
                        "options": {"engine": "api", "template": "Say: {text}", "batch_size": 4, **options}}]}


@pytest.mark.slow
def test_budget_reached_exits_3_with_what_was_spent_and_the_option_to_raise(tmp_path, echo_server):
    """A budget stop exited 1 ("run the same command again to retry"), which Airflow
    retries and which sends nothing."""
    from curate.pipeline.runner import BudgetReached

    d = _generate_pipeline(tmp_path, echo_server, max_requests=5)
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    r = _cli("run", "-q", cfg)
    assert r.returncode == 3, r.stderr
    assert "step 'gen' reached its budget (max_requests=5" in r.stderr
    assert f"raise options.max_requests of step 'gen' in {cfg}" in r.stderr
    assert "7 row(s) in 1 task(s) were not sent" in r.stderr and "Run the same command again to retry" not in r.stderr
    assert len(echo_server.seen) == 5
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["complete"] is False and stats["failure"]["kind"] == "budget"
    r = _cli("run", "-q", cfg)          # the same budget: nothing is sent, the same exit code
    assert r.returncode == 3 and len(echo_server.seen) == 5
    with pytest.raises(BudgetReached):
        run_pipeline(d, progress=False)
    d["stages"][0]["options"]["max_requests"] = 50        # raised: the run finishes
    r = _cli("run", "-q", write_yaml(cfg, d))
    assert r.returncode == 0, r.stderr
    assert pq.read_table(str(tmp_path / "out" / "gen")).num_rows == 12


def test_scheduler_policy_does_not_retry_budget_or_invalid(tmp_path):
    """What curate.airflow does with each exit code (checked without Airflow installed)."""
    from curate import exit_codes

    assert exit_codes.retry_policy(0) == "ok"
    assert exit_codes.retry_policy(exit_codes.BUDGET) == "fail"
    assert exit_codes.retry_policy(exit_codes.INVALID) == "fail"
    for code in (exit_codes.FAILED, exit_codes.LOCKED, exit_codes.TERMINATED, 137):
        assert exit_codes.retry_policy(code) == "retry", code

    # curate.airflow's helper with stand-ins for the two Airflow exceptions it raises
    import importlib
    import sys
    import types

    class AirflowException(Exception):
        pass

    class AirflowFailException(AirflowException):
        pass

    sdk = types.ModuleType("airflow.sdk")
    sdk.BaseOperator = object
    exc_mod = types.ModuleType("airflow.sdk.exceptions")
    exc_mod.AirflowException, exc_mod.AirflowFailException = AirflowException, AirflowFailException
    fake = {"airflow": types.ModuleType("airflow"), "airflow.sdk": sdk, "airflow.sdk.exceptions": exc_mod}
    saved = {k: sys.modules.get(k) for k in [*fake, "curate.airflow"]}
    sys.modules.update(fake)
    sys.modules.pop("curate.airflow", None)
    try:
        af = importlib.import_module("curate.airflow")
        af.raise_for_exit_code(0, "run")
        for code, no_retry in ((3, True), (2, True), (1, False), (4, False), (143, False)):
            with pytest.raises(AirflowException) as e:
                af.raise_for_exit_code(code, "run")
            assert isinstance(e.value, AirflowFailException) == no_retry, code
        with pytest.raises(AirflowFailException, match="budget reached.*exit code 3.*not retried"):
            af.raise_for_exit_code(3, "run")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.mark.slow
def test_no_secret_from_the_environment_reaches_any_written_file(tmp_path, echo_server):
    """``${VAR}`` values were written expanded to ``_curate/pipeline.json``."""
    secret = "sk-THIS-IS-A-SECRET-4f9c2e"
    d = _generate_pipeline(tmp_path, echo_server, n=6)
    d["engines"]["api"].update({"api_key_env": "CURATE_TEST_KEY", "extra_body": {"user": "${CURATE_TEST_SECRET}"}})
    d["plugins"] = ["runner_stages"]
    d["stages"].insert(0, {"stage": "explode", "options": {"bad_word": "${CURATE_TEST_SECRET}"}})
    d["stages"][1]["input"] = "explode"
    cfg = write_yaml(str(tmp_path / "p.yaml"), d)
    env = {"CURATE_TEST_KEY": secret, "CURATE_TEST_SECRET": secret}
    r = subprocess.run([curate_bin(), "run", cfg], capture_output=True, text=True, timeout=300,
                       env={**_env(), **env})
    assert r.returncode == 0, r.stderr
    # the secret did its job: sent as the key and in the body
    assert all(auth == f"Bearer {secret}" and body["user"] == secret for auth, body in echo_server.seen)
    assert len(echo_server.seen) == 6
    written = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "out") for f in fs]
    assert any(f.endswith("pipeline.json") for f in written) and any(f.endswith(".sqlite") for f in written)
    for f in written:
        assert secret.encode() not in open(f, "rb").read(), f
    assert secret not in r.stdout + r.stderr
    spec = json.load(open(tmp_path / "out" / "_curate" / "pipeline.json"))
    assert spec["engines"]["api"]["extra_body"] == {"user": "${CURATE_TEST_SECRET}"}
    assert spec["stages"][0]["options"]["bad_word"] == "${CURATE_TEST_SECRET}"
    # what reads pipeline.json back works without the variable: inspect a fused step, the report
    r = subprocess.run([curate_bin(), "inspect", str(tmp_path / "out" / "explode")], capture_output=True,
                       text=True, timeout=120, env=_env())
    assert r.returncode == 0 and "ran fused" in r.stdout, r.stderr
    r = subprocess.run([curate_bin(), "report", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    # a rerun with the same secret skips; another value recomputes (the fingerprint hashes it)
    r = subprocess.run([curate_bin(), "run", "-q", cfg], capture_output=True, text=True, timeout=300,
                       env={**_env(), **env})
    assert r.returncode == 0 and len(echo_server.seen) == 6
    r = subprocess.run([curate_bin(), "run", "-q", cfg], capture_output=True, text=True, timeout=300,
                       env={**_env(), **env, "CURATE_TEST_SECRET": "another-value"})
    assert r.returncode == 0 and len(echo_server.seen) == 12
    for f in [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "out") for f in fs]:
        data = open(f, "rb").read()
        assert secret.encode() not in data and b"another-value" not in data, f


def test_the_same_input_in_two_folders_gives_byte_identical_shards(tmp_path):
    """Ids (and sources) came from absolute input paths, so the same files gave other
    ids on a host and in a container. Now they come from the path under the input root."""
    import shutil

    src = tmp_path / "src"
    os.makedirs(src / "pq" / "sub")
    os.makedirs(src / "texts" / "deeper")
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(5)]}), str(src / "pq" / "a.parquet"))
    pq.write_table(pa.table({"text": [f"nested row {i}" for i in range(5)]}), str(src / "pq" / "sub" / "a.parquet"))
    with open(src / "docs.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"json line {i}"}) + "\n")
    (src / "texts" / "a.txt").write_text("a plain text file\n")
    (src / "texts" / "deeper" / "a.txt").write_text("another plain text file\n")
    outs = []
    for where in ("host/data", "container/mnt/elsewhere"):
        root = tmp_path / where
        shutil.copytree(src, root)            # copy2: the same bytes and mtimes
        d = {"name": "ids", "output": str(tmp_path / where.replace("/", "_")), "workers": 1,
             "inputs": {"p": {"stage": "read_parquet", "options": {"paths": str(root / "pq")}},
                        "j": {"stage": "read_jsonl", "options": {"paths": str(root / "*.jsonl")}},
                        "f": {"stage": "read_files", "options": {"paths": [str(root / "texts")]}}}}
        run_pipeline(d, progress=False)
        outs.append(d["output"])
    for step in ("p", "j", "f"):
        a, b = read_step(outs[0], step), read_step(outs[1], step)
        assert list(a) == list(b) and a
        for name in a:
            fa, fb = (open(os.path.join(o, step, name), "rb").read() for o in outs)
            assert fa == fb, (step, name)
    # outputs written with the older (absolute) ids are recomputed, not mixed with these
    from curate.stages.sources.read_parquet import ReadParquet
    assert ReadParquet(paths=str(src / "pq")).fingerprint_extra().startswith("ids:relative|")
    rows = pa.concat_tables(read_step(outs[0], "p").values()).to_pylist()
    assert len({r["id"] for r in rows}) == 10          # same file name in two folders: other ids
    assert {r["source"] for r in rows} == {"a.parquet", "sub/a.parquet"}
    files = pa.concat_tables(read_step(outs[0], "f").values()).to_pylist()
    assert sorted(r["source"] for r in files) == ["a.txt", "deeper/a.txt"]
    assert pa.concat_tables(read_step(outs[0], "j").values()).column("source").to_pylist() == ["docs.jsonl"] * 5


def test_the_threshold_is_judged_on_the_whole_step_not_on_its_first_tasks(tmp_path):
    """1 error in the first task of 20 documents is 5% so far but 1 in 300 (0.3%) in the step:
    the run finishes. A step where most documents fail still stops early."""
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"text": [f"first {i}" + (" EXPLODE" if i == 3 else "") for i in range(20)]}),
                   str(tmp_path / "in" / "a.parquet"))
    for name in ("b", "c"):
        pq.write_table(pa.table({"text": [f"{name} {i}" for i in range(140)]}), str(tmp_path / "in" / f"{name}.parquet"))
    d = {"name": "x", "output": str(tmp_path / "out"), "workers": 1, "plugins": ["runner_stages"],
         "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
         "stages": [{"stage": "explode"}]}
    res = run_pipeline(d, progress=False)
    assert res.complete and res.stats["explode"]["errors"] == {"exception/ValueError": 1}
    assert res.stats["explode"]["out"] == 299
    d["stages"][0]["options"] = {"bad_word": " "}            # everything fails: stops after the first task
    with pytest.raises(PipelineError, match="20 of 20 documents failed"):
        run_pipeline({**d, "output": str(tmp_path / "out2")}, progress=False)
