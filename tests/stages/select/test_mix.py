"""mix: token proportions within 1%, determinism, runner integration, clear errors."""

import glob
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from curate.pipeline.runner import PipelineError
from curate.run import run_pipeline
from curate.pipeline.stage import StageError
from curate.stages.select.mix import Mix

WORDS = ("water river valley reservoir pump pipe dam flood rain council budget farmer harvest well "
         "village town engineer report winter summer").split()


def corpus(prefix, n, lo, hi, seed):
    rnd = random.Random(seed)
    return pa.table({"id": [f"{prefix}{i}" for i in range(n)],
                     "text": [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi))) for _ in range(n)]})


def tokens(t):
    return sum(len(x.split()) for x in t.column("text").to_pylist())


@pytest.mark.parametrize("props,total", [({"a": 1, "b": 1}, None), ({"a": 1, "b": 0.1}, None),
                                         ({"a": 1, "b": 2}, None), ({"a": 3, "b": 1}, 60_000)])
def test_proportions_within_one_percent(props, total):
    a, b = corpus("a", 800, 20, 120, 1), corpus("b", 300, 5, 60, 2)
    m = Mix(proportions=props, total_tokens=total)
    out = m.mix({"a": a, "b": b})
    got = {n: tokens(out.filter(pa.compute.equal(out.column("mix_input"), n))) for n in "ab"}
    share = {n: props[n] / sum(props.values()) for n in "ab"}
    grand = sum(got.values())
    for n in "ab":
        assert abs(got[n] / grand - share[n]) < 0.01, (got, share)
        assert m.counters.data[f"mix/tokens/{n}"] == got[n]
        assert abs(m.counters.data[f"mix/proportion/{n}"] - got[n] / grand) < 1e-6
    if total is None:  # the anchor (first input) is used exactly once
        assert got["a"] == tokens(a) and m.counters.data["mix/repeated_rows/a"] == 0
    else:
        assert abs(grand - total) / total < 0.01
    assert len(set(out.column("id").to_pylist())) == out.num_rows   # repeated rows get new ids


def test_upsampling_repeats_whole_input_then_draws_rest():
    a, b = corpus("a", 500, 20, 40, 3), corpus("b", 40, 20, 40, 4)
    out = Mix(proportions={"a": 1, "b": 1}).mix({"a": a, "b": b})
    bb = out.filter(pa.compute.equal(out.column("mix_input"), "b"))
    copies = bb.column("mix_copy").to_pylist()
    n_full = tokens(a) // tokens(b)
    ids = bb.column("id").to_pylist()
    base = [i.split("#")[0] for i in ids]
    # every b row appears at least n_full times; none more than n_full + 1
    counts = {i: base.count(i) for i in set(base)}
    assert len(counts) == 40 and min(counts.values()) >= n_full and max(counts.values()) <= n_full + 1
    assert max(copies) == max(counts.values()) - 1


def test_deterministic_and_independent_of_file_split(tmp_path):
    a, b = corpus("a", 400, 10, 80, 5), corpus("b", 400, 10, 80, 6)
    m1 = Mix(proportions="a:1, b:0.3", seed=3).mix({"a": a, "b": b})
    m2 = Mix(proportions="a:1, b:0.3", seed=3).mix({"a": a, "b": b})
    assert m1.equals(m2)
    # the same rows from files split differently and in another order
    for k, (lo, hi) in enumerate([(0, 150), (150, 400)]):
        pq.write_table(b.slice(lo, hi - lo), tmp_path / f"b{k}.parquet")
    m3 = Mix(proportions="a:1, b:0.3", seed=3).mix(
        {"a": a.take(list(range(400))[::-1]), "b": sorted(glob.glob(str(tmp_path / "b*.parquet")))[::-1]})
    key = lambda t: sorted(zip(t.column("id").to_pylist(), t.column("mix_input").to_pylist()))
    assert key(m1) == key(m3)
    m4 = Mix(proportions="a:1, b:0.3", seed=4).mix({"a": a, "b": b})
    assert key(m4) != key(m1)


def test_tokenizer_file_counts_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    a, b = corpus("a", 300, 10, 60, 7), corpus("b", 300, 10, 60, 8)
    m = Mix(proportions={"a": 1, "b": 1}, tokenizer=str(tmp_path))     # a model folder
    out = m.mix({"a": a, "b": b})
    n = {x: sum(len(tok.encode(t).ids) for t in out.filter(pa.compute.equal(out.column("mix_input"), x))
                .column("text").to_pylist()) for x in "ab"}
    assert n["a"] == m.counters.data["mix/tokens/a"] and n["b"] == m.counters.data["mix/tokens/b"]
    assert n["a"] != tokens(a)                                         # not whitespace words
    assert abs(n["a"] / (n["a"] + n["b"]) - 0.5) < 0.01


