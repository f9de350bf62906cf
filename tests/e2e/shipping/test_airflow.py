"""docker/airflow_dag.py under a real Airflow (`airflow dags test`: SQLite metadata in a temp
AIRFLOW_HOME, no scheduler), from the Airflow venv made by docker/setup_airflow_venv.sh.

- a valid pipeline: `validate`, then `run`; a row fails transiently in the first try (exit code 1),
  Airflow retries, and the retry resumes (the finished task is not redone) to a complete output;
- an invalid pipeline (exit code 2) fails at once, without retries, also for a task that has some;
- the same DAG in the CPU image through Podman's Docker-compatible socket (also marked `container`).

Only with CURATE_AIRFLOW_TESTS=1 (`make airflow-test`)."""

import json
import os
import shutil
import sqlite3
import subprocess
import textwrap

import pyarrow.parquet as pq
import pytest

from podman_util import ROOT, podman

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

PLUGINS = os.path.join(ROOT, "tests", "plugins")

PIPELINE = """name: airflow-test
output: out
workers: 1
{plugins}
inputs:
  docs: {{stage: read_jsonl, options: {{paths: ["docs/*.jsonl"]}}}}
stages:
{flaky}  - stage: exact_dedup
"""
FLAKY = """  - stage: word_count
  - stage: flaky                 # rows whose word count is a multiple of 7 fail once (exit code 1)
    options: {state_dir: flaky_state}
"""
# the run task alone, with retries: exit code 2 must still fail it at once
RUN_ONLY_DAG = """
import os
from datetime import datetime, timedelta
from airflow import DAG
from docker.types import Mount
from curate.airflow import CurateOperator, curate_docker_operator

with DAG("curate_run_only", start_date=datetime(2026, 1, 1), schedule=None):
    CurateOperator(task_id="run", command="run", pipeline=os.path.join(os.environ["CURATE_DATA_DIR"], "bad.yaml"),
                   retries=3, retry_delay=timedelta(0))

with DAG("curate_run_only_container", start_date=datetime(2026, 1, 1), schedule=None):
    curate_docker_operator(task_id="run", image=os.environ.get("CURATE_IMAGE", "curate:cpu"),
                           command=["run", "/data/bad.yaml"], docker_url=os.environ.get("CURATE_DOCKER_URL"),
                           mounts=[Mount(source=os.environ["CURATE_DATA_DIR"], target="/data", type="bind")],
                           mount_tmp_dir=False, auto_remove="force", retries=3, retry_delay=timedelta(0))
"""


