"""``hf_classify``: scores from a local Hugging Face sequence-classification or regression model.

``model`` is a local folder (``config.json``, weights, tokenizer), never downloaded: a
FineWeb-Edu-style educational-score model (a regression head with one output), or a
quality/domain classifier (DeBERTa and the like; single- or multi-label). The model is loaded
once per worker (``setup``), on the GPU when ``device`` is ``cuda`` or ``auto`` with a GPU
visible (the stage then asks the runner for one GPU per worker: one worker per GPU, each pinned to
its device), in ``dtype`` (``auto``: float32 on CPU, bfloat16 on GPU).

Texts are truncated to ``max_length`` tokens, sorted by token length and batched by a token
budget (``batch_tokens`` = rows x longest text of the batch), then put back in order
(``curate/stages/score/_hf_classifier.py``). Output columns (``prefix``, default ``hf_``):

- regression head: ``<prefix>score`` (float32) and ``<prefix>int_score`` (int32: the score
  rounded, clipped to ``int_range`` when given; FineWeb-Edu uses ``[0, 5]``); several regression
  outputs give ``<prefix><label>`` and ``<prefix>int_<label>`` each;
- classifier: ``<prefix><label>`` (float32 probability per label: softmax, or sigmoid for a
  multi-label model), ``<prefix>label`` (the argmax label, from ``id2label``) and
  ``<prefix>label_id`` (int32).

Null or blank texts get null outputs and are counted (``hf_classify/empty_text``); texts cut at
``max_length`` are counted (``hf_classify/truncated``), and so are tokens (``hf_classify/tokens``).
Scores are stored; thresholds are applied later by ``select``.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from curate.pipeline.api import MapStage, Resources, StageConfig, StageError, register
from curate.stages.score import _hf_classifier as hfc


class HfClassifyConfig(StageConfig):
    model: str = Field(..., description="local Hugging Face model folder (config.json, weights, tokenizer)")
    text_column: str = Field("text", description="column holding the document text")
    prefix: str = Field("hf_", description="prefix of the output column names")
    max_length: int = Field(512, ge=2, description="tokens per text (longer texts are truncated)")
    batch_tokens: int = Field(16384, ge=16, description="padded tokens per forward batch (rows x longest)")
    max_batch_size: int = Field(256, ge=1, description="rows per forward batch at most")
    device: str = Field("auto", description="auto (cuda when a GPU is visible), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float32 on CPU, bfloat16 on GPU")
    activation: Literal["auto", "none", "softmax", "sigmoid"] = Field(
        "auto", description="auto: none for regression, sigmoid for multi-label, else softmax")
    int_range: tuple[int, int] | None = Field(
        None, description="[min, max] the rounded int score is clipped to (FineWeb-Edu: [0, 5])")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", v):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v


def _column_word(label: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_") or "label"


def _gpu_visible() -> bool:
    from curate.pipeline.api import gpu_count

    return gpu_count() > 0


@register
class HfClassify(MapStage):
    """Scores from a local Hugging Face sequence-classification or regression model."""

    name = "hf_classify"
    Config = HfClassifyConfig
    reads = ("{text_column}",)
    resources = Resources(cpus=1.0, memory_gb=2.0)
    requires = ("torch", "transformers")
    # a failing batch is a model/device problem, not a document's: do not retry 10,000 rows one by one
    isolate_errors = False

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.config
        if cfg.device.startswith("cuda") or (cfg.device == "auto" and _gpu_visible()):
            self.resources = Resources(cpus=1.0, gpus=1.0, memory_gb=2.0)
        self._clf: hfc.SequenceClassifier | None = None
        try:
            model_cfg = hfc.read_model_config(cfg.model)
        except (OSError, ValueError):
            model_cfg = None                   # reported by check()
        if model_cfg is not None:
            self.head = hfc.head_kind(model_cfg)
            self.labels = hfc.label_names(model_cfg)
            self.columns = self._columns()
            self.writes = dict(self.columns)

    # -- columns ---------------------------------------------------------------------------------
    def _columns(self) -> dict[str, pa.DataType]:
        p = self.config.prefix
        regression = self.head == "regression" and self.config.activation in ("auto", "none")
        if regression and len(self.labels) == 1:
            return {f"{p}score": pa.float32(), f"{p}int_score": pa.int32()}
        words = [_column_word(x) for x in self.labels]
        if len(set(words)) < len(words):           # labels that differ only in case/punctuation
            words = [f"{w}_{i}" for i, w in enumerate(words)]
        self._words = words
        if regression:
            return {**{f"{p}{w}": pa.float32() for w in words}, **{f"{p}int_{w}": pa.int32() for w in words}}
        return {**{f"{p}{w}": pa.float32() for w in words}, f"{p}label": pa.string(), f"{p}label_id": pa.int32()}

    # -- validation ------------------------------------------------------------------------------
    def check(self) -> list[tuple[str, str]]:
        try:
            cfg = hfc.read_model_config(self.config.model)
        except (OSError, ValueError) as exc:
            return [("model", str(exc))]
        archs = cfg.get("architectures") or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            return [("model", f"{self.config.model} is a {archs[0]}, not a sequence-classification model")]
        folder = self.config.model
        if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                        "vocab.txt", "spm.model")):
            return [("model", f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json)")]
        if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder)):
            return [("model", f"{folder} has no weights (*.safetensors / *.bin)")]
        return []

    def fingerprint_extra(self) -> str:
        """config.json's content and each weight file's size and mtime: a changed model rescores."""
        h = hashlib.sha256()
        try:
            with open(os.path.join(self.config.model, "config.json"), "rb") as f:
                h.update(f.read())
            for name in sorted(os.listdir(self.config.model)):
                st = os.stat(os.path.join(self.config.model, name))
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            return "missing"
        return h.hexdigest()

    # -- work ------------------------------------------------------------------------------------
    def setup(self) -> None:
        problems = self.check()
        if problems:
            raise StageError(f"{self.step_name}: key 'options.{problems[0][0]}': {problems[0][1]}")
        c = self.config
        if c.device.startswith("cuda"):
            # checked here, in the worker, not at validate time: under Ray the driver may have no GPU
            import torch

            if not torch.cuda.is_available():
                raise StageError(f"{self.step_name}: key 'options.device': {c.device!r} but torch sees no "
                                 "CUDA GPU in this worker; use device: auto or cpu")
        self._clf = hfc.SequenceClassifier(c.model, device=c.device, dtype=c.dtype, max_length=c.max_length,
                                           batch_tokens=c.batch_tokens, max_batch_size=c.max_batch_size,
                                           activation=c.activation).load()

    def teardown(self) -> None:
        self._clf = None

    def process(self, table: pa.Table) -> pa.Table:
        col = table.column(self.config.text_column)
        if pa.types.is_null(col.type):
            col = col.cast(pa.string())
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise StageError(f"{self.step_name}: column {self.config.text_column!r} has type {col.type}; "
                             "expected text")
        texts = col.to_pylist()
        idx = [i for i, t in enumerate(texts) if t and not t.isspace()]
        if len(idx) < len(texts):
            self.count("hf_classify/empty_text", len(texts) - len(idx))
        clf = self._clf
        before = dict(clf.stats)
        scores = clf.scores([texts[i] for i in idx])
        self.count("hf_classify/tokens", clf.stats["tokens"] - before["tokens"])
        self.count("hf_classify/truncated", clf.stats["truncated"] - before["truncated"])
        for name, arr in zip(self.columns, self._arrays(scores, idx, len(texts))):
            if name in table.schema.names:
                table = table.set_column(table.schema.names.index(name), name, arr)
            else:
                table = table.append_column(name, arr)
        return table

    def _arrays(self, scores: Any, idx: list[int], n: int) -> list[pa.Array]:
        import numpy as np

        def full(values: Any, typ: pa.DataType) -> pa.Array:
            out: list[Any] = [None] * n
            for i, v in zip(idx, values):
                out[i] = v
            return pa.array(out, typ)

        def ints(values: Any) -> Any:
            r = np.rint(values)
            if self.config.int_range is not None:
                r = np.clip(r, *self.config.int_range)
            return r.astype(np.int64).tolist()

        types = list(self.columns.values())
        if f"{self.config.prefix}score" in self.columns:
            return [full(scores[:, 0].tolist(), types[0]), full(ints(scores[:, 0]), types[1])]
        k = len(self.labels)
        floats = [full(scores[:, j].tolist(), pa.float32()) for j in range(k)]
        if types[k] == pa.int32():                 # several regression outputs
            return floats + [full(ints(scores[:, j]), pa.int32()) for j in range(k)]
        best = scores.argmax(axis=1).tolist() if len(idx) else []
        return floats + [full([self.labels[b] for b in best], pa.string()), full(best, pa.int32())]