def test_errors():
    a = corpus("a", 10, 5, 10, 9)
    with pytest.raises(StageError, match=r"not inputs of this step; its inputs are \['a', 'b'\]"):
        Mix(proportions={"a": 1, "c": 1}).mix({"a": a, "b": a})
    with pytest.raises(StageError, match=r"\['b'\] have no proportion"):
        Mix(proportions={"a": 1}).mix({"a": a, "b": a})
    empty = pa.table({"id": ["e1", "e2"], "text": ["", None]})
    with pytest.raises(StageError, match="input 'b' has no tokens"):
        Mix(proportions={"a": 1, "b": 1}).mix({"a": a, "b": empty})
    for bad, msg in [("a 1, b 2", "cannot parse"), ("a=1; b", "not a number"), ("a:x", "not a number"), ({"a": -1}, ">= 0"),
                     ({"a": 0, "b": 0}, "positive"), ({}, "mapping"), ("a:inf", "finite")]:
        with pytest.raises(ValidationError, match=msg):
            Mix(proportions=bad)
    with pytest.raises(StageError, match="not a local file"):
        Mix(proportions={"a": 1}, tokenizer="no/such/tokenizer").ensure_setup()


def test_empty_inputs_skip():
    """empty_inputs: skip leaves an input without tokens out, shares the mixture among the others,
    and counts a warning; every input empty gives an empty mixture, warned."""
    a, c = corpus("a", 200, 5, 15, 1), corpus("c", 200, 5, 15, 2)
    empty = pa.table({"id": ["e1", "e2"], "text": ["", None]})
    m = Mix(proportions={"a": 1, "b": 2, "c": 1}, total_tokens=1000, empty_inputs="skip")
    out = m.mix({"a": a, "b": empty, "c": c})
    cnt = m.counters.to_dict()
    assert cnt["warnings/empty_input"] == 1 and cnt["mix/empty_input/b"] == 1
    assert set(out.column("mix_input").to_pylist()) == {"a", "c"}
    assert cnt["mix/target_tokens/a"] == cnt["mix/target_tokens/c"] == 500 and "mix/target_tokens/b" not in cnt
    assert abs(tokens(out) - 1000) <= 15
    m = Mix(proportions={"a": 1, "b": 1}, empty_inputs="skip")
    out = m.mix({"a": empty, "b": empty.slice(0, 0)})
    assert out.num_rows == 0 and m.counters.to_dict()["warnings/empty_input"] == 2


def test_runner_groups_rows_by_input_step(tmp_path):
    a, b = corpus("a", 500, 20, 100, 10), corpus("b", 200, 10, 50, 11)
    for name, t in (("a", a), ("b", b)):
        os.makedirs(tmp_path / name)
        pq.write_table(t.slice(0, 250), tmp_path / name / "0.parquet")
        pq.write_table(t.slice(250), tmp_path / name / "1.parquet")
    out = str(tmp_path / "out")
    run_pipeline({"name": "m", "output": out, "workers": 1,
                  "inputs": {"domain": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "a")}},
                             "replay": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "b")}}},
                  "stages": [{"stage": "mix", "input": ["domain", "replay"],
                              "options": {"proportions": {"domain": 1, "replay": 0.25}}}]}, progress=False)
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]["mix"]["counters"]
    assert abs(stats["mix/proportion/domain"] - 0.8) < 0.01 and abs(stats["mix/proportion/replay"] - 0.2) < 0.01
    t = pa.concat_tables([pq.read_table(f) for f in glob.glob(os.path.join(out, "mix", "*.parquet"))])
    assert set(t.column("mix_input").to_pylist()) == {"domain", "replay"}
    with pytest.raises(PipelineError, match="not inputs of this step"):
        run_pipeline({"name": "m", "output": str(tmp_path / "out2"), "workers": 1,
                      "inputs": {"domain": {"stage": "read_parquet", "options": {"paths": str(tmp_path / "a")}}},
                      "stages": [{"stage": "mix", "input": ["domain"],
                                  "options": {"proportions": {"domain": 1, "general": 1}}}]}, progress=False)


def test_input_column_for_one_table():
    a, b = corpus("a", 200, 10, 40, 12), corpus("b", 200, 10, 40, 13)
    both = pa.concat_tables([a.append_column("src", pa.array(["a"] * 200)),
                             b.append_column("src", pa.array(["b"] * 200))])
    out = Mix(proportions={"a": 1, "b": 1}, input_column="src")(both)
    assert set(out.column("mix_input").to_pylist()) == {"a", "b"}
    assert out.column("src").to_pylist() == out.column("mix_input").to_pylist()
