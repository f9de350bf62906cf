"""``train_classifier``: train a fastText classifier (domain or quality), evaluate it on held-out text.

Positives (e.g. seed documents of the domain) and negatives (general text) each come from earlier
steps (``{step: NAME}``) and/or paths: Parquet, JSON Lines, or text files (one document per file),
as files, folders or globs. Texts become one line each (``\\n`` -> space, as ``fasttext_score``
feeds them), examples are shuffled by a seeded hash of their id, and a held-out share
(``test_fraction``, by the same hash) is kept out of training. fastText's supervised training runs
with word bigrams by default; ``lr``, ``epoch``, ``dim`` and ``bucket`` left unset are chosen from
the number of training documents (``SMALL_DATA``: small sets get lr 0.5, 20 epochs, dim 32, 200k
buckets; fastText's usual 0.1 / 5 / 100 / 2M from 50,000 documents on). With ``threads: 1``
(default) and a fixed ``seed`` the model is bit-for-bit reproducible. A held-out F1 under 0.8 or a
held-out set with fewer than 30 documents of a class is a warning (logged, ``warnings/<code>``
counters, the card's ``warnings``).

Artifacts, in the step's output folder (``output_dir`` in a library call or ``curate
train-classifier``): ``_model.bin`` and ``_model.json`` (``model.bin``, ``model.json`` in
``output_dir``), a card with the data (sources, counts), the
options, the held-out precision/recall/F1 of the positive label at ``threshold``, and the
model's sha256. The step's rows are the examples used, with ``label``, ``split`` (train/test) and
``classifier_score`` (the model's probability of the positive label). A later step names the model
as ``fasttext_score``'s ``model: {step: <this step>}``; retraining re-runs it.

    - name: train
      stage: train_classifier
      input: [seeds, general]          # orders the steps; the data come from positive/negative
      options: {positive: {step: seeds}, negative: {step: general}, label: finance}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Iterator, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from curate.pipeline.api import GlobalStage, StageConfig, StageError, StepRef, register
from curate.stages.score.fasttext_score import (CARD_FILE, LABEL_PREFIX, MODEL_FILE, STEP_CARD_FILE,
                                                STEP_MODEL_FILE, fasttext_lines, require_training_fasttext)
from curate.stages.score._scoring import sha256_file, unit_hash, writer_dir as _writer_dir

log = logging.getLogger("curate")

Source = str | StepRef
N_BUCKETS = 16   # the training file is shuffled bucket by bucket (bounded memory)
# one example per line: lines end at "\n" only (a "\r" inside a text must not split it)
_TEXT = {"encoding": "utf-8", "errors": "replace", "newline": "\n"}


class TrainClassifierConfig(StageConfig):
    positive: list[Source] = Field(description="documents of the label: {step: NAME} and/or paths "
                                               "(Parquet, JSONL, text files; folders, globs)")
    negative: list[Source] = Field(description="documents of the other class (e.g. general web text)")
    label: str = Field("positive", description="name of the positive label (the score column of "
                                               "fasttext_score is prefix + label)")
    negative_label: str = Field("negative", description="name of the negative label")
    text_column: str = Field("text", description="text column of Parquet sources")
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="held-out share for the metrics")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="P(label) above which a held-out "
                                                              "document counts as predicted positive")
    max_chars: int | None = Field(None, ge=1, description="train on the first N characters only")
    # fastText options (names as in fastText's Python API, snake_case)
    # null (default): chosen from the number of training documents (see SMALL_DATA / auto_options)
    lr: float | None = Field(None, gt=0, description="learning rate (null: 0.5 under 50,000 training "
                                                     "documents, else 0.1)")
    epoch: int | None = Field(None, ge=1, description="epochs (null: 20 under 50,000 training "
                                                      "documents, else 5)")
    dim: int | None = Field(None, ge=1, description="vector size (null: 32 under 50,000 training "
                                                    "documents, else 100)")
    min_count: int = Field(1, ge=1)
    word_ngrams: int = Field(2, ge=1, description="2: word bigrams (DCLM, fastText's recommendation)")
    minn: int = Field(0, ge=0, description="subword character n-grams: min length (0: none)")
    maxn: int = Field(0, ge=0)
    bucket: int | None = Field(None, ge=1, description="hash buckets of n-grams (the model file holds "
                                                       "bucket x dim floats; null: 200,000 under 50,000 "
                                                       "training documents, else 2,000,000)")
    loss: Literal["softmax", "hs", "ova", "ns"] = "softmax"
    seed: int = Field(0, description="fastText's seed and the shuffle/split seed")
    threads: int = Field(1, ge=1, description="1: deterministic; more: faster, not reproducible")
    output_dir: str | None = Field(None, description="where to write model.bin and model.json (library "
                                                     "calls; in a pipeline: also copied here)")

    @field_validator("positive", "negative", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, dict, StepRef)) else v

    @model_validator(mode="after")
    def _labels(self) -> "TrainClassifierConfig":
        for key in ("label", "negative_label"):
            v = getattr(self, key)
            if v.startswith(LABEL_PREFIX):
                setattr(self, key, v[len(LABEL_PREFIX):])
            if not v or any(c.isspace() for c in v):
                raise ValueError(f"`{key}` must be a non-empty word without spaces (got {v!r})")
        if self.label == self.negative_label:
            raise ValueError("`label` and `negative_label` must differ")
        if not self.positive or not self.negative:
            raise ValueError("give at least one `positive` and one `negative` source")
        return self

    def fasttext_options(self, n_train: int | None = None) -> dict[str, Any]:
        """fastText's options; unset ones (null) are chosen for ``n_train`` training documents."""
        auto = auto_options(n_train)
        pick = {k: auto[k] if getattr(self, k) is None else getattr(self, k) for k in auto}
        return {"lr": pick["lr"], "epoch": pick["epoch"], "dim": pick["dim"], "minCount": self.min_count,
                "wordNgrams": self.word_ngrams, "minn": self.minn, "maxn": self.maxn,
                "bucket": pick["bucket"], "loss": self.loss, "seed": self.seed, "thread": self.threads}


