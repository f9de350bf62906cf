"""heuristic_filter gives datatrove's decisions: the same keep/drop, the same reason and the same
C4-cleaned text as datatrove's four filters called directly, on a few thousand varied documents,
at the defaults and with other options; a huge document is dropped before it is tokenized."""

from __future__ import annotations

import pyarrow as pa
import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)

from curate.stages.clean.heuristic_filter import HeuristicFilter, tokenizer_language

from heuristic_docs import varied_documents

# minutes of parity/cluster checks: in `make test-slow` (CI runs both)
pytestmark = pytest.mark.slow

RULE_SETS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
ALL_OFF = {k: {"enabled": False} for k in RULE_SETS}

OPTION_SETS = {
    "defaults": {},
    "tuned": {
        "gopher_repetition": {"dup_line_frac": 0.5, "dup_para_char_frac": None,
                              "top_n_grams": [(1, 0.3), (2, 0.1), (5, 0.05)],
                              "dup_n_grams": [(3, 0.2), (11, 0.05), (4, 0.08)]},
        "gopher_quality": {"min_doc_words": 20, "max_doc_words": 400, "min_avg_word_length": 2,
                           "max_avg_word_length": 12, "max_symbol_word_ratio": 0.05,
                           "max_bullet_lines_ratio": 0.5, "max_ellipsis_lines_ratio": 0.1,
                           "max_non_alpha_words_ratio": 0.6, "min_stop_words": 3,
                           "stop_words": ["the", "a", "is", "of", "der", "die", "le", "la", "."]},
        "c4": {"remove_citations": False, "filter_no_terminal_punct": False, "min_num_sentences": 8,
               "min_words_per_line": -1, "max_word_length": 30, "filter_lorem_ipsum": False,
               "filter_curly_bracket": False},
        "fineweb": {"line_punct_thr": 0.3, "line_punct_exclude_zero": True, "short_line_thr": 0.4,
                    "short_line_length": 50, "char_duplicates_ratio": 0.05, "new_line_ratio": 0.1},
    },
    "loose": {
        "gopher_repetition": {"enabled": False},
        "gopher_quality": {"min_doc_words": None, "max_doc_words": None, "min_avg_word_length": None,
                           "max_non_alpha_words_ratio": None, "min_stop_words": None},
        "c4": {"min_num_sentences": -1, "filter_javascript": False, "filter_policy": False,
               "modify_text": False, "min_words_per_line": 0},
        "fineweb": {"new_line_ratio": 0.9},
    },
    # each rule set alone, so that every rule sees documents an earlier one would drop
    **{f"only_{name}": {**ALL_OFF, name: {}} for name in RULE_SETS},
    # other tokenizers: spaCy's German and French rules; a language datatrove splits with its
    # whitespace tokenizer (spaCy "xx" words, regex sentences)
    "german": {"language": "de"},
    "french": {"language": "fr", "c4": {"min_num_sentences": 3}},
    "whitespace_tokenizer": {"language": "aii"},
}


def reference_filters(cfg) -> list[tuple[str, object, bool]]:
    """datatrove's filters built from the stage's options: [(name, filter, writes text)]."""
    lang = tokenizer_language(cfg.language)
    out = []
    if cfg.gopher_repetition.enabled:
        o = cfg.gopher_repetition.model_dump(exclude={"enabled"})
        o["top_n_grams"] = tuple(tuple(x) for x in o["top_n_grams"])
        o["dup_n_grams"] = tuple(tuple(x) for x in o["dup_n_grams"])
        out.append(("gopher_repetition", GopherRepetitionFilter(**o, language=lang), False))
    if cfg.gopher_quality.enabled:
        o = cfg.gopher_quality.model_dump(exclude={"enabled"})
        out.append(("gopher_quality", GopherQualityFilter(**o, language=lang), False))
    if cfg.c4.enabled:
        o = cfg.c4.model_dump(exclude={"enabled", "modify_text"})
        out.append(("c4", C4QualityFilter(**o, language=lang), cfg.c4.modify_text))
    if cfg.fineweb.enabled:
        o = cfg.fineweb.model_dump(exclude={"enabled"})
        out.append(("fineweb", FineWebQualityFilter(**o, language=lang), False))
    return out


def reference_decision(filters, text: str) -> tuple[str | None, str]:
    """(drop reason or None, output text) of datatrove's filters applied in FineWeb's order."""
    if not text.strip():
        return "heuristic_filter:empty_text", text
    doc = Document(text=text, id="x")
    for name, flt, writes_text in filters:
        before = doc.text
        res = flt.filter(doc)
        if res is not True:
            return f"{name}:{res[1] if isinstance(res, tuple) else 'filtered'}", text
        if not writes_text:
            doc.text = before
    return None, doc.text


def compare(docs: list[str], options: dict) -> tuple[int, dict[str, int]]:
    st = HeuristicFilter(**options)
    st.ensure_setup()
    ref = reference_filters(st.config)
    mismatches = []
    reasons: dict[str, int] = {}
    for i, text in enumerate(docs):
        want = reference_decision(ref, text)
        got = st.check_one(text, str(i))
        if got != want:
            mismatches.append((i, want[0], got[0], text[:300]))
        reasons[want[0] or "kept"] = reasons.get(want[0] or "kept", 0) + 1
    assert not mismatches, f"{len(mismatches)} differences, first: {mismatches[:3]}"
    return len(docs), reasons


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return varied_documents(2000, seed=1)


@pytest.mark.parametrize("name, n_docs, min_reasons", [
    ("defaults", 2000, 12), ("tuned", 1000, 12), ("loose", 1000, 6), ("only_c4", 800, 3),
    ("only_fineweb", 800, 4), ("french", 500, 8), ("whitespace_tokenizer", 500, 8)])
