"""Benchmark (not a test): the cheap certification stages of COLT's MNIST 0.1 network on a GPU.

    python benchmarks/certify_gpu.py --data-root DIR --out FILE.md [--n 100]

Times, per input, the cascade without MILP (clean check, attack, DeepZ zonotope in float64,
optimised ReLU slopes) on CUDA, and the batched validation scoring used by tuning trials
(``certified_accuracy``). DIR holds colt/mnist_0.1_convmed_flat_2_2_100.pt and
eran/mnist_test.csv, as ../shared/benchmarks does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from certify_colt_mnist import EPS, load_images, load_net  # noqa: E402

from pipeline.certify.cascade import Certifier  # noqa: E402
from pipeline.certify.scoring import certified_accuracy  # noqa: E402
from pipeline.certify.cli import summarize  # noqa: E402
from pipeline.config import CertifyConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(args.data_root)
    net = load_net("pt", root)
    images, labels = load_images(args.n, root)
    cfg = CertifyConfig(milp=False)
    certifier = Certifier(net, cfg, device=device)
    certifier.certify(images[0], int(labels[0]), EPS)  # warm-up (CUDA context, kernels)
    rows = []
    for i in range(len(labels)):
        rows.append(certifier.certify(images[i], int(labels[i]), EPS, index=i).to_json())
    summary = summarize(rows)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    batched = certified_accuracy(net, (images.float(), labels), EPS,
                                 CertifyConfig(pgd_restarts=1, pgd_steps=40, slope_iters=50,
                                               milp=False), device=device)
    batched_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [f"# Cheap certification stages on {name}", "",
             f"COLT's MNIST 0.1 network, first {len(rows)} test images, ε = {EPS}, MILP off, "
             f"torch {torch.__version__}.", "",
             f"certified {summary['certified']}, falsified {summary['falsified']}, unknown "
             f"{summary['unknown']}, misclassified {summary['misclassified']}", "",
             "| deciding stage | inputs | mean s | median s | p95 s |", "|---|---|---|---|---|"]
    for method, s in summary["by_method"].items():
        lines.append(f"| {method} | {s['n']} | {s['time_mean_s']:.4f} | "
                     f"{s['time_median_s']:.4f} | {s['time_p95_s']:.4f} |")
    lines += ["", f"Batched validation scoring (certified_accuracy, 40-step PGD, 50 slope "
                  f"steps) of the same {len(rows)} images: {batched_s:.2f} s "
                  f"({len(rows) / batched_s:.1f} images/s); result {batched}."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
