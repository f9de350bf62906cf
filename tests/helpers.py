"""Small helpers shared by the foundation tests."""

from __future__ import annotations

import os
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

WORDS = ("market bond yield equity credit rate inflation asset liability capital revenue margin "
         "dividend loan deposit ledger audit statute court contract plaintiff patient dose trial "
         "protein cell gene clinical therapy risk hedge option future swap").split()


def curate_bin() -> str:
    """The `curate` console script of the running interpreter's environment."""
    exe = os.path.join(os.path.dirname(sys.executable), "curate")
    return exe if os.path.exists(exe) else "curate"


def write_corpus(folder: str, files: int = 4, rows: int = 500, seed: int = 0) -> list[str]:
    """Parquet files of documents with 1-30 words (no id column: ids are derived)."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for f in range(files):
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(rows)]
        p = os.path.join(folder, f"f{f}.parquet")
        pq.write_table(pa.table({"text": texts, "lang_hint": ["en"] * rows}), p)
        paths.append(p)
    return paths


def write_yaml(path: str, obj: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=False)
    return path


def pipeline_dict(inp: str, out: str, **over) -> dict:
    d = {
        "name": "t",
        "output": out,
        "workers": 2,
        "batch_size": 100,
        "rows_per_shard": 300,
        "plugins": ["runner_stages"],
        "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": inp}}},
        "stages": [
            {"stage": "word_count"},
            {"stage": "min_words", "options": {"min_words": 10, "save_dropped": True}},
            {"name": "top", "stage": "top_k", "options": {"k": 50}},
            {"name": "counts2", "stage": "word_count", "input": "min_words", "options": {"column": "n2"}},
        ],
    }
    d.update(over)
    return d


def read_step(out: str, step: str) -> dict[str, pa.Table]:
    """{shard file name: table} of a step's output folder."""
    d = os.path.join(out, step)
    return {f: pq.read_table(os.path.join(d, f)) for f in sorted(os.listdir(d)) if f.endswith(".parquet")}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recorded(path: str, got: dict) -> dict:
    """The digests recorded in ``path`` (a golden test's JSON); with ``CURATE_RECORD_GOLDEN=1``
    ``got`` is written there first (after an intended change of the outputs)."""
    import json

    if os.environ.get("CURATE_RECORD_GOLDEN"):
        with open(path, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(path) as f:
        return json.load(f)
