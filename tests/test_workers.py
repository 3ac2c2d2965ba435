"""Many tuning workers on one study: the trial cap holds exactly, nothing is lost, and a worker
killed mid-trial is failed by the heartbeat, retried and resumed from its last checkpoint.

Real ``python -m pipeline.tune`` processes on the quickstart study with a tiny budget. The
PostgreSQL tests need ``COLT_TEST_POSTGRES_URL`` (CI starts a cluster with ``.ci/postgres.sh``);
they are skipped, with that reason, only when it is unset.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import poll_process

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "quickstart.toml"
PG_URL = os.environ.get("COLT_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(
    not PG_URL, reason="COLT_TEST_POSTGRES_URL is not set (CI sets it after starting PostgreSQL "
                       "with .ci/postgres.sh; see README 'Many workers and PostgreSQL')")
# One stage epoch per trial and a cheap latent attack: a trial takes a few seconds on one core.
TINY = [
    "--set", "trial.epochs_per_stage=1",
    "--set", "trial.n_rand_proj=10",
    "--set", "certify_val.n_inputs=30",
    "--set", "certify_val.pgd_steps=5",
    "--set", "study.heartbeat_interval_s=2",
    "--set", "study.grace_period_s=6",
]
pytestmark = pytest.mark.timeout(2 * 1800)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# A hang guard, not a speed requirement: workers on a busy 2-core machine can be slow.
PROCESS_TIMEOUT_S = 1800


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def spawn(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with log.open("w") as fh:
        return subprocess.Popen([sys.executable, "-m", "pipeline.tune", "--study", str(STUDY),
                                 *args], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"worker did not finish in {PROCESS_TIMEOUT_S} s:\n"
                        f"{log.read_text()[-3000:]}")
        assert proc.returncode == 0, log.read_text()[-3000:]


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def check_exact(study: optuna.Study, n: int, cwd: Path, allow_fail: bool = False) -> None:
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    states = {t.number: t.state.name for t in trials}
    assert len(numbers) == len(set(numbers)), numbers
    assert sorted(numbers) == list(range(len(numbers))), numbers
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == n, states
    leftover = [t.number for t in trials if t.state in (optuna.trial.TrialState.RUNNING,
                                                       optuna.trial.TrialState.WAITING)]
    assert not leftover, f"trials left running or queued: {states}"
    if not allow_fail:
        assert not any(t.state == optuna.trial.TrialState.FAIL for t in trials), states
    for t in finished:
        run_dir = t.user_attrs.get("run_dir")
        assert run_dir, f"trial {t.number} has no run_dir"
        assert (cwd / run_dir / "last.pt").is_file(), run_dir
    # The published trial was queued once (a retry copies the user attributes of its original).
    assert sum(bool(t.user_attrs.get("published")) for t in finished) == 1


def three_workers(url: str, tmp_path: Path, n_trials: int = 6) -> tuple[optuna.Study, list[str]]:
    name = unique("workers")
    args = ["--storage", url, "--n-trials", str(n_trials), "--set", f"study.name={name}", *TINY]
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = [spawn(args, tmp_path, log) for log in logs]
    wait_all(procs, logs)
    study = load(url, name)
    check_exact(study, n_trials, tmp_path)
    return study, [log.read_text() for log in logs]


def overlapping(study: optuna.Study) -> int:
    """How many pairs of trials ran at the same time (the workers really were concurrent)."""
    spans = [(t.datetime_start, t.datetime_complete) for t in study.get_trials(deepcopy=False)]
    return sum(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for b0, b1 in spans[i + 1:])


@pytest.mark.slow
@needs_postgres
def test_three_workers_postgres_finish_exactly_n_trials(tmp_path: Path) -> None:
    study, logs = three_workers(PG_URL, tmp_path)
    print(f"postgres: {overlapping(study)} overlapping trial pairs")


@pytest.mark.slow
def test_three_workers_sqlite_finish_exactly_n_trials(tmp_path: Path) -> None:
    """SQLite (WAL mode, 60 s busy timeout, a lock file for the cap) takes several workers on
    one machine without 'database is locked' failures."""
    study, logs = three_workers(f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path)
    for log in logs:
        assert "database is locked" not in log
    assert (tmp_path / "optuna.db.lock").exists()
    import sqlite3

    with sqlite3.connect(tmp_path / "optuna.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    print(f"sqlite: {overlapping(study)} overlapping trial pairs")


# ---------------------------------------------------------------------------------------------
# The cap under contention: processes that do nothing but ask for trials at the same moment.

ASK_SCRIPT = """
import sys, time
from pipeline.study import load_study_file
from pipeline.storage import TrialCapReached, open_storage
from pipeline.tune import create_study
from pathlib import Path
url, name, cap, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
study_file = load_study_file(sys.argv[5], [f"study.name={name}", "study.sampler=random"])
print("ready", flush=True)
while not go.exists():  # all processes create the study and ask at the same moment
    time.sleep(0.001)
storage = open_storage(url, study_file, heartbeat=False)
study = create_study(study_file, storage)
storage.cap = cap
n = 0
while True:
    try:
        trial = study.ask()
    except TrialCapReached:
        break
    study.tell(trial, 0.5)
    n += 1
