"""The analysis report: CSV tables, PNG figures and ``report.md`` for one or several databases.

    python -m analysis --storage sqlite:///runs/optuna.db --out runs/report
    python -m analysis --storage sqlite:///a.db --storage postgresql://u@host/db \
        --study mnist_0.1 --out runs/compare

All inputs are checked before anything is written; the files are produced in a temporary folder
and moved into ``--out`` at the end, ``report.md`` last (atomically), so a failed run leaves no
half-written report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from analysis import figures
from analysis.data import (
    VAL_NAT,
    VAL_PGD,
    AnalysisError,
    EmptyStudyError,
    StudyNotFoundError,
    describe_storage,
    load_launches,
    load_results,
    load_studies,
    load_trials,
    open_storage,
    param_columns,
    param_importances,
    status_counts,
    study_names,
)

FIGURE_TEXT = {
    "history": "validation certified accuracy of every trial by trial number, with the running "
               "best (black steps) and the published COLT certified accuracy (dashed)",
    "knobs": "each tuned knob against validation certified accuracy (pruned trials at their last "
             "reported stage; log x for knobs sampled on a log scale)",
    "importance": "fANOVA importance (seed 0) of each knob for the validation certified accuracy "
                  f"(drawn from {figures.MIN_IMPORTANCE_TRIALS} complete trials on)",
    "pareto": "natural vs certified accuracy in two panels with the same axes: the trials on the "
              "validation split with their Pareto front (launched trials ringed), and the "
              "published COLT point and the launches on the test set",
    "stages": "validation certified accuracy at the end of every COLT stage, one line and colour "
              "per trial (dashed: pruned), the published hyperparameters thick with a star",
    "outcomes": "certification status of the test inputs of each launch (stacked counts)",
    "time": "time per test input by the cascade stage that decided it (log scale)",
    "comparison": "natural vs certified accuracy of all compared studies, one colour per study",
    "fidelity": "trial validation vs launch test certified accuracy, Spearman ρ (analysis.fidelity)",
    "noise": "validation certified accuracy of each complete trial with its 95% Wilson interval, "
             "and the published point's seed band",
}


@dataclass
class StudyData:
    group: str                 # label used in figures and tables
    source: str                # redacted storage URL
    storage_path: Path | None  # the SQLite file, to resolve relative result paths
    name: str
    info: dict[str, Any]
    trials: pd.DataFrame
    launches: pd.DataFrame
    importances: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))
    importance_note: str | None = None
    results: dict[str, pd.DataFrame] = field(default_factory=dict)
    missing_results: list[str] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, kind)
    db_label: str = ""         # "db1", "db2", ... when several storages are compared


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "study"


def _sqlite_path(storage: str) -> Path | None:
    if not storage.startswith("sqlite:"):
        return None
    import sqlalchemy.engine

    database = sqlalchemy.engine.make_url(storage).database
    return Path(database).resolve() if database else None


# --------------------------------------------------------------------------------------------
# Gathering (all checks happen here, before anything is written)


def gather(storages: list[str], studies: list[str] | None) -> list[StudyData]:
    """Open every storage and load the selected studies; bad input raises AnalysisError."""
    if not storages:
        raise AnalysisError("give at least one --storage URL")
    several = len(storages) > 1
    out: list[StudyData] = []
    for i, url in enumerate(storages):
        st = open_storage(url)
        names = study_names(st)
        source = describe_storage(url)
        if studies:
            missing = [s for s in studies if s not in names]
            if missing:
                available = ", ".join(repr(n) for n in names) if names else "none"
                raise StudyNotFoundError(f"no study named {missing[0]!r} in storage {source!r}; "
                                         f"available studies: {available}")
            selected = list(dict.fromkeys(studies))
        else:
            selected = names
        if not selected:
            raise EmptyStudyError(f"storage {source!r} holds no study")
        info = load_studies(st).set_index("study")
        empty = [n for n in selected if int(info.loc[n, "n_trials"]) == 0]
        if studies and empty:
            raise EmptyStudyError(f"study {empty[0]!r} in storage {source!r} has no trials")
        selected = [n for n in selected if n not in empty]
        if not selected:
            raise EmptyStudyError(f"storage {source!r}: no study has trials (studies: "
                                  f"{', '.join(repr(n) for n in names)})")
        for name in selected:
            trials = load_trials(st, name)
            launches = load_launches(st, name)
            group = f"db{i + 1}/{name}" if several else name
            data = StudyData(group=group, source=source,
                             storage_path=_sqlite_path(url) if isinstance(url, str) else None,
                             name=name, info=info.loc[name].to_dict(), trials=trials,
                             launches=launches, db_label=f"db{i + 1}" if several else "")
            study = optuna.load_study(study_name=name, storage=st)
            data.importances, data.importance_note = param_importances(study)
            _load_launch_results(data)
            out.append(data)
    return out


def resolve_results(path: str, storage_path: Path | None) -> Path | None:
    """A launch's results file: as recorded, else relative to the database's folder or its
    parent (launches record paths relative to the repository they ran in)."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p]
    if not p.is_absolute() and storage_path is not None:
        candidates += [storage_path.parent / p, storage_path.parent.parent / p]
    return next((c for c in candidates if c.is_file()), None)


