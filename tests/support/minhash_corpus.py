"""A planted near-duplicate corpus from real prose (Python standard-library docstrings) and its
exact ground truth (brute-force Jaccard over every pair of documents, on the same shingles)."""

from __future__ import annotations

import importlib
import inspect
import random
import warnings
from collections import Counter, defaultdict

from curate.testing.near_duplicates import heavy_edit, light_edit

MODULES = [
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mimetypes",
    "numbers", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "sqlite3",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "weakref", "zipfile", "zlib", "pydoc", "doctest", "optparse", "mailbox", "xml.dom.minidom",
]

def docstrings(min_words: int = 40) -> list[str]:
    """Distinct docstrings of stdlib modules and their public members, chunked to <= 220 words."""
    seen: set[str] = set()
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001
                continue
            objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
            for o in objs:
                try:
                    d = inspect.getdoc(o) if o is not None else None
                except Exception:  # noqa: BLE001
                    d = None
                if not d or d in seen:
                    continue
                seen.add(d)
                words = d.split()
                for i in range(0, len(words), 220):
                    chunk = words[i:i + 220]
                    if len(chunk) >= min_words:
                        out.append(" ".join(chunk))
    return out


def shingles(text: str | None, n: int = 5) -> frozenset[str]:
    from curate.dedup.minhash import python_shingles
    return frozenset(python_shingles(text, n))


def brute_force_pairs(texts: list[str | None], threshold: float, n: int = 5) -> dict[tuple[int, int], float]:
    """Every pair (i < j) with exact Jaccard >= threshold (exhaustive: pairs sharing no shingle have
    Jaccard 0, so counting shared shingles through an inverted index enumerates all others)."""
    sets = [shingles(t, n) for t in texts]
    index: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for sh in s:
            index[sh].append(i)
    inter: Counter = Counter()
    for docs in index.values():
        for x in range(len(docs)):
            for y in range(x + 1, len(docs)):
                inter[(docs[x], docs[y])] += 1
    out = {}
    for (i, j), k in inter.items():
        jac = k / (len(sets[i]) + len(sets[j]) - k)
        if jac >= threshold:
            out[(i, j)] = jac
    return out


class Planted:
    def __init__(self, texts, origin, pairs, all_jaccard):
        self.texts = texts            # list[str]
        self.origin = origin          # what each doc was made from ("base", "light", "heavy")
        self.pairs = pairs            # {(i, j): jaccard >= 0.8}
        self.jaccard = all_jaccard    # {(i, j): jaccard >= 0.3}, for reporting


def build_planted(seed: int = 0, n_base: int = 700, n_dup_bases: int = 180, n_heavy: int = 60) -> Planted:
    rng = random.Random(seed)
    base = docstrings()
    rng.shuffle(base)
    base = base[:n_base]
    texts = list(base)
    origin = ["base"] * len(texts)
    for i in rng.sample(range(len(base)), n_dup_bases):
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            src = base[i] if rng.random() < 0.7 else light_edit(base[i], rng)  # chains of edits
            texts.append(light_edit(src, rng))
            origin.append("light")
    for i in rng.sample(range(len(base)), n_heavy):
        texts.append(heavy_edit(base[i], rng))
        origin.append("heavy")
    order = list(range(len(texts)))
    rng.shuffle(order)  # duplicates anywhere in the corpus, before or after their original
    texts = [texts[k] for k in order]
    origin = [origin[k] for k in order]
    allj = brute_force_pairs(texts, 0.3)
    pairs = {k: v for k, v in allj.items() if v >= 0.8}
    return Planted(texts, origin, pairs, allj)


def score(planted: Planted, cluster_of: list, removed: set[int]) -> dict:
    """Recall: share of documents with a true duplicate (Jaccard >= 0.8) that share a cluster
    with at least one of them. Non-duplicates removed: share of documents without any true
    duplicate that were removed."""
    partners = defaultdict(set)
    for i, j in planted.pairs:
        partners[i].add(j)
        partners[j].add(i)
    dup_docs = set(partners)
    found = sum(1 for i in dup_docs
                if cluster_of[i] is not None and any(cluster_of[j] == cluster_of[i] for j in partners[i]))
    non_dups = [i for i in range(len(planted.texts)) if i not in dup_docs]
    fp = sum(1 for i in non_dups if i in removed)
    # every true component keeps exactly one document at best
    return {"recall": found / max(1, len(dup_docs)), "dup_docs": len(dup_docs),
            "nondup_removed": fp / max(1, len(non_dups)), "fp": fp, "removed": len(removed)}
