"""The D-CPT Law (Que et al. 2024, arXiv 2406.01375): choose the domain / general ratio of a
continued pre-training mixture from a few small training runs.

Each loss (the general-corpus validation loss and the domain validation loss) is fitted with the
paper's preferred parameterisation

    L(N, D, r) = E + A / N^alpha + B * r^eta / D^beta + C / (r + eps)^gamma

(N parameters, D training tokens, r a mixture ratio). For the **domain** loss, r is the domain
ratio; for the **general** loss, r is the general ratio 1 - r_domain (the paper fits the general
loss against the general-corpus share: its loss rises as that share goes to 0). ``eps`` is fixed
(``--eps``, default 0.01), not fitted, so that both ends (r = 0 and r = 1) stay finite.

Fit (as Chinchilla's, which the paper follows): minimise the Huber loss (delta = 1e-3) between the
log of the predicted and the observed loss, with L-BFGS-B (scipy), from several seeded random
starts; E, A, B, C are fitted as logs (positive), the exponents in [0, 3]. ``R^2`` is that of the
losses on the rows fitted; the held-out rows (``holdout``) are left out of a first fit and
predicted by it (their error is reported); the parameters used for prediction come from a
second fit on every row.

Input: a CSV with one row per small run and the columns ``N`` (model parameters), ``D`` (training
tokens), ``r`` (domain share of the tokens, 0..1), ``general_loss`` and ``domain_loss``.
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

COLUMNS = ("N", "D", "r", "general_loss", "domain_loss")
PARAMS = ("E", "A", "alpha", "B", "eta", "beta", "C", "gamma")
MIN_ROWS = 12
HUBER_DELTA = 1e-3


class MixtureError(ValueError):
    """The runs file is unusable (a clear, user-facing error naming the file, row and column)."""


# --------------------------------------------------------------------------------------------------
# input


@dataclass
class Runs:
    path: str
    N: np.ndarray
    D: np.ndarray
    r: np.ndarray
    general_loss: np.ndarray
    domain_loss: np.ndarray
    lines: list[int]   # the CSV line of each row (header = line 1)

    def __len__(self) -> int:
        return len(self.N)


def read_runs(path: str) -> Runs:
    """Read and check a runs CSV; every problem names the file, the line and the column."""
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise MixtureError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise MixtureError(f"{path}: empty file; expected a header with {', '.join(COLUMNS)}") from None
        header = [h.strip() for h in header]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise MixtureError(f"{path}: line 1: missing column(s) {', '.join(missing)} "
                               f"(the header has {', '.join(header)}; needed: {', '.join(COLUMNS)})")
        pos = {c: header.index(c) for c in COLUMNS}
        values: dict[str, list[float]] = {c: [] for c in COLUMNS}
        lines = []
        for lineno, row in enumerate(reader, 2):
            if not row or all(not x.strip() for x in row):
                continue
            for c in COLUMNS:
                raw = row[pos[c]].strip() if pos[c] < len(row) else ""
                if not raw:
                    raise MixtureError(f"{path}: line {lineno}: column {c}: empty value")
                try:
                    v = float(raw)
                except ValueError:
                    raise MixtureError(f"{path}: line {lineno}: column {c}: not a number: {raw!r}") from None
                if not math.isfinite(v):
                    raise MixtureError(f"{path}: line {lineno}: column {c}: not a finite number: {raw!r}")
                if c == "r" and not 0.0 <= v <= 1.0:
                    raise MixtureError(f"{path}: line {lineno}: column r: {raw} is outside [0, 1] "
                                       "(the domain share of the training tokens)")
                if c != "r" and v <= 0:
                    raise MixtureError(f"{path}: line {lineno}: column {c}: must be > 0, got {raw}")
                values[c].append(v)
            lines.append(lineno)
    if len(lines) < MIN_ROWS:
        raise MixtureError(f"{path}: too few rows: {len(lines)} runs; the law has {len(PARAMS)} parameters "
                           f"per loss and some rows are held out: give at least {MIN_ROWS}")
    for c in ("N", "D", "r"):
        if len(set(values[c])) < 2:
            raise MixtureError(f"{path}: column {c}: every row has the same value ({values[c][0]:g}); "
                               "the law needs runs that differ in N, D and r")
    return Runs(path, *(np.array(values[c], float) for c in COLUMNS), lines=lines)


# --------------------------------------------------------------------------------------------------
# the law


def law(p: dict[str, float], N, D, r, eps: float):
    N, D, r = (np.asarray(x, float) for x in (N, D, r))
    rterm = np.where(r > 0, np.power(np.where(r > 0, r, 1.0), p["eta"]), 0.0)   # r^eta, 0 at r = 0
    return (p["E"] + p["A"] / N ** p["alpha"] + p["B"] * rterm / D ** p["beta"]
            + p["C"] / (r + eps) ** p["gamma"])


def _huber(x: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(x)
    return np.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def _objective(theta: np.ndarray, logN, logD, logr, has_r, logre, logL, delta):
    e, a, alpha, b, eta, beta, c, gamma = theta
    t = np.stack([np.full_like(logN, e), a - alpha * logN,
                  np.where(has_r, b + eta * logr - beta * logD, -np.inf), c - gamma * logre])
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    pred = m + np.log(s)
    w = w / s
    res = pred - logL
    # Huber loss divided by delta and the number of rows: the same minimum, gradients of order 1
    scale = 1.0 / (delta * len(logL))
    loss = _huber(res, delta).sum() * scale
    g = np.clip(res, -delta, delta) * scale
    grad = np.array([
        (g * w[0]).sum(), (g * w[1]).sum(), (g * -w[1] * logN).sum(),
        (g * w[2]).sum(), (g * w[2] * logr).sum(), (g * -w[2] * logD).sum(),
        (g * w[3]).sum(), (g * -w[3] * logre).sum()])
    return loss, grad


@dataclass
class Fit:
    params: dict[str, float]
    r2: float
    huber: float
    rows: int
    heldout_rows: int = 0
    heldout_rmse: float | None = None
    heldout_mape: float | None = None      # mean absolute error in % of the observed loss
    heldout: list[dict] = field(default_factory=list)

    def predict(self, N, D, r, eps: float):
        return law(self.params, N, D, r, eps)


def fit_law(N, D, r, L, *, eps: float = 0.01, starts: int = 16, seed: int = 0,
            delta: float = HUBER_DELTA) -> tuple[dict[str, float], float]:
    """(parameters, Huber objective) of the best of ``starts`` L-BFGS-B fits from seeded random
    starts."""
    import os
    import sys

    if "scipy.optimize" not in sys.modules:
        # scipy's L-BFGS-B calls BLAS on 8-vectors: with OpenBLAS's thread pool on a busy machine each
        # step costs milliseconds (measured: 5 s instead of 0.2 s for one fit). Only read when scipy's
        # OpenBLAS loads, so set before the first import of scipy.optimize.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from scipy.optimize import minimize

    N, D, r, L = (np.asarray(x, float) for x in (N, D, r, L))
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    has_r = r > 0
    logr = np.where(has_r, np.log(np.where(has_r, r, 1.0)), 0.0)
    logre = np.log(r + eps)
    rng = np.random.default_rng(seed)
    lo_e = math.log(0.2 * L.min())
    hi_e = math.log(L.min())
    bounds = [(None, None), (None, None), (0.0, 3.0), (None, None), (0.0, 3.0), (0.0, 3.0), (None, None), (0.0, 3.0)]
    best_x, best_f = None, math.inf
    for _ in range(starts):
        x0 = np.array([rng.uniform(lo_e, hi_e), rng.uniform(-2, 12), rng.uniform(0.05, 1.0),
                       rng.uniform(-2, 12), rng.uniform(0.05, 1.5), rng.uniform(0.05, 1.0),
                       rng.uniform(-6, 1), rng.uniform(0.05, 1.5)])
        res = minimize(_objective, x0, args=(logN, logD, logr, has_r, logre, logL, delta), jac=True,
                       method="L-BFGS-B", bounds=bounds, options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8})
        if np.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    if best_x is None:
        raise MixtureError("the fit did not converge from any start")
    e, a, alpha, b, eta, beta, c, gamma = best_x
    return ({"E": math.exp(e), "A": math.exp(a), "alpha": float(alpha), "B": math.exp(b), "eta": float(eta),
             "beta": float(beta), "C": math.exp(c), "gamma": float(gamma)}, best_f)


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float("nan")


def holdout_mask(runs: Runs, holdout: str | float, seed: int = 0) -> np.ndarray:
    """Rows left out of the first fit: ``largest_n`` (the runs of the largest model: extrapolation),
    a fraction (random rows, seeded), or 0 (none)."""
    n = len(runs)
    if holdout == "largest_n":
        mask = runs.N == runs.N.max()
        if mask.all():
            raise MixtureError(f"{runs.path}: column N: holdout largest_n needs runs of several model sizes")
        return mask
    frac = float(holdout)
    if not 0 <= frac < 0.5:
        raise MixtureError(f"holdout must be largest_n or a fraction in [0, 0.5), got {holdout!r}")
    k = int(round(frac * n))
    mask = np.zeros(n, bool)
    if k:
        mask[np.random.default_rng(seed).choice(n, k, replace=False)] = True
    if n - k < MIN_ROWS - 2:
        raise MixtureError(f"{runs.path}: too few rows left to fit after holding out {k}")
    return mask


def fit_loss(runs: Runs, which: str, ratio: np.ndarray, mask: np.ndarray, eps: float, starts: int,
             seed: int) -> Fit:
    L = getattr(runs, which)
    out_rows = []
    rmse = mape = None
    if mask.any():
        p_tr, _ = fit_law(runs.N[~mask], runs.D[~mask], ratio[~mask], L[~mask], eps=eps, starts=starts, seed=seed)
        pred = law(p_tr, runs.N[mask], runs.D[mask], ratio[mask], eps)
        err = pred - L[mask]
        rmse = float(np.sqrt((err ** 2).mean()))
        mape = float((np.abs(err) / L[mask]).mean() * 100)
        out_rows = [{"line": runs.lines[i], "observed": float(L[i]), "predicted": float(p)}
                    for i, p in zip(np.flatnonzero(mask), pred)]
    params, huber = fit_law(runs.N, runs.D, ratio, L, eps=eps, starts=starts, seed=seed)
    r2 = _r2(L, law(params, runs.N, runs.D, ratio, eps))
    return Fit(params, r2, huber, len(L), int(mask.sum()), rmse, mape, out_rows)


# --------------------------------------------------------------------------------------------------
# plan


@dataclass
class Plan:
    target_N: float
    target_D: float
    eps: float
    rule: str
    recommended_r: float
    general: Fit
    domain: Fit
    grid: list[dict]
    note: str = ""

    def to_dict(self) -> dict:
        return {"target": {"N": self.target_N, "D": self.target_D}, "eps": self.eps, "rule": self.rule,
                "recommended_r": self.recommended_r, "note": self.note,
                "general_loss_fit": asdict(self.general), "domain_loss_fit": asdict(self.domain),
                "general_ratio_used_for_general_loss": True, "grid": self.grid}


def plan_mixture(runs: Runs, target_N: float, target_D: float, *, max_general_increase: float | None = None,
                 weight: float | None = None, grid_step: float = 0.01, eps: float = 0.01,
                 holdout: str | float = 0.2, starts: int = 16, seed: int = 0) -> Plan:
    """Fit both losses and recommend a domain ratio r for a run of ``target_N`` parameters on
    ``target_D`` tokens: the r with the lowest predicted domain loss whose general loss is at most
    ``max_general_increase`` % above its r = 0 value (default 3 %), or, with ``weight``, the r
    minimising ``weight * domain + (1 - weight) * general``."""
    if max_general_increase is not None and weight is not None:
        raise MixtureError("give either max_general_increase or weight, not both")
    if weight is not None and not 0 <= weight <= 1:
        raise MixtureError(f"weight must be in [0, 1], got {weight}")
    if max_general_increase is None and weight is None:
        max_general_increase = 3.0
    if not (target_N > 0 and target_D > 0):
        raise MixtureError("the target N and D must be > 0")
    if not 0 < grid_step <= 0.5:
        raise MixtureError(f"grid step must be in (0, 0.5], got {grid_step}")
    mask = holdout_mask(runs, holdout, seed)
    general = fit_loss(runs, "general_loss", 1.0 - runs.r, mask, eps, starts, seed)
    domain = fit_loss(runs, "domain_loss", runs.r, mask, eps, starts, seed)
    rs = np.round(np.linspace(0.0, 1.0, int(round(1 / grid_step)) + 1), 6)
    lg = general.predict(target_N, target_D, 1.0 - rs, eps)
    ld = domain.predict(target_N, target_D, rs, eps)
    note = ""
    if weight is not None:
        score = weight * ld + (1 - weight) * lg
        best = int(np.argmin(score))
        rule = f"minimise {weight:g} * domain loss + {1 - weight:g} * general loss"
    else:
        limit = lg[0] * (1 + max_general_increase / 100)
        ok = lg <= limit + 1e-12
        cand = np.flatnonzero(ok)
        best = int(cand[np.argmin(ld[cand])])
        rule = (f"lowest domain loss with general loss at most {max_general_increase:g}% above its r=0 value "
                f"({lg[0]:.4f} -> at most {limit:.4f})")
        if best == 0:
            note = "no ratio above 0 keeps the general loss within the limit"
    grid = [{"r": float(r), "general_loss": float(g), "domain_loss": float(d)} for r, g, d in zip(rs, lg, ld)]
    return Plan(target_N, target_D, eps, rule, float(rs[best]), general, domain, grid, note)


# --------------------------------------------------------------------------------------------------
# output


def mix_snippet(r: float, domain: str = "domain", general: str = "general") -> str:
    """The ``mix`` step to paste into a pipeline (proportions by tokens, as ``mix`` takes them)."""
    return (f"  - stage: mix\n    input: [{domain}, {general}]\n"
            f"    options: {{proportions: {{{domain}: {r:g}, {general}: {round(1 - r, 6):g}}}}}\n")


def table_text(plan: Plan, every: float = 0.1) -> str:
    step = max(1, int(round(every / (plan.grid[1]["r"] - plan.grid[0]["r"])))) if len(plan.grid) > 1 else 1
    rows = [g for i, g in enumerate(plan.grid) if i % step == 0 or g["r"] == plan.recommended_r]
    out = [f"{'r (domain)':>10}  {'general loss':>12}  {'domain loss':>11}", f"{'-' * 10}  {'-' * 12}  {'-' * 11}"]
    for g in rows:
        mark = "  <- recommended" if g["r"] == plan.recommended_r else ""
        out.append(f"{g['r']:>10.2f}  {g['general_loss']:>12.4f}  {g['domain_loss']:>11.4f}{mark}")
    return "\n".join(out)


def fit_text(name: str, f: Fit) -> str:
    p = ", ".join(f"{k}={v:.4g}" for k, v in f.params.items())
    held = (f"; held-out {f.heldout_rows} rows: RMSE {f.heldout_rmse:.4f}, mean abs error {f.heldout_mape:.2f}%"
            if f.heldout_rows else "")
    return f"{name}: {p}; R^2 {f.r2:.4f} on {f.rows} rows{held}"


def html_page(plan: Plan, runs_path: str, snippet: str) -> str:
    """A self-contained page: both predicted losses against r (inline SVG), the fits, the table."""
    W, H, L, B, T, R = 640, 320, 60, 40, 20, 60
    pw, ph = W - L - R, H - T - B
    rs = [g["r"] for g in plan.grid]

    def series(key):
        v = [g[key] for g in plan.grid]
        lo, hi = min(v), max(v)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        return v, lo, hi

    parts = [f'<svg class="plan" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
             'aria-label="predicted losses against the domain ratio">',
             f'<line class="axis" x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}"/>']
    for key, cls, side in (("general_loss", "general", "left"), ("domain_loss", "domain", "right")):
        v, lo, hi = series(key)
        pts = " ".join(f"{L + pw * r:.1f},{T + ph - ph * (y - lo) / (hi - lo):.1f}" for r, y in zip(rs, v))
        parts.append(f'<polyline class="{cls}" fill="none" points="{pts}"><title>{key}</title></polyline>')
        x = L - 6 if side == "left" else L + pw + 6
        anchor = "end" if side == "left" else "start"
        parts.append(f'<text class="{cls}" x="{x}" y="{T + 8}" text-anchor="{anchor}">{hi:.3f}</text>')
        parts.append(f'<text class="{cls}" x="{x}" y="{T + ph}" text-anchor="{anchor}">{lo:.3f}</text>')
    for k in range(6):
        parts.append(f'<text x="{L + pw * k / 5:.1f}" y="{H - 22}" text-anchor="middle">{k / 5:.1f}</text>')
    parts.append(f'<text x="{L + pw / 2}" y="{H - 6}" text-anchor="middle">domain ratio r</text>')
    xr = L + pw * plan.recommended_r
    parts.append(f'<line class="recommended" x1="{xr:.1f}" y1="{T}" x2="{xr:.1f}" y2="{T + ph}">'
                 f'<title>recommended r = {plan.recommended_r:g}</title></line>')
    parts.append("</svg>")
    css = ("body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:900px;padding:0 1em}"
           "svg text{font-size:11px;fill:#444}svg .axis{stroke:#999}svg polyline{stroke-width:2}"
           "svg polyline.general{stroke:#4c78a8}svg polyline.domain{stroke:#e45756}"
           "svg text.general{fill:#4c78a8}svg text.domain{fill:#e45756}"
           "svg .recommended{stroke:#333;stroke-dasharray:5 3}"
           "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}"
           "pre{background:#f7f7f7;padding:.6em}")
    rows = "".join(f"<tr><td>{g['r']:.2f}</td><td>{g['general_loss']:.4f}</td><td>{g['domain_loss']:.4f}</td></tr>"
                   for g in plan.grid)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>curate plan-mixture</title>"
            f"<style>{css}</style></head><body><h1>Mixture plan (D-CPT Law)</h1>"
            f"<p>runs: {html.escape(runs_path)}; target N = {plan.target_N:.3g}, D = {plan.target_D:.3g}; "
            f"rule: {html.escape(plan.rule)}</p>"
            f"<p><b>recommended domain ratio r = {plan.recommended_r:g}</b> {html.escape(plan.note)}</p>"
            f"<p><span style='color:#4c78a8'>general loss</span> (left scale, fitted against 1 - r) and "
            f"<span style='color:#e45756'>domain loss</span> (right scale)</p>" + "".join(parts) +
            f"<h2>fits</h2><p>{html.escape(fit_text('general loss', plan.general))}</p>"
            f"<p>{html.escape(fit_text('domain loss', plan.domain))}</p>"
            f"<h2>mix step</h2><pre>{html.escape(snippet)}</pre>"
            f"<h2>predictions</h2><table><tr><th>r</th><th>general loss</th><th>domain loss</th></tr>{rows}"
            "</table></body></html>")


def write_outputs(plan: Plan, runs_path: str, folder: str, domain: str = "domain", general: str = "general") -> dict[str, str]:
    """plan.json and plan.html in ``folder`` (written atomically)."""
    import os

    from curate.pipeline.io import atomic_write_bytes, get_fs

    snippet = mix_snippet(plan.recommended_r, domain, general)
    os.makedirs(folder, exist_ok=True)
    fs, _ = get_fs(folder)
    data = {**plan.to_dict(), "runs": runs_path, "mix": {"proportions": {
        domain: plan.recommended_r, general: round(1 - plan.recommended_r, 6)}}, "mix_step": snippet}
    paths = {"json": os.path.join(folder, "plan.json"), "html": os.path.join(folder, "plan.html")}
    atomic_write_bytes(fs, paths["json"], json.dumps(data, indent=1).encode())
    atomic_write_bytes(fs, paths["html"], html_page(plan, runs_path, snippet).encode())
    return paths


def generate_runs(params_general: dict, params_domain: dict, Ns: Sequence[float], Ds: Sequence[float],
                  rs: Sequence[float], *, eps: float = 0.01, noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Rows of runs following the law (multiplicative Gaussian noise ``noise``): tests and samples."""
    rng = np.random.default_rng(seed)
    rows = []
    for N in Ns:
        for D in Ds:
            for r in rs:
                g = float(law(params_general, N, D, 1.0 - r, eps)) * (1 + noise * rng.standard_normal())
                d = float(law(params_domain, N, D, r, eps)) * (1 + noise * rng.standard_normal())
                rows.append({"N": N, "D": D, "r": r, "general_loss": round(g, 6), "domain_loss": round(d, 6)})
    return rows
