"""Fixture ``planted``: the MinHash tests' planted near-duplicate corpus (built once a session)."""

import pytest

from minhash_corpus import Planted, build_planted


@pytest.fixture(scope="session")
def planted() -> Planted:
    """The planted near-duplicate corpus with its exact ground truth (built once)."""
    return build_planted()
