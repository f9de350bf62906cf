"""``select``: keep a deterministic subset of the corpus.

- ``by: <column>`` keeps the ``top`` rows with the highest (``descending: false``: lowest) values of a
  score column (quality score, language score, length...), ties broken by input order;
- ``fraction`` keeps a seeded random fraction (the same seed and input give the same rows);
- neither: the first ``top`` rows in input order.

Optionally only rows with ``min_value <= column``. Kept rows stay in input order. Global: it sees
every shard. Memory: one value and one row position per document for ``by``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.pipeline.stage import GlobalStage, StageConfig, StageError, register


class SelectConfig(StageConfig):
    top: int | None = Field(None, ge=0, description="keep at most this many rows")
    by: str | None = Field(None, description="score column: keep the rows with the highest values")
    descending: bool = Field(True, description="with `by`: highest values first (false: lowest)")
    min_value: float | None = Field(None, description="with `by`: keep only rows with value >= this")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="keep a seeded random fraction")
    seed: int = Field(0, description="seed of `fraction` (hash of id and seed)")

    @model_validator(mode="after")
    def _something(self) -> "SelectConfig":
        if self.top is None and self.fraction is None and self.min_value is None:
            raise ValueError("give `top`, `fraction` or `by` with `min_value`")
        if self.min_value is not None and self.by is None:
            raise ValueError("`min_value` needs `by`")
        return self


@register
class Select(GlobalStage):
    """Keep a deterministic subset: top-k by a score column, a seeded fraction, or the first rows."""

    name = "select"
    Config = SelectConfig

    def run(self, dataset, writer, ctx) -> None:
        c = self.config
        n_total = 0
        keep_by_part: list[np.ndarray] = []
        if c.by is not None:
            values, where = [], []
            for part in range(dataset.num_parts):
                off = 0
                for t in dataset.iter_tables(columns=[c.by], part=part):
                    if c.by not in t.schema.names:
                        raise StageError(f"select: no column {c.by!r}")
                    col = t.column(c.by).cast(pa.float64()).fill_null(np.nan)
                    values.append(col.to_numpy(zero_copy_only=False))
                    where.append(np.stack([np.full(t.num_rows, part), off + np.arange(t.num_rows)], 1))
                    off += t.num_rows
            vals = np.concatenate(values) if values else np.zeros(0)
            pos = np.concatenate(where) if where else np.zeros((0, 2), np.int64)
            n_total = len(vals)
            ok = ~np.isnan(vals)
            if c.min_value is not None:
                ok &= vals >= c.min_value
            idx = np.flatnonzero(ok)
            key = -vals[idx] if c.descending else vals[idx]
            idx = idx[np.argsort(key, kind="stable")]          # stable: ties keep input order
            if c.top is not None:
                idx = idx[: c.top]
            chosen = pos[np.sort(idx)]
            for part in range(dataset.num_parts):
                keep_by_part.append(chosen[chosen[:, 0] == part][:, 1])
        kept = 0
        for part in range(dataset.num_parts):
            off = 0
            for t in dataset.iter_tables(part=part):
                n = t.num_rows
                mask = np.ones(n, bool)
                if c.by is not None:
                    rows = keep_by_part[part]
                    mask = np.zeros(n, bool)
                    sel = rows[(rows >= off) & (rows < off + n)] - off
                    mask[sel] = True
                else:
                    n_total += n
                    if c.fraction is not None:
                        mask &= np.array([_unit(i, c.seed) < c.fraction for i in t.column("id").to_pylist()])
                    if c.top is not None:
                        room = max(0, c.top - kept)
                        mask &= np.cumsum(mask) <= room
                off += n
                out = t.filter(pa.array(mask))
                kept += out.num_rows
                if out.num_rows:
                    writer.write(out)
                ctx.progress(n)
        self.drop("not_selected", n_total - kept)


def _unit(doc_id: str, seed: int) -> float:
    h = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64

