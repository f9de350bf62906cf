"""``exact_dedup``: global exact deduplication on the normalised text (and on the URL).

Keeps the first occurrence in dataset order (input parts in order, rows in order) of every
normalised text (see :func:`curate.text.normalize.normalize_for_hash`) and, before that, of every
normalised URL (``url_column``; skipped when the input has no such column). URL dedup runs first;
text dedup then only sees the documents that survived it, so a text is never dropped in favour
of a copy that was itself dropped.

Plan (a hash shuffle through Parquet files in the work folder; the same plan runs locally and
under Ray):

1. ``ctx.map`` over input parts: a 128-bit xxh3 hash of each key, written as
   ``(hi, lo, doc)`` rows (``doc = part << 32 | row``) into one file per (bucket, part), the
   bucket being ``hi % buckets``.
2. ``ctx.map`` over buckets: all rows of one bucket, sorted by (hi, lo, doc); every row equal to
   its predecessor is a duplicate of the run's first document -> ``(doc, first)`` rows.
3. one streaming pass over the parts writes the rows that are not duplicates, in input order.

Memory bound: a bucket task holds its share of the keys, about 40 bytes per document (16-byte
hash + 8-byte doc + sort indices and temporaries); ``buckets`` is chosen so that
``40 * documents / buckets <= max_memory_mb`` (or set explicitly). The main process holds 16 bytes
per *duplicate* (doc and first). Hash collisions: 128-bit hashes; the chance of one false
duplicate among 10^9 documents is about 10^-21.

Counters: ``dropped/duplicate_url``, ``dropped/duplicate_text``, ``exact_dedup/empty_text``
(texts that normalise to nothing are never duplicates), ``exact_dedup/no_url`` (null/empty URLs
are never duplicates), ``exact_dedup/non_utf8_text`` (binary texts hashed after decoding with
replacement characters), ``exact_dedup/buckets``. Side output ``dropped`` (``save_dropped``): the
removed rows with ``drop_reason`` and ``duplicate_of`` (the id of the kept document).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from curate.pipeline.api import (GlobalStage, Resources, StageConfig, StageError, register, require_column, spill_join,
                                 spill_read, spill_rmtree, spill_write, spill_writer)

log = logging.getLogger("curate")

BYTES_PER_DOC = 40  # per-bucket memory per document (see the module docstring)
_KEY_SCHEMA = pa.schema([("hi", pa.uint64()), ("lo", pa.uint64()), ("doc", pa.int64())])
_DUP_SCHEMA = pa.schema([("doc", pa.int64()), ("first", pa.int64())])


class ExactDedupConfig(StageConfig):
    text_column: str = Field("text", description="column holding the document text")
    dedup_text: bool = Field(True, description="drop documents whose normalised text was seen")
    url_column: str = Field("url", description="column holding the document URL")
    dedup_urls: bool = Field(True, description="drop documents whose normalised URL was seen "
                                               "(skipped when the input has no url_column)")
    lowercase: bool = Field(True, description="case-insensitive text keys")
    unicode_form: str | None = Field("NFKC", description="Unicode normalisation of text keys")
    collapse_whitespace: bool = Field(True, description="runs of whitespace count as one space")
    remove_punctuation: bool = Field(False, description="ignore punctuation in text keys")
    replace_digits: bool = Field(False, description="ignore which digits a text has")
    buckets: int | None = Field(None, ge=1, description="hash buckets (default: from max_memory_mb)")
    max_memory_mb: int = Field(1024, ge=16, description="memory budget of one bucket task")
    batch_size: int = Field(8192, ge=1, description="rows read at a time")
    save_dropped: bool = Field(False, description="side output 'dropped' with the removed rows "
                                                  "(held in memory until the step ends)")


# --------------------------------------------------------------------------------------------------
# worker functions (top level: picklable)


def _norm_url(u: str | None) -> str | None:
    if u is None:
        return None
    u = u.strip()
    if not u:
        return None
    from curate.ingest.urls import normalize_url

    try:
        return normalize_url(u) or u
    except Exception:  # noqa: BLE001 - an unparsable URL is its own key
        return u


def _hash_keys(values: list[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hi, lo, valid mask) of the 128-bit xxh3 hash of each non-empty value."""
    import xxhash

    n = len(values)
    buf = bytearray(16 * n)
    valid = np.zeros(n, bool)
    h = xxhash.xxh3_128_digest
    for i, v in enumerate(values):
        if v:
            buf[16 * i:16 * i + 16] = h(v.encode("utf-8", "surrogatepass"))
            valid[i] = True
    arr = np.frombuffer(bytes(buf), dtype=">u8").reshape(n, 2) if n else np.zeros((0, 2), ">u8")
    return arr[:, 0].astype(np.uint64), arr[:, 1].astype(np.uint64), valid


