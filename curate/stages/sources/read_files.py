"""``read_files``: documents from local or fsspec files: plain text, HTML and PDF.

``paths`` are files, folders (searched recursively; hidden ``.x``/``_x`` entries skipped) or globs.
The format is chosen by the file suffix (after a compression suffix ``.gz``/``.bz2``/``.xz``/
``.zst``, which is decompressed transparently):

- text (``text_extensions``: .txt, .md, .rst...) -> ``text`` rows, decoded with the detected
  charset (BOM, UTF-8, charset_normalizer, windows-1252),
- HTML (``html_extensions``) -> ``html`` rows (``text`` is "" until ``extract_html`` fills it),
  charset from ``<meta charset>`` or detection,
- PDF -> ``text`` rows with the text of all pages (pypdf; pages separated by a blank line).
  Without pypdf installed, PDFs are counted as ``dropped/unsupported/pdf`` with a clear message.

Every other file found is counted as ``dropped/unsupported/<suffix>`` (and logged), never silently
ignored. Empty files (``dropped/empty``), files larger than ``max_file_bytes``
(``dropped/too_large``), binary data in a text file (``dropped/binary``), unreadable files and
broken PDFs (``errors/read``, ``errors/pdf``) are counted and skipped; the other files are read.

Rows: ``id`` (make_id(path)), ``text``, ``source`` (the path under the input root: the folder
or glob base of ``paths``, so the same files give the same rows anywhere), ``metadata`` (JSON: path,
format, bytes, mtime, charset, pages...), ``html`` (null for text/PDF rows).
Tasks: one per file (``files_per_task`` groups several small files into one task and shard;
``bytes_per_task`` groups consecutive files by size instead, so 530 small pages do not become 530
one-row shards).
"""

from __future__ import annotations

import io
import logging
import posixpath
from datetime import datetime, timezone
from typing import Any, Iterator

import pyarrow as pa
from pydantic import Field, field_validator

from curate.ingest.charset import decode_bytes, looks_binary
from curate.pipeline.api import (HTML_DOC_SCHEMA, FileSource, StageConfig, Task, batched_tables, dumps_meta, get_fs,
                                 make_id, register)

log = logging.getLogger("curate")

COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}

OUTPUT_SCHEMA = HTML_DOC_SCHEMA


def _norm_exts(v: list[str]) -> list[str]:
    return [e.lower() if e.startswith(".") else "." + e.lower() for e in v]


class ReadFilesConfig(StageConfig):
    paths: list[str] | str = Field(description="files, folders (recursive) or globs; local or fsspec URLs")
    text_extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc"],
        description="suffixes read as plain text")
    html_extensions: list[str] = Field(default_factory=lambda: [".html", ".htm", ".xhtml", ".shtml"],
                                       description="suffixes read as HTML (html column)")
    pdf_extensions: list[str] = Field(default_factory=lambda: [".pdf"], description="suffixes read as PDF (pypdf)")
    max_file_bytes: int = Field(50_000_000, ge=1, description="larger files are dropped/too_large")
    files_per_task: int = Field(1, ge=1, description="files per task (and output shard); raise it for many "
                                                     "small files")
    bytes_per_task: int | None = Field(None, ge=1, description="instead of files_per_task: group "
                                       "consecutive files into tasks (and shards) of about this many "
                                       "bytes (e.g. 4000000 for many small HTML pages)")
    batch_size: int = Field(256, ge=1, description="rows per emitted table")

    @field_validator("text_extensions", "html_extensions", "pdf_extensions")
    @classmethod
    def _exts(cls, v: list[str]) -> list[str]:
        return _norm_exts(v)


def _suffixes(path: str) -> tuple[str, str | None]:
    """(format suffix, compression) of a path, e.g. ('.txt', 'gzip') for 'a.txt.gz'."""
    name = posixpath.basename(path).lower()
    stem, ext = posixpath.splitext(name)
    comp = COMPRESSION_SUFFIXES.get(ext)
    if comp:
        ext = posixpath.splitext(stem)[1]
    return ext, comp


