"""MinHash kernels: text normalisation, shingle hashing, signatures and LSH band keys.

Everything here works on whole Arrow batches at once:

* :func:`shingle_hashes` walks the UTF-8 bytes of a whole Arrow batch in one compiled (numba)
  loop -- lower-casing and splitting on every run of non-letter/non-digit characters through a
  per-code-point table -- and returns one 64-bit hash per word (or character) n-gram, grouped
  by document (CSR layout). :func:`normalize` / :func:`python_shingles` are the same
  normalisation in Arrow's C++ kernels / plain Python, used as the reference in tests;
* :func:`signatures` applies datasketch's ``affine32`` permutation family (datasketch >= 2.0:
  a MurmurHash3 ``fmix32`` pre-mix, then ``a_k * h + b_k mod 2**32`` with odd ``a_k`` drawn from
  ``numpy.random.RandomState(seed)``) to every shingle of every document in a compiled loop. Given
  the same 32-bit shingle hashes the signatures are bit-identical to ``datasketch.MinHash(num_perm,
  seed=seed, hashfunc=...)``; the tests check this.
* :func:`band_keys` hashes each band of ``rows`` signature values into one 64-bit key.
* :func:`lsh_params` picks (bands, rows) for a Jaccard threshold with datasketch's own
  ``MinHashLSH`` optimisation (weighted false-positive/false-negative areas).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import prange

from curate.numba_cache import njit

# ------------------------------------------------------------------------------------------------
# normalisation

_NON_WORD = r"[^\p{L}\p{N}]+"


def normalize(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Lower-case; every run of characters that are neither letters nor digits (punctuation,
    symbols, any Unicode whitespace) becomes one space; trimmed. Nulls become empty strings."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if texts.type != pa.string():
        texts = texts.cast(pa.string())
    t = pc.fill_null(texts, "")
    t = pc.utf8_lower(t)
    t = pc.replace_substring_regex(t, _NON_WORD, " ")
    t = pc.utf8_trim_whitespace(t)
    if isinstance(t, pa.ChunkedArray):
        t = t.combine_chunks()
    return t


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(utf-8 bytes, int64 offsets) of a string array (zero-copy where possible)."""
    if arr.type == pa.large_string():
        arr = arr.cast(pa.string())
    if arr.null_count:
        arr = pc.fill_null(arr, "")  # a null slot's byte range is not guaranteed to be empty
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4).astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return data, offsets


# ------------------------------------------------------------------------------------------------
# compiled kernels

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S32 = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)
_F1 = np.uint64(0x85EBCA6B)
_F2 = np.uint64(0xC2B2AE35)
_S16 = np.uint64(16)
_S13 = np.uint64(13)


@njit(cache=True, inline="always")
def _fmix64(h):
    h ^= h >> _S33
    h *= _M1
    h ^= h >> _S33
    h *= _M2
    h ^= h >> _S33
    return h


@njit(cache=True, inline="always")
def _fmix32(h):
    # MurmurHash3 finalizer on 32 bits, computed in uint64 and masked (datasketch's _fmix(., 32))
    h ^= h >> _S16
    h = (h * _F1) & _MASK32
    h ^= h >> _S13
    h = (h * _F2) & _MASK32
    h ^= h >> _S16
    return h


@njit(cache=True, inline="always")
def _cp_at(data, i, end):
    """(code point, byte length) of the UTF-8 sequence starting at data[i]."""
    c = np.int64(data[i])
    if c < 0x80:
        return c, 1
    if c < 0xE0:
        n = 2
        c &= 0x1F
    elif c < 0xF0:
        n = 3
        c &= 0x0F
    else:
        n = 4
        c &= 0x07
    if i + n > end:
        return np.int64(0xFFFD), end - i
    for k in range(1, n):
        c = (c << 6) | (np.int64(data[i + k]) & 0x3F)
    return c, n


