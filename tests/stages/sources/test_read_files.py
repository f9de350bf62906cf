"""read_files: text, HTML and PDF files from folders/globs; bad inputs counted, never silent."""

import gzip
import json
import os

import pytest

from curate.pipeline.schema import make_id
from curate.pipeline.stage import StageError, get_stage
from curate.stages.sources.read_files import ReadFiles


def make_pdf(lines: list[str]) -> bytes:
    """A minimal valid one-page PDF showing ``lines`` in Helvetica (offsets computed for xref)."""
    content = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({ln}) Tj T*" for ln in lines) + " ET"
    objs = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("Plain text document.\nSecond line.", encoding="utf-8")
    (d / "b.md").write_bytes("# Titre\n\nLe café est très bon à la française, où êtes-vous ?".encode("cp1252"))
    (d / "sub" / "c.html").write_bytes(
        b'<html><head><meta charset="iso-8859-1"><title>t</title></head><body><p>caf\xe9</p></body></html>')
    (d / "sub" / "d.txt.gz").write_bytes(gzip.compress("compressed text".encode()))
    (d / "e.pdf").write_bytes(make_pdf(["Hello PDF world", "second line"]))
    (d / ".hidden.txt").write_text("hidden", encoding="utf-8")
    return d


def test_reads_text_html_pdf_from_folder(corpus):
    st = ReadFiles(paths=str(corpus))
    tasks = st.tasks()
    assert [os.path.basename(t.id) for t in tasks] == ["a.txt", "b.md", "e.pdf", "c.html", "d.txt.gz"]
    assert tasks == st.tasks()  # stable
    t = st()
    assert t.schema.names == ["id", "text", "source", "metadata", "html"]
    rows = {os.path.basename(r["source"]): r for r in t.to_pylist()}
    assert set(rows) == {"a.txt", "b.md", "c.html", "d.txt.gz", "e.pdf"}
    assert rows["a.txt"]["text"] == "Plain text document.\nSecond line." and rows["a.txt"]["html"] is None
    assert "café est très bon" in rows["b.md"]["text"]
    assert rows["c.html"]["text"] == "" and "<p>café</p>" in rows["c.html"]["html"]
    assert json.loads(rows["c.html"]["metadata"])["charset_from"] == "meta"
    assert rows["d.txt.gz"]["text"] == "compressed text"
    assert "Hello PDF world" in rows["e.pdf"]["text"] and "second line" in rows["e.pdf"]["text"]
    meta = json.loads(rows["e.pdf"]["metadata"])
    assert meta["format"] == "pdf" and meta["pages"] == 1
    assert rows["a.txt"]["id"] == make_id(rows["a.txt"]["source"])
    assert st.counters.to_dict() == {"read_files/text": 3, "read_files/html": 1, "read_files/pdf": 1}
    # deterministic
    again = ReadFiles(paths=str(corpus))()
    assert again.equals(t)


def test_glob_and_grouped_tasks(corpus):
    st = ReadFiles(paths=[str(corpus / "**" / "*.txt*")], files_per_task=5)
    tasks = st.tasks()
    assert len(tasks) == 1 and len(tasks[0].payload) == 2
    t = st()
    assert sorted(os.path.basename(s) for s in t.column("source").to_pylist()) == ["a.txt", "d.txt.gz"]


def test_registered():
    assert get_stage("read_files") is ReadFiles


def test_bad_inputs_are_counted_not_lost(tmp_path, caplog):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "ok.txt").write_text("fine", encoding="utf-8")
    (d / "empty.txt").write_bytes(b"   \n")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02\x03 binary")
    (d / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (d / "image.png").write_bytes(b"\x89PNG\r\n")
    (d / "big.txt").write_text("x" * 5000, encoding="utf-8")
    (d / "noext").write_text("what am I", encoding="utf-8")
    (d / "odd16.txt").write_bytes(b"\xff\xfeh\x00i\x00!")  # UTF-16 BOM, odd length: one bad byte
    (d / "latin.txt").write_bytes(b"abc \x81\x8d\x8f\x90\x9d")  # not UTF-8 nor cp1252: detected
    st = ReadFiles(paths=str(d), max_file_bytes=4096)
    t = st()
    c = st.counters.to_dict()
    assert sorted(os.path.basename(s) for s in t.column("source").to_pylist()) == ["latin.txt", "odd16.txt", "ok.txt"]
    assert c["dropped/empty"] == 1
    assert c["dropped/binary"] == 1
    assert c["errors/pdf"] == 1
    assert c["dropped/unsupported/png"] == 1
    assert c["dropped/unsupported/no_suffix"] == 1
    assert c["dropped/too_large"] == 1
    assert c["errors/decode"] == 1  # read with a replacement character, counted
    latin = [r for r in t.to_pylist() if r["source"].endswith("latin.txt")][0]
    assert json.loads(latin["metadata"])["charset_from"] == "detected"
    # every file found is accounted for
    accounted = sum(v for k, v in c.items() if k.startswith(("read_files/", "dropped/", "errors/pdf")))
    assert accounted == 9
    assert any("unknown file type" in r.message for r in caplog.records)


def test_missing_path_is_a_clear_error(tmp_path):
    st = ReadFiles(paths=str(tmp_path / "nope"))
    assert st.check() and "not found" in st.check()[0][1]
    with pytest.raises(StageError, match="not found"):
        st.tasks()


def test_pdf_without_pypdf_is_counted_unsupported(corpus, monkeypatch, caplog):
    import curate.stages.sources.read_files as rf

    monkeypatch.setattr(rf, "_have_pypdf", lambda: False)
    st = ReadFiles(paths=str(corpus / "e.pdf"))
    assert st().num_rows == 0
    assert st.counters.to_dict() == {"dropped/unsupported/pdf": 1}
    assert any("pypdf" in r.message for r in caplog.records)


def test_fsspec_memory_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/curate-test-rf/x.txt", b"in memory")
    fs.pipe("/curate-test-rf/y.html", b"<html><body>hi</body></html>")
    try:
        t = ReadFiles(paths="memory://curate-test-rf")()
        # the path under the input root (the folder read), the same wherever that folder lives
        assert t.column("source").to_pylist() == ["x.txt", "y.html"]
        assert t.column("text").to_pylist() == ["in memory", ""]
    finally:
        fs.rm("/curate-test-rf", recursive=True)
