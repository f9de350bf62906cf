"""``read_warc``: documents from WARC / WARC.gz / WET files (local or fsspec), read with warcio.

One task per file. By default ``response`` records (the HTML pages of a web crawl) and
``conversion`` records (the plain text of a WET file) are read; other record types (request,
metadata, warcinfo...) are counted under ``read_warc/records/<type>`` and skipped.

Response records: the HTTP headers are parsed (status, Content-Type), the payload is de-chunked and
decompressed by warcio, and decoded with the detected charset (HTTP header, ``<meta>``, UTF-8,
charset_normalizer; see ``curate.ingest.charset``). HTML payloads give an ``html`` row (``text`` is
"" until ``extract_html`` fills it); other accepted types (e.g. ``text/plain`` when listed in
``content_types``) give a ``text`` row. WET conversion records give ``text`` rows.

Bad input never stops a file: a record that cannot be parsed or decompressed is counted as
``errors/corrupt_record`` and the reader re-synchronises on the next record (the next gzip member
of a .warc.gz, the next ``WARC/1.x`` line of a plain WARC); a record or gzip member cut short by the
end of the file is counted as ``errors/truncated``; a file with no readable record at all as
``errors/not_warc``. Skipped bytes are counted in ``read_warc/skipped_bytes``.

Rows: ``id`` (make_id of the WARC-Record-ID; of file (under the input root)+offset when absent), ``text``, ``source``
(the target URI), ``metadata`` (JSON: warc_record_id, warc_date, warc_type, warc_file, offset,
status, content_type, charset...), ``html`` (null for text rows), ``url``, ``status`` (int32, null
for WET), ``fetched_at`` (WARC-Date, timestamp UTC).
"""

from __future__ import annotations

import logging
import posixpath
from datetime import datetime, timezone
from typing import Any, Iterator

import pyarrow as pa
from pydantic import Field

from curate.ingest.charset import decode_bytes
from curate.pipeline.api import (WEB_DOC_SCHEMA, FileSource, StageConfig, Task, batched_tables, dumps_meta, get_fs,
                                 make_id, register)

log = logging.getLogger("curate")

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".warc.wet", ".warc.wet.gz", ".arc", ".arc.gz")
HTML_TYPES = ("text/html", "application/xhtml+xml")
SCAN_CHUNK = 1 << 20

OUTPUT_SCHEMA = WEB_DOC_SCHEMA


class ReadWarcConfig(StageConfig):
    paths: list[str] | str = Field(description="WARC/WET files, folders (searched recursively for "
                                               ".warc[.gz]/.wet[.gz]/.arc[.gz]) or globs; local or fsspec URLs")
    record_types: list[str] = Field(default_factory=lambda: ["response", "conversion"],
                                    description="WARC record types read (others are counted and skipped); "
                                                "'resource' records are read like responses without HTTP headers")
    content_types: list[str] = Field(default_factory=lambda: list(HTML_TYPES),
                                     description="MIME types of response payloads kept (HTML ones give html "
                                                 "rows, others text rows); others are dropped/content_type")
    statuses: list[int] = Field(default_factory=lambda: [200], description="HTTP statuses kept")
    max_record_bytes: int = Field(10_000_000, ge=1, description="larger payloads are dropped/too_large")
    check_digests: bool = Field(False, description="verify WARC block/payload digests; records that do not "
                                                   "match are counted as errors/digest_mismatch and skipped")
    batch_size: int = Field(1000, ge=1, description="rows per emitted table")


class _Truncated(Exception):
    pass


def _warc_date(s: str | None) -> datetime | None:
    if not s:
        return None
    try:
        d = datetime.fromisoformat(s.strip().replace("Z", "+00:00"))
    except ValueError:
        try:  # ARC-style 14-digit dates
            d = datetime.strptime(s.strip()[:14], "%Y%m%d%H%M%S")
        except ValueError:
            return None
    return d.replace(tzinfo=timezone.utc) if d.tzinfo is None else d.astimezone(timezone.utc)