def launch_label(row: Any, launches: pd.DataFrame) -> str:
    """"trial N", or "trial N seed S" where the trial was launched with several seeds."""
    label = f"trial {row['trial']}"
    seed = row.get("seed")
    if "seed" not in launches or seed is None or (isinstance(seed, float) and math.isnan(seed)):
        return label
    if int((launches["trial"] == row["trial"]).sum()) > 1:
        return f"{label} seed {int(seed)}"
    return label


def _load_launch_results(data: StudyData) -> None:
    for _, row in data.launches.iterrows():
        label = launch_label(row, data.launches)
        path = row.get("results")
        if not isinstance(path, str) or not path:
            data.missing_results.append(f"{label}: no results file recorded")
            continue
        found = resolve_results(path, data.storage_path)
        if found is None:
            data.missing_results.append(f"{label}: results file `{path}` not found")
            continue
        try:
            data.results[label] = load_results(found)
        except AnalysisError as err:
            data.missing_results.append(f"{label}: {err}")


# --------------------------------------------------------------------------------------------
# Figures


def draw_figures(data: StudyData, folder: Path) -> None:
    base = slug(data.group)
    published = {"nat_acc": data.info.get("published_nat_acc"),
                 "cert_acc": data.info.get("published_cert_acc")}

    def add(kind: str, fig_fn: Any, *args: Any, suffix: str = "", **kwargs: Any) -> None:
        name = f"{base}_{kind}{suffix}.png"
        fig_fn(*args, path=folder / name, **kwargs)
        data.figures.append((name, kind))

    t = data.trials
    n_complete = int((t["state"] == "COMPLETE").sum())
    if len(data.importances) and n_complete < figures.MIN_IMPORTANCE_TRIALS:
        data.importance_note = (f"not drawn: it would rest on {n_complete} complete trials; "
                                f"it needs at least {figures.MIN_IMPORTANCE_TRIALS}")
    add("history", figures.optimization_history, t, published=published,
        title=f"Optimisation history: {data.group}")
    add("knobs", figures.knob_scatter, t, title=f"Tuned knobs vs validation certified accuracy: "
                                                f"{data.group}")
    add("importance", figures.importance_bars, data.importances, note=data.importance_note,
        n_complete=n_complete,
        title=f"Hyperparameter importance: {data.group}")
    add("pareto", figures.pareto_front, t, launches=data.launches, published=published,
        title=f"Natural vs certified accuracy: {data.group}")
    add("stages", figures.stage_curves, t, title=f"Per-stage validation certified accuracy: "
                                                 f"{data.group}")
    if data.results:
        add("outcomes", figures.certification_outcomes, data.results,
            title=f"Certification outcome of the test inputs: {data.group}")
        for label, results in data.results.items():
            add("time", figures.time_per_input, results, suffix=f"_{slug(label)}",
                title=f"Time per test input, launch of {label}: {data.group}")
    from analysis import fidelity

    data.figures += fidelity.draw(t, data.launches, folder, base)


def draw_comparison(all_data: list[StudyData], folder: Path) -> str:
    trials = pd.concat([d.trials.assign(group=d.group) for d in all_data], ignore_index=True)
    launches = [d.launches.assign(group=d.group) for d in all_data if len(d.launches)]
    published = pd.DataFrame([{"group": d.group,
                               "published_nat_acc": d.info.get("published_nat_acc"),
                               "published_cert_acc": d.info.get("published_cert_acc")}
                              for d in all_data])
    name = "comparison_pareto.png"
    figures.pareto_front(trials, launches=pd.concat(launches, ignore_index=True)
                         if launches else None, published=published, by="group",
                         path=folder / name, title="Natural vs certified accuracy: comparison")
    return name


