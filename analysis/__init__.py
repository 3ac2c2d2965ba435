"""Analysis of COLT tuning studies: DataFrames, figures and a Markdown report.

Reads the Optuna study database (SQLite file or PostgreSQL URL) and a launch's JSONL results
file only; imports none of the training pipeline.

    from analysis import load_trials, load_launches, load_results
    trials = load_trials("sqlite:///runs/optuna.db")          # all studies
    python -m analysis --storage sqlite:///runs/optuna.db --out runs/report
"""

from analysis.data import (
    AnalysisError,
    EmptyStudyError,
    StorageError,
    StudyNotFoundError,
    load_launches,
    load_results,
    load_studies,
    load_study,
    load_trials,
    open_storage,
    param_columns,
    param_importances,
    stage_columns,
    status_counts,
    study_names,
)

__all__ = [
    "AnalysisError",
    "EmptyStudyError",
    "StorageError",
    "StudyNotFoundError",
    "load_launches",
    "load_results",
    "load_studies",
    "load_study",
    "load_trials",
    "open_storage",
    "param_columns",
    "param_importances",
    "stage_columns",
    "status_counts",
    "study_names",
]
