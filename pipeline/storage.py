"""The study database: ``open_storage(url, study)`` gives an Optuna RDB storage (SQLite in WAL
mode or PostgreSQL) with heartbeats, retries of dead workers' trials, a trial cap shared by all
workers (:class:`CappedRDBStorage`) and a study lock (:class:`StudyLock`); a URL that cannot be
used is one :class:`StorageError`.

    storage = open_storage("sqlite:///runs/optuna.db", load_study_file("studies/quickstart.toml"))

Nothing to run on its own: ``python -m pipeline.tune`` uses it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import optuna

from pipeline.study import StudyFile

class StorageError(RuntimeError):
    """The study storage cannot be reached or used."""


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


def original_trial_number(study: optuna.Study, trial: optuna.Trial) -> int:
    """A retried trial resumes in its original trial's run folder."""
    import warnings

    frozen = study._storage.get_trial(trial._trial_id)  # noqa: SLF001 (public API lacks it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        original = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return trial.number if original is None else original
