"""configs/domain_adaptation.yaml runs through `curate run` on pages and replay text made here."""

import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_configs import CONFIGS, run_cli

ARTICLES = {
    "stewardship": (
        "Antibiotic stewardship in regional hospitals",
        ["Doctors prescribe antibiotics for many infections seen in primary care clinics across the region.",
         "Hospitals that track every single prescription reduce resistant infections over several years. "
         "Therefore, the programmes are now required by regulators in most European countries and regions.",
         "Some clinicians resist the weekly audits because they take time away from their patients. "
         "However, the audits take less than ten minutes per ward on an ordinary weekday morning.",
         "Resistance spreads quickly between wards and between hospitals in the same large city. "
         "In other words, a single careless ward can undo the work of an entire hospital network.",
         "Stewardship is defined as the coordinated effort to improve how antibiotics are prescribed and used.",
         "Nurses and pharmacists take part in the reviews, and they report problems to the infection team "
         "whenever a prescription looks wrong or a course of treatment runs longer than the guideline allows."]),
    "asthma": (
        "Childhood asthma and air quality",
        ["Asthma is the most common chronic disease among children in the cities of the region.",
         "Admissions to the children's hospital rise sharply during the winter months every year. "
         "Due to the heavy traffic and the wood stoves that burn in many older houses of the city.",
         "The new clinic offers inhaler training to every family at the first appointment of the child. "
         "Moreover, it sends a nurse to the school when a child has had two attacks in one month.",
         "Parents often stop the preventive inhaler once the symptoms disappear for a few weeks. "
         "But the symptoms usually come back within a month when the treatment stops too early.",
         "The annual report of the clinic is about the link between air pollution and emergency visits.",
         "Doctors and teachers meet twice a year to plan the care of the children with the most severe "
         "disease, and they share a simple written plan that explains what to do during an attack."]),
    "vaccines": (
        "Vaccination of older adults",
        ["Vaccination rates among older adults rose steadily over the previous decade in most regions.",
         "Family doctors now send a letter to every patient over sixty five before the winter season. "
         "Thus, more patients arrive at the clinic during the first weeks of the vaccination campaign.",
         "The committee reviewed every adverse event reported during the trial of the new vaccine. "
         "Additionally, it examined the records of patients who left the study early for any reason.",
         "Immunosenescence is defined as the gradual decline of the immune system that comes with age.",
         "Pharmacists in many towns can also give the vaccine, which helps patients who live far from "
         "a clinic and who cannot travel easily during the cold and dark months of the year."]),
}


def page(title, paragraphs):
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (f"<html lang='en'><head><title>{title}</title></head><body><article><h1>{title}</h1>"
            f"{body}</article></body></html>")


@pytest.mark.slow   # ~1 min: a real `curate run` with extraction, language id, filters, dedup
def test_domain_adaptation_config(tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    for name, (title, paras) in ARTICLES.items():
        (pages / f"{name}.html").write_text(page(title, paras))
    (pages / "stewardship-copy.html").write_text(page(*ARTICLES["stewardship"]))   # exact duplicate
    replay = tmp_path / "replay.jsonl"
    general = ["The river runs through the old town and the bridges are busy in the morning.",
               "A good loaf of bread needs flour, water, salt, yeast and a little patience.",
               "The library opens at nine and closes at six, except on public holidays.",
               "Trains to the coast leave every hour from the main station in summer."]
    with open(replay, "w") as fh:
        for i in range(200):
            fh.write(json.dumps({"id": f"g{i}", "text": general[i % 4] + f" Note {i}."}) + "\n")
    out = str(tmp_path / "out")
    run_cli(os.path.join(CONFIGS, "domain_adaptation.yaml"),
            {"CURATE_OUTPUT": out, "DOMAIN_PAGES": str(pages), "REPLAY_PATHS": str(replay),
             "DOMAIN": "medicine"})
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]
    assert stats["extract_html"]["out"] == 4
    assert stats["exact_dedup"]["out"] == 3                       # the copy is gone
    assert stats["reading_comprehension"]["in"] == stats["reading_comprehension"]["out"] == 3
    rc = pa.concat_tables([pq.read_table(f) for f in glob.glob(os.path.join(out, "reading_comprehension", "*.parquet"))])
    rows = {r["title"]: r for r in rc.to_pylist()}
    s = rows["Antibiotic stewardship in regional hospitals"]
    assert (s["rc_entail"], s["rc_contradict"], s["rc_similar"], s["rc_definition"]) == (1, 1, 1, 1)
    assert rows["Childhood asthma and air quality"]["rc_effect_cause"] == 1
    assert rows["Childhood asthma and air quality"]["rc_topic"] == 1
    for r in rows.values():
        # the page's heading repeats its title: the body after it is in the output, the title once
        head, _, body = r["source_text"].partition("\n")
        assert head == r["title"] and r["text"].count(r["title"]) <= 1
        assert body in r["text"] or r["rc_completion"] == 1   # completion splits the body
        assert "medicine" in r["text"] or r["rc_summarize"] + r["rc_completion"] == 0
    # the mixture: domain : replay = 1 : 0.1 by (whitespace) tokens
    c = stats["mix"]["counters"]
    assert abs(c["mix/proportion/reading_comprehension"] - 1 / 1.1) < 0.01
    assert abs(c["mix/proportion/replay"] - 0.1 / 1.1) < 0.01
    mixed = pa.concat_tables([pq.read_table(f) for f in glob.glob(os.path.join(out, "mix", "*.parquet"))])
    n = {k: sum(len(t.split()) for t, m in zip(mixed.column("text").to_pylist(),
                                               mixed.column("mix_input").to_pylist()) if m == k)
         for k in ("reading_comprehension", "replay")}
    assert n["reading_comprehension"] == c["mix/tokens/reading_comprehension"]
    assert abs(n["replay"] / sum(n.values()) - 0.1 / 1.1) < 0.01
