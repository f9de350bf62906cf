"""Fixtures of the scoring tests: ``domain_data`` (labelled finance/cooking documents) and
``trained`` (a fastText classifier trained on them), built once a session."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domain_text import FAST, documents, write_jsonl


@pytest.fixture(scope="session")
def domain_data(tmp_path_factory):
    """finance seeds (Parquet), cooking text (JSONL and .txt files), and a mixed corpus to score
    (Parquet, with the true domain) of documents not used for training."""
    d = tmp_path_factory.mktemp("domains")
    fin, coo = documents("finance", 300, seed=1), documents("cooking", 300, seed=1)
    pq.write_table(pa.table({"text": fin}), str(d / "finance.parquet"))
    write_jsonl(d / "cooking.jsonl", coo[:250])
    os.makedirs(d / "cooking_txt")
    for i, t in enumerate(coo[250:]):
        (d / "cooking_txt" / f"{i}.txt").write_text(t)
    cf, cc = documents("finance", 200, seed=7), documents("cooking", 200, seed=7)
    texts = [t for pair in zip(cf, cc) for t in pair]
    truth = ["finance", "cooking"] * 200
    pq.write_table(pa.table({"id": [f"doc{i:04d}" for i in range(400)], "text": texts, "domain": truth}),
                   str(d / "corpus.parquet"))
    return {"dir": d, "positive": str(d / "finance.parquet"),
            "negative": [str(d / "cooking.jsonl"), str(d / "cooking_txt")], "corpus": str(d / "corpus.parquet")}


@pytest.fixture(scope="session")
def trained(domain_data, tmp_path_factory):
    """A classifier trained once for the session (library call)."""
    from curate.stages.score.train_classifier import TrainClassifier

    out = tmp_path_factory.mktemp("model")
    st = TrainClassifier(positive=domain_data["positive"], negative=domain_data["negative"], label="finance",
                         negative_label="other", output_dir=str(out), test_fraction=0.2, **FAST)
    table = st([])
    return {"dir": str(out), "model": str(out / "model.bin"), "card": st.card, "table": table}
