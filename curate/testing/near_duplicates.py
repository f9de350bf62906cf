"""Near-duplicate planting: edits that keep a document a near duplicate (Jaccard well above 0.8 on
5-word shingles) and edits that make a related but different document (a hard negative). Used by
the MinHash tests (planted corpus with brute-force ground truth) and ``benchmarks/minhash.py``."""

from __future__ import annotations

import random
import re

BOILERPLATE = [
    "Copyright 2024 Example Corp. All rights reserved. Subscribe to our newsletter for updates.",
    "Share this page on social media. Cookies help us deliver our services. Privacy policy.",
    "Related articles: read more from our documentation team. Back to top of page.",
]

FILLER = ("value object method function return string number list default module class error "
          "argument option system file result memory python data table").split()


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def light_edit(text: str, rng: random.Random, words_per_edit: int = 120) -> str:
    """A near duplicate: one word substituted or deleted per ``words_per_edit`` words, a sentence
    swap, boilerplate added, or case/punctuation noise (or a mix)."""
    kind = rng.choice(["subst", "swap", "boiler", "case", "mix"])
    if kind in ("subst", "mix"):
        words = text.split()
        for _ in range(max(1, len(words) // words_per_edit)):
            i = rng.randrange(len(words))
            if rng.random() < 0.5:
                words[i] = rng.choice(FILLER)
            else:
                del words[i]
        text = " ".join(words)
    if kind in ("swap", "mix"):
        s = sentences(text)
        if len(s) >= 4:
            i = rng.randrange(len(s) - 1)
            s[i], s[i + 1] = s[i + 1], s[i]
            text = " ".join(s)
    if kind in ("boiler", "mix"):
        b = rng.choice(BOILERPLATE)
        text = f"{b} {text}" if rng.random() < 0.5 else f"{text} {b}"
    if kind == "case":
        text = text.upper().replace(",", " ,").replace(". ", "... ")
    return text


def heavy_edit(text: str, rng: random.Random, changed_fraction: int = 8) -> str:
    """A related but different document: one word in ``changed_fraction`` replaced (at least 3)."""
    words = text.split()
    for i in rng.sample(range(len(words)), k=max(3, len(words) // changed_fraction)):
        words[i] = rng.choice(FILLER)
    return " ".join(words)
