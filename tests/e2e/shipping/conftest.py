"""Container and Airflow tests take minutes: they run only when asked for.

  CURATE_CONTAINER_TESTS=1   tests marked `container` (Podman builds and runs the CPU image)
  CURATE_AIRFLOW_TESTS=1     tests marked `airflow` (`airflow dags test` in the Airflow venv made by
                             docker/setup_airflow_venv.sh, or $CURATE_AIRFLOW_VENV)
`make container-test` and `make airflow-test` set them.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import podman_util as podman  # noqa: E402

GATES = {"container": "CURATE_CONTAINER_TESTS", "airflow": "CURATE_AIRFLOW_TESTS"}
AIRFLOW_VENV = os.environ.get("CURATE_AIRFLOW_VENV") or os.path.expanduser("~/.cache/curate/airflow-venv")


def pytest_runtest_setup(item):
    for marker, var in GATES.items():
        if item.get_closest_marker(marker) and os.environ.get(var) != "1":
            pytest.skip(f"{marker} test: takes minutes; run with {var}=1 (see README, Containers and Airflow)")


@pytest.fixture(scope="session")
def cpu_image():
    """The CPU image built from docker/Dockerfile on the cached debootstrap base: (tag, build seconds)."""
    why = podman.unavailable()
    if why:
        pytest.skip(why)
    return podman.build_cpu_image(podman.base_image())


@pytest.fixture(scope="session")
def airflow_bin():
    path = os.path.join(AIRFLOW_VENV, "bin", "airflow")
    if not os.path.exists(path):
        pytest.skip(f"no Airflow venv at {AIRFLOW_VENV}: create it with docker/setup_airflow_venv.sh "
                    "(or set CURATE_AIRFLOW_VENV)")
    return path


@pytest.fixture
def podman_socket(tmp_path):
    sock = podman.ApiSocket(str(tmp_path))
    yield sock.url
    sock.close()
