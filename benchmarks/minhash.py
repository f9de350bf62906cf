"""MinHash near-duplicate removal: curate vs datatrove (4-step pipeline, local executor) vs
datasketch (``MinHash`` + ``MinHashLSH`` used the plain way), on the same data, in one run.

The corpus (offline, deterministic): documents of ~430 words made of real English sentences
(docstrings of the Python standard library, parsed with ``ast``), randomly combined, plus planted
near-duplicate families (word substitutions/deletions, sentence swaps, boilerplate, case and
punctuation noise) and "hard negatives" (heavily edited copies, Jaccard well below 0.8).

Ground truth: the exact Jaccard of every pair inside a family on the same 5-word shingles
(documents of different families share only a few random sentences: Jaccard ~0.01). A pair is a
duplicate when its Jaccard >= 0.8. For each method, from the set of removed documents:

* recall    = sum over true duplicate components of min(removed in it, size - 1) / sum(size - 1)
* precision = removed documents that do have a true duplicate / removed documents

All methods: 5-word shingles, 112 hashes = 14 bands x 8 rows (datatrove's defaults; datatrove
uses its own tokenizer and text normalisation). datatrove runs with
``HashConfig(precision=64, hash_fc="sha1")`` (its default xxhash config fails with xxhash 4.x),
as FineWeb did. The slow peers run on a subset (a prefix of the corpus with complete families); curate runs on
the subset and on the full corpus; ratios are computed on the subset. Each method runs in its own process (clean peak memory).

    python benchmarks/minhash.py [--docs 100000] [--subset 10000] [--workers 2] [--repeat 2]

Each (method, data) is timed in a fresh process; with --repeat > 1 the fast methods run again in
later rounds and the best time is kept (the shared 2-core machine is noisy); datatrove runs once.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from curate.testing.near_duplicates import heavy_edit, light_edit  # noqa: E402

WORD_RE = re.compile(r"[^\W_]+")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -------------------------------------------------------------------------------------------------
# corpus


def sentence_pool() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    sents: set[str] = set()
    for dp, dn, fn in os.walk(root):
        dn[:] = sorted(d for d in dn if d not in ("test", "tests", "site-packages", "idlelib", "lib2to3"))
        for f in sorted(fn):
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(dp, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    d = ast.get_docstring(node)
                    if d:
                        for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())):
                            if len(s.split()) >= 6:
                                sents.add(s)
    return sorted(sents)


def build_corpus(n_docs: int, seed: int = 0, pool: list[str] | None = None) -> tuple[list[str], list[int]]:
    """(texts, family) -- family[i] is the index of the base document i was derived from."""
    rng = random.Random(seed)
    pool = pool or sentence_pool()
    texts: list[str] = []
    family: list[int] = []
    while len(texts) < n_docs:
        words = 0
        sents = []
        target = rng.randint(300, 560)
        while words < target:
            s = pool[rng.randrange(len(pool))]
            sents.append(s)
            words += len(s.split())
        base = " ".join(sents)
        fam = len(texts)
        texts.append(base)
        family.append(fam)
        r = rng.random()
        if r < 0.12:  # a near-duplicate family
            for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 5])):
                src = base if rng.random() < 0.7 else light_edit(base, rng, words_per_edit=150)
                texts.append(light_edit(src, rng, words_per_edit=150))
                family.append(fam)
        elif r < 0.15:  # a hard negative
            texts.append(heavy_edit(base, rng, changed_fraction=6))
            family.append(fam)
    texts, family = texts[:n_docs], family[:n_docs]
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[k] for k in order], [family[k] for k in order]


def shingles(text: str, n: int = 5) -> set[str]:
    """Plain-Python 5-word shingles: lower-case, runs of letters/digits are words (same tokens as
    curate's normalisation)."""
    w = WORD_RE.findall(text.lower())
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def ground_truth(texts: list[str], family: list[int], threshold: float = 0.8) -> list[tuple[int, int]]:
    fams = defaultdict(list)
    for i, f in enumerate(family):
        fams[f].append(i)
    pairs = []
    for members in fams.values():
        if len(members) < 2:
            continue
        sets = {i: shingles(texts[i]) for i in members}
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                a, b = sets[members[x]], sets[members[y]]
                inter = len(a & b)
                if inter / max(1, len(a) + len(b) - inter) >= threshold:
                    pairs.append((members[x], members[y]))
    return pairs


def metrics(n: int, pairs: list[tuple[int, int]], removed: set[int]) -> dict:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comps = defaultdict(list)
    dup_docs = {i for p in pairs for i in p}
    for i in dup_docs:
        comps[find(i)].append(i)
    should = sum(len(c) - 1 for c in comps.values())
    found = sum(min(len(c) - 1, sum(1 for i in c if i in removed)) for c in comps.values())
    good = sum(1 for i in removed if i in dup_docs)
    return {"recall": found / max(1, should), "precision": good / max(1, len(removed)),
            "removed": len(removed), "should_remove": should}


# -------------------------------------------------------------------------------------------------
# methods (each runs in its own process: python minhash.py --method NAME --data DIR --out JSON)


class PeakMemory:
    """Peak memory of this process and all its descendants (datatrove's worker processes too):
    a background thread samples the summed RSS of the process tree every 50 ms; this process's
    own high-water mark (VmHWM, exact) is taken too. (ru_maxrss is not used: Linux carries it
    over fork+exec from the parent.)"""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            try:
                for p in [me] + me.children(recursive=True):
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.05)

    def stop_mb(self) -> float:
        self._stop.set()
        self._t.join()
        hwm = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
        return max(self.peak, hwm) / 2**20


