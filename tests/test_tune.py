"""End to end: a real quickstart-sized study (training, certification, pruning), a launch, and
optuna-dashboard reading the database over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from pipeline.study import load_study_file
from pipeline.storage import open_storage
from pipeline.tune import VAL_CERT, VAL_NAT, VAL_PGD, create_study

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--set", "study.name=e2e",
    "--set", "study.pruner=median",  # the median pruner stops POOR (the paired one needs >= 100 images)
    "--set", "trial.epochs_per_stage=2",
    "--set", "trial.mix_epochs=1",
    "--set", "certify_val.n_inputs=60",
    "--set", "certify_val.slope_iters=5",
]
LAUNCH = [
    "--set", "launch.epochs_per_stage=2",
    "--set", "launch.mix_epochs=1",
    "--set", "launch.lr_step=1",
    "--set", "certify_test.n_inputs=12",
    "--set", "certify_test.pgd_restarts=1",
    "--set", "certify_test.pgd_steps=20",
    "--set", "certify_test.slope_iters=20",
    "--set", "certify_test.timeout_per_input_s=5.0",
]
# Heavy L1 and a huge stability weight: a deliberately poor trial that the median pruner stops
# after its first stage, deterministically (seeded CPU training).
POOR = {"batch_size": 50, "eps_initial_factor": 1.6, "eps_decay_factor": 1.0, "l1_reg": 1e-3,
        "relu_stable": 5e-2, "relu_stable_factor": 2.0}


# Hang guards only (pytest-timeout counts the module fixture's tuning run into the first test):
# far above the few minutes these take on a quiet 2-core machine, so a busy one never trips them.
HANG_GUARD_S = 3600
pytestmark = pytest.mark.timeout(HANG_GUARD_S)


def run_cli(*args: str, cwd: Path, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pipeline.tune",
                           "--study", str(ROOT / "studies" / "quickstart.toml"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("tune")
    url = f"sqlite:///{work / 'optuna.db'}"
    study_file = load_study_file(ROOT / "studies" / "quickstart.toml", TINY[1::2])
    study = create_study(study_file, open_storage(url, study_file))
    study.enqueue_trial(POOR)  # trial 1, after the published trial 0
    result = run_cli("--storage", url, "--n-trials", "3", *TINY, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"work": work, "url": url, "stdout": result.stdout}


@pytest.mark.slow
def test_study_records_trials(tuned: dict) -> None:
    study = optuna.load_study(study_name="e2e", storage=tuned["url"])
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 3
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 1
    first = trials[0]
    assert first.user_attrs.get("published") is True
    assert first.params == load_study_file(ROOT / "studies" / "quickstart.toml").published_knobs()
    assert trials[1].state == optuna.trial.TrialState.PRUNED
    assert trials[1].params["l1_reg"] == POOR["l1_reg"]
    for t in trials:
        assert set(t.params) == set(POOR)
        assert Path(t.user_attrs["run_dir"]).name == f"trial_{t.number}"
        assert len(t.user_attrs["split_hash"]) == 16
        assert t.user_attrs["env"]["versions"]["torch"]
        assert 0 in t.intermediate_values  # reported at the end of stage 0
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert 0 <= t.user_attrs[VAL_CERT] <= t.user_attrs[VAL_PGD] <= t.user_attrs[VAL_NAT]
            # Infeasible trials (below the natural floor) are shifted below every feasible one.
            feasible = t.user_attrs[VAL_NAT] >= 0.5
            assert t.value == t.user_attrs[VAL_CERT] - (0.0 if feasible else 1.0)
            assert sorted(t.intermediate_values) == [0, 1, 2]
            assert len(t.user_attrs["stage_time_s"]) == 3
            metas = optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)
            assert len(metas) == 1
    assert "best trial:" in tuned["stdout"] and "optuna-dashboard" in tuned["stdout"]


@pytest.mark.slow
def test_launch_best_writes_back(tuned: dict) -> None:
    result = run_cli("--storage", tuned["url"], "--launch-best", *TINY, *LAUNCH,
                     cwd=tuned["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    # It ends with a short table, not a raw dict.
    assert "launch of trial" in result.stdout and "{'" not in result.stdout, result.stdout
    study = optuna.load_study(study_name="e2e", storage=tuned["url"])
    (launch,) = study.user_attrs["launches"]
    assert launch["n_test"] == 12
    assert 0 <= launch["test_cert_acc"] <= launch["test_pgd_acc"] <= launch["test_nat_acc"] <= 1
    lines = Path(launch["results"]).read_text().splitlines()
    assert len(lines) == 12
    records = [json.loads(line) for line in lines]
    certified = sum(r["status"] == "certified" for r in records)
    assert launch["test_cert_acc"] == pytest.approx(certified / 12)
    # Running it again resumes (nothing left to do) and keeps one entry per trial.
    again = run_cli("--storage", tuned["url"], "--launch-best", *TINY, *LAUNCH, cwd=tuned["work"])
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="e2e", storage=tuned["url"])
    assert len(study.user_attrs["launches"]) == 1
    assert study.user_attrs["launches"][0]["test_cert_acc"] == launch["test_cert_acc"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_dashboard_serves_the_study(tuned: dict) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from optuna_dashboard._cli import main; main()", tuned["url"],
         "--host", "127.0.0.1",
         "--port", str(port), "--artifact-dir", str(tuned["work"] / "runs" / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600  # generous: the server starts in seconds
        while True:
            try:
                studies = _get_json(f"{base}/api/studies")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        (summary,) = [s for s in studies["study_summaries"] if s["study_name"] == "e2e"]
        detail = _get_json(f"{base}/api/studies/{summary['study_id']}")
        study = optuna.load_study(study_name="e2e", storage=tuned["url"])
        by_number = {t["number"]: t for t in detail["trials"]}
        assert sorted(by_number) == [t.number for t in study.get_trials()]
        for t in study.get_trials():
            served = by_number[t.number]
            assert served["state"].lower() == t.state.name.lower()
            steps = {iv["step"]: iv["value"] for iv in served["intermediate_values"]}
            assert steps == pytest.approx(t.intermediate_values)
            attrs = {a["key"]: a["value"] for a in served["user_attrs"]}
            assert "run_dir" in attrs
            if t.state == optuna.trial.TrialState.COMPLETE:
                assert len(served["artifacts"]) == 1
    finally:
        server.terminate()
        server.wait(timeout=30)