@njit(cache=True, parallel=True)
def _tokenize(data, offsets, char_mode, fold):
    """Token hashes of every document + CSR offsets, straight from the UTF-8 bytes (one pass).

    ``fold[cp]`` is the lower-cased code point when it is a letter or digit, else -1 (see
    :func:`fold_table`). Words are maximal runs of word characters; in character mode the tokens
    are the word characters plus one space for every run of other characters between words (so
    "a, b" -> "a", " ", "b"). Token hash: FNV-1a 64 over the lower-cased code points, then the
    MurmurHash3 fmix64 finaliser.
    """
    n = len(offsets) - 1
    nf = len(fold)
    # upper bound of tokens per document: words are separated by >= 1 byte; chars use >= 1 byte
    bound = np.zeros(n + 1, np.int64)
    for d in range(n):
        ln = offsets[d + 1] - offsets[d]
        bound[d + 1] = bound[d] + (ln if char_mode else (ln + 1) // 2)
    tmp = np.empty(bound[n], np.uint64)
    counts = np.zeros(n, np.int64)
    space = _fmix64((_FNV_OFFSET ^ np.uint64(0x20)) * _FNV_PRIME)
    for d in prange(n):
        k = bound[d]
        i = offsets[d]
        end = offsets[d + 1]
        inword = False
        seen = False
        h = _FNV_OFFSET
        while i < end:
            b = data[i]
            if b < 0x80:
                lc = fold[b]
                i += 1
            else:
                cp, ln = _cp_at(data, i, end)
                lc = fold[cp] if cp < nf else -1
                i += ln
            if lc >= 0:
                if char_mode:
                    if seen and not inword:
                        tmp[k] = space
                        k += 1
                    tmp[k] = _fmix64((_FNV_OFFSET ^ np.uint64(lc)) * _FNV_PRIME)
                    k += 1
                    seen = True
                else:
                    if not inword:
                        h = _FNV_OFFSET
                    h = (h ^ np.uint64(lc)) * _FNV_PRIME
                inword = True
            else:
                if inword and not char_mode:
                    tmp[k] = _fmix64(h)
                    k += 1
                inword = False
        if inword and not char_mode:
            tmp[k] = _fmix64(h)
            k += 1
        counts[d] = k - bound[d]
    tok_off = np.zeros(n + 1, np.int64)
    for d in range(n):
        tok_off[d + 1] = tok_off[d] + counts[d]
    toks = np.empty(tok_off[n], np.uint64)
    for d in prange(n):
        toks[tok_off[d]:tok_off[d + 1]] = tmp[bound[d]:bound[d] + counts[d]]
    return toks, tok_off


@njit(cache=True, parallel=True)
def _shingles(toks, tok_off, ngram):
    """64-bit hash of every run of ``ngram`` consecutive tokens; a document with fewer tokens gives
    one shingle of all its tokens; an empty document gives none."""
    n = len(tok_off) - 1
    sh_off = np.zeros(n + 1, np.int64)
    for d in range(n):
        t = tok_off[d + 1] - tok_off[d]
        c = t - ngram + 1 if t >= ngram else (1 if t > 0 else 0)
        sh_off[d + 1] = sh_off[d] + c
    out = np.empty(sh_off[n], np.uint64)
    for d in prange(n):
        t0 = tok_off[d]
        t = tok_off[d + 1] - t0
        m = sh_off[d + 1] - sh_off[d]
        width = ngram if t >= ngram else t
        for s in range(m):
            h = np.uint64(0x9E3779B97F4A7C15)
            for j in range(width):
                h = (h ^ toks[t0 + s + j]) * _FNV_PRIME
            out[sh_off[d] + s] = _fmix64(h)
    return out, sh_off


@njit(cache=True, parallel=True)
def _signatures(h64, sh_off, a, b):
    """MinHash signatures (uint32, datasketch affine32 scheme) of every document."""
    n = len(sh_off) - 1
    p = len(a)
    out = np.empty((n, p), np.uint32)
    for d in prange(n):
        row = np.full(p, _MASK32, np.uint64)
        for s in range(sh_off[d], sh_off[d + 1]):
            x = h64[s]
            h = _fmix32((x ^ (x >> _S32)) & _MASK32)  # == to_h32, then datasketch's fmix32
            for k in range(p):
                v = (a[k] * h + b[k]) & _MASK32
                if v < row[k]:
                    row[k] = v
        for k in range(p):
            out[d, k] = np.uint32(row[k])
    return out


@njit(cache=True)
def _band_keys(sig, bands, rows):
    n = sig.shape[0]
    out = np.empty((n, bands), np.uint64)
    for d in range(n):
        for bd in range(bands):
            h = _FNV_OFFSET ^ np.uint64(bd)
            for r in range(rows):
                h = (h ^ np.uint64(sig[d, bd * rows + r])) * _FNV_PRIME
            out[d, bd] = _fmix64(h)
    return out


@njit(cache=True, parallel=True)
def _sorted_unique_csr(vals, off):
    """Sort + unique each document's shingle hashes (for exact Jaccard)."""
    n = len(off) - 1
    work = vals.copy()
    counts = np.zeros(n, np.int64)
    for d in prange(n):
        seg = work[off[d]:off[d + 1]]
        seg.sort()
        c = 0
        for i in range(len(seg)):
            if i == 0 or seg[i] != seg[i - 1]:
                c += 1
        counts[d] = c
    new_off = np.zeros(n + 1, np.int64)
    for d in range(n):
        new_off[d + 1] = new_off[d] + counts[d]
    out = np.empty(new_off[n], np.uint64)
    for d in prange(n):
        seg = work[off[d]:off[d + 1]]
        k = new_off[d]
        for i in range(len(seg)):
            if i == 0 or seg[i] != seg[i - 1]:
                out[k] = seg[i]
                k += 1
    return out, new_off


@njit(cache=True)
def jaccard_sorted(x, y):
    """Exact Jaccard of two sorted unique uint64 arrays."""
    i = 0
    j = 0
    inter = 0
    nx = len(x)
    ny = len(y)
    while i < nx and j < ny:
        if x[i] == y[j]:
            inter += 1
            i += 1
            j += 1
        elif x[i] < y[j]:
            i += 1
        else:
            j += 1
    union = nx + ny - inter
    return inter / union if union > 0 else 0.0


def jaccard_pairs(vals, off, left, right):
    """Exact Jaccard for each pair (left[i], right[i]) of rows of a CSR of sorted unique sets."""
    with _threads(len(left) // 16):
        return _jaccard_pairs(vals, off, left, right)


@njit(cache=True, parallel=True)
def _jaccard_pairs(vals, off, left, right):
    """Exact Jaccard for each pair (left[i], right[i]) of rows of a CSR of sorted unique sets."""
    m = len(left)
    out = np.empty(m, np.float64)
    for i in prange(m):
        a = left[i]
        b = right[i]
        out[i] = jaccard_sorted(vals[off[a]:off[a + 1]], vals[off[b]:off[b + 1]])
    return out


# ------------------------------------------------------------------------------------------------
# public helpers


# Parallel kernels pay a thread-pool wake-up on every call; on a busy machine that costs tens of
# milliseconds. Small inputs therefore run on the calling thread only.
PARALLEL_MIN_ITEMS = 2048


class _threads:
    """Context: numba threads for a call over ``n`` items (1 below PARALLEL_MIN_ITEMS)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> None:
        import numba

        self.old = numba.get_num_threads()
        if self.n < PARALLEL_MIN_ITEMS and self.old > 1:
            numba.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        import numba

        if numba.get_num_threads() != self.old:
            numba.set_num_threads(self.old)


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of datasketch's ``affine32`` scheme for ``MinHash(num_perm, seed)`` (as uint64)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a.astype(np.uint64), b.astype(np.uint64)


_FOLD: np.ndarray | None = None
_MAX_BATCH_BYTES = 32 << 20


def fold_table() -> np.ndarray:
    """int32[code point]: the lower-cased code point for letters and digits (Unicode categories
    L* and N*, judged after lower-casing, as :func:`normalize` does), -1 for everything else.
    Built once per process (~0.5 s)."""
    global _FOLD
    if _FOLD is None:
        import sys
        import unicodedata

        def f(c: int) -> int:
            low = chr(c).lower()
            lc = ord(low[0]) if low else c
            return lc if unicodedata.category(chr(lc))[0] in "LN" else -1

        _FOLD = np.fromiter((f(c) for c in range(sys.maxunicode + 1)), dtype=np.int32,
                            count=sys.maxunicode + 1)
    return _FOLD


def shingle_hashes(texts: pa.Array | pa.ChunkedArray, ngram: int = 5, char_ngrams: bool = False,
                   token_counts: bool = False) -> tuple[np.ndarray, ...]:
    """64-bit hashes of the word (or character) ``ngram``-shingles of every text, CSR layout:
    document ``i`` owns ``hashes[offsets[i]:offsets[i+1]]``.

    The tokens are those of :func:`normalize` (lower-cased; runs of non-letters/digits are
    separators), found by one compiled pass over the UTF-8 bytes of the whole batch. A document
    with fewer than ``ngram`` tokens gives one shingle; one with no token gives none.
    With ``token_counts`` a third array gives the number of tokens of each document."""
    arr = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    if arr.type != pa.string():
        arr = arr.cast(pa.string())
    data, offsets = _buffers(arr)
    # the tokenizer's scratch space is 4-8 bytes per text byte: at most ~32 MB of text at once
    if offsets[-1] - offsets[0] > _MAX_BATCH_BYTES and len(arr) > 1:
        bounds = [0]
        start = offsets[0]
        for i in range(1, len(arr)):
            if offsets[i + 1] - start > _MAX_BATCH_BYTES:
                bounds.append(i)
                start = offsets[i]
        bounds.append(len(arr))
        hs, lens, ntoks = [], [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            with _threads(hi - lo):
                toks, tok_off = _tokenize(data, offsets[lo:hi + 1], bool(char_ngrams), fold_table())
                h, off = _shingles(toks, tok_off, int(ngram))
            hs.append(h)
            lens.append(np.diff(off))
            ntoks.append(np.diff(tok_off))
        h = np.concatenate(hs)
        off = np.zeros(len(arr) + 1, np.int64)
        np.cumsum(np.concatenate(lens), out=off[1:])
        return (h, off, np.concatenate(ntoks)) if token_counts else (h, off)
    with _threads(len(arr)):
        toks, tok_off = _tokenize(data, offsets, bool(char_ngrams), fold_table())
        h, off = _shingles(toks, tok_off, int(ngram))
    return (h, off, np.diff(tok_off)) if token_counts else (h, off)


def python_shingles(text: str | None, ngram: int = 5, char_ngrams: bool = False) -> set[str]:
    """Reference shingles in plain Python (tests, ground truth, the datasketch peer)."""
    norm = normalize(pa.array([text], pa.string()))[0].as_py()
    if char_ngrams:
        seq = list(norm)
        if not seq:
            return set()
        if len(seq) < ngram:
            return {"".join(seq)}
        return {"".join(seq[i:i + ngram]) for i in range(len(seq) - ngram + 1)}
    words = norm.split()
    if not words:
        return set()
    if len(words) < ngram:
        return {" ".join(words)}
    return {" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)}


def to_h32(h64: np.ndarray) -> np.ndarray:
    """Fold 64-bit shingle hashes to the 32-bit values MinHash permutes."""
    return (h64 ^ (h64 >> np.uint64(32))).astype(np.uint32)


def signatures(h64: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint32 MinHash signatures, shape (documents, num_perm). Empty documents get all 2**32-1."""
    with _threads(len(offsets) - 1):
        return _signatures(h64, offsets, a, b)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 key of each (document, band): a hash of the band's ``rows`` signature values."""
    if sig.shape[1] < bands * rows:
        raise ValueError(f"signature has {sig.shape[1]} values; bands*rows = {bands * rows}")
    return _band_keys(np.ascontiguousarray(sig), int(bands), int(rows))


def sorted_unique(h64: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with _threads(len(offsets) - 1):
        return _sorted_unique_csr(h64, offsets)


def lsh_params(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
               false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false positive/negative probability areas around
    ``threshold`` -- datasketch ``MinHashLSH``'s own choice for the same arguments."""
    try:
        from datasketch.lsh import _optimal_param
    except ImportError:  # pragma: no cover - datasketch moved its helper: same math, inline
        _optimal_param = _optimal_param_fallback
    b, r = _optimal_param(threshold, num_perm, false_positive_weight, false_negative_weight)
    return int(b), int(r)


def recall_params(threshold: float, num_perm: int, min_prob: float = 0.95) -> tuple[int, int]:
    """(bands, rows) for verified dedup: the widest bands (fewest candidate pairs) whose probability
    of making a pair at exactly ``threshold`` a candidate, 1 - (1 - t^r)^b with b = num_perm // r,
    is at least ``min_prob``. Verification then removes the false candidates, so recall at the
    threshold is what matters (datasketch's choice balances false positives and negatives instead,
    e.g. 9 x 12 at 0.8, which finds only ~47% of the pairs at exactly 0.8)."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if b < 1:
            break
        if 1.0 - (1.0 - threshold ** r) ** b >= min_prob:
            best = (b, r)
    return best


def _optimal_param_fallback(threshold, num_perm, fpw, fnw):  # pragma: no cover
    xs = np.linspace(0.0, 1.0, 2001)
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - xs ** r) ** b
            fp = np.trapezoid(np.where(xs <= threshold, p, 0), xs)
            fn = np.trapezoid(np.where(xs >= threshold, 1 - p, 0), xs)
            err = fp * fpw + fn * fnw
            if err < best:
                best, opt = err, (b, r)
    return opt


def candidate_probability(j: float, bands: int, rows: int) -> float:
    """Probability that two documents with Jaccard ``j`` share at least one band key."""
    return 1.0 - (1.0 - j ** rows) ** bands