def run_curate(data: str, work: str, workers: int, verify: bool = False, memory: bool = False) -> dict:
    """Parquet folder in, Parquet file out (like datatrove) -- or, with ``memory``, an in-memory
    table in and a table out (like datasketch, which also works on texts in memory)."""
    from curate.pipeline.io import Dataset
    from curate.stages.dedup.minhash_dedup import MinhashDedup

    # warm-up: numba kernels are compiled (or loaded from their cache) once per process
    t0 = time.perf_counter()
    MinhashDedup(verify=verify)(pa.table({"id": ["a", "b"], "text": ["one two three four five six"] * 2}))
    warm = time.perf_counter() - t0
    files = Dataset.from_any(data).files
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    src = pq.read_table(data, columns=["id", "text"]) if memory else data
    t0, c0 = time.perf_counter(), time.process_time()
    st = MinhashDedup(verify=verify)
    out = st(src, workdir=os.path.join(work, "curate-work"))
    if not memory:
        pq.write_table(out, os.path.join(work, "curate-out.parquet"), compression="zstd")
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    kept = set(out.column("id").to_pylist())
    return {"seconds": secs, "cpu_seconds": cpu, "warmup_seconds": warm, "kept_ids": sorted(kept),
            "docs": n, "counters": st.counters.to_dict(), "phases": st.phase_seconds}


def run_datatrove(data: str, work: str, workers: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter
    from datatrove.utils.hashing import HashConfig

    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1,
                        hash_config=HashConfig(precision=64, hash_fc="sha1"))
    files = sorted(f for f in os.listdir(data) if f.endswith(".parquet"))
    base = os.path.join(work, "dt")
    logs = os.path.join(work, "dt-logs")

    def reader():
        return ParquetReader(data, text_key="text", id_key="id", glob_pattern="*.parquet")

    stages = [
        LocalPipelineExecutor(pipeline=[reader(), MinhashDedupSignature(output_folder=f"{base}/sigs", config=cfg)],
                              tasks=len(files), workers=workers, logging_dir=f"{logs}/1"),
        LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=f"{base}/sigs", output_folder=f"{base}/buckets",
                                                            config=cfg)],
                              tasks=cfg.num_buckets, workers=workers, logging_dir=f"{logs}/2"),
        LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=f"{base}/buckets", output_folder=f"{base}/remove_ids",
                                                            config=cfg)],
                              tasks=1, workers=1, logging_dir=f"{logs}/3"),
        LocalPipelineExecutor(pipeline=[reader(), MinhashDedupFilter(input_folder=f"{base}/remove_ids"),
                                        ParquetWriter(f"{base}/out")],
                              tasks=len(files), workers=workers, logging_dir=f"{logs}/4"),
    ]
    t0 = time.perf_counter()
    for i, ex in enumerate(stages, 1):
        ex.run()
        log(f"  datatrove step {i}/4 done ({time.perf_counter() - t0:.1f} s)")
    secs = time.perf_counter() - t0
    kept = set()
    for dp, _, fn in os.walk(f"{base}/out"):
        for f in fn:
            if f.endswith(".parquet"):
                kept.update(pq.read_table(os.path.join(dp, f), columns=["id"]).column("id").to_pylist())
    n = sum(pq.ParquetFile(os.path.join(data, f)).metadata.num_rows for f in files)
    return {"seconds": secs, "kept_ids": sorted(kept), "docs": n}


