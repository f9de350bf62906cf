"""What a new user hit (issues 8 and 13): clear one-line errors instead of tracebacks, fast failure
on a broken install, inspect on fused and empty steps, plugins next to the pipeline file, readable
stage options, quiet third-party logs."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.pipeline.config import ConfigError, load_pipeline
from helpers import write_corpus, write_yaml


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def extract_pipeline(tmp_path) -> str:
    return write_yaml(str(tmp_path / "p.yaml"), {
        "name": "x", "output": str(tmp_path / "out"),
        "inputs": {"pages": {"stage": "read_pydoc", "options": {"modules": ["json"]}}},
        "stages": [{"stage": "extract_html"}]})


# -- issue 8.2: a module a configured stage needs cannot be imported ---------------------------------

def test_missing_required_module_fails_at_validate_with_the_module_named(tmp_path, monkeypatch):
    p = extract_pipeline(tmp_path)
    assert cli("validate", p).exit_code == 0
    # what an install without lxml_html_clean looks like to Python: importing the cleaner fails
    monkeypatch.setitem(sys.modules, "lxml.html.clean", None)
    with pytest.raises(ConfigError) as err:
        load_pipeline(p)
    assert "stage 'extract_html'" in str(err.value) and "lxml.html.clean" in str(err.value)
    for args in (["validate", p], ["run", "-q", p]):
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert "lxml.html.clean" in r.output and "Traceback" not in r.output
    assert not os.path.exists(tmp_path / "out")  # nothing started
