"""read_warc: WARC/WARC.gz/WET files written here with warcio, including corrupt and cut files."""

import gzip
import io
import json

import pyarrow as pa
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from curate.ingest.charset import decode_bytes, normalize_charset
from curate.pipeline.schema import make_id
from curate.pipeline.stage import StageError, get_stage
from curate.stages.sources.read_warc import ReadWarc


def response(w, url, body: bytes, ctype="text/html; charset=utf-8", status="200 OK", extra=()):
    hh = StatusAndHeaders(status, [("Content-Type", ctype), *extra], protocol="HTTP/1.1")
    return w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=hh)


def write_warc(path, gz=True, n=6):
    """n HTML pages plus records that must be skipped; returns the urls of the pages kept."""
    kept = []
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=gz)
        w.write_record(w.create_warcinfo_record("test.warc", {"software": "test"}))
        for i in range(n):
            url = f"http://example.com/page{i}"
            w.write_record(response(w, url, f"<html><body><p>page {i} – ünïcode</p></body></html>".encode()))
            kept.append(url)
        req = w.create_warc_record("http://example.com/page0", "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n"))
        w.write_record(req)
        w.write_record(response(w, "http://example.com/latin", "<p>café</p>".encode("latin-1"),
                                ctype="text/html; charset=ISO-8859-1"))
        kept.append("http://example.com/latin")
        w.write_record(response(w, "http://example.com/meta", b'<meta charset="windows-1251"><p>\xcf\xf0\xe8\xe2\xe5\xf2</p>',
                                ctype="text/html"))
        kept.append("http://example.com/meta")
        w.write_record(response(w, "http://example.com/gz", gzip.compress(b"<p>gzipped body</p>"),
                                extra=[("Content-Encoding", "gzip")]))
        kept.append("http://example.com/gz")
        w.write_record(response(w, "http://example.com/missing", b"not found", status="404 Not Found"))
        w.write_record(response(w, "http://example.com/img.png", b"\x89PNG....", ctype="image/png"))
    return kept


def test_reads_warc_gz_responses(tmp_path):
    p = tmp_path / "crawl.warc.gz"
    kept = write_warc(p)
    st = ReadWarc(paths=str(p))
    assert [t.id for t in st.tasks()] == [str(p)]
    t = st()
    assert t.schema.names == ["id", "text", "source", "metadata", "html", "url", "status", "fetched_at"]
    assert t.schema.field("status").type == pa.int32()
    assert t.column("url").to_pylist() == kept
    rows = {r["url"]: r for r in t.to_pylist()}
    assert "page 3 – ünïcode" in rows["http://example.com/page3"]["html"]
    assert rows["http://example.com/latin"]["html"] == "<p>café</p>"
    assert "Привет" in rows["http://example.com/meta"]["html"]
    assert rows["http://example.com/gz"]["html"] == "<p>gzipped body</p>"
    assert all(r["text"] == "" and r["status"] == 200 and r["fetched_at"] is not None for r in rows.values())
    meta = json.loads(rows["http://example.com/meta"]["metadata"])
    assert meta["charset"] == "cp1251" and meta["charset_from"] == "meta"
    assert meta["warc_record_id"].startswith("<urn:uuid:") and meta["offset"] > 0
    assert rows["http://example.com/meta"]["id"] == make_id(meta["warc_record_id"])
    c = st.counters.to_dict()
    assert c["read_warc/records/response"] == 11 and c["read_warc/records/request"] == 1
    assert c["read_warc/records/warcinfo"] == 1
    assert c["dropped/http_status"] == 1 and c["dropped/content_type"] == 1
    assert not any(k.startswith("errors/") for k in c)
    assert ReadWarc(paths=str(p))().equals(t)  # deterministic


def test_plain_warc_and_folder(tmp_path):
    write_warc(tmp_path / "a.warc", gz=False, n=2)
    write_warc(tmp_path / "b.warc.gz", n=3)
    (tmp_path / "notes.txt").write_text("not a warc")
    st = ReadWarc(paths=str(tmp_path))
    assert [t.id.rsplit("/", 1)[1] for t in st.tasks()] == ["a.warc", "b.warc.gz"]
    t = st()
    assert t.num_rows == (2 + 3) + 2 * 3
    assert len(set(t.column("id").to_pylist())) == t.num_rows


