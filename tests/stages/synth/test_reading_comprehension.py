"""reading_comprehension: exact mined pairs on English prose, caps, wrapping, determinism, format."""

import glob
import os
import random
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.run import run_pipeline
from curate.pipeline.stage import StageError
from curate.stages.synth.reading_comprehension import COUNT_COLUMNS, ReadingComprehension, load_templates
from curate.text.adaptllm import Miner, split_sentences

OPEN = "The committee published its annual report on regional water use last week. "

# each: (text after OPEN, {sub-type: [(sentence 1, connective, sentence 2)]})
CASES = {
    "entail": (
        "The river floods every spring when the snow melts in the mountains. Therefore, farmers "
        "plant their crops only after the water has gone down again. ",
        {"entail": [("The river floods every spring when the snow melts in the mountains.", "Therefore",
                     "farmers plant their crops only after the water has gone down again.")],
         "cause_effect": [("The river floods every spring when the snow melts in the mountains.",
                           "Therefore", "farmers plant their crops only after the water has gone down again.")]}),
    "contradict": (
        "Most villages in the valley depend on a single deep well for drinking water. However, the "
        "largest town draws its supply from a reservoir built in the nineteen sixties. ",
        {"contradict": [("Most villages in the valley depend on a single deep well for drinking water.",
                         "However", "the largest town draws its supply from a reservoir built in the nineteen sixties.")],
         "different": [("Most villages in the valley depend on a single deep well for drinking water.",
                        "However", "the largest town draws its supply from a reservoir built in the nineteen sixties.")]}),
    "neutral": (
        "The report lists every pumping station that was repaired during the last year. Moreover , "
        "it describes the staff training programme that started in the autumn months. ",
        {"neutral": [("The report lists every pumping station that was repaired during the last year.",
                      "Moreover", "it describes the staff training programme that started in the autumn months.")]}),
    "effect_cause": (
        "Several farms in the lower valley lost most of their winter wheat this year. Owing to the "
        "unusually late frost that arrived in the middle of the month of May. ",
        {"effect_cause": [("Several farms in the lower valley lost most of their winter wheat this year.",
                           "Owing to", "the unusually late frost that arrived in the middle of the month of May.")]}),
    "similar": (
        "Water meters were installed in every household connected to the public network. In other "
        "words, each family now pays for exactly the amount of water that it uses. ",
        {"similar": [("Water meters were installed in every household connected to the public network.",
                      "In other words", "each family now pays for exactly the amount of water that it uses.")]}),
    "different_with_commas": (
        "The old pipes, most of them laid before the war, leak at almost every joint. But, according "
        "to the engineers, replacing them would cost more than the town earns in a decade. ",
        {"different": [("The old pipes, most of them laid before the war, leak at almost every joint.", "But",
                        "according to the engineers, replacing them would cost more than the town earns in a decade.")]}),
    "definition": (
        "Irrigation efficiency improved in most districts during the dry summer. Evapotranspiration is "
        "defined as the water lost from soil and from the leaves of plants. ",
        {"definition": [("Evapotranspiration", "is defined as", "the water lost from soil and from the leaves of plants.")]}),
    "topic": (
        "The second chapter of the annual report is about the cost of keeping rural pumping stations open. ",
        {"topic": [("The second chapter of the annual report", "is about",
                    "the cost of keeping rural pumping stations open.")]}),
}


def _expected(sub_expected):
    out = {k: [] for k in ["entail", "contradict", "neutral", "cause_effect", "effect_cause", "similar",
                           "different", "definition", "topic"]}
    out.update(sub_expected)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_exact_pairs_per_connective(case):
    text, expected = CASES[case]
    assert Miner().mine(OPEN + text) == _expected(expected)


def test_case_insensitive_and_space_before_comma():
    text = OPEN + ("The river floods every spring when the snow melts in the mountains. thus   , farmers "
                   "plant their crops only after the water has gone down again. ")
    got = Miner().mine(text)
    assert got["entail"] == [("The river floods every spring when the snow melts in the mountains.", "thus",
                              "farmers plant their crops only after the water has gone down again.")]


