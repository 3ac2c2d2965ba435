"""Before/after table of the floating-point error margin (issue 13) from two JSONL result files.

    python benchmarks/certify_fp_margin.py benchmarks/certify_fp_margin_before.jsonl \
        benchmarks/certify_fp_margin_after.jsonl

Prints a markdown table (certified / falsified / unknown / misclassified, median and mean time per
input, and per deciding stage) and the inputs whose status differs. The runs themselves are made
with the CLI (see benchmarks/certify_fp_margin.md).

    python benchmarks/certify_fp_margin.py --paired 200

times, in one process and alternating per input (so that a busy machine slows both alike), the
float64 DeepZ pass of the first stage and the error threshold that item 2 adds to it, on COLT's
MNIST 0.1 network at eps 0.1 (one torch thread).
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


def paired(n: int) -> None:
    import gzip
    import time

    import numpy as np
    import torch

    from pipeline.certify.cascade import Certifier
    from pipeline.certify.onnx_import import load_onnx
    from pipeline.certify.spec import Spec
    from pipeline.domains.zonotope import input_box

    torch.set_num_threads(1)
    shared = Path("/work/shared/benchmarks")
    net = load_onnx(shared / "colt" / "mnist_0.1.onnx", mean=(0.1307,), std=(0.3081,))
    raw = gzip.open(shared / "mnist" / "t10k-images-idx3-ubyte.gz").read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28) / 255.0
    labels = np.frombuffer(gzip.open(shared / "mnist" / "t10k-labels-idx1-ubyte.gz").read(),
                           np.uint8, offset=8)
    cert = Certifier(net)
    zono, tau_t, ratio = [], [], []
    for i in range(n):
        x = torch.tensor(images[i]).view(1, 1, 28, 28)
        lower, upper = input_box(x, 0.1)
        spec = Spec.robustness(torch.tensor([int(labels[i])]), 10)
        with torch.no_grad():
            t0 = time.perf_counter()
            run = cert.zonotope(lower, upper)
            lb = spec.lower(run.element)
            t1 = time.perf_counter()
            tau = cert.threshold(lower, upper, run, spec)
            t2 = time.perf_counter()
        zono.append(t1 - t0)
        tau_t.append(t2 - t1)
        # Certified by DeepZ with a zero tolerance but not above the error threshold:
        lost = bool((lb > 0).all() and not (lb > tau).all())
        ratio.append((float(tau.max()), lost))
    print(f"{n} inputs: DeepZ pass median {statistics.median(zono) * 1e3:.1f} ms, error "
          f"threshold median {statistics.median(tau_t) * 1e3:.1f} ms "
          f"({100 * statistics.median(tau_t) / statistics.median(zono):.0f}% of the pass); "
          f"largest threshold per input: median {statistics.median(r[0] for r in ratio):.3g}, "
          f"max {max(r[0] for r in ratio):.3g}; inputs DeepZ certifies at zero tolerance but "
          f"not above the threshold: {sum(1 for _, lost in ratio if lost)}")


if __name__ == "__main__":
    if sys.argv[1] == "--paired":
        paired(int(sys.argv[2]))
    else:
        main(*sys.argv[1:3])
