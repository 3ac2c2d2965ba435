"""Tests of the analysis package on a real tiny study database written by ``pipeline.tune``.

The session fixture runs the actual tuning pipeline once (quickstart study, 3 trials, one epoch
per stage, 50 validation inputs); a test-local copy of the database gets two launch entries and
their results JSONL files so the launch tables and figures are exercised too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

import analysis
from analysis import (
    AnalysisError,
    StorageError,
    StudyNotFoundError,
    load_launches,
    load_results,
    load_trials,
    param_importances,
)
from analysis import figures
from analysis.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]
# A hang guard (pytest-timeout charges the session fixture's tuning run to the first test).
pytestmark = pytest.mark.timeout(3600)
STUDY = "quickstart"
PUBLISHED = {"nat_acc": 0.95, "cert_acc": 0.80}
PIPELINE_ARGS = [
    "--n-trials", "3",
    "--set", "study.n_trials=3",
    "--set", "trial.epochs_per_stage=1",
    "--set", "certify_val.n_inputs=50",
    # Faster still (the test budget is a minute on a shared 2-core machine):
    "--set", "trial.mix_epochs=0",
    "--set", "trial.attack_steps=2",
    "--set", "trial.n_rand_proj=10",
    "--set", "certify_val.pgd_steps=5",
    "--set", "certify_val.slope_iters=5",
    # The quickstart has no paper result: give it one so the published point is recorded.
    "--set", f"study.published_nat_acc={PUBLISHED['nat_acc']}",
    "--set", f"study.published_cert_acc={PUBLISHED['cert_acc']}",
]
STATUS_ROWS = [  # (status, method, time_s) of the synthetic launch results
    ("certified", "zonotope", 0.012), ("certified", "zonotope", 0.015),
    ("certified", "zonotope_slopes", 0.21), ("certified", "lp", 1.3), ("certified", "milp", 4.2),
    ("falsified", "pgd", 0.05), ("falsified", "pgd", 0.04), ("falsified", "milp", 3.1),
    ("unknown", "timeout", 20.0), ("misclassified", "clean", 0.0005),
    ("misclassified", "clean", 0.0007), ("certified", "zonotope", 0.011),
]


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tuned_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study database written by the real tuning pipeline (read-only for the tests)."""
    work = tmp_path_factory.mktemp("analysis_tune")
    db = work / "optuna.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pipeline.tune", "--study", str(ROOT / "studies/quickstart.toml"),
           "--storage", url_of(db), "--runs-dir", str(work / "runs"), "--device", "cpu",
           *PIPELINE_ARGS]
    # The timeout is a hang guard, far above the minute this takes on a quiet machine.
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"pipeline.tune failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return db


