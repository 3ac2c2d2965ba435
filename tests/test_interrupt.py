"""What a user sees from ``python -m pipeline.tune``: Ctrl-C in the middle of a trial (a real
process and a real SIGINT), the run log, the summary when no trial meets the natural-accuracy
floor, and the table a launch ends with."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import poll_process

from pipeline.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "quickstart.toml"
# Enough work per trial that SIGINT lands inside it; little enough for a quick test.
TINY = ["--set", "study.name=ctrl_c", "--set", "trial.epochs_per_stage=2",
        "--set", "trial.mix_epochs=1", "--set", "certify_val.n_inputs=30",
        "--set", "certify_val.slope_iters=5", "--set", "certify_val.pgd_steps=5"]
WAIT_LIMIT_S = 600  # generous: a busy shared machine; the condition ends the wait


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def states(db: Path) -> dict[int, str]:
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            return dict(conn.execute("SELECT number, state FROM trials").fetchall())
    except sqlite3.OperationalError:  # tables not created yet
        return {}


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    poll_process(condition, proc, what, WAIT_LIMIT_S, proc.stdout.read, 0.1, "pipeline.tune")


@pytest.mark.slow
@pytest.mark.timeout(3 * WAIT_LIMIT_S)  # a hang guard: each wait polls for its condition
def test_ctrl_c_marks_the_trial_failed_and_says_how_to_resume(tmp_path: Path) -> None:
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    args = ["--study", str(STUDY), "--storage", url, "--runs-dir", str(tmp_path / "runs"),
            "--n-trials", "1", *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.tune", *args], cwd=tmp_path,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # In training: the trial is RUNNING and has written its first epoch's checkpoint.
    last = tmp_path / "runs" / "ctrl_c" / "trial_0" / "last.pt"
    wait_for(lambda: states(db).get(0) == "RUNNING" and last.exists(), proc, "running trial")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WAIT_LIMIT_S)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    interrupted = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(interrupted) == 1, err
    assert "trial 0 was stopped and marked FAIL" in interrupted[0]
    # The reason is in the database, and the stopped trial is queued to resume.
    study = optuna.load_study(study_name="ctrl_c", storage=url)
    first, retry = study.get_trials()
    assert first.state == optuna.trial.TrialState.FAIL
    assert first.user_attrs["fail_reason"] == "interrupted by the user (Ctrl-C)"
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == first.params
    assert "fail_reason" not in retry.user_attrs and retry.user_attrs.get("published") is True
    # The summary so far and the command that resumes it (the same command).
    assert "study ctrl_c: 2 trials (1 fail, 1 waiting)" in out, out
    (resume,) = [ln for ln in out.splitlines() if ln.startswith("resume with: ")]
    assert resume.removeprefix("resume with: ").split() == [
        "python", "-m", "pipeline.tune", *args]
    # It does resume: the retry continues trial 0's run folder from its checkpoint.
    done = subprocess.run([sys.executable, "-m", "pipeline.tune", *args], cwd=tmp_path,
                          env=env(), capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr and "resumes trial 0" in done.stderr
    # The run log: start (number, knobs), a score per stage with its interval, the end.
    log = done.stderr
    assert re.search(r"INFO trial 1: started \(published hyperparameters, resumes trial 0\): "
                     r"batch_size=50, eps_initial_factor=1\.15", log), log[-3000:]
    scored = re.findall(r"trial 1: stage (\d) scored: val cert (\d\.\d{3}) \(95% "
                        r"(\d\.\d{3})-(\d\.\d{3}), n=30\), nat \d\.\d{3}, pgd \d\.\d{3}", log)
    assert [int(m[0]) for m in scored] == [0, 1, 2], log[-3000:]
    assert all(float(lo) <= float(c) <= float(hi) for _, c, lo, hi in scored)
    assert re.search(r"INFO trial 1 finished: COMPLETE, val cert \d\.\d{3} \(95% [^)]*\), nat .*, in \d+ s",
                     log), log[-3000:]
    epochs = [ln for ln in log.splitlines() if re.search(r"trial 1: stage \d epoch \d:", ln)]
    assert epochs and all(len(ln.split(": ", 2)[-1].split(", ")) <= 5 for ln in epochs), epochs
    study = optuna.load_study(study_name="ctrl_c", storage=url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL,
                                         optuna.trial.TrialState.COMPLETE]
    assert trials[1].user_attrs["retry_of"] == 0
    assert Path(trials[1].user_attrs["run_dir"]).name == "trial_0"


@pytest.mark.slow
@pytest.mark.timeout(3 * WAIT_LIMIT_S)
@pytest.mark.parametrize("sig,reason", [(signal.SIGINT, "interrupted by the user (Ctrl-C)"),
                                        (signal.SIGTERM, "stopped by SIGTERM")])
def test_background_run_stops_cleanly_on_int_and_term(tmp_path: Path, sig, reason) -> None:
    """Started as a shell's ``&`` job (SIGINT ignored) and stopped by ``kill -INT`` or by a
    scheduler's ``kill -TERM``: the trial is marked FAIL with the reason and queued again."""
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    args = ["--study", str(STUDY), "--storage", url, "--runs-dir", str(tmp_path / "runs"),
            "--n-trials", "1", *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.tune", *args], cwd=tmp_path,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    last = tmp_path / "runs" / "ctrl_c" / "trial_0" / "last.pt"
    wait_for(lambda: states(db).get(0) == "RUNNING" and last.exists(), proc, "running trial")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=WAIT_LIMIT_S)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err
    first, retry = optuna.load_study(study_name="ctrl_c", storage=url).get_trials()
    assert first.state == optuna.trial.TrialState.FAIL
    assert first.user_attrs["fail_reason"] == reason
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == first.params


