"""decontaminate: eval-set n-grams on normalised text; drop / remove / flag; shared on-disk index;
recall and false positives on a corpus with planted leakage; the example pipeline."""

import glob
import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.decont.index import tokens
from curate.pipeline.stage import StageError
from curate.stages.clean.decontaminate import Decontaminate
from curate.testing.decont_corpus import PlainNgramSet, planted_corpus
from helpers import ROOT, curate_bin

Q = ("A bond pays a fixed coupon of five percent per year and trades below its face value. "
     "What happens to its yield to maturity compared with the coupon rate?")
A = "The yield to maturity is higher than the coupon rate."
FILLER = ("The committee met on Tuesday to review the schedule for the coming quarter and agreed "
          "to publish the minutes next week. ")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture
def evals(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", [
        {"question": Q, "answer": A},
        {"question": "Name the reactive gas in air", "answer": "oxygen"},
        {"question": "Yes?", "answer": ""}])          # one token: under min_item_tokens, ignored


def stage(evals, tmp_path, **kw):
    st = Decontaminate(eval_sets={"qa": {"paths": evals}}, **kw)
    st.workdir = str(tmp_path / "work")
    return st


def table(texts):
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})


def test_normalisation_and_what_matches(evals, tmp_path):
    q_words = Q.split()
    texts = [
        FILLER + Q + " " + A + " " + FILLER,                                    # verbatim
        FILLER + "\n".join(" ".join(q_words[i:i + 4]) for i in range(0, len(q_words), 4)) + "\n" + A,  # re-wrapped
        FILLER + (Q + " " + A).upper(),                                          # case
        FILLER + Q.replace(",", "").replace("?", " ?!").replace(".", " ;"),      # punctuation only
        FILLER + " ".join(q_words[-6:]) + " " + " ".join(A.split()[:7]),         # spans question and answer
        FILLER + " ".join(q_words[5:17]) + ". " + FILLER,                        # a 12-word fragment
        FILLER + "Quiz: NAME the reactive gas in air... oxygen!",                # a short item, whole
        FILLER + "name the reactive gas in air",                                 # a short item, partly
        FILLER + "Yes? " * 3,
        FILLER * 3,
    ]
    st = stage(evals, tmp_path, mode="flag")
    out = st(table(texts))
    assert out.column("contaminated").to_pylist() == [True] * 5 + [False, True, False, False, False]
    assert out.column("contamination_sets").to_pylist()[0] == ["qa"]
    assert out.column("contamination_matches").to_pylist()[4] == 1          # 13 words: one window, across Q and A
    c = st.counters.to_dict()
    assert c["decontaminate/qa/docs"] == c["decontaminate/docs"] == 6
    assert c["decontaminate/qa/ngrams"] == sum(out.column("contamination_matches").to_pylist())
    assert out.column("text").to_pylist() == texts                          # flag changes nothing
    matches = st.take_side()["matches"]
    assert sorted(set(matches.column("id").to_pylist())) == ["d0", "d1", "d2", "d3", "d4", "d6"]
    assert set(matches.column("item_id").to_pylist()) == {"qa.jsonl:1", "qa.jsonl:2"}


def test_drop_mode_counts_and_saves(evals, tmp_path):
    st = stage(evals, tmp_path, save_dropped=True)
    out = st(table([FILLER + Q + " " + A, FILLER, FILLER + "name the reactive gas in air, oxygen", None, ""]))
    assert out.column("id").to_pylist() == ["d1", "d3", "d4"] and "contaminated" not in out.schema.names
    assert st.counters.to_dict()["dropped/contaminated"] == 2
    side = st.take_side()
    assert side["dropped"].column("drop_reason").to_pylist() == ["contaminated"] * 2
    assert side["matches"].num_rows == 2


