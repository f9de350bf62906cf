"""``read_pydoc``: real HTML pages rendered offline by ``pydoc`` from Python's standard library.

A source for demos, tests and benchmarks that needs no download: each module's documentation is
rendered as an HTML page (the same pages ``python -m pydoc -w`` writes). Some modules are aliases of
others (``os.path`` is ``posixpath``), which gives natural exact and near duplicates.
"""

from __future__ import annotations

import importlib
import pydoc
import warnings
from typing import Iterator

import pyarrow as pa
from pydantic import Field

from curate.pipeline.schema import docs_table, make_id
from curate.pipeline.stage import SourceStage, StageConfig, Task, register

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
    modules_per_task: int = Field(8, ge=1, description="pages per task (parallelism unit)")


@register
class ReadPydoc(SourceStage):
    """HTML documentation pages of Python modules, rendered offline by pydoc (demo/test source)."""

    name = "read_pydoc"
    Config = ReadPydocConfig
    writes = {"id": pa.string(), "text": pa.string(), "source": pa.string(), "metadata": pa.string(),
              "html": pa.string(), "url": pa.string()}

    def tasks(self) -> list[Task]:
        mods = self.config.modules
        k = self.config.modules_per_task
        return [Task(id=f"pydoc-{i // k:04d}", payload=tuple(mods[i:i + k])) for i in range(0, len(mods), k)]

    def read(self, task: Task) -> Iterator[pa.Table]:
        rows = []
        for name in task.payload:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mod = importlib.import_module(name)
                    page = pydoc.html.page(pydoc.describe(mod), pydoc.html.document(mod, name))
            except Exception as exc:  # noqa: BLE001 - a module that cannot be imported/rendered
                self.error("render_failed", doc_id=name, detail=f"{type(exc).__name__}: {exc}")
                continue
            url = f"pydoc:{name}"
            rows.append((make_id(url), url, page, {"module": name}))
        if rows:
            ids, urls, pages, metas = zip(*rows)
            yield docs_table(ids, [""] * len(ids), urls, metas, html=list(pages), url=list(urls))
