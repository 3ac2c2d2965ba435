"""Figures of a tuning study, drawn with matplotlib only (no pyplot, no display needed).

Every function takes DataFrames (from :mod:`analysis.data`), returns the
:class:`matplotlib.figure.Figure` and, given ``path``, writes it as PNG. Accuracies are plotted in
percent. The plotted data can be read back from the figure; artists carry labels (and trial lines a
``gid``) so tests and notebooks can find them:

* :func:`optimization_history`: scatter ``"complete"`` (trial number, val cert %), scatter
  ``"pruned (last stage)"``, line ``"running best"``, line ``"published COLT (test)"``;
* :func:`knob_scatter`: one axes per parameter, scatters ``"complete"``,
  ``"pruned (last stage)"``, ``"published hyperparameters"``;
* :func:`importance_bars`: horizontal bars (``ax.patches`` widths = importances) or a note (also
  when the importance rests on fewer than :data:`MIN_IMPORTANCE_TRIALS` complete trials);
* :func:`pareto_front`: two panels with the same axes. ``fig.axes[0]`` (validation split):
  scatter ``"trials"``, line ``"Pareto front"``, scatter ``"launched trials"``;
  ``fig.axes[1]`` (test set): scatter ``"published COLT (test)"``, scatter ``"launch (test)"``
  (labels prefixed ``"<group>: "`` with ``by``);
* :func:`stage_curves`: one line per trial, ``gid="trial <n>"``, its own colour, labelled
  ``"#<n> <state>"`` in the legend; the published trial also gets a star at its last stage;
* :func:`certification_outcomes`: one bar container per status (``label`` = status);
* :func:`time_per_input`: box plot per method plus scatter ``"<method> (n=<k>)"`` of the times.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.data import (
    STATUSES,
    VAL_CERT,
    VAL_NAT,
    param_columns,
    stage_columns,
)

STATUS_COLORS = {"certified": "#2ca02c", "falsified": "#d62728", "unknown": "#ff7f0e",
                 "misclassified": "#7f7f7f"}
STATE_STYLES = {
    "COMPLETE": dict(color="#1f77b4", linestyle="-", marker="o", alpha=0.8),
    "PRUNED": dict(color="#d62728", linestyle="--", marker="x", alpha=0.8),
    "FAIL": dict(color="#7f7f7f", linestyle=":", marker="s", alpha=0.8),
    "RUNNING": dict(color="#9467bd", linestyle="-.", marker=".", alpha=0.8),
    "WAITING": dict(color="#8c564b", linestyle="-.", marker=".", alpha=0.8),
}
# Cascade order of the certification stages that decide an input.
METHOD_ORDER = ("clean", "pgd", "box", "zonotope", "zonotope_slopes", "lp", "milp", "timeout")
TIME_FLOOR_S = 1e-4
DPI = 120
# fANOVA's forest needs some trials: below this many complete ones no bars are drawn.
MIN_IMPORTANCE_TRIALS = 10
# Up to this many trials the stage plot names each trial in its legend, else a colour bar.
MAX_LEGEND_TRIALS = 16


# --------------------------------------------------------------------------------------------
# Helpers


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return fig


def _pct(values: Any) -> np.ndarray:
    return 100.0 * np.asarray(values, dtype=float)


def _as_fraction(value: Any) -> float:
    """Published accuracies are fractions; a value above 1 is taken as already in percent."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v / 100.0 if v > 1.0 else v


def _one_study(trials: pd.DataFrame) -> str:
    names = trials["study"].dropna().unique() if "study" in trials.columns else []
    if len(names) > 1:
        raise ValueError(f"this figure shows one study; the DataFrame holds {list(names)}: "
                         "filter it, e.g. trials[trials.study == name]")
    return str(names[0]) if len(names) else ""


def cert_score(trials: pd.DataFrame) -> pd.Series:
    """Validation certified accuracy (fraction) of each trial: the ``val_cert_acc`` attribute,
    else the objective value (last objective for multi-objective studies)."""
    score = (trials[VAL_CERT].astype(float) if VAL_CERT in trials.columns
             else pd.Series(np.nan, index=trials.index))
    fallback = next((c for c in ("values_1", "value", "values_0") if c in trials.columns), None)
    if fallback is not None:
        score = score.fillna(trials[fallback].astype(float))
    return score


