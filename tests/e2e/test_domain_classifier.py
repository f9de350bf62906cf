"""configs/domain_classifier.yaml through `curate run`: train, score with the trained model, select;
resume, and retraining rescoring; validation errors for step references."""

import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from domain_text import documents, write_jsonl

from curate.pipeline.config import ConfigError, load_pipeline
from helpers import ROOT, curate_bin

CONFIG = os.path.join(ROOT, "configs", "domain_classifier.yaml")


def _run(env, *args):
    r = subprocess.run([curate_bin(), *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _table(out, step):
    d = os.path.join(out, step)
    return pa.concat_tables([pq.read_table(os.path.join(d, f)) for f in sorted(os.listdir(d)) if f.endswith(".parquet")])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("dc")
    write_jsonl(d / "seeds.jsonl", documents("finance", 250, seed=3))
    write_jsonl(d / "general.jsonl", documents("cooking", 250, seed=3))
    cf, cc = documents("finance", 150, seed=11), documents("cooking", 150, seed=11)
    pq.write_table(pa.table({"id": [f"c{i:04d}" for i in range(300)], "text": cf + cc,
                             "domain": ["finance"] * 150 + ["cooking"] * 150}), str(d / "corpus.parquet"))
    return {"DOMAIN_SEEDS": str(d / "seeds.jsonl"), "GENERAL_TEXT": str(d / "general.jsonl"),
            "CORPUS": str(d / "corpus.parquet"), "CURATE_OUTPUT": str(d / "out")}


@pytest.mark.slow
def test_domain_classifier_config(env):
    out = env["CURATE_OUTPUT"]
    _run(env, "run", "-q", CONFIG)
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]
    assert list(stats) == ["seeds", "general", "corpus", "train", "score", "select"]
    card = json.load(open(os.path.join(out, "train", "_model.json")))
    assert card["metrics"]["f1"] >= 0.9 and card["labels"] == {"positive": "domain", "negative": "general"}
    assert card["data"]["positive"] == card["data"]["negative"] == 250
    assert stats["train"]["in"] == stats["train"]["out"] == 500
    scored = _table(out, "score")
    assert scored.num_rows == 300 and scored.schema.field("domain_score").type == pa.float32()
    kept = _table(out, "select")
    assert stats["select"]["out"] == kept.num_rows and kept.num_rows > 100
    domains = kept.column("domain").to_pylist()
    assert domains.count("finance") / len(domains) >= 0.9              # precision of the selection
    assert domains.count("finance") / 150 >= 0.9                        # recall
    assert min(kept.column("domain_score").to_pylist()) > 0.5
    assert stats["select"]["dropped"]["where"] == 300 - kept.num_rows
    sel = json.load(open(os.path.join(out, "select", "_selection.json")))
    assert {"column": "domain_score", "value": 0.5, "op": ">", "from": "where"} in sel["thresholds"]

    # the same command again: everything resumed
    _run(env, "run", "-q", CONFIG)
    again = json.load(open(os.path.join(out, "stats.json")))["steps"]
    assert all(s["status"] == "skipped" for s in again.values())

    # retraining (another option) re-runs the training step and the scoring that names its model
    _run({**env, "TRAIN_EPOCHS": "15"}, "run", "-q", CONFIG)
    third = json.load(open(os.path.join(out, "stats.json")))["steps"]
    # (corpus is read again: it is fused into the score step's tasks, not written out)
    assert {n for n, s in third.items() if s["status"] != "skipped"} == {"train", "corpus", "score", "select"}
    assert json.load(open(os.path.join(out, "train", "_model.json")))["sha256"] != card["sha256"]

    # the report of this run
    r = _run(env, "report", out)
    page = open(r.stdout.strip()).read()
    assert 'data-column="domain_score"' in page and 'class="threshold"' in page


def test_step_references_are_validated(env, tmp_path):
    import yaml

    spec = yaml.safe_load(open(CONFIG))
    spec["output"] = str(tmp_path / "o")
    spec["inputs"] = {k: {**v, "options": {"paths": env[{"seeds": "DOMAIN_SEEDS", "general": "GENERAL_TEXT",
                                                          "corpus": "CORPUS"}[k]]}} for k, v in spec["inputs"].items()}
    spec["stages"][0]["options"]["epoch"] = 5
    bad = json.loads(json.dumps(spec))
    bad["stages"][1]["options"]["model"] = {"step": "trian"}
    with pytest.raises(ConfigError, match=r"stage 'score' \(stages\[1\]\): key 'options.model': unknown step 'trian'"):
        load_pipeline(bad)
    later = json.loads(json.dumps(spec))
    later["stages"][0]["options"]["positive"] = {"step": "score"}
    with pytest.raises(ConfigError, match=r"key 'options.positive.0': step 'score' comes later"):
        load_pipeline(later)
    bad_where = json.loads(json.dumps(spec))
    bad_where["stages"][2]["options"]["where"] = "domain_score >> 0.5 and"
    with pytest.raises(ConfigError, match=r"stage 'select' \(stages\[2\]\): key 'options.where'"):
        load_pipeline(bad_where)
    pipe = load_pipeline(spec)
    assert pipe.steps["score"].refs == ["train"] and pipe.steps["train"].refs == ["seeds", "general"]
    assert pipe.steps["score"].stage.config.model.path == os.path.join(str(tmp_path / "o"), "train")


def test_a_model_file_changed_in_place_rescores(trained, tmp_path):
    import shutil

    model = str(tmp_path / "model.bin")
    shutil.copyfile(trained["model"], model)
    spec = {"name": "fp", "output": str(tmp_path / "o"),
            "inputs": {"docs": {"stage": "read_jsonl", "options": {"paths": write_jsonl(tmp_path / "d.jsonl", ["x"])}}},
            "stages": [{"name": "score", "stage": "fasttext_score", "options": {"model": model}}]}
    before = load_pipeline(spec).steps["score"].fingerprint
    assert load_pipeline(spec).steps["score"].fingerprint == before
    with open(model, "ab") as f:          # a different file at the same path
        f.write(b"\0")
    assert load_pipeline(spec).steps["score"].fingerprint != before
