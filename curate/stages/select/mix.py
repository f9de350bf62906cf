"""``mix``: build a training mixture from named inputs with target proportions by tokens.

::

    - name: mixture
      stage: mix
      input: [rc, general]
      proportions: {rc: 1, general: 1}      # or "rc:1, general:1"; domain : replay = 1 : 0.1
      tokenizer: /models/llama/tokenizer.json   # default: whitespace words

Each input ``i`` gets ``p_i × T`` tokens, where ``p_i`` are the normalised proportions and ``T`` is
``total_tokens`` or, by default, the total at which the ``anchor`` input (default: the first one
named) is used exactly once. An input with more tokens than its share is down-sampled without
replacement; one with fewer is repeated whole ``k`` times and the remainder drawn without
replacement. Which documents are drawn depends only on ``seed`` and the document ids (not on
sharding or file order), so the same inputs and seed give the same mixture. The remainder is filled
greedily in seeded order, so each input's share is off by at most about one document.

Output: the drawn rows, input by input, with ``mix_input`` (the input's name) and ``mix_copy``
(0 for a first copy, k for the k-th repetition; a repeated row's id gets the suffix ``#k`` so ids
stay unique). Columns: those all inputs share (``columns`` picks others). Not shuffled: training
loaders shuffle. Counters in stats.json: ``mix/tokens/<input>`` (drawn), ``mix/available_tokens/
<input>``, ``mix/target_tokens/<input>``, ``mix/proportion/<input>`` (achieved, by tokens),
``mix/rows/<input>`` and ``mix/repeated_rows/<input>``.

An input with a positive proportion but no tokens (a branch that produced nothing) is an error;
``empty_inputs: skip`` leaves it out instead, shares the mixture among the other inputs, and counts
``mix/empty_input/<input>`` and the warning ``warnings/empty_input``.

Which rows come from which input: the runner hands a global stage one list of Parquet files for
all its inputs, each under ``<output>/<step>/``; ``mix`` groups the files by that folder name (the
step name). A ``RunContext`` attribute ``inputs`` ({step name: [files]}), when a runner provides
it, takes precedence; ``input_column`` names a column that says it row by row instead (for tables
or files laid out otherwise). As a library call, ``Mix(...).mix({"a": table_or_path, ...})``.
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import Field, field_validator

from curate.pipeline.api import GlobalStage, StageConfig, StageError, register

log = logging.getLogger("curate")
_PAIR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*[:=]\s*([^,]+?)\s*$")


def parse_proportions(value: Any) -> dict[str, float]:
    """{name: weight} from a mapping or a string ``"a:1, b:0.1"``; weights are finite, >= 0, and
    at least one is positive."""
    if isinstance(value, str):
        out: dict[str, Any] = {}
        for part in value.split(","):
            m = _PAIR.match(part)
            if not m:
                raise ValueError(f"cannot parse {part.strip()!r} in {value!r}; write name:weight, "
                                 "separated by commas")
            out[m.group(1)] = m.group(2)
        value = out
    if not isinstance(value, dict) or not value:
        raise ValueError(f"proportions must be a mapping {{input: weight}} or 'a:1, b:2', got {value!r}")
    parsed: dict[str, float] = {}
    for k, v in value.items():
        try:
            w = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"proportion of {k!r} is not a number: {v!r}") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"proportion of {k!r} must be a finite number >= 0, got {v!r}")
        parsed[str(k)] = w
    if not any(parsed.values()):
        raise ValueError("at least one proportion must be positive")
    return parsed


class MixConfig(StageConfig):
    proportions: dict[str, float] = Field(..., description="target share of tokens per input name "
                                          "(any scale): {rc: 1, general: 1} or 'rc:1, general:1'")
    text_column: str = Field("text", description="column whose tokens are counted")
    id_column: str = Field("id", description="document id: seeds which documents are drawn")
    tokenizer: str | None = Field(None, description="tokenizer.json, SentencePiece .model or model "
                                  "folder; null: whitespace words")
    total_tokens: int | None = Field(None, ge=1, description="size of the mixture in tokens; default: "
                                     "the size at which `anchor` is used once")
    anchor: str | None = Field(None, description="input used exactly once when total_tokens is not "
                               "given (default: the first input in proportions)")
    seed: int = Field(0, description="seed of the draw (with the document ids)")
    input_column: str | None = Field(None, description="a column naming each row's input (instead of "
                                     "the step folders)")
    columns: list[str] | None = Field(None, description="output columns (default: those all inputs share)")
    empty_inputs: Literal["error", "skip"] = Field(
        "error", description="an input with a positive proportion but no tokens: error (the default), or "
        "skip: leave it out, share the mixture among the others, and warn (warnings/empty_input)")

    @field_validator("proportions", mode="before")
    @classmethod
    def _parse(cls, v: Any) -> dict[str, float]:
        return parse_proportions(v)


@register
class Mix(GlobalStage):
    """Training mixture of named inputs with target token proportions (seeded down/up-sampling)."""

    name = "mix"
    Config = MixConfig
    reads = ("{text_column}",)
    writes = {"mix_input": pa.string(), "mix_copy": pa.int32()}

    def check(self) -> list[tuple[str, str]]:
        c = self.config
        problems = []
        if c.anchor is not None and c.anchor not in c.proportions:
            problems.append(("anchor", f"{c.anchor!r} is not in proportions {list(c.proportions)}"))
        if c.tokenizer:
            from curate.text.tokens import TokenizerError, resolve_tokenizer_path
            try:
                resolve_tokenizer_path(c.tokenizer)
            except TokenizerError as exc:
                problems.append(("tokenizer", str(exc)))
        return problems

    def setup(self) -> None:
        from curate.text.tokens import TokenizerError, load_tokenizer
        for key, msg in self.check():
            raise StageError(f"mix: {key}: {msg}")
        try:
            self.tok = load_tokenizer(self.config.tokenizer)
        except (TokenizerError, OSError, RuntimeError) as exc:
            raise StageError(f"mix: tokenizer: {exc}") from None

    # -- grouping rows by input ------------------------------------------------------------------
    def _groups(self, dataset, ctx) -> dict[str, list[tuple[Any, Any]]]:
        """{input name: [(part, row filter value or None)]}"""
        c = self.config
        hook = getattr(ctx, "inputs", None)
        if c.input_column is not None:
            return {name: [(dataset, name)] for name in c.proportions}
        if hook:
            return {name: [(f, None) for f in files] for name, files in hook.items()}
        if dataset.in_memory:
            raise StageError("mix: in-memory input: name each row's input with `input_column`, or call "
                             "Mix(...).mix({name: table, ...})")
        groups: dict[str, list] = {}
        for f in dataset.files:
            name = posixpath.basename(posixpath.dirname(f.rstrip("/")))
            groups.setdefault(name, []).append((f, None))
        return groups

    def run(self, dataset, writer, ctx) -> None:
        self._mix(self._groups(dataset, ctx), writer, ctx)

    def mix(self, inputs: dict[str, Any]) -> pa.Table:
        """Library call: {name: table, Parquet path(s) or Dataset} -> the mixture as one table."""
        from curate.pipeline.api import RunContext
        from curate.pipeline.api import Dataset, MemoryWriter
        import tempfile

        self.ensure_setup()
        groups = {}
        for name, data in inputs.items():
            ds = Dataset.from_any(data)
            groups[name] = [(ds.part_source(i), None)
                            for i in range(ds.num_parts)]
        writer = MemoryWriter()
        with tempfile.TemporaryDirectory(prefix="curate-mix-") as tmp:
            self._mix(groups, writer, RunContext.inline(tmp))
        return writer.table()

    def _iter(self, part, filt, columns):
        from curate.pipeline.api import Dataset, iter_part

        c = self.config
        if isinstance(part, Dataset):  # input_column: the whole dataset, filtered by input name
            cols = None if columns is None else list(dict.fromkeys([*columns, c.input_column]))
            for t in part.iter_tables(columns=cols):
                if c.input_column not in t.schema.names:
                    raise StageError(f"mix: input_column {c.input_column!r} is not a column; the "
                                     f"input has {t.schema.names}")
                t = t.filter(pc.equal(t.column(c.input_column), filt))
                yield t if columns is None else t.select(columns)
        else:
            yield from iter_part(part, columns)

    def _mix(self, groups: dict[str, list], writer, ctx) -> None:
        c = self.config
        names = list(c.proportions)
        unknown = [n for n in names if n not in groups]
        if unknown:
            raise StageError(f"mix: proportions name input(s) {unknown} that are not inputs of this "
                             f"step; its inputs are {sorted(groups)}")
        extra = [g for g in groups if g not in c.proportions]
        if extra:
            raise StageError(f"mix: input(s) {extra} have no proportion; give them one (0 leaves "
                             "them out)")
        # pass 1: tokens and draw keys per input
        info: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        first_cols: list[str] | None = None
        schemas: dict[str, set[str]] = {}
        for name in names:
            toks, keys = [], []
            for part, filt in groups[name]:
                for t in self._iter(part, filt, None):
                    if first_cols is None:
                        first_cols = t.schema.names
                    names_here = set(t.schema.names)
                    schemas[name] = schemas[name] & names_here if name in schemas else names_here
                    for col in (c.text_column, c.id_column):
                        if col not in names_here:
                            raise StageError(f"mix: input {name!r} has no column {col!r}; it has "
                                             f"{t.schema.names}")
                    texts = t.column(c.text_column).to_pylist()
                    toks.append(np.asarray(self.tok.count([x or "" for x in texts]), np.int64))
                    keys.append(np.fromiter(
                        (xxhash.xxh64_intdigest(f"{c.seed}|{name}|{i}".encode()) for i in t.column(c.id_column).to_pylist()),
                        np.uint64, count=t.num_rows))
                    ctx.progress(t.num_rows)
            info[name] = (np.concatenate(toks) if toks else np.zeros(0, np.int64),
                          np.concatenate(keys) if keys else np.zeros(0, np.uint64))
        weights = np.array([c.proportions[n] for n in names], float)
        avail = {n: int(info[n][0].sum()) for n in names}
        empty = [n for n, w in zip(names, weights) if w > 0 and avail[n] == 0]
        if empty and c.empty_inputs == "error":
            n = empty[0]
            raise StageError(f"mix: input {n!r} has no tokens (no rows, or only empty "
                             f"{c.text_column!r}) but its proportion is {c.proportions[n]} "
                             "(empty_inputs: skip leaves such inputs out)")
        for n in empty:   # empty_inputs: skip
            log.warning("%s: input %r has no tokens: left out of the mixture (empty_inputs: skip)",
                        self.step_name, n)
            self.count(f"mix/empty_input/{n}")
            self.count("warnings/empty_input")
        weights = np.array([0.0 if n in empty else w for n, w in zip(names, weights)])
        if not weights.any():
            for n in names:
                self.count(f"mix/available_tokens/{n}", avail[n])
            return                          # every input is empty: an empty mixture, warned above
        shares = weights / weights.sum()
        if c.total_tokens is not None:
            total = float(c.total_tokens)
        else:
            anchor = c.anchor or next(n for n, s in zip(names, shares) if s > 0)
            a_share = shares[names.index(anchor)]
            if a_share == 0:
                raise StageError(f"mix: the anchor input {anchor!r} has proportion 0")
            total = avail[anchor] / a_share
        # the draw: counts of copies per row
        copies: dict[str, np.ndarray] = {}
        for n, s in zip(names, shares):
            tokens, keys = info[n]
            target = s * total
            cnt = np.zeros(len(tokens), np.int64)
            if target > 0:
                full = int(target // avail[n])
                cnt += full
                rest = target - full * avail[n]
                order = np.argsort(keys, kind="stable")
                csum = np.cumsum(tokens[order])
                # the prefix of the seeded order whose token sum is closest to `rest`
                k = int(np.searchsorted(csum, rest, side="left"))
                if k < len(csum):
                    below = csum[k - 1] if k > 0 else 0
                    take = k + 1 if (csum[k] - rest) < (rest - below) else k
                else:
                    take = len(csum)
                cnt[order[:take]] += 1
            copies[n] = cnt
            got = int((cnt * tokens).sum())
            self.count(f"mix/tokens/{n}", got)
            self.count(f"mix/available_tokens/{n}", avail[n])
            self.count(f"mix/target_tokens/{n}", int(round(target)))
            self.count(f"mix/rows/{n}", int(cnt.sum()))
            self.count(f"mix/repeated_rows/{n}", int(np.maximum(cnt - 1, 0).sum()))
        grand = sum(int((copies[n] * info[n][0]).sum()) for n in names)
        for n in names:
            got = int((copies[n] * info[n][0]).sum())
            self.count(f"mix/proportion/{n}", round(got / grand, 6) if grand else 0.0)
        # pass 2: write the drawn rows
        if c.columns is not None:
            columns = list(c.columns)
        else:
            common = set.intersection(*schemas.values()) if schemas else set()
            columns = [col for col in (first_cols or []) if col in common
                       and col not in ("mix_input", "mix_copy")]
        for n in names:
            cnt = copies[n]
            off = 0
            for part, filt in groups[n]:
                for t in self._iter(part, filt, None):
                    missing = [col for col in columns if col not in t.schema.names]
                    if missing:
                        raise StageError(f"mix: input {n!r} lacks column(s) {missing}")
                    k = cnt[off: off + t.num_rows]
                    off += t.num_rows
                    if not k.any():
                        continue
                    idx = np.repeat(np.arange(t.num_rows), k)
                    copy_no = np.concatenate([np.arange(x) for x in k if x]) if len(idx) else np.zeros(0, np.int64)
                    out = t.select(columns).take(pa.array(idx))
                    if c.id_column in columns and (copy_no > 0).any():
                        ids = out.column(c.id_column).to_pylist()
                        ids = [str(i) if r == 0 else f"{i}#{r}" for i, r in zip(ids, copy_no.tolist())]
                        out = out.set_column(out.schema.get_field_index(c.id_column), c.id_column,
                                             pa.array(ids, pa.string()))
                    out = out.append_column("mix_input", pa.array([n] * out.num_rows, pa.string()))
                    out = out.append_column("mix_copy", pa.array(copy_no, pa.int32()))
                    writer.write(out)
