import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minhash_corpus import Planted, build_planted  # noqa: E402


@pytest.fixture(scope="session")
def planted() -> Planted:
    """The planted near-duplicate corpus with its exact ground truth (built once)."""
    return build_planted()
