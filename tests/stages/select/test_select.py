"""The select stage: top-k by a score column, seeded fraction, head; across shards; bad input."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from curate.pipeline.stage import StageError
from curate.stages.select.select import Select


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


# ------------------------------------------------------------------------------------------------
# where / top_fraction / max_tokens / stratify


def _docs(n=12):
    # scores with ties; ids deliberately not in input order
    ids = [f"id{(7 * i) % n:02d}" for i in range(n)]
    scores = [0.9, 0.5, 0.5, None, 0.7, 0.5, 0.1, 0.9, 0.3, 0.5, 0.2, 0.8][:n]
    texts = [" ".join(["w"] * (i + 1)) for i in range(n)]          # doc i has i + 1 words
    lang = ["en", "de", "en", "en", "fr", "en", "en", "de", "en", "en", "de", "en"][:n]
    return pa.table({"id": ids, "text": texts, "score": pa.array(scores, pa.float64()), "language": lang})


def _ids(t):
    return t.column("id").to_pylist()


def test_where_python_and_sql_forms():
    t = _docs()
    want = [r["id"] for r in t.to_pylist() if r["score"] is not None and r["score"] > 0.4 and r["language"] == "en"]
    for expr in ['score > 0.4 and language == "en"', "score > 0.4 AND language = 'en'",
                 "not (score <= 0.4 or language != 'en')"]:
        st = Select(where=expr)
        assert _ids(st(t)) == want, expr
        assert st.counters.to_dict() == {"dropped/where": 12 - len(want)}
    assert _ids(Select(where='language in ["de", "fr"] and score is not None')(t)) == \
        [r["id"] for r in t.to_pylist() if r["language"] in ("de", "fr")]
    assert _ids(Select(where="len(text) > 20")(t)) == _ids(t)[10:]         # 11+ words: 21+ chars
    assert _ids(Select(where='col("score") * 2 >= 1.8')(t)) == [_ids(t)[0], _ids(t)[7]]


def test_where_errors():
    for bad in ["score >> 1 and", "__import__('os').system('x')", "score.real > 1", "lambda: 1"]:
        with pytest.raises(ValidationError, match="where"):
            Select(where=bad)
    with pytest.raises(StageError, match="no column 'nope'"):
        Select(where="nope > 1")(_docs())
    with pytest.raises(StageError, match="not a true/false expression"):
        Select(where="score + 1")(_docs())


def test_top_k_ties_broken_by_id(tmp_path):
    t = _docs()
    # 0.9 x2, 0.8, 0.7, then four rows at 0.5: the two with the smallest ids win
    out = Select(by="score", top=6)(t)
    at_05 = sorted(r["id"] for r in t.to_pylist() if r["score"] == 0.5)
    assert sorted(r["id"] for r in out.to_pylist() if r["score"] == 0.5) == at_05[:2]
    assert _ids(out) == [i for i in _ids(t) if i in set(_ids(out))]    # input order kept
    # the same rows whatever the order or sharding of the input
    shuffled = t.take(list(reversed(range(12))))
    pq.write_table(shuffled.slice(0, 5), str(tmp_path / "a.parquet"))
    pq.write_table(shuffled.slice(5), str(tmp_path / "b.parquet"))
    assert sorted(_ids(Select(by="score", top=6)(str(tmp_path)))) == sorted(_ids(out))


def test_top_fraction():
    t = _docs()
    st = Select(by="score", top_fraction=0.25)
    out = st(t)   # 11 rows with a score: round(2.75) = 3
    assert sorted(out.column("score").to_pylist(), reverse=True) == [0.9, 0.9, 0.8]
    assert st.counters.to_dict() == {"dropped/no_score": 1, "dropped/not_selected": 8}
    assert st.selection["cutoff"] == 0.8
    low = Select(by="score", top_fraction=0.2, descending=False)(t)
    assert sorted(low.column("score").to_pylist()) == [0.1, 0.2]


def test_token_budget():
    t = _docs()   # doc i has i + 1 words
    st = Select(max_tokens=10)
    out = st(t)   # input order: 1 + 2 + 3 + 4 = 10
    assert _ids(out) == _ids(t)[:4] and st.selection["tokens"] == 10
    # ranked by score: 0.9 (row 0, 1 word), 0.9 (row 7, 8 words), 0.8 (row 11, 12 words) does not fit
    assert _ids(Select(by="score", max_tokens=20)(t)) == [_ids(t)[0], _ids(t)[7]]
    # a budget smaller than the first document keeps none (no smaller document jumps the queue)
    st = Select(by="score", max_tokens=0)
    assert Select(by="score", max_tokens=0)(t).num_rows == 0
    st = Select(by="score", max_tokens=5, where="score >= 0.8")
    assert st(t).num_rows == 1 and st.counters.to_dict()["dropped/not_selected"] == 2
    chars = Select(max_tokens=3, tokenizer="chars")(t)         # "w" = 1 char, "w w" = 3 chars
    assert _ids(chars) == _ids(t)[:1]
    counted = t.append_column("n", pa.array([5] * 12))
    assert Select(max_tokens=12, token_column="n")(counted).num_rows == 2
    assert Select(top=2, max_tokens=100)(t).num_rows == 2     # both limits


def test_token_budget_with_a_named_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "w": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")       # one token per character
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    t = _docs()
    out = Select(max_tokens=8, tokenizer=str(tmp_path / "tok"))(t)   # 1 + 3 chars, then 5 does not fit
    assert _ids(out) == _ids(t)[:2]
    with pytest.raises(StageError, match="cannot load tokenizer"):
        Select(max_tokens=8, tokenizer=str(tmp_path / "missing"))(t)


def test_stratified_quotas():
    t = _docs()
    st = Select(by="score", stratify="language", top=1)
    out = st(t)   # the best of each language
    best = {}
    for r in t.to_pylist():
        if r["score"] is not None and (r["language"] not in best or (-r["score"], r["id"]) < best[r["language"]]):
            best[r["language"]] = (-r["score"], r["id"])
    assert sorted(_ids(out)) == sorted(v[1] for v in best.values())
    assert set(st.selection["strata"]) == {"en", "de", "fr"}
    q = Select(by="score", stratify="language", quotas={"en": 3, "de": 1})(t)     # fr: no quota, no top
    assert sorted(q.column("language").to_pylist()) == ["de", "en", "en", "en"]
    qt = Select(stratify="language", max_tokens=100, quotas={"de": 2})(t)   # de: 2 tokens -> row 1 only
    assert qt.column("language").to_pylist().count("de") == 1 and "fr" in qt.column("language").to_pylist()
    qf = Select(by="score", stratify="language", top_fraction=0.5, quotas={"en": 1.0})(t)
    assert qf.column("language").to_pylist().count("en") == 7
    with pytest.raises(ValidationError, match="needs `stratify`"):
        Select(top=1, quotas={"en": 1})
    with pytest.raises(ValidationError, match="at most one of"):
        Select(top=1, max_tokens=3, stratify="language", quotas={"en": 1})


def test_empty_results_and_empty_input(tmp_path):
    t = _docs()
    st = Select(where="score > 5")
    out = st(t)
    assert out.num_rows == 0 and out.schema.names == t.schema.names
    assert Select(by="score", top=0)(t).num_rows == 0
    assert Select(by="score", top=3, where="score > 5")(t).num_rows == 0
    empty = t.slice(0, 0)
    assert Select(by="score", top=3)(empty).num_rows == 0
    assert Select(by="score", stratify="language", top_fraction=0.5)(empty).num_rows == 0


# -- a column named twice in `where` ---------------------------------------------------------------

def test_where_naming_a_column_twice_runs_and_validates(tmp_path):
    from click.testing import CliRunner

    from curate.cli import main
    from helpers import write_yaml

    t = _docs().append_column("source", pa.array([f"{'a' if i % 3 == 0 else 'b' if i % 3 == 1 else 'c'}.html"
                                                 for i in range(12)]))
    got = _ids(Select(where="score > 0.4 and score < 0.9")(t))
    assert got == [r["id"] for r in t.to_pylist() if r["score"] is not None and 0.4 < r["score"] < 0.9]
    got = _ids(Select(where="source LIKE '%a%' OR source LIKE '%b%'")(t))
    assert got == [r["id"] for r in t.to_pylist() if r["source"][0] in "ab"] and len(got) == 8
    # validate evaluates the expression as a run does: a bad one is found before any work
    pq.write_table(t, tmp_path / "docs.parquet")
    for where, ok in (("score > 0.4 and score < 0.9", True), ("source LIKE '%a%' OR source LIKE '%b%'", True),
                      ("score > 0.4 and score.foo", False)):
        p = write_yaml(str(tmp_path / "p.yaml"), {
            "name": "x", "output": str(tmp_path / "out"),
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": [str(tmp_path / "docs.parquet")]}}},
            "stages": [{"stage": "select", "options": {"where": where}}]})
        r = CliRunner().invoke(main, ["validate", p])
        assert (r.exit_code == 0) == ok, r.output
        if not ok:
            assert r.exit_code == 2 and "where" in r.output


def test_validate_checks_where_names_against_the_columns_of_known_steps(tmp_path):
    from click.testing import CliRunner

    from curate.cli import main
    from helpers import write_yaml

    def pipeline(where):
        return write_yaml(str(tmp_path / "p.yaml"), {
            "name": "x", "output": str(tmp_path / "out"),
            "inputs": {"pages": {"stage": "read_pydoc", "options": {"modules": ["json"]}}},
            "stages": [{"stage": "extract_html"}, {"stage": "language_id"},
                       {"stage": "select", "options": {"where": where}}]})

    ok = CliRunner().invoke(main, ["validate", pipeline("language_score > 0.7 and language_score < 0.9")])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, ["validate", pipeline("langauge_score > 0.7 or html != ''")])
    assert bad.exit_code == 2
    assert "names column(s) ['langauge_score', 'html'] that no earlier step writes" in bad.output
    assert "language_score" in bad.output           # the known columns are listed
    # a Parquet input may hold any column: left to the run
    pq.write_table(pa.table({"id": ["a"], "text": ["x"], "custom": [1.0]}), tmp_path / "d.parquet")
    p = write_yaml(str(tmp_path / "q.yaml"), {
        "name": "x", "output": str(tmp_path / "out"),
        "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": [str(tmp_path / "d.parquet")]}}},
        "stages": [{"stage": "select", "options": {"where": "custom > 0.5"}}]})
    assert CliRunner().invoke(main, ["validate", p]).exit_code == 0
