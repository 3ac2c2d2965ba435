"""Optuna tuning of COLT: ``python -m pipeline.tune``.

    python -m pipeline.tune                                   # studies/quickstart.toml, offline
    python -m pipeline.tune --study studies/mnist_0.1.toml --storage sqlite:///runs/optuna.db
    python -m pipeline.tune --study studies/mnist_0.1.toml --launch-best [--trial N]
    optuna-dashboard sqlite:///runs/optuna.db --artifact-dir runs/artifacts

Each trial trains on the training set minus the validation split with the study's per-trial budget,
reports the validation certified accuracy at the end of every stage (so pruners stop weak trials at
stage boundaries) and records its scores, run folder, split and environment as user attributes and
its final checkpoint as an artifact. Several workers are the same command started again against the
same storage; a heartbeat marks the trials of dead workers failed and re-queues them, and the retry
resumes from the dead trial's last checkpoint.

The log has one line when a trial starts (number, knobs), a short one per epoch, one per stage
score (validation certified accuracy with its Wilson 95% interval) and one when the trial ends;
the run ends with a table of the trials. Ctrl-C (or ``kill -INT`` / ``kill -TERM``, also of a
background run) marks the running trial FAIL (user attribute ``fail_reason``), queues it again,
prints the study so far and the command that resumes it, and exits with 130. Bad input (study file, storage URL, a missing data set) is one ``error:`` line
and exit 2, found before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.runlog import (
    INTERRUPTED_REASON,
    RUN_STATE,
    TuningInterrupted,
    duration_text,
    last_scores,
    log_trial_end,
    logged,
    score_text,
    setup_logging,
    trial_text,
)
from pipeline.storage import (
    FINISHED_STATES,
    StorageError,
    TrialCapReached,
    open_storage,
    original_trial_number,
    redact,
)
from pipeline.study import StudyFile, load_study_file
from pipeline.train import DivergedError, EpochReport, make_net, resolve_device, train, validate_layers

log = logging.getLogger(__name__)

DEFAULT_STUDY = "studies/quickstart.toml"
DEFAULT_STORAGE = "sqlite:///runs/optuna.db"
VAL_NAT, VAL_PGD, VAL_CERT = "val_nat_acc", "val_pgd_acc", "val_cert_acc"
CONSTRAINT_ATTR = "constraint"


def make_sampler(study: StudyFile) -> optuna.samplers.BaseSampler:
    # The natural-accuracy floor reaches the samplers through trial.set_constraint (objective).
    s = study.settings
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    if s.sampler == "gp":
        # Gaussian-process BO; like TPE it reads the constraint set by the objective
        # (trial.set_constraint), so infeasible trials steer it away.
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.sampler_startup_trials,
                                         warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.sampler_startup_trials)


def make_pruner(study: StudyFile) -> optuna.pruners.BasePruner:
    s = study.settings
    n_stages = study.trial_config(study.published_knobs()).num_stages
    if s.objective == "pareto" or s.pruner == "none":
        return optuna.pruners.NopPruner()  # Optuna prunes single-objective studies only
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_stages)
    if s.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    if s.pruner == "paired":
        from pipeline.pruning import PairedPruner

        return PairedPruner(alpha=s.pruner_alpha, min_images=s.pruner_min_images,
                            warmup_stages=s.pruner_warmup_stages)
    return optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup_trials,
                                       n_warmup_steps=s.pruner_warmup_stages - 1)


def create_study(study: StudyFile, storage: optuna.storages.BaseStorage) -> optuna.Study:
    s = study.settings
    directions = ["maximize", "maximize"] if s.objective == "pareto" else ["maximize"]
    # Workers started together: one creates the study and queues the published trial, the
    # others wait for the lock and then find both.
    with getattr(storage, "study_lock", None) or contextlib.nullcontext():
        try:
            opt_study = optuna.create_study(storage=storage, study_name=s.name,
                                            sampler=make_sampler(study), pruner=make_pruner(study),
                                            directions=directions, load_if_exists=True)
        except ValueError as err:  # e.g. an existing study with other directions
            raise StorageError(f"study {s.name!r}: {err}") from None
        if s.enqueue_published and study.search and not opt_study.trials:
            # The search starts from the published hyperparameters, so it can only improve on
            # them; with seed_repeats = k the published point is trained with k seeds (the
            # seed band). Queued under the lock into an empty study, so exactly once.
            for repeat in range(s.seed_repeats):
                attrs: dict[str, Any] = {"published": True}
                if s.seed_repeats > 1:
                    attrs.update(seed_repeat=repeat, train_seed=study.base.seed + repeat)
                opt_study.enqueue_trial(study.published_knobs(), user_attrs=attrs)
    import warnings

    with warnings.catch_warnings():  # "experimental" since Optuna 3.2; the dashboard reads it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        opt_study.set_metric_names([VAL_NAT, VAL_CERT] if s.objective == "pareto" else [VAL_CERT])
    opt_study.set_user_attr("study_file", study.path)
    opt_study.set_user_attr("objective", s.objective)
    if s.published_cert_acc is not None:
        opt_study.set_user_attr("published", {"nat_acc": s.published_nat_acc,
                                              "cert_acc": s.published_cert_acc})
    return opt_study


# --------------------------------------------------------------------------------------------
# Environment facts recorded with every trial


def environment(device: torch.device) -> dict[str, Any]:
    versions = {}
    for package in ("torch", "optuna", "highspy", "gurobipy", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"device": f"{device.type}: {name or platform.machine()}", "versions": versions,
            "git_rev": rev or None, "host": platform.node()}


# --------------------------------------------------------------------------------------------
# The objective


def stage_inputs(study: StudyFile, stage: int, num_stages: int) -> int:
    """Validation images scored after ``stage`` (0: all of the split): ``[study] stage_inputs``
    before the last stage, ``[certify_val] n_inputs`` at it (and never more than that)."""
    last = study.certify_val.n_inputs
    early = study.settings.stage_inputs
    if stage >= num_stages - 1 or not early:
        return last
    return min(early, last) if last else early


def score(net: Any, loader: Any, cfg: TrainConfig, study: StudyFile,
          n_inputs: int | None = None) -> dict[str, float]:
    """Validation accuracies: natural, PGD and certified by the cascade's cheap stages, on the
    first ``n_inputs`` images (default ``[certify_val] n_inputs``; 0: all)."""
    from tqdm import tqdm

    from pipeline.certify.scoring import certified_accuracy

    c = study.certify_val
    limit = c.n_inputs if n_inputs is None else n_inputs
    size = len(loader.dataset) if hasattr(loader, "dataset") else None
    n = min(size, limit) if size is not None and limit else size
    log.info("scoring on %s validation images", n if n is not None else "all")
    if size is None or not getattr(loader, "batch_size", None):
        return certified_accuracy(net, loader, cfg.eps, c, max_inputs=limit or None,
                                  device=next(net.parameters()).device)
    # Progress over the batches that certified_accuracy reads (it stops after n inputs); a
    # generator, so that it is iterated batch by batch like the loader itself.
    with tqdm(total=math.ceil(n / loader.batch_size), desc="validation", unit="batch",
              leave=False, disable=None) as bar:
        def batches() -> Any:
            for batch in loader:
                yield batch
                bar.update(1)

        return certified_accuracy(net, batches(), cfg.eps, c, max_inputs=limit or None,
                                  device=next(net.parameters()).device)


class Objective:
    def __init__(self, study: StudyFile, runs_dir: Path, device: str | None,
                 artifact_store: Any) -> None:
        self.study = study
        self.runs_dir = runs_dir
        self.device = device
        self.artifact_store = artifact_store

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        study = self.study
        knobs = {p.name: p.suggest(trial) for p in study.search}
        log.info("started%s", trial_text(trial, knobs))
        cfg = study.trial_config(knobs)
        if self.device:
            cfg = _replace_device(cfg, self.device)
        if trial.user_attrs.get("train_seed") is not None:  # a seed repeat of the published point
            import dataclasses

            cfg = dataclasses.replace(cfg, seed=int(trial.user_attrs["train_seed"]))
        number = original_trial_number(trial.study, trial)
        run_dir = self.runs_dir / study.settings.name / f"trial_{number}"
        device = resolve_device(cfg.device)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("env", environment(device))
        if number != trial.number:
            trial.set_user_attr("retry_of", number)
        from pipeline.data import make_loaders

        loaders = make_loaders(cfg.data, cfg.batch_size, cfg.seed, use_validation=True)
        if loaders.split is not None:
            trial.set_user_attr("split_seed", loaders.split.seed)
            trial.set_user_attr("split_hash", loaders.split.hash)
            trial.set_user_attr("n_valid", loaders.split.n_valid)
        self._record_config(trial, cfg, loaders)
        stage_times: list[float] = []
        score_times: list[float] = []
        stage_start = [time.perf_counter()]
        scores: dict[str, float] = {}

        def on_epoch(report: EpochReport) -> None:
            if not report.stage_end:
                return
            stage_times.append(time.perf_counter() - stage_start[0])
            # Scoring must not move the training RNGs: the trial's weights are then those of
            # an unscored run of the same config (``pipeline.train --from-trial``).
            from pipeline.checkpoint import rng_state, set_rng_state

            rng = rng_state()
            t = time.perf_counter()
            try:
                n = stage_inputs(study, report.stage, cfg.num_stages)
                scores.update(self._scored(trial, report.stage,
                                           score(report.net, loaders.valid, cfg, study, n)))
            finally:
                set_rng_state(rng)
            score_times.append(time.perf_counter() - t)
            log.info("stage %d scored: %s", report.stage, score_text(scores))
            report.net.train()
            # Training and validation-scoring wall time per stage (their ratio: the scoring share).
            trial.set_user_attr("stage_time_s", stage_times)
            trial.set_user_attr("score_time_s", score_times)
            trial.set_user_attr(f"stage{report.stage}_val", scores)
            if study.settings.objective == "cert":
                trial.report(scores["cert_acc"], report.stage)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after stage {report.stage}: validation "
                                             f"certified accuracy {scores['cert_acc']:.3f}")
            stage_start[0] = time.perf_counter()

        try:
            train(cfg, run_dir, on_epoch, loaders=loaders, progress=False)
        except DivergedError as err:
            trial.set_user_attr("fail_reason", f"diverged: {err}")
            raise optuna.TrialPruned(f"diverged: {err}") from None
        except torch.OutOfMemoryError as err:
            trial.set_user_attr("fail_reason", f"out of memory: {str(err).splitlines()[0]}")
            raise
        if not scores:  # resumed after the last stage had finished
            from pipeline.train import load_trained_net

            net, _ = load_trained_net(run_dir / "last.pt", device)
            scores = self._scored(trial, cfg.num_stages - 1,
                                  score(net, loaders.valid, cfg, study))
        nat, pgd, cert = scores["nat_acc"], scores["pgd_acc"], scores["cert_acc"]
        trial.set_user_attr(VAL_NAT, nat)
        trial.set_user_attr(VAL_PGD, pgd)
        trial.set_user_attr(VAL_CERT, cert)
        # The uncertainty of the score: n images and the 95% Wilson interval.
        trial.set_user_attr("val_n", scores.get("n"))
        trial.set_user_attr("val_cert_ci", [scores.get("cert_lo"), scores.get("cert_hi")])
        # <= 0 is feasible: validation natural accuracy at or above the study's floor.
        trial.set_user_attr(CONSTRAINT_ATTR, study.settings.min_nat_acc - nat)
        trial.set_constraint("min_nat_acc", study.settings.min_nat_acc - nat)
        if self.artifact_store is not None:
            optuna.artifacts.upload_artifact(artifact_store=self.artifact_store,
                                             file_path=str(run_dir / "last.pt"),
                                             study_or_trial=trial)
        if study.settings.objective == "pareto":
            return nat, cert
        if nat < study.settings.min_nat_acc:
            # optuna-dashboard marks "Best Trial" by value alone (storage.get_best_trial, no
            # constraints): an infeasible trial's value is its score minus 1, below every
            # feasible one, so the dashboard, study.best_trial and best_trial() name the same
            # trial. The true score stays in the user attribute val_cert_acc.
            return cert - 1.0
        return cert

    def _record_config(self, trial: optuna.Trial, cfg: TrainConfig, loaders: Any) -> None:
        """The fully resolved configs (study file + [trial] + --set + sampled knobs + seed) and
        the exact validation inputs: enough to re-run the trial from the database alone
        (``python -m pipeline.train --from-trial URL NUMBER``)."""
        from pipeline.config import to_dict

        c = self.study.certify_val
        split = loaders.split
        n_split = split.n_valid if split is not None else 0
        n_scored = min(c.n_inputs, n_split) if c.n_inputs else n_split
        early = stage_inputs(self.study, 0, cfg.num_stages)
        n_early = min(early, n_split) if early else n_split
        trial.set_user_attr("train_config", to_dict(cfg))
        trial.set_user_attr("certify_val", to_dict(c))
        trial.set_user_attr("val_inputs", {
            "split_seed": split.seed if split is not None else None,
            "split_hash": split.hash if split is not None else None,
            "n_valid": n_split, "n_scored": n_scored, "n_scored_early_stages": n_early,
            "subset": f"the first {n_scored} of the split's validation indices, in split order"
                      f" (the first {n_early} after every stage but the last)"})
        trial.set_user_attr("budget", {
            "epochs_per_stage": cfg.epochs_per_stage, "stages": cfg.num_stages,
            "epochs": cfg.epochs_per_stage * cfg.num_stages, "mix_epochs": cfg.mix_epochs,
            "n_train": len(loaders.train.dataset), "n_val_scored": n_scored})

    @staticmethod
    def _scored(trial: optuna.Trial, stage: int, result: dict[str, Any]) -> dict[str, Any]:
        """JSON-safe scores with their 95% intervals; the per-image certified outcomes go to the
        user attribute ``stage<k>_cert_bits`` (for paired comparisons and the paired pruner)."""
        from pipeline.pruning import BITS_ATTR
        from pipeline.stats import pack_bits, wilson_interval

        per_image = result.get("per_image")
        out = {k: v for k, v in result.items() if k != "per_image"}
        n = int(out.get("n", 0))
        for key in ("nat", "cert"):
            if key in out and n:
                out[f"{key}_lo"], out[f"{key}_hi"] = wilson_interval(int(out[key]), n)
        if per_image is not None:
            trial.set_user_attr(BITS_ATTR.format(stage), pack_bits(per_image["cert"].tolist()))
        return out


def _replace_device(cfg: TrainConfig, device: str) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, device=device)


def best_trial(study: optuna.Study, min_nat_acc: float) -> optuna.trial.FrozenTrial:
    """Highest validation certified accuracy among complete feasible trials: the one Optuna's
    ``study.best_trial`` and the dashboard name too (infeasible trials' values are shifted
    below every feasible one by the objective); exact ties may be broken differently there.

    Feasible: every constraint set with ``trial.set_constraint`` is <= 0 (Optuna's rule) and the
    validation natural accuracy is at or above ``min_nat_acc``. Whether the best is *better*
    than the published point is a separate, paired question: :func:`compare_to_published`.
    """
    complete = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE and VAL_CERT in t.user_attrs]
    feasible = [t for t in complete if t.user_attrs.get(VAL_NAT, 0.0) >= min_nat_acc
                and all(v <= 0 for v in t.constraints.values())]
    if not feasible:
        raise LookupError(f"study {study.study_name!r} has no complete trial with validation "
                          f"natural accuracy >= {min_nat_acc}")
    # Ties: higher natural accuracy, then the earlier trial (as analysis.report.best_trial).
    return max(feasible, key=lambda t: (t.user_attrs[VAL_CERT], t.user_attrs.get(VAL_NAT, 0.0),
                                        -t.number))


def compare_to_published(study: optuna.Study, trial: optuna.trial.FrozenTrial,
                         alpha: float = 0.05) -> dict[str, Any] | None:
    """Paired comparison of ``trial``'s final per-image certified outcomes with the published
    point's (the complete published trial with the highest score) on the same validation
    images: the difference with its 95% interval, the two-sided exact McNemar p-value and
    ``better`` (True only when the difference is positive and p < alpha). None when there is no
    complete published trial with per-image outcomes on the same images."""
    from pipeline.pruning import BITS_ATTR, stage_bits
    from pipeline.stats import paired_difference

    published = [t for t in study.get_trials(deepcopy=False)
                 if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("published")
                 and VAL_CERT in t.user_attrs]
    stages = [int(k[5:-10]) for k in trial.user_attrs if k.startswith("stage")
              and k.endswith("_cert_bits")]
    if not published or not stages:
        return None
    ref = max(published, key=lambda t: (t.user_attrs[VAL_CERT], -t.number))
    last = max(stages)
    mine, theirs = stage_bits(trial, last), stage_bits(ref, last)
    if (BITS_ATTR.format(last) not in ref.user_attrs or mine is None or theirs is None
            or len(mine) != len(theirs)
            or trial.user_attrs.get("split_hash") != ref.user_attrs.get("split_hash")):
        return None
    d = paired_difference(mine, theirs)
    return {**d, "published_trial": ref.number, "trial": trial.number,
            "better": bool(d["diff"] > 0 and d["p"] < alpha)}


def run_tuning(study_file: StudyFile, storage_url: str, n_trials: int | None = None,
               timeout: float | None = None, device: str | None = None,
               runs_dir: str | Path = "runs") -> optuna.Study:
    """Run trials until the study holds ``n_trials`` finished (complete or pruned) trials.

    Every worker runs this; together they finish exactly ``n_trials`` trials. A worker starts a
    new trial only while finished + running + queued trials are fewer than the cap (checked
    under the study lock, see :class:`CappedRDBStorage`); when the cap is reached but trials of
    other workers are still running, it waits, polling every heartbeat interval, so that it can
    take over the retry of a worker that died (its trial is failed after the grace period and
    re-queued by the heartbeat callback). It returns when the cap is met or ``timeout`` expires.
    """
    validate_layers_of(study_file)
    storage = open_storage(storage_url, study_file)
    study = create_study(study_file, storage)
    runs_dir = Path(runs_dir)
    artifacts = runs_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    store = optuna.artifacts.FileSystemArtifactStore(str(artifacts))
    study.set_user_attr("artifact_dir", str(artifacts.resolve()))
    total = n_trials or study_file.settings.n_trials
    storage.cap = total
    objective = logged(Objective(study_file, runs_dir, device, store))
    deadline = None if timeout is None else time.monotonic() + timeout
    failed = [0]
    stop_at_cap = optuna.study.MaxTrialsCallback(total, states=FINISHED_STATES)

    def count_failures(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            failed[0] += 1

    waiting_since: float | None = None
    while True:
        done = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
        if done >= total:
            log.info("study %s has %d finished trials (cap %d)", study.study_name, done, total)
            break
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            log.info("timeout: study %s has %d of %d finished trials", study.study_name, done,
                     total)
            break
        if failed[0] >= total:
            log.warning("%d trials of this worker failed; stopping it", failed[0])
            break
        try:
            study.optimize(objective, n_trials=total, timeout=remaining,
                           catch=(torch.OutOfMemoryError,),
                           callbacks=[stop_at_cap, count_failures, log_trial_end])
            waiting_since = None
        except KeyboardInterrupt:
            raise TuningInterrupted(study, RUN_STATE.interrupted) from None
        except TrialCapReached:
            running = [t.number for t in study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.info("cap of %d trials reached; waiting for running trials %s (a dead "
                         "worker's trial is failed after %d s without heartbeat and retried "
                         "here)", total, running, study_file.settings.grace_period_s)
            pause = float(study_file.settings.heartbeat_interval_s)
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            try:
                time.sleep(pause)
            except KeyboardInterrupt:
                raise TuningInterrupted(study, None) from None
    return study


# --------------------------------------------------------------------------------------------
# The run log: one line when a trial starts, at each stage's score and when it ends; Ctrl-C


def requeue_interrupted(study: optuna.Study, number: int) -> int | None:
    """Mark the stopped trial FAIL (if Ctrl-C came before Optuna did) and queue it again, as the
    heartbeat does for a dead worker's trial: the retry resumes from its last checkpoint in the
    same run folder. Returns the retry's number."""
    import warnings

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(number)
    if trial is None:
        return None
    storage = study._storage  # noqa: SLF001 (no public API for a trial by id)
    if trial.state == optuna.trial.TrialState.RUNNING:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", INTERRUPTED_REASON)
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    system_attrs = {"failed_trial": number, "retry_history": [], **trial.system_attrs}
    system_attrs["retry_history"] = [*system_attrs["retry_history"], number]
    system_attrs.pop("fixed_params", None)
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "fail_reason"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.add_trial(optuna.create_trial(
            state=optuna.trial.TrialState.WAITING, params=trial.params,
            distributions=trial.distributions, user_attrs=user_attrs, system_attrs=system_attrs,
            intermediate_values=trial.intermediate_values))
    waiting = [t.number for t in study.get_trials(deepcopy=False,
                                                   states=(optuna.trial.TrialState.WAITING,))]
    return max(waiting) if waiting else None


def tune_command(study_file: StudyFile, storage_url: str, overrides: list[str],
                 *extra: str) -> str:
    """The ``python -m pipeline.tune`` command for this study, storage and ``--set`` values."""
    words = ["python", "-m", "pipeline.tune", "--study", study_file.path,
             "--storage", redact(storage_url)]
    for item in overrides:
        words += ["--set", item]
    return shlex.join([*words, *extra])


def validate_layers_of(study_file: StudyFile) -> None:
    """The latent layers of the trial and launch configs are ReLU outputs of the network."""
    for cfg in (study_file.trial_config(study_file.published_knobs()),
                study_file.launch_config(study_file.published_knobs())):
        try:
            validate_layers(cfg, make_net(cfg))
        except ConfigError as err:
            raise ConfigError(f"{study_file.path}: {err}") from None


def check_data(study_file: StudyFile, splits: tuple[str, ...]) -> None:
    """A missing data set is found before any trial starts or the storage is touched: the
    files are looked for on disk, and only if absent loaded (that is, downloaded when allowed),
    so a failure is one DataError whose fix names this command's ``--set`` keys."""
    from pipeline.data import DataError, load_split, split_on_disk

    cfg = study_file.trial_config(study_file.published_knobs()).data
    for split in splits:
        if split_on_disk(cfg, split):
            continue
        try:
            load_split(cfg, split)
        except DataError as err:
            # pipeline.data speaks of a [train] table (pipeline.train's --set keys); a study file
            # nests the data table in [train].
            message = str(err).replace("--set data.", "--set train.data.")
            raise type(err)(f"{study_file.path}: {message}") from None


def _acc(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else "–"


def print_summary(study: optuna.Study, study_file: StudyFile, storage_url: str,
                  overrides: list[str] | tuple[str, ...] = ()) -> None:
    """The trials as a short table, the best trial and the commands that launch and show it."""
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    print(f"study {study.study_name}: {len(trials)} trials ("
          + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()) + ")")
    if trials:
        rows = [("#", "state", "val nat", "val pgd", "val cert", "95% interval", "time", "note")]
        for t in trials:
            scores = last_scores(t) or {}
            interval = "–"
            if isinstance(scores.get("n"), int) and isinstance(scores.get("cert"), int) \
                    and scores["n"] > 0:
                from pipeline.stats import wilson_interval

                lo, hi = wilson_interval(scores["cert"], scores["n"])
                interval = f"{lo:.3f}-{hi:.3f}"
            notes = []
            if t.user_attrs.get("published"):
                notes.append("published")
            if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values:
                notes.append(f"pruned after stage {max(t.intermediate_values)}")
            if t.user_attrs.get("fail_reason"):
                notes.append(str(t.user_attrs["fail_reason"])[:60])
            if "retry_of" in t.user_attrs:
                notes.append(f"retry of {t.user_attrs['retry_of']}")
            elif t.system_attrs.get("failed_trial") is not None:
                notes.append(f"queued retry of {t.system_attrs['failed_trial']}")
            rows.append((str(t.number), t.state.name.lower(), _acc(scores.get("nat_acc")),
                         _acc(scores.get("pgd_acc")), _acc(scores.get("cert_acc")), interval,
                         duration_text(t) if t.datetime_complete else "–", ", ".join(notes)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        print("  (validation scores of the last stage each trial finished; interval: Wilson "
              "95% of the certified rate)")
    floor = study_file.settings.min_nat_acc
    try:
        best = best_trial(study, floor)
        print(f"best trial: {best.number} (validation certified accuracy "
              f"{best.user_attrs[VAL_CERT]:.3f}, natural {best.user_attrs[VAL_NAT]:.3f})")
        cmp = compare_to_published(study, best)
        if cmp is not None and cmp["published_trial"] != best.number:
            verdict = "better than" if cmp["better"] else "not significantly better than"
            print(f"  {verdict} the published point (trial {cmp['published_trial']}): "
                  f"{100 * cmp['diff']:+.1f} points, 95% CI [{100 * cmp['lo']:+.1f}, "
                  f"{100 * cmp['hi']:+.1f}], paired exact McNemar p = {cmp['p']:.3g} on "
                  f"{cmp['n']} validation images")
        print("launch it:  " + tune_command(study_file, storage_url, list(overrides),
                                            "--launch-best"))
    except LookupError:
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                    and VAL_CERT in t.user_attrs]
        if not complete:
            print("best trial: none yet (no complete trial)")
        else:
            top = max(complete, key=lambda t: (t.user_attrs[VAL_CERT],
                                               t.user_attrs.get(VAL_NAT, 0.0)))
            print(f"best trial: none meets the natural-accuracy floor (study.min_nat_acc = "
                  f"{floor}); the best without it is trial {top.number} (validation certified "
                  f"accuracy {top.user_attrs[VAL_CERT]:.3f}, natural "
                  f"{top.user_attrs.get(VAL_NAT, float('nan')):.3f})")
            print("launch it anyway: " + tune_command(study_file, storage_url, list(overrides),
                                                     "--launch-best", "--trial",
                                                     str(top.number)))
    artifacts = study.user_attrs.get("artifact_dir")
    print(f"look at it: optuna-dashboard {shlex.quote(redact(storage_url))}"
          + (f" --artifact-dir {shlex.quote(artifacts)}" if artifacts else ""))


def print_launch(entry: dict[str, Any], study_name: str) -> None:
    """The outcome of a launch as a short table (the full record is the study attribute
    ``launches``)."""
    from pipeline.stats import wilson_interval

    n = entry.get("n_test") or 0
    cert = entry.get("test_cert_acc")
    interval = ""
    if n and isinstance(cert, float):
        lo, hi = wilson_interval(round(cert * n), n)
        interval = f"  (95% {lo:.3f}-{hi:.3f})"
    print(f"launch of trial {entry['trial']} ({study_name}, {entry.get('epochs_per_stage')} "
          f"epochs a stage):")
    print(f"  {'':<22}{'natural':>9}{'PGD':>9}{'certified':>11}")
    print(f"  {'validation (tuning)':<22}{_acc(entry.get('val_nat_acc')):>9}{'':>9}"
          f"{_acc(entry.get('val_cert_acc')):>11}")
    print(f"  {f'test (n={n})':<22}{_acc(entry.get('test_nat_acc')):>9}"
          f"{_acc(entry.get('test_pgd_acc')):>9}{_acc(cert):>11}{interval}")
    print(f"  results:    {entry.get('results')}")
    print(f"  checkpoint: {entry.get('checkpoint')}")


def _report_interrupt(stop: TuningInterrupted, study_file: StudyFile, storage_url: str,
                      overrides: list[str], argv: list[str]) -> None:
    study = stop.study
    if stop.trial_number is None:
        print("interrupted: no trial was running; nothing was lost", file=sys.stderr)
    else:
        retry = None
        with contextlib.suppress(Exception):
            retry = requeue_interrupted(study, stop.trial_number)
        again = (f"; queued again as trial {retry}, which resumes from its last checkpoint"
                 if retry is not None else "")
        print(f"interrupted: trial {stop.trial_number} was stopped and marked FAIL "
              f"(fail_reason: {INTERRUPTED_REASON}){again}", file=sys.stderr)
    print_summary(study, study_file, storage_url, overrides)
    print("resume with: " + shlex.join(["python", "-m", "pipeline.tune",
                                         *_redacted_args(argv)]))


def _redacted_args(argv: list[str]) -> list[str]:
    out, hide = [], False
    for word in argv:
        if hide:
            word, hide = redact(word), False
        elif word == "--storage":
            hide = True
        elif word.startswith("--storage="):
            word = "--storage=" + redact(word[len("--storage="):])
        out.append(word)
    return out


def stop_on_signals() -> None:
    """Ctrl-C, ``kill -INT`` and ``kill -TERM`` (a batch scheduler's stop) end the run the same
    clean way: the running trial is marked FAIL, queued again, and the command that resumes it
    is printed. A shell starts ``&`` jobs with SIGINT ignored, and Python then installs no
    handler of its own: it is installed here in any case."""
    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=DEFAULT_STUDY, help="study file (TOML)")
    parser.add_argument("--storage", default=os.environ.get("COLT_STORAGE", DEFAULT_STORAGE),
                        help="SQLAlchemy URL of the study database (env COLT_STORAGE)")
    parser.add_argument("--n-trials", type=int, help="total finished trials across all workers")
    parser.add_argument("--timeout", type=float, help="stop starting new trials after S seconds")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--runs-dir", default="runs", help="where run folders are written")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a study-file value, e.g. study.n_trials=5")
    parser.add_argument("--launch-best", action="store_true",
                        help="train the best trial with the launch schedule and certify the test set")
    parser.add_argument("--trial", type=int, help="with --launch-best: launch this trial instead")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.add_argument("--seeds", type=int, default=1,
                        help="with --launch-best: train with seeds train.seed+0..K-1 (default 1)")
    args = parser.parse_args(argv)
    setup_logging()
    stop_on_signals()
    import warnings

    # Heartbeat and retry are "experimental" in Optuna; the tool relies on them on purpose.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError

    if args.n_trials is not None and args.n_trials < 1:
        print("error: --n-trials must be >= 1", file=sys.stderr)
        return 2
    study_file = None
    try:
        study_file = load_study_file(args.study, args.overrides)
        validate_layers_of(study_file)  # before anything touches the storage
        check_data(study_file, ("train", "test") if args.launch_best else ("train",))
        if args.launch_best:
            from pipeline.launch import launch_seeds

            if args.seeds < 1:
                print("error: --seeds must be >= 1", file=sys.stderr)
                return 2
            for result in launch_seeds(study_file, args.storage, trial_number=args.trial,
                                       device=args.device, runs_dir=args.runs_dir,
                                       seeds=args.seeds):
                print_launch(result, study_file.settings.name)
            return 0
        study = run_tuning(study_file, args.storage, args.n_trials, args.timeout, args.device,
                           args.runs_dir)
        print_summary(study, study_file, args.storage, args.overrides)
    except (ConfigError, StorageError, CheckpointError, DataError, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TuningInterrupted as stop:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the summary finish
        try:
            _report_interrupt(stop, study_file, args.storage, args.overrides, argv)
        finally:
            signal.signal(signal.SIGINT, previous)
        return 130
    except KeyboardInterrupt:
        what = "the launch resumes where it stopped" if args.launch_best else \
            "no trial had started"
        print(f"interrupted: {what}; run again with: "
              + shlex.join(["python", "-m", "pipeline.tune", *_redacted_args(argv)]),
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # Run as ``python -m pipeline.tune`` this file is the module ``__main__``, while
    # pipeline.launch imports it again as ``pipeline.tune``: two copies of everything defined
    # here (issue 15 met two StorageError classes). Run the one copy everything else uses.
    from pipeline.tune import main as _main

    sys.exit(_main())
