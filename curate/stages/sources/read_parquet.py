"""``read_parquet``: documents from Parquet files (local or any fsspec URL), one task per file."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
from pydantic import Field

from curate.pipeline.api import FileSource, StageConfig, StageError, Task, ensure_doc_columns, iter_parquet, register


class ReadParquetConfig(StageConfig):
    paths: list[str] | str = Field(description="files, folders or globs (local or fsspec URLs)")
    text_column: str = Field("text", description="column holding the document text")
    id_column: str | None = Field("id", description="column holding ids; missing ids are derived "
                                                    "from the file's path under the input root and the row number")
    columns: list[str] | None = Field(None, description="read only these columns (plus text/id)")
    batch_size: int = Field(4096, ge=1)


@register
class ReadParquet(FileSource):
    """Read documents from Parquet files; adds id/source/metadata columns when missing."""

    name = "read_parquet"
    Config = ReadParquetConfig
    suffixes = (".parquet",)
    writes = {"id": pa.string(), "text": pa.string(), "source": pa.string(), "metadata": pa.string()}

    def read(self, task: Task) -> Iterator[pa.Table]:
        cfg = self.config
        cols = None
        if cfg.columns:
            cols = list(dict.fromkeys([*cfg.columns, cfg.text_column] + ([cfg.id_column] if cfg.id_column else [])))
        offset = 0
        rel = self.relpath(task.payload)   # ids and source from the path under the input root
        for t in iter_parquet(task.payload, columns=cols, batch_size=cfg.batch_size):
            if cfg.text_column not in t.schema.names:
                raise StageError(f"{task.payload}: no column {cfg.text_column!r} (columns: {t.schema.names})")
            if cfg.text_column != "text":
                t = t.rename_columns(["text" if c == cfg.text_column else c for c in t.schema.names])
            if cfg.id_column and cfg.id_column != "id" and cfg.id_column in t.schema.names:
                t = t.rename_columns(["id" if c == cfg.id_column else c for c in t.schema.names])
            t = ensure_doc_columns(t, source=rel, offset=offset)
            offset += t.num_rows
            yield t
