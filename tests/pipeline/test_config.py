"""pipeline.yaml validation: every error names the file, the step and the key; the CLI exits 2."""

import subprocess

import pytest

from curate.pipeline.config import ConfigError, load_pipeline
from helpers import pipeline_dict, write_corpus, write_yaml


@pytest.fixture
def corpus(tmp_path):
    write_corpus(str(tmp_path / "in"), files=1, rows=10)
    return str(tmp_path / "in")


def problems_of(path):
    with pytest.raises(ConfigError) as ei:
        load_pipeline(path)
    return ei.value, str(ei.value)


def test_valid_pipeline_loads(tmp_path, corpus):
    p = write_yaml(str(tmp_path / "p.yaml"), pipeline_dict(corpus, str(tmp_path / "out")))
    pipe = load_pipeline(p)
    assert list(pipe.steps) == ["docs", "word_count", "min_words", "top", "counts2"]
    assert pipe.steps["word_count"].inputs == ["docs"]
    assert pipe.steps["counts2"].inputs == ["min_words"]
    assert len({s.fingerprint for s in pipe.steps.values()}) == 5


def test_unknown_stage(tmp_path, corpus):
    d = pipeline_dict(corpus, str(tmp_path / "out"))
    d["stages"][1]["stage"] = "min_wordz"
    p = write_yaml(str(tmp_path / "p.yaml"), d)
    err, msg = problems_of(p)
    assert p in msg and "stage 'min_wordz'" in msg and "key 'stage'" in msg and "unknown stage" in msg


def test_unknown_option(tmp_path, corpus):
    d = pipeline_dict(corpus, str(tmp_path / "out"))
    d["stages"][1]["options"]["min_wrods"] = 3
    p = write_yaml(str(tmp_path / "p.yaml"), d)
    _, msg = problems_of(p)
    assert "stage 'min_words'" in msg and "options.min_wrods" in msg and "unknown key" in msg


def test_wrongly_typed_option(tmp_path, corpus):
    d = pipeline_dict(corpus, str(tmp_path / "out"))
    d["stages"][2]["options"]["k"] = "many"
    p = write_yaml(str(tmp_path / "p.yaml"), d)
    _, msg = problems_of(p)
    assert "stage 'top'" in msg and "options.k" in msg and "'many'" in msg


def test_missing_input_file(tmp_path):
    d = pipeline_dict(str(tmp_path / "nope"), str(tmp_path / "out"))
    p = write_yaml(str(tmp_path / "p.yaml"), d)
    _, msg = problems_of(p)
    assert "input 'docs'" in msg and "options.paths" in msg and "not found" in msg


def test_missing_pipeline_file_and_bad_yaml(tmp_path):
    _, msg = problems_of(str(tmp_path / "absent.yaml"))
    assert "absent.yaml" in msg and "file not found" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    _, msg = problems_of(str(bad))
    assert "bad.yaml" in msg and "not valid YAML" in msg and "line" in msg


def test_top_level_errors(tmp_path, corpus):
    d = pipeline_dict(corpus, str(tmp_path / "out"), runner="spark", rows_per_shard=0)
    del d["output"]
    p = write_yaml(str(tmp_path / "p.yaml"), d)
    err, msg = problems_of(p)
    keys = {w for w, _ in err.problems}
    assert {"key 'runner'", "key 'rows_per_shard'", "key 'output'"} <= keys


def test_graph_errors(tmp_path, corpus):
    d = pipeline_dict(corpus, str(tmp_path / "out"))
    d["stages"][3]["input"] = "nowhere"
    d["stages"].append({"stage": "word_count"})            # duplicate name
    d["stages"].append({"stage": "read_parquet", "options": {"paths": corpus}})  # source in stages
    p = write_yaml(str(tmp_path / "p.yaml"), d)
    err, msg = problems_of(p)
    assert "stage 'counts2'" in msg and "unknown step 'nowhere'" in msg
    assert "used twice" in msg
    assert "source stage" in msg


def test_unknown_engine_reference(tmp_path, corpus):
    d = pipeline_dict(corpus, str(tmp_path / "out"))
    d["stages"][0]["options"] = {"engine": "big"}
    p = write_yaml(str(tmp_path / "p.yaml"), d)
    _, msg = problems_of(p)
    assert "options.engine" in msg and "unknown engine 'big'" in msg