def test_remove_mode_cuts_window_and_drops_after_max_cuts(evals, tmp_path):
    before, after = "B" * 300 + " alpha beta. ", " gamma delta. " + "C" * 300
    st = stage(evals, tmp_path, mode="remove", remove_window=50, max_cuts=2)
    many = (FILLER * 2 + Q + " ").join([""] * 4) + FILLER                   # 3 separate copies
    two = FILLER * 3 + Q + " " + FILLER * 3 + Q + " " + FILLER * 3
    out = st(table([before + Q + " " + A + after, many, two]))
    assert out.column("id").to_pylist() == ["d0", "d2"]
    text = out.column("text").to_pylist()[0]
    # the match (the question and the answer) and 50 characters on each side are gone, nothing else
    # (13 characters " alpha beta. " before the question, 15 ". gamma delta. " after the answer's last word)
    assert text == "B" * (300 + 13 - 50) + "\n" + "C" * (300 + 15 - 50)
    assert "coupon" not in out.column("text").to_pylist()[1]
    assert FILLER.strip()[-30:] in out.column("text").to_pylist()[1]
    c = st.counters.to_dict()
    assert c["dropped/contaminated_too_many_cuts"] == 1 and c["decontaminate/cuts"] == 1 + 3 + 2


def test_index_built_once_in_the_work_folder_and_rebuilt_when_evals_change(evals, tmp_path):
    a = stage(evals, tmp_path)
    a.ensure_setup()
    files = glob.glob(str(tmp_path / "work" / "index-*.hashes.npy"))
    assert len(files) == 1
    mtime = os.path.getmtime(files[0])
    b = stage(evals, tmp_path)                     # another worker: opens the same files
    b.ensure_setup()
    assert b.index.prefix == a.index.prefix and os.path.getmtime(files[0]) == mtime
    assert isinstance(b.index.hashes.base, __import__("numpy").memmap)         # mapped, not read
    with open(evals, "a") as f:
        f.write(json.dumps({"question": "A brand new question that was added to the eval set later on today",
                            "answer": "yes"}) + "\n")
    c = stage(evals, tmp_path)
    c.ensure_setup()
    assert c.index.prefix != a.index.prefix
    assert c.index.meta["counts"]["qa"] == {"items": 4, "ngrams": (len(tokens(Q + " " + A)) - 12) + 1 + (15 - 12), "short_items": 1, "skipped_items": 1}


def test_parquet_eval_sets_with_choices_and_several_sets(tmp_path):
    pq.write_table(pa.table({"prompt": ["Which of the following best describes the role of a clearing house"],
                             "options": [["It guarantees the performance of both sides", "It sets prices"]],
                             "label": ["A"]}), tmp_path / "mc.parquet")
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": Q, "answer": A}])
    st = Decontaminate(eval_sets={"mc": {"paths": str(tmp_path / "mc.parquet"), "question": "prompt",
                                         "answer": None, "choices": "options"},
                                  "qa": {"paths": qa}}, mode="flag")
    st.workdir = str(tmp_path / "w")
    doc = "the role of a clearing house: IT GUARANTEES the performance of both sides " + FILLER + Q  # spans prompt and choices
    out = st(table([doc, "Of the following best describes the role of a clearing house " + FILLER]))  # 12 words
    assert out.column("contamination_sets").to_pylist() == [["mc", "qa"], []]
    c = st.counters.to_dict()
    assert c["decontaminate/mc/docs"] == c["decontaminate/qa/docs"] == 1