@register
class ReadFiles(FileSource):
    """Read local/fsspec text, HTML and PDF files (one document per file); other files counted."""

    name = "read_files"
    Config = ReadFilesConfig
    writes = {f.name: f.type for f in OUTPUT_SCHEMA}
    output_schema = OUTPUT_SCHEMA

    def tasks(self) -> list[Task]:
        files = self.files_or_error()
        n = self.config.files_per_task
        if self.config.bytes_per_task is not None:
            groups = self._by_bytes(files, self.config.bytes_per_task)
        else:
            groups = [tuple(files[i:i + n]) for i in range(0, len(files), n)]
        return [Task(id=g[0] if len(g) == 1 else f"{g[0]}+{len(g) - 1}", payload=g) for g in groups]

    @staticmethod
    def _by_bytes(files: list[str], limit: int) -> list[tuple[str, ...]]:
        """Consecutive files in groups of about ``limit`` bytes (a group closes once it reaches
        ``limit``; a larger file is a group of its own). Sizes come from the file system listing;
        an unknown size counts as ``limit`` (its own task)."""
        groups: list[tuple[str, ...]] = []
        cur: list[str] = []
        total = 0
        for f in files:
            fs, p = get_fs(f)
            try:
                size = fs.size(p)
            except OSError:
                size = None
            size = limit if size is None else size
            if cur and total + size > limit:
                groups.append(tuple(cur))
                cur, total = [], 0
            cur.append(f)
            total += size
        if cur:
            groups.append(tuple(cur))
        return groups

    def read(self, task: Task) -> Iterator[pa.Table]:
        files = [task.payload] if isinstance(task.payload, str) else list(task.payload)
        return batched_tables((self._read_file(p) for p in files), OUTPUT_SCHEMA, self.config.batch_size)

    def _kind(self, ext: str) -> str | None:
        cfg = self.config
        if ext in cfg.text_extensions:
            return "text"
        if ext in cfg.html_extensions:
            return "html"
        if ext in cfg.pdf_extensions:
            return "pdf"
        return None

    def _read_file(self, path: str) -> tuple | None:
        cfg = self.config
        ext, comp = _suffixes(path)
        kind = self._kind(ext)
        if kind is None:
            self._unsupported(path, ext.lstrip(".") or "no_suffix", "unknown file type")
            return None
        if kind == "pdf" and not _have_pypdf():
            self._unsupported(path, "pdf", "PDF support needs the 'pypdf' package (pip install pypdf)")
            return None
        fs, p = get_fs(path)
        try:
            info = fs.info(p)
            size = info.get("size")
            if size is not None and comp is None and size > cfg.max_file_bytes:
                self.drop("too_large")
                log.info("%s: %s is larger than max_file_bytes (%d bytes); skipped", self.step_name, path, size)
                return None
            with fs.open(p, "rb", compression=comp) as f:
                data = f.read(cfg.max_file_bytes + 1)
        except Exception as exc:  # noqa: BLE001 - unreadable file: counted, the others are read
            self.error("read", doc_id=path, detail=f"{type(exc).__name__}: {str(exc)[:200]}")
            return None
        if len(data) > cfg.max_file_bytes:
            self.drop("too_large")
            return None
        if not data.strip():
            self.drop("empty")
            return None
        rel = self.relpath(path)   # ids, source and metadata from the path under the input root
        meta: dict[str, Any] = {"path": rel, "format": kind, "bytes": len(data)}
        mtime = _mtime(info)
        if mtime:
            meta["mtime"] = mtime
        html = None
        if kind == "pdf":
            text = self._pdf_text(path, data, meta)
            if text is None:
                return None
        else:
            if looks_binary(data):
                self.drop("binary")
                log.info("%s: %s looks binary (NUL bytes); skipped", self.step_name, path)
                return None
            dec = decode_bytes(data, None, html=kind == "html")
            if dec.replaced:
                self.error("decode", doc_id=path, detail=f"bytes not valid {dec.charset}; replaced")
            meta.update(charset=dec.charset, charset_from=dec.how)
            text, html = ("", dec.text) if kind == "html" else (dec.text, None)
        self.count(f"read_files/{kind}")
        return (make_id(rel), text, rel, dumps_meta(meta), html)

    def _unsupported(self, path: str, what: str, why: str) -> None:
        key = f"unsupported/{what}"
        self.drop(key)
        if self.counters.data[f"dropped/{key}"] <= 3:
            log.warning("%s: %s: %s; skipped (counted as dropped/%s)", self.step_name, path, why, key)

    def _pdf_text(self, path: str, data: bytes, meta: dict) -> str | None:
        import pypdf  # noqa: F401  (availability check)

        try:
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted:
                try:
                    ok = reader.decrypt("")
                except Exception:  # noqa: BLE001
                    ok = 0
                if not ok:
                    self.error("pdf_encrypted", doc_id=path, detail="encrypted PDF (no empty password)")
                    return None
            pages = []
            bad_pages = 0
            for page in reader.pages:
                try:
                    pages.append((page.extract_text() or "").strip())
                except Exception:  # noqa: BLE001 - one bad page does not lose the document
                    bad_pages += 1
                    pages.append("")
        except Exception as exc:  # noqa: BLE001 - a broken PDF is counted and skipped
            self.error("pdf", doc_id=path, detail=f"{type(exc).__name__}: {str(exc)[:200]}")
            return None
        if bad_pages:
            self.error("pdf_page", n=bad_pages, doc_id=path, detail=f"{bad_pages} page(s) without text")
        meta["pages"] = len(pages)
        text = "\n\n".join(p for p in pages if p)
        if not text.strip():
            self.drop("pdf_no_text")  # scanned PDFs need OCR, which this reader does not do
            return None
        return text


def _have_pypdf() -> bool:
    try:
        import pypdf  # noqa: F401
    except ImportError:
        return False
    return True


def _mtime(info: dict) -> str | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return datetime.fromtimestamp(v, timezone.utc).isoformat()
        if isinstance(v, datetime):
            return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat()
        return str(v)
    return None





__all__ = ["ReadFiles", "ReadFilesConfig"]
