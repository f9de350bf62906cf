"""Small Arrow table helpers shared by stages."""

from __future__ import annotations

import pyarrow as pa

from curate.pipeline.stage import StageError


def set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """``table`` with column ``name`` replaced by ``values`` (appended when it is new)."""
    if name in table.schema.names:
        return table.set_column(table.schema.names.index(name), name, values)
    return table.append_column(name, values)


def is_text_type(t: pa.DataType, allow_null: bool = True) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (allow_null and pa.types.is_null(t))


def require_column(schema: pa.Schema, column: str, step: str) -> None:
    """A clear StageError unless ``schema`` has ``column``."""
    if column not in schema.names:
        raise StageError(f"stage {step!r} needs column {column!r}; the input has {schema.names}")


def require_text(schema: pa.Schema, column: str, step: str, *, allow_null: bool = True) -> None:
    """A clear StageError unless ``schema`` has a text column ``column`` (an all-null column,
    Arrow type null, counts as text when ``allow_null``)."""
    require_column(schema, column, step)
    t = schema.field(column).type
    if not is_text_type(t, allow_null):
        raise StageError(f"stage {step!r}: column {column!r} has type {t}; expected text")
