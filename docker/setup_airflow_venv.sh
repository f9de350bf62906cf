#!/usr/bin/env bash
# Creates the Airflow venv the `airflow` tests use (tests/e2e/shipping/test_airflow.py), apart from the
# project's .venv: Airflow pins many packages and must not change the main environment.
#   docker/setup_airflow_venv.sh            # -> ~/.cache/curate/airflow-venv (or $CURATE_AIRFLOW_VENV)
# It holds Airflow, the Docker provider and curate itself (the core package: a worker that runs
# curate tasks without a container has it installed like this).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${CURATE_AIRFLOW_VENV:-$HOME/.cache/curate/airflow-venv}"
PY="${PY:-python3}"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -c "$ROOT/constraints-dev.txt" "$ROOT[airflow]"
"$VENV/bin/airflow" version
echo "Airflow venv ready: $VENV"
