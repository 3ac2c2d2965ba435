"""Benchmark (not a test): certify COLT's MNIST ε=0.1 network on the first N MNIST test images.

    python benchmarks/certify_colt_mnist.py                 # first 100, HiGHS, 2 torch threads
    python benchmarks/certify_colt_mnist.py --n 20 --threads 1 --set lp_refine=true
    python benchmarks/certify_colt_mnist.py --full part0.jsonl part1.jsonl   # summarise a full run

Images 0-99 come from ERAN's CSV (``/work/shared/benchmarks/eran/mnist_test.csv``), more from the
IDX files of the full test set. The network is COLT's released state dict (or, with
``--model onnx``, the same weights from its ONNX export with the normalisation prepended). It writes
``benchmarks/certify_colt_mnist.md`` (or ``_full.md`` with ``--full``): counts per status, time per
input by deciding stage (mean / median / p95), the machine, and the anchor of VNN-COMP 2020:
MIPVerify (Gurobi) certified 100/100 of these images at a median of 3.4 s per input.

The full 10,000-image run uses the CLI, sharded, e.g.::

    python -m pipeline.certify --model benchmarks/../mnist_0.1.onnx --mean 0.1307 --std 0.3081 \\
        --dataset mnist --data-dir /work/shared/benchmarks/mnist --eps 0.1 --start 0 --end 5000 \\
        --threads 1 --out full_0.jsonl --no-progress
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.certify.cascade import Certifier  # noqa: E402
from pipeline.certify.cli import ResultsWriter, read_results, summarize  # noqa: E402
from pipeline.config import CertifyConfig, apply_overrides, from_dict  # noqa: E402

# The shared data folder (override with --data-root, e.g. a copy on another machine).
SHARED = Path("/work/shared/benchmarks")
PT = "colt/mnist_0.1_convmed_flat_2_2_100.pt"
ONNX = "colt/mnist_0.1.onnx"
CSV = "eran/mnist_test.csv"
MNIST_DIR = "mnist"
MEAN, STD, EPS = (0.1307,), (0.3081,), 0.1
ANCHOR = ("MIPVerify (Gurobi), VNN-COMP 2020, same network and images: 100/100 certified, "
          "median 3.4 s per input")
PAPER = "COLT paper: 97.1% certified on the full 10,000-image test set (natural accuracy 99.2%)"


def load_net(kind: str, root: Path):
    if kind == "onnx":
        from pipeline.certify.onnx_import import load_onnx

        return load_onnx(root / ONNX, MEAN, STD)
    from pipeline.nets import build_net, load_colt_state_dict

    net = build_net("convmed_2_2_100", (1, 28, 28), MEAN, STD)
    return load_colt_state_dict(net, root / PT)


def load_images(n: int, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if n <= 100:
        rows = np.loadtxt(root / CSV, delimiter=",", dtype=np.int64)[:n]
        return torch.tensor(rows[:, 1:] / 255.0).reshape(-1, 1, 28, 28), torch.tensor(rows[:, 0])
    from pipeline.config import DataConfig
    from pipeline.data import load_split

    ds = load_split(DataConfig(dataset="mnist", data_dir=str(root / MNIST_DIR), download=False),
                    "test")
    items = [ds[i] for i in range(min(n, len(ds)))]
    return torch.stack([x for x, _ in items]).double(), torch.tensor([y for _, y in items])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import highspy  # noqa: F401

    try:
        from importlib.metadata import version

        highs = version("highspy")
    except Exception:
        highs = "?"
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), highspy {highs}, Python "
            f"{platform.python_version()}")


def table(summary: dict) -> list[str]:
    lines = ["| deciding stage | inputs | mean s | median s | p95 s |", "|---|---|---|---|---|"]
    for method, s in summary["by_method"].items():
        lines.append(f"| {method} | {s['n']} | {s['time_mean_s']:.3f} | {s['time_median_s']:.3f}"
                     f" | {s['time_p95_s']:.3f} |")
    lines.append(f"| **all** | {summary['n']} | {summary['time_mean_s']:.3f} | "
                 f"{summary['time_median_s']:.3f} | {summary['time_p95_s']:.3f} |")
    return lines


def report(title: str, summary: dict, cfg: CertifyConfig | None, extra: list[str]) -> str:
    n = summary["n"]
    lines = [f"# {title}", "",
             f"COLT's MNIST ε=0.1 network (convmed_2_2_100), ε = {EPS}, HiGHS as MILP/LP solver.",
             "", "| status | count | % |", "|---|---|---|"]
    for s in ("certified", "falsified", "unknown", "misclassified"):
        lines.append(f"| {s} | {summary[s]} | {summary[f'{s}_pct']:.1f} |")
    lines += ["", f"Time per input by deciding stage ({n} inputs):", ""] + table(summary)
    lines += ["", f"Anchor: {ANCHOR}.", f"Paper: {PAPER}.", ""] + extra
    if cfg is not None:
        lines += ["", "CertifyConfig used:", "", "```", json.dumps(cfg.__dict__, indent=1),
                  "```"]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cfg = from_dict(CertifyConfig, apply_overrides({}, args.set))
    root = Path(args.data_root)
    net = load_net(args.model, root)
    images, labels = load_images(args.n, root)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    certifier = Certifier(net, cfg)
    setup = time.perf_counter() - t0
    done = read_results(args.jsonl) if args.resume and Path(args.jsonl).exists() else {}
    if not args.resume and Path(args.jsonl).exists():
        Path(args.jsonl).unlink()
    writer = ResultsWriter(args.jsonl)
    rows = []
    for i in range(len(labels)):
        if i in done:
            rows.append(done[i])
            continue
        result = certifier.certify(images[i], int(labels[i]), EPS, index=i)
        row = result.to_json()
        writer.write(row)
        rows.append(row)
        print(f"{i:4d} {row['status']:>13s} {row['method']:>16s} {row['time_s']:8.3f}s",
              flush=True)
    writer.close()
    total = time.perf_counter() - t0
    summary = summarize(rows)
    extra = [f"Machine: {machine()}.",
             f"Load average (1 min) before / after: {load_before[0]:.2f} / "
             f"{os.getloadavg()[0]:.2f} (the machine is shared; timings include that load).",
             f"Set-up (network copies, generator colouring) {setup:.2f} s; wall time "
             f"{total:.1f} s for {len(rows)} inputs. Per-input results: `{args.jsonl}`."]
    text = report(f"Certification of COLT's MNIST 0.1 network, first {len(rows)} test images",
                  summary, cfg, extra)
    Path(args.md).write_text(text)
    print(text)


def full(args: argparse.Namespace) -> None:
    """Summarise result files; a later file's line for an input supersedes an earlier one (the
    later tries of ``pipeline.certify --retry-unknown``)."""
    rows: dict[int, dict] = {}
    for path in args.full:
        for i, row in read_results(path, repair=False).items():
            if i in rows:  # a later try: the input's time is that of all its tries
                row = {**row, "time_s": row["time_s"] + rows[i]["time_s"],
                       "time_last_try_s": row["time_s"]}
            rows[i] = row
    summary = summarize([rows[i] for i in sorted(rows)])
    retried = [r for r in rows.values() if int(r.get("try", 1)) > 1]
    unknown = sorted(i for i, r in rows.items() if r["status"] == "unknown")
    falsified = sorted(i for i, r in rows.items() if r["status"] == "falsified")
    extra = [f"Machine: {machine()} (summary written here; the run itself: see the note).",
             f"Result files: {', '.join(f'`{p}`' for p in args.full)}.",
             f"Falsified indices: {falsified[:50]}{' ...' if len(falsified) > 50 else ''}.",
             f"Unknown indices: {unknown[:50]}{' ...' if len(unknown) > 50 else ''}."]
    if retried:
        counts = {s: sum(r["status"] == s for r in retried) for s in ("certified", "falsified",
                                                                      "unknown")}
        times = sorted(r.get("time_last_try_s", r["time_s"]) for r in retried)
        extra.append(f"Later tries: {len(retried)} inputs unknown after the first run were "
                     f"run through the cascade again ({', '.join(f'{k} {v}' for k, v in counts.items())}; "
                     f"time of the later try per input median {times[len(times) // 2]:.1f} s, "
                     f"max {times[-1]:.1f} s). The tables above count each input's last try, "
                     "with the time of all its tries.")
    if args.note:
        extra.append(args.note)
    what = (f"full test set ({len(rows)} images)" if len(rows) == 10000 else
            f"{len(rows)} test images")
    text = report(f"Certification of COLT's MNIST 0.1 network, {what}", summary, None, extra)
    Path(args.md).write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="first N test images (default 100)")
    p.add_argument("--model", choices=("pt", "onnx"), default="pt")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="CertifyConfig override (repeatable)")
    p.add_argument("--data-root", default=str(SHARED), help="folder with colt/, eran/, mnist/")
    p.add_argument("--jsonl", default=str(ROOT / "benchmarks" / "certify_colt_mnist.jsonl"))
    p.add_argument("--md", default=None)
    p.add_argument("--resume", action="store_true", help="keep the results already in --jsonl")
    p.add_argument("--full", nargs="+", help="summarise these JSONL files of a full run")
    p.add_argument("--note", help="a line added to the --full report")
    args = p.parse_args()
    if args.full:
        args.md = args.md or str(ROOT / "benchmarks" / "certify_colt_mnist_full.md")
        full(args)
    else:
        args.md = args.md or str(ROOT / "benchmarks" / "certify_colt_mnist.md")
        run(args)


if __name__ == "__main__":
    main()
