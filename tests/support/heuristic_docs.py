"""Varied documents for the heuristic filter's parity test and benchmark, built offline.

Real text: English prose of the Python language reference (``pydoc_data.topics``) and standard
library docstrings, Python source, the German/French prose of ``pages.py``. Generated edge cases on
top: repetition (lines, paragraphs, n-grams, n-grams that only repeat once concatenated), bullets,
ellipses, hashes, short and long documents, lorem ipsum, curly brackets, javascript, cookie/policy
lines, citations, empty lines and unusual whitespace, Unicode and CJK, emoticons and spaCy special
cases across spaces (``:)``, ``( :``, ``10a.m.``, ``it 's``), non-English.
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import sysconfig
import warnings

from pages import PROSE, PROSE_DE, PROSE_FR

DOC_MODULES = [
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fileinput", "fnmatch", "fractions", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mimetypes", "numbers",
    "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets",
    "shelve", "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "types", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
]

SOURCE_FILES = ["textwrap.py", "bisect.py", "heapq.py", "shlex.py", "colorsys.py", "fnmatch.py",
                "glob.py", "getopt.py", "sched.py", "queue.py"]

SPECIAL = [":)", ":-(", "(-_-)", "( :", ": )", "(:", ":(", "it 's", "it's", "10a.m.", "10 a.m.",
           "a.m.)", "e.g.,", "i.e.", "and/or", "and / or", "' s", "John's", "Mr.", "U.S.", "(._.)",
           "8)", "8 )", ":'(", "- _ -", "'cause", "' cause", "don't", "do n't", "...", "…", "--",
           "https://example.com/a?b=c", "user@example.com", "#hashtag", "[1]", "[edit]",
           "[citation needed]", "C++", "$5.00", "5km", "3:30pm", "\"quoted\"", "'single'"]

WHITESPACE = [" ", "  ", "\t", "\xa0", "\u2003", "\u3000", " \t ", "\x0b", "\x0c", "\x1c", "\x85",
              "\u2028", "\r", "\r\n"]

SCRIPTS = {
    "cjk": "数据清洗是训练语言模型的重要步骤。我们删除重复的文档并过滤低质量的文本。今天天气很好。",
    "ja": "これは日本語の文章です。データの品質を確認します。ありがとうございました。",
    "ru": "Это пример текста на русском языке. Мы проверяем качество данных и удаляем дубликаты.",
    "el": "Αυτό είναι ένα παράδειγμα κειμένου στα ελληνικά. Ελέγχουμε την ποιότητα των δεδομένων.",
    "ar": "هذا مثال على نص باللغة العربية. نتحقق من جودة البيانات ونحذف النسخ المكررة.",
    "hi": "यह हिंदी में एक उदाहरण पाठ है। हम डेटा की गुणवत्ता की जांच करते हैं।",
}

LOREM = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt."
JS = ["Please enable JavaScript to view the comments.", "This site requires javascript to run.",
      "function f(x) { return x + 1; }", "var a = document.getElementById('x');"]
POLICY = ["By using this site you agree to our terms of use.", "Read our privacy policy here.",
          "This website uses cookies to improve your experience.", "See our cookie policy."]


def _docstrings() -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            for attr in [None, *sorted(dir(mod))]:
                obj = mod if attr is None else getattr(mod, attr, None)
                try:
                    doc = inspect.getdoc(obj) if obj is not None else None
                except Exception:  # noqa: BLE001 - odd objects
                    doc = None
                if doc and doc not in seen and len(doc) > 40:
                    seen.add(doc)
                    out.append(doc)
    return out


def _topic_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    paras: list[str] = []
    for key in sorted(topics):
        paras += [p for p in topics[key].split("\n\n") if p.strip()]
    return paras


def _sources() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for f in SOURCE_FILES:
        path = os.path.join(root, f)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                out.append(fh.read())
    return out


def _prose(rng: random.Random, paras: list[str], k: int) -> str:
    i = rng.randrange(len(paras))
    return "\n\n".join(paras[i:i + k])


def _mutate(rng: random.Random, text: str, pools: dict[str, list[str]]) -> str:
    """One random edit that tends to move a document across some rule's threshold."""
    kind = rng.randrange(22)
    lines = text.split("\n")
    if kind == 0:  # duplicated lines
        for _ in range(rng.randint(1, max(1, len(lines)))):
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(lines))
    elif kind == 1:  # duplicated paragraph
        paras = text.split("\n\n")
        paras += rng.sample(paras, k=rng.randint(1, len(paras)))
        return "\n\n".join(paras)
    elif kind == 2:  # bullets
        lines = [rng.choice(["- ", "• ", "  - ", "* ", ""]) + ln for ln in lines]
    elif kind == 3:  # ellipses
        lines = [ln + rng.choice(["...", "…", "", " ...", ". . ."]) for ln in lines]
    elif kind == 4:  # hashes / symbols
        words = text.split(" ")
        for _ in range(rng.randint(1, 40)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(["#", "##", "#tag", "&", "*", "—", "|"]))
        return " ".join(words)
    elif kind == 5:  # repeated phrase (n-gram repetition)
        words = text.split()
        if len(words) > 8:
            i = rng.randrange(len(words) - 6)
            phrase = " ".join(words[i:i + rng.randint(2, 6)])
            return text + (" " + phrase) * rng.randint(2, 30)
    elif kind == 6:  # repeats that only coincide once the words are concatenated
        base = rng.choice(["ab c de f gh i", "a bc d ef g hi", "x yz", "the re are", "there a re"])
        alt = base.replace(" ", "", 1)
        parts = [base if rng.random() < 0.5 else alt for _ in range(rng.randint(3, 30))]
        return text + "\n" + " ".join(parts) + "."
    elif kind == 7:  # lorem ipsum / curly / javascript / policy lines
        lines.insert(rng.randrange(len(lines) + 1), rng.choice([LOREM, *JS, *POLICY, "{", "a { b } c."]))
    elif kind == 8:  # citations
        words = text.split(" ")
        for _ in range(rng.randint(1, 10)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(["[1]", "[23]", "[edit]", "[]",
                                                                  "[citation needed]", "word.[2]"]))
        return " ".join(words)
    elif kind == 9:  # unusual whitespace
        words = text.split(" ")
        return "".join(w + rng.choice(WHITESPACE if rng.random() < 0.2 else [" "]) for w in words)
    elif kind == 10:  # emoticons and special cases next to each other
        words = text.split(" ")
        for _ in range(rng.randint(1, 25)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(SPECIAL))
        return " ".join(words)
    elif kind == 11:  # empty lines
        for _ in range(rng.randint(1, 10)):
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(["", " ", "\t", "   "]))
    elif kind == 12:  # truncate (short documents)
        return text[:rng.randint(1, 400)]
    elif kind == 13:  # other scripts
        script = rng.choice(list(SCRIPTS.values()))
        return rng.choice([script * rng.randint(1, 20), text + "\n" + script, script + " " + text])
    elif kind == 14:  # non-English prose
        pool = rng.choice([PROSE_DE, PROSE_FR])
        return "\n".join(rng.choice(pool) for _ in range(rng.randint(1, 12)))
    elif kind == 15:  # code
        src = rng.choice(pools["source"])
        i = rng.randrange(max(1, len(src) - 3000))
        return src[i:i + rng.randint(200, 6000)]
    elif kind == 16:  # long lines / long words
        return text.replace(" ", "", rng.randint(1, 50)) + " " + "x" * rng.choice([999, 1001, 2000])
    elif kind == 17:  # one sentence per line, no terminal punctuation on some
        sents = [s.strip() for s in text.replace("\n", " ").split(". ") if s.strip()]
        return "\n".join(s + ("." if rng.random() < 0.6 else "") for s in sents)
    elif kind == 18:  # upper case / numbers
        return text.upper() if rng.random() < 0.5 else " ".join(str(rng.randint(0, 10**6)) for _ in range(200))
    elif kind == 19:  # shuffled lines
        rng.shuffle(lines)
    elif kind == 20:  # list-like (many newlines per word)
        words = text.split()
        return "\n".join(" ".join(words[i:i + rng.randint(1, 4)]) for i in range(0, len(words), 3))
    else:  # quotes and sentence ends inside lines
        return text.replace(". ", rng.choice(['." ', ".) ", "! ", "? ", ".' ", ".  ", ".\t"]))
    return "\n".join(lines)


def varied_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic, varied documents (no ``IS_ALPHA``: see the parity test)."""
    rng = random.Random(seed)
    paras = _topic_paragraphs()
    docstrings = _docstrings()
    pools = {"source": _sources()}
    docs: list[str] = []
    while len(docs) < n:
        r = rng.random()
        if r < 0.3:
            text = _prose(rng, paras, rng.randint(1, 12))
        elif r < 0.5:
            text = "\n\n".join(rng.sample(docstrings, k=rng.randint(1, 6)))
        elif r < 0.6:
            text = "\n".join(rng.sample(PROSE, k=rng.randint(1, len(PROSE))))
        else:
            text = _prose(rng, paras, rng.randint(2, 8)) if rng.random() < 0.6 else \
                "\n\n".join(rng.sample(docstrings, k=rng.randint(2, 5)))
            for _ in range(rng.randint(1, 3)):
                text = _mutate(rng, text, pools)
        if text.strip() and "IS_ALPHA" not in text:
            docs.append(text)
    return docs
