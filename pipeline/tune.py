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
the run ends with a table of the trials. Ctrl-C marks the running trial FAIL (user attribute
``fail_reason``), queues it again, prints the study so far and the command that resumes it, and
exits with 130. Bad input (study file, storage URL, a missing data set) is one ``error:`` line
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
from pipeline.study import StudyFile, load_study_file
from pipeline.train import DivergedError, EpochReport, make_net, resolve_device, train, validate_layers

log = logging.getLogger(__name__)

DEFAULT_STUDY = "studies/quickstart.toml"
DEFAULT_STORAGE = "sqlite:///runs/optuna.db"
VAL_NAT, VAL_PGD, VAL_CERT = "val_nat_acc", "val_pgd_acc", "val_cert_acc"
CONSTRAINT_ATTR = "constraint"


class StorageError(RuntimeError):
    """The study storage cannot be reached or used."""


# --------------------------------------------------------------------------------------------
# Storage and study


LIVE_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
               optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
CONNECT_TIMEOUT_S = 10
LOCK_TIMEOUT_S = 300


class TrialCapReached(RuntimeError):
    """A worker may not start a new trial: finished, running and queued trials fill the cap."""


class StudyLock:
    """A lock shared by all workers of one study, held only while the study or a new trial is
    created, so that the trial cap holds exactly and the published trial is queued once.

    PostgreSQL: a transaction-level advisory lock (released when the transaction or the
    connection ends, so a killed worker never leaves it held). SQLite: ``flock`` on
    ``<db file>.lock`` (workers on one machine). Other databases: no lock; the cap may then
    overshoot by up to one trial per extra worker.
    """

    def __init__(self, url: str, name: str) -> None:
        import hashlib

        import sqlalchemy

        self.url = sqlalchemy.engine.make_url(url)
        digest = hashlib.sha256(f"colt-study:{name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self._depth = 0
        self._engine: Any = None
        self._conn: Any = None
        self._fd: int | None = None

    @property
    def kind(self) -> str:
        backend = self.url.get_backend_name()
        if backend == "sqlite" and self.url.database not in (None, "", ":memory:"):
            return "sqlite"
        return "postgresql" if backend == "postgresql" else "none"

    def __enter__(self) -> "StudyLock":
        self._depth += 1
        if self._depth > 1:
            return self
        try:
            if self.kind == "postgresql":
                import sqlalchemy

                if self._engine is None:
                    self._engine = sqlalchemy.create_engine(
                        self.url, poolclass=sqlalchemy.pool.NullPool,
                        connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
                self._conn = self._engine.connect()
                self._conn.execute(sqlalchemy.text(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'"))
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": self.key})
            elif self.kind == "sqlite":
                import fcntl

                path = Path(self.url.database)
                self._fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._depth -= 1
            self._release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._release()

    def _release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.rollback()  # ends the transaction: releases the advisory lock
            finally:
                conn.close()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # releases the flock


class CappedRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage whose new trials respect a cap shared by all workers.

    With ``cap`` set, a fresh trial (``study.ask()`` finding no queued trial) is created only
    while the study holds fewer than ``cap`` finished, running or queued trials; the count and
    the insert happen under :class:`StudyLock`, so concurrent workers never overshoot. Otherwise
    :class:`TrialCapReached` is raised and no trial is created. Queued trials (the published
    trial, heartbeat retries) are created from a template and are never refused.
    """

    cap: int | None = None
    study_lock: StudyLock | None = None

    def _create_new_trial(self, study_id: int,
                          template_trial: optuna.trial.FrozenTrial | None = None
                          ) -> optuna.trial.FrozenTrial:
        if template_trial is not None or self.cap is None:
            return super()._create_new_trial(study_id, template_trial)
        with self.study_lock or contextlib.nullcontext():
            live = self.get_n_trials(study_id, state=LIVE_STATES)
            if live >= self.cap:
                raise TrialCapReached(f"{live} finished, running or queued trials: cap "
                                      f"{self.cap} reached")
            return super()._create_new_trial(study_id, template_trial)


def open_storage(url: str, study: StudyFile, heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeat and retry of stale trials; a bad URL is one StorageError.

    Connections time out after CONNECT_TIMEOUT_S. SQLite databases are switched to WAL mode (so
    several workers on one machine can share one) and get a lock file ``<db>.lock`` next to them.
    """
    import warnings

    import sqlalchemy

    kwargs: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat:
                kwargs = dict(
                    heartbeat_interval=study.settings.heartbeat_interval_s,
                    grace_period=study.settings.grace_period_s,
                    heartbeat_stale_trial_callback=(
                        optuna.storages.RetryHeartbeatStaleTrialCallback(
                            max_retry=study.settings.max_retry,
                            inherit_intermediate_values=True)),
                )
            parsed = sqlalchemy.engine.make_url(url)
            backend = parsed.get_backend_name()
            if backend == "sqlite":
                engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
            else:
                engine_kwargs = {"pool_pre_ping": True}
                if backend in ("postgresql", "mysql", "mariadb"):
                    engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
            lock = StudyLock(url, study.settings.name)
            if lock.kind == "sqlite":
                db_path = Path(parsed.database)
                try:
                    if not db_path.parent.exists():
                        db_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(f"{db_path}.lock", "a"):
                        pass
                except OSError as err:
                    raise StorageError(f"storage {redact(url)} cannot be used: cannot create "
                                       f"files in {db_path.parent} ({err.strerror})") from None
            with lock:  # concurrent workers must not race on table and study creation
                if lock.kind == "sqlite":
                    _sqlite_wal(Path(parsed.database))
                storage = CappedRDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except StorageError:
        raise
    except Exception as err:  # sqlalchemy / driver / OS errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(f"storage {redact(url)} cannot be used: {first[:300]}") from None
    storage.study_lock = lock
    return storage


def _sqlite_wal(path: Path) -> None:
    """WAL journal: readers do not block the writer, so workers rarely wait on each other. The
    mode is stored in the database file, so setting it once is enough."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=60)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


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


def original_trial_number(study: optuna.Study, trial: optuna.Trial) -> int:
    """A retried trial resumes in its original trial's run folder."""
    import warnings

    frozen = study._storage.get_trial(trial._trial_id)  # noqa: SLF001 (public API lacks it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        original = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return trial.number if original is None else original


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
            raise TuningInterrupted(study, _RUN.interrupted) from None
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


_RUN = _RunState()


def logged(objective: Any) -> Any:
    """The objective with the trial number as log prefix and Ctrl-C recorded as the trial's
    ``fail_reason`` (Optuna then marks it FAIL and re-raises)."""

    def run(trial: optuna.Trial) -> Any:
        _RUN.trial, _RUN.interrupted = trial.number, None
        try:
            return objective(trial)
        except KeyboardInterrupt:
            _RUN.interrupted = trial.number
            with contextlib.suppress(Exception):  # a second Ctrl-C or a lost connection
                trial.set_user_attr("fail_reason", INTERRUPTED_REASON)
            raise
        finally:
            _RUN.trial = None

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


def _duration(trial: optuna.trial.FrozenTrial) -> str:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return "–"
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def log_trial_end(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Study callback: the trial's state, score and time in one line."""
    scores = last_scores(trial)
    if trial.state == optuna.trial.TrialState.FAIL:
        what = trial.user_attrs.get("fail_reason") or "an error, see above"
        log.info("trial %d finished: FAIL (%s) after %s", trial.number, what, _duration(trial))
        return
    where = ""
    if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
        where = f" after stage {max(trial.intermediate_values)}"
    log.info("trial %d finished: %s%s, %s, in %s", trial.number, trial.state.name, where,
             score_text(scores) if scores else "no score", _duration(trial))


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
        record.trial = f"trial {_RUN.trial}: " if _RUN.trial is not None else ""
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
                         _duration(t) if t.datetime_complete else "–", ", ".join(notes)))
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
    # pipeline.launch imports it again as ``pipeline.tune``: two copies with two StorageError
    # classes, and main() here would not catch the one launch raises. Run that module's main.
    from pipeline.tune import main as _main

    sys.exit(_main())