def test_minimum_length_is_fifty_characters():
    s50 = "Pumping costs rose sharply in every district again"   # 50 characters, no comma
    assert len(s50) == 50
    tail = " However, the committee expects prices to fall again next year after repairs. "
    assert Miner().mine(OPEN + s50 + "." + tail)["contradict"]
    assert not Miner().mine(OPEN + s50[1:] + "." + tail)["contradict"]       # 49 characters


def test_commas_block_nli_but_not_paraphrase():
    text, _ = CASES["different_with_commas"]
    got = Miner().mine(OPEN + text)
    assert got["contradict"] == [] and len(got["different"]) == 1


def test_first_sentence_and_unterminated_last_sentence_are_not_mined():
    body = ("The river floods every spring when the snow melts in the mountains. Therefore, farmers "
            "plant their crops only after the water has gone down again.")
    assert Miner().mine(body + " ")["entail"] == []             # nothing before sentence 1
    assert Miner().mine(OPEN + body)["entail"] == []           # no whitespace after sentence 2
    assert Miner().mine(OPEN + body + "\n")["entail"]


def test_ie_pattern_matches_like_the_reference():
    text = (OPEN + "Only a handful of wells in the district still use the old hand pumps today. Idea, the "
            "council says, is to replace each of them with a solar pump before next winter. ")
    assert len(Miner(exact_reference=True).mine(text)["similar"]) == 1     # "i.e." dots match any char
    assert Miner(exact_reference=False).mine(text)["similar"] == []


def test_windowed_search_equals_findall_over_the_whole_text():
    """The miner searches only around connectives; it must return what findall returns."""
    m = Miner()
    bodies = ["the council approved the new budget for the coming year without any debate",
              "it will pay for two new treatment plants and a larger reservoir near the town",
              "the plan, which was drafted in spring, adds a pipeline along the eastern shore",
              "the first chapter of the annual plan is about the cost of the new treatment plants",
              "Groundwater is defined as the water held underground in the soil or in rock",
              "rain fell", "the plan failed; the vote was lost again in the second round of the year"]
    connectives = ["", "", "However, ", "Thus, ", "therefore , ", "In other words, ", "i.e., ", "Idea, ",
                   "Moreover, ", "due to ", "Owing to ", "No, ", "yes, ", "But ", "Similarly,"]
    marks = [". ", ".  ", "! ", "? ", "... ", ".\n", ".\n\n", ", ", ".", "; ", " "]
    rnd = random.Random(7)
    found = Counter()
    for _ in range(4000):
        text = "".join(rnd.choice(connectives) + rnd.choice(bodies) + rnd.choice(marks)
                       for _ in range(rnd.randint(2, 14)))
        got = m.mine(text)
        for name, pat in m.pairs.items():
            assert got[name] == pat.findall(text), (name, text)
            found[name] += len(got[name])
        assert got["topic"] == m.topic.findall(text), text
        assert got["definition"] == m.definition.findall(text), text
        found["topic"] += len(got["topic"])
    assert all(found[k] > 20 for k in ["entail", "contradict", "neutral", "cause_effect", "effect_cause",
                                       "similar", "different", "topic"]), found


# --------------------------------------------------------------------------------------------------
# the stage

def _doc(i, n_pairs=1, title=True):
    fill = ("Engineers inspected the dam at the northern end of the lake on {d} of March. ")
    pairs = []
    for k in range(n_pairs):
        pairs.append(f"Village number {k} in the valley depends on a single deep well for its water supply. "
                     f"However, town number {k} draws its supply from a reservoir built many decades ago. "
                     + fill.format(d=k + 2))
    head = f"Water supply in the valley, part {i}\n" if title else ""
    return head + OPEN + "".join(pairs)


