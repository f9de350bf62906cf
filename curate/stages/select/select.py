"""``select``: keep a deterministic subset of the corpus.

Candidates, then a ranking, then limits:

1. Candidates: rows where the boolean expression ``where`` holds (``domain_score > 0.5 and
   language == "en"``: Python-style comparisons, ``and``/``or``/``not``, ``in [...]``,
   ``is None``, arithmetic, ``len(col)``, ``abs(x)``, ``col("odd name")``; SQL ``WHERE`` syntax
   such as ``domain_score > 0.5 AND language = 'en'`` is accepted too, through polars SQL), with
   ``by >= min_value``, a non-null ``by`` value, and in a seeded random ``fraction``.
2. Ranking: by the score column ``by`` (highest first; ``descending: false``: lowest first), ties
   broken by ``id``; without ``by``, input order.
3. Limits, the longest prefix of the ranking that satisfies all of: ``top`` rows, ``top_fraction``
   of the candidates (rounded), ``max_tokens`` tokens (``tokenizer``: whitespace words, ``chars``,
   or a local tokenizer.json / SentencePiece model / model folder, as ``curate.text.tokens``
   loads them; or counts from ``token_column``). A document that does not fit in the budget ends
   the selection (a budget smaller than the first document keeps none).
   With ``stratify: <column>`` the limits apply within each value of the column, and ``quotas``
   give per-value limits (in the unit of the limit given; unlisted values get the global limit,
   or nothing when there is none).

Kept rows stay in input order. Global: it sees every shard. Memory: per candidate only its
(score, id, part, row, tokens, stratum) key; texts are streamed twice (keys, then output).
Drop reasons: ``dropped/where``, ``dropped/no_score``, ``dropped/below_min_value``,
``dropped/not_selected`` (outside the sample or the limits). In a pipeline the step writes
``_selection.json`` (options, counts, the lowest kept score per stratum) for the run report.
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from curate.pipeline.api import SELECTION_FILE, GlobalStage, StageConfig, StageError, register
from curate.stages.score._scoring import unit_hash, writer_dir



# --------------------------------------------------------------------------------------------------
# `where`: a safe Python-style expression parser (no eval), with polars SQL as the fallback

_CMP = {ast.Eq: "__eq__", ast.NotEq: "__ne__", ast.Lt: "__lt__", ast.LtE: "__le__", ast.Gt: "__gt__",
        ast.GtE: "__ge__"}
_BIN = {ast.Add: "__add__", ast.Sub: "__sub__", ast.Mult: "__mul__", ast.Div: "__truediv__",
        ast.Mod: "__mod__"}
_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


class _Where:
    def __init__(self, text: str):
        self.text = text
        self.thresholds: list[tuple[str, str, float]] = []   # (column, op, value), for the report
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError:
            tree = None
        if tree is not None:
            self.expr = self._node(tree.body)
        else:
            try:
                self.expr = pl.sql_expr(text)
            except Exception as exc:  # noqa: BLE001  (polars raises several SQL error types)
                raise ValueError(f"not a valid expression: {text!r} ({exc})") from None
        # a column named twice ("x > 1 and x < 2") is read once
        self.columns = list(dict.fromkeys(self.expr.meta.root_names()))

    def evaluate(self, t: pa.Table) -> pl.Series:
        """The expression over a table holding (at least) its columns."""
        return pl.from_arrow(t.select(self.columns)).select(self.expr).to_series()

    def dry_run(self) -> None:
        """Evaluate the expression on an empty table of its columns (types unknown: null), the
        way a run evaluates it, so that ``curate validate`` catches what would fail for any data.
        Type errors are left to the run, which knows the column types."""
        empty = pa.table({c: pa.array([], pa.null()) for c in self.columns})
        try:
            self.evaluate(empty)
        except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError,
                pl.exceptions.SchemaError):
            pass   # e.g. LIKE on a column of unknown (null) type
        except (pl.exceptions.PolarsError, pa.ArrowException) as exc:
            raise ValueError(f"{self.text!r} cannot be evaluated: {exc}") from None

    def _node(self, n: ast.AST) -> Any:
        if isinstance(n, ast.BoolOp):
            parts = [self._node(v) for v in n.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(n.op, ast.And) else (out | p)
            return out
        if isinstance(n, ast.UnaryOp):
            v = self._node(n.operand)
            if isinstance(n.op, ast.Not):
                return ~v
            if isinstance(n.op, ast.USub):
                return -v
            if isinstance(n.op, ast.UAdd):
                return v
        if isinstance(n, ast.Compare):
            out, left = None, n.left
            for op, right in zip(n.ops, n.comparators):
                term = self._compare(left, op, right)
                out = term if out is None else out & term
                left = right
            return out
        if isinstance(n, ast.BinOp) and type(n.op) in _BIN:
            return getattr(self._expr(n.left), _BIN[type(n.op)])(self._expr(n.right))
        if isinstance(n, ast.Name):
            return pl.col(n.id)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float, str, bool)):
            return pl.lit(n.value)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and not n.keywords:
            f, args = n.func.id, n.args
            if f == "col" and len(args) == 1 and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                return pl.col(args[0].value)
            if f == "len" and len(args) == 1:
                return self._expr(args[0]).str.len_chars()
            if f == "abs" and len(args) == 1:
                return self._expr(args[0]).abs()
            raise ValueError(f"unknown function {f}() (known: col, len, abs)")
        raise ValueError(f"unsupported syntax {ast.unparse(n)!r}")

    def _expr(self, n: ast.AST) -> pl.Expr:
        v = self._node(n)
        return v if isinstance(v, pl.Expr) else pl.lit(v)

    def _compare(self, left: ast.AST, op: ast.cmpop, right: ast.AST) -> pl.Expr:
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right, (ast.List, ast.Tuple, ast.Set)) or not all(
                    isinstance(e, ast.Constant) for e in right.elts):
                raise ValueError(f"`in` needs a list of constants: {ast.unparse(right)!r}")
            e = self._expr(left).is_in([e.value for e in right.elts])
            return ~e if isinstance(op, ast.NotIn) else e
        if isinstance(op, (ast.Is, ast.IsNot)):
            if not (isinstance(right, ast.Constant) and right.value is None):
                raise ValueError("`is` / `is not` only compare with None")
            e = self._expr(left)
            return e.is_null() if isinstance(op, ast.Is) else e.is_not_null()
        if type(op) not in _CMP:
            raise ValueError(f"unsupported comparison {type(op).__name__}")
        if isinstance(left, ast.Name) and isinstance(right, ast.Constant) and \
                isinstance(right.value, (int, float)) and not isinstance(right.value, bool):
            self.thresholds.append((left.id, _OPS[type(op)], float(right.value)))
        return getattr(self._expr(left), _CMP[type(op)])(self._expr(right))


def parse_where(text: str) -> _Where:
    """The polars expression (``.expr``), the columns it reads and simple thresholds of ``text``."""
    return _Where(text)


# Stages whose output columns are exactly their input's plus their class's ``writes``: a chain of
# them (from a source with a fixed schema) has known columns, so `where` names can be checked at
# validate time. Other stages (readers of Parquet/JSONL, scorers naming columns from options)
# leave the columns unknown and the check to the run.
_KNOWN_SCHEMA_STAGES = {"read_files", "read_warc", "crawl", "read_pydoc", "extract_html", "language_id",
                        "heuristic_filter", "pii", "exact_dedup", "minhash_dedup", "select"}


def upstream_columns(steps: dict, inputs: list[str]) -> set[str] | None:
    """The columns a step reading ``inputs`` receives, when every step above it is of a stage
    whose columns are known (``_KNOWN_SCHEMA_STAGES``); None otherwise."""
    out: set[str] = set()
    for name in inputs:
        step = steps.get(name)
        if step is None or step.stage.name not in _KNOWN_SCHEMA_STAGES:
            return None
        above = upstream_columns(steps, step.inputs) if step.inputs else set()
        if above is None:
            return None
        out |= (above | set(type(step.stage).writes)) - set(step.stage.removes() if hasattr(step.stage, "removes") else ())
    return out


# --------------------------------------------------------------------------------------------------


class SelectConfig(StageConfig):
    where: str | None = Field(None, description="keep rows where this holds, e.g. "
                                                "'domain_score > 0.5 and language == \"en\"'")
    by: str | None = Field(None, description="score column: rank rows by it (ties by id)")
    descending: bool = Field(True, description="with `by`: highest values first (false: lowest)")
    min_value: float | None = Field(None, description="with `by`: keep only rows with value >= this")
    top: int | None = Field(None, ge=0, description="keep at most this many rows")
    top_fraction: float | None = Field(None, gt=0.0, le=1.0, description="with `by`: keep this share "
                                                                          "of the candidates")
    max_tokens: int | None = Field(None, ge=0, description="keep rows in ranking order up to this "
                                                           "many tokens")
    tokenizer: str = Field("whitespace", description="token counting for max_tokens: whitespace, chars, "
                                                     "or a local tokenizer.json, SentencePiece model or "
                                                     "model folder")
    token_column: str | None = Field(None, description="integer column with each row's tokens "
                                                       "(instead of counting)")
    text_column: str = Field("text", description="text counted for max_tokens")
    stratify: str | None = Field(None, description="apply the limits within each value of this column")
    quotas: dict[str, float] | None = Field(None, description="with stratify: limit per value (rows, "
                                                              "fraction or tokens, as the limit given)")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="keep a seeded random fraction")
    seed: int = Field(0, description="seed of `fraction` (hash of id and seed)")

    @field_validator("quotas", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        return {str(k): val for k, val in v.items()} if isinstance(v, dict) else v

    @field_validator("where")
    @classmethod
    def _where(cls, v: str | None) -> str | None:
        if v is not None:
            parse_where(v).dry_run()  # a ValueError names the key `where`
        return v

    @model_validator(mode="after")
    def _something(self) -> "SelectConfig":
        if all(getattr(self, k) is None for k in ("top", "fraction", "min_value", "where", "top_fraction",
                                                   "max_tokens", "quotas")):
            raise ValueError("give `top`, `top_fraction`, `max_tokens`, `where`, `fraction` or `by` with "
                             "`min_value`")
        if self.min_value is not None and self.by is None:
            raise ValueError("`min_value` needs `by`")
        if self.top_fraction is not None and self.by is None:
            raise ValueError("`top_fraction` needs `by` (the score to rank by)")
        if self.quotas is not None:
            if self.stratify is None:
                raise ValueError("`quotas` needs `stratify` (the column whose values they name)")
            if sum(getattr(self, k) is not None for k in ("top", "top_fraction", "max_tokens")) > 1:
                raise ValueError("with `quotas`, give at most one of `top`, `top_fraction`, `max_tokens` "
                                 "(the unit of the quotas)")
        return self

    def quota_unit(self) -> str:
        for k in ("top_fraction", "max_tokens"):
            if getattr(self, k) is not None:
                return k
        return "top"

    def limited(self) -> bool:
        return any(getattr(self, k) is not None for k in ("top", "top_fraction", "max_tokens", "quotas"))


@register
class Select(GlobalStage):
    """Keep a deterministic subset: an expression, top-k/top-fraction by a score, a token budget, per stratum."""

    name = "select"
    Config = SelectConfig

    def check_upstream(self, steps: dict, inputs: list[str]) -> list[tuple[str, str]]:
        """Problems of `where` against the columns of the steps above (when they are known)."""
        if not self.config.where:
            return []
        known = upstream_columns(steps, inputs)
        if known is None:
            return []
        missing = [c for c in parse_where(self.config.where).columns if c not in known]
        if not missing:
            return []
        return [("where", f"names column(s) {missing} that no earlier step writes (columns: "
                          f"{', '.join(sorted(known))})")]

    def setup(self) -> None:
        self._where = parse_where(self.config.where) if self.config.where else None
        self._tok = None
        c = self.config
        if c.max_tokens is not None and c.token_column is None and c.tokenizer not in ("whitespace", "chars"):
            from curate.text.tokens import TokenizerError, load_tokenizer
            try:
                self._tok = load_tokenizer(c.tokenizer)
            except (TokenizerError, OSError, RuntimeError) as exc:
                raise StageError(f"{self.step_name}: cannot load tokenizer {c.tokenizer!r}: {exc}") from None

    # -- per batch ---------------------------------------------------------------------------------
    def _columns(self, schema_names: list[str] | None = None) -> list[str]:
        c = self.config
        cols = ["id"]
        if c.by:
            cols.append(c.by)
        if self._where is not None:
            cols += self._where.columns
        if c.stratify:
            cols.append(c.stratify)
        if c.max_tokens is not None:
            cols.append(c.token_column or c.text_column)
        return list(dict.fromkeys(cols))

    def _candidates(self, t: pa.Table) -> np.ndarray:
        """Candidate mask of a batch; counts the reasons of the others."""
        c = self.config
        n = t.num_rows
        ok = np.ones(n, bool)
        if self._where is not None:
            try:
                m = self._where.evaluate(t)
            except pl.exceptions.PolarsError as exc:
                raise StageError(f"{self.step_name}: `where` {c.where!r} failed: {exc}") from None
            if m.dtype != pl.Boolean:
                raise StageError(f"{self.step_name}: `where` {c.where!r} is not a true/false expression "
                                 f"(gives {m.dtype})")
            m = m.fill_null(False).to_numpy()
            self.drop("where", int((~m).sum()))
            ok &= m
        if c.by:
            vals = self._scores(t)
            nan = np.isnan(vals) & ok
            self.drop("no_score", int(nan.sum()))
            ok &= ~nan
            if c.min_value is not None:
                low = ok & (vals < c.min_value)
                self.drop("below_min_value", int(low.sum()))
                ok &= ~low
        if c.fraction is not None:
            sampled = np.array([unit_hash(i, c.seed) < c.fraction for i in t.column("id").to_pylist()], bool)
            self.drop("not_selected", int((ok & ~sampled).sum()))
            ok &= sampled
        return ok

    def _scores(self, t: pa.Table) -> np.ndarray:
        col = t.column(self.config.by)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
            raise StageError(f"{self.step_name}: column {self.config.by!r} has type {col.type}; `by` needs numbers")
        return col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)

    def _tokens(self, t: pa.Table) -> np.ndarray:
        c = self.config
        if c.token_column:
            return t.column(c.token_column).cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        text = t.column(c.text_column)
        if c.tokenizer == "whitespace":
            return pc.count_substring_regex(text, r"\S+").fill_null(0).to_numpy(zero_copy_only=False)
        if c.tokenizer == "chars":
            return pc.utf8_length(text).fill_null(0).to_numpy(zero_copy_only=False)
        return np.array(self._tok.count([x or "" for x in text.to_pylist()]), np.int64)

    def _check(self, t: pa.Table) -> None:
        missing = [x for x in self._columns() if x not in t.schema.names]
        if missing:
            raise StageError(f"select: no column {missing[0]!r} (step {self.step_name!r}; columns: "
                             f"{t.schema.names})")

    # -- the run -----------------------------------------------------------------------------------
    def run(self, dataset, writer, ctx) -> None:
        c = self.config
        limited = c.limited()
        chosen: dict[int, np.ndarray] = {}
        info: dict[str, Any] = {}
        if limited:
            keys = self._keys(dataset)
            sel = self._limit(keys)
            info = self._summary(keys, sel)
            for part, rows in sel.group_by("part").agg(pl.col("row")).iter_rows():
                chosen[part] = np.sort(np.asarray(rows, np.int64))
        kept = total = 0
        for part in range(dataset.num_parts):
            off = 0
            rows = chosen.get(part, np.zeros(0, np.int64))
            for t in dataset.iter_tables(part=part):
                n = t.num_rows
                total += n
                if limited:
                    mask = np.zeros(n, bool)
                    mask[rows[(rows >= off) & (rows < off + n)] - off] = True
                else:
                    self._check(t)
                    mask = self._candidates(t)
                off += n
                out = t.filter(pa.array(mask))
                kept += out.num_rows
                writer.write(out)          # an empty batch keeps the schema of an empty result
                ctx.progress(n)
        if limited:
            self.drop("not_selected", info["candidates"] - kept)
        info.update({"rows_in": total, "rows_out": kept})
        self.selection = self._record(info)
        d = writer_dir(writer)
        if d:
            from curate.pipeline.api import atomic_write_bytes, get_fs, join
            fs, p = get_fs(d)
            atomic_write_bytes(fs, join(p, SELECTION_FILE), json.dumps(self.selection, indent=1).encode())

    def _keys(self, dataset) -> pl.DataFrame:
        """Pass 1: (part, row, id, score, tokens, stratum) of every candidate."""
        c = self.config
        frames = []
        for part in range(dataset.num_parts):
            off = 0
            for t in self._iter_keys(dataset, part):
                self._check(t)
                ok = self._candidates(t)
                idx = np.flatnonzero(ok)
                cols: dict[str, Any] = {"part": np.full(len(idx), part, np.int32), "row": (off + idx).astype(np.int64),
                                        "id": t.column("id").take(pa.array(idx)).cast(pa.string())}
                cols["score"] = self._scores(t)[idx] if c.by else np.zeros(len(idx))
                if c.max_tokens is not None:
                    cols["tokens"] = self._tokens(t)[idx]
                else:
                    cols["tokens"] = np.zeros(len(idx), np.int64)
                if c.stratify:
                    cols["stratum"] = t.column(c.stratify).take(pa.array(idx)).cast(pa.string()).fill_null("null")
                else:
                    cols["stratum"] = pa.array([""] * len(idx), pa.string())
                frames.append(pl.from_arrow(pa.table(cols)))
                off += t.num_rows
        schema = {"part": pl.Int32, "row": pl.Int64, "id": pl.String, "score": pl.Float64,
                  "tokens": pl.Int64, "stratum": pl.String}
        if not frames:
            return pl.DataFrame(schema=schema)
        return pl.concat([f.cast(schema) for f in frames])

    def _iter_keys(self, dataset, part: int):
        schema = dataset.schema()
        names = schema.names if schema is not None else []
        cols = self._columns()
        if all(x in names for x in cols):
            return dataset.iter_tables(columns=cols, part=part)
        return dataset.iter_tables(part=part)       # _check names the missing column

    def _limit(self, keys: pl.DataFrame) -> pl.DataFrame:
        """The longest prefix of each stratum's ranking within its limits."""
        c = self.config
        if c.by:
            keys = keys.sort(["score", "id", "part", "row"], descending=[c.descending, False, False, False])
        else:
            keys = keys.sort(["part", "row"])
        keys = keys.with_columns(rank=pl.int_range(pl.len()).over("stratum"),
                                 cum_tokens=pl.col("tokens").cum_sum().over("stratum"),
                                 n=pl.len().over("stratum"))
        strata = keys.get_column("stratum").unique().to_list()
        unit = c.quota_unit()
        limits = {"top": c.top, "top_fraction": c.top_fraction, "max_tokens": c.max_tokens}
        rows = []
        for s in strata:
            lim = dict(limits)
            if c.quotas is not None:
                lim[unit] = c.quotas.get(s, limits[unit] if limits[unit] is not None else 0)
            rows.append({"stratum": s,
                         "lim_rows": None if lim["top"] is None else int(lim["top"]),
                         "lim_frac": lim["top_fraction"],
                         "lim_tokens": None if lim["max_tokens"] is None else int(lim["max_tokens"])})
        lim = pl.DataFrame(rows, schema={"stratum": pl.String, "lim_rows": pl.Int64, "lim_frac": pl.Float64,
                                         "lim_tokens": pl.Int64})
        keys = keys.join(lim, on="stratum", how="left")
        ok = pl.lit(True)
        ok = ok & (pl.col("lim_rows").is_null() | (pl.col("rank") < pl.col("lim_rows")))
        ok = ok & (pl.col("lim_frac").is_null()
                   | (pl.col("rank") < (pl.col("lim_frac") * pl.col("n") + 0.5).floor()))
        ok = ok & (pl.col("lim_tokens").is_null() | (pl.col("cum_tokens") <= pl.col("lim_tokens")))
        return keys.filter(ok)

    def _summary(self, keys: pl.DataFrame, sel: pl.DataFrame) -> dict[str, Any]:
        c = self.config
        per: dict[str, Any] = {}
        if c.stratify or c.by:
            cand = keys.group_by("stratum").agg(pl.len().alias("candidates"))
            got = sel.group_by("stratum").agg(pl.len().alias("selected"), pl.col("tokens").sum().alias("tokens"),
                                              (pl.col("score").min() if c.descending else pl.col("score").max())
                                              .alias("cutoff"))
            for r in cand.join(got, on="stratum", how="left").sort("stratum").iter_rows(named=True):
                per[r["stratum"]] = {"candidates": r["candidates"], "selected": r["selected"] or 0,
                                     "tokens": r["tokens"] or 0,
                                     "cutoff": r["cutoff"] if c.by and r["cutoff"] is not None and
                                     not (isinstance(r["cutoff"], float) and math.isnan(r["cutoff"])) else None}
        cutoff = None
        if c.by and sel.height:
            cutoff = sel.get_column("score").min() if c.descending else sel.get_column("score").max()
        return {"candidates": keys.height, "selected": sel.height, "tokens": int(sel.get_column("tokens").sum()),
                "cutoff": cutoff, "strata": per if c.stratify else {}}

    def _record(self, info: dict[str, Any]) -> dict[str, Any]:
        """What _selection.json holds: the options, counts and the thresholds to draw."""
        c = self.config
        thresholds = []
        if c.by and c.min_value is not None:
            thresholds.append({"column": c.by, "value": c.min_value, "op": ">=", "from": "min_value"})
        if c.by and info.get("cutoff") is not None:
            thresholds.append({"column": c.by, "value": info["cutoff"], "op": ">=" if c.descending else "<=",
                               "from": "lowest selected score" if c.descending else "highest selected score"})
        if self._where is not None:
            for col, op, v in self._where.thresholds:
                thresholds.append({"column": col, "value": v, "op": op, "from": "where"})
        return {"options": c.model_dump(mode="json", exclude_none=True), "thresholds": thresholds, **info}
