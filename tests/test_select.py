"""The select stage: top-k by a score column, seeded fraction, head; across shards; bad input."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from curate.pipeline.stage import StageError
from curate.stages.select import Select


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    tables = []
    for f in range(3):
        n = 100
        t = pa.table({"id": [f"d{f}-{i}" for i in range(n)], "text": ["x"] * n,
                      "score": pa.array(rng.random(n).round(2))})  # rounded: many ties
        pq.write_table(t, str(tmp_path / f"p{f}.parquet"))
        tables.append(t)
    return str(tmp_path), pa.concat_tables(tables)


def test_top_by_score_across_shards(shards):
    path, full = shards
    out = Select(top=25, by="score")(path)
    scores = full.column("score").to_pylist()
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:25]
    assert out.column("id").to_pylist() == [full.column("id")[i].as_py() for i in sorted(order)]
    low = Select(top=5, by="score", descending=False)(path)
    assert max(low.column("score").to_pylist()) <= sorted(scores)[4]


def test_min_value_and_head(shards):
    path, full = shards
    out = Select(by="score", min_value=0.9)(path)
    assert out.num_rows == sum(s >= 0.9 for s in full.column("score").to_pylist())
    head = Select(top=150)(path)
    assert head.column("id").to_pylist() == full.column("id").to_pylist()[:150]


def test_fraction_is_seeded_and_about_right(shards):
    path, full = shards
    a = Select(fraction=0.3, seed=1)(path)
    b = Select(fraction=0.3, seed=1)(path)
    c = Select(fraction=0.3, seed=2)(path)
    assert a.equals(b) and not a.equals(c)
    assert 60 <= a.num_rows <= 120
    st = Select(fraction=0.3, seed=1)
    st(path)
    assert st.counters.to_dict()["dropped/not_selected"] == 300 - a.num_rows


def test_bad_options_and_missing_column(shards):
    path, _ = shards
    with pytest.raises(ValidationError, match="give `top`"):
        Select()
    with pytest.raises(ValidationError, match="needs `by`"):
        Select(min_value=0.5)
    with pytest.raises(StageError, match="no column 'nope'"):
        Select(top=3, by="nope")(path)
