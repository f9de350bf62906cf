"""From LSH band-key tables to duplicate clusters.

Data flow (each step reads and writes Parquet, so it maps onto a hash shuffle under Ray):

1. band-key files ``keys/bucket-KKKKK/part-PPPPP.parquet`` (``key`` uint64, ``doc`` int64 packed
   as ``part << 32 | row``), written per input part by the signature step; a bucket is a band (or
   a hash slice of a band);
2. :func:`band_edges` -- one bucket at a time: sort by (key, doc) and emit, for every run of equal
   keys, edges to the run's first (smallest) document ("star" edges, at most one per document and
   band), or, when exact verification follows, all pairs of small runs;
3. :func:`union_find` -- streamed over the edge files, a compiled union-find over dense document
   numbers: memory is O(documents), never O(pairs);
4. :func:`pick_kept` -- one kept document per component (first / longest / highest score).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from curate.pipeline.scratch import spill_file, spill_read
from curate.numba_cache import njit

EDGE_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64())])


def dense_docs(packed: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Packed ``part << 32 | row`` -> global document number ``offsets[part] + row``."""
    packed = packed.astype(np.int64, copy=False)
    return offsets[packed >> 32] + (packed & 0xFFFFFFFF)


@njit(cache=True)
def _edges_sorted(keys, docs, all_pairs_max):
    """Edges of runs of equal keys in (key, doc)-sorted arrays: star edges to the run's first doc,
    or every pair when the run has at most ``all_pairs_max`` members."""
    n = len(keys)
    # count first
    m = 0
    i = 0
    while i < n:
        j = i + 1
        while j < n and keys[j] == keys[i]:
            j += 1
        size = j - i
        if size > 1:
            m += size * (size - 1) // 2 if size <= all_pairs_max else size - 1
        i = j
    a = np.empty(m, np.int64)
    b = np.empty(m, np.int64)
    k = 0
    i = 0
    while i < n:
        j = i + 1
        while j < n and keys[j] == keys[i]:
            j += 1
        size = j - i
        if size > 1:
            if size <= all_pairs_max:
                for x in range(i, j):
                    for y in range(x + 1, j):
                        if docs[x] != docs[y]:
                            a[k] = docs[x]
                            b[k] = docs[y]
                            k += 1
            else:
                for y in range(i + 1, j):
                    if docs[y] != docs[i]:
                        a[k] = docs[i]
                        b[k] = docs[y]
                        k += 1
        i = j
    return a[:k], b[:k]


def band_edges(files: list[str], offsets: np.ndarray, all_pairs_max: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Candidate edges (a < b, dense numbers) of one band from its key files (all parts)."""
    tables = [spill_read(f) for f in files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    t = pa.concat_tables(tables)
    keys = t.column("key").to_numpy()
    docs = dense_docs(t.column("doc").to_numpy(), offsets)
    order = np.lexsort((docs, keys))
    return _edges_sorted(keys[order], docs[order], int(all_pairs_max))


@njit(cache=True)
def _find(parent, x):
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:  # path compression
        nxt = parent[x]
        parent[x] = root
        x = nxt
    return root


@njit(cache=True)
def _union_edges(parent, a, b):
    merged = 0
    for i in range(len(a)):
        ra = _find(parent, a[i])
        rb = _find(parent, b[i])
        if ra != rb:
            # the smaller number becomes the root: labels = smallest member (deterministic)
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
            merged += 1
    return merged


@njit(cache=True)
def _flatten(parent):
    for i in range(len(parent)):
        parent[i] = _find(parent, i)
    return parent


class UnionFind:
    """Union-find over ``n`` dense document numbers; components are labelled by their smallest
    member. Feed edges in chunks with :meth:`union`; :meth:`labels` flattens."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self.merges = 0

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a):
            self.merges += int(_union_edges(self.parent, a.astype(np.int64, copy=False),
                                            b.astype(np.int64, copy=False)))

    def union_file(self, path: str, batch_size: int = 1 << 20) -> None:
        pf = spill_file(path)
        for batch in pf.iter_batches(batch_size=batch_size):
            self.union(batch.column(0).to_numpy(), batch.column(1).to_numpy())

    def labels(self) -> np.ndarray:
        return _flatten(self.parent)


def pick_kept(labels: np.ndarray, values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each document, the number of the kept document of its component, and component sizes
    per document. ``values`` None keeps the first (smallest number); otherwise the highest value
    (ties: the first). Only documents of non-singleton components are sorted."""
    n = len(labels)
    sizes = np.bincount(labels, minlength=n)
    size_of = sizes[labels]
    kept = np.arange(n, dtype=np.int64)
    multi = np.nonzero(size_of > 1)[0]
    if len(multi):
        if values is None:
            kept[multi] = labels[multi]
        else:
            lab = labels[multi]
            v = values[multi].astype(np.float64)
            v = np.where(np.isnan(v), -np.inf, v)
            order = np.lexsort((multi, -v, lab))  # by label, then highest value, then first
            lab_sorted = lab[order]
            first = np.ones(len(order), bool)
            first[1:] = lab_sorted[1:] != lab_sorted[:-1]
            winner_of_label = np.empty(n, np.int64)
            winner_of_label[lab_sorted[first]] = multi[order[first]]
            kept[multi] = winner_of_label[lab]
    return kept, size_of


def size_bucket(size: int) -> str:
    """Histogram bucket name of a cluster size: 2, 3-5, 6-10, 11-100, 101-1000, >1000."""
    if size == 2:
        return "2"
    for lo, hi in ((3, 5), (6, 10), (11, 100), (101, 1000)):
        if lo <= size <= hi:
            return f"{lo}-{hi}"
    return ">1000"