def run_datasketch(data: str, work: str, workers: int) -> dict:
    from datasketch import MinHash, MinHashLSH

    t = pq.read_table(data, columns=["id", "text"])
    ids, texts = t.column("id").to_pylist(), t.column("text").to_pylist()
    t0, c0 = time.perf_counter(), time.process_time()
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    perm = MinHash(num_perm=112, seed=1).permutations
    kept = []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=112, seed=1, permutations=perm, scheme="affine32")
        m.update_batch([s.encode("utf-8") for s in shingles(text)])
        if lsh.query(m):
            continue
        lsh.insert(ids[i], m)
        kept.append(ids[i])
        if (i + 1) % 5000 == 0:
            log(f"  datasketch {i + 1:,} docs ({time.perf_counter() - t0:.1f} s)")
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": secs, "cpu_seconds": cpu, "kept_ids": kept, "docs": len(texts)}


METHODS = {
    "curate": run_curate,
    "curate+verify": lambda d, w, k: run_curate(d, w, k, verify=True),
    "curate-mem": lambda d, w, k: run_curate(d, w, k, memory=True),
    "curate+verify-mem": lambda d, w, k: run_curate(d, w, k, verify=True, memory=True),
    "datatrove": run_datatrove,
    "datasketch": run_datasketch,
}
# which curate variant is compared with which peer: same input/output kind
PEERS = {"datatrove": ("curate", "curate+verify", 2.0), "datasketch": ("curate-mem", "curate+verify-mem", 10.0)}


def child(args: argparse.Namespace) -> None:
    mem = PeakMemory()
    res = METHODS[args.method](args.data, args.work, args.workers)
    res["peak_rss_mb"] = mem.stop_mb()
    with open(args.out, "w") as f:
        json.dump(res, f)


def spawn(method: str, data: str, work: str, workers: int) -> dict:
    out = os.path.join(work, f"{method}-{os.path.basename(data)}.json")
    os.makedirs(work, exist_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--data", data,
           "--work", work, "--out", out, "--workers", str(workers)]
    if method == "datatrove":  # its per-task log banners go to a file
        with open(os.path.join(work, "datatrove.log"), "ab") as fh:
            subprocess.run(cmd, check=True, stderr=fh)
    else:
        subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)


