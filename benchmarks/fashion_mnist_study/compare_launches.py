"""Issue 12, step 4: is the tuned launch better than the published one by more than the noise?

    PYTHONPATH=$PWD python benchmarks/fashion_mnist_study/compare_launches.py \\
        --storage sqlite:////work/runs_i12/fashion_mnist_0.1_i12.db --tuned 7 [--published 0] \\
        [--out benchmarks/fashion_mnist_study/i12/launches.md]

Reads the study's ``launches`` attribute (``--launch-best --seeds K`` writes one entry per seed,
each with its per-image test outcomes) and prints, as markdown:

* every launch: trial, training seed, test certified accuracy with its 95% Wilson interval;
* every tuned seed against every published seed, paired on the same test images: the difference
  in points with its 95% interval and the exact two-sided McNemar p-value;
* the seed spread of each side (max - min test certified accuracy over its seeds).

The verdict rule, fixed before looking: the tuned trial **beats** the published point when every
paired comparison is positive with p < 0.05 **and** the worst tuned seed is above the best
published seed (the difference is larger than the seed spread). Otherwise it says which part
failed and how large the differences and the spread were.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from pipeline.stats import paired_launches, wilson_interval

ALPHA = 0.05


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def compare(launches: list[dict], tuned: int, published: int) -> tuple[list[str], bool]:
    mine = [e for e in launches if e.get("trial") == tuned]
    ref = [e for e in launches if e.get("trial") == published]
    if not mine or not ref:
        raise SystemExit(f"error: need launches of trial {tuned} and of trial {published}; the "
                         f"study has launches of trials {sorted({e.get('trial') for e in launches})}")
    lines = ["| trial | seed | test cert % | 95% interval | n test |", "|---|---|---|---|---|"]
    for e in ref + mine:
        bits = e.get("test_cert_bits") or {}
        n = int(bits.get("n") or e.get("n_test") or 0)
        k = round(e["test_cert_acc"] * n)
        lo, hi = wilson_interval(k, n) if n else (float("nan"),) * 2
        lines.append(f"| {e['trial']} | {e.get('seed')} | {_pct(e['test_cert_acc'])} | "
                     f"{_pct(lo)}-{_pct(hi)} | {n} |")
    lines += ["", "| tuned seed | published seed | difference (points) | 95% interval | p |",
              "|---|---|---|---|---|"]
    significant = True
    for a in mine:
        for b in ref:
            d = paired_launches(a, b)
            significant &= d["diff"] > 0 and d["p"] < ALPHA
            lines.append(f"| {a.get('seed')} | {b.get('seed')} | {100 * d['diff']:+.1f} | "
                         f"{100 * d['lo']:+.1f} to {100 * d['hi']:+.1f} | {d['p']:.3g} |")
    acc_mine = [e["test_cert_acc"] for e in mine]
    acc_ref = [e["test_cert_acc"] for e in ref]
    spread = {"tuned": max(acc_mine) - min(acc_mine), "published": max(acc_ref) - min(acc_ref)}
    beyond = min(acc_mine) > max(acc_ref)
    lines += ["", f"Seed spread (max - min over seeds): tuned {_pct(spread['tuned'])} points "
                  f"({len(mine)} seeds), published {_pct(spread['published'])} points "
                  f"({len(ref)} seeds).", ""]
    beats = significant and beyond
    if beats:
        verdict = (f"**The tuned trial {tuned} beats the published point**: every paired "
                   f"comparison is positive with p < {ALPHA}, and its worst seed "
                   f"({_pct(min(acc_mine))}%) is above the published point's best "
                   f"({_pct(max(acc_ref))}%).")
    else:
        why = []
        if not significant:
            why.append(f"not every paired comparison is positive with p < {ALPHA}")
        if not beyond:
            why.append(f"the worst tuned seed ({_pct(min(acc_mine))}%) is not above the best "
                       f"published seed ({_pct(max(acc_ref))}%)")
        verdict = f"**No evidence that trial {tuned} beats the published point**: " + \
            "; ".join(why) + "."
    return lines + [verdict], beats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", required=True)
    p.add_argument("--study", default="fashion_mnist_0.1")
    p.add_argument("--tuned", type=int, required=True, help="the launched tuned trial")
    p.add_argument("--published", type=int, default=0, help="the published point's trial")
    p.add_argument("--out", help="also write the markdown here")
    args = p.parse_args(argv)
    study = optuna.load_study(study_name=args.study, storage=args.storage)
    lines, _ = compare(study.user_attrs.get("launches") or [], args.tuned, args.published)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
