"""``minhash_dedup``: near-duplicate removal with MinHash LSH over the whole dataset.

Data flow (every arrow is Parquet in the stage's work folder, so each step is either a per-shard
map or a per-band "hash shuffle" -- the same plan runs under the local process pool and Ray):

1. signatures (``ctx.map`` over input parts): normalise + shingle + MinHash (compiled kernels in
   :mod:`curate.dedup.minhash`, datasketch's ``affine32`` hash family) and write one band-key
   file per (shuffle bucket, part): ``keys/bucket-KKKKK/part-PPPPP.parquet`` (``key`` uint64,
   ``doc`` int64 = ``part << 32 | row``); a bucket is one band, or a hash slice of one band
   (``key_partitions``) for corpora whose band keys do not fit in memory. With
   ``save_signatures`` the signatures are written too.
2. edges (``ctx.map`` over buckets -- the hash shuffle): all parts' keys of one bucket, sorted by
   (key, doc); each run of equal keys gives edges to its first document
   -> ``edges/bucket-KKKKK.parquet``.
3. optional verification: the shingle sets of the documents that appear in candidate pairs are
   recomputed (``ctx.map`` over the parts that hold them); pairs (deduplicated across bands)
   whose exact Jaccard (64-bit shingle hashes) is below ``verify_threshold`` are dropped.
4. connected components: a compiled union-find streamed over the edge files (memory O(docs)).
5. one kept document per component (``keep``: first seen, longest, or highest ``score_column``),
   then a streaming pass over the parts writes the kept rows in input order, with ``cluster_id``
   (the id of the kept document; null for documents without duplicates) and ``cluster_size``.

Side output ``clusters`` (``save_clusters``): one row per document of every non-singleton cluster
(``id``, ``cluster_id``, ``cluster_size``, ``kept``), to audit what was removed; ``removed``
(``save_removed``): the full removed rows with a ``duplicate_of`` column.
Counters: ``minhash_dedup/clusters``, ``minhash_dedup/docs_in_clusters``, ``minhash_dedup/cluster_size/<bucket>``, ``dropped/near_duplicate``,
``minhash_dedup/candidate_edges``, ``minhash_dedup/verified_pairs``, ``minhash_dedup/rejected_pairs``,
``minhash_dedup/empty_docs`` (no word: never a duplicate), ``minhash_dedup/short_docs`` (< ngram tokens).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from curate.pipeline.api import (GlobalStage, Resources, StageConfig, StageError, register, require_column, set_column,
                                 spill_join, spill_read, spill_rmtree, spill_write, spill_writer)

log = logging.getLogger("curate")

# spill files hold hashes: random bits that neither compress nor dictionary-encode
SPILL_COMPRESSION = "none"
SPILL_OPTS = {"compression": SPILL_COMPRESSION, "use_dictionary": False, "write_statistics": False}


class MinhashDedupConfig(StageConfig):
    text_column: str = Field("text", description="column holding the document text")
    ngram: int = Field(5, ge=1, description="shingle size, in words (or characters with char_ngrams)")
    char_ngrams: bool = Field(False, description="shingle characters instead of words")
    num_perm: int | None = Field(None, ge=2, description="hash functions; default bands*rows, or 112 "
                                                         "when only a threshold is given")
    bands: int | None = Field(None, ge=1, description="LSH bands (default 14, or chosen from threshold)")
    rows: int | None = Field(None, ge=1, description="signature values per band (default 8)")
    threshold: float | None = Field(None, gt=0, lt=1, description=(
        "target Jaccard similarity. When bands/rows are not given they are chosen from it: with "
        "verify, for >= 95% candidate probability at the threshold (16 x 7 at 0.8); without, as "
        "datasketch's MinHashLSH does (minimal weighted false positive/negative probability)"))
    false_positive_weight: float = Field(0.5, ge=0, description="weight of false positives in that choice")
    false_negative_weight: float = Field(0.5, ge=0, description="weight of false negatives in that choice")
    seed: int = Field(1, description="seed of the permutations (datasketch MinHash seed)")
    keep: Literal["first", "longest", "score"] = Field(
        "first", description="which document of a cluster is kept: the first in input order, the "
                             "longest text, or the highest score_column (ties: the first)")
    score_column: str | None = Field(None, description="numeric column used by keep: score")
    verify: bool = Field(True, description=(
        "check candidate pairs by exact Jaccard of their shingles: removes LSH false positives and "
        "the chains they create (without it, ~8% of hard near-misses were removed on the planted test "
        "corpus); costs a second read of the candidates' text, about 25% of the speed"))
    verify_threshold: float | None = Field(None, gt=0, le=1, description=(
        "minimum exact Jaccard of a verified pair (default: threshold, or 0.8)"))
    verify_all_pairs_max: int = Field(32, ge=2, description=(
        "with verify, buckets up to this size are checked pair by pair (bigger ones against "
        "their first document only)"))
    cluster_columns: bool = Field(True, description="add cluster_id and cluster_size columns")
    save_clusters: bool = Field(True, description="side output 'clusters': one row (ids only) per "
                                                  "document of a duplicate cluster, held until the step ends")
    save_removed: bool = Field(False, description="side output 'removed': the removed rows "
                                                  "(held in memory until the step ends)")
    save_signatures: bool = Field(False, description="keep the signatures as Parquet in the work folder")
    batch_size: int = Field(4096, ge=1, description="documents per hashing batch")
    threads: int = Field(1, ge=1, description=(
        "threads of the compiled hashing kernels in each worker. The runner already hashes input "
        "parts in parallel processes; more threads help a library call on an idle machine (on a "
        "busy one, waking the thread pool costs more than it saves)"))
    key_partitions: int | None = Field(None, ge=1, description=(
        "shuffle buckets per band (by key hash): one bucket's keys are held in memory at a time "
        "(16 bytes per document); default: one per 20 million documents"))

    @model_validator(mode="after")
    def _check(self) -> "MinhashDedupConfig":
        if self.keep == "score" and not self.score_column:
            raise ValueError("keep: score needs score_column")
        if (self.bands is None) != (self.rows is None) and self.threshold is None and self.num_perm is None:
            raise ValueError("give both bands and rows (or a threshold, or num_perm with one of them)")
        b, r, p = self.lsh()
        if b * r > p:
            raise ValueError(f"bands*rows = {b * r} exceeds num_perm = {p}")
        return self

    def lsh(self) -> tuple[int, int, int]:
        """(bands, rows, num_perm) after applying the defaults."""
        b, r, p = self.bands, self.rows, self.num_perm
        if b is not None and r is not None:
            return b, r, p or b * r
        if p is not None and (b is not None or r is not None):
            if b is not None:
                return b, p // b, p
            return p // r, r, p
        if self.threshold is not None:
            from curate.dedup.minhash import lsh_params, recall_params
            p = p or 112
            if self.verify:
                b, r = recall_params(self.threshold, p)
            else:
                b, r = lsh_params(self.threshold, p, self.false_positive_weight, self.false_negative_weight)
            return b, r, p
        if p is not None:  # only num_perm: keep rows=8 as the default band width
            return max(1, p // 8), min(8, p), p
        return 14, 8, 112


# --------------------------------------------------------------------------------------------------
# worker functions (top level: picklable for process pools and Ray)


def _text_array(col: pa.ChunkedArray | pa.Array, counters: dict[str, int]) -> pa.Array:
    """A string array from whatever the text column holds; oddities are counted, not fatal."""
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    t = col.type
    if pa.types.is_string(t):
        return col
    if pa.types.is_large_string(t):
        return col.cast(pa.string())
    if pa.types.is_null(t):
        return pa.nulls(len(col), pa.string())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        try:
            return col.cast(pa.string())
        except pa.ArrowInvalid:
            vals = []
            bad = 0
            for v in col.to_pylist():
                if v is None:
                    vals.append(None)
                    continue
                try:
                    vals.append(v.decode("utf-8"))
                except UnicodeDecodeError:
                    bad += 1
                    vals.append(v.decode("utf-8", errors="replace"))
            counters["minhash_dedup/non_utf8_text"] = counters.get("minhash_dedup/non_utf8_text", 0) + bad
            return pa.array(vals, pa.string())
    try:
        out = col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise StageError(f"minhash_dedup: text column of type {t} cannot be read as text: {exc}") from exc
    counters["minhash_dedup/non_string_text"] = counters.get("minhash_dedup/non_string_text", 0) + len(col) - col.null_count
    return out


def _set_threads(cfg: dict) -> None:
    """Compiled kernels use ``threads`` threads in this worker."""
    import numba

    n = cfg.get("threads")
    if n:
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def signature_task(item: dict) -> dict:
    """Step 1 for one input part: band keys (and optionally signatures) -> Parquet."""
    from curate.dedup import minhash as M
    from curate.pipeline.api import iter_part

    part = item["part"]
    cfg = item["cfg"]
    _set_threads(cfg)
    work = item["work"]
    bands, rows = cfg["bands"], cfg["rows"]
    a = np.asarray(item["a"], np.uint64)
    b = np.asarray(item["b"], np.uint64)
    text_col = cfg["text_column"]
    score_col = cfg["score_column"] if cfg["keep"] == "score" else None
    cols = [text_col] + ([score_col] if score_col and score_col != text_col else [])
    batches = iter_part(item["source"], cols, cfg["batch_size"])

    counters: dict[str, int] = {}
    nparts = cfg["key_partitions"]
    buckets = bands * nparts  # shuffle bucket = (band, key % nparts)
    writers: list[pq.ParquetWriter | None] = [None] * buckets
    key_files = [spill_join(work, "keys", f"bucket-{k:05d}", f"part-{part:05d}.parquet") for k in range(buckets)]
    key_schema = pa.schema([("key", pa.uint64()), ("doc", pa.int64())])
    sig_writer = None
    sig_file = spill_join(work, "signatures", f"part-{part:05d}.parquet")
    values: list[np.ndarray] = []
    n = 0
    try:
        for batch in batches:
            m = batch.num_rows
            if m == 0:
                continue
            texts = _text_array(batch.column(text_col), counters)
            h, off, ntok = M.shingle_hashes(texts, cfg["ngram"], cfg["char_ngrams"], token_counts=True)
            empty = ntok == 0
            short = int(((ntok > 0) & (ntok < cfg["ngram"])).sum())
            counters["minhash_dedup/empty_docs"] = counters.get("minhash_dedup/empty_docs", 0) + int(empty.sum())
            counters["minhash_dedup/short_docs"] = counters.get("minhash_dedup/short_docs", 0) + short
            sig = M.signatures(h, off, a, b)
            keys = M.band_keys(sig, bands, rows)
            rows_idx = np.arange(n, n + m, dtype=np.int64)
            ok = ~empty
            docs = (np.int64(part) << np.int64(32)) | rows_idx[ok]
            for bd in range(bands):
                kb = keys[ok, bd]
                for kp in range(nparts):
                    if nparts == 1:
                        tb = pa.table({"key": pa.array(kb), "doc": pa.array(docs)}, schema=key_schema)
                    else:
                        sel = (kb % np.uint64(nparts)) == np.uint64(kp)
                        tb = pa.table({"key": pa.array(kb[sel]), "doc": pa.array(docs[sel])}, schema=key_schema)
                    k = bd * nparts + kp
                    if writers[k] is None:
                        writers[k] = spill_writer(key_files[k], key_schema, **SPILL_OPTS)
                    writers[k].write_table(tb)
            if cfg["save_signatures"]:
                flat = pa.array(sig.reshape(-1), pa.uint32())
                tb = pa.table({"doc": pa.array(rows_idx), "signature": pa.FixedSizeListArray.from_arrays(flat, sig.shape[1])})
                if sig_writer is None:
                    sig_writer = spill_writer(sig_file, tb.schema, **SPILL_OPTS)
                sig_writer.write_table(tb)
            if cfg["keep"] == "longest":
                values.append(pc.fill_null(pc.utf8_length(texts), 0).to_numpy(zero_copy_only=False).astype(np.float64))
            elif score_col:
                sc = batch.column(score_col)
                try:
                    v = pc.cast(sc, pa.float64())
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise StageError(f"minhash_dedup: score_column {score_col!r} of type {sc.type} is not numeric") from exc
                values.append(v.to_numpy(zero_copy_only=False).astype(np.float64))  # nulls -> nan
            n += m
    finally:
        for w in writers:
            if w is not None:
                w.close()
        if sig_writer is not None:
            sig_writer.close()
    return {"part": part, "rows": n, "counters": counters,
            "values": np.concatenate(values) if values else (np.zeros(0) if cfg["keep"] != "first" else None),
            "key_files": [f if writers[i] is not None else None for i, f in enumerate(key_files)]}


def edges_task(item: dict) -> dict:
    """Step 2 for one band: its key files of all parts -> candidate edges Parquet."""
    from curate.dedup.components import EDGE_SCHEMA, band_edges

    a, b = band_edges(item["files"], item["offsets"], item["all_pairs_max"])
    spill_write(pa.table({"a": a, "b": b}, schema=EDGE_SCHEMA), item["out"], **SPILL_OPTS)
    return {"band": item["band"], "edges": int(len(a)), "path": item["out"]}


def shingle_sets_task(item: dict) -> dict:
    """Step 3 for one input part: the sorted unique shingle hashes of the selected rows (the
    documents of candidate pairs only), read again from the part."""
    from curate.dedup import minhash as M
    from curate.pipeline.api import iter_part

    cfg = item["cfg"]
    _set_threads(cfg)
    rows = item["rows"]  # sorted local row numbers
    text_col = cfg["text_column"]
    batches = iter_part(item["source"], [text_col], cfg["batch_size"])
    vals, lens = [], []
    start = 0
    counters: dict[str, int] = {}
    for batch in batches:
        m = batch.num_rows
        lo, hi = np.searchsorted(rows, [start, start + m])
        if hi > lo:
            texts = _text_array(batch.column(text_col).take(pa.array(rows[lo:hi] - start)), counters)
            h, off = M.shingle_hashes(texts, cfg["ngram"], cfg["char_ngrams"])
            u, uoff = M.sorted_unique(h, off)
            vals.append(u)
            lens.append(np.diff(uoff))
        start += m
    return {"part": item["part"], "vals": np.concatenate(vals) if vals else np.zeros(0, np.uint64),
            "lens": np.concatenate(lens) if lens else np.zeros(0, np.int64)}


# --------------------------------------------------------------------------------------------------
# the stage


@register
class MinhashDedup(GlobalStage):
    """Near-duplicate removal with MinHash LSH across all shards (keeps one document per cluster)."""

    name = "minhash_dedup"
    Config = MinhashDedupConfig
    requires = ("numba",)
    reads = ("{text_column}",)
    writes = {"cluster_id": pa.string(), "cluster_size": pa.int32()}
    resources = Resources(cpus=1.0)

    # -- helpers -----------------------------------------------------------------------------------

    def run(self, dataset: Any, writer: Any, ctx: Any) -> None:
        import numba

        old = numba.get_num_threads()
        numba.set_num_threads(max(1, min(self.config.threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            self._run(dataset, writer, ctx)
        finally:
            numba.set_num_threads(old)

    def _run(self, dataset: Any, writer: Any, ctx: Any) -> None:
        from curate.dedup import minhash as M
        from curate.dedup.components import UnionFind, pick_kept, size_bucket

        c = self.config
        schema = dataset.schema()
        if schema is None or dataset.num_parts == 0:
            return
        require_column(schema, c.text_column, self.step_name)  # binary text is decoded and counted
        if c.keep == "score" and c.score_column not in schema.names:
            raise StageError(f"stage {self.step_name!r} (minhash_dedup): score_column {c.score_column!r} "
                             f"not in the input (columns: {schema.names})")
        bands, rows, num_perm = c.lsh()
        a, b = M.permutations(num_perm, c.seed)
        work = self.scratch(ctx, "minhash")
        log.info("%s: MinHash %d perms, %d bands x %d rows, %d-%s shingles", self.step_name, num_perm,
                 bands, rows, c.ngram, "char" if c.char_ngrams else "word")
        cfg = {"bands": bands, "rows": rows, "text_column": c.text_column, "score_column": c.score_column,
               "keep": c.keep, "ngram": c.ngram, "char_ngrams": c.char_ngrams, "batch_size": c.batch_size,
               "verify": c.verify, "save_signatures": c.save_signatures,
               "threads": c.threads,
               "key_partitions": c.key_partitions or max(1, -(-dataset.count_rows() // 20_000_000))}
        items = [{"part": i, "source": dataset.part_source(i),
                  "cfg": cfg, "work": work, "a": a, "b": b} for i in range(dataset.num_parts)]

        clock = time.perf_counter()
        self.phase_seconds: dict[str, float] = {}  # wall time per phase (logged; for benchmarks)

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.phase_seconds[name] = round(now - clock, 4)
            clock = now

        # 1. signatures -> band keys (per part)
        results = []
        for res in ctx.map(signature_task, items):
            results.append(res)
            for k, v in res["counters"].items():
                self.count(k, v)
            ctx.progress(res["rows"])
        part_rows = np.array([r["rows"] for r in results], np.int64)
        offsets = np.zeros(len(part_rows) + 1, np.int64)
        np.cumsum(part_rows, out=offsets[1:])
        total = int(offsets[-1])
        if total == 0:
            spill_rmtree(work)
            self._write_all(dataset, writer, None)
            return
        values = None
        if c.keep != "first":
            values = np.concatenate([r["values"] for r in results])

        lap("signatures")

        # 2. band keys -> candidate edges (per shuffle bucket)
        edge_items = [{"band": k, "files": [r["key_files"][k] for r in results if r["key_files"][k]],
                       "offsets": offsets[:-1], "all_pairs_max": c.verify_all_pairs_max if c.verify else 0,
                       "out": spill_join(work, "edges", f"bucket-{k:05d}.parquet")}
                      for k in range(bands * cfg["key_partitions"])]
        edge_files = []
        n_edges = 0
        for res in ctx.map(edges_task, edge_items):
            edge_files.append(res["path"])
            n_edges += res["edges"]
        self.count("minhash_dedup/candidate_edges", n_edges)
        spill_rmtree(spill_join(work, "keys"))

        lap("edges")

        # 3./4. (verification and) connected components
        uf = UnionFind(total)
        if c.verify and n_edges:
            self._verify_and_union(uf, edge_files, items, offsets, ctx)
        else:
            for f in edge_files:
                uf.union_file(f)
        labels = uf.labels()

        lap("components")

        # 5. kept document per component, stats
        kept, size_of = pick_kept(labels, values)
        sizes = np.bincount(labels, minlength=total)
        comp_sizes = sizes[sizes > 1]
        self.count("minhash_dedup/clusters", int(len(comp_sizes)))
        self.count("minhash_dedup/docs_in_clusters", int(comp_sizes.sum()))
        if len(comp_sizes):
            u, cnt = np.unique(comp_sizes, return_counts=True)
            for s, k in zip(u.tolist(), cnt.tolist()):
                self.count(f"minhash_dedup/cluster_size/{size_bucket(s)}", k)
            self.count("minhash_dedup/cluster_size/max", int(comp_sizes.max()))
        self._write_all(dataset, writer, (kept, size_of, offsets))
        lap("write")
        log.info("%s: phases (s) %s", self.step_name, self.phase_seconds)
        if not c.save_signatures:
            spill_rmtree(work)
        else:
            spill_rmtree(spill_join(work, "edges"))

    def _verify_and_union(self, uf: Any, edge_files: list[str], items: list[dict],
                          offsets: np.ndarray, ctx: Any) -> None:
        """Exact Jaccard of every distinct candidate pair; only verified pairs are united. The
        shingle sets of the documents in candidate pairs are recomputed from their parts."""
        from curate.dedup.minhash import jaccard_pairs

        c = self.config
        thr = c.verify_threshold or c.threshold or 0.8
        tables = [spill_read(f) for f in edge_files]
        a = np.concatenate([t.column("a").to_numpy() for t in tables])
        b = np.concatenate([t.column("b").to_numpy() for t in tables])
        del tables
        if offsets[-1] < 2**31:  # distinct pairs (a < b) through one packed int64 key
            keys = np.unique((a << 32) | b)
            a, b = keys >> 32, keys & 0xFFFFFFFF
        else:
            pairs = np.unique(np.stack([a, b], axis=1), axis=0)
            a, b = pairs[:, 0].copy(), pairs[:, 1].copy()
        involved = np.unique(np.concatenate([a, b]))
        part_of = np.searchsorted(offsets, involved, side="right") - 1
        jobs = []
        for p in np.unique(part_of).tolist():
            rows = involved[part_of == p] - offsets[p]
            jobs.append({**items[p], "rows": rows})
        vals, lens = [], []
        for res in ctx.map(shingle_sets_task, jobs):
            vals.append(res["vals"])
            lens.append(res["lens"])
        vals = np.concatenate(vals)
        ln = np.concatenate(lens)
        off = np.zeros(len(ln) + 1, np.int64)
        np.cumsum(ln, out=off[1:])
        j = jaccard_pairs(vals, off, np.searchsorted(involved, a), np.searchsorted(involved, b))
        keep = j >= thr
        uf.union(a[keep], b[keep])
        self.count("minhash_dedup/verified_pairs", int(keep.sum()))
        self.count("minhash_dedup/rejected_pairs", int(len(keep) - keep.sum()))

    def _kept_ids(self, dataset: Any, kept_docs: np.ndarray, offsets: np.ndarray) -> pa.Array:
        """The ``id`` of each kept document (sorted dense numbers), read part by part."""
        has_id = "id" in dataset.schema().names
        if not has_id:
            return pa.array([f"#{d}" for d in kept_docs.tolist()], pa.string())
        out = []
        for p in range(dataset.num_parts):
            lo, hi = offsets[p], offsets[p + 1]
            sel = kept_docs[(kept_docs >= lo) & (kept_docs < hi)] - lo
            if len(sel):
                ids = dataset.part(p, ["id"]).column("id").combine_chunks().cast(pa.string())
                out.append(ids.take(pa.array(sel)))
        return pa.concat_arrays(out) if out else pa.array([], pa.string())

    def _write_all(self, dataset: Any, writer: Any, plan: tuple | None) -> None:
        c = self.config
        if plan is not None:
            kept, size_of, offsets = plan
            multi = np.nonzero(size_of > 1)[0]
            kept_docs = np.unique(kept[multi])
            kept_ids = self._kept_ids(dataset, kept_docs, offsets)
        removed_total = 0
        for p in range(dataset.num_parts):
            for row, t in dataset.iter_with_offsets(p, batch_size=max(c.batch_size, 8192)):
                m = t.num_rows
                if plan is None:
                    if c.cluster_columns:
                        t = set_column(t, "cluster_id", pa.nulls(m, pa.string()))
                        t = set_column(t, "cluster_size", pa.array(np.ones(m, np.int32)))
                    writer.write(t)
                    continue
                dense = offsets[p] + row + np.arange(m, dtype=np.int64)
                if m and dense[-1] >= offsets[p + 1]:
                    raise StageError(f"minhash_dedup: part {p} changed while the stage ran")
                sz = size_of[dense]
                kd = kept[dense]
                in_cluster = sz > 1
                keep_mask = (~in_cluster) | (kd == dense)
                cid = None
                if c.cluster_columns or c.save_clusters or c.save_removed:
                    idx = np.searchsorted(kept_docs, kd[in_cluster])
                    ids_in = kept_ids.take(pa.array(idx, pa.int64())) if len(idx) else pa.array([], pa.string())
                    # scatter into a nullable column
                    pos = np.full(m, -1, np.int64)
                    pos[in_cluster] = np.arange(int(in_cluster.sum()))
                    cid = ids_in.take(pa.array(pos, mask=pos < 0))
                if c.save_clusters and in_cluster.any():
                    sel = np.nonzero(in_cluster)[0]
                    idcol = (t.column("id").combine_chunks().cast(pa.string()).take(pa.array(sel))
                             if "id" in t.schema.names else pa.array([f"#{d}" for d in dense[sel].tolist()]))
                    self.side("clusters", pa.table({
                        "id": idcol, "cluster_id": cid.take(pa.array(sel)),
                        "cluster_size": pa.array(sz[sel].astype(np.int32)),
                        "kept": pa.array(keep_mask[sel])}))
                out = t
                if c.cluster_columns:
                    out = set_column(out, "cluster_id", cid)
                    out = set_column(out, "cluster_size", pa.array(sz.astype(np.int32)))
                n_removed = int(m - keep_mask.sum())
                if n_removed and c.save_removed:
                    rm = out.filter(pa.array(~keep_mask))
                    self.side("removed", set_column(rm, "duplicate_of", cid.filter(pa.array(~keep_mask))))
                removed_total += n_removed
                writer.write(out.filter(pa.array(keep_mask)) if n_removed else out)
        if removed_total:
            self.drop("near_duplicate", removed_total)

