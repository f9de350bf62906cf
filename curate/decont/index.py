"""The n-gram index of eval sets, built once per run as files and memory-mapped by every worker.

Normalisation (the same for eval items and documents): words are runs of ``\\w`` characters
(Python's Unicode definition); they are lowercased; everything else (punctuation, whitespace,
line breaks) only separates words. So case changes, punctuation and line re-wrapping do not
change the token sequence.

Hashing: each token gets a 64-bit xxh3 hash (cached per process); the hash of the ``k`` tokens
starting at position ``i`` is ``sum_j T[i+j] * K[j] + k * K_LEN`` (mod 2**64), with fixed odd
64-bit constants ``K``. It is computed for a whole batch of documents at once with ``k`` numpy
multiply-adds, and n-grams that would span two documents are masked out.

Index files (in a folder, named by a fingerprint of the eval files and options):

``<fp>.hashes.npy``  sorted uint64 hashes (one entry per (n-gram, item); duplicates kept)
``<fp>.meta.npy``    uint64 ``set_index << 32 | item_index``, in the order of the hashes
``<fp>.bits.npy``    a bitmap over the top 27 bits of the hashes: most document n-grams are
                     rejected by one memory read before the binary search
``<fp>.items.parquet`` set, item index, item id, a preview of the item's text, token count
``<fp>.json``        counts per set, the short-item lengths, the options

An item with at least ``n`` tokens contributes all its ``n``-grams (an n-gram spanning its question
and answer included, as the item's text is question + answer + choices). An item with fewer tokens
(but at least ``min_item_tokens``) contributes one hash of its whole token sequence, of its own
length ``k``: a document matches it when the same ``k`` tokens occur contiguously. A fragment of a
long item shorter than ``n`` tokens never matches.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

WORD_PATTERN = r"\w+"
WORD_RE = re.compile(WORD_PATTERN)
INDEX_VERSION = 2
BITS = 27                       # bitmap over the top 27 bits: 2**27 bits = 16 MiB
PREVIEW_CHARS = 300
_MAX_N = 64
_SEED = 0x5EEDC0FFEE


def _constants(k: int) -> np.ndarray:
    return np.array([xxhash.xxh3_64_intdigest(f"curate-decont-{i}".encode()) | 1 for i in range(k)], np.uint64)


K = _constants(_MAX_N)
K_LEN = np.uint64(xxhash.xxh3_64_intdigest(b"curate-decont-length") | 1)


def hash_version() -> str:
    """What the token hashes depend on besides the text (part of the index fingerprint)."""
    return f"polars-{pl.__version__}"


def batch_tokens(texts: "Sequence[str | None] | pa.Array | pa.ChunkedArray") -> tuple[np.ndarray, np.ndarray, "pl.Series"]:
    """(token hashes of all texts concatenated, tokens per text, the tokens as written) -- one
    vectorised pass (polars: Unicode ``\\w+`` runs, lowercased, 64-bit hashed). ``texts`` may be an
    Arrow string array (no Python strings are made)."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        series = pl.Series(pl.from_arrow(texts)).cast(pl.String)
    else:
        series = pl.Series(list(texts), dtype=pl.String)
    toks = series.str.extract_all(WORD_PATTERN)
    lens = toks.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = toks.explode().drop_nulls()
    T = flat.str.to_lowercase().hash(_SEED).to_numpy().astype(np.uint64, copy=False)
    return T, lens, toks


def tokens(text: str) -> list[str]:
    """Normalised tokens of ``text`` (lowercased ``\\w+`` runs)."""
    out = pl.Series([text], dtype=pl.String).str.extract_all(WORD_PATTERN).explode().drop_nulls()
    return out.str.to_lowercase().to_list()


