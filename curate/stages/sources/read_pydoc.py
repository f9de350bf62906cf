"""``read_pydoc``: real HTML pages rendered offline by ``pydoc`` from Python's standard library.

A source for demos, tests and benchmarks that needs no download: each module's documentation is
rendered as an HTML page (the same pages ``python -m pydoc -w`` writes, with memory addresses in
default values normalised to ``0x0`` so that every run gives the same bytes), and each topic of the
Python language reference that ships with Python (``pydoc_data.topics``: prose such as "The if
statement is used for conditional execution...") as an article page. Some modules are aliases of
others (``os.path`` is ``posixpath``), which gives natural exact and near duplicates.
"""

from __future__ import annotations

import importlib
import pydoc
import re
import warnings
from typing import Iterator

import pyarrow as pa
from pydantic import Field

from curate.pipeline.api import SourceStage, StageConfig, Task, docs_table, make_id, register

DEFAULT_MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "collections.abc", "_collections_abc", "colorsys", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html", "http", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "lzma", "math", "mimetypes", "numbers", "operator",
    "os", "os.path", "posixpath", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "wave", "weakref", "zipfile", "zlib",
]


class ReadPydocConfig(StageConfig):
    modules: list[str] = Field(default_factory=lambda: list(DEFAULT_MODULES),
                               description="standard-library (or any importable) modules to render")
    topics: bool | list[str] = Field(False, description="also the language-reference topics "
                                     "(true: all of them, or a list of topic names)")
    modules_per_task: int = Field(8, ge=1, description="pages per task (parallelism unit)")


@register
class ReadPydoc(SourceStage):
    """HTML documentation pages of Python modules, rendered offline by pydoc (demo/test source)."""

    name = "read_pydoc"
    Config = ReadPydocConfig
    writes = {"id": pa.string(), "text": pa.string(), "source": pa.string(), "metadata": pa.string(),
              "html": pa.string(), "url": pa.string()}

    def tasks(self) -> list[Task]:
        k = self.config.modules_per_task
        items = [("module", m) for m in self.config.modules]
        if self.config.topics:
            from pydoc_data.topics import topics
            names = sorted(topics) if self.config.topics is True else list(self.config.topics)
            items += [("topic", t) for t in names]
        return [Task(id=f"pydoc-{i // k:04d}", payload=tuple(items[i:i + k])) for i in range(0, len(items), k)]

    def read(self, task: Task) -> Iterator[pa.Table]:
        rows = []
        for kind, name in task.payload:
            if kind == "topic":
                page = topic_page(name)
                if page is None:
                    self.error("unknown_topic", doc_id=name)
                    continue
                url = f"pydoc:topic/{name}"
                rows.append((make_id(url), url, page, {"topic": name}))
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mod = importlib.import_module(name)
                    page = normalize_addresses(pydoc.html.page(pydoc.describe(mod), pydoc.html.document(mod, name)))
            except Exception as exc:  # noqa: BLE001 - a module that cannot be imported/rendered
                self.error("render_failed", doc_id=name, detail=f"{type(exc).__name__}: {exc}")
                continue
            url = f"pydoc:{name}"
            rows.append((make_id(url), url, page, {"module": name}))
        if rows:
            ids, urls, pages, metas = zip(*rows)
            yield docs_table(ids, [""] * len(ids), urls, metas, html=list(pages), url=list(urls))


# pydoc prints default values with their repr, and many reprs hold a memory address
# ("<object object at 0x7fc5dcd4c160>") that changes from one process to the next
_ADDRESS = re.compile(r"(\bat(?:\s|&nbsp;)+)0x[0-9a-fA-F]+\b")


def normalize_addresses(page: str) -> str:
    """The page with every ``at 0x...`` memory address replaced by ``at 0x0``: the same module
    renders to the same bytes in every run (the quickstart is byte-reproducible)."""
    return _ADDRESS.sub(r"\g<1>0x0", page)


def topic_page(name: str) -> str | None:
    """A language-reference topic as a small article page (paragraphs, code blocks as <pre>)."""
    import html

    from pydoc_data.topics import topics
    text = topics.get(name)
    if text is None:
        return None
    blocks = []
    for para in text.strip().split("\n\n"):
        if not para.strip():
            continue
        if para.startswith("   "):
            blocks.append(f"<pre>{html.escape(para)}</pre>")
        else:
            blocks.append(f"<p>{html.escape(' '.join(para.split()))}</p>")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{name} | Python "
            f"language reference</title></head><body><nav><a href=\"index.html\">Index</a></nav><main>"
            f"<article><h1>{html.escape(name)}</h1>{''.join(blocks)}</article></main>"
            f"<footer>Rendered offline from pydoc_data.topics</footer></body></html>")
