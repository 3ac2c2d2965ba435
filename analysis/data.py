"""Reading a tuning study database (and a launch's JSONL results) into pandas DataFrames.

Only the Optuna storage API is used (no SQL of our own), so the same code reads SQLite files and
PostgreSQL databases. Nothing here imports the training pipeline.

    trials = load_trials("sqlite:///runs/optuna.db")            # every study of the storage
    trials = load_trials("postgresql://u@host/db", "mnist_0.1")  # one study
    launches = load_launches("sqlite:///runs/optuna.db")
    results = load_results(launches.results[0])
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

# The tuned knobs of a COLT study (the same names as the training config's fields). Used only as a
# fallback to tell parameter columns apart when a DataFrame has lost its ``attrs``.
KNOWN_KNOBS = ("batch_size", "eps_initial_factor", "eps_decay_factor", "l1_reg", "relu_stable",
               "relu_stable_factor")
VAL_NAT, VAL_PGD, VAL_CERT = "val_nat_acc", "val_pgd_acc", "val_cert_acc"
STATUSES = ("certified", "falsified", "unknown", "misclassified")
RESULT_COLUMNS = ("index", "label", "predicted", "status", "method", "time_s")
LAUNCH_COLUMNS = ("study", "trial", "val_nat_acc", "val_cert_acc", "test_nat_acc", "test_pgd_acc",
                  "test_cert_acc", "n_test", "results", "checkpoint", "epochs_per_stage")
CORE_COLUMNS = ("study", "number", "state")
STAGE_CERT = re.compile(r"^stage(\d+)_cert$")
# Recorded for reproduction (``pipeline.train --from-trial``), too wide for a table; the budget
# (``budget.*`` columns) and the validation inputs (``val_inputs.*``) stay.
BULKY_ATTRS = ("train_config", "certify_val", "certify_test")


class AnalysisError(Exception):
    """Bad input to the analysis: a storage, study or file that cannot be used (one line)."""


class StorageError(AnalysisError):
    """The storage URL does not exist, cannot be connected or is not an Optuna database."""


class StudyNotFoundError(AnalysisError, LookupError):
    """No study of that name in the storage; the message lists the available ones."""


class EmptyStudyError(AnalysisError):
    """The study holds no trials."""


# --------------------------------------------------------------------------------------------
# Storage


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def describe_storage(storage: str | optuna.storages.BaseStorage) -> str:
    if isinstance(storage, str):
        return redact(storage)
    url = getattr(storage, "url", None)
    return redact(url) if isinstance(url, str) else type(storage).__name__


def _first_line(err: BaseException) -> str:
    # Optuna wraps driver errors ("An exception is raised during the commit..."): the root cause
    # (e.g. "connection refused") is the useful part.
    seen = {id(err)}
    while True:
        inner = err.__cause__ or err.__context__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        err = inner
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def open_storage(storage: str | optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """An Optuna storage for reading: an object is returned as is, a URL opened as RDB storage.

    No tables are created and no heartbeat is started. A SQLite path that does not exist raises
    :class:`StorageError` instead of being created empty. A database written by another Optuna
    version is opened without the schema compatibility check (after a first, checked attempt).
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if not isinstance(storage, str) or not storage.strip():
        raise StorageError(f"storage must be an SQLAlchemy URL or an Optuna storage, "
                           f"not {storage!r}")
    import sqlalchemy.engine
    import sqlalchemy.exc

    try:
        url = sqlalchemy.engine.make_url(storage)
    except (sqlalchemy.exc.ArgumentError, ValueError) as err:
        raise StorageError(f"storage {redact(storage)!r} is not an SQLAlchemy URL "
                           f"(e.g. sqlite:///runs/optuna.db, postgresql://user@host/db): "
                           f"{_first_line(err)}") from None
    engine_kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise StorageError(f"storage {redact(storage)!r}: an in-memory or URI SQLite "
                               "database holds no study; give the path of a database file")
        path = Path(database)
        if not path.is_file():
            what = "is a directory, not a database file" if path.is_dir() else "does not exist"
            raise StorageError(f"storage {redact(storage)!r}: SQLite file {str(path)!r} {what}")
        engine_kwargs["connect_args"] = {"timeout": 30}
    elif url.get_backend_name() == "postgresql":
        engine_kwargs["pool_pre_ping"] = True
        if url.get_driver_name() in ("psycopg2", "psycopg", ""):
            engine_kwargs["connect_args"] = {"connect_timeout": 15}
    try:
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs,
                                              skip_table_creation=True)
        except RuntimeError as err:
            if "compatible" not in str(err) and "schema" not in str(err):
                raise
            # Another Optuna version wrote it: reading through the public API usually works.
            warnings.warn(f"storage {redact(storage)}: {_first_line(err)}; reading it anyway",
                          stacklevel=2)
            return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs,
                                              skip_compatibility_check=True,
                                              skip_table_creation=True)
    except ImportError as err:
        raise StorageError(f"storage {redact(storage)!r}: database driver missing: "
                           f"{_first_line(err.__cause__ or err)}") from None
    except Exception as err:  # sqlalchemy and driver errors come in many types
        text = _first_line(err)
        if "no such table" in text or "does not exist" in text and "relation" in text:
            text = "not an Optuna study database (no Optuna tables)"
        raise StorageError(f"storage {redact(storage)!r} cannot be used: {text}") from None


