import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGINS = os.path.join(HERE, "plugins")
ROOT = os.path.dirname(HERE)
if PLUGINS not in sys.path:
    sys.path.insert(0, PLUGINS)
# subprocesses (curate run, spawned workers) find the test plugins too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [PLUGINS, os.environ.get("PYTHONPATH", "")] if p)


def curate_bin() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "curate")
    return exe if os.path.exists(exe) else "curate"


@pytest.fixture
def curate_cmd():
    return [curate_bin()]