def test_bad_eval_input_is_a_clear_error(tmp_path):
    st = Decontaminate(eval_sets={"qa": {"paths": str(tmp_path / "missing.jsonl")}})
    assert st.check() and st.check()[0][0] == "eval_sets.qa.paths"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    st = Decontaminate(eval_sets={"qa": {"paths": bad}})
    st.workdir = str(tmp_path / "w")
    with pytest.raises(StageError, match=r"bad.jsonl: line 1: no field 'question'"):
        st.ensure_setup()
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"question": "Yes?", "answer": ""}])
    st = Decontaminate(eval_sets={"qa": {"paths": empty}})
    st.workdir = str(tmp_path / "w1")
    with pytest.raises(StageError, match=r"eval set 'qa': no item with at least 3 tokens in .*empty.jsonl"):
        st.ensure_setup()
    with open(tmp_path / "broken.jsonl", "w") as f:
        f.write('{"question": "ok", "answer": "a"}\n{not json\n')
    st = Decontaminate(eval_sets={"qa": {"paths": str(tmp_path / "broken.jsonl")}})
    st.workdir = str(tmp_path / "w2")
    with pytest.raises(StageError, match=r"broken.jsonl: line 2: not JSON"):
        st.ensure_setup()


def test_validate_names_file_step_and_key(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(f"""name: t
output: {tmp_path / 'out'}
inputs:
  docs: {{stage: read_jsonl, options: {{paths: {ROOT}/configs/data/decontaminate/docs.jsonl}}}}
stages:
  - {{name: decont, stage: decontaminate, options: {{eval_sets: {{qa: {{paths: {tmp_path}/nope.jsonl}}}}, mode: cut}}}}
""")
    r = subprocess.run([curate_bin(), "validate", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "p.yaml" in r.stderr and "decont" in r.stderr and "mode" in r.stderr
    # a field the eval file does not have, and a missing file: both, before any work
    noanswer = write_jsonl(tmp_path / "qa.jsonl", [{"question": Q, "solution": A}])
    p.write_text(p.read_text().replace(f"{tmp_path}/nope.jsonl", noanswer).replace(
        "mode: cut", f"mode: drop, text_column: text}}}}\n  - {{name: two, stage: decontaminate, options: "
        f"{{eval_sets: {{x: {{paths: {tmp_path}/nope.jsonl}}}}"))
    r = subprocess.run([curate_bin(), "validate", str(p)], capture_output=True, text=True)
    assert r.returncode == 2, r.stdout
    assert "eval_sets.qa.answer" in r.stderr and "no field 'answer'" in r.stderr and "decont" in r.stderr
    assert "eval_sets.x.paths" in r.stderr and "two" in r.stderr


@pytest.mark.slow
def test_recall_and_false_positives_on_planted_corpus(tmp_path):
    """Every planted item is found (verbatim, re-wrapped, case-changed); no fragment matches; the
    flagged documents are exactly those the plain-Python n-gram set flags."""
    items, docs = planted_corpus(n_docs=800, n_items=400, seed=3, planted_fraction=0.15, fragment_fraction=0.15)
    ev = write_jsonl(tmp_path / "ev.jsonl", items)
    st = Decontaminate(eval_sets={"bench": {"paths": ev, "choices": "choices", "id_field": "id"}}, mode="flag")
    st.workdir = str(tmp_path / "w")
    out = st(pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]}))
    flagged = dict(zip(out.column("id").to_pylist(), out.column("contaminated").to_pylist()))
    counts = dict(zip(out.column("id").to_pylist(), out.column("contamination_matches").to_pylist()))
    planted = [d for d in docs if d["kind"] in ("verbatim", "rewrap", "case")]
    fragments = [d for d in docs if d["kind"] == "fragment"]
    assert len(planted) > 80 and len(fragments) > 80 and {d["kind"] for d in planted} == {"verbatim", "rewrap", "case"}
    recall = sum(flagged[d["id"]] for d in planted) / len(planted)
    assert recall == 1.0
    # no false positives: the same windows as the plain-Python n-gram set, document by document
    plain = PlainNgramSet(items, n=13)
    for d in docs:
        assert counts[d["id"]] == plain.matches(d["text"]), d["id"]
    assert not any(flagged[d["id"]] for d in fragments)
    # the matches name the planted item (at most a few clean documents match an item across a
    # sentence boundary, as the plain set also says)
    m = st.take_side()["matches"].to_pylist()
    named = {(r["id"], r["item_id"]) for r in m}
    assert all((d["id"], f"q{d['item']}") in named for d in planted)
    assert sum(flagged[d["id"]] for d in docs if d["kind"] == "clean") <= 3
    # the fragments on their own
    alone = st(pa.table({"id": [d["id"] for d in fragments], "text": [d["planted"] for d in fragments]}))
    assert not any(alone.column("contaminated").to_pylist())