def test_cap_two_per_subtype_and_counts():
    st = ReadingComprehension(domain="hydrology")
    text = _doc(0, n_pairs=5)
    out = st(pa.table({"id": ["a"], "text": [text]}))
    row = out.to_pylist()[0]
    assert row["rc_contradict"] == 5 and row["rc_different"] == 5 and row["rc_entail"] == 0
    # each mined pair appears once in the document, and once more per task drawn from it
    towns = [f"town number {k} draws" for k in range(5)]
    in_tasks = [t for t in towns if row["text"].lower().count(t) >= 2]
    # contradict and different each draw 2 (possibly the same pair): 2..4 pairs appear twice
    n_tasks = sum(row["text"].lower().count(t) - 1 for t in towns)
    assert n_tasks == 4 and 2 <= len(in_tasks) <= 4
    c = st.counters.to_dict()
    assert c["reading_comprehension/mined/contradict"] == 5 and c["reading_comprehension/used/contradict"] == 2


def test_output_format_and_source_kept():
    st = ReadingComprehension(domain="hydrology")
    texts = [_doc(i) for i in range(3)] + ["", None]
    t = pa.table({"id": ["a", "b", "c", "d", "e"], "text": texts, "url": ["u"] * 5})
    out = st(t)
    assert out.column("source_text").to_pylist() == texts
    assert out.column("url").to_pylist() == ["u"] * 5
    for col in COUNT_COLUMNS:
        assert out.schema.field(col).type == pa.int32()
    rows = out.to_pylist()
    for r in rows[:3]:
        assert "Village number 0 in the valley depends on a single deep well" in r["text"]
        assert r["rc_contradict"] == 1 and r["rc_different"] == 1
        assert "  " not in r["text"]                         # runs of spaces collapsed
    assert rows[3]["text"] == "" and rows[4]["text"] is None and rows[3]["rc_contradict"] == 0
    assert st.counters.to_dict()["reading_comprehension/empty"] == 2


def test_wrapping_frequencies_and_shapes():
    st = ReadingComprehension(domain="hydrology")
    n = 2000
    ids = [f"doc-{i}" for i in range(n)]
    out = st(pa.table({"id": ids, "text": [_doc(0)] * n}))
    s, comp = out.column("rc_summarize").to_pylist(), out.column("rc_completion").to_pylist()
    freq = Counter(zip(s, comp))
    for key, p in {(1, 0): 0.4, (0, 1): 0.1, (1, 1): 0.4, (0, 0): 0.1}.items():
        assert abs(freq[key] / n - p) < 0.04, freq
    title = "Water supply in the valley, part 0"
    for r in out.to_pylist()[:200]:
        if r["rc_summarize"]:
            assert title in r["text"]
        if r["rc_completion"] and not r["rc_summarize"]:
            # completion alone: the title opens the first half
            assert title + "\nThe committee published" in r["text"]
    # no title: never summarised; one sentence: never completed
    out2 = st(pa.table({"id": ids[:300], "text": [_doc(0, title=False)] * 300}))
    assert set(out2.column("rc_summarize").to_pylist()) == {0}
    assert 0.4 < sum(out2.column("rc_completion").to_pylist()) / 300 < 0.6
    one = "A title\nOne single sentence about the reservoir and nothing else at all."
    out3 = st(pa.table({"id": ids[:100], "text": [one] * 100}))
    assert set(out3.column("rc_completion").to_pylist()) == {0}


def test_deterministic_across_runs_and_seeds():
    t = pa.table({"id": [f"d{i}" for i in range(50)], "text": [_doc(i, n_pairs=3) for i in range(50)]})
    a = ReadingComprehension(domain="hydrology")(t)
    b = ReadingComprehension(domain="hydrology")(t)
    assert a.equals(b)
    # another seed changes choices
    c = ReadingComprehension(domain="hydrology", seed=1)(t)
    assert a.column("text").to_pylist() != c.column("text").to_pylist()


