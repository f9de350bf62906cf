"""The document schema: every corpus curate writes is an Arrow table with at least these columns.

``id``        stable and unique: derived from the source (path/url + position) or given by the input
``text``      the document text (UTF-8)
``source``    where it came from (url or path)
``metadata``  a JSON object as a string (heterogeneous per source; decode with ``metadata_of``)

Stages add typed columns (scores, labels, cluster ids) and never drop one, except what a stage
declares in ``removes()`` (extract_html drops the ``html`` column once the text is extracted).
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any, Iterable, Iterator

import pyarrow as pa

DOC_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("source", pa.string()),
    pa.field("metadata", pa.string()),
])


# documents that still carry their page (text is "" until extract_html fills it)
HTML_DOC_SCHEMA = pa.schema(list(DOC_SCHEMA) + [pa.field("html", pa.string())])
# pages from the web (crawl, WARC): plus where and when they were fetched
WEB_DOC_SCHEMA = pa.schema(list(HTML_DOC_SCHEMA) + [
    pa.field("url", pa.string()),
    pa.field("status", pa.int32()),
    pa.field("fetched_at", pa.timestamp("us", tz="UTC")),
])


def table_from_rows(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    """A table of ``schema`` from row tuples in the schema's column order."""
    cols = list(zip(*rows)) if rows else [[] for _ in schema]
    return pa.table([pa.array(c, f.type) for c, f in zip(cols, schema)], schema=schema)


def batched_tables(rows: Iterable[tuple | None], schema: pa.Schema, batch_size: int) -> Iterator[pa.Table]:
    """Tables of at most ``batch_size`` rows from row tuples (``None`` rows are skipped)."""
    buf: list[tuple] = []
    for row in rows:
        if row is not None:
            buf.append(row)
        if len(buf) >= batch_size:
            yield table_from_rows(buf, schema)
            buf = []
    if buf:
        yield table_from_rows(buf, schema)


def make_id(*parts: Any) -> str:
    """A stable 24-hex-character id from source-derived parts, e.g. ``make_id(path, row)``."""
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def dumps_meta(meta: dict | None) -> str:
    return json.dumps(meta or {}, ensure_ascii=False, sort_keys=True, default=str)


def docs_table(ids: Iterable[str], texts: Iterable[str], sources: Iterable[str],
               metadata: Iterable[dict | str | None] | None = None, **extra: pa.Array | list) -> pa.Table:
    """Build a document table; ``extra`` columns are appended as given."""
    ids, texts, sources = list(ids), list(texts), list(sources)
    metas = [m if isinstance(m, str) else dumps_meta(m)
             for m in (metadata if metadata is not None else [None] * len(ids))]
    cols = {
        "id": pa.array(ids, pa.string()),
        "text": pa.array(texts, pa.string()),
        "source": pa.array(sources, pa.string()),
        "metadata": pa.array(metas, pa.string()),
    }
    cols.update({k: v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v)
                 for k, v in extra.items()})
    return pa.table(cols)


def empty_docs() -> pa.Table:
    return DOC_SCHEMA.empty_table()


def metadata_of(table: pa.Table) -> list[dict]:
    return [json.loads(m) if m else {} for m in table.column("metadata").to_pylist()]


def ensure_doc_columns(table: pa.Table, source: str = "", id_prefix: str = "",
                       offset: int = 0) -> pa.Table:
    """Complete a table read from user data to the document schema (adds missing columns).

    Missing ``id`` values are derived from ``source`` (or ``id_prefix``) and the row position
    (``offset`` + row index within ``table``).
    """
    n = table.num_rows
    names = table.schema.names
    if "text" not in names:
        raise ValueError(f"input {source or id_prefix!r} has no 'text' column (columns: {names})")
    if table.schema.field("text").type != pa.string():
        table = table.set_column(names.index("text"), "text", table.column("text").cast(pa.string()))
    if "id" not in names:
        base = id_prefix or source
        table = table.add_column(0, "id", pa.array([make_id(base, offset + i) for i in range(n)], pa.string()))
    elif table.schema.field("id").type != pa.string():
        i = table.schema.names.index("id")
        table = table.set_column(i, "id", table.column("id").cast(pa.string()))
    if "source" not in table.schema.names:
        table = table.append_column("source", pa.array([source] * n, pa.string()))
    if "metadata" not in table.schema.names:
        table = table.append_column("metadata", pa.array(["{}"] * n, pa.string()))
    elif table.schema.field("metadata").type != pa.string():
        i = table.schema.names.index("metadata")
        vals = [dumps_meta(v) if not isinstance(v, str) else v for v in table.column("metadata").to_pylist()]
        table = table.set_column(i, "metadata", pa.array(vals, pa.string()))
    return table


def seeded_rng(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded by ``parts`` joined with ``|`` (through sha256): the same seed,
    document id and chunk give the same draws in any process, on any sharding."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))
