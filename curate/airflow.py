"""Airflow tasks that run a curate pipeline: ``validate``, then ``run``, with curate's exit codes
mapped to Airflow's retry policy (``pip install 'curate[airflow]'``).

``curate`` exits with 0 (done), 1 (the run failed: a lost worker, an endpoint down, rows that failed
transiently; a rerun resumes from the finished shards), 2 (an invalid pipeline file: retrying
cannot help), 3 (an LLM budget was reached: a rerun with the same budget sends nothing) or 4 (the
output is locked by another live run). Here exit codes 2 and 3 fail the task at once, without its
retries (``AirflowFailException``), and any other non-zero code fails the try, so Airflow retries
it and the rerun of ``curate run`` skips the finished work (``curate.exit_codes.retry_policy``).

Two flavours, the same two tasks::

    from curate.airflow import curate_dag, curate_tasks

    # one pipeline (one output), one DAG: max_active_runs=1, so runs never race for the output
    dag = curate_dag("corpus", "/srv/curate/pipeline.yaml", retries=3)

    # or the tasks in a DAG of your own
    with DAG("corpus_box", schedule=None, start_date=datetime(2026, 1, 1), max_active_runs=1):
        # in the curate image, through a Docker (or Podman) socket
        validate, run = curate_tasks("/data/pipeline.yaml", image="curate:cpu",
                                     pass_env=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
                                     mounts=[Mount(source="/srv/curate", target="/data", type="bind")])

Secrets (API keys, AWS credentials) reach the container through the Docker operator's
``private_environment``, never ``environment``: ``pass_env`` names variables of the worker's
environment (read when the task runs, so they are in no DAG file), ``secrets`` gives values. A
worker process (no image) inherits the worker's environment; ``secrets`` adds to it. Neither is a
template field, so the UI's "Rendered Template" view never shows them (``env`` is for settings
that may be shown). A killed task (marked failed in the UI, a timeout) stops curate: the process
gets SIGTERM (the run keeps what finished and exits 143), the container ``docker stop`` with a
grace period, then SIGKILL.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

try:  # Airflow 3
    from airflow.sdk import BaseOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # pragma: no cover - Airflow 2
    from airflow.exceptions import AirflowException, AirflowFailException
    from airflow.models import BaseOperator

from curate.exit_codes import BUDGET, INVALID, retry_policy

INVALID_PIPELINE = INVALID
#: seconds a killed task gives curate to write what finished before SIGKILL
STOP_GRACE_SECONDS = 60


def raise_for_exit_code(code: int, what: str, detail: str = "") -> None:
    """Nothing for 0; ``AirflowFailException`` (no retry) for 2 (invalid pipeline) and 3 (budget
    reached); ``AirflowException`` (retried) otherwise."""
    policy = retry_policy(code)
    if policy == "ok":
        return
    tail = f": {detail}" if detail else ""
    if policy == "fail":
        why = {INVALID: "invalid pipeline", BUDGET: "LLM budget reached; raise it in the pipeline file"}[code]
        raise AirflowFailException(f"{what}: {why} (exit code {code}), not retried{tail}")
    raise AirflowException(f"{what}: failed with exit code {code}; a retry resumes the run{tail}")


class CurateOperator(BaseOperator):
    """Runs ``curate <command> <pipeline> [args]`` on the worker (curate installed there).

    ``curate_bin`` is the command that starts curate (default: this Python with ``-m curate.cli``,
    so the worker's own environment); ``env`` adds environment variables to the worker's (a
    template field: shown in the UI), ``secrets`` too (not a template field: never shown); ``cwd``
    (default: the pipeline file's folder, like the image's /data) is where relative paths resolve.
    Output goes to the task log; the exit code decides retry or not (see the module docstring).
    ``on_kill`` sends curate SIGTERM (it keeps what finished and exits), then SIGKILL to its
    process group after ``stop_grace_seconds``.
    """

    template_fields: Sequence[str] = ("pipeline", "args", "env", "cwd")

    def __init__(self, *, command: str, pipeline: str, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
                 curate_bin: Sequence[str] | None = None, cwd: str | None = None,
                 stop_grace_seconds: float = STOP_GRACE_SECONDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.pipeline = pipeline
        self.args = list(args)
        self.env = dict(env or {})
        self._secrets = dict(secrets or {})
        self.curate_bin = list(curate_bin) if curate_bin else [sys.executable, "-m", "curate.cli"]
        self.cwd = cwd
        self.stop_grace_seconds = stop_grace_seconds
        self._proc: subprocess.Popen | None = None

    def execute(self, context: Any) -> None:
        argv = [*self.curate_bin, self.command, self.pipeline, *self.args]
        cwd = self.cwd or os.path.dirname(os.path.abspath(self.pipeline))
        self.log.info("running %s (in %s)", " ".join(argv), cwd)
        # its own process group: on_kill reaches curate's workers too
        proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **self.env, **self._secrets},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self._proc = proc
        last: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            self.log.info("%s", line)
            last = (last + [line])[-5:]
        code = proc.wait()
        raise_for_exit_code(code, f"curate {self.command} {self.pipeline}", " | ".join(last))

    def on_kill(self) -> None:
        """SIGTERM to curate (it writes what finished and exits 143), SIGKILL to its process group
        if it is still there after ``stop_grace_seconds``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.log.info("stopping curate (pid %d): SIGTERM, SIGKILL after %ss", proc.pid, self.stop_grace_seconds)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            self.log.warning("curate (pid %d) still running after %ss: SIGKILL", proc.pid, self.stop_grace_seconds)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


@functools.cache
def _docker_operator_class():
    from airflow.providers.docker.exceptions import DockerContainerFailedException
    from airflow.providers.docker.operators.docker import DockerOperator

    class CurateDockerOperator(DockerOperator):
        """``DockerOperator`` running the curate image, with curate's exit codes mapped as above.

        ``docker_url`` may point at Podman's Docker-compatible socket
        (``podman system service --time=0 unix:///run/podman/podman.sock``). Secrets go in
        ``private_environment`` (hidden from the UI); ``on_kill`` stops the container with
        ``stop_grace_seconds`` (SIGTERM, then SIGKILL) so that curate keeps what finished.
        """

        def __init__(self, *, stop_grace_seconds: float = STOP_GRACE_SECONDS, pass_env: Sequence[str] = (),
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.stop_grace_seconds = stop_grace_seconds
            self.pass_env = list(pass_env)

        def on_kill(self) -> None:
            container = getattr(self, "container", None)
            if container is None:
                self.log.info("no curate container to stop (it was not created)")
                return
            self.log.info("stopping curate container %s: SIGTERM, SIGKILL after %ss", container["Id"],
                          self.stop_grace_seconds)
            self.cli.stop(container["Id"], timeout=int(self.stop_grace_seconds))
            if self.auto_remove == "force":
                try:
                    self.cli.remove_container(container["Id"], force=True)
                except Exception as exc:  # noqa: BLE001 - already gone
                    self.log.info("container %s not removed: %s", container["Id"], exc)

        def execute(self, context: Any) -> Any:
            # the worker's values of ``pass_env`` (e.g. AWS_*, an API key), read now: hidden like secrets
            missing = [k for k in self.pass_env if k not in os.environ]
            if missing:
                self.log.warning("pass_env: %s not set on this worker", ", ".join(missing))
            self._private_environment.update({k: os.environ[k] for k in self.pass_env if k in os.environ})
            try:
                return super().execute(context)
            except DockerContainerFailedException as exc:
                # the provider's message holds the wait() result: {'StatusCode': N, ...}
                m = re.search(r"['\"]StatusCode['\"]:\s*(\d+)", str(exc))
                if not m:
                    raise
                logs = exc.logs or []
                detail = " | ".join(str(x).rstrip() for x in logs[-5:])
                raise_for_exit_code(int(m.group(1)), f"curate in {self.image}", detail)
                raise

    CurateDockerOperator.__module__ = __name__
    CurateDockerOperator.__qualname__ = "CurateDockerOperator"
    return CurateDockerOperator


def __getattr__(name: str):
    # ``from curate.airflow import CurateDockerOperator`` needs the Docker provider, the rest does not
    if name == "CurateDockerOperator":
        return _docker_operator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def curate_docker_operator(**kwargs: Any):
    """A ``CurateDockerOperator`` (needs ``apache-airflow-providers-docker``)."""
    return _docker_operator_class()(**kwargs)


def curate_tasks(pipeline: str, *, image: str | None = None, retries: int = 3,
                 retry_delay: timedelta = timedelta(minutes=1), run_args: Sequence[str] = ("--quiet",),
                 env: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
                 pass_env: Sequence[str] = (), task_prefix: str = "", **operator_kwargs: Any):
    """Two chained tasks, ``<prefix>validate >> <prefix>run``, for the pipeline file ``pipeline``.

    Without ``image`` they run ``curate`` on the worker (``CurateOperator``; ``curate_bin`` may be
    given); with ``image`` they run it in that image (``CurateDockerOperator``: pass ``mounts``,
    ``docker_url``, ``user``... in ``operator_kwargs``; ``pipeline`` is then a path in the
    container). ``validate`` is never retried; ``run`` is retried ``retries`` times after
    ``retry_delay``, except on exit codes 2 (invalid pipeline) and 3 (LLM budget reached).
    ``env``: environment shown in the UI; ``secrets``: environment hidden from it (the container's
    ``private_environment``); ``pass_env``: names of the worker's environment variables the
    container gets, hidden too (a worker process inherits its whole environment anyway). ``run`` has ``max_active_tis_per_dag=1``: two runs of one DAG never
    write its output at once (curate's lease would stop the second one, exit code 4). Call inside
    a ``with DAG(...)`` block, or use :func:`curate_dag`.
    """
    operator_kwargs.setdefault("max_active_tis_per_dag", 1)
    if image is None:
        def make(task_id, command, args, tries):
            return CurateOperator(task_id=task_prefix + task_id, command=command, pipeline=pipeline, args=args,
                                  env=env, secrets=secrets, retries=tries, retry_delay=retry_delay,
                                  **operator_kwargs)
    else:
        operator = _docker_operator_class()
        operator_kwargs.setdefault("auto_remove", "success")
        operator_kwargs.setdefault("mount_tmp_dir", False)

        def make(task_id, command, args, tries):
            return operator(task_id=task_prefix + task_id, image=image, command=[command, pipeline, *args],
                            environment=dict(env or {}), private_environment=dict(secrets or {}),
                            pass_env=list(pass_env), retries=tries, retry_delay=retry_delay, **operator_kwargs)
    validate = make("validate", "validate", (), 0)
    run = make("run", "run", tuple(run_args), retries)
    validate >> run
    return validate, run


def curate_dag(dag_id: str, pipeline: str, *, schedule: Any = None,
               start_date: datetime = datetime(2026, 1, 1), max_active_runs: int = 1, catchup: bool = False,
               tags: Sequence[str] = ("curate",), dag_kwargs: dict[str, Any] | None = None, **task_kwargs: Any):
    """A DAG holding :func:`curate_tasks` for one pipeline (one output), with ``max_active_runs=1``
    by default: a second scheduled run waits for the first instead of racing it for the output's
    lease. ``task_kwargs`` go to :func:`curate_tasks` (``image``, ``retries``, ``secrets``...)."""
    try:  # Airflow 3
        from airflow.sdk import DAG
    except ImportError:  # pragma: no cover - Airflow 2
        from airflow import DAG
    with DAG(dag_id=dag_id, schedule=schedule, start_date=start_date, max_active_runs=max_active_runs,
             catchup=catchup, tags=list(tags), **(dag_kwargs or {})) as dag:
        curate_tasks(pipeline, **task_kwargs)
    return dag
