"""exact_dedup: global, first occurrence kept, across shards, bounded buckets, parallel hashing."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.pipeline.context import RunContext
from curate.pipeline.io import Dataset, MemoryWriter
from curate.pipeline.stage import StageError
from curate.stages.dedup.exact_dedup import ExactDedup
from curate.stages.clean.extract_html import ExtractHtml
from curate.text.normalize import normalize_for_hash

from pages import article_pages, html_table, pydoc_pages

# os.path is posixpath and collections.abc re-exports _collections_abc: same extracted text
MODULES = ["os.path", "json", "collections.abc", "bisect", "posixpath", "heapq", "_collections_abc"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three Parquet shards of extracted real pages with exact duplicates across shards."""
    d = tmp_path_factory.mktemp("dedup")
    t = ExtractHtml()(html_table(pydoc_pages(MODULES) + article_pages(3)))
    texts = t.column("text").to_pylist()
    # a copy of the first article with other whitespace/case, another URL
    extra = t.slice(7, 1)
    extra = extra.set_column(extra.schema.names.index("text"), "text",
                             pa.array(["  " + texts[7].upper().replace("\n", "\n\n ") + " \n"]))
    extra = extra.set_column(extra.schema.names.index("url"), "url", pa.array(["https://mirror.example.org/x"]))
    extra = extra.set_column(extra.schema.names.index("id"), "id", pa.array(["mirror"]))
    # the same URL fetched twice, with changed content (e.g. two crawls)
    again = t.slice(8, 1)
    again = again.set_column(again.schema.names.index("text"), "text", pa.array(["updated page text"]))
    again = again.set_column(again.schema.names.index("id"), "id", pa.array(["refetch"]))
    full = pa.concat_tables([t, extra, again])
    paths = []
    for i, (a, b) in enumerate([(0, 4), (4, 8), (8, full.num_rows)]):
        p = os.path.join(d, f"part-{i}.parquet")
        pq.write_table(full.slice(a, b - a), p)
        paths.append(p)
    return str(d), full


def _expected(full: pa.Table) -> list[str]:
    from curate.stages.dedup.exact_dedup import _norm_url

    seen_t, seen_u, keep = set(), set(), []
    for doc_id, text, url in zip(*(full.column(c).to_pylist() for c in ("id", "text", "url"))):
        u = _norm_url(url)
        if u and u in seen_u:
            continue
        if u:
            seen_u.add(u)
        k = normalize_for_hash(text or "")
        if k and k in seen_t:
            continue
        if k:
            seen_t.add(k)
        keep.append(doc_id)
    return keep


def test_global_first_occurrence_across_shards(shards):
    d, full = shards
    st = ExactDedup(save_dropped=True)
    out = st(d)
    ids = full.column("id").to_pylist()
    assert out.column("id").to_pylist() == _expected(full)
    c = st.counters.to_dict()
    assert c["dropped/duplicate_text"] == 3  # posixpath, _collections_abc, mirror
    assert c["dropped/duplicate_url"] == 1   # refetch
    assert out.num_rows + 4 == full.num_rows
    side = st.take_side()["dropped"]
    got = dict(zip(side.column("id").to_pylist(), zip(side.column("drop_reason").to_pylist(),
                                                       side.column("duplicate_of").to_pylist())))
    assert got[ids[4]] == ("duplicate_text", ids[0])   # posixpath -> os.path
    assert got[ids[6]] == ("duplicate_text", ids[2])   # _collections_abc -> collections.abc
    assert got["mirror"] == ("duplicate_text", ids[7])
    assert got["refetch"] == ("duplicate_url", ids[8])
    assert out.schema.names == full.schema.names  # no column lost


def test_bucket_count_and_parallel_hashing_do_not_change_output(shards, tmp_path):
    d, full = shards
    ref = ExactDedup()(d)
    many = ExactDedup(buckets=7, batch_size=2)(d)
    assert many.equals(ref)
    # the runner's path: ctx.map on a process pool
    writer = MemoryWriter()
    with ProcessPoolExecutor(2) as ex:
        ctx = RunContext(str(tmp_path), workers=2, executor=ex)
        st = ExactDedup(buckets=3)
        st.ensure_setup()
        st.run(Dataset.from_any(d), writer, ctx)
    assert writer.table().equals(ref)
    assert not os.path.exists(os.path.join(tmp_path, "exact_dedup"))  # spill files removed


def test_options(shards):
    d, full = shards
    st = ExactDedup(dedup_urls=False)
    out = st(d)
    assert "refetch" in out.column("id").to_pylist()
    assert "dropped/duplicate_url" not in st.counters.to_dict()
    st = ExactDedup(lowercase=False, dedup_urls=False)
    assert "mirror" in st(d).column("id").to_pylist()  # upper-cased copy is now different
    st = ExactDedup(dedup_text=False)
    assert st(d).num_rows == full.num_rows - 1


def test_empty_and_null_values_are_kept_and_counted():
    t = pa.table({"id": list("abcdef"), "text": ["", None, "", " x ", "X", None],
                  "url": [None, None, "", "http://a/", "http://b/", "http://a"]})
    st = ExactDedup()
    out = st(t)
    # empty texts and missing URLs are never duplicates; e repeats d's text, f d's URL
    assert out.column("id").to_pylist() == ["a", "b", "c", "d"]
    c = st.counters.to_dict()
    assert c["exact_dedup/empty_text"] == 4 and c["exact_dedup/no_url"] == 3
    assert c["dropped/duplicate_text"] == 1 and c["dropped/duplicate_url"] == 1


def test_no_url_column_and_errors():
    t = pa.table({"id": ["a", "b"], "text": ["same", "same"]})
    st = ExactDedup()
    assert st(t).column("id").to_pylist() == ["a"]
    with pytest.raises(StageError, match="needs column"):
        ExactDedup()(pa.table({"id": ["a"], "body": ["x"]}))
    empty = pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    assert ExactDedup()(empty).num_rows == 0


def test_normalize_for_hash():
    assert normalize_for_hash("Ｈｅｌｌｏ\u00a0 World\n") == normalize_for_hash("hello world")
    assert normalize_for_hash("a, b!", remove_punctuation=True) == "a b"
    assert normalize_for_hash("in 2024", replace_digits=True) == "in 0000"


def test_binary_text_with_bad_bytes_is_counted():
    t = pa.table({"id": ["a", "b", "c"],
                  "text": pa.array([b"caf\xe9 prices", b"caf\xe9 prices", b"ok"], pa.binary())})
    st = ExactDedup()
    assert st(t).column("id").to_pylist() == ["a", "c"]
    assert st.counters.to_dict()["exact_dedup/non_utf8_text"] == 2