def token_spans(text: str, words: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans in ``text`` of its tokens ``words`` (as :func:`batch_tokens` found them, in order)."""
    spans, pos = [], 0
    for w in words:
        a = text.find(w, pos)
        if a < 0:
            raise ValueError(f"token {w!r} not found after position {pos}")
        pos = a + len(w)
        spans.append((a, pos))
    return spans


def gram_hashes(T: np.ndarray, k: int, starts: np.ndarray | None = None) -> np.ndarray:
    """Hashes of the windows of ``k`` token hashes of ``T``: all ``len(T) - k + 1`` of them, or
    those starting at ``starts``."""
    if starts is None:
        m = len(T) - k + 1
        if m <= 0:
            return np.empty(0, np.uint64)
        with np.errstate(over="ignore"):
            h = np.full(m, K_LEN * np.uint64(k), np.uint64)
            for j in range(k):
                h += T[j:j + m] * K[j]
        return h
    with np.errstate(over="ignore"):
        h = np.full(len(starts), K_LEN * np.uint64(k), np.uint64)
        for j in range(k):
            h += T[starts + j] * K[j]
    return h


# --------------------------------------------------------------------------------------------------
# eval items


class EvalSetError(ValueError):
    """An eval file cannot be read or lacks a configured field (a clear, user-facing error)."""


@dataclass
class EvalSpec:
    name: str
    files: list[str]
    question: str
    answer: str | None
    choices: str | None
    id_field: str | None


def _read_records(path: str, fields: list[str]) -> Iterator[tuple[str, dict]]:
    """(where, {field: value}) of a JSONL or Parquet file: ``line N`` (JSONL) or ``row N`` (Parquet)."""
    from curate.pipeline.io import get_fs

    fs, p = get_fs(path)
    if p.endswith(".parquet"):
        with fs.open(p, "rb") as fh:
            pf = pq.ParquetFile(fh)
            missing = [f for f in fields if f not in pf.schema_arrow.names]
            if missing:
                raise EvalSetError(f"{path}: no column(s) {missing}; columns: {pf.schema_arrow.names}")
            n = 0
            for b in pf.iter_batches(batch_size=8192, columns=fields):
                for row in b.to_pylist():
                    n += 1
                    yield f"row {n}", row
        return
    compression = "infer"
    with fs.open(p, "rt", encoding="utf-8", compression=compression) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalSetError(f"{path}: line {lineno}: not JSON: {exc.msg}") from None
            if not isinstance(rec, dict):
                raise EvalSetError(f"{path}: line {lineno}: expected a JSON object")
            yield f"line {lineno}", rec


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_as_text(v) for v in value)
    if isinstance(value, dict):
        return " ".join(_as_text(v) for v in value.values())
    return str(value)


def spec_fields(spec: EvalSpec) -> dict[str, str]:
    """{role: field} of the fields an eval set's records must have."""
    roles = {"question": spec.question, "answer": spec.answer, "choices": spec.choices, "id_field": spec.id_field}
    return {k: v for k, v in roles.items() if v}


def first_record_problems(spec: EvalSpec) -> list[tuple[str, str]]:
    """(role, message) for each configured field missing from the first record of each file
    (what ``curate validate`` can check without reading whole files)."""
    out = []
    roles = spec_fields(spec)
    for path in spec.files:
        try:
            rec = next((r for _, r in _read_records(path, list(roles.values()))), None)
        except EvalSetError as exc:
            out.append(("paths", str(exc)))
            continue
        except OSError as exc:
            out.append(("paths", f"{path}: cannot read: {exc}"))
            continue
        for role, f in roles.items():
            if rec is not None and f not in rec:
                out.append((role, f"{path}: first record: no field {f!r}; fields: {sorted(rec)}"))
    return out


def iter_items(spec: EvalSpec) -> Iterator[tuple[str, str]]:
    """(item id, item text = question + answer + choices) of one eval set."""
    roles = spec_fields(spec)
    fields = list(roles.values())
    for path in spec.files:
        base = os.path.basename(path)
        for n, rec in _read_records(path, fields):
            for role, f in roles.items():
                if f not in rec:
                    raise EvalSetError(f"{path}: {n}: no field {f!r} (the {role}; set it to null "
                                       "if the eval set has none)" if role != "question" else
                                       f"{path}: {n}: no field {f!r} (the question)")
            parts = [_as_text(rec.get(spec.question))]
            if spec.answer:
                parts.append(_as_text(rec.get(spec.answer)))
            if spec.choices:
                parts.append(_as_text(rec.get(spec.choices)))
            item_id = str(rec.get(spec.id_field)) if spec.id_field and rec.get(spec.id_field) is not None \
                else f"{base}:{n.split()[-1]}"
            yield item_id, "\n".join(p for p in parts if p)


def fingerprint(specs: Sequence[EvalSpec], n: int, min_item_tokens: int) -> str:
    from curate.pipeline.io import get_fs

    h = hashlib.blake2b(digest_size=10)
    h.update(f"v{INDEX_VERSION}|{hash_version()}|{n}|{min_item_tokens}".encode())
    for s in specs:
        h.update(f"|{s.name}|{s.question}|{s.answer}|{s.choices}|{s.id_field}".encode())
        for f in s.files:
            fs, p = get_fs(f)
            info = fs.info(p)
            h.update(f"|{f}:{info.get('size')}:{info.get('mtime', info.get('LastModified', ''))}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# the index


def chunk_hashes(texts: Sequence[str], n: int, min_item_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct (hash, item) pairs of a chunk of eval items: hashes, item positions in the chunk;
    the token count of each item). An item of at least ``n`` tokens gives its ``n``-grams, a
    shorter one (of at least ``min_item_tokens``) one hash of all its tokens."""
    T, lens, _ = batch_tokens(texts)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    hs, owners = [], []
    h = gram_hashes(T, n)
    if len(h):
        doc_of = np.repeat(np.arange(len(lens)), lens)[: len(h)]
        ok = np.arange(len(h)) + n <= (starts + lens)[doc_of]
        hs.append(h[ok])
        owners.append(doc_of[ok])
    short = np.flatnonzero((lens < n) & (lens >= min_item_tokens))
    for k in np.unique(lens[short]):
        items = short[lens[short] == k]
        hs.append(gram_hashes(T, int(k), starts[items]))
        owners.append(items)
    if not hs:
        return np.empty(0, np.uint64), np.empty(0, np.int64), lens
    H, O = np.concatenate(hs), np.concatenate(owners).astype(np.int64)
    order = np.lexsort((O, H))
    H, O = H[order], O[order]
    keep = np.ones(len(H), bool)
    keep[1:] = (H[1:] != H[:-1]) | (O[1:] != O[:-1])
    return H[keep], O[keep], lens


def build_index(specs: Sequence[EvalSpec], n: int, min_item_tokens: int, prefix: str,
                chunk: int = 20000) -> dict:
    """Build the index files at ``prefix`` (written to temporary names, then renamed)."""
    hashes: list[np.ndarray] = []
    metas: list[np.ndarray] = []
    item_rows: dict[str, list] = {"set": [], "item": [], "item_id": [], "preview": [], "tokens": []}
    counts: dict[str, dict[str, int]] = {}
    short_lengths: set[int] = set()

    for si, spec in enumerate(specs):
        c = counts[spec.name] = {"items": 0, "ngrams": 0, "short_items": 0, "skipped_items": 0}
        it = iter_items(spec)
        while True:
            part = list(itertools.islice(it, chunk))
            if not part:
                break
            base = c["items"]
            texts = [t for _, t in part]
            H, O, lens = chunk_hashes(texts, n, min_item_tokens)
            item_rows["set"] += [spec.name] * len(part)
            item_rows["item"] += list(range(base, base + len(part)))
            item_rows["item_id"] += [i for i, _ in part]
            item_rows["preview"] += [t[:PREVIEW_CHARS] for t in texts]
            item_rows["tokens"] += lens.tolist()
            c["items"] += len(part)
            c["skipped_items"] += int((lens < min_item_tokens).sum())
            is_short = (lens < n) & (lens >= min_item_tokens)
            c["short_items"] += int(is_short.sum())
            short_lengths.update(int(k) for k in np.unique(lens[is_short]))
            c["ngrams"] += len(H)
            hashes.append(H)
            metas.append((np.uint64(si) << np.uint64(32)) | (O + base).astype(np.uint64))
        if c["items"] == c["skipped_items"]:
            raise EvalSetError(f"eval set {spec.name!r}: no item with at least {min_item_tokens} tokens in "
                               f"{', '.join(spec.files)} ({c['items']} records)")
    H = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    M = np.concatenate(metas) if metas else np.empty(0, np.uint64)
    order = np.argsort(H, kind="stable")
    H, M = H[order], M[order]
    bits = np.zeros(1 << (BITS - 3), np.uint8)
    top = (H >> np.uint64(64 - BITS)).astype(np.int64)
    np.bitwise_or.at(bits, top >> 3, (1 << (top & 7)).astype(np.uint8))
    meta = {"version": INDEX_VERSION, "n": n, "min_item_tokens": min_item_tokens,
            "sets": [s.name for s in specs], "counts": counts, "short_lengths": sorted(short_lengths),
            "entries": int(len(H))}
    tmp = f"{prefix}.tmp-{os.getpid()}"
    for name, arr in (("hashes", H), ("meta", M), ("bits", bits)):
        np.save(f"{tmp}.{name}.npy", arr)
    pq.write_table(pa.table(item_rows, schema=pa.schema([
        ("set", pa.string()), ("item", pa.int64()), ("item_id", pa.string()), ("preview", pa.string()),
        ("tokens", pa.int64())])), f"{tmp}.items.parquet")
    for name in ("hashes.npy", "meta.npy", "bits.npy", "items.parquet"):
        os.replace(f"{tmp}.{name}", f"{prefix}.{name}")
    with open(f"{tmp}.json", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(f"{tmp}.json", f"{prefix}.json")      # last: its presence marks a complete index
    return meta


class NgramIndex:
    """A built index, memory-mapped (read-only, shared by the OS page cache across workers)."""

    def __init__(self, prefix: str):
        with open(prefix + ".json") as f:
            self.meta = json.load(f)
        self.prefix = prefix
        self.n = int(self.meta["n"])
        self.sets: list[str] = list(self.meta["sets"])
        self.short_lengths: list[int] = list(self.meta["short_lengths"])
        # memory-mapped (plain ndarray views of the maps: cheaper to index than np.memmap)
        self.hashes = np.asarray(np.load(prefix + ".hashes.npy", mmap_mode="r"))
        self.meta_arr = np.asarray(np.load(prefix + ".meta.npy", mmap_mode="r"))
        self.bits = np.asarray(np.load(prefix + ".bits.npy", mmap_mode="r"))
        self._items: dict[tuple[int, int], tuple[str, str]] | None = None

    @classmethod
    def open_or_build(cls, specs: Sequence[EvalSpec], n: int, min_item_tokens: int, folder: str) -> "NgramIndex":
        """The index for these eval sets in ``folder``: built by the first worker (under a file
        lock), then opened by all."""
        os.makedirs(folder, exist_ok=True)
        prefix = os.path.join(folder, "index-" + fingerprint(specs, n, min_item_tokens))
        if not os.path.exists(prefix + ".json"):
            with open(prefix + ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not os.path.exists(prefix + ".json"):
                    build_index(specs, n, min_item_tokens, prefix)
        return cls(prefix)

    def lookup(self, q: np.ndarray) -> np.ndarray:
        """A bool mask: which hashes of ``q`` are in the index."""
        if len(self.hashes) == 0 or len(q) == 0:
            return np.zeros(len(q), bool)
        top = (q >> np.uint64(64 - BITS)).astype(np.int64)
        maybe = (self.bits[top >> 3] >> (top & 7).astype(np.uint8)) & 1 == 1
        out = np.zeros(len(q), bool)
        idx = np.flatnonzero(maybe)
        if len(idx):
            cand = q[idx]
            pos = np.searchsorted(self.hashes, cand)
            pos[pos == len(self.hashes)] = 0
            out[idx] = self.hashes[pos] == cand
        return out

    def owners(self, q: np.ndarray) -> list[list[tuple[int, int]]]:
        """For each hash of ``q`` (all in the index), the (set index, item index) of every item
        holding it."""
        if not len(q):
            return []
        lo = np.searchsorted(self.hashes, q, "left")
        hi = np.searchsorted(self.hashes, q, "right")
        n = hi - lo
        idx = np.repeat(lo - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(n.sum())
        m = self.meta_arr[idx]
        sets = (m >> np.uint64(32)).astype(np.int64).tolist()
        items = (m & np.uint64(0xFFFFFFFF)).astype(np.int64).tolist()
        pairs = list(zip(sets, items))
        out, a = [], 0
        for c in n.tolist():
            out.append(pairs[a:a + c])
            a += c
        return out

    def item(self, set_index: int, item_index: int) -> tuple[str, str]:
        """(item id, preview) of an item (the items table is read on first use)."""
        if self._items is None:
            t = pq.read_table(self.prefix + ".items.parquet")
            names = {s: i for i, s in enumerate(self.sets)}
            self._items = {(names[s], i): (iid, p) for s, i, iid, p in zip(
                t["set"].to_pylist(), t["item"].to_pylist(), t["item_id"].to_pylist(), t["preview"].to_pylist())}
        return self._items.get((set_index, item_index), ("?", ""))


@dataclass
class DocMatches:
    """The matches of one document: the matched windows (token start, length, hash)."""

    windows: list[tuple[int, int, int]]


def match_batch(index: NgramIndex, texts: "Sequence[str | None] | pa.Array | pa.ChunkedArray"
                ) -> tuple[list[DocMatches | None], "pl.Series"]:
    """For each text, its matched windows (None when nothing matched), and the texts' tokens as
    written (for cutting). All windows of the batch are hashed and looked up at once."""
    T, lens, toks = batch_tokens(texts)
    out: list[DocMatches | None] = [None] * len(lens)
    if not len(T):
        return out, toks
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    ends = starts + lens
    doc_of = np.repeat(np.arange(len(lens)), lens)
    found: dict[int, list[tuple[int, int, int]]] = {}
    for k in [index.n] + [k for k in index.short_lengths if k < index.n]:
        h = gram_hashes(T, k)
        if not len(h):
            continue
        valid = np.arange(len(h)) + k <= ends[doc_of[: len(h)]]
        hit = np.flatnonzero(index.lookup(h) & valid)
        for p, d in zip(hit.tolist(), doc_of[hit].tolist()):
            found.setdefault(d, []).append((p - int(starts[d]), k, int(h[p])))
    for d, w in found.items():
        out[d] = DocMatches(sorted(w))
    return out, toks


def report_counts(counters: dict[str, int]) -> dict[str, dict[str, int]]:
    """{eval set: {docs, ngrams}} from a step's counters (stats.json)."""
    out: dict[str, dict[str, int]] = {}
    for key, v in counters.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "decontaminate" and parts[2] in ("docs", "ngrams"):
            out.setdefault(parts[1], {"docs": 0, "ngrams": 0})[parts[2]] = v
    return dict(sorted(out.items()))
