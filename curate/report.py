"""The run report: one self-contained HTML page (``report.html`` next to ``stats.json``).

``write_report(output)`` reads what a run left in its output folder (``stats.json``,
``manifest.json``, ``_curate/pipeline.json``, each select step's ``_selection.json`` and each
classifier's ``_model.json``) and the Parquet shards it needs, and writes:

- the funnel: rows in/out per step, kept share, top drop reasons, errors, time (a table with bars);
- for every ``select`` step, a histogram of every numeric score column of its input, with the
  selection's thresholds drawn on it (``min_value``, the lowest selected score, comparisons in
  ``where``), and sample documents above and below the threshold;
- for every final step that is not a select step, the histograms of its score columns;
- the held-out metrics of each trained classifier.

Plots are inline SVG drawn here (no script, no network, no CDN). Histograms are computed in two
streaming passes over the score columns only; sample texts are read from their row groups only.
``curate report OUTPUT`` calls it.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.pipeline.io import atomic_write_bytes, get_fs, join
from curate.pipeline.stats import step_time
from curate.pipeline.warnings import warning_lines
from curate.pipeline.state import SELECTION_FILE, STEP_CARD_FILE

REPORT_FILE = "report.html"
BINS = 30
SAMPLES = 3
SAMPLE_CHARS = 600


class ReportError(Exception):
    """The folder is not a curate output (no stats.json)."""


def _read_json(fs, path: str) -> Any | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _step_inputs(spec: dict) -> dict[str, list[str]]:
    """Each step's inputs, with the defaults of pipeline.yaml (the previous stage, or the only input)."""
    out: dict[str, list[str]] = {name: [] for name in spec.get("inputs") or {}}
    only = next(iter(out)) if len(out) == 1 else None
    previous = None
    for s in spec.get("stages") or []:
        name = s.get("name") or s["stage"]
        inp = s.get("input")
        out[name] = ([inp] if isinstance(inp, str) else list(inp)) if inp is not None else \
            [x for x in [previous or only] if x]
        previous = name
    return out


def _is_score(field: pa.Field) -> bool:
    t = field.type
    if field.name in ("id",) or field.name.startswith("_"):
        return False
    return pa.types.is_floating(t) or (pa.types.is_integer(t) and "score" in field.name)


class _Step:
    def __init__(self, fs, root: str, name: str, shards: list[dict]):
        self.fs, self.name = fs, name
        self.files = [join(root, name, s["path"]) for s in shards]

    def schema(self) -> pa.Schema | None:
        for f in self.files:
            with self.fs.open(f, "rb") as fh:
                return pq.ParquetFile(fh).schema_arrow
        return None

    def iter_columns(self, columns: list[str]):
        """(file index, row offset in file, table) batches of ``columns``."""
        for i, f in enumerate(self.files):
            with self.fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                cols = [c for c in columns if c in pf.schema_arrow.names]
                off = 0
                for b in pf.iter_batches(batch_size=65536, columns=cols):
                    yield i, off, pa.Table.from_batches([b])
                    off += b.num_rows

    def rows(self, wanted: list[tuple[int, int]], columns: list[str]) -> dict[tuple[int, int], dict]:
        """Rows by (file, row), reading only the row groups that hold them."""
        out: dict[tuple[int, int], dict] = {}
        by_file: dict[int, list[int]] = {}
        for fi, r in wanted:
            by_file.setdefault(fi, []).append(r)
        for fi, rows in by_file.items():
            with self.fs.open(self.files[fi], "rb") as fh:
                pf = pq.ParquetFile(fh)
                cols = [c for c in columns if c in pf.schema_arrow.names]
                start = 0
                for g in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    inside = [r for r in rows if start <= r < start + n]
                    if inside:
                        t = pf.read_row_group(g, columns=cols)
                        for r in inside:
                            out[(fi, r)] = t.slice(r - start, 1).to_pylist()[0]
                    start += n
        return out


def _histograms(step: _Step, columns: list[str]) -> dict[str, dict]:
    """Two streaming passes: range and counts, then the bin counts of each column."""
    stats = {c: {"n": 0, "nulls": 0, "min": math.inf, "max": -math.inf, "sum": 0.0} for c in columns}
    for _, _, t in step.iter_columns(columns):
        for c in columns:
            if c not in t.schema.names:
                continue
            v = t.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False)
            finite = v[np.isfinite(v)]
            s = stats[c]
            s["nulls"] += len(v) - len(finite)
            s["n"] += len(finite)
            if len(finite):
                s["min"] = min(s["min"], float(finite.min()))
                s["max"] = max(s["max"], float(finite.max()))
                s["sum"] += float(finite.sum())
    edges = {}
    for c, s in stats.items():
        if not s["n"]:
            continue
        lo, hi = s["min"], s["max"]
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0                         # probabilities: the whole unit interval
        elif hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges[c] = np.linspace(lo, hi, BINS + 1)
        s["counts"] = np.zeros(BINS, np.int64)
    for _, _, t in step.iter_columns(list(edges)):
        for c, e in edges.items():
            if c in t.schema.names:
                v = t.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False)
                stats[c]["counts"] += np.histogram(v[np.isfinite(v)], bins=e)[0]
    return {c: {**s, "edges": edges[c].tolist(), "counts": s["counts"].tolist(),
                "mean": s["sum"] / s["n"]} for c, s in stats.items() if c in edges}


