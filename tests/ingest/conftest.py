"""Fixtures of the ingest tests.

``tests/ingest/site.py`` cannot be imported as ``site`` (the standard library's ``site`` module is
always loaded first), so it is loaded here under the name ``ingest_site``: use the ``serve_site``
fixture below, or ``from ingest_site import serve_site`` in a test module.
"""

import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

if "ingest_site" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("ingest_site", os.path.join(HERE, "site.py"))
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["ingest_site"] = _mod
    _spec.loader.exec_module(_mod)

from ingest_site import serve_site as _serve_site  # noqa: E402


@pytest.fixture
def serve_site():
    """A factory ``serve_site(pages) -> (base_url, stop, hits)``; every site it starts is stopped
    at the end of the test."""
    stops = []

    def start(pages):
        base, stop, hits = _serve_site(pages)
        stops.append(stop)
        return base, stop, hits

    yield start
    for stop in stops:
        stop()
