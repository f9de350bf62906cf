"""Extraction speed: curate's ``extract_html`` versus a plain trafilatura loop (and datatrove).

All paths extract the same pages (pydoc pages of the standard library plus generated news
articles, built offline into one Parquet file by :func:`build_pages`) with the same trafilatura
options, in this process, one core:

``plain``               ``for html in pages: trafilatura.extract(html, url=url, include_comments=False)``
``stage_nometa``        ``ExtractHtml(with_metadata=False)(table)`` -- the same work, plus the
                        stage's bookkeeping (time limit, counters, Arrow columns)
``plain_meta``          the plain loop with ``with_metadata=True`` (title, date, author... found)
``stage``               ``ExtractHtml()(table)`` (default: with metadata) -- compare with plain_meta
``datatrove``           datatrove's ``Trafilatura`` extractor (``run`` over Documents: it extracts in
                        a sandbox subprocess with a timeout), same options, if datatrove is installed

Every path is timed ``--rounds`` times (interleaved), the best round is reported, after a warm-up
on a few pages. Wall-clock time is the headline; the CPU time of this process is shown too, as it
is steadier on a shared machine (not for datatrove, which extracts in a subprocess). Paths are
plain functions ``fn(pages_path) -> (docs, wall_seconds, cpu_seconds | None)`` collected in
``PATHS``, so other paths (e.g. the runner with 1 and 2 processes) can be added by registering a
function there (return None for the CPU time when work happens in other processes).

    python benchmarks/extract.py [--articles 200] [--rounds 2] [--paths plain,stage_nometa,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))  # pages.py: offline HTML builders

PLAIN_OPTS = {"include_comments": False}  # the stage's defaults, spelled for trafilatura.extract


def build_pages(path: str, articles: int = 200, modules: list[str] | None = None, seed: int = 0) -> str:
    """Write the benchmark's page set (id, source, html, text, metadata, url) to ``path``."""
    from pages import article_pages, html_table

    from curate.stages.sources.read_pydoc import ReadPydoc

    src = ReadPydoc(**({"modules": modules} if modules else {}))()
    arts = html_table(article_pages(articles, seed=seed))
    cols = ["id", "source", "html", "text", "metadata", "url"]
    table = pa.concat_tables([src.select(cols), arts.select(cols)])
    pq.write_table(table, path)
    return path


def _load(path: str) -> pa.Table:
    return pq.read_table(path)


def _warm(fn: Callable[[pa.Table], object], table: pa.Table) -> None:
    fn(table.slice(0, 3))
    fn(table.slice(table.num_rows - 3, 3))


def _plain(table: pa.Table, **opts) -> int:
    import trafilatura

    n = 0
    for html, url in zip(table.column("html").to_pylist(), table.column("url").to_pylist()):
        if trafilatura.extract(html, url=url, **PLAIN_OPTS, **opts):
            n += 1
    return n


Timing = tuple[int, float, "float | None"]


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def time_plain(path: str, **opts) -> Timing:
    """A plain loop over trafilatura.extract."""
    table = _load(path)
    _warm(lambda t: _plain(t, **opts), table)
    return (table.num_rows, *_timed(lambda: _plain(table, **opts)))


def time_plain_meta(path: str) -> Timing:
    return time_plain(path, with_metadata=True)


def time_stage(path: str, **opts) -> Timing:
    """curate's extract_html as a library call on the same table."""
    from curate.stages.clean.extract_html import ExtractHtml

    table = _load(path)
    _warm(lambda t: ExtractHtml(**opts)(t), table)
    st = ExtractHtml(**opts)
    return (table.num_rows, *_timed(lambda: st(table)))


def time_stage_nometa(path: str) -> Timing:
    return time_stage(path, with_metadata=False)


def time_datatrove(path: str) -> Timing:
    """datatrove's Trafilatura extractor with the same options (its sandbox process included)."""
    from datatrove.data import Document
    from datatrove.pipeline.extractors import Trafilatura

    table = _load(path)
    docs = [Document(text=h, id=i, metadata={"url": u}) for i, h, u in
            zip(*(table.column(c).to_pylist() for c in ("id", "html", "url")))]
    ex = Trafilatura(favour_precision=False, deduplicate=False, timeout=30)
    warm = [Document(text=d.text, id=d.id) for d in docs[:3]]
    list(ex.run(iter(warm)))
    fresh = [Document(text=d.text, id=d.id) for d in docs]
    wall, _ = _timed(lambda: list(ex.run(iter(fresh))))
    return len(docs), wall, None  # the work happens in datatrove's sandbox subprocess