def test_same_decisions_as_datatrove(docs, name, n_docs, min_reasons):
    n, reasons = compare(docs[:n_docs], OPTION_SETS[name])
    # the corpus exercises many rules: several reasons and some documents kept
    assert reasons.get("kept", 0) >= 20 and len(reasons) - 1 >= min_reasons, reasons


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_same_decisions_as_datatrove_more_documents(name):
    compare(varied_documents(4000, seed=7), OPTION_SETS[name])


def test_table_path_matches(docs):
    """Through the stage as a library call on a table: kept rows, their text and drop reasons."""
    sub = docs[:600]
    table = pa.table({"id": [str(i) for i in range(len(sub))], "text": sub})
    st = HeuristicFilter(save_dropped=True)
    out = st(table)
    ref = reference_filters(st.config)
    kept = dict(zip(out.column("id").to_pylist(), out.column("text").to_pylist()))
    side = st.take_side()["dropped"]
    dropped = dict(zip(side.column("id").to_pylist(), side.column("drop_reason").to_pylist()))
    for i, text in enumerate(sub):
        reason, new = reference_decision(ref, text)
        if reason is None:
            assert kept[str(i)] == new
        else:
            assert dropped[str(i)] == reason
    modified = sum(1 for i, t in enumerate(sub) if str(i) in kept and kept[str(i)] != t)
    assert st.counters.to_dict().get("heuristic_filter/c4_modified", 0) == modified > 0


def test_huge_document_dropped_before_tokenizing(monkeypatch):
    """A 30 MB document is dropped as gopher_long_doc without a word being tokenized."""
    import datatrove.utils.text as dt_text

    from curate.text.spacy_words import SpacyWords

    para = ("The committee said that it would continue to watch the data closely and that it "
            "was prepared to act if the outlook for prices changed. ")
    # distinct lines so that Gopher repetition's line checks pass (as they must before the bound)
    huge = "\n".join(f"{para}Line {i} of the report." for i in range(30_000_000 // (len(para) + 30)))
    assert len(huge) > 29_000_000
    # below the bound nothing is short-cut
    st2 = HeuristicFilter(gopher_quality={"max_doc_words": 10_000_000})
    st2.ensure_setup()
    assert st2._rules._certainly_long(huge) is False
    st = HeuristicFilter()
    st.ensure_setup()
    calls = []
    monkeypatch.setattr(SpacyWords, "word_ids", lambda self, text: calls.append("words"))
    monkeypatch.setattr(SpacyWords, "_add_entries", lambda self, pieces: calls.append("spacy"))
    monkeypatch.setattr(dt_text, "split_into_words", lambda *a, **k: calls.append("datatrove"))
    out = st(pa.table({"id": ["huge"], "text": [huge]}))
    assert out.num_rows == 0 and calls == []
    c = st.counters.to_dict()
    assert c["dropped/gopher_quality:gopher_long_doc"] == 1
    assert st._rules.shortcuts == 1


def test_certain_length_bound_is_a_lower_bound(docs):
    """The chunk count used for the shortcut never exceeds datatrove's non-symbol word count."""
    from datatrove.utils.text import PUNCTUATION_SET, split_into_words

    punct = "".join(sorted(PUNCTUATION_SET))
    for text in docs[:800] + ["a-b c.d ... !!! x", ":) :-( (-_-) #", "\u3000x\xa0y\x85z"]:
        bound = sum(1 for c in text.split() if c.strip(punct))
        words = split_into_words(text, "eng")
        assert bound <= sum(1 for w in words if any(ch not in PUNCTUATION_SET for ch in w))


TRICKY = [
    "Example: (see below) :) :( (: ): it 's a test. John's 10a.m. 10 a.m. wait ... ok.",
    "\"Quote\" (-_-) ( -_- ) ( ._. ) :'( : ' ( 8) 8 ) and/or and / or ' s ' cause",
    "x  . y \t z. a.  b. Hi!  \tYes. no.\u00a0Next\u3000one.\x85Done .",
    ":) :) :-) :- ) (:- e.g. i.e. U.S. Mr. Smith's dogs' 'em 'n' rock'n'roll",
    "https://example.com/a?b=c user@example.com #tag $5.00 5km 3:30pm C++ (a) [b] {c}",
    "数据清洗是训练语言模型的重要步骤。Это пример текста. Αυτό είναι. هذا مثال",
    "Hello.  ", " [1] x. y", "a. \tb", "Hello.\x0bWorld", "x\u00a0. y", "", " ", "a",
]


def test_words_and_sentence_counts_match_spacy(docs):
    """The cached per-chunk tokenization gives datatrove's words and C4's sentence counts, also
    across special cases and odd whitespace, and after the cache was emptied."""
    from datatrove.utils.text import split_into_sentences, split_into_words

    from curate.text.spacy_words import SpacyWords

    for max_entries in (300_000, 40):  # 40: the cache is emptied again and again
        sw = SpacyWords("eng", max_entries=max_entries)
        for text in TRICKY + docs[:300]:
            got = [sw.text_of(i) for i in sw.word_ids(text)]
            assert got == split_into_words(text, "eng"), text
            for line in text.splitlines()[:20]:
                assert sw.count_sentences(line) == len(split_into_sentences(line, "eng")), line
        assert sw.fast_words and sw.fast_sentences
    assert sw.tokenizer_calls > 0


def test_options_checked_early():
    with pytest.raises(Exception, match="n-gram size"):
        HeuristicFilter(gopher_repetition={"dup_n_grams": [(0, 0.1)]})
    from curate.pipeline.stage import StageError

    with pytest.raises(StageError, match="tokenizer"):
        HeuristicFilter(language="no-such-language").ensure_setup()