def last_stage_score(trials: pd.DataFrame) -> pd.Series:
    """The last intermediate value each trial reported (NaN if none)."""
    cols = stage_columns(trials)
    if not cols:
        return pd.Series(np.nan, index=trials.index)
    return trials[cols].astype(float).ffill(axis=1).iloc[:, -1]


def pareto_mask(nat: Iterable[float], cert: Iterable[float]) -> np.ndarray:
    """True where the (nat, cert) point is not dominated (both maximised); NaN points are False."""
    x, y = np.asarray(list(nat), dtype=float), np.asarray(list(cert), dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    mask = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        mask[i] = not dominated.any()
    return mask


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", wrap=True,
            fontsize=10, color="#444444",
            bbox=dict(boxstyle="round", facecolor="#f4f4f4", edgecolor="#bbbbbb"))


def _state(trials: pd.DataFrame, state: str) -> pd.DataFrame:
    return trials[trials["state"] == state]


# --------------------------------------------------------------------------------------------
# Study figures


def optimization_history(trials: pd.DataFrame, published: Mapping[str, Any] | None = None,
                         path: str | Path | None = None, title: str | None = None) -> Figure:
    """Validation certified accuracy per trial number, its running best and the published value."""
    name = _one_study(trials)
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    trials = trials.sort_values("number")
    done = _state(trials, "COMPLETE")
    score = cert_score(done)
    ax.scatter(done["number"], _pct(score), color=STATE_STYLES["COMPLETE"]["color"], zorder=3,
               label="complete")
    pruned = _state(trials, "PRUNED")
    if len(pruned):
        ax.scatter(pruned["number"], _pct(last_stage_score(pruned)), marker="x",
                   color=STATE_STYLES["PRUNED"]["color"], zorder=3, label="pruned (last stage)")
    valid = score.notna()
    if valid.any():
        ax.plot(done["number"][valid], _pct(score[valid].cummax()), drawstyle="steps-post",
                color="black", linewidth=1.5, label="running best")
    pub = _as_fraction((published or {}).get("cert_acc"))
    if not math.isnan(pub):
        ax.axhline(100 * pub, color="#2ca02c", linestyle="--", linewidth=1.2,
                   label="published COLT (test)")
    n_fail = int((trials["state"] == "FAIL").sum())
    if n_fail:
        ax.text(0.01, 0.98, f"{n_fail} failed trial(s) not shown", transform=ax.transAxes,
                va="top", fontsize=8, color="#555555")
    if not len(trials):
        _note(ax, "no trials")
    ax.set_xlabel("trial number")
    ax.set_ylabel("validation certified accuracy (%)")
    ax.set_title(title or f"Optimisation history{': ' + name if name else ''}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def _log_ticks(ax: Any) -> None:
    """Readable log-scale x ticks: labels on at most about five major ticks (powers of ten, or
    a few plain values inside one decade), no labels on minor ticks, and slanted labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    lo, hi = (v for v in sorted(ax.get_xlim()))
    decades = math.log10(hi / lo) if lo > 0 else 0.0
    if decades >= 3:
        major = LogLocator(base=10, numticks=5)
    elif decades >= 1:
        major = LogLocator(base=10, subs=(1.0, 3.0), numticks=8)
    else:  # inside one decade: a few evenly spaced values (log placement would crowd them)
        major = MaxNLocator(nbins=3, min_n_ticks=2)
    ax.xaxis.set_major_locator(major)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", which="major", labelrotation=30, labelsize=8)


def _is_log(values: pd.Series, name: str, log_params: Iterable[str]) -> bool:
    if name in set(log_params):
        return True
    v = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(v) and (v > 0).all() and v.max() / v.min() >= 100)


def knob_scatter(trials: pd.DataFrame, params: list[str] | None = None,
                 log_params: Iterable[str] | None = None, path: str | Path | None = None,
                 title: str | None = None) -> Figure:
    """Each tuned knob against validation certified accuracy, one subplot per knob.

    Complete trials at their final score, pruned trials at their last reported stage score, the
    enqueued published-hyperparameters trial marked. Knobs sampled on a log scale (``attrs``) or
    spanning two decades get a log x axis; non-numeric choices are placed at 0, 1, ...
    """
    name = _one_study(trials)
    params = params if params is not None else param_columns(trials)
    log_params = list(log_params if log_params is not None else trials.attrs.get("log_params", []))
    n = max(len(params), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    if not params:
        _note(axes[0], "no tuned parameters in this study")
    done = _state(trials, "COMPLETE")
    pruned = _state(trials, "PRUNED")
    pub = done[done["published"].astype(bool)] if "published" in done.columns else done.iloc[:0]
    for ax, param in zip(axes, params):
        col = trials[param]
        numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
        if numeric:
            def xs(frame: pd.DataFrame) -> np.ndarray:
                return frame[param].astype(float).to_numpy()
        else:
            cats = sorted(col.dropna().astype(str).unique())
            pos = {c: i for i, c in enumerate(cats)}

            def xs(frame: pd.DataFrame) -> np.ndarray:
                return np.array([pos.get(str(v), np.nan) for v in frame[param]], dtype=float)

            ax.set_xticks(range(len(cats)), cats)
        ax.scatter(xs(done), _pct(cert_score(done)), color=STATE_STYLES["COMPLETE"]["color"],
                   zorder=3, label="complete")
        if len(pruned):
            ax.scatter(xs(pruned), _pct(last_stage_score(pruned)), marker="x",
                       color=STATE_STYLES["PRUNED"]["color"], zorder=3,
                       label="pruned (last stage)")
        if len(pub):
            ax.scatter(xs(pub), _pct(cert_score(pub)), marker="*", s=160, facecolor="none",
                       edgecolor="#2ca02c", linewidth=1.5, zorder=4,
                       label="published hyperparameters")
        if numeric and _is_log(col, param, log_params):
            ax.set_xscale("log")
            _log_ticks(ax)
        ax.set_title(param, fontsize=10)
        ax.set_xlabel(param + (" (log scale)" if ax.get_xscale() == "log" else ""))
        ax.set_ylabel("val. certified acc. (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(params):]:
        if params:
            ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8, ncols=len(handles))
    fig.suptitle(title or f"Tuned knobs vs validation certified accuracy"
                          f"{': ' + name if name else ''}", x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, path)


def importance_bars(importances: pd.Series | Mapping[str, float] | None, note: str | None = None,
                    path: str | Path | None = None, title: str | None = None,
                    n_complete: int | None = None) -> Figure:
    """Hyperparameter importance as horizontal bars (largest on top), or the note when empty.

    With ``n_complete`` (the complete trials the importance was computed from) below
    :data:`MIN_IMPORTANCE_TRIALS`, no bars are drawn: a forest fitted to a handful of points
    ranks the knobs by chance, and bars would look like a finding.
    """
    imp = pd.Series(importances if importances is not None else {}, dtype=float)
    if n_complete is not None and n_complete < MIN_IMPORTANCE_TRIALS and len(imp):
        imp = imp.iloc[:0]
        note = (f"not shown: the importance would rest on {n_complete} complete trial"
                f"{'' if n_complete == 1 else 's'}; it needs at least {MIN_IMPORTANCE_TRIALS}")
    fig = Figure(figsize=(7, 0.5 * max(len(imp), 3) + 1.5))
    ax = fig.add_subplot()
    if len(imp):
        imp = imp.sort_values(ascending=True)
        ax.barh(imp.index.astype(str), imp.to_numpy(), color="#1f77b4")
        for y, v in enumerate(imp.to_numpy()):
            ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
        ax.set_xlim(0, max(1.0, float(imp.max()) * 1.15))
        if note:
            ax.text(0.99, 0.01, note, transform=ax.transAxes, ha="right", va="bottom",
                    fontsize=8, color="#555555")
    else:
        ax.set_yticks([])
        _note(ax, note or "no importance available")
    ax.set_xlabel("fANOVA importance for validation certified accuracy (fraction of variance)")
    ax.set_title(title or "Hyperparameter importance")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _groups(frame: pd.DataFrame | None, by: str | None) -> list[tuple[str, pd.DataFrame]]:
    if frame is None:
        return []
    if by is None:
        return [("", frame)]
    return [(str(g), sub) for g, sub in frame.groupby(by, sort=False)]


def pareto_front(trials: pd.DataFrame, launches: pd.DataFrame | None = None,
                 published: Mapping[str, Any] | pd.DataFrame | None = None,
                 path: str | Path | None = None, by: str | None = None,
                 title: str | None = None) -> Figure:
    """Natural vs certified accuracy in two panels with the same axes: the complete trials on the
    validation split with their Pareto front (left), the published COLT point and the launches
    on the test set (right). Validation and test numbers are never drawn in one panel.

    ``published`` is a dict ``{"nat_acc", "cert_acc"}`` (fractions), or with ``by`` a DataFrame
    with the ``by`` column and ``published_nat_acc``/``published_cert_acc`` (see
    :func:`analysis.load_studies`). ``launches`` rows need ``test_nat_acc``/``test_cert_acc``
    (and ``trial``, ``val_nat_acc``, ``val_cert_acc`` to mark the launched trial on the left).
    With ``by`` (a column of all frames, e.g. ``study``) every group gets its own colour, front,
    published point and launches, labelled ``"<group>: ..."``.
    """
    if by is None:
        _one_study(trials)
    fig = Figure(figsize=(12, 5.5))
    val_ax, test_ax = fig.subplots(1, 2, sharex=True, sharey=True)
    colors = [f"C{i}" for i in range(10)]
    launch_groups = dict(_groups(launches, by)) if launches is not None and len(launches) else {}
    if isinstance(published, pd.DataFrame):
        pub_rows = {("" if by is None else str(r[by])): {"nat_acc": r.get("published_nat_acc"),
                                                          "cert_acc": r.get("published_cert_acc")}
                    for _, r in published.iterrows()}
    elif published:
        pub_rows = {"": published}
    else:
        pub_rows = {}
    any_val = any_test = False
    for i, (group, sub) in enumerate(_groups(trials, by)):
        color = colors[i % len(colors)]
        prefix = f"{group}: " if group else ""
        done = _state(sub, "COMPLETE")
        nat = done[VAL_NAT].astype(float) if VAL_NAT in done.columns else (
            done["values_0"].astype(float) if "values_0" in done.columns
            else pd.Series(np.nan, index=done.index))
        cert = cert_score(done)
        ok = nat.notna() & cert.notna()
        nat, cert, numbers = nat[ok], cert[ok], done["number"][ok]
        if len(nat):
            any_val = True
            val_ax.scatter(_pct(nat), _pct(cert), color=color, alpha=0.55, zorder=3,
                           label=f"{prefix}trials")
            mask = pareto_mask(nat, cert)
            front = pd.DataFrame({"nat": nat[mask], "cert": cert[mask]}).drop_duplicates()
            front = front.sort_values(["nat", "cert"], ascending=[True, False])
            val_ax.plot(_pct(front["nat"]), _pct(front["cert"]), color=color, linewidth=1.8,
                        marker="o", markersize=7, markerfacecolor="none", zorder=4,
                        label=f"{prefix}Pareto front")
            for x, y, n in zip(_pct(nat[mask]), _pct(cert[mask]), numbers[mask]):
                val_ax.annotate(f"#{n}", (x, y), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=color)
        pub = pub_rows.get(group)
        if pub is not None:
            pn, pc = _as_fraction(pub.get("nat_acc")), _as_fraction(pub.get("cert_acc"))
            if not (math.isnan(pn) or math.isnan(pc)):
                any_test = True
                test_ax.scatter([100 * pn], [100 * pc], marker="*", s=260, color=color,
                                edgecolor="black", zorder=5,
                                label=f"{prefix}published COLT (test)")
        lsub = launch_groups.get(group)
        if lsub is not None and len(lsub):
            tn, tc = lsub["test_nat_acc"].astype(float), lsub["test_cert_acc"].astype(float)
            ok = tn.notna() & tc.notna()
            if ok.any():
                any_test = True
                test_ax.scatter(_pct(tn[ok]), _pct(tc[ok]), marker="D", s=70, color=color,
                                edgecolor="black", zorder=5, label=f"{prefix}launch (test)")
                for _, row in lsub[ok].iterrows():
                    test_ax.annotate(f"launch of #{row.get('trial')}",
                                     (100 * float(row["test_nat_acc"]),
                                      100 * float(row["test_cert_acc"])),
                                     textcoords="offset points", xytext=(6, -11), fontsize=7)
            # The launched trials, ringed where they sit on the validation split.
            vx = pd.to_numeric(lsub.get("val_nat_acc"), errors="coerce")
            vy = pd.to_numeric(lsub.get("val_cert_acc"), errors="coerce")
            if vx is not None and vy is not None:
                okv = vx.notna() & vy.notna()
                if okv.any():
                    val_ax.scatter(_pct(vx[okv]), _pct(vy[okv]), s=180, facecolor="none",
                                   edgecolor="black", linewidth=1.4, zorder=5,
                                   label=f"{prefix}launched trials")
    if not any_val:
        _note(val_ax, "no complete trial with validation accuracies")
    if not any_test:
        _note(test_ax, "no launch and no published result")
    name = "" if by is not None else _one_study(trials)
    fig.suptitle(title or f"Natural vs certified accuracy{': ' + name if name else ''}",
                 x=0.02, ha="left")
    val_ax.set_title("validation split: tuning trials", fontsize=10)
    test_ax.set_title("test set: published COLT and launches", fontsize=10)
    for ax in (val_ax, test_ax):
        ax.set_xlabel("natural accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    val_ax.set_ylabel("certified accuracy (%)")
    test_ax.tick_params(labelleft=True)
    if any_val or any_test:
        _pad_limits(val_ax)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, path)


def _pad_limits(ax: Any, min_span: float = 4.0, margin: float = 0.12) -> None:
    """Room around the points (and their labels) and at least ``min_span`` percentage points
    per axis, so that near-equal accuracies do not fill the panel edge to edge."""
    ax.relim()
    ax.autoscale_view()
    for get, set_ in ((ax.get_xlim, ax.set_xlim), (ax.get_ylim, ax.set_ylim)):
        lo, hi = get()
        span = max(hi - lo, min_span)
        mid = (lo + hi) / 2
        set_(mid - span * (0.5 + margin), mid + span * (0.5 + margin))


def stage_curves(trials: pd.DataFrame, path: str | Path | None = None,
                 title: str | None = None) -> Figure:
    """Validation certified accuracy at the end of each stage, one line per trial (``gid`` =
    ``"trial <n>"``) in its own colour; the line style gives the state (solid complete, dashed
    pruned, dotted failed). Up to :data:`MAX_LEGEND_TRIALS` trials the legend names each one,
    beyond that a colour bar maps colour to trial number. The trial with the published
    hyperparameters is drawn thick with a star at its last stage."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    name = _one_study(trials)
    fig = Figure(figsize=(8.5, 4.8))
    ax = fig.add_subplot()
    cols = stage_columns(trials)
    rows = []
    for _, row in trials.sort_values("number").iterrows():
        vals = row[cols].astype(float) if cols else pd.Series(dtype=float)
        ok = vals.notna().to_numpy()
        if ok.any():
            rows.append((row, vals, ok))
    few = len(rows) <= MAX_LEGEND_TRIALS
    numbers = [int(r["number"]) for r, _, _ in rows]
    norm = Normalize(min(numbers, default=0), max(max(numbers, default=1), 1))
    cmap = colormaps[("tab10" if len(rows) <= 10 else "tab20") if few else "viridis"]
    counts: dict[str, int] = {}
    for k, (row, vals, ok) in enumerate(rows):
        steps = np.array([int(c[len("stage"):-len("_cert")]) for c in cols])[ok]
        ys = _pct(vals.to_numpy()[ok])
        style = dict(STATE_STYLES.get(row["state"], STATE_STYLES["RUNNING"]))
        style.pop("color")
        color = cmap(k % cmap.N) if few else cmap(norm(int(row["number"])))
        published = bool(row.get("published", False))
        # Pruned (and failed) trials on top: they are short and would hide under complete ones.
        z = 3 if row["state"] == "COMPLETE" else 4
        label = f"#{row['number']} {row['state'].lower()}" + (" (published)" if published
                                                              else "")
        ax.plot(steps, ys, linewidth=3.0 if published else 1.4, markersize=6, zorder=z,
                color=color, gid=f"trial {row['number']}", label=label, **style)
        if published:
            ax.scatter(steps[-1:], ys[-1:], marker="*", s=280, color=color, edgecolor="black",
                       linewidth=1.2, zorder=6, label="published hyperparameters")
            ax.annotate(f"published (#{row['number']})", (steps[-1], ys[-1]),
                        textcoords="offset points", xytext=(-12, -14), ha="right", fontsize=8)
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    summary = ", ".join(f"{s.lower()} ({n})" for s, n in counts.items())
    if not rows:
        _note(ax, "no trial reported an intermediate value")
    elif few:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  title=f"trials: {summary}", title_fontsize=8)
    else:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="trial number")
        handles = [Line2D([], [], color="#555555", **{k: v for k, v in STATE_STYLES.get(
            s, STATE_STYLES["RUNNING"]).items() if k != "color"}, label=f"{s.lower()} ({n})")
            for s, n in counts.items()]
        ax.legend(handles=handles, loc="best", fontsize=8, title="line style: state",
                  title_fontsize=8)
    if cols:
        ax.set_xticks(sorted(int(c[len("stage"):-len("_cert")]) for c in cols))
    ax.set_xlabel("COLT stage (end of stage)")
    ax.set_ylabel("validation certified accuracy (%)")
    ax.set_title(title or f"Per-stage validation certified accuracy{': ' + name if name else ''}")
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Launch figures


