"""Fixtures for the LLM layer tests: a small JSON-answering stage (``test_facts``) with its prompt in
a temporary folder. The SmolLM2 engine and the local OpenAI-compatible server are shared fixtures
(tests/support/openai_server.py, through tests/conftest.py)."""

from __future__ import annotations

import os
import shutil

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def prompts(tmp_path):
    """A copy of tests/llm/prompts (template ``facts/list``) that a test may edit."""
    dst = tmp_path / "prompts"
    shutil.copytree(os.path.join(HERE, "prompts"), dst)
    return dst
