"""Launch of a tuned trial: full training with the study's launch schedule, then certification of
the test set with the full cascade, written back into the study database.

    python -m pipeline.tune --study studies/mnist_0.1.toml --launch-best [--trial N]

The launch trains on the whole training set (no validation split) in
``runs/<study>/launch_trial<N>/`` and certifies the test set into ``certify_test.jsonl`` there.
Both steps resume: running the command again after an interruption continues where it stopped. The
outcome is appended to (or updated in) the study user attribute ``launches``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import optuna

from pipeline.config import to_dict
from pipeline.study import StudyFile
from pipeline.train import load_trained_net, resolve_device, train
from pipeline.storage import open_storage
from pipeline.tune import VAL_CERT, VAL_NAT, best_trial

log = logging.getLogger(__name__)


def choose_trial(study: optuna.Study, study_file: StudyFile, trial_number: int | None
                 ) -> optuna.trial.FrozenTrial:
    if trial_number is None:
        if study_file.settings.objective == "pareto":
            raise LookupError(f"study {study.study_name!r} is multi-objective: choose a Pareto "
                              f"point with --trial N (Pareto trials: "
                              f"{sorted(t.number for t in study.best_trials)})")
        return best_trial(study, study_file.settings.min_nat_acc)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(trial_number)
    if trial is None or trial.state != optuna.trial.TrialState.COMPLETE:
        raise LookupError(f"study {study.study_name!r} has no complete trial {trial_number}")
    return trial


def _require_sqlite_file(storage_url: str) -> None:
    """A launch reads a tuned study: a missing SQLite file is an error, not a new database."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(storage_url)
    except Exception:  # noqa: BLE001 - open_storage reports a bad URL
        return
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).is_file():
            raise LookupError(f"no study database at {url.database}; run the tuning first")


def launch_seeds(study_file: StudyFile, storage_url: str, trial_number: int | None = None,
                 device: str | None = None, runs_dir: str | Path = "runs", seeds: int = 1
                 ) -> list[dict[str, Any]]:
    """:func:`launch` with training seeds train.seed + 0..seeds-1 (the seed spread of a launch)."""
    return [launch(study_file, storage_url, trial_number, device, runs_dir, seed_offset=k)
            for k in range(seeds)]


def launch(study_file: StudyFile, storage_url: str, trial_number: int | None = None,
           device: str | None = None, runs_dir: str | Path = "runs", seed_offset: int = 0
           ) -> dict[str, Any]:
    _require_sqlite_file(storage_url)
    from pipeline.certify.cli import certify_dataset

    storage = open_storage(storage_url, study_file, heartbeat=False)
    try:
        study = optuna.load_study(study_name=study_file.settings.name, storage=storage)
    except KeyError:
        raise LookupError(f"no study named {study_file.settings.name!r} in the storage; "
                          "run the tuning first") from None
    trial = choose_trial(study, study_file, trial_number)
    cfg = study_file.launch_config(trial.params)
    if device:
        cfg = dataclasses.replace(cfg, device=device)
    cfg = dataclasses.replace(cfg, seed=cfg.seed + seed_offset)
    suffix = f"_seed{cfg.seed}" if seed_offset else ""
    run_dir = (Path(runs_dir).resolve() / study_file.settings.name
               / f"launch_trial{trial.number}{suffix}")
    log.info("launching trial %d in %s", trial.number, run_dir)
    train(cfg, run_dir, full_train_set=True)
    net, _ = load_trained_net(run_dir / "last.pt")
    results = run_dir / "certify_test.jsonl"
    # Certification runs where training did (--device, else the config's), not on "auto".
    summary = certify_dataset(net, cfg.data, "test", cfg.eps, study_file.certify_test, results,
                              device=str(resolve_device(cfg.device)))
    entry = {
        "trial": trial.number,
        "val_nat_acc": trial.user_attrs.get(VAL_NAT),
        "val_cert_acc": trial.user_attrs.get(VAL_CERT),
        "test_nat_acc": summary["nat_acc"],
        "test_pgd_acc": summary["pgd_acc"],
        "test_cert_acc": summary["cert_acc"],
        "n_test": summary["n"],
        "results": str(results),
        "checkpoint": str(run_dir / "last.pt"),
        "epochs_per_stage": cfg.epochs_per_stage,
        "params": trial.params,
        "seed": cfg.seed,
        # Reproducible from the database: the resolved configs of this launch.
        "train_config": to_dict(cfg),
        "certify_test": to_dict(study_file.certify_test),
        "budget": {"epochs_per_stage": cfg.epochs_per_stage, "stages": cfg.num_stages,
                   "epochs": cfg.epochs_per_stage * cfg.num_stages},
        # Per-image certified outcomes on the test images (in index order) for paired
        # comparisons of two launches (pipeline.stats.paired_difference).
        "test_cert_bits": _cert_bits(results),
    }
    launches = [e for e in study.user_attrs.get("launches", [])
                if (e.get("trial"), e.get("seed", cfg.seed - seed_offset))
                != (trial.number, cfg.seed)]
    study.set_user_attr("launches", launches + [entry])
    return entry


def _cert_bits(results: Path) -> dict[str, Any]:
    from pipeline.certify.cli import read_results
    from pipeline.stats import pack_bits

    rows = read_results(results)
    order = sorted(rows)
    packed = pack_bits([rows[i].get("status") == "certified" for i in order])
    return {**packed, "first_index": order[0] if order else 0}
