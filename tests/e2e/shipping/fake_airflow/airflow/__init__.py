"""A minimal stand-in for Apache Airflow 3 and its Docker provider, for the default test suite
(tests/e2e/shipping/test_airflow_unit.py), which cannot install Airflow. It keeps only what
curate.airflow relies on, with the real packages' names, signatures and behaviour for those parts:
``airflow.sdk.BaseOperator`` (task_id, retries, retry_delay, max_active_tis_per_dag, ``>>``,
``log``), ``airflow.sdk.DAG`` (a context manager collecting tasks), the two exceptions, and the
Docker provider's ``DockerOperator`` (environment + private_environment merged into the
container's environment, the "Docker container failed: {result!r}" message, ``container``, ``cli``,
``auto_remove``). The real ones run in tests/e2e/shipping/test_airflow.py (CURATE_AIRFLOW_TESTS=1)."""