def _split(path: str, parts: int) -> str:
    """The page set as ``parts`` Parquet files (the runner runs one task per file)."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    folder = path + f".split{parts}"
    if not os.path.isdir(folder):
        os.makedirs(folder)
        table = _load(path)
        for i in range(parts):  # round-robin: big and small pages spread evenly over the files
            rows = pa.array(range(i, table.num_rows, parts), pa.int64())
            pq.write_table(table.take(rows), os.path.join(folder, f"pages-{i:03d}.parquet"))
    return folder


def time_runner(path: str, workers: int) -> Timing:
    """extract_html (no metadata) through the local runner: read_parquet -> extract_html -> shards."""
    import shutil
    import tempfile

    from curate.run import run_pipeline

    folder = _split(path, 16)
    out = tempfile.mkdtemp(prefix="curate-bench-extract-")
    try:
        spec = {"name": "bench-extract", "output": out, "report": False, "workers": workers, "batch_size": 64,
                "inputs": {"pages": {"stage": "read_parquet", "options": {"paths": folder}}},
                "stages": [{"stage": "extract_html", "options": {"with_metadata": False}}]}
        holder = {}
        wall, _ = _timed(lambda: holder.update(r=run_pipeline(spec, progress=False, force=True)))
        n = holder["r"].stats["extract_html"]["in"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return n, wall, None  # the work happens in worker processes: wall time only


def time_runner1(path: str) -> Timing:
    return time_runner(path, 1)


def time_runner2(path: str) -> Timing:
    return time_runner(path, 2)


PATHS: dict[str, Callable[[str], Timing]] = {
    "plain": time_plain,
    "stage_nometa": time_stage_nometa,
    "plain_meta": time_plain_meta,
    "stage": time_stage,
    "runner1": time_runner1,
    "runner2": time_runner2,
}
try:
    import datatrove.pipeline.extractors  # noqa: F401

    PATHS["datatrove"] = time_datatrove
except ImportError:
    pass

# (path, its peer) pairs whose speed ratio is printed
RATIOS = [("stage_nometa", "plain"), ("stage", "plain_meta"), ("runner1", "plain"), ("runner2", "plain"),
          ("stage_nometa", "datatrove")]


def run(path: str, names: list[str], rounds: int = 2) -> dict[str, Timing]:
    """Best (docs, wall, cpu) of each path over ``rounds`` interleaved rounds (min of each)."""
    best: dict[str, Timing] = {}
    for _ in range(rounds):
        for name in names:
            n, w, c = PATHS[name](path)
            if name in best:
                _, bw, bc = best[name]
                w, c = min(w, bw), (min(c, bc) if c is not None and bc is not None else c or bc)
            best[name] = (n, w, c)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--articles", type=int, default=1500, help="generated news pages")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {list(PATHS)}")
    ap.add_argument("--pages", default=None, help="use/keep this Parquet page set")
    args = ap.parse_args(argv)
    names = [p for p in args.paths.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.pages or os.path.join(tmp, "pages.parquet")
        if not os.path.exists(path):
            build_pages(path, articles=args.articles)
        t = _load(path)
        mb = sum(len(h) for h in t.column("html").to_pylist()) / 1e6
        print(f"pages: {t.num_rows} ({mb:.1f} MB of HTML), rounds: {args.rounds}, best round shown")
        res = run(path, names, args.rounds)
    for name in names:
        n, w, c = res[name]
        cpu = f"{n / c:8.1f} docs/CPU-s" if c else "           -"
        print(f"{name:>14}: {n / w:8.1f} docs/s wall ({w:6.2f} s)  {cpu}")
    for a, b in RATIOS:
        if a in res and b in res:
            line = f"{a} / {b}: {res[b][1] / res[a][1]:.2f}x wall"
            if res[a][2] and res[b][2]:
                line += f", {res[b][2] / res[a][2]:.2f}x CPU"
            print(line)


if __name__ == "__main__":
    main()
