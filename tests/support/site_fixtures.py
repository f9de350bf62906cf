"""Fixture ``serve_site(pages) -> (base_url, stop, hits)`` (see http_site.py)."""

import pytest
from http_site import serve_site as _serve_site


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
