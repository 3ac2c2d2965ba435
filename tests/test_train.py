"""Tests of pipeline.train: κ and LR schedules, prefix freezing, resumable checkpoints, metrics,
the command line, and a real COLT-vs-natural certified-accuracy acceptance run on digits.

Every run is tiny (digits 8x8, fc_32_32 / convmed_1_1_16, 2-3 epochs per stage, batch 50) and runs
on the CPU with one torch thread (the ``one_thread`` fixture of conftest.py; subprocesses get
``OMP_NUM_THREADS=1``), so that in-process and subprocess runs are bitwise comparable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError, TrainConfig, load_train_config, to_dict
from pipeline.data import make_loaders
from pipeline.evaluate import evaluate
from pipeline.train import (
    EpochReport,
    freeze_prefix,
    kappa_at,
    load_trained_net,
    lr_at,
    make_net,
    train,
)

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "studies" / "quickstart.toml"

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKPOINT_KEYS = {"config", "stage", "epoch", "global_step", "model", "optimizer", "rng"}
METRIC_KEYS = {"stage", "epoch", "lr", "eps", "kappa", "loss", "nat_acc", "adv_acc",
               "unstable_relus"}


# ---------------------------------------------------------------------------------------------
# Helpers


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: Path, train: dict[str, Any], data: dict[str, Any]) -> Path:
    lines = ["[train]"] + [f"{k} = {toml_value(v)}" for k, v in train.items()]
    lines += ["", "[train.data]"] + [f"{k} = {toml_value(v)}" for k, v in data.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def train_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "--config", str(config), "--out", str(out),
            *extra]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def raw_load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def clone_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def block_of(key: str) -> int:
    # state-dict keys look like "blocks.3.weight"
    return int(key.split(".")[1])


DATA = {"dataset": "digits", "n_valid": 300}

# Two stages of an FC net, 4 epochs each, for the resume tests (a wide window to kill in).
RESUME_TRAIN = {
    "net": "fc_32_32", "eps": 0.1, "latent_layers": [-1, 3], "epochs_per_stage": 4,
    "mix_epochs": 1, "batch_size": 50, "lr": 0.05, "lr_step": 1, "attack_steps": 4,
    "n_rand_proj": 20, "seed": 7, "device": "cpu",
}

# Three stages of a small ConvMed, 2 epochs each, for freezing / checkpoints / metrics.
STAGED_TRAIN = {
    "net": "convmed_1_1_16", "eps": 0.1, "latent_layers": [-1, 2, 4], "epochs_per_stage": 2,
    "mix_epochs": 1, "batch_size": 50, "lr": 0.05, "lr_step": 1, "attack_steps": 4,
    "n_rand_proj": 20, "seed": 3, "device": "cpu",
}
ITERS = (1500 - 300) // 50  # digits: 1500 training images minus the 300 held out; drop_last
N_TRAIN = 1500 - 300


# ---------------------------------------------------------------------------------------------
# κ schedule (reference §1.5)


def test_kappa_starts_at_zero_and_ramps_linearly() -> None:
    batch, n_train, mix = 50, 1200, 2
    ramp_steps = mix * n_train // batch  # 48
    assert kappa_at(0, batch, n_train, mix) == 0.0
    for step in range(ramp_steps + 1):
        assert kappa_at(step, batch, n_train, mix) == pytest.approx(step / ramp_steps, abs=1e-12)
    # Linear: equal increments.
    diffs = {round(kappa_at(s + 1, batch, n_train, mix) - kappa_at(s, batch, n_train, mix), 12)
             for s in range(ramp_steps)}
    assert diffs == {round(1 / ramp_steps, 12)}
    assert kappa_at(ramp_steps // 2, batch, n_train, mix) == pytest.approx(0.5)
    assert kappa_at(ramp_steps - 1, batch, n_train, mix) < 1.0
    assert kappa_at(ramp_steps, batch, n_train, mix) == 1.0


def test_kappa_stays_one_after_mix() -> None:
    for step in (48, 49, 100, 10_000, 10**7):
        assert kappa_at(step, 50, 1200, 2) == 1.0


def test_kappa_counts_samples_not_batches() -> None:
    # The ramp covers mix_epochs × |train set| samples; a non-dividing set size still ends at 1.
    assert kappa_at(10, 100, 1000, 1) == pytest.approx(1.0)
    assert kappa_at(5, 100, 1000, 1) == pytest.approx(0.5)
    assert kappa_at(3, 100, 1001, 1) == pytest.approx(300 / 1001)
    assert kappa_at(11, 100, 1001, 1) == 1.0


def test_kappa_mix_zero_is_one() -> None:
    for step in (0, 1, 5, 1000):
        assert kappa_at(step, 50, 1200, 0) == 1.0


def test_kappa_reference_200_epoch_stage() -> None:
    # Reference §1.5: mix 60 of 200 epochs -> 60 epochs of ramp, 140 at κ = 1.
    n_train, batch = 50_000, 100
    iters = n_train // batch
    assert kappa_at(30 * iters, batch, n_train, 60) == pytest.approx(0.5)
    assert kappa_at(60 * iters - 1, batch, n_train, 60) < 1.0
    assert all(kappa_at(e * iters, batch, n_train, 60) == 1.0 for e in range(60, 200))


# ---------------------------------------------------------------------------------------------
# LR schedule (reference §1.9)


def expected_halvings(epoch: int) -> int:
    return 0 if epoch < 70 else 1 + (epoch - 70) // 10


def test_lr_every_epoch_of_200_epoch_stage() -> None:
    cfg = TrainConfig(lr=0.03, lr_layer_dec=0.75, mix_epochs=60, lr_step=10, lr_factor=0.5,
                      epochs_per_stage=200, latent_layers=(-1, 2, 4, 6),
                      net="convmedbig_1_2_4_250")
    for stage, start in enumerate([0.03, 0.0225, 0.016875, 0.01265625]):
        lrs = [lr_at(cfg, stage, e) for e in range(200)]
        for e, lr in enumerate(lrs):
            assert lr == pytest.approx(start * 0.5 ** expected_halvings(e), rel=1e-12), (stage, e)
        # Constant through epochs 0-69, halves at 70, 80, ..., 190.
        assert len(set(lrs[:70])) == 1 and lrs[0] == pytest.approx(start, rel=1e-12)
        change_points = [e for e in range(1, 200) if lrs[e] != lrs[e - 1]]
        assert change_points == list(range(70, 200, 10))
        assert len(change_points) == 13
        for e in change_points:
            assert lrs[e] == pytest.approx(lrs[e - 1] / 2, rel=1e-12)
        for e in range(190, 200):
            assert lrs[e] == pytest.approx(start / 8192, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# freeze_prefix


def test_freeze_prefix_is_cumulative() -> None:
    cfg = TrainConfig(net="convmed_1_1_16")
    net = make_net(cfg)
    freeze_prefix(net, -1)
    assert all(p.requires_grad for p in net.parameters())
    freeze_prefix(net, 2)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"blocks.1.weight", "blocks.1.bias"}
    freeze_prefix(net, 4)
    freeze_prefix(net, 2)  # never undone
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"blocks.1.weight", "blocks.1.bias", "blocks.3.weight", "blocks.3.bias"}


# ---------------------------------------------------------------------------------------------
# A real three-stage run: freezing, metrics, checkpoints


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("staged")
    config = write_config(root / "staged.toml", STAGED_TRAIN, DATA)
    cfg = load_train_config(config)
    run_dir = root / "run"
    reports: list[dict[str, Any]] = []

    def on_epoch(report: EpochReport) -> None:
        reports.append({
            "stage": report.stage, "epoch": report.epoch, "global_epoch": report.global_epoch,
            "stage_end": report.stage_end, "metrics": dict(report.metrics),
            "state": clone_state(report.net),
            "requires_grad": {n: p.requires_grad for n, p in report.net.named_parameters()},
            "net_id": id(report.net),
        })

    # train() seeds torch with cfg.seed right before building the net: the same initial weights.
    torch.manual_seed(cfg.seed)
    initial = clone_state(make_net(cfg))
    metrics = train(cfg, run_dir, on_epoch, progress=False)
    return {"cfg": cfg, "run_dir": run_dir, "reports": reports, "metrics": metrics,
            "initial": initial}


def test_staged_run_reports_every_epoch(staged_run: dict[str, Any]) -> None:
    reports = staged_run["reports"]
    assert [(r["stage"], r["epoch"]) for r in reports] == [(s, e) for s in range(3)
                                                           for e in range(2)]
    assert [r["global_epoch"] for r in reports] == list(range(6))
    assert [r["stage_end"] for r in reports] == [False, True] * 3
    assert len({r["net_id"] for r in reports}) == 1
    assert staged_run["metrics"] == reports[-1]["metrics"]


def test_freezing_prefix_unchanged_suffix_changes(staged_run: dict[str, Any]) -> None:
    cfg: TrainConfig = staged_run["cfg"]
    reports = staged_run["reports"]
    end_of = {r["stage"]: r["state"] for r in reports if r["stage_end"]}
    param_keys = [k for k in end_of[0] if k.endswith(("weight", "bias"))]

    # Stage 0 (curr = -1) trains every block, including those frozen later.
    for key in param_keys:
        assert not torch.equal(staged_run["initial"][key], end_of[0][key]), key
    for r in reports:
        if r["stage"] == 0:
            assert all(r["requires_grad"].values())

    for stage in (1, 2):
        _, curr, _ = cfg.stage_layers(stage)
        start, end = end_of[stage - 1], end_of[stage]
        prefix = [k for k in param_keys if block_of(k) <= curr]
        suffix = [k for k in param_keys if block_of(k) > curr]
        assert prefix and suffix
        for key in prefix:
            # Unchanged through this and every later stage.
            for later in range(stage, 3):
                assert torch.equal(start[key], end_of[later][key]), (stage, later, key)
            for r in reports:
                if r["stage"] >= stage:
                    assert not r["requires_grad"][key], (r["stage"], key)
        for key in suffix:
            assert not torch.equal(start[key], end[key]), (stage, key)
            assert all(r["requires_grad"][key] for r in reports if r["stage"] == stage)
        # Within the stage, the prefix is also unchanged between epochs.
        for r in reports:
            if r["stage"] == stage:
                for key in prefix:
                    assert torch.equal(start[key], r["state"][key])


def test_metrics_jsonl(staged_run: dict[str, Any]) -> None:
    cfg: TrainConfig = staged_run["cfg"]
    lines = read_metrics(staged_run["run_dir"])
    assert len(lines) == 6
    for i, m in enumerate(lines):
        assert METRIC_KEYS <= m.keys(), METRIC_KEYS - m.keys()
        stage, epoch = divmod(i, 2)
        assert (m["stage"], m["epoch"], m["global_epoch"]) == (stage, epoch, i)
        assert m["lr"] == pytest.approx(lr_at(cfg, stage, epoch), rel=1e-12)
        assert m["eps"] == pytest.approx(cfg.stage_eps(stage), rel=1e-12)
        # κ is that of the epoch's last batch, counted from the start of the stage: it restarts.
        assert m["kappa"] == pytest.approx(
            kappa_at(epoch * ITERS + ITERS - 1, cfg.batch_size, N_TRAIN, cfg.mix_epochs))
        for key in ("loss", "nat_acc", "adv_acc", "unstable_relus"):
            assert isinstance(m[key], float) and m[key] == m[key]  # finite number, not NaN
        assert 0.0 <= m["nat_acc"] <= 1.0 and 0.0 <= m["adv_acc"] <= 1.0
        assert m["unstable_relus"] >= 0
        assert m == json.loads(json.dumps(staged_run["reports"][i]["metrics"]))
    kappas = [m["kappa"] for m in lines]
    assert kappas[0] == pytest.approx(23 / 24) and kappas[1] == 1.0
    assert kappas[2] == kappas[4] == kappas[0]  # restarted in every stage


def test_checkpoints_load_weights_only(staged_run: dict[str, Any]) -> None:
    cfg: TrainConfig = staged_run["cfg"]
    run_dir: Path = staged_run["run_dir"]
    end_of = {r["stage"]: r["state"] for r in staged_run["reports"] if r["stage_end"]}
    for stage in range(3):
        path = run_dir / f"stage{stage}.pt"
        assert path.is_file()
        ckpt = raw_load(path)
        assert CHECKPOINT_KEYS <= ckpt.keys(), CHECKPOINT_KEYS - ckpt.keys()
        assert ckpt["config"] == to_dict(cfg)
        # Stage-end checkpoints point at the start of the next stage.
        assert (ckpt["stage"], ckpt["epoch"]) == (stage + 1, 0)
        assert ckpt["global_step"] == (stage + 1) * cfg.epochs_per_stage * ITERS
        assert isinstance(ckpt["rng"], dict) and "torch" in ckpt["rng"]
        assert_same_state(ckpt["model"], end_of[stage])
    last = raw_load(run_dir / "last.pt")
    assert CHECKPOINT_KEYS <= last.keys()
    assert_same_state(last["model"], end_of[2])
    assert last["stage"] == 3


def test_load_trained_net(staged_run: dict[str, Any]) -> None:
    cfg: TrainConfig = staged_run["cfg"]
    run_dir: Path = staged_run["run_dir"]
    end_of = {r["stage"]: r["state"] for r in staged_run["reports"] if r["stage_end"]}
    for stage, name in [(1, "stage1.pt"), (2, "last.pt")]:
        net, loaded_cfg = load_trained_net(run_dir / name)
        assert loaded_cfg == cfg
        assert net.name == cfg.net
        assert_same_state(clone_state(net), end_of[stage])
        x = torch.rand(4, 1, 8, 8)
        assert net(x).shape == (4, 10)


def test_load_trained_net_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_trained_net(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError):
        load_trained_net(other)


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    """The config file and an uninterrupted reference run of it."""
    root = tmp_path_factory.mktemp("resume")
    config = write_config(root / "resume.toml", RESUME_TRAIN, DATA)
    cfg = load_train_config(config)
    ref_dir = root / "reference"
    train(cfg, ref_dir, progress=False)
    return {"root": root, "config": config, "cfg": cfg, "ref_dir": ref_dir,
            "ref_state": raw_load(ref_dir / "last.pt")["model"]}


class Interrupt(Exception):
    pass


def check_resumed_run(run_dir: Path, setup: dict[str, Any]) -> None:
    cfg: TrainConfig = setup["cfg"]
    assert_same_state(raw_load(run_dir / "last.pt")["model"], setup["ref_state"])
    total = cfg.num_stages * cfg.epochs_per_stage
    lines = read_metrics(run_dir)
    assert [m["global_epoch"] for m in lines] == list(range(total))
    assert [(m["stage"], m["epoch"]) for m in lines] == [
        (s, e) for s in range(cfg.num_stages) for e in range(cfg.epochs_per_stage)]
    for stage in range(cfg.num_stages):
        assert (run_dir / f"stage{stage}.pt").is_file()
        assert_same_state(raw_load(run_dir / f"stage{stage}.pt")["model"],
                          raw_load(setup["ref_dir"] / f"stage{stage}.pt")["model"])
    # The resumed run's metrics equal the uninterrupted run's (apart from timings).
    ref_lines = read_metrics(setup["ref_dir"])
    drop = {"time_s", "images_per_s"}
    assert [{k: v for k, v in m.items() if k not in drop} for m in lines] == \
        [{k: v for k, v in m.items() if k not in drop} for m in ref_lines]


def test_reference_run_is_reproducible_in_process(resume_setup: dict[str, Any],
                                                  tmp_path: Path) -> None:
    # Sanity for the resume tests: two uninterrupted runs agree bitwise, and a finished run
    # rerun in the same folder does nothing more.
    cfg = resume_setup["cfg"]
    metrics = train(cfg, resume_setup["ref_dir"], progress=False)
    assert len(read_metrics(resume_setup["ref_dir"])) == cfg.num_stages * cfg.epochs_per_stage
    assert metrics["global_epoch"] == cfg.num_stages * cfg.epochs_per_stage - 1
    assert_same_state(raw_load(resume_setup["ref_dir"] / "last.pt")["model"],
                      resume_setup["ref_state"])


def test_resume_after_exception_mid_stage(resume_setup: dict[str, Any]) -> None:
    cfg: TrainConfig = resume_setup["cfg"]
    run_dir = resume_setup["root"] / "interrupted"

    def crash(report: EpochReport) -> None:
        if report.stage == 1 and report.epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, run_dir, crash, progress=False)
    ckpt = raw_load(run_dir / "last.pt")
    assert (ckpt["stage"], ckpt["epoch"]) == (1, 1)
    assert ckpt["optimizer"] is not None and ckpt["optimizer"]["state"]  # momentum buffers
    assert not (run_dir / "stage1.pt").exists()
    assert len(read_metrics(run_dir)) == cfg.epochs_per_stage + 1

    seen: list[tuple[int, int]] = []
    train(cfg, run_dir, lambda r: seen.append((r.stage, r.epoch)), progress=False)
    assert seen == [(1, e) for e in range(1, cfg.epochs_per_stage)]  # only the remaining ones
    check_resumed_run(run_dir, resume_setup)

    # Another configuration in the same folder is refused, and the folder is left alone.
    before = (run_dir / "metrics.jsonl").read_bytes()
    other = load_train_config(resume_setup["config"], ["lr=0.01"])
    with pytest.raises(ConfigError, match="last.pt"):
        train(other, run_dir, progress=False)
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert_same_state(raw_load(run_dir / "last.pt")["model"], resume_setup["ref_state"])


@pytest.mark.parametrize("crash_stage, crash_epoch", [(0, 1), (0, 3)])
def test_resume_after_exception_in_stage_0(resume_setup: dict[str, Any], crash_stage: int,
                                           crash_epoch: int) -> None:
    # (0, 3) is the stage's last epoch: last.pt then points at the start of stage 1.
    cfg: TrainConfig = resume_setup["cfg"]
    run_dir = resume_setup["root"] / f"interrupted_{crash_stage}_{crash_epoch}"

    def crash(report: EpochReport) -> None:
        if (report.stage, report.epoch) == (crash_stage, crash_epoch):
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, run_dir, crash, progress=False)
    seen: list[tuple[int, int]] = []
    train(cfg, run_dir, lambda r: seen.append((r.stage, r.epoch)), progress=False)
    assert seen[0] == ((crash_stage, crash_epoch + 1) if crash_epoch + 1 < cfg.epochs_per_stage
                       else (crash_stage + 1, 0))
    check_resumed_run(run_dir, resume_setup)


class SaveCrash(Exception):
    pass


def crash_on_save(monkeypatch: pytest.MonkeyPatch, name: str, nth: int = 1) -> None:
    """Make pipeline.train's ``nth`` checkpoint write to a file called ``name`` die before
    writing, as a SIGKILL between two writes would."""
    import pipeline.train as train_module

    real = train_module.save_checkpoint
    calls = {"n": 0}

    def save(state: dict[str, Any], path: Any) -> None:
        if Path(path).name == name:
            calls["n"] += 1
            if calls["n"] == nth:
                raise SaveCrash(path)
        real(state, path)

    monkeypatch.setattr(train_module, "save_checkpoint", save)


def test_resume_after_crash_before_first_checkpoint(resume_setup: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Killed after epoch 0's metrics line was appended but before last.pt was first written:
    # the rerun starts from scratch and must not log epoch 0 twice.
    run_dir = resume_setup["root"] / "crash_first_save"
    with monkeypatch.context() as m:
        crash_on_save(m, "last.pt", nth=1)
        with pytest.raises(SaveCrash):
            train(resume_setup["cfg"], run_dir, progress=False)
    assert not (run_dir / "last.pt").exists()
    train(resume_setup["cfg"], run_dir, progress=False)
    check_resumed_run(run_dir, resume_setup)


def test_resume_after_crash_between_last_and_stage_checkpoint(
        resume_setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Killed at the end of stage 0 just as stage0.pt is written (with the current write order,
    # after last.pt already points at stage 1): the rerun must still leave a stage0.pt.
    run_dir = resume_setup["root"] / "crash_stage_save"
    with monkeypatch.context() as m:
        crash_on_save(m, "stage0.pt", nth=1)
        with pytest.raises(SaveCrash):
            train(resume_setup["cfg"], run_dir, progress=False)
    assert not (run_dir / "stage0.pt").exists()
    train(resume_setup["cfg"], run_dir, progress=False)
    check_resumed_run(run_dir, resume_setup)


@pytest.mark.timeout(3600)  # a hang guard: the waits inside poll for their condition
def test_resume_after_sigkill_subprocess(resume_setup: dict[str, Any]) -> None:
    cfg: TrainConfig = resume_setup["cfg"]
    run_dir = resume_setup["root"] / "killed"
    cmd = train_cmd(resume_setup["config"], run_dir)
    log = (resume_setup["root"] / "killed.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=log)
    last = run_dir / "last.pt"
    deadline = time.monotonic() + 1800  # a hang guard; the checkpoint comes in seconds
    try:
        while True:
            assert proc.poll() is None, "training finished before it could be killed"
            assert time.monotonic() < deadline, "no stage-1 checkpoint (hang guard: 1800 s)"
            if last.exists():
                try:
                    ckpt = raw_load(last)
                except Exception:  # noqa: BLE001 - being replaced; try again
                    ckpt = None
                if ckpt is not None and ckpt["stage"] == 1 and ckpt["epoch"] >= 1:
                    break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    ckpt = raw_load(last)
    assert ckpt["stage"] == 1 and 1 <= ckpt["epoch"] < cfg.epochs_per_stage, "not mid-stage"
    assert not (run_dir / "stage1.pt").exists()
    assert (run_dir / "stage0.pt").exists()

    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    check_resumed_run(run_dir, resume_setup)


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_unknown_set_key(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(train_cmd(QUICKSTART, out, "--set", "batchsize=64"), cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "batchsize" in lines[0] and "batch_size" in lines[0]
    assert not (out / "last.pt").exists()


def test_cli_missing_config(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    done = subprocess.run(train_cmd(missing, tmp_path / "out"), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(missing) in lines[0]


# ---------------------------------------------------------------------------------------------
# Acceptance: COLT certifies far more than natural training (DeepZ, validation split, target ε)


@pytest.mark.slow
def test_colt_certifies_more_than_natural_training(tmp_path: Path) -> None:
    cfg = load_train_config(QUICKSTART, ["device=cpu"])
    loaders = make_loaders(cfg.data, cfg.batch_size, cfg.seed)
    assert loaders.valid is not None and len(loaders.valid.dataset) == 300

    def score(net: torch.nn.Module) -> dict[str, float]:
        torch.manual_seed(0)
        return evaluate(net, loaders.valid, cfg.eps, cfg.test_attack_steps,
                        cfg.test_attack_step_size)

    train(cfg, tmp_path / "colt", loaders=loaders, progress=False)
    colt_net, _ = load_trained_net(tmp_path / "colt" / "last.pt")
    colt = score(colt_net)

    # Natural training of the same net on the same data for the same number of epochs.
    torch.manual_seed(cfg.seed)
    nat_net = make_net(cfg)
    optimizer = torch.optim.SGD(nat_net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    nat_net.train()
    for _ in range(cfg.num_stages * cfg.epochs_per_stage):
        for x, y in loaders.train:
            optimizer.zero_grad()
            F.cross_entropy(nat_net(x), y).backward()
            optimizer.step()
    natural = score(nat_net)

    print(f"\nCOLT {colt}\nnatural {natural}")
    assert natural["nat_acc"] >= 0.9  # an honest baseline, not a broken one
    assert colt["nat_acc"] >= 0.8
    assert colt["cert_acc"] >= natural["cert_acc"] + 0.10
    assert colt["cert_acc"] <= colt["pgd_acc"] <= colt["nat_acc"]
