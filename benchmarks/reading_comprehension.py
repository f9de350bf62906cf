"""reading_comprehension speed and faithfulness: our stage through the runner vs the AdaptLLM miner.

Documents: N texts of exactly 2,000 whitespace words of English prose available offline (windows of
the Python language reference shipped with Python, ``pydoc_data.topics``, with three paragraphs of
clinical prose written for this benchmark in the part that survives the cut), each with a title line.

Ours runs through ``run_pipeline`` (read_parquet -> reading_comprehension, one worker), in two
set-ups: the default body cut (whitespace words) and, when the reference is given, the reference's
own cut (its general SentencePiece model) plus domain keywords with its two SentencePiece models, so
that both mine the very same body. Prints docs/s and the stage-only docs/s (the runner's per-step
seconds), and the stage's documents per CPU-second as a library call (the per-core figure, which
a busy machine distorts less than wall-clock time).

With ``--reference PATH`` (a local copy of LMOps' ``adaptllm`` folder: ``utils/read.py`` and
``data_samples/{general,domain}.spm``; needs ``pysbd`` and ``sentencepiece``), the reference miner
runs in this process on the same documents the way its ``raw2read.py`` does (cut, pysbd, mine every
task type, assemble) and the raw matches per sub-type of both are printed side by side: they must
be equal. Nothing of the reference is imported unless the path is given.

    python benchmarks/reading_comprehension.py [--docs 200] [--reference /path/to/adaptllm]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

REF_NAMES = {"Entail": "entail", "Contradict": "contradict", "Neutral": "neutral",
             "Cause-effect": "cause_effect", "Effect-cause": "effect_cause", "Similar": "similar",
             "Different": "different", "definition": "definition", "topic": "topic", "word2text": "keywords"}


# Clinical prose written for this benchmark, so that every sub-type has matches to compare
# (the language reference alone has few: its sentences are full of commas).
PROSE = [
    "Patients with chronic kidney disease often receive several drugs at the same time. Therefore, "
    "clinicians monitor nephrotoxicity and hepatotoxicity closely during every outpatient visit.",
    "Most hospital infections are caused by bacteria that are already present on the skin. However, a "
    "growing number of outbreaks are traced back to contaminated medical devices in intensive care.",
    "The trial enrolled adults with moderate asthma from eleven clinics in three countries. Moreover, it "
    "recorded hospital admissions for every participant during the two years that followed.",
    "Several patients in the cardiology ward developed arrhythmias during the first week of treatment. "
    "Due to the interaction between the antiarrhythmic drug and the newly added antibiotic therapy.",
    "The new protocol shortens the time between diagnosis and the first dose of antibiotics. In other "
    "words, patients with suspected sepsis are treated before the laboratory results are available.",
    "Cardiomyopathy is defined as a disease of the heart muscle that makes pumping blood harder.",
    "The annual report of the regional hospital network is about the shortage of trained nurses in rural areas.",
    "Phosphorylation of the receptor triggers proliferation, differentiation and hybridization signals "
    "in pretreatment samples analysed by spectrometry.",
    "Researchers measured blood pressure in every participant at the start of the study. Thus, the "
    "effect of the diet could be separated from the effect of the medication itself.",
    "Vaccination rates among older adults rose steadily over the previous decade in most regions. But, "
    "according to the survey, coverage among younger adults fell in the same period.",
    "Granulocyte counts and oxidoreductase activity were elevated in the pathogenic strains, and "
    "fermentation of the precursors was pronounced.",
    "The committee reviewed every adverse event reported during the trial of the new vaccine. "
    "Additionally, it examined the records of patients who left the study early for any reason.",
]


def make_docs(n: int, words: int = 2000) -> pa.Table:
    """N documents of exactly ``words`` words: three clinical paragraphs spread over the first
    part (the part that survives the cut) and the language reference for the rest."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    step = max(1, (len(spans) - words) // max(1, n))
    ids, texts = [], []
    for i in range(n):
        # a lead sentence: a mined pair needs an end mark before its first sentence
        paras = ["From the clinical notes. " + PROSE[(i + k * 5) % len(PROSE)] for k in range(3)]
        need = words - sum(len(p.split()) for p in paras)
        lo = (i * step) % (len(spans) - need)
        chunk = lambda a, b: text[spans[lo + a][0]: spans[lo + b - 1][1]]
        parts = [chunk(0, 120), paras[0], chunk(120, 300), paras[1], chunk(300, 500), paras[2],
                 chunk(500, need)]
        ids.append(f"bench-{i}")
        texts.append(f"Clinical notes and the Python language reference, part {i}\n" + "\n\n".join(parts) + "\n")
    return pa.table({"id": ids, "text": texts})


def run_ours(path: str, options: dict, workdir: str) -> tuple[float, float, dict[str, int]]:
    from curate.run import run_pipeline

    out = os.path.join(workdir, "out-" + str(abs(hash(json.dumps(options, sort_keys=True))) % 10**8))
    t = time.perf_counter()
    run_pipeline({"name": "bench-rc", "output": out, "report": False, "workers": 1, "batch_size": 256,
                  "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": path}}},
                  "stages": [{"stage": "reading_comprehension", "options": options}]},
                 progress=False, force=True)
    wall = time.perf_counter() - t
    stats = json.load(open(os.path.join(out, "stats.json")))["steps"]["reading_comprehension"]
    files = sorted(f for f in os.listdir(os.path.join(out, "reading_comprehension")) if f.endswith(".parquet"))
    t = pa.concat_tables([pq.read_table(os.path.join(out, "reading_comprehension", f)) for f in files])
    counts = {k[3:]: sum(t.column(k).to_pylist()) for k in t.schema.names if k.startswith("rc_")}
    return wall, stats.get("seconds") or wall, counts


