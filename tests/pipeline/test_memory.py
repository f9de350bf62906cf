"""Memory stays bounded: a corpus 10x larger must not need 10x the memory (streaming batches)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = r"""
import json, os, random, resource, sys
import pyarrow as pa, pyarrow.parquet as pq
sys.path.insert(0, os.path.join(sys.argv[1], "tests", "plugins"))
from curate.run import run_pipeline
folder, n_files = sys.argv[2], int(sys.argv[3])
os.makedirs(folder + "/in", exist_ok=True)
rng = random.Random(0)
words = [f"w{i}" for i in range(3000)]
for f in range(n_files):   # each file ~20k docs of ~100 words (~15 MB of text)
    texts = [" ".join(rng.choices(words, k=100)) for _ in range(20000)]
    pq.write_table(pa.table({"text": texts}), f"{folder}/in/f{f:03d}.parquet")
    del texts
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = run_pipeline({"name": "mem", "output": folder + "/out", "workers": 1, "batch_size": 1000,
                    "rows_per_shard": 5000, "plugins": ["runner_stages"],
                    "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": folder + "/in"}}},
                    "stages": [{"stage": "word_count"}, {"stage": "min_words", "options": {"min_words": 5}}]},
                   progress=False)
print(json.dumps({"rows": res.stats["min_words"]["out"], "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "base_kb": base}))
"""


def _peak(tmp_path, files):
    r = subprocess.run([sys.executable, "-c", SCRIPT, ROOT, str(tmp_path / f"m{files}"), str(files)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_corpus_size(tmp_path):
    small = _peak(tmp_path, 1)
    large = _peak(tmp_path, 10)
    assert small["rows"] == 20000 and large["rows"] == 200000
    # ~215 MB for both here; holding the 200k documents (~140 MB of text) would exceed the margin
    assert large["peak_kb"] < small["peak_kb"] + 60_000, (small, large)
