"""COLT's staged trainer: one loop over stages, schedules as pure functions, resumable checkpoints.

    python -m pipeline.train --config studies/quickstart.toml --out runs/quick [--set key=value ...]
    python -m pipeline.train --from-trial sqlite:///runs/optuna.db 7 --out runs/trial7_again

Stage j trains on latent layer ``latent_layers[j]``: the prefix up to it is frozen, a latent
adversarial example is found inside its DeepZ region by PGD on the noise coefficients, and the
suffix is trained on it; the loss is mixed from the previous stage's latent loss (natural loss in
stage 0) by κ, which ramps 0 → 1 over ``mix_epochs`` and restarts each stage. L1 on all weights and
the ReLU-stability term on the next latent layer's pre-activation bounds regularise it.

Writes ``OUT/last.pt`` after every epoch (rolling), ``OUT/stage<k>.pt`` at each stage's end and
``OUT/metrics.jsonl`` (one object per epoch). Running the same command again resumes from
``last.pt``; the resumed run ends with the same weights as an uninterrupted one (CPU, seeded).
:func:`train` knows nothing of Optuna: tuning passes an ``on_epoch`` callback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from pipeline.attacks import (
    extend_relaxation,
    latent_pgd,
    prefix_relaxation,
    retain_freed_memory,
)
from pipeline.checkpoint import (
    append_jsonl,
    load_checkpoint,
    read_jsonl,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    write_jsonl,
)
from pipeline.config import ConfigError, TrainConfig, from_dict, load_train_config, to_dict
from pipeline.nets import Net, build_net

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------------------------
# Schedules: pure functions of the position in the run.


def kappa_at(step_in_stage: int, batch_size: int, n_train: int, mix_epochs: int) -> float:
    """κ ramps linearly from 0 to 1 over ``mix_epochs`` passes over the training set."""
    if mix_epochs <= 0:
        return 1.0
    return min(1.0, step_in_stage * batch_size / (mix_epochs * n_train))


def lr_at(cfg: TrainConfig, stage: int, epoch: int) -> float:
    """Constant through the mix phase, then × lr_factor every ``lr_step`` epochs."""
    halvings = max(0, epoch - cfg.mix_epochs) // cfg.lr_step
    return cfg.stage_lr(stage) * cfg.lr_factor**halvings


# --------------------------------------------------------------------------------------------


def make_net(cfg: TrainConfig) -> Net:
    from pipeline.data import DATASET_INFO

    info = DATASET_INFO[cfg.data.dataset]
    return build_net(cfg.net, info.input_shape, info.mean, info.std, info.num_classes)


def validate_layers(cfg: TrainConfig, net: Net) -> None:
    """Every latent layer after -1 must be a ReLU output of the network."""
    relus = net.relu_indices
    for layer in cfg.latent_layers[1:]:
        if layer not in relus:
            raise ConfigError(f"latent_layers: {layer} is not a ReLU output of {cfg.net} "
                              f"(ReLU blocks: {relus})")


def freeze_prefix(net: Net, layer: int) -> None:
    """Blocks 0..layer stop learning; freezing is cumulative and never undone."""
    for block in net.blocks[: layer + 1]:
        for p in block.parameters():
            p.requires_grad_(False)


def l1_norm(net: Net) -> Tensor:
    return sum(p.abs().sum() for name, p in net.named_parameters() if "weight" in name)


def relu_stability(lower: Tensor, upper: Tensor) -> Tensor:
    """Mean over the batch of Σ max(-l, 0) · max(u, 0): non-zero only for crossing ReLUs."""
    return (F.relu(-lower) * F.relu(upper)).flatten(1).sum(1).mean()


@dataclass
class StepResult:
    loss: Tensor
    # 0-d tensors on the batch's device: the hot loop sums them there and syncs once per
    # logging interval; ``stats`` (floats) syncs at once.
    tensors: dict[str, Tensor]

    @property
    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.tensors.items()}


# Steps between host syncs of the hot loop (divergence check, progress bar statistics).
LOG_EVERY = 20


def colt_step(net: Net, x: Tensor, y: Tensor, cfg: TrainConfig, stage: int, kappa: float
              ) -> StepResult:
    """The loss of one batch in a stage (reference §1.5): mixed latent-adversarial losses,
    L1 and ReLU stability.

    The Cauchy bound estimate runs once: the frozen prefix up to curr without gradient, then
    (stability on) on to next's pre-activation bounds with gradient; the last ReLU's new noise
    group is never drawn, since only its bounds are used.
    """
    if x.device.type == "cpu":
        retain_freed_memory()
    prev, curr, nxt = cfg.stage_layers(stage)
    eps = cfg.stage_eps(stage)
    stable_weight = cfg.stage_relu_stable(stage) if nxt is not None else 0.0
    use_stable = stable_weight > 0 and kappa > 0
    # The natural loss is a loss term only in stage 0; later it is a statistic.
    with torch.set_grad_enabled(torch.is_grad_enabled() and prev == -2):
        logits = net(x)
    nat = F.cross_entropy(logits, y)

    # The region up to curr: the prefix is frozen, so no gradient is needed through it.
    with torch.no_grad():
        region = prefix_relaxation(net, x, eps, curr, cfg.bounds, cfg.n_rand_proj,
                                   keep_element=use_stable)
    stable = torch.zeros((), device=x.device)
    if use_stable:
        # Bounds of the next latent layer's pre-activations, with gradient through the trainable
        # blocks between curr and next.
        region_next = (prefix_relaxation(net, x, eps, nxt, cfg.bounds, cfg.n_rand_proj,
                                         keep_element=False)
                       if curr < 0 else extend_relaxation(net, region, nxt, keep_element=False))
        lower, upper = region_next.propagation.pre_bounds[nxt]
        stable = relu_stability(lower, upper)
        region = region_next if curr < 0 else region
        bounds_seen = region_next.propagation.pre_bounds
    else:
        bounds_seen = region.propagation.pre_bounds
    unstable = sum(((lo < 0) & (up > 0)).flatten(1).sum(1).float().mean()
                   for lo, up in bounds_seen.values()) if bounds_seen else torch.zeros(())

    z_curr = latent_pgd(net, region, curr, y, cfg.attack_steps, cfg.attack_step_size)
    adv_logits = net.forward_from(curr, z_curr)
    adv = F.cross_entropy(adv_logits, y)
    if prev == -2:
        padv = nat
    else:
        z_prev = latent_pgd(net, region, prev, y, cfg.attack_steps, cfg.attack_step_size)
        padv = F.cross_entropy(net.forward_from(prev, z_prev), y)
    l1 = l1_norm(net)
    loss = kappa * adv + (1 - kappa) * padv + cfg.l1_reg * l1 + kappa * stable_weight * stable
    stats = {
        "loss": loss, "nat_loss": nat, "adv_loss": adv, "prev_adv_loss": padv, "l1": l1,
        "stable_loss": stable, "nat_acc": (logits.argmax(1) == y).float().mean(),
        "adv_acc": (adv_logits.argmax(1) == y).float().mean(),
        "unstable_relus": torch.as_tensor(unstable, device=x.device),
    }
    return StepResult(loss, {k: v.detach().to(x.device) for k, v in stats.items()})


@dataclass
class EpochReport:
    """What the on_epoch callback receives after every epoch."""

    stage: int
    epoch: int  # within the stage, 0-based
    global_epoch: int
    stage_end: bool
    metrics: dict[str, Any]
    net: Net


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device = {name!r}: allowed auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r}: CUDA is not available on this machine")
    return device


def train(cfg: TrainConfig, run_dir: str | Path,
          on_epoch: Callable[[EpochReport], None] | None = None, *,
          full_train_set: bool = False, loaders: Any = None, progress: bool = True
          ) -> dict[str, Any]:
    """Run (or resume) every stage of ``cfg`` in ``run_dir``; returns the last epoch's metrics.

    ``full_train_set`` trains on the whole training set (a launch); otherwise the validation
    split is held out, as in tuning. ``on_epoch`` may raise to stop the run (e.g. pruning).
    """
    from pipeline.data import make_loaders

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, cfg.deterministic)
    net = make_net(cfg).to(device)
    validate_layers(cfg, net)
    if loaders is None:
        loaders = make_loaders(cfg.data, cfg.batch_size, cfg.seed,
                               use_validation=not full_train_set, device=device)
    n_train = len(loaders.train.dataset)
    iters = len(loaders.train)
    if iters == 0:
        raise ConfigError(f"batch_size = {cfg.batch_size}: larger than the training set "
                          f"({n_train} images)")

    stage, epoch = 0, 0
    optimizer_state = None
    last = run_dir / "last.pt"
    if last.exists():
        ckpt = load_checkpoint(last)
        saved = from_dict(TrainConfig, ckpt["config"])
        if to_dict(saved) | {"device": ""} != to_dict(cfg) | {"device": ""}:
            raise ConfigError(f"{last}: was written with another configuration; "
                              "use a new --out folder or delete it")
        net.load_state_dict(ckpt["model"])
        stage, epoch = ckpt["stage"], ckpt["epoch"]
        optimizer_state = ckpt["optimizer"]
        set_rng_state(ckpt["rng"])
        # Drop metric lines of epochs after the checkpoint (written before a crash).
        done = ckpt["global_epoch"]
        kept = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["global_epoch"] < done]
        write_jsonl(run_dir / "metrics.jsonl", kept)
        log.info("resuming %s at stage %d epoch %d", run_dir, stage, epoch)
    else:
        # Lines of a run that died before its first checkpoint belong to no checkpoint.
        write_jsonl(run_dir / "metrics.jsonl", [])

    metrics: dict[str, Any] = {}
    bar = tqdm(total=cfg.num_stages * cfg.epochs_per_stage * iters, disable=not progress,
               initial=(stage * cfg.epochs_per_stage + epoch) * iters, desc="COLT",
               unit="batch", dynamic_ncols=True)
    while stage < cfg.num_stages:
        _, curr, _ = cfg.stage_layers(stage)
        freeze_prefix(net, curr)
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad],
                                    lr=lr_at(cfg, stage, epoch), momentum=cfg.momentum)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
            optimizer_state = None
        while epoch < cfg.epochs_per_stage:
            global_epoch = stage * cfg.epochs_per_stage + epoch
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, stage, epoch)
            # Shuffling depends only on (seed, global epoch), so a resumed run sees the same order.
            if getattr(loaders.train, "generator", None) is not None:
                loaders.train.generator.manual_seed(cfg.seed * 100_003 + global_epoch)
            sums: dict[str, Tensor] = {}
            seen = 0
            start = time.perf_counter()
            net.train()
            for i, (x, y) in enumerate(loaders.train):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                kappa = kappa_at(epoch * iters + i, cfg.batch_size, n_train, cfg.mix_epochs)
                result = colt_step(net, x, y, cfg, stage, kappa)
                # The statistics stay on the device; the host syncs once per LOG_EVERY steps.
                last_step = i == iters - 1
                if i % LOG_EVERY == 0 or last_step:
                    stats = result.stats
                    if not math.isfinite(stats["loss"]):
                        raise DivergedError(f"loss is {stats['loss']} at stage {stage} "
                                            f"epoch {epoch} batch {i}")
                    bar.set_postfix(stage=stage, loss=f"{stats['loss']:.3f}",
                                    adv_acc=f"{stats['adv_acc']:.2f}")
                optimizer.zero_grad(set_to_none=True)
                result.loss.backward()
                optimizer.step()
                for k, v in result.tensors.items():
                    sums[k] = sums[k] + v * len(y) if k in sums else v * len(y)
                seen += len(y)
                bar.update(1)
            sums_host = {k: float(v) for k, v in sums.items()}
            if not all(math.isfinite(v) for v in sums_host.values()):
                raise DivergedError(f"non-finite statistics at stage {stage} epoch {epoch}: "
                                    f"{sums_host}")
            elapsed = time.perf_counter() - start
            epoch += 1
            metrics = {
                "stage": stage, "epoch": epoch - 1, "global_epoch": global_epoch,
                "lr": lr_at(cfg, stage, epoch - 1), "eps": cfg.stage_eps(stage), "kappa": kappa,
                **{k: v / max(seen, 1) for k, v in sums_host.items()},
                "time_s": elapsed, "images_per_s": seen / max(elapsed, 1e-9),
            }
            append_jsonl(run_dir / "metrics.jsonl", metrics)
            stage_end = epoch == cfg.epochs_per_stage
            next_stage, next_epoch = (stage + 1, 0) if stage_end else (stage, epoch)
            state = {
                "config": to_dict(cfg), "stage": next_stage, "epoch": next_epoch,
                "global_epoch": global_epoch + 1,
                "global_step": (global_epoch + 1) * iters, "model": net.state_dict(),
                "optimizer": optimizer.state_dict() if not stage_end else None,
                "rng": rng_state(), "net": cfg.net, "dataset": cfg.data.dataset,
                "metrics": metrics,
            }
            # The stage checkpoint first: a crash between the two writes repeats the epoch
            # (rewriting an identical stage file) instead of losing the stage file.
            if stage_end:
                save_checkpoint(state, run_dir / f"stage{stage}.pt")
            save_checkpoint(state, last)
            log.info("stage %d epoch %d: %s", stage, epoch - 1,
                     ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                               if isinstance(v, float)))
            if on_epoch is not None:
                on_epoch(EpochReport(stage, epoch - 1, global_epoch, stage_end, metrics, net))
        stage, epoch = stage + 1, 0
    bar.close()
    if not metrics and last.exists():
        metrics = load_checkpoint(last).get("metrics", {})
    return metrics


def load_trained_net(path: str | Path, device: str | torch.device = "cpu") -> tuple[Net, TrainConfig]:
    """The network and config of a checkpoint written by :func:`train`."""
    ckpt = load_checkpoint(path, map_location=device)
    try:
        cfg = from_dict(TrainConfig, ckpt["config"])
        net = make_net(cfg)
        net.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, ConfigError) as err:
        from pipeline.checkpoint import CheckpointError

        raise CheckpointError(f"{path}: not a training checkpoint of this project "
                              f"({str(err).splitlines()[0][:200]})") from None
    return net.to(device), cfg


def trial_config_from_storage(url: str, number: str | int, study_name: str | None = None,
                              overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The resolved TrainConfig a tuning trial recorded (user attribute ``train_config``), with
    ``key=value`` overrides (e.g. ``device=cpu``). Any problem is one ConfigError."""
    import warnings

    import optuna

    from pipeline.config import apply_overrides

    try:
        number = int(number)
    except ValueError:
        raise ConfigError(f"--from-trial: trial number {number!r} is not an integer") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = optuna.get_all_study_names(storage=url)
    except Exception as err:  # noqa: BLE001 - sqlalchemy / driver errors come in many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--from-trial: storage cannot be read: {first[:200]}") from None
    if study_name is None:
        if len(names) != 1:
            raise ConfigError(f"--from-trial: the storage holds {len(names)} studies "
                              f"({', '.join(names) or 'none'}); choose one with --study-name")
        study_name = names[0]
    if study_name not in names:
        raise ConfigError(f"--from-trial: no study {study_name!r}; studies: {', '.join(names)}")
    study = optuna.load_study(study_name=study_name, storage=url)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ConfigError(f"--from-trial: study {study_name!r} has no trial {number}")
    recorded = trials[number].user_attrs.get("train_config")
    if not isinstance(recorded, dict):
        raise ConfigError(f"--from-trial: trial {number} of {study_name!r} has no recorded "
                          "train_config (tuned before configs were recorded)")
    try:
        return from_dict(TrainConfig, apply_overrides(recorded, overrides))
    except ConfigError as err:
        raise ConfigError(f"--from-trial: trial {number}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="TOML file with a [train] table")
    source.add_argument("--from-trial", nargs=2, metavar=("URL", "NUMBER"),
                        help="re-run a tuning trial from its study database alone (its recorded "
                             "train_config; the validation split is held out as in the trial)")
    parser.add_argument("--study-name", help="with --from-trial: the study (if the storage "
                                             "holds several)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--out", required=True, help="run folder (resumed if it has last.pt)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the config)")
    parser.add_argument("--full-train-set", action="store_true",
                        help="train on the whole training set (no validation split held out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DatasetUnavailable

    try:
        overrides = args.overrides + ([f"device={args.device}"] if args.device else [])
        if args.from_trial:
            cfg = trial_config_from_storage(args.from_trial[0], args.from_trial[1],
                                            args.study_name, overrides)
        else:
            cfg = load_train_config(args.config, overrides)
        metrics = train(cfg, args.out, full_train_set=args.full_train_set)
    except (ConfigError, CheckpointError, DatasetUnavailable, DivergedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
