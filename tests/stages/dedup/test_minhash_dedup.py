"""minhash_dedup: kernels vs datasketch, planted near-duplicates vs brute-force ground truth,
cross-shard clusters, determinism, keep policies, bad input, and a run under the local runner."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from minhash_corpus import brute_force_pairs, score, shingles

from curate.dedup import minhash as M
from curate.dedup.components import UnionFind, pick_kept
from curate.pipeline.schema import docs_table
from curate.pipeline.stage import StageError
from curate.stages.dedup.minhash_dedup import MinhashDedup


def table_of(texts, **extra):
    return docs_table([f"d{i:05d}" for i in range(len(texts))], texts, ["test"] * len(texts), **extra)


def clusters_of(stage: MinhashDedup, n: int) -> tuple[list, set[int]]:
    side = stage.take_side()
    cluster_of: list = [None] * n
    removed: set[int] = set()
    if "clusters" in side:
        for r in side["clusters"].to_pylist():
            i = int(r["id"][1:])
            cluster_of[i] = r["cluster_id"]
            if not r["kept"]:
                removed.add(i)
    return cluster_of, removed


# -------------------------------------------------------------------------------------------------
# kernels


TEXTS = ["Hello, World! This is   a test of the MinHash kernel; it works.", "", None,
         "Ünïcode Straße ÉCOLE — 3.14 “quoted” text\u00a0with nbsp", "two words", " ,,, ",
         "The quick brown fox jumps over the lazy dog. " * 20]


@pytest.mark.parametrize("ngram,char", [(5, False), (1, False), (3, True), (5, True)])
def test_shingles_match_python_reference(ngram, char):
    h, off = M.shingle_hashes(pa.array(TEXTS, pa.string()), ngram, char)
    for i, t in enumerate(TEXTS):
        ref = M.python_shingles(t, ngram, char)
        assert len(set(h[off[i]:off[i + 1]].tolist())) == len(ref)


def test_normalisation_invariance():
    """Case, punctuation and whitespace do not change the shingles; words do."""
    a = pa.array(["The QUICK brown fox -- jumps, over the lazy dog!!", "the quick brown fox jumps over the lazy dog",
                  "the quick brown fox jumped over the lazy dog", "Straße ÉCOLE 3.14", "strasse école 3 14"])
    h, off = M.shingle_hashes(a, 3)
    sets = [set(h[off[i]:off[i + 1]].tolist()) for i in range(len(a))]
    assert sets[0] == sets[1] and sets[1] != sets[2]
    assert len(sets[1] & sets[2]) == 4  # 7 shingles each, 3 touch the edited word
    assert sets[3] != sets[4]  # no transliteration (ß stays ß), accents are kept


def test_signatures_are_datasketch_affine32():
    from datasketch import MinHash

    h, off = M.shingle_hashes(pa.array(TEXTS, pa.string()), 5)
    a, b = M.permutations(112, seed=7)
    sig = M.signatures(h, off, a, b)
    h32 = M.to_h32(h)
    for d in range(len(TEXTS)):
        m = MinHash(num_perm=112, seed=7, hashfunc=lambda x: x)
        m.update_batch([int(x) for x in h32[off[d]:off[d + 1]]])
        assert np.array_equal(m.hashvalues, sig[d])


def test_lsh_params_follow_datasketch():
    from datasketch import MinHashLSH

    for thr, perm in [(0.8, 112), (0.7, 128), (0.9, 64)]:
        lsh = MinHashLSH(threshold=thr, num_perm=perm)
        st = MinhashDedup(threshold=thr, num_perm=perm, verify=False)
        assert st.config.lsh() == (lsh.b, lsh.r, perm)
        # verified: the widest bands with >= 95% candidate probability at the threshold
        b, r, p = MinhashDedup(threshold=thr, num_perm=perm).config.lsh()
        assert 1 - (1 - thr ** r) ** b >= 0.95 > 1 - (1 - thr ** (r + 1)) ** (perm // (r + 1))
    assert MinhashDedup(threshold=0.8).config.lsh() == (16, 7, 112)
    assert MinhashDedup().config.lsh() == (14, 8, 112)
    assert MinhashDedup(bands=20, rows=5).config.lsh() == (20, 5, 100)


def test_union_find_and_keep():
    uf = UnionFind(8)
    uf.union(np.array([5, 1, 6]), np.array([3, 5, 7]))
    labels = uf.labels()
    assert labels.tolist() == [0, 1, 2, 1, 4, 1, 6, 6]
    kept, size = pick_kept(labels)
    assert kept.tolist() == [0, 1, 2, 1, 4, 1, 6, 6] and size.tolist() == [1, 3, 1, 3, 1, 3, 2, 2]
    kept, _ = pick_kept(labels, np.array([0, 1, 0, 9, 0, 9, np.nan, 2.0]))
    assert kept.tolist() == [0, 3, 2, 3, 4, 3, 7, 7]  # tie 9/9 -> first; nan loses


# -------------------------------------------------------------------------------------------------
# planted corpus vs exact ground truth


def test_planted_verified_recall_and_precision(planted):
    """At threshold 0.8 (verified): >= 95% of the documents that have a true duplicate are
    clustered with one, and <= 1% of the documents without one are removed."""
    t = table_of(planted.texts)
    st = MinhashDedup(verify=True, verify_threshold=0.8)
    out = st(t)
    cluster_of, removed = clusters_of(st, len(planted.texts))
    s = score(planted, cluster_of, removed)
    assert s["dup_docs"] > 250
    assert s["recall"] >= 0.95, s
    assert s["nondup_removed"] <= 0.01, s
    assert out.num_rows == len(planted.texts) - len(removed)
    assert st.counters.data["dropped/near_duplicate"] == len(removed)
    assert st.counters.data["minhash_dedup/rejected_pairs"] > 0  # verification did remove LSH false positives
    # every verified cluster is a union of true pairs: no removed document lacks a >= 0.8 partner
    assert s["fp"] == 0


def test_planted_threshold_option_and_defaults(planted):
    """`threshold: 0.8` (verified by default) and the plain defaults both meet the criteria."""
    for st in (MinhashDedup(threshold=0.8), MinhashDedup()):
        st(table_of(planted.texts))
        cluster_of, removed = clusters_of(st, len(planted.texts))
        s = score(planted, cluster_of, removed)
        assert s["recall"] >= 0.95 and s["nondup_removed"] <= 0.01 and s["fp"] == 0, s


def test_planted_unverified(planted):
    """Without verification (14 bands x 8 rows) recall is as high; the extra removals are LSH
    near misses (Jaccard >= 0.3 with some document), never unrelated documents -- but chains of
    them remove too many (which is why verify is the default)."""
    t = table_of(planted.texts)
    st = MinhashDedup(verify=False)
    st(t)
    cluster_of, removed = clusters_of(st, len(planted.texts))
    s = score(planted, cluster_of, removed)
    assert s["recall"] >= 0.95, s
    near = {i for pair in planted.jaccard for i in pair}  # all pairs with Jaccard >= 0.3
    assert removed <= near


def test_cross_shard_duplicates_and_same_result_as_in_memory(planted, tmp_path):
    t = table_of(planted.texts)
    n = t.num_rows
    bounds = [0, n // 4, n // 2, 3 * n // 4, n]
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(4):
        pq.write_table(t.slice(bounds[k], bounds[k + 1] - bounds[k]), folder / f"s{k}.parquet")
    st_mem = MinhashDedup(verify=True)
    mem = st_mem(t)
    st = MinhashDedup(verify=True)
    out = st(str(folder))
    assert out.equals(mem)
    cluster_of, removed = clusters_of(st, n)
    shard = np.searchsorted(bounds, np.arange(n), side="right") - 1
    members: dict = {}
    for i, c in enumerate(cluster_of):
        if c is not None:
            members.setdefault(c, set()).add(int(shard[i]))
    assert sum(1 for s in members.values() if len(s) > 1) >= 20  # many clusters span shards
    assert score(planted, cluster_of, removed)["recall"] >= 0.95


def test_deterministic(planted, tmp_path):
    t = table_of(planted.texts)
    runs = []
    for k in range(2):
        st = MinhashDedup(keep="longest", verify=True)
        out = st(t, workdir=str(tmp_path / f"w{k}"))
        runs.append((out, st.take_side()["clusters"], st.counters.to_dict()))
    assert runs[0][0].equals(runs[1][0])
    assert runs[0][1].equals(runs[1][1])
    assert runs[0][2] == runs[1][2]
    assert not os.path.exists(tmp_path / "w0" / "minhash")  # spill files are removed


def test_threads_do_not_change_the_result(planted):
    from curate.dedup import minhash as mh

    t = table_of(planted.texts)
    one = MinhashDedup(verify=True, threads=1)(t)
    old = mh.PARALLEL_MIN_ITEMS
    mh.PARALLEL_MIN_ITEMS = 1  # force the multi-threaded path even for small batches
    try:
        two = MinhashDedup(verify=True, threads=2, batch_size=300)(t)
    finally:
        mh.PARALLEL_MIN_ITEMS = old
    assert two.equals(one)


def test_cluster_columns_and_removed_side_table(planted):
    t = table_of(planted.texts)
    st = MinhashDedup(verify=True, save_removed=True)
    out = st(t)
    side = st.take_side()
    removed = side["removed"]
    assert set(out.schema.names) >= {"id", "text", "source", "metadata", "cluster_id", "cluster_size"}
    assert removed.num_rows == st.counters.data["dropped/near_duplicate"]
    kept_ids = set(out.column("id").to_pylist())
    # every removed document points to a kept document of the output, in the same cluster
    assert set(removed.column("duplicate_of").to_pylist()) <= kept_ids
    assert removed.column("duplicate_of").to_pylist() == removed.column("cluster_id").to_pylist()
    # kept members of clusters carry their own id as cluster_id; singletons carry null
    rows = out.select(["id", "cluster_id", "cluster_size"]).to_pylist()
    assert all((r["cluster_id"] == r["id"]) == (r["cluster_size"] > 1) for r in rows)
    assert all((r["cluster_id"] is None) == (r["cluster_size"] == 1) for r in rows)
    c = st.counters.data
    assert c["minhash_dedup/clusters"] == sum(v for k, v in c.items() if k.startswith("minhash_dedup/cluster_size/") and k != "minhash_dedup/cluster_size/max")
    assert c["minhash_dedup/docs_in_clusters"] - c["minhash_dedup/clusters"] == c["dropped/near_duplicate"]


def test_keep_longest_and_score():
    base = " ".join(f"word{i}" for i in range(200))
    texts = [base, base + " tail", base + " a much longer tail here", "unrelated " * 3 + base[:40]]
    st = MinhashDedup(keep="longest")
    out = st(table_of(texts))
    assert "d00002" in out.column("id").to_pylist() and "d00000" not in out.column("id").to_pylist()
    st = MinhashDedup(keep="score", score_column="q")
    out = st(table_of(texts, q=pa.array([0.5, 0.9, None, 0.1])))
    assert out.column("id").to_pylist()[0] == "d00001"
    st = MinhashDedup(keep="first")
    out = st(table_of(texts))
    assert out.column("id").to_pylist()[0] == "d00000"
    with pytest.raises(ValueError):
        MinhashDedup(keep="score")
    with pytest.raises(StageError, match="score_column"):
        MinhashDedup(keep="score", score_column="nope")(table_of(texts))


def test_char_ngrams(planted):
    texts = planted.texts[:300]
    st = MinhashDedup(char_ngrams=True, ngram=8, verify=True)
    out = st(table_of(texts))
    assert 0 < out.num_rows <= len(texts)
    # char shingles find at least the exact-after-normalisation duplicates
    norm = [" ".join(sorted(shingles(t, 5))) for t in texts]
    dup_norm = len(norm) - len(set(norm))
    assert st.counters.data.get("dropped/near_duplicate", 0) >= dup_norm


# -------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_counted_not_fatal():
    long = "real words make a real document with enough words to shingle " * 4
    texts = [long, "", None, "hi", "  !!! ?? ", long, "x"]
    st = MinhashDedup()
    out = st(table_of(texts))
    c = st.counters.data
    assert c["minhash_dedup/empty_docs"] == 3          # "", None, punctuation only: never duplicates
    assert c["minhash_dedup/short_docs"] == 2          # "hi", "x"
    assert c["dropped/near_duplicate"] == 1
    assert out.num_rows == 6

    # binary text with invalid UTF-8 and non-string text columns
    raw = pa.array([long.encode(), b"\xff\xfe broken " + long.encode(), None], pa.binary())
    st = MinhashDedup()
    out = st(pa.table({"id": ["a", "b", "c"], "text": raw}))
    assert st.counters.data["minhash_dedup/non_utf8_text"] == 1
    assert out.num_rows == 2
    st = MinhashDedup()
    out = st(pa.table({"id": ["a", "b"], "text": pa.array([1, 2])}))
    assert out.num_rows == 2 and st.counters.data["minhash_dedup/non_string_text"] == 2

    # empty inputs
    assert MinhashDedup()(table_of([])).num_rows == 0


def test_missing_text_column_is_a_clear_error():
    with pytest.raises(StageError, match="text"):
        MinhashDedup()(pa.table({"id": ["a"], "body": ["x y z"]}))


def test_exact_ground_truth_helper_is_exhaustive():
    texts = ["a b c d e f g", "a b c d e f h", "z y x w v u t"]
    pairs = brute_force_pairs(texts, 0.0)
    assert set(pairs) == {(0, 1)} and abs(pairs[(0, 1)] - 2 / 4) < 1e-9


# -------------------------------------------------------------------------------------------------
# the runner (process pool: picklable per-shard functions)


def test_runner_with_process_pool_matches_library_call(planted, tmp_path):
    from curate.run import run_pipeline

    t = table_of(planted.texts)
    src = tmp_path / "in"
    src.mkdir()
    n = t.num_rows
    for k in range(3):
        pq.write_table(t.slice(k * n // 3, (k + 1) * n // 3 - k * n // 3), src / f"f{k}.parquet")
    out = str(tmp_path / "out")
    spec = {"name": "mh", "output": out, "workers": 2, "rows_per_shard": 10_000,
            "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(src)}}},
            "stages": [{"name": "dedup", "stage": "minhash_dedup", "options": {"verify": True}}]}
    res = run_pipeline(spec, progress=False)
    got = pa.concat_tables(pq.read_table(f) for f in res.outputs["dedup"])
    expect = MinhashDedup(verify=True)(t)
    assert got.column("id").to_pylist() == expect.column("id").to_pylist()
    assert got.column("cluster_id").to_pylist() == expect.column("cluster_id").to_pylist()
    stats = res.stats["dedup"]
    assert stats["dropped"]["near_duplicate"] == n - got.num_rows == stats["in"] - stats["out"]
    assert stats["counters"]["minhash_dedup/clusters"] > 0
    assert os.path.exists(os.path.join(out, "dedup", "_clusters"))


# -------------------------------------------------------------------------------------------------
# data flow: per-part spill files -> per-bucket edges -> components


def test_spill_files_and_shuffle_buckets(planted, tmp_path):
    """Band keys are spilled as Parquet per (bucket, part); edges come from bucket files; splitting
    each band into several key partitions (the hash shuffle) gives exactly the same result."""
    from curate.stages.dedup.minhash_dedup import edges_task, signature_task

    t = table_of(planted.texts)
    a, b = M.permutations(112, 1)
    cfg = {"bands": 14, "rows": 8, "text_column": "text", "score_column": None, "keep": "first",
           "ngram": 5, "char_ngrams": False, "batch_size": 256, "verify": False,
           "save_signatures": True, "key_partitions": 3}
    halves = [t.slice(0, 400), t.slice(400)]
    res = [signature_task({"part": i, "source": h, "cfg": cfg, "work": str(tmp_path), "a": a, "b": b})
           for i, h in enumerate(halves)]
    assert [r["rows"] for r in res] == [400, t.num_rows - 400]
    files = res[0]["key_files"]
    assert len(files) == 14 * 3 and all(f.endswith(".parquet") and os.path.exists(f) for f in files)
    keys = pq.read_table(files[0])
    assert keys.schema.names == ["key", "doc"] and keys.num_rows > 0
    sig = pq.read_table(tmp_path / "signatures" / "part-00001.parquet")
    assert sig.num_rows == t.num_rows - 400 and sig.schema.field("signature").type.list_size == 112
    offsets = np.array([0, 400], np.int64)
    total = 0
    for k in range(14 * 3):
        out = edges_task({"band": k, "files": [r["key_files"][k] for r in res], "offsets": offsets,
                          "all_pairs_max": 0, "out": str(tmp_path / "edges" / f"{k}.parquet")})
        total += out["edges"]
    assert total > 0
    one = MinhashDedup(key_partitions=1)(t)
    assert MinhashDedup(key_partitions=4)(t).equals(one)
    assert MinhashDedup(key_partitions=4, batch_size=100)(t).equals(one)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_runner_gives_the_same_clusters(planted, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed")
    from curate.run import run_pipeline

    t = table_of(planted.texts)
    src = tmp_path / "in"
    src.mkdir()
    n = t.num_rows
    for k in range(3):
        pq.write_table(t.slice(k * n // 3, (k + 1) * n // 3 - k * n // 3), src / f"f{k}.parquet")
    outs = {}
    for runner in ("local", "ray"):
        spec = {"name": "mh", "output": str(tmp_path / runner), "workers": 2, "runner": runner,
                "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(src)}}},
                "stages": [{"name": "dedup", "stage": "minhash_dedup", "options": {"verify": True}}]}
        res = run_pipeline(spec, progress=False)
        outs[runner] = pa.concat_tables(pq.read_table(f) for f in res.outputs["dedup"])
    assert outs["ray"].equals(outs["local"])
