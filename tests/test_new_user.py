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


# -- issue 13.1: an output location that cannot be written -------------------------------------------

@pytest.fixture
def locked_dir(tmp_path):
    """``lock(path)`` makes a folder unwritable for this process (also for root: chattr +i) and
    undoes it at the end of the test."""
    locked: list[str] = []

    def lock(path: str) -> str:
        if os.geteuid() == 0:
            r = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot make a folder immutable here: {r.stderr.strip()}")
        else:
            os.chmod(path, 0o555)
        locked.append(path)
        return path

    yield lock
    for p in locked:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", p], check=False)
        else:
            os.chmod(p, 0o755)


def small_pipeline(tmp_path, output: str) -> str:
    if not (tmp_path / "in").exists():
        write_corpus(str(tmp_path / "in"), files=1, rows=20)
    return write_yaml(str(tmp_path / "p.yaml"), {
        "name": "t", "output": output, "workers": 1, "plugins": ["runner_stages"],
        "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "in")}}},
        "stages": [{"stage": "word_count"}]})


def assert_one_line_error(r, code: int, *needles: str) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.mark.parametrize("case", ["proc", "through_file", "read_only", "read_only_existing"])
def test_unwritable_output_is_one_clear_line_at_validate_and_run(tmp_path, locked_dir, case):
    if case == "proc":
        out = "/proc/curate-out"
    elif case == "through_file":
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        out = str(tmp_path / "notes.txt" / "out")
    elif case == "read_only":
        os.mkdir(tmp_path / "ro")
        out = str(tmp_path / "ro" / "out")
        locked_dir(str(tmp_path / "ro"))
    else:
        os.mkdir(tmp_path / "ro")
        out = locked_dir(str(tmp_path / "ro"))
    p = small_pipeline(tmp_path, out)
    needle = {"proc": "/proc", "through_file": "notes.txt"}.get(case, str(tmp_path / "ro"))
    assert_one_line_error(cli("validate", p), 2, needle)
    assert_one_line_error(cli("run", "-q", p), 2, needle)


def test_force_on_a_step_folder_that_cannot_be_removed(tmp_path, locked_dir):
    out = str(tmp_path / "out")
    p = small_pipeline(tmp_path, out)
    assert cli("run", "-q", p).exit_code == 0
    locked_dir(os.path.join(out, "word_count"))
    r = cli("run", "-q", "--force", p)
    assert_one_line_error(r, 1, os.path.join(out, "word_count"), "cannot write the output")


# -- issue 13.2: inspect on a broken shard or a file that is not Parquet -----------------------------

def test_inspect_names_a_truncated_shard_or_a_non_parquet_file(tmp_path):
    write_corpus(str(tmp_path / "d"), files=2, rows=200)
    bad = tmp_path / "d" / "f1.parquet"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    for target, named in ((tmp_path / "d", str(bad)), (bad, str(bad))):
        r = cli("inspect", str(target))
        assert_one_line_error(r, 1, named, "not a readable Parquet file")
    txt = tmp_path / "notes.parquet"
    txt.write_text("just some notes\n" * 10)
    assert_one_line_error(cli("inspect", str(txt)), 1, str(txt), "not a readable Parquet file")
    assert cli("inspect", str(tmp_path / "d" / "f0.parquet")).exit_code == 0


# -- issue 13.5: inspect a step that ran fused into the next one, and an empty step ------------------

def test_inspect_resolves_fused_steps_and_shows_empty_steps(tmp_path):
    from curate.pipeline.runner import run_pipeline
    from helpers import pipeline_dict

    write_corpus(str(tmp_path / "in"), files=2, rows=60)
    out = str(tmp_path / "out")
    run_pipeline(pipeline_dict(str(tmp_path / "in"), out, workers=1), progress=False)
    assert not os.path.exists(os.path.join(out, "word_count"))  # fused into min_words
    r = cli("inspect", os.path.join(out, "word_count"))
    assert r.exit_code == 0, r.output
    assert "step 'word_count' ran fused with min_words" in r.output
    assert os.path.join(out, "min_words") in r.output and "n_words: int64" in r.output
    r = cli("inspect", os.path.join(out, "docs"))  # a source fused at the head of the same chain
    assert r.exit_code == 0 and "ran fused with word_count, min_words" in r.output
    assert cli("inspect", os.path.join(out, "nosuchstep")).exit_code == 2

    # every document dropped: the map step still has its schema; the global step after it says 0 rows
    empty = str(tmp_path / "empty")
    d = pipeline_dict(str(tmp_path / "in"), empty, workers=1)
    d["stages"][1]["options"]["min_words"] = 10_000
    run_pipeline(d, progress=False)
    r = cli("inspect", os.path.join(empty, "min_words"))
    assert r.exit_code == 0, r.output
    assert " 0 rows" in r.output and "n_words: int64" in r.output and "text: string" in r.output
    r = cli("inspect", os.path.join(empty, "top"))
    assert r.exit_code == 0 and "0 rows" in r.output, r.output


# -- issue 13.3: a library call whose glob matches nothing -------------------------------------------

@pytest.mark.parametrize("paths", ["data/*.parquet", "data/", ["data/a.parquet"]])
def test_library_source_with_no_matching_files_raises_what_validate_reports(tmp_path, monkeypatch, paths):
    from curate.pipeline.stage import StageError
    from curate.stages.read_parquet import ReadParquet

    monkeypatch.chdir(tmp_path)
    if paths == "data/":
        os.mkdir("data")  # exists, but holds no Parquet file
    with pytest.raises(StageError) as err:
        ReadParquet(paths=paths)()
    p = write_yaml("p.yaml", {"name": "x", "output": "out",
                              "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": paths}}}})
    with pytest.raises(ConfigError) as cfg_err:
        load_pipeline(p)
    (where, msg), = cfg_err.value.problems
    assert f"{where.split(': ', 1)[1]}: {msg}" in str(err.value)
    assert "key 'options.paths'" in str(err.value)


# -- issue 13.6: every problem of a file at once -----------------------------------------------------

def test_unknown_inputs_are_reported_next_to_unknown_stages_and_bad_options(tmp_path):
    p = write_yaml(str(tmp_path / "p.yaml"), {
        "name": "x", "output": str(tmp_path / "out"),
        "inputs": {"pages": {"stage": "read_pydoc", "options": {"modules": ["json"]}}},
        "stages": [{"stage": "extract_htm", "input": "nosuchstep"},
                   {"stage": "pii", "input": "otherstep", "options": {"bogus": 1}},
                   {"stage": "language_id", "input": "pages"}]})
    with pytest.raises(ConfigError) as err:
        load_pipeline(p)
    got = {(w, m.split(";")[0]) for w, m in err.value.problems}
    assert got == {
        ("stage 'extract_htm' (stages[0]): key 'stage'", "unknown stage 'extract_htm'"),
        ("stage 'extract_htm' (stages[0]): key 'input'", "unknown step 'nosuchstep'"),
        ("stage 'pii' (stages[1]): key 'input'", "unknown step 'otherstep'"),
        ("stage 'pii' (stages[1]): key 'options.bogus'", "unknown key"),
    }
    r = cli("validate", p)
    assert r.exit_code == 2 and "nosuchstep" in r.output and "otherstep" in r.output
