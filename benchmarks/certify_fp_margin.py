"""Before/after table of the floating-point error margin (issue 13) from two JSONL result files.

    python benchmarks/certify_fp_margin.py benchmarks/certify_fp_margin_before.jsonl \
        benchmarks/certify_fp_margin_after.jsonl

Prints a markdown table (certified / falsified / unknown / misclassified, median and mean time per
input, and per deciding stage) and the inputs whose status differs. The runs themselves are made
with the CLI (see benchmarks/certify_fp_margin.md).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path

STATUSES = ("certified", "falsified", "unknown", "misclassified")


def load(path: str) -> dict[int, dict]:
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["index"])] = row
    return rows


def main(before_path: str, after_path: str) -> None:
    runs = {"before": load(before_path), "after": load(after_path)}
    print("| run | inputs | certified | falsified | unknown | misclassified | median s | "
          "mean s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        counts = Counter(r["status"] for r in rows.values())
        times = [float(r["time_s"]) for r in rows.values()]
        print(f"| {name} | {len(rows)} | " + " | ".join(str(counts[s]) for s in STATUSES) +
              f" | {statistics.median(times):.3f} | {statistics.mean(times):.3f} |")
    print()
    print("| run | " + " | ".join(f"{m} (n, median s)" for m in
                                   ("zonotope", "zonotope_slopes", "milp", "timeout")) + " |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():
        cells = []
        for method in ("zonotope", "zonotope_slopes", "milp", "timeout"):
            times = [float(r["time_s"]) for r in rows.values() if r["method"] == method]
            cells.append(f"{len(times)}, {statistics.median(times):.3f}" if times else "0")
        print(f"| {name} | " + " | ".join(cells) + " |")
    before, after = runs["before"], runs["after"]
    changed = [(i, before[i]["status"], before[i]["method"], after[i]["status"],
                after[i]["method"]) for i in sorted(set(before) & set(after))
               if (before[i]["status"], before[i]["method"]) !=
               (after[i]["status"], after[i]["method"])]
    print()
    print(f"Inputs whose verdict or deciding stage changed: {len(changed)}")
    for i, s0, m0, s1, m1 in changed:
        print(f"- {i}: {s0} ({m0}) -> {s1} ({m1})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
