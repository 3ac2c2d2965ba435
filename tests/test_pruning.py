"""The paired pruner prunes only on a significant paired deficit (synthetic per-image outcomes)."""

from __future__ import annotations

import random

import optuna
import pytest

from pipeline.pruning import BITS_ATTR, PairedPruner, reference_trial
from pipeline.stats import discordant, mcnemar_exact, pack_bits

N = 200
HASH = "abcd"


def _study(pruner: optuna.pruners.BasePruner) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", pruner=pruner)


def _add_reference(study: optuna.Study, bits: list[bool], published: bool = True) -> None:
    t = study.ask()
    t.set_user_attr("published", published)
    t.set_user_attr("split_hash", HASH)
    t.set_user_attr(BITS_ATTR.format(0), pack_bits(bits))
    t.report(sum(bits) / len(bits), 0)
    t.set_constraint("min_nat_acc", -1.0)
    study.tell(t, sum(bits) / len(bits))


def _candidate(study: optuna.Study, bits: list[bool], split_hash: str = HASH) -> optuna.Trial:
    t = study.ask()
    t.set_user_attr("split_hash", split_hash)
    t.set_user_attr(BITS_ATTR.format(0), pack_bits(bits))
    t.report(sum(bits) / len(bits), 0)
    return t


def _flip(bits: list[bool], rng: random.Random, p_lose: float, p_gain: float) -> list[bool]:
    return [(rng.random() >= p_lose) if b else (rng.random() < p_gain) for b in bits]


def test_prunes_exactly_the_significantly_worse_trials():
    alpha = 0.05
    study = _study(PairedPruner(alpha=alpha, min_images=50))
    rng = random.Random(0)
    ref = [rng.random() < 0.5 for _ in range(N)]
    _add_reference(study, ref)
    pruned = kept_insignificant = 0
    for k in range(120):
        # From clearly worse to clearly better than the reference.
        p_lose, p_gain = rng.uniform(0, 0.4), rng.uniform(0, 0.25)
        bits = _flip(ref, rng, p_lose, p_gain)
        trial = _candidate(study, bits)
        only_ref, only_mine = discordant(ref, bits)
        p = mcnemar_exact(only_ref, only_mine, alternative="greater")
        decision = trial.should_prune()
        assert decision == (p < alpha), (k, only_ref, only_mine, p)
        pruned += decision
        kept_insignificant += (not decision) and only_ref > only_mine
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if decision else
                   optuna.trial.TrialState.FAIL)
    # The synthetic study covers both kinds: significant deficits, and deficits within noise.
    assert pruned > 10 and kept_insignificant > 10


def test_never_prunes_a_worse_score_that_is_not_significant():
    study = _study(PairedPruner(alpha=0.05, min_images=50))
    ref = [True] * 100 + [False] * 100
    _add_reference(study, ref)
    # 8 fewer certified images (4 points) but 20 discordant pairs: p(6 vs 14) ~ 0.058, kept.
    bits = list(ref)
    for i in range(14):
        bits[i] = False
    for i in range(100, 106):
        bits[i] = True
    only_ref, only_mine = discordant(ref, bits)
    assert mcnemar_exact(only_ref, only_mine, "greater") >= 0.05
    assert not _candidate(study, bits).should_prune()
    # The same deficit without discordance noise (14 vs 0) is significant and pruned.
    worse = list(ref)
    for i in range(14):
        worse[i] = False
    assert _candidate(study, worse).should_prune()


def test_guards_min_images_other_split_and_published():
    study = _study(PairedPruner(alpha=0.05, min_images=N + 1))
    ref = [True] * N
    _add_reference(study, ref)
    assert not _candidate(study, [False] * N).should_prune()  # fewer images than the guard
    study = _study(PairedPruner(alpha=0.05, min_images=10))
    _add_reference(study, ref)
    assert not _candidate(study, [False] * N, split_hash="other").should_prune()
    assert _candidate(study, [False] * N).should_prune()
    t = _candidate(study, [False] * N)
    t.set_user_attr("published", True)  # a seed repeat of the published point
    assert not t.should_prune()


def test_reference_is_the_weakest_published_seed():
    """Seed repeats of the published point: a trial is pruned only when significantly worse
    than the weakest seed (seeds differ by more than the image noise)."""
    study = _study(PairedPruner(alpha=0.05, min_images=10))
    _add_reference(study, [True] * 150 + [False] * 50)   # the lucky seed
    _add_reference(study, [True] * 120 + [False] * 80)   # the weaker seed
    t = _candidate(study, [True] * 118 + [False] * 82)
    ref = reference_trial(study, study._storage.get_trial(t._trial_id), 0)
    assert ref.number == 1
    assert not t.should_prune()  # within noise of the weaker seed, far below the lucky one
    assert _candidate(study, [True] * 60 + [False] * 140).should_prune()


