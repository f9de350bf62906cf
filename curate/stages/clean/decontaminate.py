"""``decontaminate``: remove benchmark leakage (eval-set n-grams) from documents.

::

    - stage: decontaminate
      options:
        eval_sets:
          mmlu: {paths: evals/mmlu.jsonl, question: question, answer: answer, choices: choices}
          gsm8k: {paths: evals/gsm8k_test.parquet, question: question, answer: answer}
        ngram: 13
        mode: drop            # drop | remove | flag

Eval sets are local JSONL or Parquet files (nothing is downloaded); each item's text is its question,
answer and choices concatenated, so n-grams spanning the question and its answer count. Text is
normalised (lowercase; punctuation, whitespace and line breaks only separate words) and every
``ngram``-token window of a document is looked up in an index of the eval items' windows (see
:mod:`curate.decont.index`). An item shorter than ``ngram`` tokens matches when its whole token
sequence occurs in a document; items under ``min_item_tokens`` are ignored (counted).

The index is built once per run in the step's work folder (the first worker builds it under a lock,
the others wait and memory-map the same files) and rebuilt only when the eval files or the options
change.

Modes:

``drop``    a document with any match is dropped (``dropped/contaminated``).
``remove``  each matched window, widened by ``remove_window`` characters on both sides, is cut out
            (overlapping cuts merge); a document cut more than ``max_cuts`` times is dropped
            (``dropped/contaminated_too_many_cuts``), one with nothing left is dropped
            (``dropped/contaminated_nothing_left``). The Turing-NLG / legacy NeMo rule: 13-grams,
            200 characters, 10 cuts.
``flag``    nothing is removed; columns ``contaminated`` (bool), ``contamination_sets`` (the eval
            sets matched) and ``contamination_matches`` (matched windows) are added.

Counters: ``decontaminate/<set>/docs`` (documents matching the set), ``decontaminate/<set>/ngrams``
(matched windows), ``decontaminate/docs``, ``decontaminate/ngrams``, ``decontaminate/cuts`` and
``decontaminate/removed_chars`` (remove mode). The side output ``_matches`` (``save_matches``) has one
row per (document, eval item): document id, eval set, item id, matched windows, the document text
around the first match and the start of the item; the run report shows a few.
"""

from __future__ import annotations

import os
import tempfile
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from curate.decont.index import (EvalSetError, EvalSpec, NgramIndex, first_record_problems, match_batch,  # noqa: F401
                                 report_counts, token_spans)
from curate.pipeline.api import MapStage, Resources, StageConfig, StageError, log, register, require_text

SNIPPET_CHARS = 160


class EvalSetConfig(BaseModel):
    """One eval set: local files and which fields hold its text."""

    model_config = ConfigDict(extra="forbid")
    paths: str | list[str] = Field(..., description="JSONL or Parquet file(s), folder or glob (local or fsspec)")
    question: str = Field("question", description="field holding the question / prompt")
    answer: str | None = Field("answer", description="field holding the answer (null: none)")
    choices: str | None = Field(None, description="field holding the choices (a list or a string; null: none)")
    id_field: str | None = Field(None, description="field holding the item id (default: file:line)")


