"""Spill files of global stages, on a local folder or under the output location on any fsspec
filesystem (``s3://...``), so a global stage's workers on other nodes can read what each wrote:
nothing depends on the driver's local disk. Local paths use plain file I/O (fast); URLs go
through fsspec, which pyarrow reads and writes directly.

Paths are strings; ``spill_join`` builds them the same way for both.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def is_url(path: str) -> bool:
    return "://" in path


def spill_join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def _fs(path: str) -> tuple[Any, str]:
    if not is_url(path):
        return None, path
    from curate.pipeline.io import get_fs
    return get_fs(path)


def spill_makedirs(path: str) -> None:
    fs, p = _fs(path)
    if fs is None:
        os.makedirs(p, exist_ok=True)
    else:
        fs.makedirs(p, exist_ok=True)


def spill_writer(path: str, schema: pa.Schema, **options: Any) -> pq.ParquetWriter:
    """A ParquetWriter for ``path`` (its folder is created)."""
    fs, p = _fs(path)
    spill_makedirs(posixpath.dirname(path) if fs is not None else os.path.dirname(p))
    return pq.ParquetWriter(p, schema, filesystem=fs, **options)


def spill_write(table: pa.Table, path: str, **options: Any) -> None:
    with spill_writer(path, table.schema, **options) as w:
        w.write_table(table)


def spill_read(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, p = _fs(path)
    return pq.read_table(p, columns=columns, filesystem=fs)


def spill_file(path: str) -> pq.ParquetFile:
    """A ParquetFile to stream ``path`` by row groups."""
    fs, p = _fs(path)
    return pq.ParquetFile(p if fs is None else fs.open(p, "rb"))


def spill_rmtree(path: str) -> None:
    fs, p = _fs(path)
    if fs is None:
        shutil.rmtree(p, ignore_errors=True)
    elif fs.exists(p):
        fs.rm(p, recursive=True)
