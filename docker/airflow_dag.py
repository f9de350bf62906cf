"""Example Airflow DAG: one task runs a curate pipeline in the curate Docker image.

The run is resumable: if the task is retried after a failure or a killed worker, `curate run`
skips finished shards and steps and completes the rest. Exit code 2 (invalid pipeline) should not
be retried; exit code 1 (a failed run) may be.
"""

from datetime import datetime

from airflow import DAG
from airflow.providers.docker.operators.docker import DockerOperator
from docker.types import Mount

with DAG(dag_id="curate_finance_corpus", start_date=datetime(2026, 1, 1), schedule=None, catchup=False) as dag:
    validate = DockerOperator(
        task_id="validate",
        image="curate:cpu",
        command="validate /data/pipeline.yaml",
        mounts=[Mount(source="/srv/curate", target="/data", type="bind")],
    )
    run = DockerOperator(
        task_id="run",
        image="curate:cpu",
        command="run --quiet /data/pipeline.yaml",
        mounts=[Mount(source="/srv/curate", target="/data", type="bind")],
        retries=3,
        environment={"AWS_PROFILE": "curate"},
    )
    validate >> run
