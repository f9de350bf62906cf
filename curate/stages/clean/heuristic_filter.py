"""``heuristic_filter``: Gopher quality and repetition, C4 and FineWeb rules.

The rules, their published defaults and their drop reasons are datatrove's
(``datatrove.pipeline.filters``: ``GopherRepetitionFilter``, ``GopherQualityFilter``,
``C4QualityFilter``, ``FineWebQualityFilter``), evaluated by :mod:`curate.text.heuristics`, which
gives datatrove's decisions several times faster: each document is tokenized once (spaCy's tokens,
cached per whitespace chunk) for all rules, and word statistics and n-gram repetition run in
compiled loops. Each rule set can be switched off (``enabled: false``) and every threshold tuned.
They run in FineWeb's order (Gopher repetition, Gopher quality, C4, FineWeb); the first rule that
rejects a document names the drop reason ``dropped/<filter>:<reason>``, e.g.
``dropped/gopher_quality:gopher_short_doc``, ``dropped/c4:too_few_sentences``,
``dropped/fineweb:line_punct_ratio``.

``preset`` picks option values for a kind of text: ``web`` (the published defaults above),
``docs`` (documentation with examples), ``code_docs`` (API references, man pages, code-heavy
pages) and ``scientific`` (formulas, symbols, LaTeX); options given next to it override the
preset's, key by key (``PRESETS``; keep rates measured per corpus in the README). The published
defaults drop most documentation (the Gopher alpha-word ratio drops code-heavy pages, C4 and
FineWeb drop pages whose lines do not end in punctuation) and C4 deletes code lines from what it
keeps; the documentation presets keep the text as it is (``c4.modify_text: false``).

C4 is also a line filter: it removes lines without terminal punctuation, with "javascript",
cookie/privacy boilerplate, citation markers... from the documents it keeps, as in C4. The stage
writes that cleaned text back (``c4.modify_text``, default true; counted as
``heuristic_filter/c4_modified``); FineWeb's rules then see the cleaned text, as in datatrove.

A huge document (over a million characters) with more than ``gopher_quality.max_doc_words``
words for certain (more whitespace-separated chunks with a non-punctuation character than that)
is dropped as ``dropped/gopher_quality:gopher_long_doc`` without being tokenized, after Gopher
repetition's paragraph and line checks (datatrove would run its n-gram checks first and might
name one of them).

Documents with null or empty text are dropped as ``dropped/heuristic_filter:empty_text``; a rule
that raises on a document drops it as ``dropped/<filter>:error`` and counts
``errors/<filter>/<Exception>`` (logged). With ``save_dropped: true`` the dropped rows, with their
``drop_reason``, go to the side output ``dropped``.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curate.pipeline.api import FilterStage, Resources, StageConfig, StageError, register

# ISO 639-1 codes (lid.176 style) -> datatrove's language codes (ISO 639-3), for convenience
_ISO1_TO_3 = {"en": "eng", "de": "deu", "fr": "fra", "es": "spa", "it": "ita", "pt": "por",
              "nl": "nld", "ru": "rus", "pl": "pol", "sv": "swe", "da": "dan", "fi": "fin",
              "cs": "ces", "tr": "tur", "ja": "jpn", "ko": "kor", "zh": "cmn", "ar": "arb"}


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="apply this rule set")


class GopherRepetitionRules(_Rules):
    """Gopher (Rae et al. 2021, table A1) repetition removal; datatrove defaults."""

    dup_line_frac: float | None = Field(0.3, description="max fraction of duplicated lines")
    dup_para_frac: float | None = Field(0.3, description="max fraction of duplicated paragraphs")
    dup_line_char_frac: float | None = Field(0.2, description="max fraction of chars in dup lines")
    dup_para_char_frac: float | None = Field(0.2, description="max fraction of chars in dup paragraphs")
    top_n_grams: list[tuple[int, float]] = Field(
        [(2, 0.2), (3, 0.18), (4, 0.16)],
        description="(n, max fraction of chars covered by the most frequent n-gram)")
    dup_n_grams: list[tuple[int, float]] = Field(
        [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.1)],
        description="(n, max fraction of chars in duplicated n-grams)")

    @field_validator("top_n_grams", "dup_n_grams")
    @classmethod
    def _positive_n(cls, v: list[tuple[int, float]]) -> list[tuple[int, float]]:
        for n, _ in v:
            if n < 1:
                raise ValueError(f"n-gram size must be >= 1, got {n}")
        return v


class GopherQualityRules(_Rules):
    """Gopher quality rules; datatrove defaults (the paper's values)."""

    min_doc_words: int | None = Field(50, description="min words (non-symbol)")
    max_doc_words: int | None = Field(100000, description="max words (non-symbol)")
    min_avg_word_length: float | None = Field(3, description="min mean word length")
    max_avg_word_length: float | None = Field(10, description="max mean word length")
    max_symbol_word_ratio: float | None = Field(0.1, description="max ('#' or ellipsis) per word")
    max_bullet_lines_ratio: float | None = Field(0.9, description="max fraction of bullet lines")
    max_ellipsis_lines_ratio: float | None = Field(0.3, description="max fraction of lines ending "
                                                                    "with an ellipsis")
    max_non_alpha_words_ratio: float | None = Field(0.8, description="min fraction of words with a "
                                                                     "letter (name kept from datatrove)")
    min_stop_words: int | None = Field(2, description="min distinct stop words present")
    stop_words: list[str] | None = Field(None, description="stop words (default: Gopher's English "
                                                           "the/be/to/of/and/that/have/with)")


class C4Rules(_Rules):
    """C4 (Raffel et al. 2020) rules; datatrove defaults. FineWeb uses filter_no_terminal_punct: false."""

    split_paragraph: bool = Field(True, description="lines are split on newlines (C4); false: "
                                                    "on sentences")
    remove_citations: bool = Field(True, description="remove wikipedia-style [1] citations")
    filter_no_terminal_punct: bool = Field(True, description="remove lines without terminal "
                                                             "punctuation")
    min_num_sentences: int = Field(5, description="min sentences kept (-1: off)")
    min_words_per_line: int = Field(3, description="min words per kept line (-1: off)")
    max_word_length: int = Field(1000, description="remove lines with a longer word (-1: off)")
    filter_lorem_ipsum: bool = Field(True, description="drop documents with 'lorem ipsum'")
    filter_javascript: bool = Field(True, description="remove lines mentioning javascript")
    filter_curly_bracket: bool = Field(True, description="drop documents with '{'")
    filter_policy: bool = Field(True, description="remove cookie/terms/privacy policy lines")
    modify_text: bool = Field(True, description="write the line-filtered text of kept documents")


class FineWebRules(_Rules):
    """FineWeb (Penedo et al. 2024) custom rules; datatrove defaults."""

    line_punct_thr: float = Field(0.12, description="min fraction of lines ending in punctuation")
    line_punct_exclude_zero: bool = Field(False, description="do not drop docs with zero such lines")
    short_line_thr: float = Field(0.67, description="max fraction of short lines")
    short_line_length: int = Field(30, description="a short line has at most this many chars")
    char_duplicates_ratio: float = Field(0.01, description="max fraction of chars in dup lines")
    new_line_ratio: float = Field(0.3, description="max newlines per word")


# Presets: option values for a kind of text, under the options given (an option set in the
# pipeline wins over its preset's value, key by key inside each rule set). Chosen by measuring keep
# rates and drop reasons on real corpora of each kind (README, "heuristic_filter presets").
PRESETS: dict[str, dict[str, dict[str, object]]] = {
    # the published defaults of Gopher, C4 and FineWeb (datatrove's), made for web crawls
    "web": {},
    # documentation prose with examples (tutorials, guides, how-tos): code lines, short headings,
    # API signatures and symbols are part of the text; C4's line filter would delete the code
    "docs": {
        "gopher_repetition": {"dup_line_frac": 0.5, "dup_para_frac": 0.5, "dup_line_char_frac": 0.35,
                              "dup_para_char_frac": 0.35,
                              "top_n_grams": [(2, 0.3), (3, 0.27), (4, 0.24)],
                              "dup_n_grams": [(5, 0.35), (6, 0.33), (7, 0.31), (8, 0.29), (9, 0.27), (10, 0.25)]},
        "gopher_quality": {"max_doc_words": 200_000, "max_avg_word_length": 15, "max_symbol_word_ratio": 0.5,
                           "max_bullet_lines_ratio": 0.95, "max_non_alpha_words_ratio": 0.4},
        "c4": {"modify_text": False, "filter_no_terminal_punct": False, "filter_curly_bracket": False,
               "filter_javascript": False, "min_num_sentences": 2},
        "fineweb": {"line_punct_thr": 0.0, "short_line_thr": 0.95, "char_duplicates_ratio": 0.2,
                    "new_line_ratio": 1.0},
    },
    # API references, man pages, code-heavy pages: docs, with room for mostly-code pages
    "code_docs": {
        "gopher_repetition": {"dup_line_frac": 0.6, "dup_para_frac": 0.6, "dup_line_char_frac": 0.5,
                              "dup_para_char_frac": 0.5,
                              "top_n_grams": [(2, 0.4), (3, 0.36), (4, 0.32)],
                              "dup_n_grams": [(5, 0.5), (6, 0.48), (7, 0.46), (8, 0.44), (9, 0.42), (10, 0.4)]},
        "gopher_quality": {"min_doc_words": 30, "max_doc_words": 300_000, "min_avg_word_length": 2,
                           "max_avg_word_length": 20, "max_symbol_word_ratio": None,
                           "max_bullet_lines_ratio": None, "max_ellipsis_lines_ratio": 0.5,
                           "max_non_alpha_words_ratio": 0.25, "min_stop_words": 2},
        "c4": {"modify_text": False, "filter_no_terminal_punct": False, "filter_curly_bracket": False,
               "filter_javascript": False, "filter_policy": False, "min_num_sentences": 1,
               "min_words_per_line": -1},
        "fineweb": {"enabled": False},
    },
    # papers, scientific docs: formulas, symbols and LaTeX braces; citations and references lists
    "scientific": {
        "gopher_repetition": {"dup_line_frac": 0.4, "dup_para_frac": 0.4, "dup_line_char_frac": 0.3,
                              "dup_para_char_frac": 0.3,
                              "top_n_grams": [(2, 0.25), (3, 0.22), (4, 0.2)],
                              "dup_n_grams": [(5, 0.25), (6, 0.24), (7, 0.23), (8, 0.22), (9, 0.21), (10, 0.2)]},
        "gopher_quality": {"max_avg_word_length": 15, "max_symbol_word_ratio": 0.3,
                           "max_non_alpha_words_ratio": 0.35},
        "c4": {"modify_text": False, "filter_no_terminal_punct": False, "filter_curly_bracket": False,
               "remove_citations": False, "min_num_sentences": 3},
        "fineweb": {"line_punct_thr": 0.0, "short_line_thr": 0.9, "char_duplicates_ratio": 0.1,
                    "new_line_ratio": 0.6},
    },
}


class HeuristicFilterConfig(StageConfig):
    preset: Literal["web", "docs", "code_docs", "scientific"] = Field(
        "web", description="option values for a kind of text (web: the published defaults; docs, "
        "code_docs, scientific: measured on such corpora); options given here override it")
    text_column: str = Field("text", description="column holding the document text")
    language: str = Field("eng", description="language of the word tokenizer (datatrove code, "
                                             "ISO 639-3; ISO 639-1 codes such as 'en' are mapped)")
    gopher_repetition: GopherRepetitionRules = Field(
        default_factory=GopherRepetitionRules, description="Gopher repetition rules (enabled, "
        "dup_line_frac, dup_para_frac, dup_line_char_frac, dup_para_char_frac, top_n_grams, dup_n_grams)")
    gopher_quality: GopherQualityRules = Field(
        default_factory=GopherQualityRules, description="Gopher quality rules (enabled, min/max_doc_words, "
        "min/max_avg_word_length, max_symbol_word_ratio, max_bullet_lines_ratio, "
        "max_ellipsis_lines_ratio, max_non_alpha_words_ratio, min_stop_words, stop_words)")
    c4: C4Rules = Field(default_factory=C4Rules, description=(
        "C4 rules (enabled, split_paragraph, remove_citations, filter_no_terminal_punct, "
        "min_num_sentences, min_words_per_line, max_word_length, filter_lorem_ipsum, "
        "filter_javascript, filter_curly_bracket, filter_policy, modify_text)"))
    fineweb: FineWebRules = Field(default_factory=FineWebRules, description=(
        "FineWeb rules (enabled, line_punct_thr, line_punct_exclude_zero, short_line_thr, "
        "short_line_length, char_duplicates_ratio, new_line_ratio)"))
    save_dropped: bool = Field(False, description="side output 'dropped' with the dropped rows")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """The preset's values under the options given, key by key inside each rule set."""
        if not isinstance(data, dict):
            return data
        preset = PRESETS.get(data.get("preset", "web"))
        if not preset:
            return data   # "web", or an unknown name (reported by the field's own check)
        out = dict(data)
        for group, values in preset.items():
            given = out.get(group)
            if given is None:
                out[group] = dict(values)
            elif isinstance(given, dict):
                out[group] = {**values, **given}
        return out


def tokenizer_language(language: str) -> str:
    """datatrove's language code for the word tokenizer (ISO 639-1 codes are mapped)."""
    return _ISO1_TO_3.get(language, language)


@register
class HeuristicFilter(FilterStage):
    """Gopher quality/repetition, C4 and FineWeb heuristic rules (datatrove's, with its decisions)."""

    name = "heuristic_filter"
    # not spacy: importing it imports torch (through thinc)
    preload = ("datatrove.utils.text", "curate.text.heuristics")
    requires = ("datatrove.pipeline.filters", "spacy", "numba")
    Config = HeuristicFilterConfig
    reads = ("{text_column}",)
    writes = {"text": pa.string()}
    resources = Resources(cpus=1.0)

    def setup(self) -> None:
        import pyarrow.compute  # noqa: F401 - used by FilterStage.process; import it before the first batch

        from curate.text.heuristics import HeuristicRules

        try:
            self._rules = HeuristicRules(self.config, tokenizer_language(self.config.language))
        except (ImportError, ValueError) as exc:
            raise StageError(f"heuristic_filter: cannot load the word tokenizer for language "
                             f"{self.config.language!r}: {exc}") from exc
        self._rules.warm_up()

    def check_one(self, text: str | None, doc_id: str = "") -> tuple[str | None, str | None]:
        """(reason or None, text after line filters) for one document."""
        from curate.text.heuristics import RuleError

        if text is None or not text.strip():
            return "heuristic_filter:empty_text", text
        try:
            rule, why, out = self._rules.check(text)
        except RuleError as err:
            self.error(f"{err.rule}/{type(err.exc).__name__}", doc_id=doc_id, detail=str(err.exc)[:200])
            return f"{err.rule}:error", text
        if rule is not None:
            return f"{rule}:{why}", text
        if out != text:
            self.count("heuristic_filter/c4_modified")
        return None, out

    def annotate(self, table: pa.Table) -> pa.Table:
        col = self.config.text_column
        t = table.schema.field(col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise StageError(f"heuristic_filter: column {col!r} has type {t}; expected text")
        ids = table.column("id").to_pylist() if "id" in table.schema.names else [""] * table.num_rows
        reasons, texts = [], []
        changed = False
        for doc_id, text in zip(ids, table.column(col).to_pylist()):
            reason, new = self.check_one(text, doc_id)
            reasons.append(reason)
            texts.append(new)
            changed |= new is not text
        self._reasons = reasons
        if changed:
            table = table.set_column(table.schema.names.index(col), col, pa.array(texts, pa.string()))
        return table

    def keep(self, table: pa.Table):
        return [r is None for r in self._reasons], self._reasons
