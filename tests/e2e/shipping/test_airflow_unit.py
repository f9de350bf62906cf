"""curate.airflow in the default suite: the DAG factory's defaults, secrets, on_kill and the exit
code policy. Airflow itself is not installed here: the real Airflow is used when importable,
otherwise the stand-in in tests/e2e/shipping/fake_airflow (see its docstring) — curate's own code,
the subprocesses it starts and the signals it sends are real either way. The full Airflow runs
(`airflow dags test`, the container DAG) are in test_airflow.py (CURATE_AIRFLOW_TESTS=1)."""

import importlib
import os
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest

from podman_util import ROOT

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_airflow")


@pytest.fixture
def af():
    """curate.airflow imported against the real Airflow if there is one, else the stand-in."""
    saved = {k: v for k, v in sys.modules.items() if k == "airflow" or k.startswith("airflow.")
             or k == "curate.airflow"}
    try:
        importlib.import_module("airflow.sdk")
        fake = False
    except ImportError:
        for k in saved:
            sys.modules.pop(k, None)
        sys.path.insert(0, FAKE)
        fake = True
    sys.modules.pop("curate.airflow", None)
    try:
        yield importlib.import_module("curate.airflow")
    finally:
        if fake:
            sys.path.remove(FAKE)
            for k in [k for k in sys.modules if k == "airflow" or k.startswith("airflow.")]:
                del sys.modules[k]
        sys.modules.pop("curate.airflow", None)
        sys.modules.update(saved)


def test_exit_codes_2_and_3_are_not_retried(af):
    from curate.exit_codes import BUDGET, FAILED, INVALID, LOCKED, TERMINATED

    af.raise_for_exit_code(0, "x")
    for code in (INVALID, BUDGET):
        with pytest.raises(af.AirflowFailException, match=f"exit code {code}\\), not retried"):
            af.raise_for_exit_code(code, "curate run p.yaml")
    for code in (FAILED, LOCKED, TERMINATED, 137):
        with pytest.raises(af.AirflowException) as info:
            af.raise_for_exit_code(code, "curate run p.yaml")
        assert not isinstance(info.value, af.AirflowFailException), code


def test_curate_dag_defaults_one_active_run_per_output(af):
    dag = af.curate_dag("corpus", "/srv/curate/pipeline.yaml", retries=2, retry_delay=timedelta(seconds=5))
    assert dag.max_active_runs == 1 and dag.catchup is False and "curate" in dag.tags
    v, r = dag.get_task("validate"), dag.get_task("run")
    assert isinstance(r, af.CurateOperator) and r.pipeline == "/srv/curate/pipeline.yaml"
    assert (v.retries, r.retries) == (0, 2) and r.upstream_task_ids == {"validate"}
    assert r.max_active_tis_per_dag == 1 and r.args == ["--quiet"]
    assert af.curate_dag("wide", "/p.yaml", max_active_runs=3).max_active_runs == 3


