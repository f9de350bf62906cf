"""Run state on disk: the output layout and the completion records that make runs resumable.

::

    <output>/<step>/part-*.parquet                 a materialised step's shards
    <output>/<step>/_<side>/part-*.parquet         side outputs (dropped rows, clusters, failures)
    <output>/_curate/state/<step>/done/part-N.json one record per finished task (TaskRecord)
    <output>/_curate/state/<step>/DONE.json        the step is finished (StepMarker)
    <output>/_curate/work/<step>/                  a stage's own local state (crawl frontier, caches)
    <output>/<step>/_model.bin, _model.json         a trained classifier and its card (train_classifier)
    <output>/<step>/_selection.json                what select kept and its thresholds (for the report)
    <output>/stats.json, manifest.json             written at the end of every run

Records are written atomically after the shards they name, so a record on disk means its shards are
complete. A record whose fingerprint differs from the step's belongs to other options or inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from curate.pipeline.io import atomic_write_bytes, get_fs, is_local, join, to_url

# Files a step writes next to its shards. Names start with "_": Parquet dataset readers (pyarrow,
# pandas, curate) skip them, so `pq.read_table("<output>/<step>")` still reads only the shards.
# The stages that write them and the report that reads them both take the names from here.
STEP_MODEL_FILE = "_model.bin"
STEP_CARD_FILE = "_model.json"
SELECTION_FILE = "_selection.json"


class Layout:
    """Where a run's files live, on any fsspec filesystem."""

    def __init__(self, output: str):
        self.fs, self.root = get_fs(output)
        self.url = output

    def step_dir(self, step: str) -> str:
        return join(self.root, step)

    def state_dir(self, step: str) -> str:
        return join(self.root, "_curate", "state", step)

    def workdir(self, step: str) -> str:
        """A local folder for a stage's own state (crawl frontier, LLM cache, dedup spill)."""
        if is_local(self.fs):
            return os.path.join(self.root, "_curate", "work", step)
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        return os.path.join(os.path.expanduser("~/.cache/curate/work"), key, step)

    def scratch_url(self, step: str) -> str:
        """Where a global step's spill files go: under the output, reachable from every node."""
        return self.url_of(join(self.root, "_curate", "work", step))

    def url_of(self, path: str) -> str:
        return to_url(self.fs, path)

    def shard_urls(self, step: str, shards: list[dict]) -> list[str]:
        d = self.step_dir(step)
        return [self.url_of(join(d, s["path"])) for s in shards]

    def write_json(self, path: str, obj: Any) -> None:
        atomic_write_bytes(self.fs, path, json.dumps(obj, indent=1, default=str).encode())

    def read_json(self, path: str) -> Any | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def rm(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


@dataclass
class StepRecord:
    """What one step did in one task (or in a whole step): the unit of stats and resume."""

    rows_in: int = 0
    rows_out: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0     # worker seconds spent in the step
    shards: int = 0

    def to_record(self) -> dict:
        return {"in": self.rows_in, "out": self.rows_out, "counters": dict(self.counters),
                "seconds": round(self.seconds, 6), "shards": self.shards}

    @classmethod
    def from_record(cls, rec: dict) -> "StepRecord":
        return cls(rows_in=rec.get("in", 0), rows_out=rec.get("out", 0),
                   counters=dict(rec.get("counters") or {}), seconds=rec.get("seconds", 0.0),
                   shards=rec.get("shards", 0))


@dataclass
class TaskRecord:
    """The completion record of one task: written after its shards, read back on resume."""

    task_index: int
    task_id: str
    fingerprint: str
    shards: list[dict]                       # ShardInfo dicts (path relative to the step folder)
    side: dict[str, list[dict]]              # step -> side shards written by that step
    steps: dict[str, StepRecord]             # every step fused in the task
    seconds: float = 0.0

    def to_record(self) -> dict:
        d = asdict(self)
        d["steps"] = {k: v.to_record() for k, v in self.steps.items()}
        return d

    @classmethod
    def from_record(cls, rec: dict) -> "TaskRecord":
        return cls(task_index=rec["task_index"], task_id=rec["task_id"], fingerprint=rec["fingerprint"],
                   shards=rec["shards"], side=rec.get("side") or {},
                   steps={k: StepRecord.from_record(v) for k, v in rec["steps"].items()},
                   seconds=rec.get("seconds", 0.0))

    def write(self, state_dir_url: str) -> None:
        fs, state = get_fs(state_dir_url)
        atomic_write_bytes(fs, join(state, "done", f"part-{self.task_index:05d}.json"),
                           json.dumps(self.to_record(), sort_keys=True).encode())


def read_task_records(layout: Layout, step: str, fingerprint: str,
                      task_ids: list[str]) -> tuple[dict[int, TaskRecord], bool]:
    """Valid completion records of ``step`` by task index, and whether any record is stale (written
    for other options or inputs: the step must be recomputed from scratch)."""
    records: dict[int, TaskRecord] = {}
    for f in sorted(layout.fs.glob(join(layout.state_dir(step), "done", "part-*.json"))):
        raw = layout.read_json(f)
        if not raw:
            continue
        if raw.get("fingerprint") != fingerprint:
            return {}, True
        rec = TaskRecord.from_record(raw)
        i = rec.task_index
        if i < len(task_ids) and rec.task_id == task_ids[i]:
            records[i] = rec
    return records, False


@dataclass
class StepMarker:
    """``DONE.json``: a finished step, its shards and the stats of every step it ran."""

    fingerprint: str
    step: str
    stage: str
    shards: list[dict]
    stats: dict[str, StepRecord]

    def write(self, layout: Layout) -> None:
        d = asdict(self)
        d["stats"] = {k: v.to_record() for k, v in self.stats.items()}
        layout.write_json(join(layout.state_dir(self.step), "DONE.json"), d)

    @classmethod
    def read(cls, layout: Layout, step: str, fingerprint: str) -> "StepMarker | None":
        m = layout.read_json(join(layout.state_dir(step), "DONE.json"))
        if not m or m.get("fingerprint") != fingerprint:
            return None
        return cls(fingerprint=m["fingerprint"], step=m["step"], stage=m["stage"], shards=m["shards"],
                   stats={k: StepRecord.from_record(v) for k, v in m["stats"].items()})