def hash_task(item: dict) -> dict:
    """Step 1 for one part: bucketed (hi, lo, doc) files for the text and URL keys."""
    from curate.pipeline.api import iter_part
    from curate.text.normalize import normalize_for_hash

    part, cfg, work, nb = item["part"], item["cfg"], item["work"], item["buckets"]
    cols = [c for c in (cfg["text_column"], cfg["url_column"]) if c]
    batches = iter_part(item["source"], cols, cfg["batch_size"])
    norm = cfg["norm"]
    writers: dict[tuple[str, int], pq.ParquetWriter] = {}
    files: dict[str, list[str | None]] = {"text": [None] * nb, "url": [None] * nb}
    counters = {"exact_dedup/empty_text": 0, "exact_dedup/no_url": 0}
    n = 0

    def emit(kind: str, hi: np.ndarray, lo: np.ndarray, docs: np.ndarray) -> None:
        b = (hi % np.uint64(nb)).astype(np.int64)
        order = np.argsort(b, kind="stable")
        b, hi, lo, docs = b[order], hi[order], lo[order], docs[order]
        cuts = np.flatnonzero(np.diff(b)) + 1
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(b)]):
            if s == e:
                continue
            bk = int(b[s])
            w = writers.get((kind, bk))
            if w is None:
                path = spill_join(work, kind, f"b-{bk:04d}", f"part-{part:05d}.parquet")
                w = writers[(kind, bk)] = spill_writer(path, _KEY_SCHEMA, compression="lz4")
                files[kind][bk] = path
            w.write_table(pa.table({"hi": hi[s:e], "lo": lo[s:e], "doc": docs[s:e]}, schema=_KEY_SCHEMA))

    try:
        for batch in batches:
            m = batch.num_rows
            if not m:
                continue
            docs = (np.int64(part) << np.int64(32)) | np.arange(n, n + m, dtype=np.int64)
            n += m
            if cfg["dedup_text"]:
                col = batch.column(cfg["text_column"])
                if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                    vals = []
                    for v in col.to_pylist():
                        try:
                            vals.append(v.decode("utf-8") if v is not None else None)
                        except UnicodeDecodeError:
                            counters["exact_dedup/non_utf8_text"] = counters.get("exact_dedup/non_utf8_text", 0) + 1
                            vals.append(v.decode("utf-8", "replace"))
                elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type):
                    vals = col.to_pylist()
                else:
                    try:
                        vals = col.cast(pa.string()).to_pylist()
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                        raise StageError(f"exact_dedup: text column of type {col.type} cannot be "
                                         f"read as text: {exc}") from exc
                keys = [normalize_for_hash(t, **norm) if t else None for t in vals]
                hi, lo, ok = _hash_keys(keys)
                counters["exact_dedup/empty_text"] += int((~ok).sum())
                emit("text", hi[ok], lo[ok], docs[ok])
            if cfg["url_column"]:
                urls = [_norm_url(u) for u in batch.column(cfg["url_column"]).cast(pa.string()).to_pylist()]
                hi, lo, ok = _hash_keys(urls)
                counters["exact_dedup/no_url"] += int((~ok).sum())
                emit("url", hi[ok], lo[ok], docs[ok])
    finally:
        for w in writers.values():
            w.close()
    return {"part": part, "rows": n, "files": files, "counters": counters}


def bucket_task(item: dict) -> dict:
    """Step 2 for one bucket: (doc, first) of every duplicate, first = earliest equal key."""
    files = [f for f in item["files"] if f]
    out = item["out"]
    if not files:
        return {"path": None, "dups": 0}
    t = pa.concat_tables([spill_read(f) for f in files])
    hi = t.column("hi").to_numpy()
    lo = t.column("lo").to_numpy()
    doc = t.column("doc").to_numpy()
    del t
    exclude = item.get("exclude")
    if exclude is not None and len(exclude):
        keep = ~np.isin(doc, exclude)
        hi, lo, doc = hi[keep], lo[keep], doc[keep]
    order = np.lexsort((doc, lo, hi))
    hi, lo, doc = hi[order], lo[order], doc[order]
    del order
    same = np.zeros(len(doc), bool)
    if len(doc) > 1:
        same[1:] = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    # index of the first row of each run
    start = np.where(~same, np.arange(len(doc)), 0)
    np.maximum.accumulate(start, out=start)
    dups, first = doc[same], doc[start[same]]
    spill_write(pa.table({"doc": dups, "first": first}, schema=_DUP_SCHEMA), out)
    return {"path": out, "dups": int(len(dups))}


