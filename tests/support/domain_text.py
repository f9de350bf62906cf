"""Two clearly different domains of synthetic English text (finance vs cooking), for training and
scoring fastText classifiers offline. Sentences are built from word lists with a seeded RNG; both
domains share the same function words and a pool of general words, so a classifier has to learn
the domain vocabulary, and a few sentences of the other domain are mixed into some documents."""

from __future__ import annotations

import json
import random

GENERAL = ("people year time day week report place part group number way system area world "
           "question work home room fact month lot study book story service problem change "
           "idea result team level end kind city friend picture morning").split()
FINANCE = {
    "subj": "the central bank|investors|the fund manager|bond traders|the treasury|analysts|the "
            "board|shareholders|the lender|credit markets|the auditor|the hedge fund".split("|"),
    "verb": "raised|cut|priced|hedged|refinanced|audited|downgraded|underwrote|sold|bought|"
            "rebalanced|reported".split("|"),
    "obj": "interest rates|the bond yield|quarterly earnings|the credit spread|equity "
           "valuations|the loan portfolio|dividend payouts|currency exposure|the balance sheet|"
           "capital reserves|inflation expectations|the pension liability".split("|"),
    "tail": "after the inflation report|ahead of the earnings call|despite weak liquidity|as "
            "volatility rose|to protect the margin|before the rate decision|amid default fears|"
            "under the new capital rules".split("|"),
}
COOKING = {
    "subj": "the chef|the baker|my grandmother|the line cook|home cooks|the pastry team|the "
            "recipe|the kitchen|the sous chef|the food writer|the caterer|the host".split("|"),
    "verb": "simmered|whisked|roasted|seasoned|kneaded|braised|chopped|folded|baked|grilled|"
            "marinated|tasted".split("|"),
    "obj": "the garlic butter|a pot of tomato sauce|the sourdough dough|fresh basil leaves|the "
           "chicken thighs|a tray of root vegetables|the custard|the onion soup|a pinch of sea "
           "salt|the lemon zest|the pie crust|a bowl of rice".split("|"),
    "tail": "until golden and crisp|over low heat|with a splash of olive oil|before serving warm|"
            "in a cast iron pan|for twenty minutes|with chopped parsley|until the sauce "
            "thickened".split("|"),
}
DOMAINS = {"finance": FINANCE, "cooking": COOKING}


def sentence(rng: random.Random, domain: str) -> str:
    d = DOMAINS[domain]
    words = [rng.choice(d["subj"]), rng.choice(d["verb"]), rng.choice(d["obj"])]
    if rng.random() < 0.7:
        words.append(rng.choice(d["tail"]))
    if rng.random() < 0.5:  # general words shared by both domains
        words.append("in the " + " ".join(rng.choice(GENERAL) for _ in range(rng.randint(1, 3))))
    s = " ".join(words)
    return s[0].upper() + s[1:] + "."


def document(rng: random.Random, domain: str, sentences: tuple[int, int] = (3, 12),
             noise: float = 0.15) -> str:
    """A document of ``domain``; with probability ``noise`` each sentence is from the other one."""
    other = "cooking" if domain == "finance" else "finance"
    n = rng.randint(*sentences)
    out = []
    for i in range(n):
        out.append(sentence(rng, other if rng.random() < noise else domain))
        if rng.random() < 0.25:
            out.append("\n")  # paragraph breaks: newlines that fastText must not see
    return " ".join(out).replace(" \n ", "\n").strip()


def documents(domain: str, n: int, seed: int = 0, **kw) -> list[str]:
    rng = random.Random(f"{domain}-{seed}")
    return [document(rng, domain, **kw) for _ in range(n)]


# small, quick models for tests: fastText's default bucket (2M) x dim (100) writes an 800 MB file
FAST = {"dim": 32, "bucket": 50_000, "epoch": 20, "lr": 0.5}


def write_jsonl(path, texts) -> str:
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)
