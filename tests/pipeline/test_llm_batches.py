"""A chain with an LLM step gets batches (and tasks) of several engine windows: each batch ends with
the engine's window draining, so 1,000-row batches at ``concurrency: 512`` ran ``curate run`` at
0.47 of the concurrency bound (0.83 with batches of 16 x concurrency, one task, coalesced)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from curate.pipeline.worker import _rebatch
from curate.stages.synth.generate import Generate
from curate.testing.fake_openai import FakeOpenAI


def _t(start: int, n: int) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(start, start + n)]})


def test_rebatch_coalesces_small_tables_up_to_the_size_and_splits_big_ones():
    parts = [_t(0, 3), _t(3, 4), _t(7, 10), _t(17, 2)]
    got = list(_rebatch(iter(parts), 8, coalesce=True))
    assert [t.num_rows for t in got] == [7, 8, 4]
    assert sum((t.column("id").to_pylist() for t in got), []) == [f"d{i}" for i in range(19)]
    # without coalescing (chains without an LLM step): only split, as before
    assert [t.num_rows for t in _rebatch(iter(parts), 8)] == [3, 4, 8, 2, 2]


def test_min_batch_rows_by_engine():
    url = "http://127.0.0.1:9/v1"
    assert Generate(engine={"kind": "openai", "model": "m", "base_url": url, "concurrency": 512}).min_batch_rows() == 8192
    assert Generate(engine={"kind": "openai", "model": "m", "base_url": url, "mode": "batch"}).min_batch_rows() == 0
    assert Generate(engine={"kind": "transformers"}).min_batch_rows() == 0


def test_llm_step_of_a_run_gets_one_coalesced_batch(tmp_path, monkeypatch):
    """500 rows in row groups of 50 through read_parquet -> generate (concurrency 16: batches of up
    to 2 x 16 x 16 rows): the LLM step sees one table of 500 rows, not five of 100 (the pipeline's
    batch_size) or ten of 50; the output is every row, in order."""
    from curate.llm.stage import LLMStage
    from curate.run import run_pipeline

    sizes: list[int] = []
    process = LLMStage.process

    def spy(self, table):
        sizes.append(table.num_rows)
        return process(self, table)

    monkeypatch.setattr(LLMStage, "process", spy)
    n = 500
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n)], "text": [f"item {i}" for i in range(n)]}),
                   str(tmp_path / "in.parquet"), row_group_size=50)
    with FakeOpenAI() as srv:
        run_pipeline({
            "name": "b", "output": str(tmp_path / "out"), "workers": 1, "batch_size": 100,
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": [str(tmp_path / "in.parquet")]}}},
            "stages": [{"stage": "generate", "options": {
                "engine": {"kind": "openai", "model": "m", "base_url": srv.base_url, "concurrency": 16},
                "max_tokens": 8}}]}, progress=False)
    assert sizes == [n]
    out = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "out" / "generate").glob("*.parquet"))])
    assert out.column("id").to_pylist() == [f"d{i}" for i in range(n)]
    assert out.column("completion").to_pylist() == [f"item {i}"[::-1] for i in range(n)]
