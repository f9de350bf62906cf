"""Readable descriptions of stage options for ``curate stages NAME``: allowed values of a Literal or
an Enum, optional and list types in words, and nested option groups with their own keys."""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

from pydantic import BaseModel

_NONE = type(None)


def type_text(ann: Any, inner: bool = False) -> str:
    """``Literal['first', 'longest']`` -> ``one of 'first', 'longest'``; ``str | None`` -> ``str or
    null``; ``list[str]`` -> ``list of str``; an Enum -> its values; a model -> its class name."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    values = None
    if origin is typing.Literal:
        values = [repr(a.value if isinstance(a, enum.Enum) else a) for a in args]
    elif isinstance(ann, type) and issubclass(ann, enum.Enum):
        values = [repr(m.value) for m in ann]
    if values is not None:
        return f"({' | '.join(values)})" if inner else "one of " + ", ".join(values)
    if origin in (typing.Union, types.UnionType):
        parts = [type_text(a, inner) for a in args if a is not _NONE]
        text = " or ".join(f"({p})" if p.startswith("one of") and len(parts) > 1 else p for p in parts)
        return text + (" or null" if _NONE in args else "")
    if origin in (list, tuple, set, frozenset):
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            return "(" + ", ".join(type_text(a, True) for a in args) + ")"
        items = [a for a in args if a is not Ellipsis]
        return f"list of {type_text(items[0], True)}" if items else "list"
    if origin is dict:
        return f"mapping of {type_text(args[0], True)} to {type_text(args[1], True)}" if args else "mapping"
    if ann is Any:
        return "any"
    name = getattr(ann, "__name__", None)
    return name if name else str(ann).replace("typing.", "")


def _nested_models(ann: Any) -> list[type[BaseModel]]:
    return [c for c in (ann, *typing.get_args(ann)) if isinstance(c, type) and issubclass(c, BaseModel)]


def describe_options(model: type[BaseModel], indent: str = "  ") -> list[str]:
    """One line per option (``key: type (default ...) — description``); an option that is itself a
    group of options (a nested model, or one of several) lists their keys below it, indented."""
    lines = []
    for key, f in model.model_fields.items():
        nested = _nested_models(f.annotation)
        if f.is_required():
            default = "required"
        elif nested:
            value = f.get_default(call_default_factory=True)
            default = ("defaults below" if len(nested) == 1
                       else f"default {type(value).__name__}" if isinstance(value, BaseModel) else f"default {value!r}")
        else:
            default = f"default {f.get_default(call_default_factory=True)!r}"
        if len(nested) == 1:
            kind = f"options of {nested[0].__name__}"
        elif nested:
            kind = "options of one of " + ", ".join(m.__name__ for m in nested)
        else:
            kind = type_text(f.annotation)
        desc = f" — {f.description}" if f.description else ""
        lines.append(f"{indent}{key}: {kind} ({default}){desc}")
        for m in nested:
            if len(nested) > 1:
                lines.append(f"{indent}    {m.__name__}:")
            lines.extend(describe_options(m, indent + ("    " if len(nested) == 1 else "        ")))
    return lines
