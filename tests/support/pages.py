"""Real HTML pages built offline for the ingest tests and benchmarks.

Two kinds:

- ``pydoc_pages``: documentation pages of standard-library modules rendered by ``pydoc`` (the
  pages ``python -m pydoc -w`` writes; real, varied, table-heavy HTML),
- ``article_page``: news/blog-like pages with navigation, boilerplate, a dated article of prose
  written here, and a footer -- the kind of page trafilatura is built for.
"""

from __future__ import annotations

import html as _html
import importlib
import pydoc
import random
import warnings

import pyarrow as pa

from curate.pipeline.schema import make_id

PYDOC_MODULES = ["json", "csv", "textwrap", "bisect", "heapq", "fnmatch", "shlex", "string",
                 "base64", "colorsys", "getopt", "keyword", "numbers", "sched", "glob", "queue"]

PROSE = [
    "The central bank left its benchmark interest rate unchanged on Tuesday, saying that inflation "
    "had eased over the summer but remained above the target it set for the end of the year.",
    "Analysts had expected the decision, although several of them noted that the statement was "
    "more cautious about the labour market than the one published after the previous meeting.",
    "Bond yields fell slightly after the announcement, and the currency weakened against the "
    "dollar for the third consecutive session as traders reduced their bets on further increases.",
    "The committee said that it would continue to watch the data closely and that it was prepared "
    "to act if the outlook for prices changed in a way that threatened its mandate.",
    "Household spending has slowed in recent months, with retailers reporting that customers are "
    "trading down to cheaper products and delaying large purchases such as cars and furniture.",
    "Exporters, on the other hand, have benefited from the weaker currency, and the latest survey "
    "of manufacturers showed that new orders from abroad rose for the first time this year.",
    "The government welcomed the decision and repeated that its budget plans were consistent with "
    "a gradual return of inflation to target without a sharp rise in unemployment.",
    "Economists at the largest banks now expect the first cut in rates to come in the spring, "
    "although they warned that energy prices and wage settlements could still delay it.",
    "In its quarterly report the bank also revised its growth forecast for next year down to one "
    "per cent, citing weaker investment by businesses and the slowdown among trading partners.",
    "Mortgage lenders said that demand for new loans remained subdued, and that more borrowers "
    "were choosing fixed rates for five years to protect themselves against future increases.",
]

PROSE_DE = [
    "Die Zentralbank hat ihren Leitzins am Dienstag unverändert gelassen und erklärt, dass die "
    "Inflation im Sommer zwar nachgelassen habe, aber weiterhin über dem Zielwert liege.",
    "Die meisten Analysten hatten mit dieser Entscheidung gerechnet, wiesen jedoch darauf hin, "
    "dass die Erklärung zum Arbeitsmarkt vorsichtiger formuliert war als nach der letzten Sitzung.",
    "Die Renditen der Staatsanleihen gaben nach der Ankündigung leicht nach, und die Währung "
    "verlor gegenüber dem Dollar den dritten Handelstag in Folge an Wert.",
]

PROSE_FR = [
    "La banque centrale a laissé son taux directeur inchangé mardi, estimant que l'inflation "
    "avait ralenti pendant l'été mais restait supérieure à l'objectif fixé pour la fin de l'année.",
    "Les analystes s'attendaient à cette décision, même si plusieurs d'entre eux ont noté que le "
    "communiqué était plus prudent sur le marché du travail que celui de la réunion précédente.",
    "Les rendements obligataires ont légèrement baissé après l'annonce, et la monnaie s'est "
    "affaiblie face au dollar pour la troisième séance consécutive.",
]


def pydoc_page(module: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = importlib.import_module(module)
        return pydoc.html.page(pydoc.describe(mod), pydoc.html.document(mod, module))


def pydoc_pages(modules=PYDOC_MODULES) -> list[tuple[str, str]]:
    """[(url, html)] of pydoc pages."""
    return [(f"pydoc:{m}", pydoc_page(m)) for m in modules]


def article_page(title: str, paragraphs: list[str], date: str = "2024-03-05", lang: str = "en",
                 table: list[list[str]] | None = None, author: str = "Jane Doe") -> str:
    """A blog/news page: head metadata, navigation, article (title, date, prose), footer."""
    e = _html.escape
    paras = "\n".join(f"<p>{e(p)}</p>" for p in paragraphs)
    tbl = ""
    if table:
        rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table)
        tbl = f"<table>{rows}</table>"
    return f"""<!DOCTYPE html>
<html lang="{lang}"><head><meta charset="utf-8">
<title>{e(title)} | The Daily Ledger</title>
<meta name="author" content="{e(author)}">
<meta property="og:title" content="{e(title)}">
<meta property="article:published_time" content="{date}T08:00:00Z">
<meta name="description" content="{e(paragraphs[0][:100])}">
</head><body>
<header><nav><ul><li><a href="/">Home</a></li><li><a href="/markets">Markets</a></li>
<li><a href="/economy">Economy</a></li><li><a href="/about">About us</a></li></ul></nav></header>
<main><article>
<h1>{e(title)}</h1>
<p class="byline">By {e(author)}, <time datetime="{date}">{date}</time></p>
{paras}
{tbl}
</article></main>
<aside><h3>Most read</h3><ul><li><a href="/a">Ten tips for saving</a></li>
<li><a href="/b">Markets wrap</a></li></ul></aside>
<footer><p>Copyright 2024 The Daily Ledger. All rights reserved.</p>
<p><a href="/privacy">Privacy policy</a> | <a href="/terms">Terms of use</a></p></footer>
</body></html>"""


def article_pages(n: int, seed: int = 0, prose=PROSE, lang: str = "en") -> list[tuple[str, str]]:
    """[(url, html)] of ``n`` different article pages (shuffled prose, distinct titles)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        paras = rng.sample(prose, k=rng.randint(min(4, len(prose)), len(prose)))
        table = None
        if i % 3 == 0:
            table = [["Quarter", "Rate", "Inflation"], ["Q1", "4.5%", "3.2%"], ["Q2", "4.5%", "2.9%"]]
        day = 1 + i % 28
        out.append((f"https://news.example.com/{lang}/story-{seed}-{i}",
                    article_page(f"Story number {i}: rates on hold", paras,
                                 date=f"2024-03-{day:02d}", lang=lang, table=table)))
    return out


def html_table(pages: list[tuple[str, str]], binary: bool = False) -> pa.Table:
    """A source-stage-shaped table: id, source, html, text (""), metadata, url."""
    urls = [u for u, _ in pages]
    htmls = [h.encode("utf-8") if binary else h for _, h in pages]
    return pa.table({
        "id": pa.array([make_id(u, i) for i, u in enumerate(urls)], pa.string()),
        "source": pa.array(urls, pa.string()),
        "html": pa.array(htmls, pa.binary() if binary else pa.string()),
        "text": pa.array([""] * len(urls), pa.string()),
        "metadata": pa.array(["{}"] * len(urls), pa.string()),
        "url": pa.array(urls, pa.string()),
    })
