"""heuristic_filter vs datatrove's four filters called directly, on the same documents, in one run.

The documents are the parity test's varied corpus (tests/support/heuristic_docs.py: Python
language-reference prose, standard-library docstrings and source, German/French prose, and
generated edge cases: repetition, bullets, ellipses, symbols, code, lorem ipsum, javascript and
policy lines, citations, odd whitespace, CJK, emoticons...), built offline.

* datatrove: ``GopherRepetitionFilter``, ``GopherQualityFilter``, ``C4QualityFilter``,
  ``FineWebQualityFilter`` at their defaults, applied in that order to each ``Document`` (C4's
  text rewrite seen by FineWeb), the word tokenizer loaded beforehand;
* curate: the ``heuristic_filter`` stage as a library call on an Arrow table of the same
  documents (a new stage per round, so its token cache starts empty; ``setup`` not timed);
* curate through the runner: ``read_parquet`` -> ``heuristic_filter`` with 1 and 2 processes,
  the whole ``curate run`` timed (process start, tokenizer load, Parquet in and out).

Decisions are compared (they must be identical). Rounds alternate the two library calls; the best
time of each is kept (the machine is shared and noisy).

    python benchmarks/heuristic_filter.py [--docs 3000] [--repeat 2] [--runner-docs 12000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))

from heuristic_docs import varied_documents  # noqa: E402


def datatrove_run(texts: list[str]) -> tuple[float, list[str | None]]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter,
                                            GopherQualityFilter, GopherRepetitionFilter)
    from datatrove.utils.text import split_into_words

    split_into_words("warm up the tokenizer", "eng")
    filters = [("gopher_repetition", GopherRepetitionFilter()), ("gopher_quality", GopherQualityFilter()),
               ("c4", C4QualityFilter()), ("fineweb", FineWebQualityFilter())]
    reasons: list[str | None] = []
    t0 = time.perf_counter()
    for text in texts:
        doc = Document(text=text, id="x")
        reason = None
        for name, flt in filters:
            res = flt.filter(doc)
            if res is not True:
                reason = f"{name}:{res[1]}"
                break
        reasons.append(reason)
    return time.perf_counter() - t0, reasons


def curate_run(texts: list[str]) -> tuple[float, list[str | None]]:
    from curate.stages.clean.heuristic_filter import HeuristicFilter

    table = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts})
    st = HeuristicFilter(save_dropped=True)
    st.ensure_setup()
    t0 = time.perf_counter()
    out = st(table)
    dt = time.perf_counter() - t0
    side = st.take_side().get("dropped")
    why = dict(zip(side.column("id").to_pylist(), side.column("drop_reason").to_pylist())) if side else {}
    kept = set(out.column("id").to_pylist())
    reasons = [None if str(i) in kept else why[str(i)] for i in range(len(texts))]
    return dt, reasons


def runner_run(folder: str, out: str, workers: int) -> tuple[float, int]:
    from curate.run import run_pipeline

    t0 = time.perf_counter()
    res = run_pipeline({"name": "bench", "output": out, "report": False, "workers": workers, "batch_size": 1000,
                        "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": folder}}},
                        "stages": [{"stage": "heuristic_filter"}]}, progress=False)
    return time.perf_counter() - t0, res.stats["heuristic_filter"]["in"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--runner-docs", type=int, default=12000, help="0: skip the runner")
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    texts = varied_documents(a.docs, seed=a.seed)
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(f"data: {len(texts):,} varied documents, {words:.0f} whitespace words on average")
    best_dt = best_cu = float("inf")
    for r in range(a.repeat):
        t_dt, ref = datatrove_run(texts)
        t_cu, got = curate_run(texts)
        diff = sum(1 for x, y in zip(ref, got) if x != y)
        assert diff == 0, f"{diff} decisions differ from datatrove's"
        best_dt, best_cu = min(best_dt, t_dt), min(best_cu, t_cu)
        print(f"  round {r + 1}: datatrove {len(texts) / t_dt:,.0f} docs/s, curate {len(texts) / t_cu:,.0f} docs/s")
    kept = sum(1 for x in ref if x is None)
    print(f"identical decisions on all {len(texts):,} documents ({kept:,} kept)")
    print(f"datatrove's 4 filters, direct calls (1 process): {len(texts) / best_dt:>8,.0f} docs/s")
    print(f"curate heuristic_filter, library call (1 process): {len(texts) / best_cu:>6,.0f} docs/s  "
          f"ratio {best_dt / best_cu:.2f}x  target >= 3x")
    if a.runner_docs:
        tmp = tempfile.mkdtemp(prefix="curate-bench-heur-")
        try:
            big = varied_documents(a.runner_docs, seed=a.seed + 1)
            inp = os.path.join(tmp, "in")
            os.makedirs(inp)
            per = -(-len(big) // 4)
            for k in range(4):
                part = big[k * per:(k + 1) * per]
                pq.write_table(pa.table({"id": [f"{k}-{i}" for i in range(len(part))], "text": part}),
                               os.path.join(inp, f"part-{k}.parquet"))
            for workers in (1, 2):
                t, n = runner_run(inp, os.path.join(tmp, f"out{workers}"), workers)
                print(f"curate run read_parquet -> heuristic_filter, {workers} process(es): "
                      f"{n / t:,.0f} docs/s ({n:,} docs, {t:.1f} s with start-up)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