def write_shards(folder: str, texts: list[str], n_files: int) -> None:
    os.makedirs(folder, exist_ok=True)
    n = len(texts)
    for k in range(n_files):
        lo, hi = k * n // n_files, (k + 1) * n // n_files
        ids = [f"doc{i:07d}" for i in range(lo, hi)]
        pq.write_table(pa.table({"id": ids, "text": texts[lo:hi]}),
                       os.path.join(folder, f"part-{k:03d}.parquet"), compression="zstd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--subset", type=int, default=10_000, help="documents for the slow peers")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--files", type=int, default=8, help="Parquet shards of the full corpus")
    ap.add_argument("--skip", default="", help="comma-separated methods to skip")
    ap.add_argument("--repeat", type=int, default=2, help="rounds for the fast methods (best time kept)")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        return child(args)

    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="curate-bench-minhash-")
    try:
        log(f"building a corpus of {args.docs:,} documents ...")
        # the subset is a prefix with complete families, so it has the full corpus's structure
        pool = sentence_pool()
        n_sub = min(args.subset, args.docs)
        texts, family = build_corpus(n_sub, seed=0, pool=pool)
        if args.docs > n_sub:
            t2, f2 = build_corpus(args.docs - n_sub, seed=1, pool=pool)
            texts += t2
            family += [n_sub + f for f in f2]
        words = sum(len(t.split()) for t in texts[:2000]) / min(2000, len(texts))
        full, sub = os.path.join(tmp, "full"), os.path.join(tmp, "subset")
        write_shards(full, texts, args.files)
        write_shards(sub, texts[:n_sub], max(2, args.workers))
        log("exact ground truth (Jaccard of every pair within planted families) ...")
        pairs_full = ground_truth(texts, family)
        pairs_sub = [(a, b) for a, b in pairs_full if a < n_sub and b < n_sub]
        log(f"corpus: {len(texts):,} docs (~{words:.0f} words each), {len(pairs_full):,} true duplicate "
            f"pairs (Jaccard >= 0.8); subset {n_sub:,} docs, {len(pairs_sub):,} pairs")

        results: dict[str, dict] = {}
        skip = set(filter(None, args.skip.split(",")))
        # rounds, interleaved; each (method, data) keeps its best time (the machine may be shared)
        fast = [("curate", sub), ("curate+verify", sub), ("curate-mem", sub), ("curate+verify-mem", sub),
                ("datasketch", sub), ("curate", full), ("curate+verify", full)]
        rounds = [fast[:5] + [("datatrove", sub)] + fast[5:]] + [fast] * (args.repeat - 1)
        for r, runs in enumerate(rounds, 1):
            for method, data in runs:
                if method in skip:
                    continue
                log(f"round {r}/{len(rounds)}: {method} on {os.path.basename(data)} ...")
                res = spawn(method, data, os.path.join(tmp, "work"), args.workers)
                n = res["docs"]
                idx = {f"doc{i:07d}": i for i in range(n)}
                kept = {idx[k] for k in res.pop("kept_ids")}
                res.update(metrics(n, pairs_sub if data == sub else pairs_full, set(range(n)) - kept))
                res["docs_per_s"] = n / res["seconds"]
                if "cpu_seconds" in res:
                    res["docs_per_cpu_s"] = n / res["cpu_seconds"]
                log(f"  {method}: {n:,} docs in {res['seconds']:.2f} s = {res['docs_per_s']:,.0f} docs/s, "
                    f"recall {res['recall']:.4f}, precision {res['precision']:.4f}, "
                    f"peak RSS {res['peak_rss_mb']:,.0f} MB" + (f", phases {res['phases']}" if "phases" in res else ""))
                key = f"{method}/{os.path.basename(data)}"
                old = results.get(key)
                if old is not None:
                    res["peak_rss_mb"] = max(res["peak_rss_mb"], old["peak_rss_mb"])
                    res["runs"] = old["runs"] + 1
                    if "cpu_seconds" in res:
                        res["cpu_seconds"] = min(res["cpu_seconds"], old["cpu_seconds"])
                        res["docs_per_cpu_s"] = n / res["cpu_seconds"]
                    if old["seconds"] <= res["seconds"]:
                        old.update(peak_rss_mb=res["peak_rss_mb"], runs=res["runs"],
                                   **({"cpu_seconds": res["cpu_seconds"], "docs_per_cpu_s": res["docs_per_cpu_s"]}
                                      if "cpu_seconds" in res else {}))
                        continue
                else:
                    res["runs"] = 1
                results[key] = res

        print()
        print(f"{'method':<26} {'docs':>8} {'runs':>4} {'best s':>8} {'docs/s':>10} {'docs/cpu-s':>11} "
              f"{'recall':>8} {'precision':>10} {'removed':>8} {'peak MB':>8}")
        for k, r in results.items():
            cpu = f"{r['docs_per_cpu_s']:>11,.0f}" if "docs_per_cpu_s" in r else f"{'-':>11}"
            print(f"{k:<26} {r['docs']:>8,} {r['runs']:>4} {r['seconds']:>8.2f} {r['docs_per_s']:>10,.0f} {cpu} "
                  f"{r['recall']:>8.4f} {r['precision']:>10.4f} {r['removed']:>8,} {r['peak_rss_mb']:>8,.0f}")
        print()
        for peer, (plain, verified, target) in PEERS.items():
            p = results.get(f"{peer}/subset")
            for mine in (plain, verified):
                c = results.get(f"{mine}/subset")
                if not (c and p):
                    continue
                ratio = c["docs_per_s"] / p["docs_per_s"]
                ok = (ratio >= target and c["recall"] >= p["recall"] - 1e-9
                      and c["precision"] >= p["precision"] - 1e-9)
                cpu = ""
                if "docs_per_cpu_s" in c and "docs_per_cpu_s" in p:
                    cpu = f" ({c['docs_per_cpu_s'] / p['docs_per_cpu_s']:,.1f}x per CPU-second)"
                print(f"{mine} vs {peer} (same {c['docs']:,} docs): {ratio:,.1f}x docs/s{cpu} "
                      f"(target >= {target:g}x), recall {c['recall']:.4f} vs {p['recall']:.4f}, "
                      f"precision {c['precision']:.4f} vs {p['precision']:.4f} -> {'OK' if ok else 'MISSED'}")
        for mine in ("curate", "curate+verify"):
            f = results.get(f"{mine}/full")
            if f:
                print(f"{mine} on the full corpus (Parquet in/out): {f['docs']:,} docs at {f['docs_per_s']:,.0f} "
                      f"docs/s, recall {f['recall']:.4f}, precision {f['precision']:.4f}, "
                      f"peak RSS {f['peak_rss_mb']:,.0f} MB")
        print(f"total benchmark time {time.perf_counter() - t_start:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