def write_results(path: Path, rows: list[tuple[str, str, float]], torn: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, (status, method, t) in enumerate(rows):
            rec = {"index": i, "label": i % 10, "predicted": i % 10 if status != "misclassified"
                   else (i + 1) % 10, "status": status, "method": method, "time_s": t}
            if status == "falsified":
                rec["counterexample"] = [0.1, 0.2]
            f.write(json.dumps(rec) + "\n")
        if torn:
            f.write('{"index": 99, "label": 3, "stat')


@pytest.fixture(scope="session")
def launched_db(tuned_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the tuned database with two launches (results JSONL files next to it)."""
    work = tmp_path_factory.mktemp("analysis_launch")
    db = work / "optuna.db"
    shutil.copy(tuned_db, db)
    study = optuna.load_study(study_name=STUDY, storage=url_of(db))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete, "the pipeline run produced no complete trial"
    launched = complete[:2]
    entries, results = [], {}
    for k, trial in enumerate(launched):
        rows = STATUS_ROWS if k == 0 else STATUS_ROWS[:7]
        rel = Path("runs") / STUDY / f"launch_trial{trial.number}" / "certify_test.jsonl"
        # The first launch records a path relative to the database's folder (as a launch run
        # from the repository root would), the second an absolute one.
        write_results(work / rel, rows, torn=(k == 0))
        n = len(rows)
        statuses = [r[0] for r in rows]
        entries.append({
            "trial": trial.number,
            "val_nat_acc": trial.user_attrs["val_nat_acc"],
            "val_cert_acc": trial.user_attrs["val_cert_acc"],
            "test_nat_acc": 1 - statuses.count("misclassified") / n,
            "test_pgd_acc": 1 - (statuses.count("misclassified")
                                 + statuses.count("falsified")) / n,
            "test_cert_acc": statuses.count("certified") / n,
            "n_test": n,
            "results": str(rel) if k == 0 else str(work / rel),
            "checkpoint": str(work / rel.parent / "last.pt"),
            "epochs_per_stage": 6,
            "params": trial.params,
        })
        results[f"trial {trial.number}"] = rows
    study.set_user_attr("launches", entries)
    return {"db": db, "entries": entries, "results": results, "work": work}


@pytest.fixture(scope="session")
def trials_df(tuned_db: Path) -> pd.DataFrame:
    return load_trials(url_of(tuned_db), STUDY)


@pytest.fixture(scope="session")
def study(tuned_db: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=url_of(tuned_db))


def labelled(ax, label: str, kind: str = "collections"):
    found = [a for a in getattr(ax, kind) if a.get_label() == label]
    assert len(found) == 1, f"{label!r} in {[a.get_label() for a in getattr(ax, kind)]}"
    return found[0]


# --------------------------------------------------------------------------------------------
# Loading


def test_load_trials_matches_optuna(trials_df: pd.DataFrame, study: optuna.Study,
                                    tuned_db: Path) -> None:
    df = trials_df
    trials = study.trials
    assert len(trials) == 3
    assert list(df["study"]) == [STUDY] * 3
    assert list(df["number"]) == [t.number for t in trials]
    assert list(df["state"]) == [t.state.name for t in trials]
    for col in ("value", "datetime_start", "datetime_complete", "duration_s", "published",
                "fail_reason", "val_nat_acc", "val_pgd_acc", "val_cert_acc", "stage0_cert"):
        assert col in df.columns, col
    assert not any(c.startswith("params_") for c in df.columns)
    assert df.attrs["params"] == list(trials[0].params)
    assert set(df.attrs["log_params"]) == {"l1_reg", "relu_stable"}
    for t, (_, row) in zip(trials, df.iterrows()):
        for name, value in t.params.items():
            assert row[name] == value
        assert row["value"] == pytest.approx(t.value) if t.value is not None else \
            math.isnan(row["value"])
        for key in ("val_nat_acc", "val_pgd_acc", "val_cert_acc", "run_dir", "split_hash",
                    "split_seed", "n_valid", "constraint"):
            if key in t.user_attrs:
                assert row[key] == t.user_attrs[key], key
            else:
                assert pd.isna(row[key]), key
        assert row["env.device"] == t.user_attrs["env"]["device"]
        assert row["env.versions.optuna"] == t.user_attrs["env"]["versions"]["optuna"]
        assert json.loads(row["stage_time_s"]) == pytest.approx(t.user_attrs["stage_time_s"])
        for k, seconds in enumerate(t.user_attrs["stage_time_s"]):
            assert row[f"stage{k}_time_s"] == pytest.approx(seconds)
        for k, v in t.user_attrs["stage0_val"].items():
            assert row[f"stage0_val.{k}"] == pytest.approx(v)
        stage_cols = analysis.stage_columns(df)
        got = {int(c[5:-5]): row[c] for c in stage_cols if not pd.isna(row[c])}
        assert got == pytest.approx(t.intermediate_values)
        assert row["published"] == bool(t.user_attrs.get("published", False))
        assert row["fail_reason"] == t.user_attrs.get("fail_reason") or (
            row["fail_reason"] is None and "fail_reason" not in t.user_attrs)
        assert row["datetime_start"] == pd.Timestamp(t.datetime_start)
        assert row["duration_s"] == pytest.approx(
            (t.datetime_complete - t.datetime_start).total_seconds())
    assert df["published"].sum() == 1 and bool(df.loc[0, "published"])
    # All studies when no name is given, and an optuna storage object works too.
    every = load_trials(url_of(tuned_db))
    pd.testing.assert_frame_equal(every, df)
    storage = optuna.storages.RDBStorage(url_of(tuned_db))
    assert list(load_trials(storage, STUDY)["number"]) == [0, 1, 2]
    studies = analysis.load_studies(url_of(tuned_db))
    assert studies.loc[0, "published_nat_acc"] == PUBLISHED["nat_acc"]
    assert studies.loc[0, "published_cert_acc"] == PUBLISHED["cert_acc"]


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "optuna.db"
    with pytest.raises(StorageError, match="does not exist"):
        load_trials(url_of(missing))
    assert not missing.exists() and not missing.parent.exists()


def test_bad_storages(tmp_path: Path) -> None:
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("create table x (a)").connection.commit()
    with pytest.raises(StorageError, match="not an Optuna"):
        load_trials(url_of(plain))
    assert [r[0] for r in sqlite3.connect(plain).execute(
        "select name from sqlite_master")] == ["x"]  # nothing was created in it
    with pytest.raises(StorageError, match="not an SQLAlchemy URL"):
        load_trials("not a url")
    with pytest.raises(StorageError, match="cannot be used"):
        load_trials("postgresql://user:secret@127.0.0.1:1/db")
    try:
        load_trials("postgresql://user:secret@127.0.0.1:1/db")
    except StorageError as err:
        assert "secret" not in str(err)


def test_unknown_study_lists_available(tuned_db: Path) -> None:
    with pytest.raises(StudyNotFoundError, match="available studies: 'quickstart'"):
        load_trials(url_of(tuned_db), "mnist_0.1")


def test_load_launches(launched_db: dict) -> None:
    df = load_launches(url_of(launched_db["db"]))
    entries = launched_db["entries"]
    assert list(df["trial"]) == [e["trial"] for e in entries]
    assert list(df["study"]) == [STUDY] * len(entries)
    for (_, row), e in zip(df.iterrows(), entries):
        for key in ("test_nat_acc", "test_pgd_acc", "test_cert_acc", "n_test", "results",
                    "epochs_per_stage", "val_cert_acc"):
            assert row[key] == e[key], key
        for name, value in e["params"].items():
            assert row[name] == value
    assert len(load_launches(url_of(launched_db["db"]), STUDY)) == 2


def test_load_results_and_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_results(path, STATUS_ROWS, torn=True)
    with pytest.warns(UserWarning, match="torn last line"):
        df = load_results(path)
    assert len(df) == len(STATUS_ROWS)
    assert list(df.columns[:6]) == ["index", "label", "predicted", "status", "method", "time_s"]
    assert list(df["status"]) == [r[0] for r in STATUS_ROWS]
    assert df["time_s"].tolist() == pytest.approx([r[2] for r in STATUS_ROWS])
    assert "counterexample" in df.columns
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{broken", lines[1]]) + "\n")
    with pytest.raises(AnalysisError, match=":2:"):
        load_results(path)
    with pytest.raises(AnalysisError, match="does not exist"):
        load_results(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    assert len(load_results(tmp_path / "empty.jsonl")) == 0


# --------------------------------------------------------------------------------------------
# Figures


def test_history_figure(trials_df: pd.DataFrame, tmp_path: Path) -> None:
    png = tmp_path / "history.png"
    fig = figures.optimization_history(trials_df, published=PUBLISHED, path=png)
    assert png.stat().st_size > 10_000
    ax = fig.axes[0]
    done = trials_df[trials_df.state == "COMPLETE"]
    pts = labelled(ax, "complete").get_offsets()
    np.testing.assert_allclose(pts, np.c_[done.number, 100 * done.val_cert_acc])
    best = labelled(ax, "running best", "lines").get_xydata()
    np.testing.assert_allclose(best, np.c_[done.number, 100 * done.val_cert_acc.cummax()])
    pub = labelled(ax, "published COLT (test)", "lines").get_ydata()
    assert list(pub) == pytest.approx([80.0, 80.0])
    pruned = trials_df[trials_df.state == "PRUNED"]
    if len(pruned):
        last = pruned[analysis.stage_columns(pruned)].ffill(axis=1).iloc[:, -1]
        np.testing.assert_allclose(labelled(ax, "pruned (last stage)").get_offsets(),
                                   np.c_[pruned.number, 100 * last])
    assert ax.get_xlabel() == "trial number" and "(%)" in ax.get_ylabel() and ax.get_title()


def test_knob_figure(trials_df: pd.DataFrame, tmp_path: Path) -> None:
    png = tmp_path / "knobs.png"
    fig = figures.knob_scatter(trials_df, path=png)
    assert png.stat().st_size > 10_000
    params = trials_df.attrs["params"]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == params
    done = trials_df[trials_df.state == "COMPLETE"]
    for ax, p in zip(axes, params):
        np.testing.assert_allclose(labelled(ax, "complete").get_offsets(),
                                   np.c_[done[p].astype(float), 100 * done.val_cert_acc])
        assert ax.get_xscale() == ("log" if p in ("l1_reg", "relu_stable") else "linear")
        assert "(%)" in ax.get_ylabel()
    pub = labelled(axes[0], "published hyperparameters").get_offsets()
    row = trials_df[trials_df.published].iloc[0]
    np.testing.assert_allclose(pub, [[row[params[0]], 100 * row.val_cert_acc]])


def test_importance_figure_on_study(study: optuna.Study, tmp_path: Path) -> None:
    imp, note = param_importances(study)
    png = tmp_path / "importance.png"
    fig = figures.importance_bars(imp, note=note, path=png)
    assert png.stat().st_size > 5_000
    ax = fig.axes[0]
    if note is None:
        widths = {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches)}
        assert widths == pytest.approx(dict(imp))
    else:  # e.g. both complete trials certified the same share: no variance to explain
        assert len(ax.patches) == 0 and any(note in t.get_text() for t in ax.texts)


def test_importance_values_and_few_trials(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    synthetic = optuna.create_study(direction="maximize",
                                    sampler=optuna.samplers.RandomSampler(seed=1))
    synthetic.optimize(lambda t: t.suggest_float("l1_reg", 1e-7, 1e-3, log=True) * 0
                       + t.suggest_float("eps_initial_factor", 1.0, 1.6) ** 2
                       + 0.01 * t.suggest_float("relu_stable_factor", 1.0, 2.0), n_trials=12)
    imp, note = param_importances(synthetic)
    expected = optuna.importance.get_param_importances(
        synthetic, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
        target=lambda t: t.values[-1])
    assert note is None and dict(imp) == pytest.approx(expected)
    assert imp.index[0] == "eps_initial_factor"
    fig = figures.importance_bars(imp, path=tmp_path / "imp.png")
    ax = fig.axes[0]
    widths = {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches)}
    assert widths == pytest.approx(expected)
    one = optuna.create_study(direction="maximize")
    one.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    imp, note = param_importances(one)
    assert imp.empty and "at least 2 complete trials" in note
    fig = figures.importance_bars(imp, note=note, path=tmp_path / "imp1.png")
    assert (tmp_path / "imp1.png").exists()
    assert any("at least 2" in t.get_text() for t in fig.axes[0].texts)


def test_pareto_figure(launched_db: dict, tmp_path: Path) -> None:
    url = url_of(launched_db["db"])
    trials, launches = load_trials(url, STUDY), load_launches(url, STUDY)
    png = tmp_path / "pareto.png"
    fig = figures.pareto_front(trials, launches=launches, published=PUBLISHED, path=png)
    assert png.stat().st_size > 10_000
    ax = fig.axes[0]
    done = trials[trials.state == "COMPLETE"]
    pts = np.c_[100 * done.val_nat_acc, 100 * done.val_cert_acc]
    np.testing.assert_allclose(labelled(ax, "trials").get_offsets(), pts)
    front = labelled(ax, "Pareto front", "lines").get_xydata()
    for x, y in front:  # every front point is a trial and no trial dominates it
        assert any(np.allclose([x, y], p) for p in pts)
        assert not any((p[0] >= x and p[1] >= y) and (p[0] > x or p[1] > y) for p in pts)
    for p in pts:  # every non-dominated trial is on the front
        if not any((q[0] >= p[0] and q[1] >= p[1]) and (q[0] > p[0] or q[1] > p[1])
                   for q in pts):
            assert any(np.allclose(p, f) for f in front)
    # Validation and test are kept apart: test-set points only in the second panel.
    test_ax = fig.axes[1]
    assert "validation" in ax.get_title() and "test" in test_ax.get_title()
    assert not any("test" in lbl for lbl in ax.get_legend_handles_labels()[1])
    assert not any(lbl in ("trials", "Pareto front")
                   for lbl in test_ax.get_legend_handles_labels()[1])
    np.testing.assert_allclose(labelled(test_ax, "published COLT (test)").get_offsets(),
                               [[95, 80]])
    np.testing.assert_allclose(labelled(test_ax, "launch (test)").get_offsets(),
                               np.c_[100 * launches.test_nat_acc, 100 * launches.test_cert_acc])
    np.testing.assert_allclose(labelled(ax, "launched trials").get_offsets(),
                               np.c_[100 * launches.val_nat_acc, 100 * launches.val_cert_acc])
    assert ax.get_xlim() == test_ax.get_xlim() and ax.get_ylim() == test_ax.get_ylim()
    assert "(%)" in ax.get_xlabel() and "(%)" in ax.get_ylabel()


def test_pareto_mask() -> None:
    mask = figures.pareto_mask([0.1, 0.5, 0.4, 0.5, np.nan], [0.9, 0.5, 0.4, 0.5, 1.0])
    assert mask.tolist() == [True, True, False, True, False]


def test_stage_figure(trials_df: pd.DataFrame, study: optuna.Study, tmp_path: Path) -> None:
    png = tmp_path / "stages.png"
    fig = figures.stage_curves(trials_df, path=png)
    assert png.stat().st_size > 10_000
    ax = fig.axes[0]
    lines = {ln.get_gid(): ln for ln in ax.lines}
    for t in study.trials:
        line = lines[f"trial {t.number}"]
        steps = sorted(t.intermediate_values)
        np.testing.assert_allclose(line.get_xydata(),
                                   [[s, 100 * t.intermediate_values[s]] for s in steps])
        assert line.get_linestyle() == ("--" if t.state.name == "PRUNED" else "-")
    # Each trial is told apart: its own colour and its own legend entry.
    colours = [ln.get_color() for ln in lines.values()]
    assert len(set(colours)) == len(colours)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    for t in study.trials:
        assert any(text.startswith(f"#{t.number} {t.state.name.lower()}") for text in legend)
    title = ax.get_legend().get_title().get_text()
    for state, n in trials_df.state.value_counts().items():
        assert f"{state.lower()} ({n})" in title
    # The published point is marked on its own (a star at the published trial's last stage).
    pub = trials_df[trials_df.published.astype(bool)].iloc[0]
    star = labelled(ax, "published hyperparameters").get_offsets()
    steps = sorted(study.trials[int(pub.number)].intermediate_values.items())
    np.testing.assert_allclose(star, [[steps[-1][0], 100 * steps[-1][1]]])


def synthetic_trials(n: int, tmp_path: Path, relu_stable: tuple[float, float] = (2e-3, 9e-3)
                     ) -> pd.DataFrame:
    """A study of n trials with stage scores and a log-scale knob in a narrow range."""
    db = tmp_path / f"synthetic_{n}_{relu_stable[0]}_{relu_stable[1]}.db"
    lo, hi = relu_stable
    study = optuna.create_study(study_name="synthetic", storage=url_of(db),
                                direction="maximize")
    rng = np.random.default_rng(0)
    dists = {"relu_stable": optuna.distributions.FloatDistribution(lo, hi, log=True),
             "l1_reg": optuna.distributions.FloatDistribution(1e-7, 1e-3, log=True)}
    for i in range(n):
        vals = np.sort(rng.uniform(0.1, 0.6, size=3))
        study.add_trial(optuna.create_trial(
            params={"relu_stable": float(min(hi, lo * (hi / lo) ** (i / max(n - 1, 1)))),
                    "l1_reg": float(10 ** rng.uniform(-7, -3))}, distributions=dists,
            value=float(vals[-1]), intermediate_values=dict(enumerate(map(float, vals))),
            user_attrs={"val_cert_acc": float(vals[-1]), "published": i == 0}))
    return load_trials(url_of(db), "synthetic")


@pytest.mark.parametrize("span", [(3e-4, 5e-3), (1.5e-3, 4e-3), (2e-3, 9e-3), (1e-4, 5e-2)])
def test_log_knob_ticks_do_not_crowd(tmp_path: Path, span: tuple[float, float]) -> None:
    trials = synthetic_trials(12, tmp_path, span)
    fig = figures.knob_scatter(trials, log_params=["relu_stable", "l1_reg"],
                               path=tmp_path / "knobs.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        assert ax.get_xscale() == "log"
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels(which="both")
                 if t.get_text() and t.get_visible()]
        assert len(boxes) >= 2, ax.get_title()  # labelled even inside one decade
        boxes.sort(key=lambda b: b.x0)
        for a, b in zip(boxes, boxes[1:]):  # no two labels overlap or touch
            assert b.x0 - a.x1 >= 5, (ax.get_title(), span)


def test_stage_figure_many_trials_and_too_few_for_importance(tmp_path: Path) -> None:
    trials = synthetic_trials(figures.MAX_LEGEND_TRIALS + 4, tmp_path)
    fig = figures.stage_curves(trials, path=tmp_path / "stages.png")
    ax = fig.axes[0]
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "trial number"  # colour bar
    colours = [ln.get_color() for ln in ax.lines if (ln.get_gid() or "").startswith("trial")]
    assert len(colours) == len(trials) and len({tuple(c) for c in colours}) == len(trials)
    # Importance from too few complete trials: a note, no bars.
    few = figures.MIN_IMPORTANCE_TRIALS - 1
    fig = figures.importance_bars({"l1_reg": 0.7, "relu_stable": 0.3}, n_complete=few,
                                  path=tmp_path / "imp.png")
    ax = fig.axes[0]
    assert len(ax.patches) == 0
    assert any(f"rest on {few} complete trials" in t.get_text() for t in ax.texts)
    fig = figures.importance_bars({"l1_reg": 0.7, "relu_stable": 0.3},
                                  n_complete=figures.MIN_IMPORTANCE_TRIALS)
    assert len(fig.axes[0].patches) == 2  # the control


def test_launch_figures(launched_db: dict, tmp_path: Path) -> None:
    results = {}
    for entry in launched_db["entries"]:
        path = Path(entry["results"])
        path = path if path.is_absolute() else launched_db["work"] / path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[f"trial {entry['trial']}"] = load_results(path)
    png = tmp_path / "outcomes.png"
    fig = figures.certification_outcomes(results, path=png)
    assert png.stat().st_size > 5_000
    ax = fig.axes[0]
    by_status = {c.get_label(): [r.get_height() for r in c] for c in ax.containers}
    for i, (label, rows) in enumerate(launched_db["results"].items()):
        for status in ("certified", "falsified", "unknown", "misclassified"):
            assert by_status[status][i] == sum(r[0] == status for r in rows)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(results)

    first = next(iter(results.values()))
    png = tmp_path / "time.png"
    fig = figures.time_per_input(first, path=png)
    assert png.stat().st_size > 5_000
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "(s" in ax.get_ylabel()
    rows = launched_db["results"][next(iter(results))]
    methods = [t.get_text() for t in ax.get_xticklabels()]
    assert methods[:3] == ["clean", "pgd", "zonotope"]  # cascade order
    for method in methods:
        times = sorted(max(r[2], figures.TIME_FLOOR_S) for r in rows if r[1] == method)
        coll = labelled(ax, f"{method} (n={len(times)})")
        assert sorted(coll.get_offsets()[:, 1]) == pytest.approx(times)


# --------------------------------------------------------------------------------------------
# Report and command line


def expected_best(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    feasible = [t for t in complete if t.user_attrs.get("constraint", 0) <= 0] or complete
    return sorted(feasible, key=lambda t: (-t.user_attrs["val_cert_acc"],
                                           -t.user_attrs["val_nat_acc"], t.number))[0]


def test_cli_report(launched_db: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    rc = report_main(["--storage", url_of(launched_db["db"]), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == f"wrote {out / 'report.md'}"
    report = (out / "report.md").read_text()
    study = optuna.load_study(study_name=STUDY, storage=url_of(launched_db["db"]))
    best = expected_best(study)
    assert f"Best trial: **#{best.number}**" in report
    assert "natural 95.0%, certified 80.0%" in report
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["number"]) == [t.number for t in study.trials]
    assert list(trials["state"]) == [t.state.name for t in study.trials]
    launches = pd.read_csv(out / "launches.csv")
    assert list(launches["trial"]) == [e["trial"] for e in launched_db["entries"]]
    linked = [line.split("](")[1].split(")")[0] for line in report.splitlines()
              if line.startswith("- [") and ".png](" in line]
    kinds = {"history", "knobs", "importance", "pareto", "stages", "outcomes", "time", "fidelity",
             "noise"}
    assert {name.split("_")[1].split(".")[0] for name in linked} == kinds
    for name in linked:
        assert (out / name).stat().st_size > 5_000
    assert sorted(p.name for p in out.glob("*.png")) == sorted(linked)
    assert "torn last line" in report  # the first launch's results file ends mid-line
    assert not list(tmp_path.glob(".report.tmp-*"))


def test_report_compares_databases(tuned_db: Path, launched_db: dict, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "compare"
    out.mkdir()  # an existing folder is filled, not replaced
    (out / "keep.txt").write_text("mine")
    rc = report_main(["--storage", url_of(tuned_db), "--storage", url_of(launched_db["db"]),
                      "--study", STUDY, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "## Comparison" in report and "db1/quickstart" in report and "db2/quickstart" in report
    assert (out / "comparison_pareto.png").stat().st_size > 10_000
    assert (out / "db1_quickstart_history.png").exists()
    assert (out / "db2_quickstart_outcomes.png").exists()
    assert (out / "keep.txt").read_text() == "mine"
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6 and set(trials["storage"]) == {url_of(tuned_db),
                                                           url_of(launched_db["db"])}


@pytest.fixture
def empty_study_db(tmp_path: Path) -> Path:
    db = tmp_path / "empty.db"
    optuna.create_study(study_name="nothing_yet", storage=url_of(db))
    return db


@pytest.mark.parametrize("case", ["missing_file", "unknown_study", "empty_study",
                                  "no_connection", "not_optuna"])
def test_cli_bad_input(case: str, tuned_db: Path, empty_study_db: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture) -> None:
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("create table x (a)").connection.commit()
    args = {
        "missing_file": ["--storage", url_of(tmp_path / "missing.db")],
        "unknown_study": ["--storage", url_of(tuned_db), "--study", "mnist_0.3"],
        "empty_study": ["--storage", url_of(empty_study_db)],
        "no_connection": ["--storage", "postgresql://u:pw@127.0.0.1:1/colt"],
        "not_optuna": ["--storage", url_of(plain)],
    }[case]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = report_main([*args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder, no DB file
    if case == "unknown_study":
        assert "available studies: 'quickstart'" in err[0]
    if case == "missing_file":
        assert not (tmp_path / "missing.db").exists()
    if case == "empty_study":
        assert "no trials" in err[0] or "no study has trials" in err[0]


def test_cli_bad_input_subprocess(tmp_path: Path) -> None:
    """The real command: exit status 2, one line on stderr, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "analysis", "--storage",
                           url_of(tmp_path / "missing.db"), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "missing.db" in proc.stderr and "does not exist" in proc.stderr
    assert list(out.iterdir()) == [] and not (tmp_path / "missing.db").exists()


def test_no_training_imports() -> None:
    """The analysis reads the database only: no pipeline (training) or torch imports."""
    import ast

    for path in sorted((ROOT / "analysis").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("pipeline", "torch"), f"{path.name}: {name}"


def test_pareto_objective_study(tmp_path: Path) -> None:
    """A two-objective study ("pareto": val nat, val cert) written with the pipeline's layout."""
    from analysis.report import gather, render, study_section

    db = tmp_path / "pareto.db"
    study = optuna.create_study(study_name="pareto_demo", storage=url_of(db),
                                directions=["maximize", "maximize"])
    study.set_user_attr("objective", "pareto")
    study.set_user_attr("launches", [{"trial": 1, "test_nat_acc": 0.7, "test_cert_acc": 0.5,
                                      "results": str(tmp_path / "gone.jsonl"), "params": {}}])
    points = [(0.9, 0.3), (0.8, 0.5), (0.6, 0.6), (0.7, 0.4), (0.5, 0.2)]
    for k, (nat, cert) in enumerate(points):
        trial = study.ask({"l1_reg": optuna.distributions.FloatDistribution(1e-7, 1e-3,
                                                                             log=True)})
        # (no trial.report: Optuna has no intermediate values for multi-objective studies)
        trial.set_user_attr("val_nat_acc", nat)
        trial.set_user_attr("val_cert_acc", cert)
        trial.set_user_attr("stage_time_s", [1.0, 2.0])
        trial.set_user_attr("score_time_s", [0.5, 0.5 + k])  # scoring after each stage
        if k == 4:
            trial.set_user_attr("fail_reason", "diverged: loss is nan")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, [nat, cert])
    df = load_trials(url_of(db))
    assert "value" not in df.columns
    assert df["values_0"].tolist()[:4] == [p[0] for p in points[:4]]
    assert df["values_1"].tolist()[:4] == [p[1] for p in points[:4]]
    assert df["state"].tolist()[-1] == "FAIL" and df["fail_reason"].iloc[-1].startswith("diverged")
    # Scoring's share of training + scoring: (0.5 + 0.5 + k) / (3 + 1 + k).
    np.testing.assert_allclose(df["score_share"], [(1 + k) / (4 + k) for k in range(5)])
    fig = figures.pareto_front(df)
    front = labelled(fig.axes[0], "Pareto front", "lines").get_xydata()
    np.testing.assert_allclose(front, [[60, 60], [80, 50], [90, 30]])
    data = gather([url_of(db)], None)
    text = "\n".join(study_section(data[0]))
    assert "Pareto-optimal trials (validation natural vs certified): #0, #1, #2" in text
    assert "Best trial: **#2**" in text
    assert "diverged: loss is nan" in text
    assert "gone.jsonl` not found" in text
    # (1 + k) / (4 + k): median over the 5 trials at k = 2 (3/6); over the complete trials
    # (k = 0..3) between 2/5 and 3/6.
    assert "Validation scoring took 50.0% of a trial's training and scoring time (median over 5 " \
           "trials, range 25.0-62.5%; complete trials: 45.0%)." in text
    assert render(data, None, []).startswith("# COLT tuning report")


def test_report_on_failed_only_database(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 15, bug 2: studies without a complete trial (after a first Ctrl-C, or an offline
    CIFAR attempt) crashed the report (int() of NaT). It must write a report that says so."""
    db = tmp_path / "failed.db"
    for name, reason in (("interrupted", "interrupted by the user (Ctrl-C)"),
                         ("offline", "cifar10 train split unavailable")):
        study = optuna.create_study(study_name=name, storage=url_of(db), direction="maximize")
        for _ in range(2):
            trial = study.ask({"l1_reg": optuna.distributions.FloatDistribution(1e-7, 1e-3,
                                                                                 log=True)})
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    out = tmp_path / "report"
    assert report_main(["--storage", url_of(db), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for name, reason in (("interrupted", "Ctrl-C"), ("offline", "unavailable")):
        section = text.split(f"## Study `{name}`", 1)[1].split("## Study", 1)[0]
        assert "No trial of this study has completed yet** (2 fail)" in section
        failed = [ln for ln in section.splitlines() if ln.startswith("- #")]
        assert len(failed) == 2 and all("(fail)" in ln and reason in ln for ln in failed)
        assert "Complete trials, best first" not in section
    frame = pd.read_csv(out / "trials.csv")
    assert len(frame) == 4 and set(frame["state"]) == {"FAIL"}
    assert all((out / f"{n}_{kind}.png").is_file() for n in ("interrupted", "offline")
               for kind in ("history", "knobs", "importance", "pareto", "stages"))


def test_launch_labels_keep_seeds_of_one_trial_apart():
    """Two seeds of one trial are two launches (their results must not share a key)."""
    import pandas as pd

    from analysis.report import launch_label

    la = pd.DataFrame({"trial": [3, 3, 5], "seed": [100, 101, 100]})
    labels = [launch_label(r, la) for _, r in la.iterrows()]
    assert labels == ["trial 3 seed 100", "trial 3 seed 101", "trial 5"]
    old = pd.DataFrame({"trial": [3]})  # launches recorded before seeds were
    assert launch_label(old.iloc[0], old) == "trial 3"