def write_data(folder, *, flaky=True, invalid=False):
    """Two JSONL files (two tasks); only rows of the second have a word count that is a multiple of 7."""
    os.makedirs(os.path.join(folder, "docs"), exist_ok=True)
    os.chmod(folder, 0o777)  # the image's user writes here too
    for part, counts in (("a", [3, 4, 5, 6, 8, 9, 10, 11]), ("b", [12, 13, 14, 15, 20, 21, 22, 28])):
        with open(os.path.join(folder, "docs", f"{part}.jsonl"), "w") as f:
            for i, n in enumerate(counts):
                words = [f"{part}{i}w{j}" for j in range(n)]
                f.write(json.dumps({"id": f"{part}{i}", "text": " ".join(words)}) + "\n")
    body = PIPELINE.format(plugins="plugins: [runner_stages]" if flaky else "", flaky=FLAKY if flaky else "")
    with open(os.path.join(folder, "pipeline.yaml"), "w") as f:
        f.write(body)
    with open(os.path.join(folder, "bad.yaml"), "w") as f:
        f.write(body.replace("stage: exact_dedup", "stage: exact_dedupe"))


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory, airflow_bin):
    home = tmp_path_factory.mktemp("airflow_home")
    dags = home / "dags"
    dags.mkdir()
    shutil.copy(os.path.join(ROOT, "docker", "airflow_dag.py"), dags)
    (dags / "run_only_dag.py").write_text(textwrap.dedent(RUN_ONLY_DAG))
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "CURATE_RETRY_DELAY_SECONDS": "0",
           # this checkout's curate (and the test plugins) before the copy installed in the venv
           "PYTHONPATH": os.pathsep.join([ROOT, PLUGINS])}
    r = subprocess.run([airflow_bin, "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return env


def dags_test(airflow_bin, env, dag_id, data, **extra):
    env = {**env, "CURATE_DATA_DIR": str(data), **extra}
    r = subprocess.run([airflow_bin, "dags", "test", dag_id], env=env, capture_output=True, text=True, timeout=900)
    db = sqlite3.connect(os.path.join(env["AIRFLOW_HOME"], "airflow.db"))
    run_id = db.execute("select run_id from dag_run where dag_id = ? order by id desc limit 1", (dag_id,)).fetchone()[0]
    tis = {t: (s, n, m) for t, s, n, m in db.execute(
        "select task_id, state, try_number, max_tries from task_instance where dag_id = ? and run_id = ?",
        (dag_id, run_id))}
    db.close()
    return r, tis


def rows(out, step):
    return sorted(pq.read_table(str(out / step)).column("id").to_pylist())


def test_dag_helper_builds_both_flavours(airflow_bin, airflow_home):
    """curate.airflow.curate_tasks: the tasks, their order, retries and container settings."""
    check = textwrap.dedent("""
        import os, sys
        from airflow.dag_processing.dagbag import DagBag
        from curate.airflow import CurateDockerOperator, CurateOperator, raise_for_exit_code
        from airflow.sdk.exceptions import AirflowException, AirflowFailException
        bag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        assert not bag.import_errors, bag.import_errors
        plain, box = bag.dags["curate_pipeline"], bag.dags["curate_pipeline_container"]
        for dag in (plain, box):
            v, r = dag.get_task("validate"), dag.get_task("run")
            assert (v.retries, r.retries) == (0, 3), (v.retries, r.retries)
            assert r.upstream_task_ids == {"validate"} and not v.upstream_task_ids
        assert isinstance(plain.get_task("run"), CurateOperator)
        assert plain.get_task("run").pipeline == "/srv/data/pipeline.yaml"
        d = box.get_task("run")
        assert isinstance(d, CurateDockerOperator) and d.image == "curate:test"
        assert d.command == ["run", "/data/pipeline.yaml", "--quiet"] and d.docker_url == "unix:///x.sock"
        assert [(m["Source"], m["Target"]) for m in d.mounts] == [("/srv/data", "/data")]
        # one active run per DAG (= per output), one run task at a time
        for dag in (plain, box):
            assert dag.max_active_runs == 1 and dag.get_task("run").max_active_tis_per_dag == 1
        # secrets: the real DockerOperator's private_environment, never a template field
        from curate.airflow import curate_dag
        os.environ["AWS_SECRET_ACCESS_KEY"] = "worker-secret"
        s = curate_dag("secrets", "/data/p.yaml", image="curate:test", secrets={"OPENAI_API_KEY": "sk-x"},
                       pass_env=["AWS_SECRET_ACCESS_KEY"], env={"CURATE_LOG_FORMAT": "json"}).get_task("run")
        assert s._private_environment == {"OPENAI_API_KEY": "sk-x"} and s.environment == {"CURATE_LOG_FORMAT": "json"}
        assert "private_environment" not in s.template_fields and "_private_environment" not in s.template_fields
        assert s.pass_env == ["AWS_SECRET_ACCESS_KEY"]
        # on_kill before the container exists does nothing (the provider's client is not even made)
        s.on_kill()
        raise_for_exit_code(0, "x")
        for code, exc in ((2, AirflowFailException), (3, AirflowFailException), (1, AirflowException),
                          (137, AirflowException)):
            try:
                raise_for_exit_code(code, "x")
            except exc as e:
                assert isinstance(e, AirflowFailException) == (code in (2, 3)), (code, type(e))
            else:
                sys.exit(f"no exception for {code}")
        print("ok")
        """)
    python = os.path.join(os.path.dirname(airflow_bin), "python")
    env = {**airflow_home, "CURATE_DATA_DIR": "/srv/data", "CURATE_IMAGE": "curate:test",
           "CURATE_DOCKER_URL": "unix:///x.sock"}
    r = subprocess.run([python, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


def test_plain_dag_retry_resumes(airflow_bin, airflow_home, tmp_path):
    data = tmp_path / "data"
    write_data(str(data))
    r, tis = dags_test(airflow_bin, airflow_home, "curate_pipeline", data)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert tis["validate"] == ("success", 1, 0)
    assert tis["run"] == ("success", 2, 3)          # the first try failed with exit code 1
    assert "failed with exit code 1; a retry resumes the run" in r.stdout + r.stderr
    stats = json.load(open(data / "out" / "stats.json"))["steps"]
    # the retry ran only the task with the failed rows: file a.jsonl was not read again
    assert stats["flaky"]["status"] == "resumed" and stats["docs"]["status"] == "resumed"
    assert stats["docs"]["out"] == 16 and stats["flaky"]["errors"] == {}
    assert rows(data / "out", "exact_dedup") == sorted([f"a{i}" for i in range(8)] + [f"b{i}" for i in range(8)])
    assert len(os.listdir(data / "flaky_state")) == 3   # 14, 21, 28 words: failed once each


def test_plain_dag_invalid_pipeline_is_not_retried(airflow_bin, airflow_home, tmp_path):
    data = tmp_path / "data"
    write_data(str(data))
    r, tis = dags_test(airflow_bin, airflow_home, "curate_pipeline", data, CURATE_PIPELINE_FILE="bad.yaml")
    assert r.returncode != 0
    assert tis == {"validate": ("failed", 1, 0), "run": ("upstream_failed", 0, 3)}
    assert "invalid pipeline (exit code 2), not retried" in r.stdout + r.stderr
    assert "unknown stage 'exact_dedupe'" in r.stdout + r.stderr
    # a run task with retries left still fails at once on exit code 2
    r, tis = dags_test(airflow_bin, airflow_home, "curate_run_only", data)
    assert r.returncode != 0 and tis == {"run": ("failed", 1, 3)}
    assert not (data / "out").exists()


@pytest.mark.container
def test_container_dag(airflow_bin, airflow_home, cpu_image, podman_socket, tmp_path):
    image, _ = cpu_image
    data = tmp_path / "data"
    write_data(str(data), flaky=False)  # the test plugins are not in the image
    extra = {"CURATE_IMAGE": image, "CURATE_DOCKER_URL": podman_socket, "CURATE_AUTO_REMOVE": "force"}
    containers = podman("ps", "-a", "-q", "--filter", f"ancestor={image}").stdout.split()
    r, tis = dags_test(airflow_bin, airflow_home, "curate_pipeline_container", data, **extra)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert tis == {"validate": ("success", 1, 0), "run": ("success", 1, 3)}
    assert rows(data / "out", "exact_dedup") == sorted([f"a{i}" for i in range(8)] + [f"b{i}" for i in range(8)])
    stats = json.load(open(data / "out" / "stats.json"))["steps"]
    assert all(s["status"] == "done" for s in stats.values())

    r, tis = dags_test(airflow_bin, airflow_home, "curate_pipeline_container", data, CURATE_PIPELINE_FILE="bad.yaml",
                       **extra)
    assert r.returncode != 0 and tis == {"validate": ("failed", 1, 0), "run": ("upstream_failed", 0, 3)}
    r, tis = dags_test(airflow_bin, airflow_home, "curate_run_only_container", data, **extra)
    assert r.returncode != 0 and tis == {"run": ("failed", 1, 3)}
    assert "invalid pipeline (exit code 2), not retried" in r.stdout + r.stderr
    assert podman("ps", "-a", "-q", "--filter", f"ancestor={image}").stdout.split() == containers  # none left
