"""Fidelity and noise of a study: does the short trial budget rank hyperparameters as the launch
schedule does, and which differences between trials are larger than the noise?

    from analysis.fidelity import fidelity_table, spearman, draw_fidelity
    table = fidelity_table(load_trials(url, name), load_launches(url, name))
    rho = spearman(table)       # {"n", "rho", "p"}: scipy.stats.spearmanr over the launches

Paired comparisons of two launches' per-image test outcomes: pipeline.stats.paired_launches
(the analysis imports nothing of the pipeline).

* :func:`fidelity_table`: one row per launched trial (the mean over its launch seeds): the trial's
  validation certified accuracy and the launch's test certified accuracy;
* :func:`spearman`: Spearman's rank correlation of the two, with its p-value and n (n >= 3 or NaN);
* :func:`seed_band`: the validation scores of the published point's seed repeats;
* :func:`section` / :func:`draw`: the report's "Noise and fidelity" section and figures (hooks
  called from :mod:`analysis.report`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.data import VAL_CERT

TEST_CERT = "test_cert_acc"


def _min_count(group: pd.DataFrame) -> int:
    """Fewest test images over a trial's launches; -1 where no launch recorded the count."""
    if "n_test" not in group:
        return -1
    n = group["n_test"].astype(float).min()
    return -1 if math.isnan(n) else int(n)


def fidelity_table(trials: pd.DataFrame, launches: pd.DataFrame) -> pd.DataFrame:
    """Columns ``trial``, ``val_cert_acc``, ``test_cert_acc`` (mean over seeds), ``seeds``,
    ``test_cert_min``, ``test_cert_max``, ``n_test``, sorted by trial."""
    cols = ["trial", VAL_CERT, TEST_CERT, "seeds", "test_cert_min", "test_cert_max", "n_test"]
    if launches is None or not len(launches):
        return pd.DataFrame(columns=cols)
    la = launches.dropna(subset=["trial", TEST_CERT]).copy()
    la["trial"] = la["trial"].astype(int)
    val = {}
    if trials is not None and len(trials) and VAL_CERT in trials.columns:
        val = dict(zip(trials["number"].astype(int), trials[VAL_CERT].astype(float)))
    rows = []
    for number, group in la.groupby("trial"):
        test = group[TEST_CERT].astype(float)
        v = val.get(int(number), group[VAL_CERT].astype(float).mean()
                    if VAL_CERT in group.columns else math.nan)
        rows.append([int(number), float(v), float(test.mean()), int(len(test)),
                     float(test.min()), float(test.max()),
                     _min_count(group)])
    return pd.DataFrame(rows, columns=cols).sort_values("trial").reset_index(drop=True)


def spearman(table: pd.DataFrame) -> dict[str, float]:
    """Spearman's ρ of validation vs test certified accuracy over the launched trials."""
    from scipy import stats

    t = table.dropna(subset=[VAL_CERT, TEST_CERT])
    n = len(t)
    if n < 3 or t[VAL_CERT].nunique() < 2 or t[TEST_CERT].nunique() < 2:
        return {"n": n, "rho": math.nan, "p": math.nan}
    res = stats.spearmanr(t[VAL_CERT].to_numpy(float), t[TEST_CERT].to_numpy(float))
    return {"n": n, "rho": float(res.statistic), "p": float(res.pvalue)}


def seed_band(trials: pd.DataFrame) -> pd.DataFrame:
    """Complete published trials (one per training seed): number, seed, val cert and interval."""
    if trials is None or not len(trials) or "published" not in trials.columns:
        return pd.DataFrame(columns=["number", "seed", VAL_CERT, "val_cert_lo", "val_cert_hi"])
    pub = trials[(trials["published"].astype(bool)) & (trials["state"] == "COMPLETE")]
    out = pd.DataFrame({"number": pub["number"].astype(int),
                        "seed": pub["train_seed"] if "train_seed" in pub else np.nan,
                        VAL_CERT: pub[VAL_CERT].astype(float) if VAL_CERT in pub else np.nan})
    for col in ("val_cert_lo", "val_cert_hi"):
        out[col] = pub[col].astype(float) if col in pub else np.nan
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Report hooks


def _pct(x: Any) -> str:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(f) else f"{100 * f:.1f}"