# Training sets below this many documents get the small-data options: fastText's own defaults
# (lr 0.1, 5 epochs, dim 100, 2M buckets) are made for millions of lines; on 1,010 documents they
# gave recall 0.064 (F1 0.12) and an 849 MB model, these give F1 0.96 and 25 MB (README).
SMALL_DATA = 50_000
SMALL_OPTIONS = {"lr": 0.5, "epoch": 20, "dim": 32, "bucket": 200_000}
LARGE_OPTIONS = {"lr": 0.1, "epoch": 5, "dim": 100, "bucket": 2_000_000}
# held-out checks: below these the card's metrics say little, or the model is poor
MIN_HELDOUT_PER_CLASS = 30
MIN_HELDOUT_F1 = 0.8


def auto_options(n_train: int | None) -> dict[str, Any]:
    """The options an unset lr / epoch / dim / bucket gets for ``n_train`` training documents."""
    return dict(SMALL_OPTIONS if n_train is None or n_train < SMALL_DATA else LARGE_OPTIONS)


def heldout_warnings(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(code, message) pairs about the held-out evaluation: a poor F1, or too few held-out
    documents of a class for the metrics to mean much."""
    out = []
    pos = metrics["tp"] + metrics["fn"]
    neg = metrics["fp"] + metrics["tn"]
    if pos < MIN_HELDOUT_PER_CLASS or neg < MIN_HELDOUT_PER_CLASS:
        out.append(("small_heldout_set", f"the held-out set has only {pos} positive and {neg} negative "
                    f"documents (< {MIN_HELDOUT_PER_CLASS} of a class): its precision/recall/F1 say little; "
                    "add data or raise test_fraction"))
    f1 = metrics.get("f1")
    if f1 is None or f1 < MIN_HELDOUT_F1:
        shown = "n/a (no positive predicted)" if f1 is None else f"{f1:.3f}"
        out.append(("poor_heldout_f1", f"held-out F1 is {shown} (< {MIN_HELDOUT_F1}): the classifier "
                    "separates the classes poorly; check the data or the options (lr, epoch, dim)"))
    return out


def _describe(src: Source) -> str:
    return f"step {src.step}" if isinstance(src, StepRef) else src


def _reader(path: str, text_column: str):
    """The source stage that reads one file, by its suffix."""
    from curate.stages.sources.read_files import ReadFiles
    from curate.stages.sources.read_jsonl import JSONL_SUFFIXES, ReadJsonl
    from curate.stages.sources.read_parquet import ReadParquet

    low = path.lower()
    if low.endswith(".parquet"):
        return ReadParquet(paths=path, text_column=text_column)
    if low.endswith(JSONL_SUFFIXES) or low.endswith(".jsonl"):
        return ReadJsonl(paths=path)
    return ReadFiles(paths=path)


def binary_metrics(truth: list[bool], predicted: list[bool]) -> dict[str, float | int | None]:
    tp = sum(t and p for t, p in zip(truth, predicted))
    fp = sum(p and not t for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    tn = len(truth) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall else 0.0
          if precision is not None and recall is not None else None)
    return {"precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / len(truth) if truth else None,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "test_docs": len(truth)}


@register
class TrainClassifier(GlobalStage):
    """Train a fastText classifier on positives vs negatives; model file + card with held-out P/R/F1."""

    name = "train_classifier"
    Config = TrainClassifierConfig
    writes = {"label": pa.string(), "split": pa.string(), "classifier_score": pa.float32()}

    def check(self) -> list[tuple[str, str]]:
        from curate.pipeline.api import expand_paths

        problems = []
        for key in ("positive", "negative"):
            for src in getattr(self.config, key):
                if isinstance(src, str):
                    try:
                        if not expand_paths(src):
                            problems.append((key, f"no files match {src}"))
                    except FileNotFoundError:
                        problems.append((key, f"not found: {src}"))
        try:
            require_training_fasttext()
        except StageError as exc:
            problems.append(("", str(exc)))
        return problems

    # -- data --------------------------------------------------------------------------------------
    def iter_source(self, src: Source) -> Iterator[pa.Table]:
        """Document tables (id, text, ...) of one positive/negative source."""
        from curate.pipeline.api import expand_paths, list_parquet

        if isinstance(src, StepRef):
            try:
                files = list_parquet(src.require_path(self.name))
            except (FileNotFoundError, ValueError) as exc:
                raise StageError(f"{self.step_name}: no output of step {src.step!r}: {exc}") from None
        else:
            try:
                files = expand_paths(src)
            except FileNotFoundError:
                raise StageError(f"{self.step_name}: training data not found: {src}") from None
        for f in files:
            reader = _reader(f, self.config.text_column)
            for task in reader.tasks():
                yield from reader.read(task)
            self.counters.merge(reader.counters.take())

    def _write_examples(self, folder: str, writer) -> dict[str, Any]:
        """Write bucketed training lines and the held-out file; emit the example rows."""
        c = self.config
        buckets = [open(os.path.join(folder, f"bucket-{i:02d}.txt"), "w", **_TEXT)
                   for i in range(N_BUCKETS)]
        test = open(os.path.join(folder, "test.txt"), "w", **_TEXT)
        counts = {"positive": 0, "negative": 0, "train": 0, "test": 0, "empty": 0}
        per_source: dict[str, int] = {}
        try:
            for key, label in (("positive", c.label), ("negative", c.negative_label)):
                for src in getattr(c, key):
                    n_src = 0
                    for t in self.iter_source(src):
                        lines = fasttext_lines(t.column("text"), c.max_chars)
                        keep = [line is not None for line in lines]
                        n_blank = len(keep) - sum(keep)
                        if n_blank:
                            counts["empty"] += n_blank
                            self.drop("empty_text", n_blank)
                            t, lines = t.filter(pa.array(keep)), [x for x in lines if x is not None]
                        splits = []
                        for doc_id, line in zip(t.column("id").to_pylist(), lines):
                            u = unit_hash(doc_id, c.seed)
                            if u < c.test_fraction:
                                test.write(f"{label}\t{line}\n")
                                splits.append("test")
                            else:
                                # the hash orders the lines: position inside the bucket, bucket id
                                buckets[int(u * 2**40) % N_BUCKETS].write(
                                    f"{u:.17f}\t{LABEL_PREFIX}{label} {line}\n")
                                splits.append("train")
                        counts[key] += t.num_rows
                        counts["test"] += splits.count("test")
                        counts["train"] += splits.count("train")
                        n_src += t.num_rows
                        writer.write(t.select(["id", "text", "source", "metadata"])
                                     .append_column("label", pa.array([label] * t.num_rows, pa.string()))
                                     .append_column("split", pa.array(splits, pa.string())))
                    per_source[f"{key}: {_describe(src)}"] = n_src
        finally:
            for f in buckets + [test]:
                f.close()
        counts["sources"] = per_source
        return counts

    # -- the run -----------------------------------------------------------------------------------
    def run(self, dataset, writer, ctx) -> None:
        folder = self.local_scratch(ctx, "train")  # fastText trains from local files
        try:
            self._train(folder, writer, ctx)
        finally:                                  # copies of the training data: do not keep them
            shutil.rmtree(folder, ignore_errors=True)

    def _train(self, folder: str, writer, ctx) -> None:
        c = self.config
        fasttext = require_training_fasttext()
        rows = _Rows(os.path.join(folder, "examples.parquet"))
        try:
            data = self._write_examples(folder, rows)
        finally:
            rows.close()
        for key in ("positive", "negative"):
            self.count(f"train_classifier/{key}", data[key])
        if not data["positive"] or not data["negative"]:
            empty = [k for k in ("positive", "negative") if not data[k]]
            raise StageError(f"{self.step_name}: empty training set: no {' and no '.join(empty)} "
                             f"documents with text (sources: {data['sources']})")
        if data["train"] == 0 or data["test"] == 0:
            raise StageError(f"{self.step_name}: {data['positive'] + data['negative']} documents are too "
                             f"few to hold out {c.test_fraction:.0%} for testing and train on the rest")
        train_file = os.path.join(folder, "train.txt")
        with open(train_file, "w", **_TEXT) as out:
            for i in range(N_BUCKETS):
                with open(os.path.join(folder, f"bucket-{i:02d}.txt"), **_TEXT) as f:
                    lines = sorted(f)
                out.writelines(line.split("\t", 1)[1] for line in lines)
        t0 = time.monotonic()
        local_model = os.path.join(folder, MODEL_FILE)
        options = c.fasttext_options(data["train"])
        train_fasttext(train_file, local_model, options, self.step_name)
        model = fasttext.load_model(local_model)
        seconds = time.monotonic() - t0
        labels = [x[len(LABEL_PREFIX):] for x in model.get_labels()]
        if set(labels) != {c.label, c.negative_label}:
            raise StageError(f"{self.step_name}: the trained model has labels {labels}; expected "
                             f"{[c.label, c.negative_label]}")
        key = LABEL_PREFIX + c.label

        def p_label(texts: list[str]) -> list[float]:
            if not texts:
                return []
            labs, probs = model.predict(texts, k=-1)
            return [min(1.0, float(pr[list(lab).index(key)])) for lab, pr in zip(labs, probs)]

        truth, pred = [], []
        with open(os.path.join(folder, "test.txt"), **_TEXT) as f:
            pairs = [line.rstrip("\n").split("\t", 1) for line in f]
        for i in range(0, len(pairs), 4096):
            chunk = pairs[i:i + 4096]
            for (lab, _), p in zip(chunk, p_label([text for _, text in chunk])):
                truth.append(lab == c.label)
                pred.append(p >= c.threshold)
        metrics = binary_metrics(truth, pred)
        metrics["threshold"] = c.threshold
        warned = heldout_warnings(metrics)
        for code, msg in warned:
            self.count(f"warnings/{code}")
            log.warning("%s: %s", self.step_name, msg)
        log.info("%s: held-out precision %s recall %s F1 %s on %d documents (%d positive)", self.step_name,
                 *(f"{metrics[k]:.3f}" if metrics[k] is not None else "n/a" for k in ("precision", "recall", "f1")),
                 metrics["test_docs"], sum(truth))

        card = {
            "model": MODEL_FILE, "sha256": sha256_file(local_model), "bytes": os.path.getsize(local_model),
            "labels": {"positive": c.label, "negative": c.negative_label},
            "score_column": f"fasttext_{c.label}",
            "data": {k: data[k] for k in ("sources", "positive", "negative", "train", "test", "empty")},
            "options": {**options, "test_fraction": c.test_fraction, "max_chars": c.max_chars,
                        "text_preprocessing": "newlines replaced by spaces"},
            "metrics": metrics, "train_seconds": round(seconds, 3),
            "auto_options": sorted(k for k in ("lr", "epoch", "dim", "bucket") if getattr(c, k) is None),
            "warnings": [{"code": code, "message": msg} for code, msg in warned],
            "fasttext": _fasttext_version(),
        }
        self.card = card
        if _writer_dir(writer):
            _publish(local_model, card, _writer_dir(writer), STEP_MODEL_FILE, STEP_CARD_FILE)
        if c.output_dir:
            _publish(local_model, card, c.output_dir, MODEL_FILE, CARD_FILE)
        if not _writer_dir(writer) and not c.output_dir:
            log.warning("%s: no output_dir: the model was not kept", self.step_name)
        # the example rows, with the model's probability of the positive label
        for t in rows.read():
            lines = fasttext_lines(t.column("text"), c.max_chars)
            writer.write(t.append_column("classifier_score", pa.array(p_label(lines), pa.float32())))
            ctx.progress(t.num_rows)


def train_fasttext(train_file: str, model_file: str, options: dict[str, Any], who: str) -> None:
    """Train fastText's supervised model in a child process and save it to ``model_file``.

    Why a child: the fasttext-numpy2 build initialises only ``threads``/10 of the input matrix
    (blocks of 10%) and leaves the rest as whatever the allocator returns; reused heap memory
    made training diverge ("Encountered NaN") or differ between identical runs. The child asks
    glibc to zero-fill every allocation (M_PERTURB), which gives upstream fastText's behaviour (the rest of the matrix starts at zero): identical runs give
    identical models. A child also keeps a fastText abort from taking the run down."""
    import subprocess
    import sys

    import curate

    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(curate.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [pkg_root, os.environ.get("PYTHONPATH")] if p)}
    job = json.dumps({"input": train_file, "output": model_file, "options": options})
    r = subprocess.run([sys.executable, "-c", "from curate.stages.score.train_classifier import _child; _child()"],
                       input=job, text=True, capture_output=True, env=env)
    if r.returncode != 0 or not os.path.exists(model_file):
        err = (r.stderr.strip().splitlines() or ["no message"])[-1]
        hint = " (training diverged: lower `lr`)" if "NaN" in err else ""
        raise StageError(f"{who}: fastText training failed: {err}{hint}")


def _child() -> None:
    import ctypes
    import sys

    try:
        # M_PERTURB 0xFF: glibc fills every new allocation with the complement, 0x00
        ctypes.CDLL("libc.so.6").mallopt(-6, 0xFF)
    except (OSError, AttributeError):
        pass
    job = json.loads(sys.stdin.read())
    fasttext = require_training_fasttext()
    try:
        model = fasttext.train_supervised(input=job["input"], verbose=0, **job["options"])
    except (RuntimeError, ValueError) as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        sys.exit(3)
    model.save_model(job["output"])


class _Rows:
    """The example rows, spilled to a local Parquet file until the model can score them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._w = None

    def write(self, t: pa.Table) -> None:
        import pyarrow.parquet as pq

        if t.num_rows:
            if self._w is None:
                self._w = pq.ParquetWriter(self.path, t.schema)
            self._w.write_table(t.cast(self._w.schema))

    def close(self) -> None:
        if self._w is not None:
            self._w.close()

    def read(self) -> Iterator[pa.Table]:
        from curate.pipeline.api import iter_parquet

        return iter_parquet(self.path, batch_size=4096) if self._w is not None else iter(())


def _publish(model_file: str, card: dict, dest: str, model_name: str, card_name: str) -> None:
    """Copy the model and write its card (naming the model file) into ``dest`` (any fsspec URL)."""
    from curate.pipeline.api import atomic_write_bytes, get_fs, is_local, join

    fs, d = get_fs(dest)
    fs.makedirs(d, exist_ok=True)
    if is_local(fs):
        tmp = os.path.join(d, f".{model_name}.tmp")
        shutil.copyfile(model_file, tmp)
        os.replace(tmp, os.path.join(d, model_name))
    else:
        fs.put_file(model_file, join(d, model_name))
    atomic_write_bytes(fs, join(d, card_name), json.dumps({**card, "model": model_name}, indent=1).encode())


def _fasttext_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("fasttext-numpy2", "fasttext", "fasttext-wheel"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None