@register
class ReadWarc(FileSource):
    """Read WARC/WET files (warcio): HTML responses or WET text; corrupt records counted and skipped."""

    name = "read_warc"
    Config = ReadWarcConfig
    suffixes = WARC_SUFFIXES
    writes = {f.name: f.type for f in OUTPUT_SCHEMA}
    output_schema = OUTPUT_SCHEMA

    # -- reading -----------------------------------------------------------------------------------
    def read(self, task: Task) -> Iterator[pa.Table]:
        return batched_tables(self._rows(task.payload), OUTPUT_SCHEMA, self.config.batch_size)

    def _rows(self, path: str) -> Iterator[tuple]:
        from warcio.archiveiterator import ArchiveIterator

        fs, p = get_fs(path)
        size = fs.size(p)
        name = posixpath.basename(p)
        with fs.open(p, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            arc = name.lower().endswith((".arc", ".arc.gz"))  # ARC parsing accepts any text line otherwise
            pos: int | None = 0
            seen: set[int] = set()
            while pos is not None and pos < size:
                f.seek(pos)
                it = ArchiveIterator(f, arc2warc=arc, check_digests="raise" if self.config.check_digests else False)
                failed_at: int | None = None
                exc: BaseException | None = None
                got = 0
                try:
                    for rec in it:
                        start = it.offset
                        got += 1
                        try:
                            if not arc and not str(rec.format).startswith("warc"):
                                raise ValueError(f"not a WARC record (parsed as {rec.format})")
                            row = self._record(path, name, start, rec)
                        except Exception as e:  # noqa: BLE001 - a bad record is counted and skipped
                            if "digest" in str(e).lower() and self.config.check_digests:
                                self.error("digest_mismatch", doc_id=f"{path}@{start}", detail=str(e)[:200])
                                seen.add(start)
                                continue
                            failed_at, exc = start, e
                            break
                        if start in seen:
                            continue
                        seen.add(start)
                        if row is not None:
                            yield row
                    else:  # the iterator stopped: at the end of the file, or silently at bad data
                        end = it.offset if got else pos
                        if end < size and not self._blank_tail(f, end, size):
                            failed_at, exc = end, EOFError("unreadable data (cut gzip member or record?)")
                except Exception as e:  # noqa: BLE001 - the iterator could not parse the next record
                    failed_at, exc = max(it.offset, pos), e
                if failed_at is None:
                    break
                nxt = self._resync(f, failed_at + 1, size, gz)
                if failed_at == 0 and not seen and nxt is None:
                    reason = "not_warc"  # nothing in the file could be read as WARC
                elif isinstance(exc, _Truncated) or nxt is None:
                    reason = "truncated"
                else:
                    reason = "corrupt_record"
                self.error(reason, doc_id=f"{path}@{failed_at}", detail=f"{type(exc).__name__}: {str(exc)[:200]}")
                self.count("read_warc/skipped_bytes", (nxt if nxt is not None else size) - failed_at)
                pos = nxt

    @staticmethod
    def _blank_tail(f: Any, start: int, size: int) -> bool:
        if size - start > 64:
            return False
        f.seek(start)
        return not f.read().strip()

    @staticmethod
    def _resync(f: Any, start: int, size: int, gz: bool) -> int | None:
        """Offset of the next plausible record start at or after ``start`` (None: none left):
        a gzip member header in a .gz file, a ``WARC/`` line start in a plain one."""
        marker, shift = (b"\x1f\x8b\x08", 0) if gz else (b"\nWARC/", 1)
        pos = max(start - shift, 0)
        while pos < size:
            f.seek(pos)
            chunk = f.read(SCAN_CHUNK + len(marker))
            i = chunk.find(marker)
            if i >= 0:
                return pos + i + shift
            if len(chunk) <= len(marker):
                return None
            pos += SCAN_CHUNK
        return None

    def _record(self, path: str, name: str, offset: int, rec: Any) -> tuple | None:
        """One output row for a record, or None when it is skipped (counted)."""
        cfg = self.config
        rtype = rec.rec_type or ""
        if rtype not in cfg.record_types:
            self.count(f"read_warc/records/{rtype or 'unknown'}")
            return None
        h = rec.rec_headers
        url = h.get_header("WARC-Target-URI") or ""
        record_id = h.get_header("WARC-Record-ID")
        date = h.get_header("WARC-Date")
        status = None
        ctype = ""
        if rtype == "response" and rec.http_headers is not None:
            try:
                status = int(rec.http_headers.get_statuscode())
            except (TypeError, ValueError):
                status = None
            ctype = rec.http_headers.get_header("Content-Type") or ""
        elif rtype in ("conversion", "resource"):
            ctype = h.get_header("Content-Type") or ("text/plain" if rtype == "conversion" else "")
        stream = rec.content_stream()
        body = stream.read(cfg.max_record_bytes + 1)
        if len(body) > cfg.max_record_bytes:
            self.drop("too_large")
            return None
        # a record cut short by the end of the file: warcio does not say so, the limit reader does
        while rec.raw_stream.read(1 << 16):
            pass
        if getattr(rec.raw_stream, "limit", 0) > 0:
            raise _Truncated(f"record ends {rec.raw_stream.limit} bytes early")
        self.count(f"read_warc/records/{rtype}")
        mime = ctype.split(";")[0].strip().lower()
        meta: dict[str, Any] = {"warc_record_id": record_id, "warc_date": date, "warc_type": rtype,
                                "warc_file": name, "offset": offset}
        if rtype == "response":
            if status not in cfg.statuses:
                self.drop("http_status")
                return None
            if mime not in cfg.content_types:
                self.drop("content_type")
                return None
            meta.update(status=status, content_type=ctype)
        elif rtype == "resource" and mime and mime not in cfg.content_types:
            self.drop("content_type")
            return None
        is_html = mime in HTML_TYPES
        dec = decode_bytes(body, ctype, html=is_html)
        if dec.replaced:
            self.error("decode", doc_id=url or f"{path}@{offset}", detail=f"bytes not valid {dec.charset}; replaced")
        meta.update(charset=dec.charset, charset_from=dec.how)
        if rtype == "conversion":
            meta["refers_to"] = h.get_header("WARC-Refers-To")
        rel = self.relpath(path)   # the file under the input root: the same rows anywhere
        doc_id = make_id(record_id) if record_id else make_id(rel, offset)
        html, text = (dec.text, "") if is_html else (None, dec.text)
        return (doc_id, text, url or f"{rel}@{offset}", dumps_meta(meta), html, url or None, status,
                _warc_date(date))





__all__ = ["ReadWarc", "ReadWarcConfig"]