def _read_dups(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tabs = [spill_read(p) for p in paths if p]
    if not tabs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    t = pa.concat_tables(tabs)
    return t.column("doc").to_numpy(), t.column("first").to_numpy()


@register
class ExactDedup(GlobalStage):
    """Global exact dedup of normalised texts (and URLs); keeps the first occurrence."""

    name = "exact_dedup"
    Config = ExactDedupConfig
    reads = ("text",)
    writes: dict[str, pa.DataType] = {}
    resources = Resources(cpus=1.0)


    def run(self, dataset: Any, writer: Any, ctx: Any) -> None:
        c = self.config
        schema = dataset.schema()
        if schema is None or dataset.num_parts == 0:
            return
        if c.dedup_text:
            require_column(schema, c.text_column, self.step_name)  # binary text is decoded and counted
        url_col = c.url_column if c.dedup_urls and c.url_column in schema.names else None
        if c.dedup_urls and url_col is None:
            log.info("%s: no %r column, URL dedup skipped", self.step_name, c.url_column)
        if not c.dedup_text and url_col is None:
            log.warning("%s: nothing to deduplicate on", self.step_name)
            for t in dataset.iter_tables(batch_size=c.batch_size):
                writer.write(t)
            return
        total = dataset.count_rows()
        nb = c.buckets or max(1, math.ceil(total * BYTES_PER_DOC / (c.max_memory_mb * 2 ** 20)))
        self.count("exact_dedup/buckets", nb)
        work = self.scratch(ctx, "exact_dedup")
        cfg = {"text_column": c.text_column if c.dedup_text else None, "dedup_text": c.dedup_text,
               "url_column": url_col, "batch_size": c.batch_size,
               "norm": {"lowercase": c.lowercase, "unicode_form": c.unicode_form,
                        "collapse_whitespace": c.collapse_whitespace,
                        "remove_punctuation": c.remove_punctuation, "replace_digits": c.replace_digits}}
        items = [{"part": i, "source": dataset.part_source(i),
                  "cfg": cfg, "work": work, "buckets": nb} for i in range(dataset.num_parts)]

        # 1. hashes, bucketed
        results = []
        for res in ctx.map(hash_task, items):
            results.append(res)
            for k, v in res["counters"].items():
                self.count(k, v)
            ctx.progress(res["rows"])

        def buckets_of(kind: str, exclude=None) -> list[dict]:
            return [{"files": [r["files"][kind][b] for r in results], "exclude": exclude,
                     "out": spill_join(work, "dups", f"{kind}-{b:04d}.parquet")} for b in range(nb)]

        # 2a. URL duplicates, then 2b. text duplicates among the survivors
        url_doc = url_first = np.zeros(0, np.int64)
        if url_col:
            url_doc, url_first = _read_dups([r["path"] for r in ctx.map(bucket_task, buckets_of("url"))])
        text_doc = text_first = np.zeros(0, np.int64)
        if c.dedup_text:
            exclude = np.sort(url_doc) if len(url_doc) else None
            text_doc, text_first = _read_dups(
                [r["path"] for r in ctx.map(bucket_task, buckets_of("text", exclude))])
        self.drop("duplicate_url", int(len(url_doc)))
        self.drop("duplicate_text", int(len(text_doc)))

        # 3. write the survivors in input order
        docs = np.concatenate([url_doc, text_doc])
        firsts = np.concatenate([url_first, text_first])
        kinds = np.concatenate([np.zeros(len(url_doc), np.int8), np.ones(len(text_doc), np.int8)])
        order = np.argsort(docs, kind="stable")
        docs, firsts, kinds = docs[order], firsts[order], kinds[order]
        first_ids = self._ids_of(dataset, firsts) if c.save_dropped and len(firsts) else None
        for p in range(dataset.num_parts):
            lo_i, hi_i = np.searchsorted(docs, [np.int64(p) << 32, np.int64(p + 1) << 32])
            drop_rows = docs[lo_i:hi_i] & np.int64(0xFFFFFFFF)
            for row, t in dataset.iter_with_offsets(p, batch_size=c.batch_size):
                m = t.num_rows
                a, b = np.searchsorted(drop_rows, [row, row + m])
                if a == b:
                    writer.write(t)
                else:
                    mask = np.ones(m, bool)
                    mask[drop_rows[a:b] - row] = False
                    writer.write(t.filter(pa.array(mask)))
                    if c.save_dropped:
                        sel = slice(lo_i + a, lo_i + b)
                        d = t.filter(pa.array(~mask))
                        d = d.append_column("drop_reason", pa.array(
                            np.where(kinds[sel] == 0, "duplicate_url", "duplicate_text").tolist(), pa.string()))
                        d = d.append_column("duplicate_of", first_ids.slice(lo_i + a, b - a))
                        self.side("dropped", d)
        spill_rmtree(work)

    @staticmethod
    def _ids_of(dataset: Any, docs: np.ndarray) -> pa.Array:
        """The ``id`` of each doc number in ``docs`` (any order), reading only needed parts."""
        if "id" not in dataset.schema().names:
            return pa.array([f"{d >> 32}:{d & 0xFFFFFFFF}" for d in docs.tolist()], pa.string())
        out: list[Any] = [None] * len(docs)
        parts = docs >> 32
        for p in np.unique(parts).tolist():
            idx = np.flatnonzero(parts == p)
            ids = dataset.part(p, ["id"]).column("id").combine_chunks().cast(pa.string())
            got = ids.take(pa.array(docs[idx] & 0xFFFFFFFF)).to_pylist()
            for i, v in zip(idx.tolist(), got):
                out[i] = v
        return pa.array(out, pa.string())
