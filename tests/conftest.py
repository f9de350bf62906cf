import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGINS = os.path.join(HERE, "plugins")
ROOT = os.path.dirname(HERE)
for p in (PLUGINS, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)
# subprocesses (curate run, spawned workers) find the test plugins too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [PLUGINS, os.environ.get("PYTHONPATH", "")] if p)


from helpers import curate_bin  # noqa: E402


@pytest.fixture
def curate_cmd():
    return [curate_bin()]