def _samples(step: _Step, column: str, threshold: float, op: str) -> tuple[list[dict], list[dict]]:
    """Up to SAMPLES documents on each side of a threshold, chosen by a hash of their id."""
    import polars as pl

    best: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}
    for fi, off, t in step.iter_columns(["id", column]):
        if "id" not in t.schema.names or column not in t.schema.names:
            return [], []
        df = pl.from_arrow(t.select(["id", column])).with_row_index("r") \
            .with_columns(pl.col(column).cast(pl.Float64))
        df = df.filter(pl.col(column).is_not_null() & pl.col(column).is_not_nan()) \
            .with_columns(h=pl.col("id").hash(seed=0), above=_op(pl.col(column), op, threshold))
        for above in (True, False):
            part = df.filter(pl.col("above") == above).sort("h").head(SAMPLES)
            best[above] = sorted(best[above] + [(h, fi, off + r) for h, r in
                                                part.select(["h", "r"]).iter_rows()])[:SAMPLES]
    wanted = [(fi, r) for side in best.values() for _, fi, r in side]
    rows = step.rows(wanted, ["id", "text", column])
    pick = {k: [rows[(fi, r)] for _, fi, r in v if (fi, r) in rows] for k, v in best.items()}
    return pick[True], pick[False]


def _op(e, op: str, v: float):
    return {">=": e >= v, ">": e > v, "<=": e <= v, "<": e < v, "==": e == v, "!=": e != v}[op]


# --------------------------------------------------------------------------------------------------
# HTML


def _fmt(x: float) -> str:
    if x is None:
        return "–"
    a = abs(x)
    return f"{x:.0f}" if a >= 1000 or float(x).is_integer() else f"{x:.3g}" if a < 0.01 else f"{x:.3f}".rstrip("0").rstrip(".")


