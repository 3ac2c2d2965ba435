"""TPE vs GP on the digits quickstart: best feasible validation certified accuracy per study.

    bash benchmarks/run_i12_measurements.sh samplers      # 2 samplers x 3 study seeds x 6 trials
    PYTHONPATH=$PWD python benchmarks/sampler_comparison.py sqlite:///runs/i12/samplers.db
"""

from __future__ import annotations

import statistics
import sys

import optuna

from pipeline.tune import VAL_CERT, VAL_NAT, best_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(url: str, min_nat: float = 0.5) -> None:
    rows: dict[str, list[float]] = {}
    print("| study | sampler | seed | trials | best feasible val cert % (trial) | mean val cert % "
          "of the model-guided trials | feasible |")
    print("|---|---|---|---|---|---|---|")
    for name in sorted(optuna.get_all_study_names(url)):
        study = optuna.load_study(study_name=name, storage=url)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        _, sampler, seed = name.split("_")
        # Trials 0 (published) and 1 are the startup trials (sampler_startup_trials = 2).
        guided = [t.user_attrs[VAL_CERT] for t in done if t.number >= 2]
        feasible = sum(t.user_attrs.get(VAL_NAT, 0) >= min_nat for t in done)
        try:
            best = best_trial(study, min_nat)
            b, bn = best.user_attrs[VAL_CERT], best.number
        except LookupError:
            b, bn = float("nan"), -1
        rows.setdefault(sampler, []).append(b)
        print(f"| {name} | {sampler} | {seed[1:]} | {len(done)} | {100 * b:.1f} (#{bn}) | "
              f"{100 * statistics.mean(guided) if guided else float('nan'):.1f} | "
              f"{feasible}/{len(done)} |")
    print()
    print("| sampler | studies | with a feasible trial | best feasible val cert % (0 when "
          "none is feasible): mean | min | max |")
    print("|---|---|---|---|---|---|")
    for sampler, best in rows.items():
        found = sum(b == b for b in best)
        best = [b if b == b else 0.0 for b in best]
        print(f"| {sampler} | {len(best)} | {found} | {100 * statistics.mean(best):.1f} | "
              f"{100 * min(best):.1f} | {100 * max(best):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])
