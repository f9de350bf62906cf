"""hf_classify on tiny random-weight models built offline (a BERT regression head like
FineWeb-Edu's, a multi-label DeBERTa-v2 classifier, a single-label BERT classifier)."""

from __future__ import annotations

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from curate.pipeline.stage import StageError  # noqa: E402
from curate.stages.score import _hf_classifier as hfc  # noqa: E402
from curate.stages.score.hf_classify import HfClassify  # noqa: E402
from curate.testing.tiny_hf import make_texts, tiny_classifier  # noqa: E402

TEXTS = make_texts(60, seed=3, max_words=120)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return {
        "edu": tiny_classifier(str(d / "edu"), "bert", num_labels=1, problem_type="regression",
                               labels=["score"], texts=TEXTS, seed=1),
        "quality": tiny_classifier(str(d / "quality"), "deberta", problem_type="multi_label_classification",
                                   labels=["Low quality", "Medium", "High-Quality"], texts=TEXTS, seed=2),
        "domain": tiny_classifier(str(d / "domain"), "bert", problem_type="single_label_classification",
                                  labels=["news", "science", "sports", "other"], texts=TEXTS, seed=3),
    }


def plain_loop(folder: str, texts: list[str], max_length: int):
    """What a user would write: one text at a time, tokenizer + model, no batching."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model(**enc).logits[0].float())
    return torch.stack(out)


def table(texts):
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})


def test_regression_scores_equal_a_plain_loop_in_any_order(models):
    ref = plain_loop(models["edu"], TEXTS, 64).numpy()[:, 0]
    st = HfClassify(model=models["edu"], device="cpu", max_length=64, batch_tokens=256, int_range=(0, 5))
    out = st(table(TEXTS))
    assert out.column_names == ["id", "text", "hf_score", "hf_int_score"]
    got = out["hf_score"].to_numpy()
    assert abs(got - ref).max() < 1e-5
    assert len(set(round(x, 3) for x in got)) > 20            # the scores really vary
    # several length-sorted batches, each within the token budget, some of them truncated texts
    assert st._clf.stats["batches"] > 5
    assert st.counters.data["hf_classify/truncated"] > 0
    assert st.counters.data["hf_classify/tokens"] == st._clf.stats["tokens"]
    ints = out["hf_int_score"].to_pylist()
    assert ints == [int(min(5, max(0, round(float(x))))) for x in got]
    # shuffled input: each document keeps its own score
    order = list(range(len(TEXTS)))
    random.Random(0).shuffle(order)
    shuffled = HfClassify(model=models["edu"], device="cpu", max_length=64, batch_tokens=300)(
        table([TEXTS[i] for i in order]))
    by_text = dict(zip(shuffled["text"].to_pylist(), shuffled["hf_score"].to_pylist()))
    assert max(abs(by_text[t] - r) for t, r in zip(TEXTS, ref)) < 1e-5


def test_length_batches_respect_the_budget_and_sort_by_length():
    lengths = [5, 50, 7, 50, 1, 33, 12, 100, 2]
    batches = hfc.length_batches(lengths, 100, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b) <= 4 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100)


def test_multi_label_and_single_label_classifiers(models):
    import torch

    ref = torch.sigmoid(plain_loop(models["quality"], TEXTS, 128)).numpy()
    out = HfClassify(model=models["quality"], device="cpu", max_length=128, prefix="q_")(table(TEXTS))
    assert out.column_names[2:] == ["q_low_quality", "q_medium", "q_high_quality", "q_label", "q_label_id"]
    got = pa.table({c: out[c] for c in out.column_names[2:5]}).to_pandas().to_numpy()
    assert abs(got - ref).max() < 1e-5
    labels = ["Low quality", "Medium", "High-Quality"]
    assert out["q_label"].to_pylist() == [labels[i] for i in ref.argmax(1)]
    assert out["q_label_id"].to_pylist() == ref.argmax(1).tolist()
    assert len(set(out["q_label"].to_pylist())) > 1

    ref = torch.softmax(plain_loop(models["domain"], TEXTS, 128), -1).numpy()
    out = HfClassify(model=models["domain"], device="cpu", max_length=128)(table(TEXTS))
    got = pa.table({c: out[c] for c in ["hf_news", "hf_science", "hf_sports", "hf_other"]}).to_pandas().to_numpy()
    assert abs(got - ref).max() < 1e-5 and abs(got.sum(1) - 1).max() < 1e-5


def test_empty_and_null_texts_are_counted_and_get_nulls(models):
    st = HfClassify(model=models["edu"], device="cpu", max_length=64)
    out = st(table([TEXTS[0], None, "", "   \n", TEXTS[1]]))
    assert out.num_rows == 5
    assert [v is None for v in out["hf_score"].to_pylist()] == [False, True, True, True, False]
    assert out["hf_int_score"].null_count == 3
    assert st.counters.data["hf_classify/empty_text"] == 3
    ref = plain_loop(models["edu"], [TEXTS[0], TEXTS[1]], 64).numpy()[:, 0]
    assert abs(out["hf_score"].to_numpy(zero_copy_only=False)[[0, 4]] - ref).max() < 1e-5
    # a batch of only empty texts, and a column of nulls only
    assert HfClassify(model=models["edu"], device="cpu")(table([None, ""]))["hf_score"].null_count == 2
    with pytest.raises(StageError, match="expected text"):
        HfClassify(model=models["edu"], device="cpu")(pa.table({"id": ["a"], "text": [3]}))


def test_missing_or_wrong_model_is_a_validate_time_error(tmp_path, models):
    from curate.pipeline.config import ConfigError, load_pipeline

    missing = str(tmp_path / "nope")
    assert HfClassify(model=missing).check() == [
        ("model", f"model folder not found: {missing} (hf_classify loads local folders only)")]
    os.makedirs(tmp_path / "empty")
    [(key, msg)] = HfClassify(model=str(tmp_path / "empty")).check()
    assert key == "model" and "no config.json" in msg
    assert HfClassify(model=models["edu"], device="cpu").check() == []
    pq.write_table(table(TEXTS[:3]), str(tmp_path / "docs.parquet"))
    spec = {"name": "t", "output": str(tmp_path / "out"),
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "docs.parquet")}}},
            "stages": [{"name": "edu", "stage": "hf_classify", "options": {"model": missing}}]}
    with pytest.raises(ConfigError) as err:
        load_pipeline(spec)
    assert "edu" in str(err.value) and "model" in str(err.value) and "model folder not found" in str(err.value)
    with pytest.raises(StageError, match="model folder not found"):
        HfClassify(model=missing)(table(TEXTS[:1]))


def test_resources_ask_for_a_gpu_only_for_cuda(models, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert HfClassify(model=models["edu"], device="cpu").resources.gpus == 0
    assert HfClassify(model=models["edu"]).resources.gpus == 0           # auto, no GPU visible
    assert HfClassify(model=models["edu"], device="cuda").resources.gpus == 1
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(StageError, match="'options.device': 'cuda' but torch sees no CUDA GPU"):
            HfClassify(model=models["edu"], device="cuda")(table(TEXTS[:1]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert HfClassify(model=models["edu"]).resources.gpus == 1           # auto with a GPU


def test_a_pipeline_run_scores_every_row(models, tmp_path):
    from curate.run import run_pipeline

    texts = TEXTS + [None, ""]
    pq.write_table(table(texts), str(tmp_path / "docs.parquet"))
    spec = {"name": "t", "output": str(tmp_path / "out"), "workers": 1, "batch_size": 16,
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "docs.parquet")}}},
            "stages": [{"name": "edu", "stage": "hf_classify",
                        "options": {"model": models["edu"], "device": "cpu", "max_length": 64,
                                    "int_range": [0, 5]}}]}
    result = run_pipeline(spec, progress=False)
    out = pq.read_table(str(tmp_path / "out" / "edu")).sort_by("id")
    assert out.num_rows == len(texts)
    ref = plain_loop(models["edu"], TEXTS, 64).numpy()[:, 0]
    got = dict(zip(out["id"].to_pylist(), out["hf_score"].to_pylist()))
    assert max(abs(got[f"d{i}"] - r) for i, r in enumerate(ref)) < 1e-5
    step = result.stats["edu"]
    assert step["counters"]["hf_classify/empty_text"] == 2 and step["out"] == len(texts)