def test_same_output_for_different_shard_splits(tmp_path):
    texts = [_doc(i, n_pairs=2) for i in range(60)]
    t = pa.table({"id": [f"d{i}" for i in range(60)], "text": texts})
    one, three = tmp_path / "one", tmp_path / "three"
    one.mkdir(), three.mkdir()
    pq.write_table(t, one / "all.parquet")
    for k, (lo, hi) in enumerate([(0, 7), (7, 40), (40, 60)]):
        pq.write_table(t.slice(lo, hi - lo).take(list(range(hi - lo))[::-1]), three / f"p{k}.parquet")
    results = []
    for src, workers, batch in ((one, 1, 1000), (three, 2, 8)):
        out = str(tmp_path / f"out-{src.name}")
        run_pipeline({"name": "rc", "output": out, "workers": workers, "batch_size": batch,
                      "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": str(src)}}},
                      "stages": [{"stage": "reading_comprehension", "options": {"domain": "hydrology"}}]},
                     progress=False)
        files = glob.glob(os.path.join(out, "reading_comprehension", "*.parquet"))
        got = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
        results.append({r["id"]: r["text"] for r in got})
    assert results[0] == results[1] and len(results[0]) == 60


def test_body_cut_before_mining():
    text = _doc(0, n_pairs=3)
    body_words = len(text.split("\n", 1)[1].split())
    full = ReadingComprehension(domain="x", max_body_tokens=10_000)(pa.table({"id": ["a"], "text": [text]}))
    first_pair_words = len(text.split("\n", 1)[1].split("Engineers")[0].split())
    cut = ReadingComprehension(domain="x", max_body_tokens=first_pair_words + 3, words_per_token=1.0,
                               long_documents="cut")(
        pa.table({"id": ["a"], "text": [text]}))
    assert body_words > first_pair_words + 3
    assert full.column("rc_contradict")[0].as_py() == 3
    # the cut falls just after the first pair: later pairs are not mined and not in the output
    assert cut.column("rc_contradict")[0].as_py() == 1
    assert "Village number 2" not in cut.column("text")[0].as_py()


def test_title_column_and_no_title():
    st = ReadingComprehension(domain="hydrology", title_column="title")
    body = _doc(0, title=False)
    out = st(pa.table({"id": [f"i{k}" for k in range(40)], "text": [body] * 40, "title": ["Dams"] * 40}))
    assert sum(out.column("rc_summarize").to_pylist()) > 10
    assert all("Dams" in r for r, s in zip(out.column("text").to_pylist(), out.column("rc_summarize").to_pylist()) if s)


def test_sentence_splitter_keeps_text_and_abbreviations():
    text = ("Dr. Smith measured the flow at 3.5 m/s. The results, e.g. those in Fig. 2, were clear!  "
            "Next year the team will return.\n\nA new section starts here. It ends.")
    sents = split_sentences(text)
    assert "".join(sents) == text
    assert [s.strip() for s in sents] == [
        "Dr. Smith measured the flow at 3.5 m/s.", "The results, e.g. those in Fig. 2, were clear!",
        "Next year the team will return.", "A new section starts here.", "It ends."]


def test_templates_load_with_versions_and_variety():
    t = load_templates()
    assert all(isinstance(v["version"], int) for v in t.values())
    assert len(t["nli"]["classify"]) >= 30 and len(t["cause_effect"]["effect_cause"]) >= 24
    assert len(t["word2text"]["keywords"]) >= 20 and len(t["document"]["summarize"]) >= 20


def test_bad_user_template_is_a_clear_error(tmp_path):
    import shutil

    from curate.prompts import PROMPTS_DIR
    d = tmp_path / "reading_comprehension"
    shutil.copytree(os.path.join(PROMPTS_DIR, "reading_comprehension"), d)
    p = d / "paraphrase.yaml"
    p.write_text(p.read_text().replace("{sentence2}\"]", "{sentense2}\"]", 1))
    st = ReadingComprehension(domain="x", prompts_dir=str(tmp_path))
    assert any("sentense2" in msg for _, msg in st.check())
    with pytest.raises(StageError, match="sentense2"):
        st.ensure_setup()



def test_templates_is_the_deprecated_name_of_prompts_dir(tmp_path, caplog):
    """One name for "a folder overriding the shipped prompts" in every stage: ``prompts_dir``; the
    old ``templates:`` of users' YAML still works, with a warning."""
    import logging

    from pydantic import ValidationError

    with caplog.at_level(logging.WARNING, logger="curate"):
        st = ReadingComprehension(domain="x", templates=str(tmp_path))
    assert st.config.prompts_dir == str(tmp_path)
    assert "`templates` is deprecated" in caplog.text and "prompts_dir" in caplog.text
    with pytest.raises(ValidationError, match="prompts_dir only"):
        ReadingComprehension(domain="x", templates=str(tmp_path), prompts_dir=str(tmp_path / "other"))
    assert "templates" not in ReadingComprehension.Config.model_fields


