"""Ray scaling: the WARC ingest example (extract, language id, filters, PII, exact and MinHash
dedup) on the same WARC files, three ways, in one run:

``local``        ``runner: local`` with 2 worker processes (the default on this machine)
``ray-1node``    ``runner: ray`` on a one-node Ray instance with 2 CPUs
``ray-2nodes``   ``runner: ray`` on a two-node Ray cluster (``ray.cluster_utils.Cluster``: a head
                 and a second raylet, 1 CPU each, on this machine)

Prints docs/s (documents read from the WARC files per second of wall time, Ray start-up excluded)
and each Ray run's overhead against the local runner; on one machine the target is < 15%. All
three outputs are checked to hold the same shards (sha256 from manifest.json).

    python benchmarks/ray_scaling.py [--articles 1500] [--files 8] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))  # pages.py: offline HTML builders
sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "configs", "warc_example.yaml")


def build_warcs(folder: str, articles: int, files: int) -> int:
    """pydoc pages of the standard library plus generated news articles, as HTTP responses in
    ``files`` .warc.gz files. Returns the number of pages."""
    from io import BytesIO

    from pages import article_pages, html_table
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    from curate.stages.sources.read_pydoc import ReadPydoc

    pages = ReadPydoc()().select(["url", "html"]).to_pylist()
    pages += html_table(article_pages(articles, seed=0)).select(["url", "html"]).to_pylist()
    os.makedirs(folder, exist_ok=True)
    for f in range(files):
        with open(os.path.join(folder, f"part-{f:03d}.warc.gz"), "wb") as fh:
            w = WARCWriter(fh, gzip=True)
            for i, p in enumerate(pages[f::files]):
                headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")],
                                           protocol="HTTP/1.1")
                url = p["url"] if (p["url"] or "").startswith("http") else \
                    f"https://docs.example.org/{(p['url'] or f'{f}-{i}').replace(':', '/')}"
                w.write_record(w.create_warc_record(url, "response", payload=BytesIO(p["html"].encode()),
                                                    http_headers=headers))
    return len(pages)


def run_once(out: str, runner: str) -> tuple[float, dict]:
    from curate.run import run_pipeline

    t0 = time.perf_counter()
    res = run_pipeline(CONFIG, output=out, runner=runner, workers=2, force=True, progress=False)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "manifest.json")) as f:
        shards = {k: [s["sha256"] for s in v["shards"]] for k, v in json.load(f)["steps"].items()}
    return wall, {"docs": res.stats["warc"]["out"], "shards": shards}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--articles", type=int, default=1500)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="best of N runs per way")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    with tempfile.TemporaryDirectory(prefix="curate-ray-bench-") as tmp:
        n = build_warcs(os.path.join(tmp, "warc"), args.articles, args.files)
        os.environ["WARC_PATHS"] = os.path.join(tmp, "warc", "*.warc.gz")
        print(f"{n:,} pages in {args.files} WARC files; 2 CPUs for every way")
        results: dict[str, tuple[float, dict]] = {}

        def best(name: str, runner: str) -> None:
            runs = [run_once(os.path.join(tmp, name), runner) for _ in range(args.rounds)]
            results[name] = min(runs, key=lambda r: r[0])

        best("local", "local")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            best("ray-1node", "ray")
        finally:
            ray.shutdown()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            cluster.wait_for_nodes()
            best("ray-2nodes", "ray")
        finally:
            ray.shutdown()
            cluster.shutdown()

        base_wall, base = results["local"]
        print(f"{'way':<12} {'docs':>6} {'wall s':>8} {'docs/s':>8} {'vs local':>9}  same shards")
        for name, (wall, r) in results.items():
            same = r["shards"] == base["shards"]
            print(f"{name:<12} {r['docs']:>6,} {wall:>8.1f} {r['docs'] / wall:>8.1f} "
                  f"{base_wall / wall:>8.2f}x  {'yes' if same else 'NO'}")
        for name in ("ray-1node", "ray-2nodes"):
            overhead = results[name][0] / base_wall - 1
            print(f"{name} overhead on one machine: {100 * overhead:+.1f}% (target < 15%)")


if __name__ == "__main__":
    main()