# --------------------------------------------------------------------------------------------
# Markdown


def _pct(x: Any, digits: int = 1) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(v):
        return "–"
    return f"{100 * v:.{digits}f}"


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def best_trial(trials: pd.DataFrame) -> tuple[pd.Series | None, str | None]:
    """Highest validation certified accuracy (ties: natural) among complete trials that meet the
    study's natural-accuracy floor (user attr ``constraint`` <= 0), else among all complete."""
    done = trials[trials["state"] == "COMPLETE"]
    score = figures.cert_score(done)
    done = done.assign(_cert=score, _nat=done[VAL_NAT] if VAL_NAT in done.columns else math.nan)
    done = done[done["_cert"].notna()]
    if not len(done):
        return None, "no complete trial has a validation certified accuracy"
    note = None
    if "constraint" in done.columns and done["constraint"].notna().any():
        feasible = done[done["constraint"].astype(float) <= 0]
        floor = (done["constraint"].astype(float) + done["_nat"].astype(float)).dropna()
        floor_txt = f" ({_pct(floor.iloc[0])}%)" if len(floor) else ""
        if len(feasible):
            done = feasible
            note = f"among trials meeting the natural-accuracy floor{floor_txt}"
        else:
            note = (f"no complete trial meets the study's natural-accuracy floor{floor_txt}; "
                    "best of all complete trials shown")
    best = done.sort_values(["_cert", "_nat", "number"], ascending=[False, False, True]).iloc[0]
    return best, note