GENERAL = ("The weather was mild and the people of the town walked along the river in the evening. "
           "Children played in the park while their parents talked about the news of the week. ")
TERMS = ["nephrotoxicity", "hepatotoxicity", "cardiomyopathy", "bronchiectasis", "angioplasty",
         "tachycardia", "corticosteroids", "pharmacokinetic"]
GLUE = ["Patients with {} were treated for {} and later developed {}.",
        "The study linked {} to {} in adults with {}.",
        "Clinicians reported {} after {} although {} was rare."]


def _domain_lines(n):
    rnd = random.Random(3)
    return [rnd.choice(GLUE).format(*rnd.sample(TERMS, 3)) for _ in range(n)]


def test_keywords_with_trained_domain_tokenizer(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    from curate.text.adaptllm import train_domain_tokenizer

    general = train_domain_tokenizer([GENERAL * 30], str(tmp_path / "general"), 300, 10_000)
    corpus = tmp_path / "domain.txt"
    corpus.write_text("\n".join(_domain_lines(600)))
    st = ReadingComprehension(domain="medicine", keywords={"general_tokenizer": general,
                                                           "train_from": str(corpus), "vocab_size": 400})
    st.workdir = str(tmp_path / "work")
    text = "Case report\n" + OPEN + " ".join(_domain_lines(3)) + " " + GENERAL
    out = st(pa.table({"id": [f"k{i}" for i in range(10)], "text": [text] * 10}))
    assert len(st.keywords.specific) >= 3
    assert set(out.column("rc_keywords").to_pylist()) == {2}   # two keyword sentences, capped at 2
    # every keyword task lists three domain terms taken from its sentence
    for r in out.column("text").to_pylist():
        listed = [m for m in re.findall(r"\b[a-z]{10,}(?:, [a-z]{10,}){2}\b", r)]
        assert listed and all(set(m.split(", ")) <= set(TERMS) for m in listed), r
    assert os.path.exists(glob.glob(str(tmp_path / "work" / "domain-*.model"))[0])


def test_same_bytes_under_another_python_hash_seed():
    import hashlib
    import subprocess
    import sys

    code = ("import hashlib, pyarrow as pa, sys; sys.path.insert(0, 'tests/stages/synth');"
            "from test_reading_comprehension import _doc;"
            "from curate.stages.synth.reading_comprehension import ReadingComprehension as R;"
            "t = pa.table({'id': [f'd{i}' for i in range(30)], 'text': [_doc(i, 3) for i in range(30)]});"
            "print(hashlib.sha256('\\x00'.join(R(domain='x')(t).column('text').to_pylist()).encode()).hexdigest())")
    from helpers import ROOT as root
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        digests.add(r.stdout.strip())
    t = pa.table({"id": [f"d{i}" for i in range(30)], "text": [_doc(i, 3) for i in range(30)]})
    here = hashlib.sha256("\x00".join(ReadingComprehension(domain="x")(t).column("text").to_pylist()).encode()).hexdigest()
    assert digests == {here}


# -- long documents split, wrapped lines joined, rendering -----------------------------------------

def _long_doc(n_pairs: int) -> str:
    return "Water supply\n" + "".join(
        f"Village number {k} in the valley depends on a single deep well for its water. However, town "
        f"number {k} draws its supply from a reservoir built in the nineteen sixties.\n\n" for k in range(n_pairs))


def test_long_documents_are_split_into_pieces_not_cut():
    text = _long_doc(36)                       # 1,116 words: 3 pieces of at most 400 words (12 pairs)
    t = pa.table({"id": ["a"], "text": [text]})
    st = ReadingComprehension(domain="x", max_body_tokens=400, words_per_token=1.0)
    out = st(t)
    assert out.num_rows == 3 and out.column("id").to_pylist() == ["a#0", "a#1", "a#2"]
    pieces = out.column("source_text").to_pylist()
    assert "".join(pieces) == text.split("\n", 1)[1]          # nothing lost, in order
    assert all(len(p.split()) <= 400 for p in pieces) and all(p.endswith("\n\n") for p in pieces[:-1])
    whole = ReadingComprehension(domain="x", max_body_tokens=10_000)(t).column("rc_contradict")[0].as_py()
    assert whole >= 15 and sum(out.column("rc_contradict").to_pylist()) >= whole - 2   # a cut may split a pair
    assert "Village number 35" in out.column("text")[2].as_py()
    c = st.counters.to_dict()
    assert c["reading_comprehension/split_documents"] == 1 and c["reading_comprehension/pieces"] == 3
    assert "reading_comprehension/chars_cut" not in c
    # the reference's cut, as an option: one row, the rest counted as cut and warned about
    ref = ReadingComprehension(domain="x", max_body_tokens=400, words_per_token=1.0, long_documents="cut")
    out = ref(t)
    assert out.num_rows == 1 and out.column("rc_contradict")[0].as_py() <= whole / 3 + 1
    c = ref.counters.to_dict()
    assert c["reading_comprehension/chars_cut"] > 0.6 * c["reading_comprehension/chars_in"]
    from curate.pipeline.warnings import step_warnings
    w = step_warnings({"stage": "reading_comprehension", "in": 1, "out": 1, "dropped": {}, "errors": {},
                       "counters": c})
    assert [x["code"] for x in w] == ["rc_text_cut"] and "was cut before mining" in w[0]["message"]


WRAPPED = """Water supply in the valley
The valley has many villages and a few towns.
Most villages in the valley depend on a single deep well for drinking
water. However, the largest town draws its supply from a reservoir built in the
nineteen sixties. The report lists every pumping station that was repaired in
the last year.

    def pump(station):
        return station.flow  # code lines stay as they are
- a list item that is short
- another list item
"""


def test_wrapped_lines_are_joined_before_mining_and_code_is_kept():
    t = pa.table({"id": ["a"], "text": [WRAPPED]})
    st = ReadingComprehension(domain="x")
    out = st(t).to_pylist()[0]
    assert out["rc_contradict"] == 1
    assert ReadingComprehension(domain="x", unwrap_lines=False)(t).column("rc_contradict")[0].as_py() == 0
    assert "    def pump(station):\n        return station.flow # code lines stay as they are" in out["text"]
    assert "- a list item that is short\n- another list item" in out["text"]
    assert st.counters.to_dict()["reading_comprehension/unwrapped_lines"] == 3


def test_nli_answers_never_land_on_an_option_line():
    import re

    st = ReadingComprehension(domain="x")
    st.ensure_setup()
    item = ("The river floods every spring when the snow melts in the mountains.", "Yes",
            "farmers plant their crops only after the water has gone down again.")
    rendered = set()
    for seed in range(400):
        rendered.add(st._example("nli", "entail", item, random.Random(seed)))
    option_templates = [r for r in rendered if "- Maybe" in r or "- Moreover" in r]
    assert len(option_templates) >= 3
    for r in rendered:
        assert not re.search(r"^- (Yes|No|Maybe|Therefore|However|Moreover) \S", r, re.M), r
        assert not re.search(r"Choices: Therefore, However, Moreover \S", r), r


def test_title_from_a_column_is_not_repeated_by_the_body():
    text = "Built-in Functions\nThe interpreter has a number of functions and types built into it."
    t = pa.table({"id": [f"d{i}" for i in range(40)], "text": [text] * 40, "title": ["Built-in Functions"] * 40})
    st = ReadingComprehension(domain="x", title_column="title")
    for r in st(t).to_pylist():
        assert r["text"].count("Built-in Functions") == (1 if r["rc_summarize"] or r["rc_completion"] or
                                                         "Built-in Functions" in r["text"] else 0)
        assert r["text"].count("Built-in Functions") <= 1
    assert st.counters.to_dict()["reading_comprehension/title_line_removed"] == 40
