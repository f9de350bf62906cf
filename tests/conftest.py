import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGINS = os.path.join(HERE, "plugins")
SUPPORT = os.path.join(HERE, "support")   # data builders, local servers, shared fixtures
ROOT = os.path.dirname(HERE)
for p in (SUPPORT, PLUGINS, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)
# subprocesses (curate run, spawned workers) find the test plugins too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [PLUGINS, os.environ.get("PYTHONPATH", "")] if p)


from helpers import curate_bin  # noqa: E402
# fixtures shared across the tree (tests mirror curate/, so one subject's fixtures serve several folders)
from minhash_fixtures import planted  # noqa: E402,F401
from s3_fixtures import s3  # noqa: E402,F401
from openai_server import OpenAIServer, _server_session, openai_server, smol  # noqa: E402,F401
from scoring_fixtures import domain_data, trained  # noqa: E402,F401
from site_fixtures import serve_site  # noqa: E402,F401


@pytest.fixture
def curate_cmd():
    return [curate_bin()]
