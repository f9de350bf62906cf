"""decontaminate vs a plain-Python n-gram set, on the same planted corpus, in one process (one core).

The data (offline, deterministic, ``curate.testing.decont_corpus``): eval items made of standard
library docstring sentences (question + answer + 4 choices), and documents of other docstring
sentences of which a share has an item planted verbatim, re-wrapped or case-changed, and another
share a fragment of an item one token shorter than the n-gram (must not match).

* curate: the ``decontaminate`` stage (flag mode) as a library call on Arrow batches of 1,000
  documents; the index (sorted uint64 hashes + bitmap, memory-mapped) built first and timed apart;
* plain: a Python ``set`` of 13-token tuples of the same items (built once), each document's
  windows looked up one by one (the same normalisation).

Printed: index build time and size (file bytes vs the set's memory, measured with tracemalloc),
documents/s and MB/s per core for both and their ratio, recall on planted documents (each planted
form), planted fragments matched, and whether both methods give the same match counts per document.

    python benchmarks/decontaminate.py [--items 100000] [--docs 20000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

os.environ.setdefault("POLARS_MAX_THREADS", "1")   # one core: polars would use a thread pool

import pyarrow as pa  # noqa: E402

from curate.stages.clean.decontaminate import Decontaminate  # noqa: E402
from curate.testing.decont_corpus import PlainNgramSet, planted_corpus  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--ngram", type=int, default=13)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args()

    t0 = time.perf_counter()
    items, docs = planted_corpus(args.docs, args.items, seed=1, ngram=args.ngram,
                                 planted_fraction=0.05, fragment_fraction=0.05)
    texts = [d["text"] for d in docs]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    log(f"corpus: {len(items):,} eval items, {len(docs):,} documents, {mb:.1f} MB ({time.perf_counter() - t0:.1f}s)")

    work = tempfile.mkdtemp(prefix="bench-decont-")
    ev = os.path.join(work, "eval.jsonl")
    with open(ev, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")

    # -- index / set build ----------------------------------------------------------------------
    st = Decontaminate(eval_sets={"bench": {"paths": ev, "choices": "choices"}}, ngram=args.ngram,
                       mode="flag", save_matches=False)
    st.workdir = os.path.join(work, "w")
    t = time.perf_counter()
    st.ensure_setup()
    build_curate = time.perf_counter() - t
    index_bytes = sum(os.path.getsize(os.path.join(st.workdir, f)) for f in os.listdir(st.workdir)
                      if f.startswith("index-") and f.endswith((".npy", ".parquet")))
    log(f"curate index: {st.index.meta['entries']:,} entries, {index_bytes / 1e6:.0f} MB of files, "
        f"built in {build_curate:.1f}s")
    gc.collect()
    tracemalloc.start()
    t = time.perf_counter()
    plain = PlainNgramSet(items, n=args.ngram)
    build_plain = time.perf_counter() - t
    plain_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    log(f"plain set: {len(plain.grams):,} n-grams, {plain_bytes / 1e6:.0f} MB in memory, built in {build_plain:.1f}s "
        "(tracemalloc slows the build)")

    # -- matching --------------------------------------------------------------------------------
    tables = [pa.table({"id": [d["id"] for d in docs[i:i + args.batch]], "text": texts[i:i + args.batch]})
              for i in range(0, len(docs), args.batch)]
    best_c = best_p = float("inf")
    counts_c: list[int] = []
    counts_p: list[int] = []
    for r in range(args.repeat):
        st.counters.take()
        t = time.perf_counter()
        out = [st.process_safe(tb) for tb in tables]
        best_c = min(best_c, time.perf_counter() - t)
        counts_c = [n for o in out for n in o.column("contamination_matches").to_pylist()]
        t = time.perf_counter()
        counts_p = [plain.matches(x) for x in texts]
        best_p = min(best_p, time.perf_counter() - t)
        log(f"round {r + 1}: curate {best_c:.2f}s, plain {best_p:.2f}s")

    same = counts_c == counts_p
    kinds: dict[str, list[bool]] = {}
    for d, n in zip(docs, counts_c):
        kinds.setdefault(d["kind"], []).append(n > 0)
    print()
    print(f"{'method':<8} {'docs/s':>10} {'MB/s':>8} {'build s':>8} {'index MB':>9}")
    print(f"{'curate':<8} {len(docs) / best_c:>10,.0f} {mb / best_c:>8.2f} {build_curate:>8.1f} {index_bytes / 1e6:>9.0f}")
    print(f"{'plain':<8} {len(docs) / best_p:>10,.0f} {mb / best_p:>8.2f} {build_plain:>8.1f} {plain_bytes / 1e6:>9.0f}")
    print(f"throughput ratio curate/plain: {best_p / best_c:.2f}x (one core, best of {args.repeat})")
    for k in ("verbatim", "rewrap", "case"):
        v = kinds.get(k, [])
        print(f"recall {k:<9} {sum(v)}/{len(v)}")
    frag = kinds.get("fragment", [])
    clean = kinds.get("clean", [])
    # the planted fragments on their own (in the documents, other windows may match by chance)
    alone = [d["planted"] for d in docs if d["kind"] == "fragment"]
    st.counters.take()
    alone_hits = sum(st.process_safe(pa.table({"id": [str(i) for i in range(len(alone))], "text": alone}))
                     .column("contaminated").to_pylist()) if alone else 0
    print(f"planted fragments ({args.ngram - 1} tokens) matched on their own: {alone_hits}/{len(alone)}")
    print(f"documents matched: with a fragment {sum(frag)}/{len(frag)}, clean {sum(clean)}/{len(clean)} "
          "(natural overlaps of docstring sentences with items, found by both methods)")
    print(f"same match counts as the plain set on every document: {same}")


if __name__ == "__main__":
    main()