def test_wet_conversion_records(tmp_path):
    p = tmp_path / "x.warc.wet.gz"
    with open(p, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for i in range(3):
            rec = w.create_warc_record(f"http://example.com/{i}", "conversion",
                                       payload=io.BytesIO(f"Plain text {i} ünïcode".encode()),
                                       warc_headers_dict={"Content-Type": "text/plain"})
            w.write_record(rec)
    t = ReadWarc(paths=str(p))()
    assert t.column("text").to_pylist() == [f"Plain text {i} ünïcode" for i in range(3)]
    assert t.column("html").null_count == 3 and t.column("status").null_count == 3
    assert json.loads(t.column("metadata")[0].as_py())["warc_type"] == "conversion"


def _members(data: bytes) -> list[int]:
    out, i = [], data.find(b"\x1f\x8b\x08")
    while i >= 0:
        out.append(i)
        i = data.find(b"\x1f\x8b\x08", i + 1)
    return out


def test_corrupt_gzip_member_is_counted_and_skipped(tmp_path):
    p = tmp_path / "c.warc.gz"
    kept = write_warc(p)
    data = bytearray(p.read_bytes())
    offs = _members(bytes(data))
    # member 0 = warcinfo, 1..6 = pages: damage the compressed bytes of page2 (member 3)
    mid = (offs[3] + offs[4]) // 2
    for k in range(mid, mid + 16):
        data[k] ^= 0xFF
    p.write_bytes(bytes(data))
    st = ReadWarc(paths=str(p))
    t = st()
    assert t.column("url").to_pylist() == [u for u in kept if u != "http://example.com/page2"]
    c = st.counters.to_dict()
    assert c["errors/corrupt_record"] == 1 and c["read_warc/skipped_bytes"] > 0
    assert "errors/truncated" not in c


def test_truncated_gz_keeps_everything_before(tmp_path):
    p = tmp_path / "t.warc.gz"
    write_warc(p, n=4)
    data = p.read_bytes()
    offs = _members(data)
    cut = offs[3] + (offs[4] - offs[3]) // 2  # cut inside page2's gzip member
    p.write_bytes(data[:cut])
    st = ReadWarc(paths=str(p))
    t = st()
    assert t.column("url").to_pylist() == ["http://example.com/page0", "http://example.com/page1"]
    c = st.counters.to_dict()
    assert c["errors/truncated"] == 1
    assert c["read_warc/skipped_bytes"] == cut - offs[3]


def test_plain_warc_garbage_and_cut_record(tmp_path):
    p = tmp_path / "g.warc"
    kept = write_warc(p, gz=False, n=4)
    raw = p.read_bytes()
    starts = [i + 1 for i in range(len(raw)) if raw.startswith(b"\nWARC/1.", i)]
    # garbage instead of page1's header line (record 2), and the last record cut short
    i = starts[1]
    raw = raw[:i] + b"GARBAGE LINE\r\n" + raw[i + len(b"WARC/1.0\r\n"):]
    raw = raw[:-40]
    p.write_bytes(raw)
    st = ReadWarc(paths=str(p), content_types=["text/html", "image/png"])
    t = st()
    urls = t.column("url").to_pylist()
    assert "http://example.com/page1" not in urls
    assert urls == [u for u in kept if u != "http://example.com/page1"]  # png record was cut: lost, counted
    c = st.counters.to_dict()
    assert c["errors/corrupt_record"] == 1
    assert c["errors/truncated"] == 1


def test_bad_input_errors(tmp_path):
    with pytest.raises(StageError, match="not found"):
        ReadWarc(paths=str(tmp_path / "missing.warc.gz")).tasks()
    assert ReadWarc(paths=str(tmp_path / "missing.warc.gz")).check()
    junk = tmp_path / "junk.warc.gz"
    junk.write_bytes(b"this is not a warc file at all\n" * 10)
    st = ReadWarc(paths=str(junk))
    t = st()
    assert t.num_rows == 0
    assert st.counters.to_dict()["errors/not_warc"] == 1  # nothing readable: counted, not silent
    assert get_stage("read_warc") is ReadWarc


def test_charset_helpers():
    assert normalize_charset("ISO-8859-1") == "cp1252"
    assert normalize_charset("no-such-charset") is None
    d = decode_bytes("caf\xe9".encode("latin-1"), "text/html; charset=utf-8")  # wrong header
    assert d.text == "café" and not d.replaced
    d = decode_bytes(b"\xef\xbb\xbfhi", "text/html; charset=latin-1")  # BOM wins
    assert (d.text, d.how) == ("hi", "bom")
    d = decode_bytes(b"\xff\xfeh\x00i\x00!", None)
    assert d.replaced and d.text.startswith("hi")


def test_check_digests(tmp_path):
    p = tmp_path / "d.warc"
    write_warc(p, gz=False, n=3)
    raw = p.read_bytes()
    i = raw.index(b"page 1")
    p.write_bytes(raw[:i] + b"PAGE 1" + raw[i + 6:])  # same length: only the digest can tell
    assert ReadWarc(paths=str(p))().num_rows == 3 + 3
    st = ReadWarc(paths=str(p), check_digests=True)
    t = st()
    assert "http://example.com/page1" not in t.column("url").to_pylist() and t.num_rows == 5
    assert st.counters.to_dict()["errors/digest_mismatch"] == 1


def test_declared_utf8_with_stray_bytes_stays_utf8():
    from curate.ingest.charset import decode_bytes
    page = "<html><head><meta charset='utf-8'></head><body>Café crème, naïve résumé.</body></html>"
    data = page.encode("utf-8").replace(b"body>C", b"body>\xff\xfeC")
    d = decode_bytes(data, None)
    assert d.charset == "utf-8" and d.replaced
    assert "Café crème, naïve résumé." in d.text
    # a page mislabelled as UTF-8 that is really windows-1252 throughout is still re-guessed
    legacy = ("<html><head><meta charset='utf-8'></head><body>" + "Café à l'été, déjà vu. " * 20
              + "</body></html>").encode("cp1252")
    d2 = decode_bytes(legacy, None)
    assert d2.charset != "utf-8" and "\ufffd" not in d2.text and "Caf" in d2.text
