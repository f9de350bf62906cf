"""The CLI for a first-time user: clear one-line errors instead of tracebacks, fast failure
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


# -- a module a configured stage needs cannot be imported ------------------------------------------

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


# -- an output location that cannot be written -----------------------------------------------------

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


# -- inspect on a broken shard or a file that is not Parquet ---------------------------------------

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


# -- inspect a step that ran fused into the next one, and an empty step ----------------------------

def test_inspect_resolves_fused_steps_and_shows_empty_steps(tmp_path):
    from curate.run import run_pipeline
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


# -- a library call whose glob matches nothing -----------------------------------------------------

@pytest.mark.parametrize("paths", ["data/*.parquet", "data/", ["data/a.parquet"]])
def test_library_source_with_no_matching_files_raises_what_validate_reports(tmp_path, monkeypatch, paths):
    from curate.pipeline.stage import StageError
    from curate.stages.sources.read_parquet import ReadParquet

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


# -- every problem of a file at once ---------------------------------------------------------------

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
        ("stage 'extract_htm' (stages[0]): key 'stage'", "unknown stage 'extract_htm' (did you mean 'extract_html'?)"),
        ("stage 'extract_htm' (stages[0]): key 'input'", "unknown step 'nosuchstep'"),
        ("stage 'pii' (stages[1]): key 'input'", "unknown step 'otherstep'"),
        ("stage 'pii' (stages[1]): key 'options.bogus'", "unknown key"),
    }
    r = cli("validate", p)
    assert r.exit_code == 2 and "nosuchstep" in r.output and "otherstep" in r.output


# -- plugins next to the pipeline file or in the working directory ---------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme_plugin_code() -> str:
    """The plugin example of the README, exactly as written there."""
    import re

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    (code,) = [b for b in blocks if "class CharCount" in b]
    return code


def plugin_project(tmp_path, rows: int = 40) -> str:
    """A project folder as the README describes it: my_project/stages.py beside pipeline.yaml."""
    proj = tmp_path / "proj"
    (proj / "my_project").mkdir(parents=True)
    (proj / "my_project" / "stages.py").write_text(readme_plugin_code())
    write_corpus(str(proj / "data"), files=3, rows=rows)
    return write_yaml(str(proj / "pipeline.yaml"), {
        "name": "plug", "output": "out", "workers": 2, "plugins": ["my_project.stages"],
        "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": "${DATA:-data}"}}},
        "stages": [{"stage": "char_count"}]})


def check_char_counts(out: str, rows: int) -> None:
    t = pa.concat_tables(pq.read_table(os.path.join(out, "char_count", f))
                         for f in sorted(os.listdir(os.path.join(out, "char_count"))) if f.endswith(".parquet"))
    assert t.num_rows == rows
    assert t.column("n_chars").to_pylist() == [len(x) for x in t.column("text").to_pylist()]


@pytest.mark.slow
def test_readme_plugin_example_runs_from_the_project_folder_and_from_elsewhere(tmp_path, curate_cmd):
    p = plugin_project(tmp_path)
    proj = os.path.dirname(p)
    # run from the project folder (workers: 2, so forkserver workers import the plugin too)
    r = subprocess.run(curate_cmd + ["run", "-q", "pipeline.yaml"], cwd=proj,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    check_char_counts(os.path.join(proj, "out"), 120)
    # run from elsewhere: the pipeline file's folder is searched
    r = subprocess.run(curate_cmd + ["run", "-q", p, "--output", str(tmp_path / "out2")], cwd=str(tmp_path),
                       env={**os.environ, "DATA": os.path.join(proj, "data")}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    check_char_counts(str(tmp_path / "out2"), 120)
    # listing plugin stages
    r = subprocess.run(curate_cmd + ["stages", "--plugins", "my_project.stages"], cwd=proj,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "char_count" in r.stdout and "CharCount" in r.stdout, r.stderr
    r = subprocess.run(curate_cmd + ["stages", "--file", p, "char_count"], cwd=str(tmp_path),
                       capture_output=True, text=True)
    assert r.returncode == 0 and "column: str (default 'n_chars')" in r.stdout, r.stderr
    r = subprocess.run(curate_cmd + ["stages", "--plugins", "no_such_project.stages"], cwd=proj,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no_such_project" in r.stderr and "Traceback" not in r.stderr


def test_plugin_next_to_the_pipeline_file_in_a_library_run_with_workers(tmp_path, monkeypatch):
    from curate.run import run_pipeline
    from helpers import pipeline_dict

    # a first run starts this process's forkserver before the project folder is known
    write_corpus(str(tmp_path / "in"), files=2, rows=30)
    run_pipeline(pipeline_dict(str(tmp_path / "in"), str(tmp_path / "o1"), workers=2), progress=False)
    p = plugin_project(tmp_path, rows=30)
    monkeypatch.chdir(tmp_path)  # neither the project folder nor on sys.path: found via the file's folder
    monkeypatch.setenv("DATA", os.path.join(os.path.dirname(p), "data"))
    res = run_pipeline(p, workers=2, output=str(tmp_path / "o2"), progress=False)
    assert res.stats["char_count"]["out"] == 90
    check_char_counts(str(tmp_path / "o2"), 90)


# -- readable options; stage classes by name -------------------------------------------------------

def test_stage_options_show_allowed_values_and_nested_groups():
    r = cli("stages", "minhash_dedup")
    assert r.exit_code == 0
    assert "keep: one of 'first', 'longest', 'score' (default 'first')" in r.output
    assert "score_column: str or null (default None)" in r.output
    assert "class:  curate.stages.dedup.minhash_dedup.MinhashDedup" in r.output
    r = cli("stages", "heuristic_filter")
    assert "gopher_quality: options of GopherQualityRules" in r.output
    assert "      min_doc_words: int or null (default 50)" in r.output  # nested keys, indented
    assert "Literal" not in r.output and "typing" not in r.output
    r = cli("stages")
    assert "MinhashDedup" in r.output and "ExtractHtml" in r.output


def test_type_text_of_enums_and_containers():
    import enum
    from typing import Literal

    from curate.pipeline.describe import type_text

    class Mode(enum.Enum):
        FAST = "fast"
        GOOD = "good"

    assert type_text(Mode) == "one of 'fast', 'good'"
    assert type_text(Literal["a", "b"] | None) == "one of 'a', 'b' or null"
    assert type_text(list[tuple[int, float]]) == "list of (int, float)"
    assert type_text(dict[str, int]) == "mapping of str to int"


def test_curate_stage_by_name_is_a_configured_library_call():
    import curate
    from curate.stages.clean.pii import Pii

    st = curate.stage("pii", kinds=["email"])
    assert isinstance(st, Pii) and st.config == Pii(kinds=["email"]).config
    t = pa.table({"id": ["a"], "text": ["write to someone@example.org or call"]})
    assert curate.stage("pii")(t).column("text")[0].as_py() == Pii()(t).column("text")[0].as_py()
    assert "someone@example.org" not in curate.stage("pii")(t).column("text")[0].as_py()
    with pytest.raises(ValueError, match="unknown stage 'pi'"):
        curate.stage("pi")
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        curate.stage("minhash_dedup", keep="shortest")


# -- third-party log noise -------------------------------------------------------------------------

def test_trafilatura_log_lines_are_counted_and_logged_at_debug_with_the_page(caplog, capfd):
    import logging

    from curate.stages.clean.extract_html import ExtractHtml

    good = "<html><body><article>" + "<p>The committee met on Tuesday and approved the plan. </p>" * 8 \
        + "</article></body></html>"
    t = pa.table({"id": ["frag1", "good", "frag2"], "text": ["", "", ""],
                  "html": ["<p>a fragment</p>", good, "<span>another fragment</span>"]})
    st = ExtractHtml()
    with caplog.at_level(logging.DEBUG):
        out = st(t)
    assert out.column("id").to_pylist() == ["good"]
    c = st.counters.to_dict()
    assert c["extract_html/library_log/trafilatura/parsed_tree_length"] == 2
    assert c["dropped/no_content"] == 2
    assert not [r for r in caplog.records if r.name.startswith("trafilatura")]  # none reach the log as is
    debug = [r.getMessage() for r in caplog.records if r.name == "curate" and r.levelno == logging.DEBUG
             and "parsed tree length" in r.getMessage()]
    assert len(debug) == 2 and "(doc frag1)" in debug[0] and "(doc frag2)" in debug[1]
    assert "parsed tree length" not in capfd.readouterr().err
    # the library's logger is left as it was
    assert logging.getLogger("trafilatura").propagate and not [
        h for h in logging.getLogger("trafilatura").handlers if type(h).__name__ == "LibraryLogs"]


@pytest.mark.slow
def test_model_conversion_draws_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, capfd, monkeypatch):
    pytest.importorskip("transformers")
    from curate.engines import transformers_engine
    from curate.engines.config import TransformersConfig
    from curate.engines.transformers_engine import load_model

    monkeypatch.setattr(transformers_engine, "_LOADED", {})  # not the model another test loaded

    # a fresh cache folder: the bundled GGUF model is converted (de-quantized) and saved again
    tok, model, _ = load_model(TransformersConfig(model_cache_dir=str(tmp_path), num_threads=1))
    assert model is not None and os.path.exists(next(iter(
        os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs if f == ".complete")))
    err = capfd.readouterr().err
    for bar in ("Converting and de-quantizing", "Loading weights", "Writing model shards", "it/s]"):
        assert bar not in err, err[-500:]
    from transformers.utils import logging as hf_logging
    assert hf_logging.is_progress_bar_enabled()  # switched back on after loading


def test_progress_bars_of_model_loading_are_off_while_loading_when_stderr_is_not_a_terminal(capfd):
    pytest.importorskip("transformers")
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from curate.engines.transformers_engine import _QuietProgress

    with _QuietProgress():  # what load_model wraps around conversion, loading and saving
        list(gguf_utils.tqdm(range(50), desc="Converting and de-quantizing GGUF tensors..."))
        list(hf_logging.tqdm(range(50), desc="Loading weights"))
    assert "it/s]" not in capfd.readouterr().err
    list(gguf_utils.tqdm(range(5), desc="after"))  # restored: the bar is drawn again
    assert "after" in capfd.readouterr().err
