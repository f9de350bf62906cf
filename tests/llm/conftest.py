"""Fixtures for the LLM layer tests: the engine tests' SmolLM2 engine and local OpenAI-compatible
server, and a small JSON-answering stage (``test_facts``) with its prompt in a temporary folder."""

from __future__ import annotations

import os
import shutil

import pytest

from engines.conftest import OpenAIServer, _server_session, openai_server, smol  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def prompts(tmp_path):
    """A copy of tests/llm/prompts (template ``facts/list``) that a test may edit."""
    dst = tmp_path / "prompts"
    shutil.copytree(os.path.join(HERE, "prompts"), dst)
    return dst
