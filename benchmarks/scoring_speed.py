"""Validation-scoring throughput (images/s) of ``certified_accuracy`` before and after the
batched cascade, on a Fashion-MNIST net trained at the shipped CPU trial budget.

    PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE python benchmarks/scoring_speed.py \\
        [--checkpoint runs/scoring_speed/last.pt] [--n 500] [--paths old,new] [--old-ref cc2e383]

Without the checkpoint it first trains one (``python -m pipeline.train`` with
studies/fashion_mnist_0.1.toml at ``epochs_per_stage=1 mix_epochs=0 lr_step=1
data.max_train_images=10000``, a few minutes). ``new`` is this working tree; ``old`` is
``--old-ref``'s ``pipeline/`` and ``studies/`` (git archive into a temporary folder), run in a
subprocess, so both score the same images of the validation split, each with its own study
file's ``[certify_val]`` settings (``--set key=value`` overrides them for every path, e.g.
``--set slope_iters=0``). One torch thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "fashion_mnist_0.1.toml"
TRAIN_SET = ["epochs_per_stage=1", "mix_epochs=0", "lr_step=1", "data.max_train_images=10000"]

# Run inside the code under test (PYTHONPATH chooses old or new): prints one JSON line.
MEASURE = r"""
import json, sys, time, torch
torch.set_num_threads(1)
try:
    from pipeline.certify.scoring import certified_accuracy
except ImportError:  # the old path (before the split): in cascade.py
    from pipeline.certify.cascade import certified_accuracy
from pipeline.config import load_certify_config
from pipeline.data import make_loaders
from pipeline.train import load_trained_net
ckpt, study, n, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
net, cfg = load_trained_net(ckpt)
c = load_certify_config(study, table="certify_val", overrides=overrides)
loaders = make_loaders(cfg.data, cfg.batch_size, cfg.seed)
t = time.perf_counter()
out = certified_accuracy(net, loaders.valid, cfg.eps, c, max_inputs=n)
wall = time.perf_counter() - t
print(json.dumps({"n": out["n"], "nat": out["nat"], "pgd": out["pgd"], "cert": out["cert"],
                  "wall_s": wall, "per_image": out.get("per_image", {}).get("cert")}))
"""


def ensure_checkpoint(path: Path) -> Path:
    if path.exists():
        return path
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(STUDY), "--out",
           str(path.parent)] + [a for s in TRAIN_SET for a in ("--set", s)]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return path


def measure(code_root: Path, ckpt: Path, n: int, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    # Each path scores with its own study file's [certify_val] (the old one knows fewer keys).
    study = code_root / "studies" / STUDY.name
    out = subprocess.run([sys.executable, "-c", MEASURE, str(ckpt), str(study), str(n),
                          json.dumps(overrides)], env=env, cwd=code_root, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "runs" / "scoring_speed" / "last.pt"))
    p.add_argument("--n", type=int, default=500, help="validation images scored")
    p.add_argument("--paths", default="old,new", help="comma list of old, new")
    p.add_argument("--old-ref", default="cc2e383", help="git revision of the old path")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    ckpt = ensure_checkpoint(Path(args.checkpoint))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths.split(","):
            if path == "old":
                archive = subprocess.run(["git", "archive", args.old_ref, "pipeline", "studies"], cwd=ROOT,
                                         check=True, capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
                root = Path(tmp)
            elif path == "new":
                root = ROOT
            else:
                p.error(f"--paths: unknown path {path!r} (old, new)")
            r = measure(root, ckpt, args.n, args.overrides)
            results[path] = r
            print(f"{path:>4}: {r['n']} images in {r['wall_s']:.1f} s = "
                  f"{r['n'] / r['wall_s']:.2f} images/s; nat {r['nat']} pgd {r['pgd']} "
                  f"cert {r['cert']}", flush=True)
    if "old" in results and "new" in results:
        o, n = results["old"], results["new"]
        print(f"speed-up {o['wall_s'] / n['wall_s']:.2f}x; certified old {o['cert']} new "
              f"{n['cert']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
