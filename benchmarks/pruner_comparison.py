"""Replay the median pruner and the paired pruner on trials that all ran to completion.

    PYTHONPATH=$PWD python benchmarks/pruner_comparison.py sqlite:///runs/i12/fidelity.db \
        sqlite:///runs/i12/samplers.db

Each study of the given storages was run with ``pruner = "none"``, so every trial reported all
its stages and finished. For each study the trials are fed, in their original order, to a fresh
in-memory study with the real pruner (Optuna's MedianPruner with the quickstart's settings, or
pipeline.pruning.PairedPruner); a trial that the pruner stops does not join the complete trials
later trials are compared with, exactly as in a live study. For every trial a pruner would stop,
its true final score is known: the script counts how many of them would have beaten the
published point (raw, and significantly: paired exact McNemar, two-sided p < 0.05).
"""

from __future__ import annotations

import sys

import optuna

from pipeline.pruning import BITS_ATTR, PairedPruner, stage_bits
from pipeline.stats import paired_difference

optuna.logging.set_verbosity(optuna.logging.WARNING)


def replay(trials: list[optuna.trial.FrozenTrial], pruner: optuna.pruners.BasePruner
           ) -> dict[int, int]:
    """{trial number: stage at which the pruner stops it} for the trials it stops."""
    sim = optuna.create_study(direction="maximize", pruner=pruner)
    stopped: dict[int, int] = {}
    for t in trials:
        live = sim.ask()
        for key in ("published", "split_hash"):
            if key in t.user_attrs:
                live.set_user_attr(key, t.user_attrs[key])
        pruned_at = None
        for step in sorted(t.intermediate_values):
            live.set_user_attr(BITS_ATTR.format(step), t.user_attrs[BITS_ATTR.format(step)])
            live.report(t.intermediate_values[step], step)
            if live.should_prune():
                pruned_at = step
                break
        if pruned_at is None:
            for k, v in t.constraints.items():
                live.set_constraint(k, v)
            sim.tell(live, t.value)
        else:
            stopped[t.number] = pruned_at
            sim.tell(live, state=optuna.trial.TrialState.PRUNED)
    return stopped


def main(urls: list[str]) -> None:
    pruners = {
        "median (startup 1, warmup 1 stage)": lambda: optuna.pruners.MedianPruner(
            n_startup_trials=1, n_warmup_steps=0),
        "paired McNemar (alpha 0.05, >= 100 images)": lambda: PairedPruner(0.05, 100, 1),
    }
    totals = {name: [0, 0, 0, 0] for name in pruners}  # stopped, beat raw, beat significantly, n
    print("| storage | study | pruner | stopped (trial@stage) | of them above published "
          "(raw) | significantly above (p<0.05) |")
    print("|---|---|---|---|---|---|")
    for url in urls:
        for name in optuna.get_all_study_names(url):
            study = optuna.load_study(study_name=name, storage=url)
            trials = [t for t in study.get_trials(deepcopy=False)
                      if t.state == optuna.trial.TrialState.COMPLETE and t.intermediate_values]
            published = next(t for t in trials if t.user_attrs.get("published"))
            last = max(published.intermediate_values)
            ref = stage_bits(published, last)
            for label, make in pruners.items():
                stopped = replay(trials, make())
                beat = sig = 0
                for number in stopped:
                    t = next(x for x in trials if x.number == number)
                    d = paired_difference(stage_bits(t, last), ref)
                    beat += d["diff"] > 0
                    sig += d["diff"] > 0 and d["p"] < 0.05
                tot = totals[label]
                tot[0] += len(stopped)
                tot[1] += beat
                tot[2] += sig
                tot[3] += len(trials)
                where = ", ".join(f"#{n}@{s}" for n, s in sorted(stopped.items())) or "none"
                print(f"| {url.rsplit('/', 1)[-1]} | {name} | {label} | {where} | {beat} | "
                      f"{sig} |")
    print()
    print("| pruner | trials replayed | stopped | stopped but above published (raw) | "
          "stopped but significantly above |")
    print("|---|---|---|---|---|")
    for label, (stopped, beat, sig, n) in totals.items():
        print(f"| {label} | {n} | {stopped} | {beat} | {sig} |")


if __name__ == "__main__":
    main(sys.argv[1:])