def draw(trials: pd.DataFrame, launches: pd.DataFrame, folder: Path, base: str
         ) -> list[tuple[str, str]]:
    """The fidelity scatter (if any launch) and the noise figure; returns (file, kind) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    out: list[tuple[str, str]] = []
    table = fidelity_table(trials, launches)
    if len(table):
        fig = Figure(figsize=(5.5, 4.5))
        ax = fig.subplots()
        ax.errorbar(100 * table[VAL_CERT], 100 * table[TEST_CERT],
                    yerr=[100 * (table[TEST_CERT] - table["test_cert_min"]),
                          100 * (table["test_cert_max"] - table[TEST_CERT])],
                    fmt="o", capsize=3)
        for _, r in table.iterrows():
            ax.annotate(f"#{int(r['trial'])}", (100 * r[VAL_CERT], 100 * r[TEST_CERT]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        rho = spearman(table)
        ax.set_title(f"Fidelity: Spearman ρ = {rho['rho']:.2f} (p = {rho['p']:.2g}, n = "
                     f"{rho['n']})" if not math.isnan(rho["rho"]) else
                     f"Fidelity (n = {rho['n']}: too few launches for ρ)", fontsize=10)
        ax.set_xlabel("trial validation certified accuracy (%)")
        ax.set_ylabel("launch test certified accuracy (%)")
        name = f"{base}_fidelity.png"
        fig.savefig(folder / name, dpi=110, bbox_inches="tight")
        out.append((name, "fidelity"))
    done = trials[trials["state"] == "COMPLETE"] if len(trials) else trials
    if len(done) and VAL_CERT in done.columns and "val_cert_lo" in done.columns:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        x = done["number"].astype(int)
        y = 100 * done[VAL_CERT].astype(float)
        lo = 100 * done["val_cert_lo"].astype(float)
        hi = 100 * done["val_cert_hi"].astype(float)
        ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o", capsize=2, label="trial (95% Wilson)")
        band = seed_band(trials)
        if len(band) >= 2:
            ax.axhspan(100 * band[VAL_CERT].min(), 100 * band[VAL_CERT].max(), alpha=0.2,
                       color="tab:orange",
                       label=f"published point, {len(band)} training seeds (min–max)")
        elif len(band) == 1:
            ax.axhline(100 * band[VAL_CERT].iloc[0], color="tab:orange", label="published point")
        ax.set_xlabel("trial")
        ax.set_ylabel("validation certified accuracy (%)")
        ax.legend(fontsize=8)
        name = f"{base}_noise.png"
        fig.savefig(folder / name, dpi=110, bbox_inches="tight")
        out.append((name, "noise"))
    return out


def section(trials: pd.DataFrame, launches: pd.DataFrame, info: dict[str, Any]) -> list[str]:
    """Markdown lines: budgets, intervals, seed band, paired test vs published, fidelity table."""
    lines = ["### Noise and fidelity", ""]
    done = trials[trials["state"] == "COMPLETE"] if len(trials) else trials
    if len(done) and "val_n" in done.columns:
        lines.append("Scores with their 95% Wilson intervals on the validation images, and the "
                     "budget each trial ran with:")
        lines.append("")
        lines.append("| # | val cert % | 95% interval | n val | epochs | n train |")
        lines.append("|---|---|---|---|---|---|")
        for _, r in done.sort_values("number").iterrows():
            lines.append(f"| {int(r['number'])} | {_pct(r.get(VAL_CERT))} | "
                         f"[{_pct(r.get('val_cert_lo'))}, {_pct(r.get('val_cert_hi'))}] | "
                         f"{_fmt_int(r.get('val_n'))} | {_fmt_int(r.get('budget.epochs'))} | "
                         f"{_fmt_int(r.get('budget.n_train'))} |")
        lines.append("")
    band = seed_band(trials)
    if len(band) >= 2:
        v = band[VAL_CERT]
        lines.append(f"Seed band of the published point ({len(band)} training seeds): "
                     f"{_pct(v.min())}–{_pct(v.max())}% (mean {_pct(v.mean())}%, sd "
                     f"{100 * v.std(ddof=1):.1f} points).")
        lines.append("")
    table = fidelity_table(trials, launches)
    if len(table):
        rho = spearman(table)
        lines.append("Fidelity: trial validation score vs launch test certified accuracy "
                     "(mean over launch seeds):")
        lines.append("")
        lines.append("| trial | val cert % | test cert % | seeds | test min–max % | n test |")
        lines.append("|---|---|---|---|---|---|")
        for _, r in table.iterrows():
            lines.append(f"| {int(r['trial'])} | {_pct(r[VAL_CERT])} | {_pct(r[TEST_CERT])} | "
                         f"{int(r['seeds'])} | {_pct(r['test_cert_min'])}–"
                         f"{_pct(r['test_cert_max'])} | {int(r['n_test'])} |")
        lines.append("")
        if math.isnan(rho["rho"]):
            lines.append(f"Spearman ρ: not defined with n = {rho['n']} launched trials "
                         "(needs >= 3 with distinct scores).")
        else:
            lines.append(f"Spearman ρ = {rho['rho']:.3f} (p = {rho['p']:.3g}, n = {rho['n']} "
                         "launched trials; scipy.stats.spearmanr).")
        lines.append("")
    return lines


def _fmt_int(x: Any) -> str:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(f) else str(int(f))
