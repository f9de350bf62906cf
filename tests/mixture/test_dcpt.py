"""curate plan-mixture: D-CPT Law fits recover known parameters; recommendations follow the true law;
the CLI writes the table, plan.json, plan.html and a mix step; bad CSVs are clear errors (exit 2)."""

import csv
import json
import os
import re
import subprocess

import numpy as np
import pytest
import yaml

from curate.mixture.dcpt import (MixtureError, fit_law, generate_runs, law, plan_mixture, read_runs)
from curate.stages.select.mix import Mix
from helpers import ROOT, curate_bin

PG = {"E": 1.8, "A": 300.0, "alpha": 0.3, "B": 40.0, "eta": 0.3, "beta": 0.28, "C": 0.25, "gamma": 0.3}
PD = {"E": 1.2, "A": 250.0, "alpha": 0.28, "B": 50.0, "eta": 0.3, "beta": 0.3, "C": 0.3, "gamma": 0.35}
NS, DS, RS = [5e7, 1.5e8, 4e8, 1e9], [5e8, 2e9, 8e9, 3e10], [0, 0.1, 0.25, 0.5, 0.75, 1.0]


def columns(rows, loss):
    return [np.array([x[k] for x in rows]) for k in ("N", "D", "r", loss)]


def write_csv(path, rows, header=("N", "D", "r", "general_loss", "domain_loss")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h, "") for h in header] if isinstance(r, dict) else r)
    return str(path)


def test_exact_data_gives_the_parameters_back():
    rows = generate_runs(PG, PD, NS, DS, RS, noise=0.0)
    N, D, r, L = columns(rows, "domain_loss")
    p, _ = fit_law(N, D, r, L, starts=6, seed=1)
    assert p == pytest.approx(PD, rel=1e-2)
    N, D, r, L = columns(rows, "general_loss")
    p, _ = fit_law(N, D, 1 - r, L, starts=6, seed=1)           # the general loss against 1 - r
    assert p == pytest.approx(PG, rel=1e-2)


def test_noisy_data_gives_close_exponents_and_extrapolates():
    rows = generate_runs(PG, PD, NS, DS, RS, noise=0.002, seed=2)
    N, D, r, L = columns(rows, "domain_loss")
    p, _ = fit_law(N, D, r, L, starts=8)
    for k in ("alpha", "beta", "eta", "gamma"):
        assert p[k] == pytest.approx(PD[k], rel=0.12), k
    assert p["E"] == pytest.approx(PD["E"], rel=0.06)
    grid = np.linspace(0, 1, 21)                                 # a 7B model on 100B tokens: far outside the runs
    assert np.abs(law(p, 7e9, 1e11, grid, 0.01) / law(PD, 7e9, 1e11, grid, 0.01) - 1).max() < 0.01


def true_best(rule_general_increase=None, weight=None, N=1e9, D=2e10):
    rs = np.round(np.linspace(0, 1, 101), 6)
    lg, ld = law(PG, N, D, 1 - rs, 0.01), law(PD, N, D, rs, 0.01)
    if weight is not None:
        return rs[np.argmin(weight * ld + (1 - weight) * lg)]
    ok = lg <= lg[0] * (1 + rule_general_increase / 100)
    return rs[ok][np.argmin(ld[ok])]


def test_plan_follows_the_true_law(tmp_path):
    rows = generate_runs(PG, PD, NS, DS, RS, noise=0.001, seed=3)
    runs = read_runs(write_csv(tmp_path / "runs.csv", rows))
    plan = plan_mixture(runs, 1e9, 2e10, max_general_increase=3, starts=6, holdout="largest_n")
    assert abs(plan.recommended_r - true_best(3)) <= 0.03
    assert plan.general.heldout_rows == plan.domain.heldout_rows == len(DS) * len(RS)   # the 1e9 runs
    assert plan.domain.heldout_mape < 1.0 and plan.general.r2 > 0.99 and plan.domain.r2 > 0.99
    g = {x["r"]: x for x in plan.grid}
    assert g[plan.recommended_r]["general_loss"] <= 1.03 * g[0.0]["general_loss"] + 1e-9
    # the general loss rises with the domain share, the domain loss falls
    lg = [x["general_loss"] for x in plan.grid]
    ld = [x["domain_loss"] for x in plan.grid]
    assert lg[-1] > lg[0] and ld[-1] < ld[0]