def test_summary_when_no_trial_meets_the_floor(capsys: pytest.CaptureFixture) -> None:
    from pipeline.study import load_study_file
    from pipeline.tune import VAL_CERT, VAL_NAT, print_summary

    study_file = load_study_file(STUDY, ["study.min_nat_acc=0.9"])
    study = optuna.create_study(study_name="floor", direction="maximize")
    dist = {"l1_reg": optuna.distributions.FloatDistribution(1e-7, 1e-3, log=True)}
    for l1, nat, cert in ((1e-5, 0.80, 0.40), (1e-4, 0.85, 0.55), (1e-6, 0.70, 0.30)):
        scores = {"n": 200, "nat": int(nat * 200), "cert": int(cert * 200), "nat_acc": nat,
                  "pgd_acc": cert, "cert_acc": cert}
        study.add_trial(optuna.create_trial(
            params={"l1_reg": l1}, distributions=dist, value=cert,
            user_attrs={VAL_NAT: nat, VAL_CERT: cert, "stage2_val": scores}))
    print_summary(study, study_file, "sqlite:///x.db", ["study.min_nat_acc=0.9"])
    out = capsys.readouterr().out
    assert "none meets the natural-accuracy floor (study.min_nat_acc = 0.9)" in out
    assert "the best without it is trial 1" in out
    (launch,) = [ln for ln in out.splitlines() if ln.startswith("launch it anyway: ")]
    assert launch.endswith("--launch-best --trial 1") and "--set study.min_nat_acc=0.9" in launch
    lo, hi = wilson_interval(110, 200)
    assert f"{lo:.3f}-{hi:.3f}" in out  # trial 1's certified rate, with its interval


def test_wilson_interval() -> None:
    # Properties that hold for any n: inside [0, 1], around the rate, narrower with more data.
    for k, n in ((0, 10), (3, 10), (10, 10), (157, 300), (1, 1)):
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    a, b = wilson_interval(30, 100), wilson_interval(300, 1000)
    assert b[1] - b[0] < a[1] - a[0]
    # The textbook value (Wilson 1927 / Newcombe 1998, example 81 of 263): 0.2553-0.3662.
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    # A wider level gives a wider interval; symmetric in successes and failures.
    assert wilson_interval(30, 100, z=2.58)[0] < wilson_interval(30, 100)[0]
    lo, hi = wilson_interval(30, 100)
    assert wilson_interval(70, 100) == pytest.approx((1 - hi, 1 - lo))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_launch_prints_a_table(capsys: pytest.CaptureFixture) -> None:
    from pipeline.tune import print_launch

    print_launch({"trial": 3, "val_nat_acc": 0.9, "val_cert_acc": 0.5, "test_nat_acc": 0.875,
                  "test_pgd_acc": 0.75, "test_cert_acc": 0.625, "n_test": 8,
                  "results": "runs/q/launch_trial3/certify_test.jsonl",
                  "checkpoint": "runs/q/launch_trial3/last.pt", "epochs_per_stage": 6,
                  "params": {"l1_reg": 1e-5}}, "q")
    out = capsys.readouterr().out
    assert "{" not in out  # not a raw dict
    lines = out.splitlines()
    assert lines[0] == "launch of trial 3 (q, 6 epochs a stage):"
    assert lines[1].split() == ["natural", "PGD", "certified"]
    assert lines[2].split() == ["validation", "(tuning)", "0.900", "0.500"]
    lo, hi = wilson_interval(5, 8)
    assert lines[3].split()[:5] == ["test", "(n=8)", "0.875", "0.750", "0.625"]
    assert f"(95% {lo:.3f}-{hi:.3f})" in lines[3]
    assert "certify_test.jsonl" in lines[4] and "last.pt" in lines[5]
