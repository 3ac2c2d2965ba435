"""The batched cascade (Certifier.certify_batch, certified_accuracy, the CLI's batches and
workers) gives each input the verdict of the per-input path (Certifier.certify), and the CLI's
JSONL stays in index order and resumable with several workers.

    PYTHONPATH=$PWD python -m pytest -q tests/test_certify_batched.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.certify.cascade import Certifier, OpenInput
from pipeline.certify.scoring import certified_accuracy
from pipeline.certify.cli import certify_dataset, read_results
from pipeline.config import CertifyConfig
from pipeline.nets import build_net

SHARED = Path("/work/shared/benchmarks")
COLT_ONNX = SHARED / "colt" / "mnist_0.1.onnx"
MNIST_CSV = SHARED / "eran" / "mnist_test.csv"

pytestmark = pytest.mark.usefixtures("one_thread")


def random_net(seed: int, arch: str = "convmed_1_1_8", shape=(1, 12, 12)):
    torch.manual_seed(seed)
    return build_net(arch, shape, (0.2,), (0.4,), 10).eval().requires_grad_(False)


def data(net, n: int, seed: int, shape=(1, 12, 12), wrong: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=gen)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % 10  # some misclassified
    return x, y


def cfg(**kw) -> CertifyConfig:
    # MILP bounded by binaries (no node limit exists): small nets settle well inside the budget.
    base = dict(pgd_restarts=6, pgd_steps=20, slope_iters=40, timeout_per_input_s=600.0,
                max_binary_per_layer=6, max_binary_total=12)
    base.update(kw)
    return CertifyConfig(**base)


def verdicts(results):
    return [(r.index, r.status, r.method, r.predicted) for r in results]


@pytest.mark.parametrize("seed,arch,eps", [(0, "convmed_1_1_8", 0.02), (1, "fc_20_20", 0.03),
                                           (2, "convmed_1_1_8", 0.03), (3, "fc_30", 0.01)])
def test_batched_verdicts_equal_per_input(seed, arch, eps):
    shape = (1, 12, 12)
    net = random_net(seed, arch, shape)
    x, y = data(net, 14, seed, shape)
    c = cfg()
    cert = Certifier(net, c)
    single = [cert.certify(x[i], int(y[i]), eps, index=i) for i in range(len(y))]
    cert.max_batch = 7  # several chunks, the last one short
    batched = cert.certify_batch(x, y, eps, range(len(y)))
    assert verdicts(batched) == verdicts(single)
    statuses = {r.status for r in single}
    assert "misclassified" in statuses and len(statuses) >= 2
    for a, b in zip(batched, single):
        if a.status == "falsified":
            assert a.counterexample is not None
        assert set(a.stage_times) <= {"clean", "pgd_quick", "zonotope", "zonotope_slopes", "pgd",
                                      "lp", "milp"}
        assert a.time_s >= 0 and json.dumps(a.to_json())


def test_open_inputs_finish_like_the_per_input_path_after_pickling():
    import pickle

    net = random_net(5, "fc_20_20")
    x, y = data(net, 16, 5)
    c = cfg(slope_iters=5)  # few slope steps: more inputs reach the MILP
    cert = Certifier(net, c)
    out = cert.certify_batch(x, y, 0.04, range(16), finish=False)
    opened = [o for o in out if isinstance(o, OpenInput)]
    assert opened, "the test needs inputs left for LP/MILP"
    other = Certifier(net, c)
    finished = [other.finish(pickle.loads(pickle.dumps(o.to("cpu")))) if isinstance(o, OpenInput)
                else o for o in out]
    single = [cert.certify(x[i], int(y[i]), 0.04, index=i) for i in range(16)]
    assert verdicts(finished) == verdicts(single)


def test_certified_accuracy_matches_per_input_and_returns_per_image():
    net = random_net(7)
    x, y = data(net, 20, 7, wrong=3)
    c = cfg(milp=False)
    out = certified_accuracy(net, (x, y), 0.03, c, batch_size=8)
    cert = Certifier(net, c)
    single = [cert.certify(x[i], int(y[i]), 0.03, index=i) for i in range(20)]
    assert out["per_image"]["cert"] == [r.status == "certified" for r in single]
    assert out["per_image"]["nat"] == [r.status != "misclassified" for r in single]
    assert out["per_image"]["pgd"] == [r.status not in ("misclassified", "falsified")
                                       for r in single]
    assert out["cert"] == sum(out["per_image"]["cert"]) and out["n"] == 20
    json.dumps(out)  # stored as an Optuna user attribute


class ListData:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_cli_workers_keep_index_order_and_resume(tmp_path):
    net = random_net(4, "fc_20_20")
    x, y = data(net, 14, 4)
    c = cfg(slope_iters=5)
    ds = ListData(x, y)
    ref = certify_dataset(net, ds, eps=0.04, cfg=c, out=tmp_path / "one.jsonl", progress=False,
                          workers=1)
    out = tmp_path / "two.jsonl"
    certify_dataset(net, ds, eps=0.04, cfg=c, out=out, start=0, end=6, progress=False,
                    workers=2)
    # a torn last line, as a kill mid-write leaves it
    with out.open("ab") as fh:
        fh.write(b'{"index": 6, "status": "cert')
    summary = certify_dataset(net, ds, eps=0.04, cfg=c, out=out, progress=False, workers=2)
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(14))
    one = read_results(tmp_path / "one.jsonl")
    assert [(r["index"], r["status"], r["method"]) for r in lines] == \
        [(i, one[i]["status"], one[i]["method"]) for i in range(14)]
    assert summary["certified"] == ref["certified"] and summary["n"] == 14
    assert any(r["method"] == "milp" or "milp" in r["stages"] for r in lines), \
        "the test needs inputs that reach the MILP (the workers' part)"


def mnist_rows(n: int):
    rows = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64, max_rows=n)
    return torch.tensor(rows[:, 1:] / 255.0).reshape(-1, 1, 28, 28), torch.tensor(rows[:, 0])


@pytest.mark.slow
@pytest.mark.skipif(not (COLT_ONNX.exists() and MNIST_CSV.exists()),
                    reason="COLT's MNIST network or ERAN's CSV not available")
def test_colt_mnist_slice_batched_equals_per_input():
    from pipeline.certify.onnx_import import load_onnx

    net = load_onnx(COLT_ONNX, (0.1307,), (0.3081,)).eval()
    x, y = mnist_rows(40)
    # The MILP bounded by its binaries, the budget generous: no verdict depends on the clock.
    c = CertifyConfig(timeout_per_input_s=900.0, max_binary_per_layer=10, max_binary_total=20)
    cert = Certifier(net, c)
    batched = cert.certify_batch(x, y, 0.1, range(40))
    single = [cert.certify(x[i], int(y[i]), 0.1, index=i) for i in range(40)]
    assert verdicts(batched) == verdicts(single)
    assert sum(r.status == "certified" for r in single) >= 30
