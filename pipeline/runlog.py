"""The tuning run's log: one line when a trial starts (number, knobs), a short one per epoch, one
per stage score (validation certified accuracy with its Wilson 95% interval) and one when the
trial ends, every line prefixed with the trial number; Ctrl-C recorded as the trial's
``fail_reason``.

    setup_logging()                      # the CLI's handler (left alone under pytest)
    objective = logged(Objective(...))   # trial prefix and Ctrl-C bookkeeping
    study.optimize(objective, callbacks=[log_trial_end])

Nothing to run on its own: ``python -m pipeline.tune`` uses it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import optuna
import torch

from pipeline.config import ConfigError
from pipeline.storage import StorageError, original_trial_number

log = logging.getLogger("pipeline.tune")  # the tuning CLI's lines, whichever module logs them

INTERRUPTED_REASON = "interrupted by the user (Ctrl-C)"


class TuningInterrupted(Exception):
    """Ctrl-C during tuning: the study and the trial it stopped (None: between trials)."""

    def __init__(self, study: optuna.Study, trial_number: int | None) -> None:
        super().__init__(f"interrupted (trial {trial_number})")
        self.study = study
        self.trial_number = trial_number


class _RunState:
    """The trial this process is running (the log prefix) and the one Ctrl-C stopped."""

    trial: int | None = None
    interrupted: int | None = None


RUN_STATE = _RunState()


def logged(objective: Any) -> Any:
    """The objective with the trial number as log prefix and Ctrl-C recorded as the trial's
    ``fail_reason`` (Optuna then marks it FAIL and re-raises)."""

    def run(trial: optuna.Trial) -> Any:
        RUN_STATE.trial, RUN_STATE.interrupted = trial.number, None
        try:
            return objective(trial)
        except KeyboardInterrupt as stop:
            RUN_STATE.interrupted = trial.number
            # Ctrl-C (or kill -INT) has no argument; kill -TERM names its signal.
            reason = f"stopped by {stop.args[0]}" if stop.args else INTERRUPTED_REASON
            with contextlib.suppress(Exception):  # a second Ctrl-C or a lost connection
                trial.set_user_attr("fail_reason", reason)
            raise
        finally:
            RUN_STATE.trial = None

    return run


def _fmt_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_text(trial: optuna.Trial, knobs: dict[str, Any]) -> str:
    """What the start line says after "started": published / retry, then the knobs."""
    notes = []
    if trial.user_attrs.get("published"):
        notes.append("published hyperparameters")
    with contextlib.suppress(Exception):
        original = original_trial_number(trial.study, trial)
        if original != trial.number:
            notes.append(f"resumes trial {original}")
    head = f" ({', '.join(notes)})" if notes else ""
    return head + ": " + (", ".join(f"{k}={_fmt_value(v)}" for k, v in knobs.items()) or
                          "no tuned knobs")


def score_text(scores: dict[str, Any]) -> str:
    """``val cert 0.523 (95% 0.467-0.579, n=300), nat 0.912, pgd 0.700``."""
    from pipeline.stats import wilson_interval

    text = f"val cert {scores['cert_acc']:.3f}"
    n, cert = scores.get("n"), scores.get("cert")
    if isinstance(n, int) and isinstance(cert, int) and n > 0:
        lo, hi = wilson_interval(cert, n)
        text += f" (95% {lo:.3f}-{hi:.3f}, n={n})"
    return text + f", nat {scores['nat_acc']:.3f}, pgd {scores['pgd_acc']:.3f}"


def last_scores(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    """The validation scores of the last stage the trial finished (user attr ``stage<k>_val``)."""
    stages = sorted(int(k[len("stage"):-len("_val")]) for k in trial.user_attrs
                    if k.startswith("stage") and k.endswith("_val") and k[5:-4].isdigit())
    return trial.user_attrs[f"stage{stages[-1]}_val"] if stages else None


def duration_text(trial: optuna.trial.FrozenTrial) -> str:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return "–"
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def log_trial_end(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Study callback: the trial's state, score and time in one line."""
    scores = last_scores(trial)
    if trial.state == optuna.trial.TrialState.FAIL:
        what = trial.user_attrs.get("fail_reason") or "an error, see above"
        log.info("trial %d finished: FAIL (%s) after %s", trial.number, what, duration_text(trial))
        return
    where = ""
    if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
        where = f" after stage {max(trial.intermediate_values)}"
    log.info("trial %d finished: %s%s, %s, in %s", trial.number, trial.state.name, where,
             score_text(scores) if scores else "no score", duration_text(trial))


# Knobs of the short epoch line: (metric, label, format).
_EPOCH_FIELDS = (("loss", "loss", ".3f"), ("nat_acc", "nat", ".3f"), ("adv_acc", "adv", ".3f"),
                 ("kappa", "kappa", ".2f"), ("time_s", "", ".1f"))


class _RunLogFilter(logging.Filter):
    """For the tuning CLI's log handler: the trial number as prefix (``%(trial)s``), short epoch
    lines, and no traceback for Optuna's "trial failed" record when the error is one that
    :func:`main` reports in one line anyway (Ctrl-C: no record at all)."""

    def __init__(self, quiet: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        record.trial = f"trial {RUN_STATE.trial}: " if RUN_STATE.trial is not None else ""
        if (record.name == "pipeline.train" and record.msg == "stage %d epoch %d: %s"
                and isinstance(record.args, tuple) and len(record.args) == 3):
            record.msg, record.args = "stage %d epoch %d: %s", (
                record.args[0], record.args[1], _short_epoch(str(record.args[2])))
        if record.name.startswith("optuna") and isinstance(record.msg, str) and \
                record.msg.endswith("failed with value None."):
            return False  # the line before it said why the trial failed
        if record.name.startswith("optuna") and record.exc_info:
            error = record.exc_info[1]
            if isinstance(error, KeyboardInterrupt):
                return False
            if isinstance(error, self.quiet):
                record.exc_info, record.exc_text = None, None
        return True


def _short_epoch(text: str) -> str:
    values: dict[str, float] = {}
    for part in text.split(", "):
        key, _, value = part.partition("=")
        with contextlib.suppress(ValueError):
            values[key] = float(value)
    out = [f"{label} {values[key]:{spec}}" if label else f"{values[key]:{spec}} s"
           for key, label, spec in _EPOCH_FIELDS if key in values]
    return ", ".join(out) if out else text


def setup_logging() -> None:
    """INFO lines on stderr with the trial prefix; Optuna's records through the same handler.
    Leaves logging alone when the root logger already has handlers (e.g. under pytest)."""
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(trial)s%(message)s",
                                           datefmt="%H:%M:%S"))
    handler.addFilter(_RunLogFilter((ConfigError, StorageError, CheckpointError, DataError,
                                     LookupError, torch.OutOfMemoryError)))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
