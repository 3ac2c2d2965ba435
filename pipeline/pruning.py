"""A noise-aware pruner: stop a trial only when it is significantly worse, image by image.

    pruner = PairedPruner(alpha=0.05, min_images=100)
    optuna.create_study(pruner=pruner, ...)

At each stage boundary the objective stores the trial's per-image certified outcomes on the
validation images as the user attribute ``stage<k>_cert_bits`` (:func:`pipeline.stats.pack_bits`)
together with ``split_hash``. The pruner compares them with the *reference* trial's outcomes at the
same stage on the same images: the published point (the trial with user attribute ``published``;
of several seed repeats, the one with the *fewest* certified images at that stage) if it has
reached that stage, else the best complete trial. The weakest seed, because two training seeds of
the same hyperparameters differ by more than the image noise (benchmarks/fashion_mnist_study:
+1.8 points, McNemar p = 0.007 on 2,500 images): a trial within the seed band is no evidence of
worse hyperparameters. (Claiming a trial *better* uses the strongest seed:
``pipeline.tune.compare_to_published``.) It prunes only when the exact one-sided McNemar test
says this trial certifies fewer of these images than the reference at level ``alpha``, and never on
fewer than ``min_images`` images, before ``warmup_stages`` stages have reported, or when the two
trials were scored on different images (split hash or count differ). Unlike Optuna's
MedianPruner it does not compare against a median of the first few complete trials, so a trial
within noise of the reference always runs on.
"""

from __future__ import annotations

from typing import Any

import optuna

from pipeline.stats import discordant, mcnemar_exact, unpack_bits

BITS_ATTR = "stage{}_cert_bits"


def stage_bits(trial: optuna.trial.FrozenTrial, stage: int) -> list[bool] | None:
    packed = trial.user_attrs.get(BITS_ATTR.format(stage))
    return None if packed is None else unpack_bits(packed)


def reference_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, stage: int
                    ) -> optuna.trial.FrozenTrial | None:
    """The trial this one is compared with at ``stage`` (see the module docstring)."""
    others = [t for t in study.get_trials(deepcopy=False)
              if t.number != trial.number and BITS_ATTR.format(stage) in t.user_attrs]
    published = [t for t in others if t.user_attrs.get("published")]
    if published:  # the weakest seed (module docstring)
        return min(published, key=lambda t: (sum(stage_bits(t, stage)), t.number))
    complete = [t for t in others if t.state == optuna.trial.TrialState.COMPLETE
                and t.value is not None and _feasible(t)]
    if not complete:
        return None
    return max(complete, key=lambda t: (t.value, -t.number))


def _feasible(t: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in t.constraints.values())


def paired_test(trial: optuna.trial.FrozenTrial, reference: optuna.trial.FrozenTrial, stage: int
                ) -> dict[str, Any] | None:
    """One-sided exact McNemar of ``trial`` worse than ``reference`` at ``stage``; None when the
    two were not scored on the same images."""
    mine, theirs = stage_bits(trial, stage), stage_bits(reference, stage)
    if mine is None or theirs is None or len(mine) != len(theirs):
        return None
    if trial.user_attrs.get("split_hash") != reference.user_attrs.get("split_hash"):
        return None
    only_ref, only_mine = discordant(theirs, mine)
    return {"n": len(mine), "only_reference": only_ref, "only_trial": only_mine,
            "p_worse": mcnemar_exact(only_ref, only_mine, alternative="greater"),
            "reference": reference.number}


class PairedPruner(optuna.pruners.BasePruner):
    """Prune only on a significant paired deficit against the reference trial (module docs)."""

    def __init__(self, alpha: float = 0.05, min_images: int = 100, warmup_stages: int = 1
                 ) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha = {alpha}: must be in (0, 1)")
        self.alpha, self.min_images, self.warmup_stages = alpha, min_images, warmup_stages

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        stage = trial.last_step
        if trial.user_attrs.get("published"):
            return False  # the reference itself (and its seed repeats) always runs to the end
        if stage is None or stage + 1 < self.warmup_stages:
            return False
        reference = reference_trial(study, trial, stage)
        if reference is None:
            return False
        test = paired_test(trial, reference, stage)
        if test is None or test["n"] < self.min_images:
            return False
        return test["p_worse"] < self.alpha
