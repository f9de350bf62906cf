"""A corpus with planted benchmark leakage, for the ``decontaminate`` tests and benchmark.

Eval items are question/answer/choices records made from real English sentences (docstrings of the
Python standard library). Documents are made of other docstring sentences; some get an eval item
planted (question and answer, so windows span both) in one of three forms, others a fragment that
must not match:

``verbatim``  the item's text as written;
``rewrap``    the same words re-wrapped: newlines and doubled spaces between words;
``case``      upper-cased or title-cased;
``fragment``  ``n - 1`` consecutive normalised tokens of a (long) item's question, between two
              words found nowhere else: too short to be leakage;
``clean``     nothing planted.

``plain_matches`` is an independent plain-Python reference (a set of normalised n-gram tuples):
the tests use it to tell planted leakage from any overlap that occurs naturally.
"""

from __future__ import annotations

import ast
import functools
import os
import random
import re
import sysconfig

WORD_RE = re.compile(r"\w+")
SENTINEL = "qqzxfragmentqq"


@functools.lru_cache(maxsize=1)
def sentence_pool() -> tuple[str, ...]:
    """Distinct docstring sentences (6+ words) of the standard library, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    sents: set[str] = set()
    for dp, dn, fn in os.walk(root):
        dn[:] = sorted(d for d in dn if d not in ("test", "tests", "site-packages", "idlelib", "lib2to3"))
        for f in sorted(fn):
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(dp, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    d = ast.get_docstring(node)
                    if d:
                        for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())):
                            if 6 <= len(s.split()) <= 60:
                                sents.add(s)
    return tuple(sorted(sents))


def make_eval_items(n_items: int, rng: random.Random, pool: tuple[str, ...]) -> list[dict]:
    """Eval records {id, question, answer, choices}; questions are 1-2 pool sentences plus a
    numbered clause (unique), answers a few words."""
    items = []
    for i in range(n_items):
        q = pool[rng.randrange(len(pool))]
        if rng.random() < 0.5:
            q += " " + pool[rng.randrange(len(pool))]
        q = f"{q} Which statement holds for case {i}?"
        words = pool[rng.randrange(len(pool))].split()
        answer = " ".join(words[:rng.randint(2, 5)])
        choices = [answer] + [" ".join(pool[rng.randrange(len(pool))].split()[:3]) for _ in range(3)]
        rng.shuffle(choices)
        items.append({"id": f"q{i}", "question": q, "answer": answer, "choices": choices})
    return items


def rewrap(text: str, rng: random.Random) -> str:
    words = text.split()
    out = []
    for w in words:
        out.append(w)
        out.append("\n" if rng.random() < 0.2 else ("  " if rng.random() < 0.2 else " "))
    return "".join(out).strip()


def planted_corpus(n_docs: int, n_items: int, seed: int = 0, ngram: int = 13,
                   planted_fraction: float = 0.1, fragment_fraction: float = 0.1,
                   doc_words: tuple[int, int] = (150, 400),
                   background_share: float = 0.4) -> tuple[list[dict], list[dict]]:
    """(eval items, documents). A document is {id, text, kind, item, planted} (``item`` the planted
    item's index, or -1; ``planted`` the text inserted). The docstring sentences are split in two: ``background_share`` of them for the
    documents, the rest for the items."""
    rng = random.Random(seed)
    pool = list(sentence_pool())
    rng.shuffle(pool)
    cut = int(len(pool) * background_share)
    items = make_eval_items(n_items, rng, tuple(pool[cut:]))
    plain = PlainNgramSet(items, n=ngram)
    # documents are made of the other sentences, and of those only the ones sharing no n-gram
    # with any item (docstrings repeat themselves)
    background = [s for s in pool[:cut] if not plain.matches(s)]
    docs = []
    for d in range(n_docs):
        sents, words = [], 0
        target = rng.randint(*doc_words)
        while words < target:
            s = background[rng.randrange(len(background))]
            sents.append(s)
            words += len(s.split())
        r = rng.random()
        kind, item, planted = "clean", -1, ""
        if r < planted_fraction:
            item = rng.randrange(n_items)
            it = items[item]
            text = f"{it['question']} {it['answer']}"
            kind = rng.choice(["verbatim", "rewrap", "case"])
            if kind == "rewrap":
                text = rewrap(text, rng)
            elif kind == "case":
                text = text.upper() if rng.random() < 0.5 else text.title()
            sents.insert(rng.randrange(len(sents) + 1), text)
            planted = text
        elif r < planted_fraction + fragment_fraction:
            item = rng.randrange(n_items)
            q = items[item]["question"]
            spans = [m.span() for m in WORD_RE.finditer(q)]       # n - 1 normalised tokens
            k = min(ngram - 1, len(spans))
            a = rng.randrange(len(spans) - k + 1)
            kind = "fragment"
            # between two words found in no item, so that no window reaches out of the fragment
            planted = f"{SENTINEL} {q[spans[a][0]:spans[a + k - 1][1]]} {SENTINEL}"
            sents.insert(rng.randrange(len(sents) + 1), planted)
        docs.append({"id": f"doc{d}", "text": " ".join(sents), "kind": kind, "item": item, "planted": planted})
    return items, docs


def norm_tokens(text: str) -> list[str]:
    return [w.lower() for w in WORD_RE.findall(text)]


def item_text(item: dict) -> str:
    return "\n".join([item["question"], item["answer"], " ".join(item.get("choices") or [])])


class PlainNgramSet:
    """The plain-Python reference: a set of n-gram tuples of the items (whole sequences for items
    shorter than n), looked up window by window."""

    def __init__(self, items: list[dict], n: int = 13, min_item_tokens: int = 3):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short_lengths: set[int] = set()
        for it in items:
            toks = norm_tokens(item_text(it))
            if len(toks) < min_item_tokens:
                continue
            if len(toks) < n:
                self.grams.add(tuple(toks))
                self.short_lengths.add(len(toks))
            else:
                self.grams.update(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))

    def matches(self, text: str) -> int:
        toks = norm_tokens(text)
        grams = self.grams
        n = 0
        for k in [self.n, *sorted(self.short_lengths)]:
            n += sum(tuple(toks[i:i + k]) in grams for i in range(len(toks) - k + 1))
        return n