def study_section(data: StudyData) -> list[str]:
    t = data.trials
    info = data.info
    lines = [f"## Study `{data.name}`" + (f" ({data.db_label})" if data.db_label else ""), ""]
    lines.append(f"- storage: `{data.source}`")
    lines.append(f"- study file: `{_fmt(info.get('study_file'))}`; objective: "
                 f"{_fmt(info.get('objective'))} ({_fmt(info.get('directions'))})")
    if isinstance(info.get("artifact_dir"), str):
        lines.append(f"- checkpoint artifacts: `{info['artifact_dir']}`")
    lines.append("")
    counts = t["state"].value_counts()
    lines.append(f"**Trials: {len(t)}** ("
                 + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()) + ")")
    lines.append("")
    lines += _table(["state", "trials"], [[s.lower(), int(n)] for s, n in counts.items()])
    lines.append("")
    if "score_share" in t.columns and t["score_share"].notna().any():
        timed = t[t["score_share"].notna()]
        share = timed["score_share"].astype(float)
        lines.append(f"Validation scoring took {_pct(share.median())}% of a trial's training and "
                     f"scoring time (median over {len(timed)} trial{'s' if len(timed) != 1 else ''}, range "
                     f"{_pct(share.min())}-{_pct(share.max())}%; complete trials: "
                     + (f"{_pct(timed.loc[timed['state'] == 'COMPLETE', 'score_share'].median())}%"
                        if (timed["state"] == "COMPLETE").any() else "none") + ").")
        lines.append("")

    lines.append("### Best trial")
    lines.append("")
    best, note = best_trial(t)
    params = param_columns(t)
    if best is None and not (t["state"] == "COMPLETE").any():
        states = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
        lines.append(f"**No trial of this study has completed yet** ({states}): there is no "
                     "validation score to rank, so no best trial, and the figures below are "
                     "empty. A first Ctrl-C or a missing data set leaves a study like this; "
                     "the failure reasons are listed below.")
    elif best is None:
        lines.append(f"No best trial: {note}.")
    else:
        pub = " (the published hyperparameters)" if bool(best.get("published")) else ""
        lines.append(f"Best trial: **#{int(best['number'])}**{pub}: validation certified "
                     f"accuracy {_pct(best['_cert'])}%, natural {_pct(best.get(VAL_NAT))}%, "
                     f"PGD {_pct(best.get(VAL_PGD))}%" + (f" ({note})." if note else "."))
        lines.append("")
        lines.append("Parameters: " + ", ".join(f"`{p}` = {_fmt(best.get(p))}" for p in params))
    if "values_1" in t.columns:
        done = t[t["state"] == "COMPLETE"]
        mask = figures.pareto_mask(done.get(VAL_NAT, done["values_0"]), figures.cert_score(done))
        lines.append("")
        lines.append("Pareto-optimal trials (validation natural vs certified): "
                     + ", ".join(f"#{n}" for n in done["number"][mask]))
    lines.append("")
    done = t[t["state"] == "COMPLETE"]
    # Scored on the complete trials only: assigning a Series to an empty frame would adopt the
    # Series' index and bring back every (failed) trial as a row of NaNs.
    done = done.assign(_cert=figures.cert_score(done))
    top = done.sort_values(["_cert", "number"], ascending=[False, True]).head(10)
    if len(top):
        lines.append("Complete trials, best first (accuracies on the validation split, %):")
        lines.append("")
        header = ["#", "val nat", "val PGD", "val cert"] + params + ["time (s)", "note"]
        rows = []
        for _, r in top.iterrows():
            flags = []
            if bool(r.get("published")):
                flags.append("published")
            if "constraint" in r and not pd.isna(r["constraint"]) and float(r["constraint"]) > 0:
                flags.append("below nat. floor")
            rows.append([f"{int(r['number'])}", _pct(r.get(VAL_NAT)), _pct(r.get(VAL_PGD)),
                         _pct(r["_cert"])] + [r.get(p) for p in params]
                        + [f"{r['duration_s']:.1f}" if not pd.isna(r["duration_s"]) else "–",
                           ", ".join(flags)])
        lines += _table(header, rows)
        lines.append("")
    failed = t[t["fail_reason"].notna()] if "fail_reason" in t.columns else t.iloc[:0]
    if len(failed):
        lines.append("Trials with a failure reason:")
        lines.append("")
        for _, r in failed.iterrows():
            lines.append(f"- #{int(r['number'])} ({r['state'].lower()}): {_fmt(r['fail_reason'])}")
        lines.append("")

    lines.append("### Published COLT result")
    lines.append("")
    pn, pc = info.get("published_nat_acc"), info.get("published_cert_acc")
    if pc is None or pd.isna(pc):
        lines.append("No published result recorded for this setting.")
    else:
        pn_f = figures._as_fraction(pn)
        pc_f = figures._as_fraction(pc)
        line = f"Paper (test set): natural {_pct(pn_f)}%, certified {_pct(pc_f)}%."
        if best is not None:
            gap = 100 * (float(best["_cert"]) - pc_f)
            line += (f" Best trial (validation, short tuning budget): certified "
                     f"{_pct(best['_cert'])}% ({gap:+.1f} points).")
        lines.append(line)
    lines.append("")

    lines.append("### Launches")
    lines.append("")
    if not len(data.launches):
        lines.append("No launch recorded (`python -m pipeline.tune --launch-best` records one).")
    else:
        header = ["trial", "seed", "epochs/stage", "val nat %", "val cert %", "test nat %",
                  "test PGD %", "test cert %", "n test", "certified", "falsified", "unknown",
                  "misclassified", "results"]
        rows = []
        for _, r in data.launches.iterrows():
            label = launch_label(r, data.launches)
            c = status_counts(data.results[label]) if label in data.results else {}
            rows.append([_fmt(r["trial"]), _fmt(r.get("seed")), _fmt(r.get("epochs_per_stage")),
                         _pct(r.get("val_nat_acc")), _pct(r.get("val_cert_acc")),
                         _pct(r.get("test_nat_acc")), _pct(r.get("test_pgd_acc")),
                         _pct(r.get("test_cert_acc")), _fmt(r.get("n_test"))]
                        + [str(c[s]) if c else "–" for s in
                           ("certified", "falsified", "unknown", "misclassified")]
                        + [f"`{r.get('results')}`"])
        lines += _table(header, rows)
        for msg in data.missing_results:
            lines.append("")
            lines.append(f"Note: {msg}.")
    lines.append("")

    from analysis import fidelity

    lines += fidelity.section(t, data.launches, info)
    lines.append("### Figures")
    lines.append("")
    for name, kind in data.figures:
        lines.append(f"- [{name}]({name}): {FIGURE_TEXT[kind]}.")
    if data.importance_note:
        lines.append(f"  (Importance: {data.importance_note}.)")
    lines.append("")
    return lines