print(n)
"""


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_trial_cap_is_exact_under_concurrent_asks(tmp_path: Path, backend: str) -> None:
    if backend == "postgresql":
        if not PG_URL:
            pytest.skip(needs_postgres.kwargs["reason"])
        url = PG_URL
    else:
        url = f"sqlite:///{tmp_path / 'cap.db'}"
    name, cap, n_procs = unique("cap"), 24, 4
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", ASK_SCRIPT, url, name, str(cap), str(go),
                               str(STUDY)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n_procs)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
    go.touch()
    counts = []
    for proc in procs:
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
        assert proc.returncode == 0, err[-3000:]
        counts.append(int(out.split()[-1]))
    study = load(url, name)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == cap and sum(counts) == cap, counts
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sum(bool(t.user_attrs.get("published")) for t in trials) == 1
    assert sorted(t.number for t in trials) == list(range(cap))


def test_cap_refuses_fresh_trials_but_not_queued_ones(tmp_path: Path) -> None:
    from pipeline.study import load_study_file
    from pipeline.storage import TrialCapReached, open_storage
    from pipeline.tune import create_study

    study_file = load_study_file(STUDY, ["study.name=capunit"])
    storage = open_storage(f"sqlite:///{tmp_path / 'x.db'}", study_file, heartbeat=False)
    study = create_study(study_file, storage)  # queues the published trial
    storage.cap = 2
    first = study.ask()  # the queued published trial
    assert first.user_attrs.get("published") is True
    study.ask()  # a fresh one: 2 live trials
    with pytest.raises(TrialCapReached):
        study.ask()
    assert len(study.trials) == 2  # nothing was created by the refused ask
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # a failed trial frees its slot
    study.ask()
    study.enqueue_trial({"batch_size": 25})  # queued trials (retries) are never refused
    assert len(study.trials) == 4


# ---------------------------------------------------------------------------------------------
# Crash recovery.


def stage0_saved(run_dir: Path) -> bool:
    """stage0.pt and then last.pt of the stage's end are written (the trainer writes the stage
    file first; a kill between the two writes would repeat the stage's last epoch)."""
    stage0, last = run_dir / "stage0.pt", run_dir / "last.pt"
    try:
        return last.stat().st_mtime_ns >= stage0.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def wait_until(ready, proc: subprocess.Popen, log: Path, what: str,
               timeout: float = PROCESS_TIMEOUT_S) -> None:
    poll_process(ready, proc, what, timeout, log.read_text, 0.02, "worker")


@pytest.mark.slow
@needs_postgres
def test_killed_worker_is_retried_and_resumes(tmp_path: Path) -> None:
    name = unique("crash")
    # Two epochs per stage and the full latent attack: a stage lasts seconds, so the kill lands
    # inside the trial; no pruner, so both trials complete.
    args = ["--storage", PG_URL, "--n-trials", "2", "--set", f"study.name={name}",
            "--set", "study.pruner=none", *TINY, "--set", "trial.epochs_per_stage=2",
            "--set", "trial.n_rand_proj=50"]
    run0 = tmp_path / "runs" / name / "trial_0"
    first = spawn(args, tmp_path, tmp_path / "a.log")
    wait_until(lambda: stage0_saved(run0), first, tmp_path / "a.log", "stage 0 checkpoint")
    first.send_signal(signal.SIGKILL)
    killed_at = datetime.datetime.now()
    first.wait()
    stage0_mtime = (run0 / "stage0.pt").stat().st_mtime_ns
    metrics_before = (run0 / "metrics.jsonl").read_text().splitlines()
    assert len(metrics_before) == 2  # both epochs of stage 0, nothing of stage 1

    study = load(PG_URL, name)
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # nobody has noticed yet
    second = spawn(args, tmp_path, tmp_path / "b.log")
    wait_all([second], [tmp_path / "b.log"])

    study = load(PG_URL, name)
    check_exact(study, 2, tmp_path, allow_fail=True)
    trials = study.get_trials(deepcopy=False)
    dead = trials[0]
    assert dead.state == optuna.trial.TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["retry_of"] == 0
    assert retry.params == dead.params
    assert Path(retry.user_attrs["run_dir"]) == Path("runs") / name / "trial_0"
    assert [t.state for t in trials].count(optuna.trial.TrialState.FAIL) == 1
    # Failed through the heartbeat: not before the grace period after the last heartbeat.
    grace, interval = 6, 2
    failed_after = (dead.datetime_complete - killed_at).total_seconds()
    assert failed_after >= grace - interval - 1, failed_after
    # ... and by the restarted worker (at its first trial start or, busy, at its next one); the
    # retry starts after the dead trial was marked FAIL.
    retry_after = (retry.datetime_start - killed_at).total_seconds()
    assert retry_after >= failed_after, (retry_after, failed_after)
    # Resumed, not restarted: stage 0 was not trained again.
    assert (run0 / "stage0.pt").stat().st_mtime_ns == stage0_mtime
    metrics = (run0 / "metrics.jsonl").read_text().splitlines()
    assert metrics[:2] == metrics_before
    assert [json.loads(m)["global_epoch"] for m in metrics] == list(range(6))
    assert "resuming" in (tmp_path / "b.log").read_text()
    assert sorted(retry.intermediate_values) == [1, 2] or sorted(retry.intermediate_values) == [
        0, 1, 2]
    print(f"kill -> trial marked FAIL: {failed_after:.1f} s; kill -> retry started: "
          f"{retry_after:.1f} s")