def test_example_pipeline(tmp_path):
    out = str(tmp_path / "out")
    cfg = os.path.join(ROOT, "configs", "decontaminate_example.yaml")
    env = {**os.environ, "CURATE_OUTPUT": out,
           "DECONT_DOCS": os.path.join(ROOT, "configs/data/decontaminate/docs.jsonl"),
           "DECONT_EVALS": os.path.join(ROOT, "configs/data/decontaminate")}
    r = subprocess.run([curate_bin(), "run", "-q", cfg], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]["decontaminate"]
    docs = [json.loads(x) for x in open(os.path.join(ROOT, "configs/data/decontaminate/docs.jsonl"))]
    planted = {d["id"] for d in docs if d["planted"] in ("verbatim", "rewrap", "case", "short_item")}
    c = stats["counters"]
    assert c["decontaminate/docs"] == len(planted) == 5
    assert c["decontaminate/qa/docs"] == 3 and c["decontaminate/mc/docs"] == 2
    assert stats["in"] == stats["out"] == len(docs)           # remove mode: cut, nothing dropped
    result = pq.read_table(os.path.join(out, "decontaminate")).to_pylist()
    qa = [json.loads(x) for x in open(os.path.join(ROOT, "configs/data/decontaminate/qa.jsonl"))]
    for d in result:
        assert ("coupon rate" in d["text"]) is False
        if d["id"] not in planted:
            assert d["text"] == next(x["text"] for x in docs if x["id"] == d["id"])
    assert qa[0]["answer"] not in " ".join(d["text"] for d in result)
    matches = pq.read_table(os.path.join(out, "decontaminate", "_matches"))
    assert set(matches.column("id").to_pylist()) == planted
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert "decontamination decontaminate" in page and "<td>qa</td><td class=n>3</td>" in page
    assert page.count("<div class='doc'>") >= 5


@pytest.mark.slow
def test_runner_with_two_workers_shares_one_index(tmp_path):
    """Four input files on two worker processes: one index in the step's work folder, and the same
    flags as a library call."""
    from curate.run import run_pipeline

    items, docs = planted_corpus(n_docs=200, n_items=100, seed=5, planted_fraction=0.2, fragment_fraction=0.2)
    ev = write_jsonl(tmp_path / "ev.jsonl", items)
    files = [write_jsonl(tmp_path / f"docs{i}.jsonl", [{"id": d["id"], "text": d["text"]} for d in docs[i::4]])
             for i in range(4)]
    out = str(tmp_path / "out")
    options = {"eval_sets": {"bench": {"paths": ev, "choices": "choices", "id_field": "id"}}, "mode": "flag"}
    run_pipeline({"name": "t", "output": out, "workers": 2, "report": False,
                  "inputs": {"docs": {"stage": "read_jsonl", "options": {"paths": files}}},
                  "stages": [{"stage": "decontaminate", "options": options}]}, progress=False)
    work = os.path.join(out, "_curate", "work", "decontaminate")
    assert len(glob.glob(os.path.join(work, "index-*.json"))) == 1
    got = pq.read_table(os.path.join(out, "decontaminate")).to_pylist()
    expected = {d["id"]: d["kind"] in ("verbatim", "rewrap", "case") for d in docs}
    assert {r["id"]: r["contaminated"] for r in got} == expected
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]["decontaminate"]["counters"]
    assert stats["decontaminate/bench/docs"] == sum(expected.values())