def comparison_section(all_data: list[StudyData], figure: str) -> list[str]:
    lines = ["## Comparison", ""]
    header = ["study", "storage", "objective", "trials", "complete", "pruned", "best trial",
              "best val cert %", "its val nat %", "published cert %", "best launch test cert %"]
    rows = []
    for d in all_data:
        best, _ = best_trial(d.trials)
        states = d.trials["state"]
        test = (d.launches["test_cert_acc"].astype(float).max() if len(d.launches) else math.nan)
        rows.append([d.group, f"`{d.source}`", _fmt(d.info.get("objective")), len(d.trials),
                     int((states == "COMPLETE").sum()), int((states == "PRUNED").sum()),
                     "–" if best is None else f"#{int(best['number'])}",
                     "–" if best is None else _pct(best["_cert"]),
                     "–" if best is None else _pct(best.get(VAL_NAT)),
                     _pct(figures._as_fraction(d.info.get("published_cert_acc"))), _pct(test)])
    lines += _table(header, rows)
    lines += ["", f"- [{figure}]({figure}): {FIGURE_TEXT['comparison']}.", ""]
    return lines


def render(all_data: list[StudyData], comparison_figure: str | None,
           notes: list[str]) -> str:
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = ["# COLT tuning report", "",
             f"Generated {now} from " + ", ".join(f"`{s}`" for s in
                                                  dict.fromkeys(d.source for d in all_data))
             + ". Accuracies in %; trial scores are on the validation split, launches and the "
               "published results on the test set.", "",
             "Tables: [trials.csv](trials.csv)"
             + (", [launches.csv](launches.csv)" if any(len(d.launches) for d in all_data)
                else "") + ".", ""]
    if comparison_figure:
        lines += comparison_section(all_data, comparison_figure)
    for d in all_data:
        lines += study_section(d)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Writing


def _frame_for_csv(all_data: list[StudyData], attr: str) -> pd.DataFrame:
    several = len({d.source for d in all_data}) > 1
    frames = []
    for d in all_data:
        frame = getattr(d, attr)
        if not len(frame):
            continue
        frame = frame.copy()
        if several:
            frame.insert(0, "storage", d.source)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_report(storages: list[str], out: str | Path, studies: list[str] | None = None) -> Path:
    """Check the inputs, then write CSVs, figures and report.md into ``out``; returns its path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {str(out)!r} exists and is not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        all_data = gather(storages, studies)
        tmp_parent = out.parent if out.parent.is_dir() else None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=tmp_parent))
        except OSError as err:
            raise AnalysisError(f"cannot write next to --out {str(out)!r}: {err}") from None
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stick to --out after the rename
        try:
            _frame_for_csv(all_data, "trials").to_csv(tmp / "trials.csv", index=False)
            launches = _frame_for_csv(all_data, "launches")
            if len(launches):
                launches.to_csv(tmp / "launches.csv", index=False)
            for d in all_data:
                draw_figures(d, tmp)
            comparison = draw_comparison(all_data, tmp) if len(all_data) > 1 else None
            here = str(Path(__file__).parent)
            notes = sorted({str(w.message) for w in caught
                            if str(w.filename or "").startswith(here)})
            (tmp / "report.md").write_text(render(all_data, comparison, notes), encoding="utf-8")
            try:
                _publish(tmp, out)
            except OSError as err:
                raise AnalysisError(f"cannot write the report into {str(out)!r}: {err}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "report.md"


def _publish(tmp: Path, out: Path) -> None:
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, out)  # same file system: one atomic rename of the whole folder
            return
        except OSError:
            out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in tmp.iterdir() if p.name != "report.md")
    for p in files:
        shutil.move(str(p), str(out / p.name))
    staged = out / ".report.md.tmp"
    shutil.move(str(tmp / "report.md"), str(staged))
    os.replace(staged, out / "report.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Tables, figures and a Markdown report of COLT tuning studies.")
    parser.add_argument("--storage", action="append", required=True, metavar="URL",
                        help="SQLAlchemy URL of a study database (sqlite:///path, "
                             "postgresql://...); repeat to compare several")
    parser.add_argument("--study", action="append", metavar="NAME",
                        help="only this study (repeatable); default: every study with trials")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        report = write_report(args.storage, args.out, args.study)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0


__all__ = ["best_trial", "gather", "main", "render", "write_report"]
