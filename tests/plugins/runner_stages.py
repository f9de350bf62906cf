"""Stages used by the runner tests (loaded through `plugins:`): small but real Arrow transforms.

``word_count`` (map) adds an int column; ``min_words`` (filter) drops short docs with a reason;
``slow`` (map) sleeps per batch so a test can kill a run mid-stage; ``top_k`` (global) keeps the k
longest documents across all shards; ``explode`` (map) raises on marked rows to test isolation.
"""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.pipeline.stage import FilterStage, GlobalStage, MapStage, StageConfig, register


class WordCountConfig(StageConfig):
    column: str = "n_words"


@register
class WordCount(MapStage):
    """Count whitespace-separated words."""
    name = "word_count"
    Config = WordCountConfig
    reads = ("text",)
    writes = {"n_words": pa.int64()}

    def process(self, table):
        n = pc.list_value_length(pc.utf8_split_whitespace(table.column("text")))
        return table.append_column(self.config.column, n.cast(pa.int64()))


class MinWordsConfig(StageConfig):
    min_words: int = 5
    save_dropped: bool = False


@register
class MinWords(FilterStage):
    """Drop documents with fewer than min_words words."""
    name = "min_words"
    Config = MinWordsConfig
    reads = ("n_words",)

    def keep(self, table):
        n = table.column("n_words").to_pylist()
        mask = [x >= self.config.min_words for x in n]
        return mask, [None if k else "too_short" for k in mask]


class SlowConfig(StageConfig):
    seconds_per_batch: float = 0.2
    marker_dir: str | None = None


@register
class Slow(MapStage):
    """Sleep per batch (to kill runs mid-stage in tests); optionally drop a marker file per batch."""
    name = "slow"
    Config = SlowConfig

    def process(self, table):
        time.sleep(self.config.seconds_per_batch)
        if self.config.marker_dir:
            os.makedirs(self.config.marker_dir, exist_ok=True)
            open(os.path.join(self.config.marker_dir, f"{os.getpid()}-{time.time_ns()}"), "w").close()
        return table


class TopKConfig(StageConfig):
    k: int = Field(10, ge=1)
    sleep: float = 0.0  # seconds to wait before writing (tests kill runs inside a global step)


@register
class TopK(GlobalStage):
    """Keep the k longest documents of the whole dataset (ties by id)."""
    name = "top_k"
    Config = TopKConfig
    reads = ("text",)

    def run(self, dataset, writer, ctx):
        full = dataset.to_table()
        time.sleep(self.config.sleep)
        lens = pc.utf8_length(full.column("text")).to_pylist()
        order = sorted(range(full.num_rows), key=lambda i: (-lens[i], full.column("id")[i].as_py()))
        keep = sorted(order[: self.config.k])
        self.drop("not_top_k", full.num_rows - len(keep))
        writer.write(full.take(pa.array(keep, pa.int64())))


class ExplodeConfig(StageConfig):
    bad_word: str = "EXPLODE"


@register
class Explode(MapStage):
    """Raises on any batch containing bad_word (tests per-document error isolation)."""
    name = "explode"
    Config = ExplodeConfig

    def process(self, table):
        for t in table.column("text").to_pylist():
            if self.config.bad_word in (t or ""):
                raise ValueError("boom")
        return table


class GpuProbeConfig(StageConfig):
    marker_dir: str


@register
class GpuProbe(MapStage):
    """Records which process and which (Ray-assigned) GPU handled each batch; needs one GPU."""
    name = "gpu_probe"
    Config = GpuProbeConfig
    from curate.pipeline.stage import Resources as _R
    resources = _R(cpus=0.5, gpus=1)

    def setup(self):
        os.makedirs(self.config.marker_dir, exist_ok=True)
        open(os.path.join(self.config.marker_dir, f"setup-{os.getpid()}"), "w").close()

    def process(self, table):
        import ray
        if ray.is_initialized():       # a Ray actor: the GPUs Ray assigned to it
            gpu = ",".join(str(g) for g in ray.get_gpu_ids())
        else:                          # a local worker: the devices it was given
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        n = table.num_rows
        return table.append_column("pid", pa.array([os.getpid()] * n, pa.int64())).append_column(
            "gpu", pa.array([gpu] * n, pa.string()))


@register
class FakeTokens(MapStage):
    """Counts 3 'generated tokens' per row, as an LLM stage does (tests the progress accounting)."""
    name = "fake_tokens"

    def process(self, table):
        self.count("llm/completion_tokens", 3 * table.num_rows)
        return table


class FlakyConfig(StageConfig):
    state_dir: str          # a file per row id that already failed once
    every: int = 7          # rows whose word count is a multiple of this fail once


@register
class Flaky(MapStage):
    """Rows fail transiently once (``Stage.defer``), then succeed: an endpoint that times out."""
    name = "flaky"
    Config = FlakyConfig
    reads = ("text", "n_words")

    def process(self, table):
        os.makedirs(self.config.state_dir, exist_ok=True)
        keep = []
        for i, (t, n) in enumerate(zip(table.column("text").to_pylist(), table.column("n_words").to_pylist())):
            import hashlib
            mark = os.path.join(self.config.state_dir, hashlib.md5(f"{t}|{i}".encode()).hexdigest())
            if n % self.config.every == 0 and not os.path.exists(mark):
                open(mark, "w").close()
                continue
            keep.append(i)
        if len(keep) < table.num_rows:
            self.defer("timeout", table.num_rows - len(keep))
        return table.take(pa.array(keep, pa.int64()))


class FragileConfig(StageConfig):
    broken_file: str        # while this file exists, rows containing bad_word raise
    bad_word: str = "EXPLODE"


@register
class Fragile(MapStage):
    """Raises on rows with bad_word while ``broken_file`` exists: a cause that is fixed between
    runs without changing the step's options (a broken library, an endpoint answering garbage)."""
    name = "fragile"
    Config = FragileConfig

    def process(self, table):
        if os.path.exists(self.config.broken_file):
            for t in table.column("text").to_pylist():
                if self.config.bad_word in (t or ""):
                    raise ValueError("broken")
        return table
