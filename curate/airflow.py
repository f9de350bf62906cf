"""Airflow tasks that run a curate pipeline: ``validate``, then ``run``, with curate's exit codes
mapped to Airflow's retry policy (``pip install 'curate[airflow]'``).

``curate`` exits with 0 (done), 1 (the run failed: a lost worker, an endpoint down, rows that failed
transiently; a rerun resumes from the finished shards), 2 (an invalid pipeline file: retrying
cannot help), 3 (an LLM budget was reached: a rerun with the same budget sends nothing) or 4 (the
output is locked by another live run). Here exit codes 2 and 3 fail the task at once, without its
retries (``AirflowFailException``), and any other non-zero code fails the try, so Airflow retries
it and the rerun of ``curate run`` skips the finished work (``curate.exit_codes.retry_policy``).

Two flavours, the same two tasks::

    from curate.airflow import curate_tasks

    with DAG("corpus", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        # workers that have curate installed
        validate, run = curate_tasks("/srv/curate/pipeline.yaml", retries=3)
        # or in the curate image, through a Docker (or Podman) socket
        validate, run = curate_tasks("/data/pipeline.yaml", image="curate:cpu",
                                     mounts=[Mount(source="/srv/curate", target="/data", type="bind")])
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

try:  # Airflow 3
    from airflow.sdk import BaseOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # pragma: no cover - Airflow 2
    from airflow.exceptions import AirflowException, AirflowFailException
    from airflow.models import BaseOperator

from curate.exit_codes import BUDGET, INVALID, retry_policy

INVALID_PIPELINE = INVALID


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
    so the worker's own environment); ``env`` adds environment variables to the worker's; ``cwd``
    (default: the pipeline file's folder, like the image's /data) is where relative paths resolve.
    Output goes to the task log; the exit code decides retry or not (see the module docstring).
    """

    template_fields: Sequence[str] = ("pipeline", "args", "env", "cwd")

    def __init__(self, *, command: str, pipeline: str, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, curate_bin: Sequence[str] | None = None,
                 cwd: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.pipeline = pipeline
        self.args = list(args)
        self.env = dict(env or {})
        self.curate_bin = list(curate_bin) if curate_bin else [sys.executable, "-m", "curate.cli"]
        self.cwd = cwd

    def execute(self, context: Any) -> None:
        argv = [*self.curate_bin, self.command, self.pipeline, *self.args]
        cwd = self.cwd or os.path.dirname(os.path.abspath(self.pipeline))
        self.log.info("running %s (in %s)", " ".join(argv), cwd)
        proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **self.env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        last: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            self.log.info("%s", line)
            last = (last + [line])[-5:]
        code = proc.wait()
        raise_for_exit_code(code, f"curate {self.command} {self.pipeline}", " | ".join(last))


@functools.cache
def _docker_operator_class():
    from airflow.providers.docker.exceptions import DockerContainerFailedException
    from airflow.providers.docker.operators.docker import DockerOperator

    class CurateDockerOperator(DockerOperator):
        """``DockerOperator`` running the curate image, with curate's exit codes mapped as above.

        ``docker_url`` may point at Podman's Docker-compatible socket
        (``podman system service --time=0 unix:///run/podman/podman.sock``).
        """

        def execute(self, context: Any) -> Any:
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
                 env: dict[str, str] | None = None, task_prefix: str = "", **operator_kwargs: Any):
    """Two chained tasks, ``<prefix>validate >> <prefix>run``, for the pipeline file ``pipeline``.

    Without ``image`` they run ``curate`` on the worker (``CurateOperator``; ``curate_bin`` may be
    given); with ``image`` they run it in that image (``CurateDockerOperator``: pass ``mounts``,
    ``docker_url``, ``user``... in ``operator_kwargs``; ``pipeline`` is then a path in the
    container). ``validate`` is never retried; ``run`` is retried ``retries`` times after
    ``retry_delay``, except on exit code 2. Call inside a ``with DAG(...)`` block.
    """
    if image is None:
        def make(task_id, command, args, tries):
            return CurateOperator(task_id=task_prefix + task_id, command=command, pipeline=pipeline, args=args,
                                  env=env, retries=tries, retry_delay=retry_delay, **operator_kwargs)
    else:
        operator = _docker_operator_class()
        operator_kwargs.setdefault("auto_remove", "success")
        operator_kwargs.setdefault("mount_tmp_dir", False)

        def make(task_id, command, args, tries):
            return operator(task_id=task_prefix + task_id, image=image, command=[command, pipeline, *args],
                            environment=dict(env or {}), retries=tries, retry_delay=retry_delay,
                            **operator_kwargs)
    validate = make("validate", "validate", (), 0)
    run = make("run", "run", tuple(run_args), retries)
    validate >> run
    return validate, run