class DecontaminateConfig(StageConfig):
    eval_sets: dict[str, EvalSetConfig] = Field(
        ..., description="named eval sets: {name: {paths, question, answer, choices, id_field}}")
    text_column: str = Field("text", description="column to decontaminate")
    ngram: int = Field(13, ge=1, le=64, description="n-gram length in normalised tokens")
    min_item_tokens: int = Field(3, ge=1, description="eval items with fewer tokens are ignored "
                                 "(counted in the log and the index's .json in the work folder); items "
                                 "shorter than `ngram` are matched whole")
    mode: Literal["drop", "remove", "flag"] = Field(
        "drop", description="drop the document, remove the matched spans, or only flag it")
    remove_window: int = Field(200, ge=0, description="remove mode: characters cut on each side of a match")
    max_cuts: int = Field(10, ge=0, description="remove mode: documents cut more often are dropped")
    join_with: str = Field("\n", description="remove mode: what joins the pieces left")
    save_matches: bool = Field(True, description="write one row per (document, eval item) matched "
                               "to the side output _matches")
    save_dropped: bool = Field(False, description="write dropped documents to the side output _dropped")

    @field_validator("eval_sets")
    @classmethod
    def _names(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one eval set is needed")
        for name in v:
            if not name or "/" in name:
                raise ValueError(f"eval set name {name!r} must be non-empty and have no '/'")
        return v


@register
class Decontaminate(MapStage):
    """Remove benchmark leakage: drop, cut out or flag documents sharing n-grams with eval sets."""

    name = "decontaminate"
    Config = DecontaminateConfig
    reads = ("{text_column}",)
    writes = {"contaminated": pa.bool_(), "contamination_sets": pa.list_(pa.string()),
              "contamination_matches": pa.int32()}          # flag mode; drop and remove add no column
    resources = Resources(cpus=1.0)
    isolate_errors = True

    def __init__(self, config=None, **options):
        super().__init__(config, **options)
        if self.config.mode != "flag":
            self.writes = {}
        self.index: NgramIndex | None = None

    # -- checks and set-up ---------------------------------------------------------------------------
    def _specs(self) -> tuple[list[EvalSpec], list[tuple[str, str]]]:
        from curate.pipeline.api import expand_paths

        specs, problems = [], []
        for name, es in self.config.eval_sets.items():
            try:
                files = expand_paths(es.paths, (".jsonl", ".json", ".parquet", ".jsonl.gz", ".jsonl.zst"))
            except FileNotFoundError as exc:
                problems.append((f"eval_sets.{name}.paths", f"not found: {exc.args[0]}"))
                continue
            if not files:
                problems.append((f"eval_sets.{name}.paths", f"no JSONL or Parquet files in {es.paths}"))
                continue
            specs.append(EvalSpec(name, files, es.question, es.answer, es.choices, es.id_field))
        return specs, problems

    def check(self) -> list[tuple[str, str]]:
        specs, problems = self._specs()
        for spec in specs:
            problems += [(f"eval_sets.{spec.name}.{role}", msg) for role, msg in first_record_problems(spec)]
        return problems

    def fingerprint_extra(self) -> str:
        from curate.decont.index import fingerprint
        specs, problems = self._specs()
        return "" if problems else fingerprint(specs, self.config.ngram, self.config.min_item_tokens)

    def setup(self) -> None:
        specs, problems = self._specs()
        if problems:
            key, msg = problems[0]
            raise StageError(f"{self.step_name}: key 'options.{key}': {msg}")
        folder = self.workdir or os.path.join(tempfile.gettempdir(), "curate-decontaminate")
        try:
            self.index = NgramIndex.open_or_build(specs, self.config.ngram, self.config.min_item_tokens, folder)
        except EvalSetError as exc:
            raise StageError(f"{self.step_name}: eval set: {exc}") from None
        for name, c in self.index.meta["counts"].items():
            log.info("%s: eval set %s: %d items, %d n-grams, %d matched whole (shorter than %d tokens), "
                     "%d ignored (under %d tokens)", self.step_name, name, c["items"], c["ngrams"],
                     c["short_items"], self.config.ngram, c["skipped_items"], self.config.min_item_tokens)

    # -- work ----------------------------------------------------------------------------------------
    def process(self, table: pa.Table) -> pa.Table:
        c = self.config
        require_text(table.schema, c.text_column, self.step_name)
        column = table.column(c.text_column)
        found, words = match_batch(self.index, column)
        if all(m is None for m in found):                  # the usual batch: nothing to look at in Python
            return self._flag_columns(table, [], {}) if c.mode == "flag" else table
        texts = column.to_pylist()
        ids = table.column("id").to_pylist() if "id" in table.schema.names else [None] * table.num_rows
        keep = [True] * table.num_rows
        reasons: list[str | None] = [None] * table.num_rows
        new_texts = list(texts)
        flags, flag_sets, flag_counts = [], [], []
        matches_rows: list[dict] = []
        sets = self.index.sets
        for d, m in enumerate(found):
            if m is None:
                flags.append(False)
                flag_sets.append([])
                flag_counts.append(0)
                continue
            per_set: dict[int, int] = {}
            per_item: dict[tuple[int, int], list[int]] = {}
            owned = self.index.owners(np.array([h for _, _, h in m.windows], np.uint64))
            for w, owners in enumerate(owned):
                for si in {o[0] for o in owners}:
                    per_set[si] = per_set.get(si, 0) + 1
                for o in owners:
                    per_item.setdefault(o, []).append(w)
            self.count("decontaminate/docs")
            self.count("decontaminate/ngrams", len(m.windows))
            for si, n in per_set.items():
                self.count(f"decontaminate/{sets[si]}/docs")
                self.count(f"decontaminate/{sets[si]}/ngrams", n)
            flags.append(True)
            flag_sets.append(sorted(sets[si] for si in per_set))
            flag_counts.append(len(m.windows))
            spans = token_spans(texts[d], words[d].to_list()) if (c.mode == "remove" or c.save_matches) else None
            if c.save_matches:
                for (si, ii), ws in sorted(per_item.items()):
                    start, k, _ = m.windows[ws[0]]
                    a, b = spans[start][0], spans[start + k - 1][1]
                    item_id, preview = self.index.item(si, ii)
                    matches_rows.append({
                        "id": None if ids[d] is None else str(ids[d]), "eval_set": sets[si], "item_id": item_id,
                        "matched_ngrams": len(ws), "doc_snippet": texts[d][max(0, a - 40):b + 40][:SNIPPET_CHARS + 80],
                        "item_text": preview, "mode": c.mode})
            if c.mode == "drop":
                keep[d], reasons[d] = False, "contaminated"
            elif c.mode == "remove":
                text, cuts, removed = self._cut(texts[d], spans, m)
                self.count("decontaminate/cuts", cuts)
                if cuts > c.max_cuts:
                    keep[d], reasons[d] = False, "contaminated_too_many_cuts"
                elif not text.strip():
                    keep[d], reasons[d] = False, "contaminated_nothing_left"
                else:
                    self.count("decontaminate/removed_chars", removed)
                    new_texts[d] = text
        if matches_rows:
            self.side("matches", pa.Table.from_pylist(matches_rows, schema=MATCHES_SCHEMA))
        if c.mode == "flag":
            return self._flag_columns(table, flags, {"sets": flag_sets, "counts": flag_counts})
        if c.mode == "remove" and new_texts != texts:
            i = table.schema.names.index(c.text_column)
            table = table.set_column(i, c.text_column, pa.array(new_texts, table.schema.field(i).type))
        if all(keep):
            return table
        for r in reasons:
            if r is not None:
                self.drop(r)
        mask = pa.array(keep, pa.bool_())
        if c.save_dropped:
            dropped = table.filter(pa.compute.invert(mask))
            self.side("dropped", dropped.append_column(
                "drop_reason", pa.array([r for r in reasons if r is not None], pa.string())))
        return table.filter(mask)

    @staticmethod
    def _flag_columns(table: pa.Table, flags: list[bool], extra: dict) -> pa.Table:
        n = table.num_rows
        if not flags:                                       # no match in the batch
            flags, extra = [False] * n, {"sets": [[]] * n, "counts": [0] * n}
        return (table.append_column("contaminated", pa.array(flags, pa.bool_()))
                .append_column("contamination_sets", pa.array(extra["sets"], pa.list_(pa.string())))
                .append_column("contamination_matches", pa.array(extra["counts"], pa.int32())))

    def _cut(self, text: str, spans: list[tuple[int, int]], m) -> tuple[str, int, int]:
        """(text without the matched windows +- remove_window characters, cuts, characters removed)."""
        w = self.config.remove_window
        cuts: list[list[int]] = []
        for start, k, _ in m.windows:
            a = max(0, spans[start][0] - w)
            b = min(len(text), spans[start + k - 1][1] + w)
            if cuts and a <= cuts[-1][1]:
                cuts[-1][1] = max(cuts[-1][1], b)
            else:
                cuts.append([a, b])
        pieces, prev = [], 0
        for a, b in cuts:
            pieces.append(text[prev:a])
            prev = b
        pieces.append(text[prev:])
        kept = [p.strip() for p in pieces if p.strip()]
        return self.config.join_with.join(kept), len(cuts), sum(b - a for a, b in cuts)


MATCHES_SCHEMA = pa.schema([
    ("id", pa.string()), ("eval_set", pa.string()), ("item_id", pa.string()), ("matched_ngrams", pa.int32()),
    ("doc_snippet", pa.string()), ("item_text", pa.string()), ("mode", pa.string())])