def test_docker_secrets_go_to_private_environment(af, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret-value")
    monkeypatch.delenv("NOT_SET_ON_WORKER", raising=False)
    dag = af.curate_dag("box", "/data/pipeline.yaml", image="curate:cpu", env={"CURATE_LOG": "1"},
                        secrets={"OPENAI_API_KEY": "sk-secret"}, pass_env=["AWS_SECRET_ACCESS_KEY", "NOT_SET_ON_WORKER"])
    run = dag.get_task("run")
    assert isinstance(run, af.CurateDockerOperator) and run.auto_remove == "success"
    assert run.command == ["run", "/data/pipeline.yaml", "--quiet"]
    # what the UI renders (template fields) holds no secret
    shown = {f: getattr(run, f) for f in run.template_fields}
    assert "sk-secret" not in repr(shown) and "s3-secret-value" not in repr(shown)
    assert run.environment == {"CURATE_LOG": "1"} and run._private_environment == {"OPENAI_API_KEY": "sk-secret"}

    # at run time the container gets all of them (the worker's values of pass_env, read then)
    client = FakeDockerClient(status=0)
    run.cli = client
    run.execute({})
    assert client.created["environment"] == {"CURATE_LOG": "1", "OPENAI_API_KEY": "sk-secret",
                                             "AWS_SECRET_ACCESS_KEY": "s3-secret-value"}


class FakeDockerClient:
    """Records the Docker API calls of the operator (no Docker daemon here)."""

    def __init__(self, status):
        self.status = status
        self.created = None
        self.stopped = []
        self.removed = []

    def create_container(self, **kw):
        self.created = kw
        return {"Id": "c0ffee"}

    def start(self, cid):
        pass

    def logs(self, cid):
        return ["line 1", "error: budget reached"]

    def wait(self, cid):
        return {"Error": None, "StatusCode": self.status}

    def stop(self, cid, timeout=None):
        self.stopped.append((cid, timeout))

    def remove_container(self, cid, force=False):
        self.removed.append((cid, force))


@pytest.mark.parametrize("status,fails_at_once", [(3, True), (2, True), (1, False), (4, False)])
def test_docker_exit_codes(af, status, fails_at_once):
    dag = af.curate_dag("box", "/data/pipeline.yaml", image="curate:cpu")
    run = dag.get_task("run")
    run.cli = FakeDockerClient(status)
    with pytest.raises(af.AirflowException) as info:
        run.execute({})
    assert isinstance(info.value, af.AirflowFailException) == fails_at_once
    assert f"exit code {status}" in str(info.value) and "error: budget reached" in str(info.value)


def test_docker_on_kill_stops_the_container_with_a_grace_period(af):
    op = af.curate_docker_operator(task_id="run", image="curate:cpu", command=["run", "/data/p.yaml"],
                                   auto_remove="force", stop_grace_seconds=45)
    op.cli = FakeDockerClient(0)
    op.on_kill()                      # nothing started yet: nothing to stop
    assert op.cli.stopped == []
    op.container = {"Id": "c0ffee"}
    op.on_kill()
    assert op.cli.stopped == [("c0ffee", 45)] and op.cli.removed == [("c0ffee", True)]


SLOW_CURATE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    mode = sys.argv[1]
    if mode == "graceful":
        def stop(*_):
            print("SIGTERM: finished shards are kept", flush=True)
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
    else:                                   # a stuck run: ignores SIGTERM and has a worker
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(f"worker {child.pid}", flush=True)
    print("started", flush=True)
    time.sleep(120)
""")


def _run_and_kill(af, tmp_path, mode, grace):
    script = tmp_path / "slow_curate.py"
    script.write_text(SLOW_CURATE)
    lines = []
    op = af.CurateOperator(task_id="run", command=mode, pipeline=str(tmp_path / "p.yaml"),
                           curate_bin=[sys.executable, str(script)], stop_grace_seconds=grace)
    op.log = type("L", (), {"info": lambda self, fmt, *a: lines.append(fmt % a),
                            "warning": lambda self, fmt, *a: lines.append(fmt % a)})()
    err = []
    t = threading.Thread(target=lambda: err.append(_catch(op.execute, {})))
    t.start()
    deadline = time.time() + 30
    while "started" not in lines and time.time() < deadline:
        time.sleep(0.05)
    assert "started" in lines, lines
    t0 = time.time()
    op.on_kill()
    t.join(30)
    return lines, err[0], time.time() - t0


def _catch(fn, *a):
    try:
        fn(*a)
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def test_on_kill_sends_sigterm_and_curate_exits(af, tmp_path):
    lines, exc, took = _run_and_kill(af, tmp_path, "graceful", grace=30)
    assert "SIGTERM: finished shards are kept" in lines and took < 10
    # exit code 143 (terminated): a later retry resumes
    assert isinstance(exc, af.AirflowException) and not isinstance(exc, af.AirflowFailException)
    assert "exit code 143" in str(exc)


def test_on_kill_sigkills_a_stuck_run_and_its_workers(af, tmp_path):
    lines, exc, took = _run_and_kill(af, tmp_path, "stuck", grace=1)
    worker = int(next(line for line in lines if line.startswith("worker ")).split()[1])
    assert 1 <= took < 10 and "exit code -9" in str(exc)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        # a zombie until its parent (already dead) is reaped by init: check its state
        try:
            if open(f"/proc/{worker}/stat").read().split()[2] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {worker} of the killed run is still alive")


def test_example_dag_file(af, monkeypatch):
    """docker/airflow_dag.py: both DAGs with one active run each, secrets passed hidden."""
    pytest.importorskip("docker")
    monkeypatch.setenv("CURATE_DATA_DIR", "/srv/data")
    monkeypatch.setenv("CURATE_PASS_ENV", "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY")
    ns = {}
    path = os.path.join(ROOT, "docker", "airflow_dag.py")
    exec(compile(open(path).read(), path, "exec"), ns)
    dags = {d.dag_id: d for d in ns.values() if hasattr(d, "task_dict") and hasattr(d, "dag_id")}
    assert set(dags) == {"curate_pipeline", "curate_pipeline_container"}
    for dag in dags.values():
        assert dag.max_active_runs == 1
        assert dag.get_task("run").max_active_tis_per_dag == 1
    box = dags["curate_pipeline_container"].get_task("run")
    assert box.pass_env == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] and box.environment == {}