def cpu_rate_ours(table: pa.Table, options: dict) -> float:
    """Documents per CPU-second of the stage as a library call (per core; robust to a busy machine)."""
    from curate.stages.synth.reading_comprehension import ReadingComprehension

    st = ReadingComprehension(**options)
    st(table.slice(0, 10))
    t = time.process_time()
    st(table)
    return table.num_rows / (time.process_time() - t)


def run_reference(ref: str, table: pa.Table, domain: str) -> tuple[float, float, dict[str, int]]:
    sys.path.insert(0, ref)
    from pysbd import Segmenter
    from utils.read import TYPES, type_map  # the reference, from the given local path

    general, dom = (os.path.join(ref, "data_samples", f) for f in ("general.spm", "domain.spm"))
    inited = {}
    for ty in TYPES:
        inited[ty] = type_map.cls_dic[ty]()
        inited[ty].init_spm(general, dom)
    overall = type_map.cls_dic["overall"]()
    overall.init_spm(general, dom)
    seg = Segmenter(language="en", clean=False)
    counts = {v: 0 for v in REF_NAMES.values()}
    texts = table.column("text").to_pylist()
    t, cpu = time.perf_counter(), time.process_time()
    for text_id, text in enumerate(texts):
        # the steps of raw2read.search: title line, cut, sentences, mine every type, assemble
        title = text.split("\n")[0]
        body = "\n".join(text.split("\n")[1:])
        body = overall.truncate_sentence(body, max_len=overall.max_seq_len - 200)
        sents = seg.segment(body)
        entry = {"text_id": text_id}
        for ty in TYPES:
            entry[ty], _ = inited[ty].mine(text=body, domain=domain, title=title, sents=copy.deepcopy(sents))
        for ty in ("nli", "common_reason", "paraphrase", "word2text"):
            for sub, found in entry[ty].items():
                counts[REF_NAMES[sub]] += len(found)
        overall.format_recomprehension(copy.deepcopy(entry))
    return time.perf_counter() - t, time.process_time() - cpu, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--ref-docs", type=int, default=None, help="documents for the reference (default: all)")
    ap.add_argument("--reference", default=None, help="local path of LMOps' adaptllm folder")
    ap.add_argument("--domain", default="biomedicine")
    a = ap.parse_args()

    table = make_docs(a.docs)
    words = [len(t.split("\n", 1)[1].split()) for t in table.column("text").to_pylist()]
    print(f"{table.num_rows} documents of {min(words)}-{max(words)} words (plus a title line)")
    with tempfile.TemporaryDirectory(prefix="bench-rc-") as tmp:
        path = os.path.join(tmp, "docs.parquet")
        pq.write_table(table, path)
        ref_mode = {"long_documents": "cut", "unwrap_lines": False}   # the reference's cut, lines as given
        runs = [("ours, whitespace cut", {"domain": a.domain, **ref_mode})]
        if a.reference:
            spm_dir = os.path.join(a.reference, "data_samples")
            runs.append(("ours, reference cut + keywords",
                         {"domain": a.domain, **ref_mode, "tokenizer": os.path.join(spm_dir, "general.spm"),
                          "keywords": {"general_tokenizer": os.path.join(spm_dir, "general.spm"),
                                       "domain_tokenizer": os.path.join(spm_dir, "domain.spm")}}))
        results = {}
        for name, opts in runs:
            run_ours(path, opts, tmp)  # warm-up (imports, tokenizer load)
            wall, stage_s, counts = run_ours(path, opts, tmp)
            cpu_rate = cpu_rate_ours(table, opts)
            results[name] = (wall, stage_s, counts, cpu_rate)
            print(f"{name:<34} {table.num_rows / wall:8.1f} docs/s (whole run)   "
                  f"{table.num_rows / stage_s:8.1f} docs/s (stage)   {cpu_rate:8.1f} docs/CPU-s (stage)")
        if not a.reference:
            print("reference: skipped (give --reference PATH to compare)")
            return
        n_ref = a.ref_docs or table.num_rows
        ref_s, ref_cpu, ref_counts = run_reference(a.reference, table.slice(0, n_ref), a.domain)
        ref_rate, ref_cpu_rate = n_ref / ref_s, n_ref / ref_cpu
        print(f"{'reference (raw2read steps)':<34} {ref_rate:8.1f} docs/s ({n_ref} documents)"
              f"{'':<22}{ref_cpu_rate:8.1f} docs/CPU-s")
        for name, (wall, stage_s, _, cpu_rate) in results.items():
            print(f"  ratio {name}: {table.num_rows / wall / ref_rate:6.1f}x (whole run, wall clock)   "
                  f"{cpu_rate / ref_cpu_rate:6.1f}x (CPU time)")
        ours_counts = results["ours, reference cut + keywords"][2]  # (wall, stage s, counts, cpu)
        if n_ref != table.num_rows:
            _, _, ours_counts = run_ours(pq_slice(table, n_ref, tmp), runs[1][1], tmp)
        print(f"\n{'raw matches':<14} {'ours':>8} {'reference':>10}")
        same = True
        for sub in REF_NAMES.values():
            eq = ours_counts[sub] == ref_counts[sub]
            same &= eq
            print(f"{sub:<14} {ours_counts[sub]:>8} {ref_counts[sub]:>10}  {'equal' if eq else 'DIFFERENT'}")
        print("all equal" if same else "SOME COUNTS DIFFER")


def pq_slice(table: pa.Table, n: int, tmp: str) -> str:
    path = os.path.join(tmp, f"docs-{n}.parquet")
    pq.write_table(table.slice(0, n), path)
    return path


if __name__ == "__main__":
    main()
