"""``read_jsonl``: documents from JSON Lines files (.jsonl, .jsonl.gz, .zst...; local or fsspec).

A line that is not valid JSON, not an object, not UTF-8, or has no text is counted under
``errors/<reason>`` (the first few are logged with file and line number) and skipped; the rest of the
file is read.
"""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
from pydantic import Field

from curate.pipeline.api import FileSource, StageConfig, Task, docs_table, dumps_meta, get_fs, make_id, register


class ReadJsonlConfig(StageConfig):
    paths: list[str] | str = Field(description="files, folders or globs of JSON Lines (compression by suffix)")
    text_key: str = Field("text", description="key holding the document text")
    id_key: str | None = Field("id", description="key holding the id; derived from file (under the input root)+line when absent")
    source_key: str | None = Field(None, description="key holding the source url/path (default: the file)")
    batch_size: int = Field(2048, ge=1)


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.bz2", ".jsonl.xz", ".json.gz", ".ndjson")


@register
class ReadJsonl(FileSource):
    """Read documents from JSON Lines files; other keys go to metadata; bad lines are counted."""

    name = "read_jsonl"
    Config = ReadJsonlConfig
    suffixes = JSONL_SUFFIXES
    writes = {"id": pa.string(), "text": pa.string(), "source": pa.string(), "metadata": pa.string()}

    def read(self, task: Task) -> Iterator[pa.Table]:
        cfg = self.config
        path = task.payload
        fs, p = get_fs(path)
        rel = self.relpath(path)   # ids and source from the path under the input root
        rows: list[tuple[str, str, str, str]] = []
        with fs.open(p, "rb", compression="infer") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    self.error("not_utf8", doc_id=where, detail=str(exc))
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    self.error("bad_json", doc_id=where, detail=str(exc))
                    continue
                if not isinstance(obj, dict):
                    self.error("not_an_object", doc_id=where)
                    continue
                text = obj.pop(cfg.text_key, None)
                if not isinstance(text, str):
                    self.error("no_text", doc_id=where, detail=f"key {cfg.text_key!r} missing or not a string")
                    continue
                doc_id = obj.pop(cfg.id_key, None) if cfg.id_key else None
                source = obj.pop(cfg.source_key, None) if cfg.source_key else None
                rows.append((str(doc_id) if doc_id is not None else make_id(rel, lineno), text,
                             str(source) if source is not None else rel, dumps_meta(obj)))
                if len(rows) >= cfg.batch_size:
                    yield _table(rows)
                    rows = []
        if rows:
            yield _table(rows)


def _table(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    ids, texts, sources, metas = zip(*rows)
    return docs_table(ids, texts, sources, metas)
