"""Example Airflow DAGs: validate a curate pipeline, then run it (see README, "Containers and Airflow").

Two DAGs, the same two tasks:
- ``curate_pipeline``: on workers that have curate installed (``pip install 'curate[airflow]'``);
- ``curate_pipeline_container``: in the curate image, through a Docker-compatible socket (Docker,
  or Podman's ``podman system service``), with the data folder mounted at /data.

``validate`` is not retried; ``run`` is retried on exit code 1 (the retry resumes: finished shards
and steps are skipped) and 4 (output locked by another run), and fails at once on exit code 2
(invalid pipeline) and 3 (an LLM budget was reached: a retry would send nothing).

Settings (environment of the scheduler / DAG processor):
  CURATE_DATA_DIR       folder holding the pipeline file and its output (default /srv/curate)
  CURATE_PIPELINE_FILE  pipeline file in that folder (default pipeline.yaml)
  CURATE_IMAGE          image of the container DAG (default curate:cpu)
  CURATE_DOCKER_URL     Docker API socket (default $DOCKER_HOST or unix://var/run/docker.sock)
  CURATE_RETRIES, CURATE_RETRY_DELAY_SECONDS   retries of `run` (default 3, after 60 s)
  CURATE_AUTO_REMOVE    remove containers: success (default: failed ones stay to look at), force, never
"""

import os
from datetime import datetime, timedelta

from airflow import DAG
from docker.types import Mount

from curate.airflow import curate_tasks

DATA = os.environ.get("CURATE_DATA_DIR", "/srv/curate")
FILE = os.environ.get("CURATE_PIPELINE_FILE", "pipeline.yaml")
RETRIES = int(os.environ.get("CURATE_RETRIES", "3"))
DELAY = timedelta(seconds=float(os.environ.get("CURATE_RETRY_DELAY_SECONDS", "60")))
DOCKER_URL = os.environ.get("CURATE_DOCKER_URL") or os.environ.get("DOCKER_HOST") or "unix://var/run/docker.sock"

with DAG(dag_id="curate_pipeline", start_date=datetime(2026, 1, 1), schedule=None, catchup=False,
         tags=["curate"]):
    curate_tasks(os.path.join(DATA, FILE), retries=RETRIES, retry_delay=DELAY)

with DAG(dag_id="curate_pipeline_container", start_date=datetime(2026, 1, 1), schedule=None, catchup=False,
         tags=["curate"]):
    curate_tasks(f"/data/{FILE}", image=os.environ.get("CURATE_IMAGE", "curate:cpu"), retries=RETRIES,
                 retry_delay=DELAY, docker_url=DOCKER_URL, auto_remove=os.environ.get("CURATE_AUTO_REMOVE", "success"),
                 mounts=[Mount(source=DATA, target="/data", type="bind")])