def test_weight_rule(tmp_path):
    rows = generate_runs(PG, PD, NS, DS, RS, noise=0.001, seed=4)
    runs = read_runs(write_csv(tmp_path / "runs.csv", rows))
    plan = plan_mixture(runs, 1e9, 2e10, weight=0.5, starts=6, holdout=0.2)
    assert abs(plan.recommended_r - true_best(weight=0.5)) <= 0.03
    assert plan.general.heldout_rows == round(0.2 * len(rows))
    with pytest.raises(MixtureError, match="either"):
        plan_mixture(runs, 1e9, 2e10, weight=0.5, max_general_increase=3)


@pytest.mark.slow
def test_cli_table_json_html_and_mix_step(tmp_path):
    out = tmp_path / "plan"
    r = subprocess.run([curate_bin(), "plan-mixture", os.path.join(ROOT, "configs", "mixture_runs.csv"),
                        "--n", "1e9", "--d", "2e10", "--starts", "6", "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "<- recommended" in r.stdout and "R^2" in r.stdout and "held-out" in r.stdout
    data = json.load(open(out / "plan.json"))
    rec = data["recommended_r"]
    assert f"recommended domain ratio r = {rec:g}" in r.stdout
    assert 0 < rec < 1 and len(data["grid"]) == 101
    assert set(data["general_loss_fit"]["params"]) == {"E", "A", "alpha", "B", "eta", "beta", "C", "gamma"}
    # the mix step printed is a valid `mix` step with these proportions
    snippet = r.stdout.split("mix step (proportions by tokens):\n", 1)[1].split("\nwrote", 1)[0]
    step = yaml.safe_load(snippet)[0]
    assert step["stage"] == "mix" and step["input"] == ["domain", "general"]
    mix = Mix(**step["options"])
    assert mix.config.proportions == pytest.approx({"domain": rec, "general": 1 - rec})
    assert data["mix"]["proportions"] == pytest.approx({"domain": rec, "general": 1 - rec})
    page = open(out / "plan.html", encoding="utf-8").read()
    assert page.count("<polyline") == 2 and 'class="recommended"' in page
    assert not re.search(r"<(script|link|img)\b", page)


@pytest.mark.parametrize("case,expect", [
    ("missing", r"runs.csv: line 1: missing column\(s\) domain_loss"),
    ("text", r"runs.csv: line 5: column D: not a number: 'lots'"),
    ("ratio", r"runs.csv: line 3: column r: 1.5 is outside \[0, 1\]"),
    ("few", r"runs.csv: too few rows: 5 runs"),
])
def test_bad_csv_is_a_clear_error_exit_2(tmp_path, case, expect):
    rows = generate_runs(PG, PD, NS[:2], DS[:2], RS, noise=0.0)
    header = ("N", "D", "r", "general_loss", "domain_loss")
    table = [[x[h] for h in header] for x in rows]
    if case == "missing":
        header = header[:4]
        table = [t[:4] for t in table]
    elif case == "text":
        table[3][1] = "lots"
    elif case == "ratio":
        table[1][2] = 1.5
    elif case == "few":
        table = table[:5]
    path = write_csv(tmp_path / "runs.csv", table, header)
    with pytest.raises(MixtureError, match=expect):
        read_runs(path)
    if case == "text":   # the command says the same, with exit code 2
        r = subprocess.run([curate_bin(), "plan-mixture", path, "--n", "1e9", "--d", "1e10"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and re.search(expect, r.stderr) and str(tmp_path) in r.stderr