def _svg_hist(column: str, h: dict, thresholds: list[dict], attrs: str = "") -> str:
    W, H, L, B, T = 560, 190, 48, 30, 14
    pw, ph = W - L - 10, H - B - T
    counts, edges = h["counts"], h["edges"]
    top = max(counts) or 1
    lo, hi = edges[0], edges[-1]
    bw = pw / len(counts)
    parts = [f'<svg class="hist" data-column="{html.escape(column)}"{attrs} viewBox="0 0 {W} {H}" width="{W}" '
             f'height="{H}" role="img" aria-label="histogram of {html.escape(column)}">']
    parts.append(f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" class="axis"/>')
    for i, c in enumerate(counts):
        if c:
            bh = max(1.0, ph * c / top)
            parts.append(f'<rect class="bar" x="{L + i * bw + 0.5:.1f}" y="{T + ph - bh:.1f}" width="{bw - 1:.1f}" '
                         f'height="{bh:.1f}"><title>{_fmt(edges[i])} – {_fmt(edges[i + 1])}: {c:,}</title></rect>')
    for k in range(5):
        x = lo + (hi - lo) * k / 4
        px = L + pw * k / 4
        parts.append(f'<text x="{px:.1f}" y="{H - 10}" text-anchor="middle">{_fmt(x)}</text>')
    parts.append(f'<text x="{L - 6}" y="{T + 4}" text-anchor="end">{top:,}</text>')
    parts.append(f'<text x="{L - 6}" y="{T + ph}" text-anchor="end">0</text>')
    for th in thresholds:
        v = th["value"]
        if hi > lo and lo <= v <= hi:
            px = L + pw * (v - lo) / (hi - lo)
            label = f'{th["op"]} {_fmt(v)}'
            parts.append(f'<line class="threshold" x1="{px:.1f}" y1="{T - 4}" x2="{px:.1f}" y2="{T + ph}">'
                         f'<title>{html.escape(th.get("from", ""))}: {html.escape(label)}</title></line>')
            right = px > L + 0.8 * pw                # keep the label inside the plot
            parts.append(f'<text class="threshold-label" x="{px - 3 if right else px + 3:.1f}" y="{T + 6}" '
                         f'text-anchor="{"end" if right else "start"}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_funnel(steps: dict[str, dict]) -> str:
    W, row = 560, 22
    top = max([max(s["in"], s["out"]) for s in steps.values()] + [1])
    H = row * len(steps) + 6
    parts = [f'<svg class="funnel" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
             'aria-label="rows out of each step">']
    for i, (name, s) in enumerate(steps.items()):
        w = max(1.0, (W - 190) * s["out"] / top) if s["out"] else 0
        y = 3 + i * row
        parts.append(f'<text x="150" y="{y + 14}" text-anchor="end">{html.escape(name)}</text>')
        parts.append(f'<rect class="bar" x="156" y="{y + 2}" width="{w:.1f}" height="{row - 6}">'
                     f'<title>{html.escape(name)}: {s["out"]:,} rows</title></rect>')
        parts.append(f'<text x="{160 + w:.1f}" y="{y + 14}">{s["out"]:,}</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1180px;
color:#222;padding:0 1em}h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:3px 9px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#777}
svg text{font-size:11px;fill:#444}svg .bar{fill:#4c78a8}svg .axis{stroke:#999}
svg .threshold{stroke:#d62728;stroke-width:2;stroke-dasharray:5 3}svg .threshold-label{fill:#d62728}
.plots{display:flex;flex-wrap:wrap;gap:1.2em}.plot{border:1px solid #eee;padding:.5em}
.warnings li{color:#b00020;font-weight:bold}
.doc{white-space:pre-wrap;background:#f7f7f7;border-left:3px solid #4c78a8;padding:.4em .6em;margin:.4em 0;
font-size:12.5px}.below .doc{border-left-color:#999}
table.pairs{table-layout:fixed;width:100%}table.pairs td{vertical-align:top;width:50%}
.doc.gen{border-left-color:#59a14f}.doc.dropped{border-left-color:#d62728}
svg .target{fill:#bbb}details{margin:.3em 0}
"""


def _funnel_table(steps: dict[str, dict]) -> str:
    rows = ["<table class='funnel-table'><tr><th>step</th><th>stage</th><th>in</th><th>out</th><th>kept</th>"
            "<th>dropped (top reasons)</th><th>errors</th><th>time</th></tr>"]
    for name, s in steps.items():
        kept = f"{100 * s['out'] / s['in']:.1f}%" if s["in"] else "–"
        top = sorted(s.get("dropped", {}).items(), key=lambda kv: -kv[1])[:3]
        dropped = ", ".join(f"{html.escape(k)} {v:,}" for k, v in top) or "–"
        errs = sum(s.get("errors", {}).values())
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(s['stage'])}</td><td class=n>{s['in']:,}</td>"
                    f"<td class=n>{s['out']:,}</td><td class=n>{kept}</td><td>{dropped}</td>"
                    f"<td class=n>{errs:,}</td><td class=n>{step_time(s)}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _doc_html(d: dict, column: str) -> str:
    text = d.get("text") or ""
    short = text[:SAMPLE_CHARS] + ("…" if len(text) > SAMPLE_CHARS else "")
    return (f"<div class='doc'><span class='muted'>{html.escape(str(d.get('id')))} · {html.escape(column)} = "
            f"{_fmt(d.get(column))}</span>\n{html.escape(short)}</div>")


def _plots(step: _Step, thresholds: list[dict]) -> tuple[str, dict]:
    schema = step.schema()
    if schema is None:
        return "<p class='muted'>no rows</p>", {}
    cols = [f.name for f in schema if _is_score(f)]
    if not cols:
        return "<p class='muted'>no numeric score columns</p>", {}
    hists = _histograms(step, cols)
    out = ["<div class='plots'>"]
    for c in cols:
        h = hists.get(c)
        if h is None:
            out.append(f"<div class='plot'><b>{html.escape(c)}</b><p class='muted'>no values</p></div>")
            continue
        ths = [t for t in thresholds if t["column"] == c]
        out.append(f"<div class='plot'><b>{html.escape(c)}</b> <span class='muted'>{h['n']:,} values, mean "
                   f"{_fmt(h['mean'])}, min {_fmt(h['min'])}, max {_fmt(h['max'])}"
                   + (f", {h['nulls']:,} null" if h["nulls"] else "") + "</span><br>"
                   + _svg_hist(c, h, ths) + "</div>")
    out.append("</div>")
    return "".join(out), hists


def _decontamination(fs, root: str, name: str, s: dict) -> str:
    """Contamination per eval set (stats.json counters) and a few matches from ``_matches/``."""
    from curate.decont.index import report_counts

    sets = report_counts(s.get("counters", {}))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td class=n>{v['docs']:,}</td><td class=n>{v['ngrams']:,}</td></tr>"
                   for k, v in sets.items())
    out = [f"<h2 id='decontaminate-{html.escape(name)}'>decontamination {html.escape(name)}</h2>",
           f"<table class='decontamination'><tr><th>eval set</th><th>documents</th><th>matched n-grams</th></tr>"
           f"{rows or '<tr><td colspan=3>no matches</td></tr>'}</table>"]
    examples = []
    for f in sorted(fs.glob(join(root, name, "_matches", "*.parquet")))[:20]:
        with fs.open(f, "rb") as fh:
            examples += pq.read_table(fh).slice(0, SAMPLES * 2).to_pylist()
        if len(examples) >= SAMPLES * 2:
            break
    for m in examples[:SAMPLES * 2]:
        out.append(f"<div class='doc'><span class='muted'>{html.escape(str(m['id']))} · {html.escape(m['eval_set'])} "
                   f"item {html.escape(m['item_id'])} · {m['matched_ngrams']} n-grams</span>\n"
                   f"{html.escape(m['doc_snippet'] or '')}</div>")
    return "".join(out)



# --------------------------------------------------------------------------------------------------
# The data itself (issue 20 item 6): what synthetic steps made from what, score examples at low,
# middle and high scores, dropped documents per reason, and a mixture's target vs achieved shares.
# Every text is escaped and cut to SAMPLE_CHARS; every section shows at most a fixed number of rows.

SCORE_BAND = 0.10            # the "low" and "high" examples come from the lowest / highest 10 %
MAX_REASONS = 15             # drop reasons shown per filter step (most frequent first)


def _stage_class(stage: str):
    from curate.pipeline.stage import REGISTRY, load_builtin_stages

    load_builtin_stages()
    return REGISTRY.get(stage)


def _is_filter(stage: str) -> bool:
    from curate.pipeline.stage import FilterStage

    cls = _stage_class(stage)
    return cls is not None and issubclass(cls, FilterStage)


def _is_synthetic(stage: str) -> bool:
    cls = _stage_class(stage)
    return cls is not None and bool(getattr(cls, "synthetic", False)) and hasattr(cls, "provenance")


def _step_options(spec: dict) -> dict[str, dict]:
    out = {name: dict(s.get("options") or {}) for name, s in (spec.get("inputs") or {}).items()}
    for s in spec.get("stages") or []:
        out[s.get("name") or s["stage"]] = dict(s.get("options") or {})
    return out


def _holder(name: str, inputs: dict[str, list[str]], shards: dict) -> str | None:
    """The written step that holds ``name``'s rows: itself, or (a step fused into a chain) the step
    that ends its chain."""
    seen = set()
    while name not in shards:
        consumers = [n for n, v in inputs.items() if name in v]
        if len(consumers) != 1 or name in seen:
            return None
        seen.add(name)
        name = consumers[0]
    return name


def _upstream(name: str, inputs: dict[str, list[str]], shards: dict) -> str | None:
    """The nearest written step at or above ``name`` (map steps keep document ids)."""
    seen = set()
    while name not in shards:
        up = inputs.get(name) or []
        if len(up) != 1 or name in seen:
            return None
        seen.add(name)
        name = up[0]
    return name


def _cut(text: Any) -> str:
    if text is None:
        return "(no text)"
    text = str(text)
    return html.escape(text[:SAMPLE_CHARS] + ("…" if len(text) > SAMPLE_CHARS else ""))


def _hash_sample(step: _Step, columns: list[str], k: int, keep=None) -> list[dict]:
    """Up to ``k`` rows chosen by a hash of their id (the same rows in every report of a run),
    among the rows where the polars expression ``keep`` holds; only ``id`` and the filter's column
    are streamed, the rows are read from their row groups."""
    import polars as pl

    best: list[tuple[int, int, int]] = []
    cols = ["id"] + [c for c in (keep[1] if keep else [])]
    for fi, off, t in step.iter_columns(cols):
        if any(c not in t.schema.names for c in cols):
            return []
        df = pl.from_arrow(t.select(cols)).with_row_index("r").with_columns(h=pl.col("id").hash(seed=0))
        if keep:
            df = df.filter(keep[0])
        part = df.sort("h").head(k)
        best = sorted(best + [(h, fi, off + r) for h, r in part.select(["h", "r"]).iter_rows()])[:k]
    rows = step.rows([(fi, r) for _, fi, r in best], columns)
    return [rows[(fi, r)] for _, fi, r in best if (fi, r) in rows]


def _rows_by_id(step: _Step, ids: set[str], columns: list[str]) -> dict[str, dict]:
    """The rows of ``step`` whose id is in ``ids`` (streams the id column, then reads those rows)."""
    where: dict[str, tuple[int, int]] = {}
    for fi, off, t in step.iter_columns(["id"]):
        if "id" not in t.schema.names:
            return {}
        for r, v in enumerate(t.column("id").to_pylist()):
            if str(v) in ids and str(v) not in where:
                where[str(v)] = (fi, off + r)
    rows = step.rows(list(where.values()), columns)
    return {i: rows[p] for i, p in where.items() if p in rows}


def synthetic_section(fs, root: str, name: str, s: dict, inputs: dict, shards: dict, options: dict) -> str:
    """Sample rows of a synthetic step beside the source document they were made from."""
    head = f"<h2 id='synthetic-{html.escape(name)}'>synthetic step {html.escape(name)} ({html.escape(s['stage'])})</h2>"
    holder = _holder(name, inputs, shards)
    if holder is None:
        return head + "<p class='muted'>its rows are not written out</p>"
    step = _Step(fs, root, holder, shards[holder])
    schema = step.schema()
    if schema is None:
        return head + f"<p class='muted'>no rows ({s['out']:,} written)</p>"
    generate = s["stage"] == "generate"
    opts = options.get(name, {})
    if generate:
        gen_col, src_col = opts.get("output_column") or "completion", opts.get("prompt_column") or "text"
        cols = ["id", src_col, gen_col]
    else:
        gen_col, src_col = "text", (opts.get("text_column") or "text")
        cols = ["id", "source_id", "text", "template_id", "chunk_index", "engine_model"]
    if gen_col not in schema.names or (not generate and "source_id" not in schema.names):
        return head + "<p class='muted'>no generated column in its rows</p>"
    picked = _hash_sample(step, cols, SAMPLES)
    src_step = None
    sources: dict[str, dict] = {}
    if not generate and (inputs.get(name) or []):
        src_step = _upstream(inputs[name][0], inputs, shards)
        if src_step is not None:
            sources = _rows_by_id(_Step(fs, root, src_step, shards[src_step]),
                                  {str(r["source_id"]) for r in picked}, ["id", src_col])
    note = f" (rows as written by step {html.escape(holder)})" if holder != name else ""
    out = [head, f"<p>{s['out']:,} rows made from {s['in']:,} input rows; {len(picked)} samples{note}; "
                 + ("source: the same row's <code>" + html.escape(src_col) + "</code>" if generate else
                    f"source: step {html.escape(src_step)}" if src_step else "source rows are not written out")
           + "</p><table class='pairs'><tr><th>source</th><th>generated</th></tr>"]
    for r in picked:
        if generate:
            src_id, src_text = r.get("id"), r.get(src_col)
            meta = ""
        else:
            src_id = r.get("source_id")
            src_text = (sources.get(str(src_id)) or {}).get(src_col)
            meta = " · ".join(html.escape(str(r[k])) for k in ("template_id", "engine_model") if r.get(k))
            if r.get("chunk_index") is not None:
                meta += f" · chunk {int(r['chunk_index'])}"
        out.append(f"<tr class='pair'><td><div class='doc src'><span class='muted'>{html.escape(str(src_id))}</span>\n"
                   f"{_cut(src_text) if src_text is not None else '<i>(source row not found)</i>'}</div></td>"
                   f"<td><div class='doc gen'><span class='muted'>{html.escape(str(r.get('id')))}"
                   f"{' · ' + meta if meta else ''}</span>\n{_cut(r.get(gen_col))}</div></td></tr>")
    out.append("</table>")
    return "".join(out)


SCORE_STAGES = ("language_id", "fasttext_score", "hf_classify", "llm_rate", "lm_yes_no_score")


def _score_columns(stage: str, opts: dict, schema: pa.Schema) -> list[str]:
    """The numeric columns a scoring step wrote, from its options (as in the stages' docs)."""
    numeric = [f.name for f in schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)]
    if stage == "language_id":
        return [c for c in numeric if c == "language_score"]
    if stage == "fasttext_score":
        named = set((opts.get("columns") or {}).values())
        prefix = opts.get("column_prefix") or "fasttext_"
        return [c for c in numeric if c in named or c.startswith(prefix)]
    if stage == "hf_classify":
        prefix = opts.get("prefix") or "hf_"
        return [c for c in numeric if c.startswith(prefix)]
    if stage == "llm_rate":
        prefix = opts.get("column_prefix") or "dataman_"
        return [c for c in numeric if c.startswith(prefix)]
    if stage == "lm_yes_no_score":
        col = opts.get("column") or "lm_score"
        return [c for c in numeric if c == col or c.startswith(col + "_q")]
    return []


def score_bands(h: dict) -> dict[str, tuple[float, float]]:
    """Score ranges of the low, middle and high examples, from a histogram: the bins that hold the
    lowest SCORE_BAND of the values, the bin that holds the median, the bins of the highest."""
    counts, edges = np.asarray(h["counts"]), h["edges"]
    n = int(counts.sum())
    cum = np.cumsum(counts)
    lo_bin = int(np.searchsorted(cum, max(1, math.ceil(SCORE_BAND * n))))
    mid_bin = int(np.searchsorted(cum, max(1, math.ceil(0.5 * n))))
    hi_bin = int(np.searchsorted(cum, n - max(1, math.ceil(SCORE_BAND * n)) + 1))
    return {"low": (edges[0], edges[lo_bin + 1]), "middle": (edges[mid_bin], edges[mid_bin + 1]),
            "high": (edges[hi_bin], edges[-1])}


def scoring_section(fs, root: str, name: str, s: dict, inputs: dict, shards: dict, options: dict) -> str:
    """The histogram of each score column of a scoring step, with examples at low, middle and high
    scores."""
    import polars as pl

    head = f"<h2 id='scores-{html.escape(name)}'>scores of step {html.escape(name)} ({html.escape(s['stage'])})</h2>"
    holder = _holder(name, inputs, shards)
    if holder is None:
        return head + "<p class='muted'>its rows are not written out</p>"
    step = _Step(fs, root, holder, shards[holder])
    schema = step.schema()
    cols = _score_columns(s["stage"], options.get(name, {}), schema) if schema is not None else []
    if not cols:
        return head + "<p class='muted'>no score values</p>"
    hists = _histograms(step, cols)
    note = f" <span class='muted'>(rows as written by step {html.escape(holder)})</span>" if holder != name else ""
    out = [head + note]
    for c in cols:
        h = hists.get(c)
        if h is None:
            out.append(f"<p><b>{html.escape(c)}</b>: <span class='muted'>no values</span></p>")
            continue
        out.append(f"<div class='plot scores'><b>{html.escape(c)}</b> <span class='muted'>{h['n']:,} values, mean "
                   f"{_fmt(h['mean'])}, min {_fmt(h['min'])}, max {_fmt(h['max'])}"
                   + (f", {h['nulls']:,} null" if h["nulls"] else "") + "</span><br>"
                   + _svg_hist(c, h, [], f' data-step="{html.escape(name)}" data-counts="'
                               + ",".join(map(str, h["counts"])) + '"') + "</div>")
        for band, (lo, hi) in score_bands(h).items():
            v = pl.col(c).cast(pl.Float64)
            docs = _hash_sample(step, ["id", "text", c], SAMPLES, (v.is_not_nan() & (v >= lo) & (v <= hi), [c]))
            out.append(f"<details class='band' data-band='{band}' data-column='{html.escape(c)}'><summary>{band} "
                       f"{html.escape(c)} ({_fmt(lo)} – {_fmt(hi)}): {len(docs)} examples</summary>"
                       + "".join(_doc_html(d, c) for d in docs) + "</details>")
    return "".join(out)


def _drop_examples(fs, root: str, name: str) -> dict[str, list[dict]]:
    """The kept examples of dropped documents of a filter step, per reason (bottom-k by their
    seeded key over every task's side file; a document counted once)."""
    from curate.pipeline.stage import DROP_SAMPLES, DROP_SAMPLES_SIDE

    by_reason: dict[str, dict[str, dict]] = {}
    for f in sorted(fs.glob(join(root, name, f"_{DROP_SAMPLES_SIDE}", "*.parquet"))):
        with fs.open(f, "rb") as fh:
            for r in pq.read_table(fh).to_pylist():
                got = by_reason.setdefault(r["drop_reason"], {})
                got[r["id"]] = r
                if len(got) > DROP_SAMPLES:           # bounded: the lowest keys so far
                    del got[max(got, key=lambda i: got[i]["sample_key"])]
    return {reason: sorted(rows.values(), key=lambda r: r["sample_key"])
            for reason, rows in by_reason.items()}


def filter_section(fs, root: str, name: str, s: dict) -> str:
    """Examples of the documents a filter step dropped, per reason, with the reason's count."""
    head = f"<h2 id='dropped-{html.escape(name)}'>dropped by step {html.escape(name)} ({html.escape(s['stage'])})</h2>"
    counts = s.get("dropped") or {}
    if not counts:
        return head + f"<p class='muted'>nothing dropped ({s['in']:,} rows in)</p>"
    examples = _drop_examples(fs, root, name)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    out = [head, f"<p>{sum(counts.values()):,} of {s['in']:,} rows dropped, for {len(counts)} reasons</p>"]
    for reason, n in ranked[:MAX_REASONS]:
        docs = examples.get(reason, [])
        out.append(f"<details class='drop-reason' data-reason='{html.escape(reason)}'><summary><b>{html.escape(reason)}</b>"
                   f" {n:,} dropped; {len(docs)} examples</summary>")
        for d in docs:
            chars = d.get("text_chars")
            out.append(f"<div class='doc dropped'><span class='muted'>{html.escape(str(d['id']))}"
                       + (f" · {chars:,} chars" if chars is not None else "") + f"</span>\n{_cut(d.get('text'))}</div>")
        out.append("</details>")
    if len(ranked) > MAX_REASONS:
        out.append(f"<p class='muted'>{len(ranked) - MAX_REASONS} more reasons, "
                   f"{sum(n for _, n in ranked[MAX_REASONS:]):,} rows: see stats.json</p>")
    return "".join(out)


def mix_section(name: str, s: dict) -> str:
    """Target vs achieved token shares of each input of a ``mix`` step (its stats.json counters)."""
    c = s.get("counters") or {}
    names = list(dict.fromkeys(k.split("/", 2)[2] for k in c if k.startswith("mix/") and k.count("/") >= 2))
    head = f"<h2 id='mix-{html.escape(name)}'>mixture {html.escape(name)}</h2>"
    if not names:
        return head + "<p class='muted'>no mixture counters</p>"
    target_total = sum(c.get(f"mix/target_tokens/{n}", 0) for n in names) or 1
    drawn_total = sum(c.get(f"mix/tokens/{n}", 0) for n in names) or 1
    rows = ["<table class='mix'><tr><th>input</th><th>target share</th><th>achieved share</th><th>target tokens</th>"
            "<th>drawn tokens</th><th>available tokens</th><th>rows</th><th>repeated rows</th><th></th></tr>"]
    for n in names:
        t, d = c.get(f"mix/target_tokens/{n}", 0), c.get(f"mix/tokens/{n}", 0)
        ts, ds = t / target_total, d / drawn_total
        bars = (f"<svg width='160' height='22' class='mixbar'><rect x='0' y='2' width='{150 * ts:.1f}' height='8' "
                f"class='target'><title>target {100 * ts:.1f}%</title></rect><rect x='0' y='12' width='{150 * ds:.1f}' "
                f"height='8' class='bar'><title>achieved {100 * ds:.1f}%</title></rect></svg>")
        rows.append(f"<tr data-input='{html.escape(n)}'><td>{html.escape(n)}</td><td class=n>{100 * ts:.1f}%</td>"
                    f"<td class=n>{100 * ds:.1f}%</td><td class=n>{t:,.0f}</td><td class=n>{d:,.0f}</td>"
                    f"<td class=n>{c.get(f'mix/available_tokens/{n}', 0):,.0f}</td>"
                    f"<td class=n>{c.get(f'mix/rows/{n}', 0):,}</td><td class=n>{c.get(f'mix/repeated_rows/{n}', 0):,}</td>"
                    f"<td>{bars}{' <b>empty: left out</b>' if c.get(f'mix/empty_input/{n}') else ''}</td></tr>")
    rows.append("</table><p class='muted'>shares by tokens; upper bar: target, lower bar: achieved</p>")
    return head + "".join(rows)


def data_sections(fs, root: str, steps: dict[str, dict], spec: dict, inputs: dict, shards: dict) -> list[str]:
    """The report's sections that show the data, in step order."""
    from curate.pipeline.stage import DROP_SAMPLES_SIDE

    options = _step_options(spec)
    out = []
    for name, s in steps.items():
        stage = s["stage"]
        try:
            if stage in SCORE_STAGES:
                out.append(scoring_section(fs, root, name, s, inputs, shards, options))
            if _is_filter(stage) or fs.exists(join(root, name, f"_{DROP_SAMPLES_SIDE}")):
                out.append(filter_section(fs, root, name, s))
            if stage == "generate" or _is_synthetic(stage):
                out.append(synthetic_section(fs, root, name, s, inputs, shards, options))
            if stage == "mix":
                out.append(mix_section(name, s))
        except (OSError, pa.ArrowException, KeyError, ValueError) as exc:   # a report of what is there
            out.append(f"<p class='warnings'>step {html.escape(name)}: this section could not be built: "
                       f"{html.escape(type(exc).__name__)}: {html.escape(str(exc)[:300])}</p>")
    return out


def _estimate_html(cmp: dict) -> str:
    """LLM steps: what `curate estimate` projected against what the run used."""
    from curate.pipeline.estimate import _num

    cols = [("input_rows", "int", "input rows"), ("requests", "int", "requests"),
            ("prompt_tokens", "int", "prompt tokens"), ("completion_tokens", "int", "completion tokens"),
            ("cost", "cost", "cost"), ("seconds", "time", "time"), ("parse_failure_rate", "pct", "parse failures")]
    rows = ["<tr><th>step</th><th></th>" + "".join(f"<th>{h}</th>" for _, _, h in cols) + "</tr>"]
    for name, c in cmp["steps"].items():
        if c.get("stale"):
            rows.append(f"<tr><td>{html.escape(name)}</td><td colspan='{len(cols) + 1}'>stale: "
                        f"{html.escape(c.get('note', ''))}</td></tr>")
            continue
        for which in ("estimated", "actual"):
            v = c[which]
            rows.append(f"<tr class='{which}'><td>{html.escape(name) if which == 'estimated' else ''}</td>"
                        f"<td>{which}</td>" + "".join(f"<td class='num'>{_num(v.get(k), kind)}</td>"
                                                     for k, kind, _ in cols) + "</tr>")
    src = html.escape(str(cmp.get("file") or ""))
    return ("<h2 id='estimate'>LLM steps: estimate vs actual</h2>"
            f"<p class='muted'>estimate {src} of {html.escape(str(cmp.get('created')))}, sample of "
            f"{cmp.get('sample')} rows per LLM step; actual: this output's counters (new generations; "
            "time: this run's wall time)</p><table class='estimate'>" + "".join(rows) + "</table>")


def build_report(output: str) -> str:
    """The HTML of the report of the run in ``output``."""
    fs, root = get_fs(output)
    stats = _read_json(fs, join(root, "stats.json"))
    if not stats:
        raise ReportError(f"{output}: no stats.json (not the output folder of a finished curate run)")
    manifest = _read_json(fs, join(root, "manifest.json")) or {"steps": {}}
    spec = _read_json(fs, join(root, "_curate", "pipeline.json")) or {}
    steps = stats["steps"]
    inputs = _step_inputs(spec) if spec else {}
    shards = {n: s.get("shards", []) for n, s in manifest.get("steps", {}).items()}
    consumed = {i for v in inputs.values() for i in v}

    skipped = sum(x.get("status") == "skipped" for x in steps.values())
    earlier = f" ({skipped} steps finished by an earlier run)" if skipped else ""
    body = [f"<h1>curate run report: {html.escape(str(stats.get('pipeline')))}</h1>",
            f"<p class='muted'>output {html.escape(output)} · {len(steps)} steps · "
            f"this run {stats.get('seconds', 0):.1f}s{earlier} · report written "
            f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
            "<h2 id='funnel'>Funnel</h2>", _svg_funnel(steps), _funnel_table(steps)]
    if stats.get("complete") is False:   # a failed or interrupted run: what it finished
        f = stats.get("failure") or {}
        body.insert(2, f"<p class='incomplete'><b>INCOMPLETE RUN</b>: {html.escape(str(f.get('kind', 'failed')))} "
                       f"in step {html.escape(str(f.get('step')))}: {html.escape(str(f.get('error', '')).rstrip('.'))}. "
                       "Steps marked failed or not run are not part of the output; run the same command "
                       "again to resume.</p>")
    if (stats.get("estimate") or {}).get("steps"):
        body.append(_estimate_html(stats["estimate"]))
    warned = warning_lines(steps)
    if warned:
        body.append("<h2 id='warnings'>Warnings</h2><ul class='warnings'>"
                    + "".join(f"<li>{html.escape(w)}</li>" for w in warned) + "</ul>")

    for name, s in steps.items():
        if s["stage"] != "train_classifier":
            continue
        card = _read_json(fs, join(root, name, STEP_CARD_FILE))
        if card:
            m = card.get("metrics", {})
            body.append(f"<h2>classifier {html.escape(name)}</h2><p>label <b>{html.escape(card['labels']['positive'])}"
                        f"</b> vs {html.escape(card['labels']['negative'])}: held-out precision {_fmt(m.get('precision'))}, "
                        f"recall {_fmt(m.get('recall'))}, F1 {_fmt(m.get('f1'))} on {m.get('test_docs', 0):,} documents "
                        f"(threshold {_fmt(m.get('threshold'))}); trained on {card['data']['train']:,} documents; "
                        f"sha256 <code>{html.escape(card['sha256'][:16])}…</code></p>")

    for name, s in steps.items():
        if s["stage"] != "select":
            continue
        sel = _read_json(fs, join(root, name, SELECTION_FILE)) or {}
        ths = sel.get("thresholds", [])
        srcs = inputs.get(name, [])
        body.append(f"<h2 id='select-{html.escape(name)}'>select step {html.escape(name)}</h2>")
        opts = sel.get("options", {})
        body.append(f"<p>{s['out']:,} of {s['in']:,} rows kept; options <code>{html.escape(json.dumps(opts))}</code>"
                    + (f"; input: {html.escape(', '.join(srcs))}" if srcs else "") + "</p>")
        for src in srcs:
            if src not in shards:
                continue
            step = _Step(fs, root, src, shards[src])
            plots, hists = _plots(step, ths)
            body.append(f"<h3>scores of its input, {html.escape(src)}</h3>{plots}")
            seen = set()
            # samples around the threshold that decided: the selection's cutoff first
            for th in sorted(ths, key=lambda t: "selected" not in t.get("from", "")):
                if th["column"] not in hists or th["column"] in seen:
                    continue
                seen.add(th["column"])
                above, below = _samples(step, th["column"], th["value"], th["op"])
                body.append(f"<h3>samples: {html.escape(th['column'])} {html.escape(th['op'])} {_fmt(th['value'])}"
                            f" ({html.escape(th.get('from', ''))})</h3>"
                            f"<details open class='above'><summary>{len(above)} passing</summary>"
                            + "".join(_doc_html(d, th["column"]) for d in above) + "</details>"
                            f"<details class='below'><summary>{len(below)} not passing</summary>"
                            + "".join(_doc_html(d, th["column"]) for d in below) + "</details>")

    for name, s in steps.items():
        if s["stage"] == "decontaminate":
            body.append(_decontamination(fs, root, name, s))

    body += data_sections(fs, root, steps, spec, inputs, shards)

    for name, s in steps.items():
        if name in consumed or s["stage"] == "select" or name not in shards or not inputs:
            continue
        plots, _ = _plots(_Step(fs, root, name, shards[name]), [])
        body.append(f"<h2 id='final-{html.escape(name)}'>final step {html.escape(name)}</h2>{plots}")

    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>curate report: {html.escape(str(stats.get('pipeline')))}</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>")


def write_report(output_url: str) -> str:
    """Write ``report.html`` into the run's output folder; returns its path (or URL)."""
    from curate.pipeline.io import to_url

    page = build_report(output_url)
    fs, root = get_fs(output_url)
    path = join(root, REPORT_FILE)
    atomic_write_bytes(fs, path, page.encode("utf-8"))
    return to_url(fs, path)
