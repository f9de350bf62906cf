"""Regenerate tests/text/data/prox_parity.json: seeded ProX cases with the reference's outputs.

The parity test (tests/text/test_prox_parity.py) runs curate's executor (curate/text/prox.py) on the
cases of that file and compares with the outputs recorded here from the reference code of
GAIR-NLP/ProX, which cannot be part of this repository. To regenerate (or add cases), point this
script at a ProX checkout; nothing of it is copied, its functions are only called:

    git clone https://github.com/GAIR-NLP/ProX /tmp/prox_ref        # or: git archive HEAD utils data_gen
    python tests/tools/prox_fixture.py /tmp/prox_ref [--out tests/text/data/prox_parity.json] [--seed 0]

Reference functions used: ``utils/chunk_utils.py`` (``execute_operations``,
``execute_meta_operations``), ``utils/doc_utils.py`` (``execute_meta_operations``) and, from
``data_gen/tasks/apply_chunk_refining.py``, ``trunc_text`` and ``merge_chunks`` (taken out of the
file with ``ast``, because the file imports vLLM and datatrove at the top).

To check curate's executor against the reference on other seeds without writing a file (prints
each mismatch, exits 1 when there is one)::

    PYTHONPATH=. python tests/tools/prox_fixture.py /tmp/prox_ref --seed 7 --compare

A fixture of other cases in the same format runs through the parity test with
``CURATE_PROX_FIXTURE=/path/to/cases.json pytest tests/text/test_prox_parity.py``.

Case kinds (all seeded, so the same seed gives the same file):

- ``chunk``: a document and a chunk-level program (or several chunk answers, joined as the
  reference's ``merge_chunks`` + ``strip``), thresholds; expected: every output of
  ``execute_operations`` and the final text of ``execute_meta_operations`` (or the exception the
  reference raised, e.g. ``ZeroDivisionError`` on a document without words);
- ``doc``: a document-level answer; expected: kept or dropped;
- ``split``: a document cut into numbered chunks by ``trunc_text`` with a stand-in tokenizer
  (``words+1``: whitespace words plus a BOS, or ``chars/4``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "llm", "data", "prox_parity.json")

# --------------------------------------------------------------------------------------------------
# the reference


def load_reference(prox_dir: str) -> dict:
    chunk = runpy.run_path(os.path.join(prox_dir, "utils", "chunk_utils.py"))
    doc = runpy.run_path(os.path.join(prox_dir, "utils", "doc_utils.py"))
    path = os.path.join(prox_dir, "data_gen", "tasks", "apply_chunk_refining.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("trunc_text", "merge_chunks")]
    ns: dict = {}
    exec(compile(ast.Module(body=fns, type_ignores=[]), path, "exec"), ns)
    return {"execute_operations": chunk["execute_operations"], "chunk_meta": chunk["execute_meta_operations"],
            "doc_meta": doc["execute_meta_operations"], "trunc_text": ns["trunc_text"],
            "merge_chunks": ns["merge_chunks"]}


class StandIn:
    """A tokenizer stand-in for ``trunc_text`` (only ``encode`` is called)."""

    def __init__(self, kind: str):
        self.kind = kind

    def encode(self, s: str) -> list[int]:
        if self.kind == "words+1":
            return [0] * (len(s.split()) + 1)
        return [0] * ((len(s) + 3) // 4)


# --------------------------------------------------------------------------------------------------
# documents

WORDS = ("the of and to in is for on that with as by at from this be are was it an or which data model "
         "price river copper engine market theory protein court tax signal network cell energy").split()
NOISE = ["Home | About | Contact", "Share on Facebook", "Click here to subscribe!", "Copyright (c) 2023 Example Inc.",
         "Posted by admin at 10:42 PM", "Tags: news, tech, \"AI\"", "Next >>", "Login = Sign up", "[1] [2] [3] Next",
         "Advertisement", "    ", "", "\t", "Read more...", "© All rights reserved.", "Cookies: we use (some) cookies.",
         "[000]already numbered line", "a,b,c = 1,2,3", "price: $5 (approx.)", "Ünïcödé — “quoted” ‘text’ …",
         'He said "hello" and left.', "line with = sign and ) paren", "x" * 60]


def sentence(rng: random.Random) -> str:
    n = rng.randint(3, 10)
    s = " ".join(rng.choice(WORDS) for _ in range(n))
    return s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?", ":", ""])


def document(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.03:
        return rng.choice(["", " ", "\n", "\n\n  \n", "\t"])
    if r < 0.08:
        return sentence(rng)  # one line
    n = rng.randint(2, 22)
    lines = []
    for _ in range(n):
        x = rng.random()
        if x < 0.55:
            lines.append(" ".join(sentence(rng) for _ in range(rng.randint(1, 2))))
        elif x < 0.9:
            lines.append(rng.choice(NOISE))
        else:
            lines.append("")
    text = "\n".join(lines)
    if rng.random() < 0.1:
        text += "\n"
    if rng.random() < 0.05:
        text = "\n" + text
    return text


# --------------------------------------------------------------------------------------------------
# programs


def number(rng: random.Random, n_lines: int) -> str:
    r = rng.random()
    if r < 0.6:
        return str(rng.randint(0, max(0, n_lines - 1)))
    if r < 0.75:
        return str(rng.randint(n_lines, n_lines + 6))
    if r < 0.8:
        return str(-rng.randint(1, 4))
    return rng.choice([" 3", "3 ", "+2", "1_0", "3.0", "abc", "", "0x1", "007", "10000", "٣", "1e2", "'4'"])


def remove_op(rng: random.Random, n_lines: int) -> str:
    a, b = number(rng, n_lines), number(rng, n_lines)
    if rng.random() < 0.6 and a.lstrip("-").isdigit() and b.lstrip("-").isdigit() and int(a) > int(b):
        a, b = b, a  # mostly well ordered; sometimes reversed
    r = rng.random()
    if r < 0.7:
        return f"remove_lines(line_start={a}, line_end={b})"
    return rng.choice([
        f"remove_lines(line_start = {a}, line_end = {b})",
        f"remove_lines(line_start={a},line_end={b})",
        f"remove_lines(line_end={b}, line_start={a})",
        f"remove_lines(line_start={a})",
        f"remove_lines(line_start={a}, line_end={b}",
        f"remove_lines line_start={a}, line_end={b}",
        f"remove_lines(line_start={a}, line_end={b}, extra=1)",
        f"remove_lines({a}, {b})",
        f"remove_lines(start={a}, end={b}))",
        "remove_lines()",
        "remove_lines(all=True)",
        f"remove_lines(line_start={a}, line_end={b}, all=True)",
        f"remove_lines)(line_start={a}, line_end={b}",
        f"remove_lines(line_start={a}, line_end={b}) # navigation",
        f"remove_lines(line_start=={a}, line_end={b})",
    ])


def piece(rng: random.Random, text: str) -> str:
    """A substring of the document (so that a normalisation does something), or a made-up string."""
    if text.strip() and rng.random() < 0.75:
        i = rng.randrange(len(text))
        j = min(len(text), i + rng.randint(1, 12))
        s = text[i:j].split("\n")[0]
        if s:
            return s
    return rng.choice(["foo", "Click here", " ", "", "\"", "a\\\"b", "(c)", ",", "=", "...", "—", "  "])


def normalize_op(rng: random.Random, text: str) -> str:
    s, t = piece(rng, text), rng.choice(["", "X", "and", "the price", "\\\"q\\\"", "a, b", "é", " "])
    r = rng.random()
    if r < 0.55:
        return f'normalize(source_str="{s}", target_str="{t}")'
    return rng.choice([
        f'normalize(source_str="{s}")',
        f'normalize(source_str="{s}", target_str="{t}"',
        f'normalize(source_str={s}, target_str={t})',
        f'normalize(source_str="{s}",target_str="{t}")',
        f'normalize(source_str= "{s}", target_str= "{t}")',
        f'normalize("{s}", "{t}")',
        f'normalize(source_str="{s}", target_str="{t}", extra="1")',
        'normalize(source_str="say \\"hi\\"", target_str="say hi")',
        'normalize(source_str="a, b", target_str="c")',
        'normalize(source_str=":)", target_str="")',
        'normalize(source_str="x=y", target_str="z")',
        f'normalize source_str="{s}"',
        "normalize()",
        f'normalize(source_str="{s}", target_str="{t}") and more',
        f'normalize(target_str="{t}", source_str="{s}")',
    ])


def other_op(rng: random.Random) -> str:
    return rng.choice(["keep_chunk()", "keep_chunk()", "keep_doc()", "drop_doc()", "", " ", "delete_line(3)",
                       "Here is the program:", "```python", "```", "# remove the footer", "  remove_lines(line_start=0, line_end=1)",
                       "\tnormalize(source_str=\"the\", target_str=\"a\")", "remove_line(line_start=0, line_end=1)",
                       "normalise(source_str=\"the\", target_str=\"a\")", "keep_chunk", "REMOVE_LINES(line_start=0, line_end=0)",
                       "remove_lines(line_start=0, line_end=0)\r", "print('hello')"])


def program(rng: random.Random, text: str) -> str:
    n_lines = len(text.split("\n"))
    r = rng.random()
    if r < 0.1:
        return rng.choice(["keep_chunk()", "", " ", "keep_chunk()\n", " keep_chunk() "])
    ops = []
    for _ in range(rng.randint(1, 7)):
        x = rng.random()
        ops.append(remove_op(rng, n_lines) if x < 0.5 else normalize_op(rng, text) if x < 0.8 else other_op(rng))
    if rng.random() < 0.05:
        ops.append("remove_lines(line_start=0, line_end=%d)" % rng.choice([10 ** 5, n_lines * 3]))
    sep = "\n"
    return sep.join(ops) + rng.choice(["", "", "\n", " ", "\n\n"])


def chunk_answers(rng: random.Random, text: str) -> list[str]:
    """Several chunk answers (each may carry spaces around it), as the model gives per chunk."""
    return [rng.choice(["", " ", "  "]) + program(rng, text) + rng.choice(["", " "]) for _ in range(rng.randint(1, 4))]


# --------------------------------------------------------------------------------------------------


def run_chunk(ref: dict, text: str, prog: str, kw: dict) -> dict:
    try:
        processed, pairs, noise, ranges, errors = ref["execute_operations"](text, prog.strip(" ").split("\n"))
        ops = {"processed": processed, "normalizations": [list(p) for p in pairs], "removed_lines": noise,
               "remove_ranges": [list(r) for r in ranges], "error_ops": errors}
    except Exception as exc:  # recorded: the parity test expects the same failure class
        ops = {"exception": type(exc).__name__}
    try:
        out = {"text": ref["chunk_meta"](text, prog, **kw)}
    except Exception as exc:
        out = {"exception": type(exc).__name__}
    return {"execute": ops, "refine": out}


def build(ref: dict, seed: int, n_chunk: int, n_doc: int, n_split: int) -> dict:
    rng = random.Random(seed)
    cases = []
    for k in range(n_chunk):
        text = document(rng)
        kw = {}
        if rng.random() < 0.25:
            kw = {"threshold_1": rng.choice([0.0, 0.3, 0.5, 0.9, 1.0]), "threshold_2": rng.choice([0.95, 0.5, 0.0, 1.0]),
                  "error_op": rng.choice([1, 2, 3, 5])}
        if rng.random() < 0.3:
            answers = chunk_answers(rng, text)
            prog = ref["merge_chunks"]([a.strip(" ") for a in answers], [len(answers)])[0]
            case = {"kind": "chunk", "id": f"chunk-{k}", "text": text, "answers": answers, "program": prog, "options": kw}
        else:
            prog = program(rng, text)
            case = {"kind": "chunk", "id": f"chunk-{k}", "text": text, "program": prog, "options": kw}
        case["expected"] = run_chunk(ref, text, prog, kw)
        cases.append(case)
    doc_answers = ["keep_doc()", "drop_doc()", " drop_doc() ", "keep_doc()\n", "", "I would drop this document.",
                   "keep_doc() # not dropped", "DROP_DOC()", "Drop_doc()", "keep", "undroppable", "drop",
                   "keep_doc()\ndrop_doc()", "remove_lines(line_start=0, line_end=1)"]
    for k in range(n_doc):
        text = sentence(rng) if rng.random() < 0.9 else document(rng)
        ans = doc_answers[k] if k < len(doc_answers) else rng.choice(doc_answers) + rng.choice(["", " ", "\n", "."])
        cases.append({"kind": "doc", "id": f"doc-{k}", "text": text, "program": ans,
                      "expected": {"text": ref["doc_meta"](text, ans)}})
    for k in range(n_split):
        text = document(rng)
        if rng.random() < 0.3:
            text = "\n".join(document(rng) for _ in range(rng.randint(2, 4)))
        if rng.random() < 0.1:
            text += "\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))  # one long line
        tok = rng.choice(["words+1", "chars/4"])
        max_token = rng.choice([5, 10, 20, 40, 80, 1500])
        digits = rng.choice([3, 3, 3, 1, 2, 4])
        chunks = ref["trunc_text"](text, StandIn(tok), max_token=max_token, max_digits=digits)
        cases.append({"kind": "split", "id": f"split-{k}", "text": text, "tokenizer": tok, "max_tokens": max_token,
                      "digits": digits, "expected": {"chunks": chunks}})
    return {"about": "ProX executor parity cases with the outputs of the GAIR-NLP/ProX reference code; "
                     "regenerate with tests/tools/prox_fixture.py (see its docstring)",
            "seed": seed, "cases": cases}


def compare(cases: list[dict]) -> list[str]:
    """Mismatches between curate's executor and the expected outputs of ``cases``."""
    from curate.text.prox import chunk_lines, doc_keeps, execute, join_programs, refine

    counts = {"words+1": lambda s: len(s.split()) + 1, "chars/4": lambda s: (len(s) + 3) // 4}
    bad = []
    for c in cases:
        exp = c["expected"]
        if c["kind"] == "chunk":
            if "answers" in c and join_programs(c["answers"]) != c["program"]:
                bad.append(f"{c['id']}: joined program differs")
            r = execute(c["text"], c["program"])
            got = {"processed": r.processed, "normalizations": [list(p) for p in r.normalizations],
                   "removed_lines": r.removed_lines, "remove_ranges": [list(x) for x in r.remove_ranges],
                   "error_ops": r.error_ops}
            if got != exp["execute"]:
                bad.append(f"{c['id']}: execute {got!r} != {exp['execute']!r}")
            out = refine(c["text"], c["program"], **c["options"])
            if "exception" in exp["refine"]:
                if out.decision != "empty":
                    bad.append(f"{c['id']}: reference raised {exp['refine']['exception']}, got {out.decision}")
            elif out.text != exp["refine"]["text"]:
                bad.append(f"{c['id']}: text {out.text!r} != {exp['refine']['text']!r}")
        elif c["kind"] == "doc":
            if doc_keeps(c["program"]) != (exp["text"] == c["text"]) and c["text"]:
                bad.append(f"{c['id']}: doc decision differs for {c['program']!r}")
        elif chunk_lines(c["text"], counts[c["tokenizer"]], c["max_tokens"], c["digits"]) != exp["chunks"]:
            bad.append(f"{c['id']}: chunks differ")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prox_dir", help="a checkout of github.com/GAIR-NLP/ProX (utils/ and data_gen/ are read)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-cases", type=int, default=700)
    ap.add_argument("--doc-cases", type=int, default=60)
    ap.add_argument("--split-cases", type=int, default=120)
    ap.add_argument("--compare", action="store_true", help="compare curate's executor with the reference, write nothing")
    args = ap.parse_args(argv)
    ref = load_reference(args.prox_dir)
    data = build(ref, args.seed, args.chunk_cases, args.doc_cases, args.split_cases)
    if args.compare:
        bad = compare(data["cases"])
        for line in bad:
            print(line)
        print(f"{len(data['cases'])} cases, {len(bad)} mismatches", file=sys.stderr)
        return 1 if bad else 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('{"about": %s, "seed": %d, "cases": [\n' % (json.dumps(data["about"]), data["seed"]))
        f.write(",\n".join(json.dumps(c, ensure_ascii=False, sort_keys=True) for c in data["cases"]))
        f.write("\n]}\n")
    os.replace(tmp, args.out)
    kinds: dict[str, int] = {}
    for c in data["cases"]:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    print(f"wrote {args.out}: {kinds}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