def _llm_pipeline(tmp_path, corpus, engines, *step_engines):
    d = pipeline_dict(corpus, str(tmp_path / "out"), engines=engines)
    d["stages"] = [{"name": f"g{i}", "stage": "generate", "input": "docs",
                    "options": {"engine": e, "template": "Say: {text}"}} for i, e in enumerate(step_engines)]
    return write_yaml(str(tmp_path / "p.yaml"), d)


def test_a_named_engine_is_parsed_once_and_shared_by_the_steps_naming_it(tmp_path, corpus):
    p = _llm_pipeline(tmp_path, corpus, {"small": {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}},
                      "small", "small", {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"})
    pipe = load_pipeline(p, check=False)
    a, b, inline = (pipe.steps[n].stage.config.engine for n in ("g0", "g1", "g2"))
    assert a is b and a.kind == "openai" and a.model == "m"
    assert inline == a and inline is not a                      # an inline mapping is its own config
    assert pipe.steps["g0"].fingerprint == pipe.steps["g1"].fingerprint != ""


def test_unknown_engine_name_names_file_step_key_and_the_close_name(tmp_path, corpus):
    p = _llm_pipeline(tmp_path, corpus, {"small": {"kind": "openai", "model": "m"}}, "smal")
    _, msg = problems_of(p)
    assert p in msg and "stage 'g0'" in msg and "key 'options.engine'" in msg
    assert "unknown engine 'smal' (did you mean 'small'?)" in msg


def test_an_invalid_named_engine_is_reported_once_under_engines(tmp_path, corpus):
    p = _llm_pipeline(tmp_path, corpus, {"small": {"kind": "openai", "modle": "m"}}, "small", "small")
    err, msg = problems_of(p)
    assert "key 'engines.small.modle'" in msg and "unknown key" in msg
    assert "key 'engines.small.model'" in msg                   # openai needs a model
    assert msg.count("engines.small.modle") == 1 and "g0" not in msg and "g1" not in msg


def test_a_string_engine_in_a_library_call_is_an_error_not_a_kind():
    """`engine:` has one meaning: a string names an engine of a pipeline file's `engines:`."""
    from pydantic import ValidationError

    from curate.stages.synth.generate import Generate

    with pytest.raises(ValidationError, match="names an engine defined under `engines:`"):
        Generate(engine="openai")
    assert Generate(engine={"kind": "openai", "model": "m"}).config.engine.kind == "openai"


def test_all_problems_reported_at_once(tmp_path, corpus):
    d = pipeline_dict(corpus, str(tmp_path / "out"))
    d["stages"][1]["options"]["bogus"] = 1
    d["stages"][2]["options"]["k"] = -3
    p = write_yaml(str(tmp_path / "p.yaml"), d)
    err, _ = problems_of(p)
    assert len(err.problems) == 2


def test_cli_validate_exit_codes(tmp_path, corpus, curate_cmd):
    good = write_yaml(str(tmp_path / "good.yaml"), pipeline_dict(corpus, str(tmp_path / "out")))
    r = subprocess.run(curate_cmd + ["validate", good], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "valid pipeline" in r.stdout and "global top" in r.stdout
    d = pipeline_dict(corpus, str(tmp_path / "out"))
    d["stages"][0]["stage"] = "nope"
    bad = write_yaml(str(tmp_path / "bad.yaml"), d)
    for cmd in (["validate", bad], ["run", bad]):
        r = subprocess.run(curate_cmd + cmd, capture_output=True, text=True)
        assert r.returncode == 2
        assert "bad.yaml" in r.stderr and "stage 'nope'" in r.stderr and "key 'stage'" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_environment_interpolation(tmp_path, corpus, monkeypatch):
    d = pipeline_dict("${CURATE_TEST_IN}", "${CURATE_TEST_OUT:-" + str(tmp_path / "dflt") + "}")
    p = write_yaml(str(tmp_path / "p.yaml"), d)
    monkeypatch.delenv("CURATE_TEST_IN", raising=False)
    _, msg = problems_of(p)
    assert "inputs.docs.options.paths" in msg and "CURATE_TEST_IN is not set" in msg
    monkeypatch.setenv("CURATE_TEST_IN", corpus)
    pipe = load_pipeline(p)
    assert pipe.output == str(tmp_path / "dflt")
    assert pipe.steps["docs"].stage.config.paths == corpus
