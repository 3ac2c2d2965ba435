"""A tuning trial re-run from its study database alone ends with the same weights (CPU, seeded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

pytestmark = pytest.mark.slow  # end to end: a tiny study and a re-run, in subprocesses

TINY = ["--set", "trial.epochs_per_stage=1", "--set", "trial.mix_epochs=1",
        "--set", "trial.lr_step=1", "--set", "trial.data.max_train_images=200",
        "--set", "train.data.n_valid=60", "--set", "certify_val.n_inputs=60",
        "--set", "study.stage_inputs=40",
        "--set", "study.sampler=random", "--set", "study.seed=3", "--set", "study.pruner=none",
        "--set", "trial.device=cpu"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("repro")
    url = f"sqlite:///{tmp / 'study.db'}"
    out = _run(["pipeline.tune", "--study", str(root / "studies/quickstart.toml"),
                "--storage", url, "--runs-dir", str(tmp / "runs"), "--n-trials", "2", *TINY],
               root)
    assert out.returncode == 0, out.stderr[-2000:]
    study = optuna.load_study(study_name="quickstart", storage=url)
    return root, tmp, url, study


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_trial_records_resolved_config_and_validation_inputs(tuned):
    _, _, _, study = tuned
    trial = study.trials[1]  # a sampled trial (trial 0 is the queued published point)
    cfg = trial.user_attrs["train_config"]
    assert cfg["epochs_per_stage"] == 1 and cfg["data"]["max_train_images"] == 200  # --set kept
    for knob, value in trial.params.items():
        assert cfg[knob] == value  # the sampled knobs are in the resolved config
    assert trial.user_attrs["certify_val"]["n_inputs"] == 60
    val = trial.user_attrs["val_inputs"]
    assert val["n_scored"] == 60 and val["split_hash"] == trial.user_attrs["split_hash"]
    assert trial.user_attrs["budget"]["epochs"] == 3
    assert trial.user_attrs["budget"]["n_train"] == 200
    lo, hi = trial.user_attrs["val_cert_ci"]
    assert lo <= trial.user_attrs["val_cert_acc"] <= hi
    # Every stage but the last scores the first study.stage_inputs images, the last n_inputs.
    assert trial.user_attrs["stage2_cert_bits"]["n"] == 60
    assert trial.user_attrs["stage0_cert_bits"]["n"] == 40
    assert trial.user_attrs["stage1_cert_bits"]["n"] == 40
    assert val["n_scored_early_stages"] == 40
    assert len(trial.user_attrs["score_time_s"]) == len(trial.user_attrs["stage_time_s"]) == 3


def test_rerun_from_database_gives_the_same_weights(tuned):
    root, tmp, url, study = tuned
    trial = study.trials[1]
    out = _run(["pipeline.train", "--from-trial", url, "1", "--out", str(tmp / "again")], root)
    assert out.returncode == 0, out.stderr[-2000:]
    original = _weights(Path(trial.user_attrs["run_dir"]) / "last.pt")
    again = _weights(tmp / "again" / "last.pt")
    assert original.keys() == again.keys()
    for key in original:
        assert torch.equal(original[key], again[key]), key


def test_from_trial_bad_number_is_one_line(tuned):
    root, tmp, url, _ = tuned
    out = _run(["pipeline.train", "--from-trial", url, "99", "--out", str(tmp / "x")], root)
    assert out.returncode == 2
    assert "no trial 99" in out.stderr and len(out.stderr.strip().splitlines()) == 1
