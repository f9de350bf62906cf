"""Example Airflow DAGs: validate a curate pipeline, then run it (see README, "Containers and Airflow").

Two DAGs, the same two tasks (curate.airflow.curate_dag: one active run at a time per DAG, so two
runs never write the same output):
- ``curate_pipeline``: on workers that have curate installed (``pip install 'curate[airflow]'``);
- ``curate_pipeline_container``: in the curate image, through a Docker-compatible socket (Docker,
  or Podman's ``podman system service``), with the data folder mounted at /data.

``validate`` is not retried; ``run`` is retried on exit code 1 (the retry resumes: finished shards
and steps are skipped) and 4 (output locked by another run), and fails at once on exit code 2
(invalid pipeline) and 3 (an LLM budget was reached: a retry would send nothing). A killed task
stops curate (SIGTERM, then SIGKILL after a grace period).

Settings (environment of the scheduler / DAG processor):
  CURATE_DATA_DIR       folder holding the pipeline file and its output (default /srv/curate)
  CURATE_PIPELINE_FILE  pipeline file in that folder (default pipeline.yaml)
  CURATE_IMAGE          image of the container DAG (default curate:cpu)
  CURATE_DOCKER_URL     Docker API socket (default $DOCKER_HOST or unix://var/run/docker.sock)
  CURATE_RETRIES, CURATE_RETRY_DELAY_SECONDS   retries of `run` (default 3, after 60 s)
  CURATE_AUTO_REMOVE    remove containers: success (default: failed ones stay to look at), force, never
  CURATE_PASS_ENV       comma-separated names of the worker's environment variables the container
                        gets as secrets (Docker's private_environment, hidden from the UI), e.g.
                        AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,OPENAI_API_KEY
"""

import os
from datetime import timedelta

from docker.types import Mount

from curate.airflow import curate_dag

DATA = os.environ.get("CURATE_DATA_DIR", "/srv/curate")
FILE = os.environ.get("CURATE_PIPELINE_FILE", "pipeline.yaml")
RETRIES = int(os.environ.get("CURATE_RETRIES", "3"))
DELAY = timedelta(seconds=float(os.environ.get("CURATE_RETRY_DELAY_SECONDS", "60")))
DOCKER_URL = os.environ.get("CURATE_DOCKER_URL") or os.environ.get("DOCKER_HOST") or "unix://var/run/docker.sock"
PASS_ENV = [n.strip() for n in os.environ.get("CURATE_PASS_ENV", "").split(",") if n.strip()]

plain = curate_dag("curate_pipeline", os.path.join(DATA, FILE), retries=RETRIES, retry_delay=DELAY)

container = curate_dag("curate_pipeline_container", f"/data/{FILE}", image=os.environ.get("CURATE_IMAGE", "curate:cpu"),
                       retries=RETRIES, retry_delay=DELAY, docker_url=DOCKER_URL, pass_env=PASS_ENV,
                       auto_remove=os.environ.get("CURATE_AUTO_REMOVE", "success"),
                       mounts=[Mount(source=DATA, target="/data", type="bind")])