def study_names(storage: str | optuna.storages.BaseStorage) -> list[str]:
    """Names of the studies in the storage, in creation order."""
    st = open_storage(storage)
    try:
        summaries = optuna.get_all_study_summaries(st, include_best_trial=False)
    except Exception as err:
        raise StorageError(f"storage {describe_storage(storage)!r} cannot be read: "
                           f"{_first_line(err)}") from None
    return [s.study_name for s in summaries]


def _select(st: optuna.storages.BaseStorage, storage: Any, study_name: str | None) -> list[str]:
    names = study_names(st)
    if study_name is None:
        return names
    if study_name not in names:
        available = ", ".join(repr(n) for n in names) if names else "none"
        raise StudyNotFoundError(f"no study named {study_name!r} in storage "
                                 f"{describe_storage(storage)!r}; available studies: {available}")
    return [study_name]


def _load(st: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.load_study(study_name=name, storage=st)


def load_study(storage: str | optuna.storages.BaseStorage, study_name: str) -> optuna.Study:
    """The Optuna study (read access), or :class:`StudyNotFoundError` listing the names."""
    st = open_storage(storage)
    _select(st, storage, study_name)
    return _load(st, study_name)


# --------------------------------------------------------------------------------------------
# Trials


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Nested dicts become ``a.b.c`` columns; lists become JSON text (CSV-friendly)."""
    if isinstance(value, dict):
        if not value:
            out[prefix] = "{}"
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}", sub, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(list(value), default=str)
    else:
        out[prefix] = value


def _finite(x: Any) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return math.nan
    return f


def _trial_row(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    row: dict[str, Any] = {"study": study.study_name, "number": trial.number,
                           "state": trial.state.name}
    values = trial.values
    if len(study.directions) == 1:
        row["value"] = values[0] if values else math.nan
    else:
        for i in range(len(study.directions)):
            row[f"values_{i}"] = values[i] if values and i < len(values) else math.nan
    reserved = set(row) | {"datetime_start", "datetime_complete", "duration_s", "published",
                           "fail_reason"}
    for name, value in trial.params.items():
        row[f"param_{name}" if name in reserved else name] = value
    reserved |= set(row)
    for step, value in sorted(trial.intermediate_values.items()):
        row[f"stage{step}_cert"] = value
    attrs: dict[str, Any] = {}
    for key, value in trial.user_attrs.items():
        if key in ("published", "fail_reason") or key in BULKY_ATTRS or key.endswith("_bits"):
            continue  # per-image bits and full configs: read them from the trial itself
        _flatten(f"user_{key}" if key in reserved else key, value, attrs)
    ci = trial.user_attrs.get("val_cert_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        # The 95% Wilson interval of the validation certified accuracy, on val_n images.
        attrs["val_cert_lo"], attrs["val_cert_hi"] = _finite(ci[0]), _finite(ci[1])
        attrs.pop("val_cert_ci", None)
    stage_times = trial.user_attrs.get("stage_time_s")
    if isinstance(stage_times, (list, tuple)):
        for k, t in enumerate(stage_times):
            attrs[f"stage{k}_time_s"] = _finite(t)
    score_times = trial.user_attrs.get("score_time_s")
    if isinstance(stage_times, (list, tuple)) and isinstance(score_times, (list, tuple)) \
            and stage_times and len(score_times) == len(stage_times):
        # Training and validation-scoring wall time over the stages, and scoring's share.
        train_s, score_s = float(sum(stage_times)), float(sum(score_times))
        attrs["train_time_s"], attrs["score_time_s"] = train_s, score_s
        attrs["score_share"] = score_s / (train_s + score_s) if train_s + score_s > 0 \
            else math.nan
    row.update(attrs)
    row["datetime_start"] = trial.datetime_start
    row["datetime_complete"] = trial.datetime_complete
    if trial.datetime_start is not None and trial.datetime_complete is not None:
        row["duration_s"] = (trial.datetime_complete - trial.datetime_start).total_seconds()
    else:
        row["duration_s"] = math.nan
    row["published"] = bool(trial.user_attrs.get("published", False))
    row["fail_reason"] = trial.user_attrs.get("fail_reason")
    return row


def _order_columns(df: pd.DataFrame, params: Iterable[str]) -> pd.DataFrame:
    def stage_key(col: str) -> tuple[int, str]:
        m = re.match(r"^stage(\d+)_(.*)$", col)
        return (int(m.group(1)), m.group(2)) if m else (0, col)

    cols = list(df.columns)
    first = [c for c in CORE_COLUMNS if c in cols]
    values = [c for c in cols if c == "value"] + sorted(
        (c for c in cols if re.match(r"^values_\d+$", c)), key=lambda c: int(c.split("_")[1]))
    params = [c for c in params if c in cols]
    scores = [c for c in (VAL_NAT, VAL_PGD, VAL_CERT) if c in cols]
    cert_stages = sorted((c for c in cols if STAGE_CERT.match(c)), key=stage_key)
    time_stages = sorted((c for c in cols if re.match(r"^stage\d+_time_s$", c)), key=stage_key)
    timing = [c for c in ("datetime_start", "datetime_complete", "duration_s", "published",
                          "fail_reason", "retry_of", "constraint") if c in cols]
    head = first + values + params + scores + cert_stages + time_stages + timing
    rest = sorted((c for c in cols if c not in head), key=lambda c: (c.startswith("stage"),
                                                                       stage_key(c), c))
    return df[head + rest]


def _empty_trials() -> pd.DataFrame:
    df = pd.DataFrame({"study": pd.Series(dtype=object), "number": pd.Series(dtype="int64"),
                       "state": pd.Series(dtype=object), "value": pd.Series(dtype=float),
                       "datetime_start": pd.Series(dtype="datetime64[us]"),
                       "datetime_complete": pd.Series(dtype="datetime64[us]"),
                       "duration_s": pd.Series(dtype=float), "published": pd.Series(dtype=bool),
                       "fail_reason": pd.Series(dtype=object)})
    df.attrs.update(params=[], log_params=[], directions={})
    return df


def load_trials(storage: str | optuna.storages.BaseStorage,
                study_name: str | None = None) -> pd.DataFrame:
    """One row per trial of the study (of every study in the storage when no name is given).

    Columns: ``study``, ``number``, ``state`` (``COMPLETE``, ``PRUNED``, ``FAIL``, ...), ``value``
    (single objective) or ``values_0``, ``values_1``, ... (multi-objective), the parameters under
    their own names, ``val_nat_acc``/``val_pgd_acc``/``val_cert_acc``, ``stage<k>_cert`` (the
    intermediate value reported at step k), ``stage<k>_time_s`` (from the ``stage_time_s``
    list), ``train_time_s``, ``score_time_s`` and ``score_share`` (validation scoring's share of
    the two, for trials that recorded ``score_time_s``), ``datetime_start``,
    ``datetime_complete``, ``duration_s``, ``published`` (bool),
    ``fail_reason``, then every other user attribute: nested dicts flattened to ``a.b`` columns
    (``env.device``, ``stage0_val.cert_acc``), lists as JSON text.

    ``df.attrs`` holds ``params`` (parameter column names), ``log_params`` (those sampled on a
    log scale) and ``directions`` ({study: ["maximize", ...]}).
    """
    st = open_storage(storage)
    names = _select(st, storage, study_name)
    rows: list[dict[str, Any]] = []
    params: dict[str, None] = {}
    log_params: set[str] = set()
    directions: dict[str, list[str]] = {}
    for name in names:
        study = _load(st, name)
        directions[name] = [d.name.lower() for d in study.directions]
        for trial in study.get_trials(deepcopy=False):
            rows.append(_trial_row(study, trial))
            for pname, dist in trial.distributions.items():
                params[pname] = None
                if getattr(dist, "log", False):
                    log_params.add(pname)
    if not rows:
        df = _empty_trials()
        df.attrs["directions"] = directions
        return df
    df = pd.DataFrame(rows)
    for col in ("datetime_start", "datetime_complete"):
        df[col] = pd.to_datetime(df[col])
    df = _order_columns(df, params)
    df.attrs.update(params=[p for p in params if p in df.columns],
                    log_params=sorted(log_params), directions=directions)
    return df.reset_index(drop=True)


def param_columns(trials: pd.DataFrame) -> list[str]:
    """The tuned-parameter columns of a trials DataFrame (from ``attrs``, else known knobs)."""
    params = trials.attrs.get("params")
    if params:
        return [p for p in params if p in trials.columns]
    return [p for p in KNOWN_KNOBS if p in trials.columns]


def stage_columns(trials: pd.DataFrame) -> list[str]:
    """``stage<k>_cert`` columns in stage order."""
    cols = [c for c in trials.columns if STAGE_CERT.match(c)]
    return sorted(cols, key=lambda c: int(STAGE_CERT.match(c).group(1)))


# --------------------------------------------------------------------------------------------
# Study-level facts and launches


def load_studies(storage: str | optuna.storages.BaseStorage,
                 study_name: str | None = None) -> pd.DataFrame:
    """One row per study: name, directions, objective, trial count, published point, ..."""
    st = open_storage(storage)
    names = _select(st, storage, study_name)
    rows = []
    for name in names:
        study = _load(st, name)
        attrs = study.user_attrs
        published = attrs.get("published") if isinstance(attrs.get("published"), dict) else {}
        launches = attrs.get("launches") if isinstance(attrs.get("launches"), list) else []
        rows.append({
            "study": name,
            "directions": ",".join(d.name.lower() for d in study.directions),
            "objective": attrs.get("objective"),
            "n_trials": len(study.get_trials(deepcopy=False)),
            "published_nat_acc": _finite(published.get("nat_acc")),
            "published_cert_acc": _finite(published.get("cert_acc")),
            "n_launches": len(launches),
            "study_file": attrs.get("study_file"),
            "artifact_dir": attrs.get("artifact_dir"),
        })
    columns = ["study", "directions", "objective", "n_trials", "published_nat_acc",
               "published_cert_acc", "n_launches", "study_file", "artifact_dir"]
    return pd.DataFrame(rows, columns=columns)


def load_launches(storage: str | optuna.storages.BaseStorage,
                  study_name: str | None = None) -> pd.DataFrame:
    """One row per launch recorded in the studies' ``launches`` user attribute.

    Columns: ``study``, ``trial``, ``val_nat_acc``, ``val_cert_acc``, ``test_nat_acc``,
    ``test_pgd_acc``, ``test_cert_acc``, ``n_test``, ``results`` (JSONL path as recorded),
    ``checkpoint``, ``epochs_per_stage``, then the launched trial's parameters under their own
    names, then any other keys of the entry.
    """
    st = open_storage(storage)
    names = _select(st, storage, study_name)
    rows = []
    for name in names:
        launches = _load(st, name).user_attrs.get("launches") or []
        if not isinstance(launches, list):
            continue
        for entry in launches:
            if not isinstance(entry, dict):
                continue
            row: dict[str, Any] = {"study": name}
            for key, value in entry.items():
                if key == "params" and isinstance(value, dict):
                    continue
                if key in BULKY_ATTRS or key.endswith("_bits"):
                    continue
                _flatten(key, value, row)
            for pname, value in (entry.get("params") or {}).items():
                row[f"param_{pname}" if pname in row or pname in LAUNCH_COLUMNS else pname] = value
            rows.append(row)
    df = pd.DataFrame(rows)
    for col in LAUNCH_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=object)
    rest = [c for c in df.columns if c not in LAUNCH_COLUMNS]
    return df[list(LAUNCH_COLUMNS) + rest].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# A launch's per-input results


def load_results(path: str | Path) -> pd.DataFrame:
    """Per-input rows of a launch's results JSONL (one JSON object per line).

    Blank lines are skipped; a torn last line (a writer interrupted mid-line) is dropped with a
    warning. A bad line anywhere else raises :class:`AnalysisError` naming the line. The columns
    ``index``, ``label``, ``predicted``, ``status``, ``method``, ``time_s`` are always present.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise AnalysisError(f"results file {str(path)!r} does not exist") from None
    except OSError as err:
        raise AnalysisError(f"results file {str(path)!r} cannot be read: {err}") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    records = []
    for pos, (lineno, line) in enumerate(lines):
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if pos == len(lines) - 1:
                warnings.warn(f"{path}: dropped torn last line {lineno}", stacklevel=2)
                break
            raise AnalysisError(f"{path}:{lineno}: not a JSON object: {err}") from None
        records.append(obj)
    df = pd.DataFrame.from_records(records)
    for col in RESULT_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series([None] * len(df), dtype=object)
    df["time_s"] = pd.to_numeric(df["time_s"], errors="coerce")
    rest = [c for c in df.columns if c not in RESULT_COLUMNS]
    return df[list(RESULT_COLUMNS) + rest]


def status_counts(results: pd.DataFrame) -> dict[str, int]:
    """Inputs per status, known statuses first (zero counts included), then any others."""
    counts = results["status"].fillna("missing").astype(str).value_counts()
    out = {s: int(counts.get(s, 0)) for s in STATUSES}
    for s, n in counts.items():
        if s not in out:
            out[str(s)] = int(n)
    return out


# --------------------------------------------------------------------------------------------
# Hyperparameter importance


def param_importances(storage: str | optuna.storages.BaseStorage | optuna.Study,
                      study_name: str | None = None, seed: int = 0,
                      target: Callable[[optuna.trial.FrozenTrial], float] | None = None
                      ) -> tuple[pd.Series, str | None]:
    """fANOVA importance (fixed seed) of each parameter for the validation certified accuracy.

    Returns ``(importances, note)``: a Series indexed by parameter name (largest first) and
    ``None``, or an empty Series and a one-line reason when importance is undefined (fewer than two
    complete trials, all of them with the same score, or the evaluator failing).
    The target is the last objective value (the certified accuracy for both the ``cert`` and the
    ``pareto`` objective) unless given.
    """
    if isinstance(storage, optuna.Study):
        study = storage
    else:
        if study_name is None:
            raise ValueError("param_importances needs a study name with a storage")
        study = load_study(storage, study_name)
    if target is None:
        def target(t: optuna.trial.FrozenTrial) -> float:
            return float(t.values[-1])
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    empty = pd.Series(dtype=float, name="importance")
    if len(complete) < 2:
        return empty, (f"importance needs at least 2 complete trials; the study has "
                       f"{len(complete)}")
    scores = {target(t) for t in complete}
    if len(scores) < 2:
        return empty, (f"importance undefined: all {len(complete)} complete trials have the same "
                       f"score ({next(iter(scores)):.4g})")
    varied = [p for p in {p for t in complete for p in t.params}
              if len({repr(t.params.get(p)) for t in complete}) > 1]
    if not varied:
        return empty, "importance undefined: no parameter varies among the complete trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
                target=target)
    except Exception as err:  # fANOVA raises RuntimeError/ValueError on degenerate data
        return empty, f"importance could not be computed: {_first_line(err)}"
    series = pd.Series(result, dtype=float, name="importance")
    return series.sort_values(ascending=False), None