def _as_mapping(results: pd.DataFrame | Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    if isinstance(results, pd.DataFrame):
        return {"launch": results}
    return dict(results)


def certification_outcomes(results: pd.DataFrame | Mapping[str, pd.DataFrame],
                           path: str | Path | None = None, title: str | None = None) -> Figure:
    """Stacked bars of test inputs per certification status, one bar per launch.

    ``results`` maps a launch label to its per-input DataFrame (:func:`analysis.load_results`).
    ``ax.containers`` holds one bar container per status (``get_label()`` = status) whose bar
    heights are the counts.
    """
    from analysis.data import status_counts

    runs = _as_mapping(results)
    counts = {label: status_counts(df) for label, df in runs.items()}
    statuses = list(STATUSES) + sorted({s for c in counts.values() for s in c} - set(STATUSES))
    labels = list(counts)
    fig = Figure(figsize=(max(4.5, 1.6 * len(labels) + 3), 4.8))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for status in statuses:
        heights = np.array([counts[lbl].get(status, 0) for lbl in labels], dtype=float)
        bars = ax.bar(x, heights, 0.6, bottom=bottom, label=status,
                      color=STATUS_COLORS.get(status, "#bcbd22"), edgecolor="white")
        for rect, h in zip(bars, heights):
            if h > 0:
                ax.text(rect.get_x() + rect.get_width() / 2, rect.get_y() + h / 2, f"{int(h)}",
                        ha="center", va="center", fontsize=8, color="white")
        bottom += heights
    for xi, lbl in zip(x, labels):
        total = sum(counts[lbl].values())
        cert = counts[lbl].get("certified", 0)
        share = f"{100 * cert / total:.1f}% certified" if total else "no inputs"
        ax.text(xi, bottom[xi] * 1.01, f"n={total}\n{share}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, max(1.0, float(bottom.max()) * 1.18))
    ax.set_ylabel("test inputs (count)")
    ax.set_xlabel("launch")
    ax.set_title(title or "Certification outcome of the test inputs")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="status",
              title_fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def method_order(methods: Iterable[str]) -> list[str]:
    """Cascade order: known stages first, unknown names after them alphabetically."""
    methods = {str(m) for m in methods}
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(methods - set(known))


def time_per_input(results: pd.DataFrame, path: str | Path | None = None,
                   title: str | None = None, seed: int = 0) -> Figure:
    """Certification time per input by the cascade stage that decided it (log-scale box plot
    with every input as a jittered point; times below 0.1 ms are drawn at 0.1 ms)."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    df = results[["method", "time_s"]].copy()
    df["method"] = df["method"].fillna("unknown").astype(str)
    df = df[pd.to_numeric(df["time_s"], errors="coerce").notna()]
    methods = method_order(df["method"].unique())
    if not methods:
        _note(ax, "no per-input times in the results")
    else:
        data = [df.loc[df["method"] == m, "time_s"].astype(float).clip(lower=TIME_FLOOR_S)
                .to_numpy() for m in methods]
        positions = np.arange(1, len(methods) + 1)
        ax.boxplot(data, positions=positions, widths=0.55, showfliers=False,
                   tick_labels=methods, medianprops=dict(color="black"))
        rng = np.random.default_rng(seed)
        for pos, method, values in zip(positions, methods, data):
            jitter = rng.uniform(-0.18, 0.18, size=len(values))
            ax.scatter(pos + jitter, values, s=10, alpha=0.5, zorder=3,
                       label=f"{method} (n={len(values)})")
        ax.set_yscale("log")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                  title="deciding stage", title_fontsize=8)
    ax.tick_params(axis="x", labelrotation=25)
    ax.set_xlabel("cascade stage that decided the input")
    ax.set_ylabel("time per input (s, log scale)")
    ax.set_title(title or "Certification time per test input")
    ax.grid(alpha=0.3, axis="y", which="major")
    return _save(fig, path)
