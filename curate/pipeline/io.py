"""Parquet I/O on any filesystem fsspec knows (local paths, s3://, gs://, memory://, ...).

Writes are atomic: a shard is either absent or complete. Locally it is written to a temporary
name in the same folder and renamed; on object stores a single PUT is already atomic.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import io
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

PARQUET_COMPRESSION = "zstd"


def get_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URL."""
    fs, p = fsspec.core.url_to_fs(path)
    return fs, p


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of get_fs: a string other processes can open again."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=PARQUET_COMPRESSION, row_group_size=64 * 1024)
    return buf.getvalue()


@dataclass
class ShardInfo:
    path: str
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


def write_parquet_atomic(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> ShardInfo:
    data = parquet_bytes(table)
    atomic_write_bytes(fs, path, data)
    return ShardInfo(path=path, rows=table.num_rows, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest())


def expand_paths(paths: str | Sequence[str], suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Expand files, folders (recursively, files ending in ``suffixes``; all files if None) and
    globs into a sorted list of URLs/paths. Raises FileNotFoundError for a path that matches nothing
    that exists. Inside folders, hidden entries (``_x``, ``.x``) are skipped, as Arrow/Spark do."""
    out: list[str] = []
    for p in [paths] if isinstance(paths, str) else paths:
        fs, root = get_fs(p)
        if _glob.has_magic(root):
            found = sorted(f for f in fs.glob(root)
                           if not posixpath.basename(f).startswith(".") and not fs.isdir(f))
        elif fs.isdir(root):
            found = sorted(f for f in fs.find(root) if suffixes is None or f.lower().endswith(suffixes))
            found = [f for f in found
                     if not any(part.startswith(("_", ".")) for part in posixpath.relpath(f, root).split("/"))]
        elif fs.exists(root):
            found = [root]
        else:
            raise FileNotFoundError(p)
        out.extend(to_url(fs, f) for f in found)
    return list(dict.fromkeys(out))


def input_root(paths: str | Sequence[str]) -> str:
    """The folder that ``paths`` (files, folders, globs) are read from: a folder itself, a glob's
    folder before its first wildcard, a file's folder; the common folder of several entries. A
    URL like those ``expand_paths`` returns."""
    bases = []
    for p in [paths] if isinstance(paths, str) else paths:
        fs, root = get_fs(p)
        if _glob.has_magic(root):
            parts = root.split("/")
            cut = next(i for i, part in enumerate(parts) if _glob.has_magic(part))
            base = "/".join(parts[:cut]) or "/"
        elif fs.isdir(root):
            base = root
        else:
            base = posixpath.dirname(root)
        bases.append(to_url(fs, base.rstrip("/") or "/"))
    if not bases:
        return ""
    common = posixpath.commonpath([b.split("://", 1)[-1] for b in bases]) if len(bases) > 1 else bases[0]
    if len(bases) > 1 and "://" in bases[0]:
        common = bases[0].split("://", 1)[0] + "://" + common
    return common


def relative_to(url: str, root: str) -> str:
    """``url`` relative to ``root`` (``input_root``): what names an input file in document ids, the
    same wherever the input folder lives (host, container, another bucket)."""
    r = root.rstrip("/")
    return url[len(r) + 1:] if r and url.startswith(r + "/") else posixpath.basename(url)


def list_parquet(paths: str | Sequence[str]) -> list[str]:
    """Parquet files of files/folders/globs (see expand_paths)."""
    return expand_paths(paths, (".parquet",))


def iter_parquet(path: str, columns: Sequence[str] | None = None, batch_size: int = 4096,
                 start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
    """Stream rows [start, stop) of one Parquet file (all by default) as tables of at most
    ``batch_size`` rows. Row groups outside the range are not read."""
    fs, p = get_fs(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, row = [], 0         # row groups overlapping the range, and the first one's offset
        first = None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > start and (stop is None or row < stop):
                groups.append(g)
                first = row if first is None else first
            row += n
        if not groups:
            return
        pos = first
        for b in pf.iter_batches(batch_size=batch_size, row_groups=groups,
                                 columns=list(columns) if columns else None):
            lo, hi = max(start - pos, 0), b.num_rows if stop is None else min(stop - pos, b.num_rows)
            pos += b.num_rows
            if hi > lo:
                yield pa.Table.from_batches([b.slice(lo, hi - lo)])
            if stop is not None and pos >= stop:
                return


def slices(table: pa.Table, size: int) -> Iterator[pa.Table]:
    """``table`` as zero-copy slices of at most ``size`` rows."""
    return (table.slice(o, size) for o in range(0, table.num_rows, size))


def iter_part(src: "pa.Table | str", columns: Sequence[str] | None = None,
              batch_size: int = 4096) -> Iterator[pa.Table]:
    """Stream a dataset part handed to a worker: an in-memory table (library calls) or a Parquet
    path (runner), as tables of at most ``batch_size`` rows."""
    if isinstance(src, pa.Table):
        return slices(src.select(list(columns)) if columns else src, batch_size)
    return iter_parquet(src, columns, batch_size)


def read_table(path: str, columns: Sequence[str] | None = None) -> pa.Table:
    fs, p = get_fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns else None)


class Dataset:
    """A read-only view of a materialised corpus: Parquet files or in-memory tables."""

    def __init__(self, files: Sequence[str] = (), tables: Sequence[pa.Table] | None = None):
        self.files = list(files)
        self._tables = list(tables) if tables is not None else None

    @classmethod
    def from_any(cls, data: "pa.Table | pa.RecordBatch | str | Sequence[str] | Dataset") -> "Dataset":
        if isinstance(data, Dataset):
            return data
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if isinstance(data, pa.Table):
            return cls(tables=[data])
        return cls(files=list_parquet(data))

    @property
    def in_memory(self) -> bool:
        return self._tables is not None

    @property
    def num_parts(self) -> int:
        return len(self._tables) if self._tables is not None else len(self.files)

    def iter_tables(self, columns: Sequence[str] | None = None, batch_size: int = 8192,
                    part: int | None = None) -> Iterator[pa.Table]:
        """Stream all parts (or only ``part``) as tables of at most ``batch_size`` rows."""
        idx = range(self.num_parts) if part is None else [part]
        for i in idx:
            yield from iter_part(self.part_source(i), columns, batch_size)

    def part_source(self, i: int) -> "pa.Table | str":
        """Part ``i`` as a worker can take it (``iter_part``): a table, or a Parquet URL."""
        return self._tables[i] if self._tables is not None else self.files[i]

    def iter_with_offsets(self, part: int, columns: Sequence[str] | None = None,
                          batch_size: int = 8192) -> Iterator[tuple[int, pa.Table]]:
        """Part ``part`` as (row offset in the part, table) pairs: for stages that decide per
        row number which rows to keep."""
        row = 0
        for t in self.iter_tables(columns, batch_size, part=part):
            yield row, t
            row += t.num_rows

    def part(self, i: int, columns: Sequence[str] | None = None) -> pa.Table:
        if self._tables is not None:
            t = self._tables[i]
            return t.select(list(columns)) if columns else t
        return read_table(self.files[i], columns)

    def count_rows(self) -> int:
        if self._tables is not None:
            return sum(t.num_rows for t in self._tables)
        total = 0
        for f in self.files:
            fs, p = get_fs(f)
            with fs.open(p, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total

    def schema(self) -> pa.Schema | None:
        if self._tables is not None:
            return self._tables[0].schema if self._tables else None
        if not self.files:
            return None
        fs, p = get_fs(self.files[0])
        with fs.open(p, "rb") as fh:
            return pq.ParquetFile(fh).schema_arrow

    def to_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        parts = [self.part(i, columns) for i in range(self.num_parts)]
        if not parts:
            from curate.pipeline.schema import empty_docs
            return empty_docs()
        return pa.concat_tables(parts, promote_options="permissive")


class ShardWriter:
    """Buffers rows and writes ``<dir>/<prefix>-NNNNN.parquet`` shards of ``rows_per_shard`` rows.

    Output is deterministic: the same rows in the same order give the same files.
    """

    def __init__(self, directory: str, prefix: str = "part", rows_per_shard: int = 100_000):
        self.fs, self.dir = get_fs(directory)
        self.prefix = prefix
        self.rows_per_shard = max(1, rows_per_shard)
        self._buf: list[pa.Table] = []
        self._buffered = 0
        self.shards: list[ShardInfo] = []

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if table.num_rows == 0:
            if not self._buf:
                self._buf.append(table)  # keep the schema for an all-empty output
            return
        self._buf.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self._buf, promote_options="permissive")
        head, rest = t.slice(0, n), t.slice(n)
        name = f"{self.prefix}-{len(self.shards):05d}.parquet"
        info = write_parquet_atomic(self.fs, join(self.dir, name), head.combine_chunks())
        info.path = name
        self.shards.append(info)
        self._buf = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows

    def close(self) -> list[ShardInfo]:
        """Write what is buffered. A writer that saw a schema but no rows writes one empty shard,
        so that an empty step still has its schema (``curate inspect`` shows it with 0 rows)."""
        if self._buffered or (not self.shards and self._buf):
            self._flush(self._buffered)
        self._buf = []
        return self.shards


class MemoryWriter:
    """Writer for library calls: collects tables in memory."""

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        self.tables.append(table)

    def close(self) -> list:
        return []

    def table(self) -> pa.Table:
        nonempty = [t for t in self.tables if t.num_rows] or self.tables[:1]
        if not nonempty:
            from curate.pipeline.schema import empty_docs
            return empty_docs()
        return pa.concat_tables(nonempty, promote_options="permissive")


def as_table_iter(data: "pa.Table | pa.RecordBatch | str | Sequence[str]",
                  batch_size: int = 8192) -> Iterator[pa.Table]:
    """Tables from a table, a batch, or Parquet path(s)/folder(s)/glob(s), streamed."""
    if isinstance(data, pa.RecordBatch):
        yield pa.Table.from_batches([data])
    elif isinstance(data, pa.Table):
        yield data
    else:
        yield from Dataset.from_any(data).iter_tables(batch_size=batch_size)
