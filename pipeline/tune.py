"""Optuna tuning of COLT: ``python -m pipeline.tune``.

    python -m pipeline.tune                                   # studies/quickstart.toml, offline
    python -m pipeline.tune --study studies/mnist_0.1.toml --storage sqlite:///runs/optuna.db
    python -m pipeline.tune --study studies/mnist_0.1.toml --launch-best [--trial N]
    optuna-dashboard sqlite:///runs/optuna.db

Each trial trains on the training set minus the validation split with the study's per-trial budget,
reports the validation certified accuracy at the end of every stage (so pruners stop weak trials at
stage boundaries) and records its scores, run folder, split and environment as user attributes and
its final checkpoint as an artifact. Several workers are the same command started again against the
same storage; a heartbeat marks the trials of dead workers failed and re-queues them, and the retry
resumes from the dead trial's last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
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


def score(net: Any, loader: Any, cfg: TrainConfig, study: StudyFile) -> dict[str, float]:
    """Validation accuracies: natural, PGD and certified by the cascade's cheap stages."""
    from pipeline.certify.cascade import certified_accuracy

    c = study.certify_val
    return certified_accuracy(net, loader, cfg.eps, c, max_inputs=c.n_inputs or None,
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
            try:
                scores.update(self._scored(trial, report.stage,
                                           score(report.net, loaders.valid, cfg, study)))
            finally:
                set_rng_state(rng)
            report.net.train()
            trial.set_user_attr("stage_time_s", stage_times)
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
        trial.set_user_attr("train_config", to_dict(cfg))
        trial.set_user_attr("certify_val", to_dict(c))
        trial.set_user_attr("val_inputs", {
            "split_seed": split.seed if split is not None else None,
            "split_hash": split.hash if split is not None else None,
            "n_valid": n_split, "n_scored": n_scored,
            "subset": f"the first {n_scored} of the split's validation indices, in split order"})
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
    objective = Objective(study_file, runs_dir, device, store)
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
                           callbacks=[stop_at_cap, count_failures])
            waiting_since = None
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
            time.sleep(pause)
    return study


def validate_layers_of(study_file: StudyFile) -> None:
    """The latent layers of the trial and launch configs are ReLU outputs of the network."""
    for cfg in (study_file.trial_config(study_file.published_knobs()),
                study_file.launch_config(study_file.published_knobs())):
        try:
            validate_layers(cfg, make_net(cfg))
        except ConfigError as err:
            raise ConfigError(f"{study_file.path}: {err}") from None


def print_summary(study: optuna.Study, study_file: StudyFile, storage_url: str) -> None:
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    print(f"study {study.study_name}: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()))
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            print(f"  trial {t.number}: val nat {t.user_attrs.get(VAL_NAT, float('nan')):.3f} "
                  f"pgd {t.user_attrs.get(VAL_PGD, float('nan')):.3f} "
                  f"cert {t.user_attrs.get(VAL_CERT, float('nan')):.3f}  {t.params}")
    try:
        best = best_trial(study, study_file.settings.min_nat_acc)
        print(f"best trial: {best.number} (validation certified accuracy "
              f"{best.user_attrs[VAL_CERT]:.3f}, natural {best.user_attrs[VAL_NAT]:.3f})")
        cmp = compare_to_published(study, best)
        if cmp is not None and cmp["published_trial"] != best.number:
            verdict = "better than" if cmp["better"] else "not significantly better than"
            print(f"  {verdict} the published point (trial {cmp['published_trial']}): "
                  f"{100 * cmp['diff']:+.1f} points, 95% CI [{100 * cmp['lo']:+.1f}, "
                  f"{100 * cmp['hi']:+.1f}], paired exact McNemar p = {cmp['p']:.3g} on "
                  f"{cmp['n']} validation images")
        print(f"launch it:  python -m pipeline.tune --study {study_file.path} "
              f"--storage {redact(storage_url)} --launch-best")
    except LookupError as err:
        print(err)
    artifacts = study.user_attrs.get("artifact_dir")
    print(f"look at it: optuna-dashboard {redact(storage_url)}"
          + (f" --artifact-dir {artifacts}" if artifacts else ""))


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
    parser.add_argument("--seeds", type=int, default=1,
                        help="with --launch-best: train with seeds train.seed+0..K-1 (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    # Heartbeat and retry are "experimental" in Optuna; the tool relies on them on purpose.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError

    if args.n_trials is not None and args.n_trials < 1:
        print("error: --n-trials must be >= 1", file=sys.stderr)
        return 2
    try:
        study_file = load_study_file(args.study, args.overrides)
        validate_layers_of(study_file)  # before anything touches the storage
        if args.launch_best:
            from pipeline.launch import launch_seeds

            if args.seeds < 1:
                print("error: --seeds must be >= 1", file=sys.stderr)
                return 2
            for result in launch_seeds(study_file, args.storage, trial_number=args.trial,
                                       device=args.device, runs_dir=args.runs_dir,
                                       seeds=args.seeds):
                print({k: v for k, v in result.items() if not k.endswith("_bits")
                       and k not in ("train_config", "certify_test")})
            return 0
        study = run_tuning(study_file, args.storage, args.n_trials, args.timeout, args.device,
                           args.runs_dir)
        print_summary(study, study_file, args.storage)
    except (ConfigError, StorageError, CheckpointError, DataError, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
