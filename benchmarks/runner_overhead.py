"""Runner overhead: the local runner with a no-op map stage vs a plain pyarrow read-write loop.

Both read the same Parquet files in batches and write zstd Parquet. Prints docs/s and the ratios.
Targets (issue #2): the runner costs < 10% on one process, and scales to >= 1.7x on two.

    python benchmarks/runner_overhead.py [--files 8] [--rows 40000]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                            os.environ.get("PYTHONPATH", "")])

from curate.pipeline.stage import MapStage, register  # noqa: E402


@register
class Noop(MapStage):
    """Returns its batch unchanged (benchmark only)."""
    name = "bench_noop"

    def process(self, table):
        return table


def make_data(folder: str, files: int, rows: int) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    for f in range(files):
        texts = [" ".join(rng.choices(words, k=rng.randint(40, 120))) for _ in range(rows)]
        ids = [f"{f}-{i}" for i in range(rows)]
        t = pa.table({"id": ids, "text": texts, "source": [f"file{f}"] * rows, "metadata": ["{}"] * rows})
        pq.write_table(t, os.path.join(folder, f"in-{f:03d}.parquet"), compression="zstd")


def plain_loop(inp: str, out: str, batch_size: int) -> int:
    n = 0
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(inp)):
        pf = pq.ParquetFile(os.path.join(inp, name))
        with pq.ParquetWriter(os.path.join(out, name), pf.schema_arrow, compression="zstd") as w:
            for b in pf.iter_batches(batch_size=batch_size):
                w.write_batch(b)
                n += b.num_rows
    return n


def runner(inp: str, out: str, workers: int, batch_size: int) -> int:
    from curate.run import run_pipeline
    res = run_pipeline({"name": "bench", "output": out, "workers": workers, "batch_size": batch_size,
                        "rows_per_shard": 1_000_000, "plugins": ["runner_overhead"], "report": False,
                        "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": inp}}},
                        "stages": [{"stage": "bench_noop"}]}, progress=False)
    return res.stats["bench_noop"]["out"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="curate-bench-")
    try:
        inp = os.path.join(tmp, "in")
        os.makedirs(inp)
        make_data(inp, a.files, a.rows)
        size = sum(os.path.getsize(os.path.join(inp, f)) for f in os.listdir(inp)) / 1e6
        print(f"data: {a.files} files x {a.rows:,} docs ({size:.0f} MB zstd), batch {a.batch_size}")

        def best(fn, *args):
            times = []
            for r in range(a.repeat):
                out = os.path.join(tmp, f"out-{fn.__name__}-{args[-1] if args else ''}-{r}")
                t0 = time.perf_counter()
                n = fn(inp, out, *args)
                times.append(time.perf_counter() - t0)
                shutil.rmtree(out)
            return n, min(times)

        n0, t_plain = best(plain_loop, a.batch_size)
        n1, t_one = best(runner, 1, a.batch_size)
        n2, t_two = best(runner, 2, a.batch_size)
        assert n0 == n1 == n2, (n0, n1, n2)
        print(f"plain pyarrow loop (1 process): {n0 / t_plain:>10,.0f} docs/s")
        print(f"curate runner, 1 process:      {n1 / t_one:>10,.0f} docs/s  "
              f"ratio {t_plain / t_one:.2f}x (overhead {100 * (t_one / t_plain - 1):+.1f}%)  target >= 0.90x")
        print(f"curate runner, 2 processes:    {n2 / t_two:>10,.0f} docs/s  "
              f"ratio {t_plain / t_two:.2f}x vs plain, {t_one / t_two:.2f}x vs 1 process  target >= 1.7x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