def test_reference_is_best_feasible_complete_without_published():
    study = _study(PairedPruner())
    _add_reference(study, [True] * 50 + [False] * 150, published=False)
    _add_reference(study, [True] * 120 + [False] * 80, published=False)
    t = _candidate(study, [False] * N)
    ref = reference_trial(study, study._storage.get_trial(t._trial_id), 0)
    assert ref.number == 1


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        PairedPruner(alpha=1.5)


# --- the study options around it: sampler, pruner, seed repeats, best trial ------------------

def _study_file(*overrides: str):
    from pipeline.study import load_study_file

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    return load_study_file(root / "studies/quickstart.toml", list(overrides))


def test_study_options_build_gp_sampler_and_paired_pruner():
    from pipeline.tune import make_pruner, make_sampler

    sf = _study_file("study.sampler=gp", "study.pruner=paired", "study.pruner_alpha=0.01")
    assert isinstance(make_sampler(sf), optuna.samplers.GPSampler)
    pruner = make_pruner(sf)
    assert isinstance(pruner, PairedPruner) and pruner.alpha == 0.01
    assert isinstance(make_pruner(_study_file("study.pruner=median")),
                      optuna.pruners.MedianPruner)


def test_seed_repeats_queue_published_point_with_k_seeds_and_metric_name():
    from pipeline.tune import VAL_CERT, create_study

    sf = _study_file("study.seed_repeats=3")
    study = create_study(sf, optuna.storages.InMemoryStorage())
    queued = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs.get("train_seed") for t in queued] == [sf.base.seed + k for k in range(3)]
    assert all(t.user_attrs["published"] and t.system_attrs["fixed_params"] == sf.published_knobs()
               for t in queued)
    assert study.metric_names == [VAL_CERT]


def test_best_trial_is_the_one_optuna_and_the_dashboard_mark(monkeypatch):
    """An infeasible trial with the highest certified accuracy is best nowhere."""
    from pipeline.tune import CONSTRAINT_ATTR, VAL_CERT, VAL_NAT, best_trial

    floor = 0.5
    study = optuna.create_study(direction="maximize")
    for nat, cert in ((0.9, 0.30), (0.4, 0.60), (0.8, 0.35), (0.45, 0.50)):
        t = study.ask()
        t.set_user_attr(VAL_NAT, nat)
        t.set_user_attr(VAL_CERT, cert)
        t.set_user_attr(CONSTRAINT_ATTR, floor - nat)
        t.set_constraint("min_nat_acc", floor - nat)
        # The objective's value rule: infeasible trials are shifted below every feasible one.
        study.tell(t, cert if nat >= floor else cert - 1.0)
    ours = best_trial(study, floor)
    assert ours.number == 2
    assert study.best_trial.number == ours.number
    dashboard = study._storage.get_best_trial(study._study_id)  # what optuna-dashboard shows
    assert dashboard.number == ours.number


def test_compare_to_published_calls_better_only_when_significant():
    from pipeline.tune import VAL_CERT, VAL_NAT, compare_to_published

    study = optuna.create_study(direction="maximize")

    def add(bits: list[bool], published: bool = False) -> optuna.trial.FrozenTrial:
        t = study.ask()
        t.set_user_attr("published", published)
        t.set_user_attr("split_hash", HASH)
        t.set_user_attr(BITS_ATTR.format(2), pack_bits(bits))
        t.set_user_attr(VAL_CERT, sum(bits) / len(bits))
        t.set_user_attr(VAL_NAT, 0.9)
        study.tell(t, sum(bits) / len(bits))
        return study.trials[-1]

    ref = [True] * 100 + [False] * 100
    add(ref, published=True)
    slightly = list(ref)
    for i in range(100, 106):
        slightly[i] = True  # +3 points, 6 vs 0 discordant: p = 0.031 two-sided
    clearly = list(ref)
    for i in range(100, 115):
        clearly[i] = True
    noisy = list(ref)
    for i in range(10):
        noisy[i] = False
    for i in range(100, 114):
        noisy[i] = True  # +2 points but 14 vs 10 discordant: not significant
    a, b, c = add(slightly), add(clearly), add(noisy)
    assert compare_to_published(study, a)["better"]
    assert compare_to_published(study, b)["better"]
    res = compare_to_published(study, c)
    assert res["diff"] > 0 and not res["better"] and res["p"] > 0.05
