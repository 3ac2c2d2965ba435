"""Tests for pipeline.certify.milp / cascade / cli: exactness of the MILP against enumeration,
soundness of zonotopes with any slopes, LP tightening and generator compression, the cascade's
verdicts against strong attacks, COLT's MNIST network, and the command line (resume, bad input,
VNN-LIB)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from pipeline.attacks import pgd_attack
from pipeline.certify.cascade import Certifier
from pipeline.certify.scoring import certified_accuracy
from pipeline.certify.spec import CertifyError, Spec
from pipeline.certify.cli import main as cli_main
from pipeline.certify.cli import read_results
from pipeline.certify.milp import (
    GeneratorCompression,
    MilpEncoder,
    lp_tighten,
    run_zonotope,
    solve_disjunct,
)
from pipeline.certify.solvers import gurobi_available
from pipeline.config import CertifyConfig
from pipeline.domains.zonotope import input_box
from pipeline.nets import build_net, load_colt_state_dict

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path("/work/shared/benchmarks")
COLT_PT = SHARED / "colt" / "mnist_0.1_convmed_flat_2_2_100.pt"
COLT_ONNX = SHARED / "colt" / "mnist_0.1.onnx"
MNIST_CSV = SHARED / "eran" / "mnist_test.csv"
MNIST_DIR = SHARED / "mnist"
CIFAR_SPEC = (SHARED / "vnncomp2022_cifar2020" / "vnnlib"
              / "cifar10_spec_idx_0_eps_0.00784_n1.vnnlib.gz")

needs_colt = pytest.mark.skipif(not (COLT_PT.exists() and MNIST_CSV.exists()),
                                reason="COLT's MNIST network or ERAN's CSV not available")


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


# ---------------------------------------------------------------------------------------------
# Tiny networks and the ground truth by enumeration of activation patterns


def tiny_net(seed: int, n_in: int, hidden: tuple[int, ...], n_out: int = 3, scale: float = 1.0,
             mean: float = 0.0, std: float = 1.0):
    """A random fc net on (1, 1, n_in) inputs (exact_min assumes mean 0 and std 1)."""
    torch.manual_seed(seed)
    net = build_net("fc_" + "_".join(map(str, hidden)), (1, 1, n_in), (mean,), (std,), n_out)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net.eval().requires_grad_(False)


def layers_of(net) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(b.weight.detach().double().numpy(), b.bias.detach().double().numpy())
            for b in net.blocks if hasattr(b, "weight")]


def interval_bounds(layers, lo, up):
    """Independent IBP pre-activation bounds of each hidden layer (numpy)."""
    out = []
    for w, b in layers[:-1]:
        c, r = (lo + up) / 2, (up - lo) / 2
        zc, zr = w @ c + b, np.abs(w) @ r
        out.append((zc - zr, zc + zr))
        lo, up = np.maximum(zc - zr, 0), np.maximum(zc + zr, 0)
    return out


def exact_min(net, lo: np.ndarray, up: np.ndarray, c: np.ndarray) -> float:
    """min over the box of c·net(x), by one LP in x per activation pattern of the unstable
    neurons (stable ones fixed by interval bounds; with all sign constraints explicit)."""
    layers = layers_of(net)
    bounds = interval_bounds(layers, lo, up)
    unstable = [np.flatnonzero((l < 0) & (u > 0)) for l, u in bounds]
    best = math.inf
    n = len(lo)
    for pattern in itertools.product([0, 1], repeat=sum(len(u) for u in unstable)):
        pos = 0
        # Affine map of x through the pattern: h = M x + v.
        m, v = np.eye(n), np.zeros(n)
        a_ub, b_ub = [], []
        for (w, b), (l, u), un in zip(layers[:-1], bounds, unstable):
            zm, zv = w @ m, w @ v + b
            active = (l >= 0).astype(float)
            for j in un:
                active[j] = pattern[pos]
                pos += 1
            for j in range(len(zv)):
                if l[j] < 0 < u[j]:  # sign constraint of the chosen phase
                    s = -1.0 if active[j] else 1.0  # active: z >= 0 <=> -z <= 0
                    a_ub.append(s * zm[j])
                    b_ub.append(-s * zv[j])
            m, v = active[:, None] * zm, active * zv
        w, b = layers[-1]
        obj_m, obj_v = c @ (w @ m), c @ (w @ v + b)
        res = linprog(obj_m, A_ub=np.array(a_ub) if a_ub else None,
                      b_ub=np.array(b_ub) if b_ub else None, bounds=list(zip(lo, up)),
                      method="highs")
        if res.status == 0:
            best = min(best, res.fun + obj_v)
    return best


def attack_min(net, lo: np.ndarray, up: np.ndarray, c: np.ndarray, samples: int = 20000) -> float:
    """Best (lowest) c·net(x) found by dense sampling, the corners and PGD steps."""
    gen = torch.Generator().manual_seed(0)
    lo_t, up_t = torch.tensor(lo), torch.tensor(up)
    pts = lo_t + (up_t - lo_t) * torch.rand(samples, len(lo), dtype=torch.float64, generator=gen)
    corners = torch.tensor(list(itertools.product(*zip(lo, up))), dtype=torch.float64)
    net64 = net.double()
    x = torch.cat([pts, corners])
    ct = torch.tensor(c)
    for _ in range(30):  # PGD on the objective from every sample (projected by clipping)
        x.requires_grad_(True)
        val = (net64(x.view(-1, 1, 1, len(lo))) @ ct).sum()
        (g,) = torch.autograd.grad(val, x)
        x = torch.max(torch.min(x.detach() - 0.02 * (up_t - lo_t) * g.sign(), up_t), lo_t)
    with torch.no_grad():
        vals = net64(torch.cat([pts, corners, x]).view(-1, 1, 1, len(lo))) @ ct
    net.float()
    return float(vals.min())


def box_for(seed: int, n_in: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.rand(1, 1, 1, n_in, dtype=torch.float64, generator=gen)
    return input_box(x, eps)


# ---------------------------------------------------------------------------------------------
# Exactness of the MILP


@pytest.mark.parametrize("seed", range(12))
def test_milp_from_input_with_all_binaries_is_exact(seed):
    n_in = 2 + seed % 3
    hidden = ((4, 4), (6, 6), (5, 3))[seed % 3]
    net = tiny_net(seed, n_in, hidden, scale=1.5)
    lo, up = box_for(seed, n_in, eps=0.25)
    net64 = net.double()
    run = run_zonotope(net64, lo, up, all_bounds=True)
    enc = MilpEncoder(net64).encode(lo, up, run, start=-1, max_binary_per_layer=100,
                                    max_binary_total=100)
    assert enc.complete
    c = np.array([1.0, -1.0, 0.0])
    res = solve_disjunct(enc, c[None], np.zeros(1), early_stop=False, time_limit_s=30)
    truth = exact_min(net.float(), lo.numpy().ravel(), up.numpy().ravel(), c)
    assert res.status == "optimal"
    assert res.bound == pytest.approx(truth, abs=1e-5)
    assert res.value == pytest.approx(truth, abs=1e-5)
    # zonotope bound <= MILP optimum <= best attack value
    from pipeline.certify.spec import Spec

    spec = Spec.disjunctive([(c[None], np.zeros(1))])
    zono = float(spec.lower(run_zonotope(net64, lo, up).element)[0, 0])
    best_attack = attack_min(net.float(), lo.numpy().ravel(), up.numpy().ravel(), c)
    assert zono <= res.bound + 1e-9
    assert res.bound <= best_attack + 1e-7


@pytest.mark.parametrize("seed", range(6))
def test_partial_binaries_give_a_valid_lower_bound(seed):
    net = tiny_net(seed, 3, (6, 6), scale=1.5)
    lo, up = box_for(seed, 3, eps=0.3)
    net64 = net.double()
    c = np.array([0.0, 1.0, -1.0])
    truth = exact_min(net.float(), lo.numpy().ravel(), up.numpy().ravel(), c)
    previous = -math.inf
    for n_bin in (0, 2, 4, 100):
        run = run_zonotope(net64, lo, up, all_bounds=True)
        enc = MilpEncoder(net64).encode(lo, up, run, start=-1, max_binary_per_layer=n_bin,
                                        max_binary_total=n_bin)
        res = solve_disjunct(enc, c[None], np.zeros(1), early_stop=False)
        assert res.bound <= truth + 1e-6
        previous = max(previous, res.bound)
    assert previous == pytest.approx(truth, abs=1e-5)  # all binaries: exact


@pytest.mark.parametrize("seed", range(4))
def test_milp_from_a_latent_zonotope_is_sound_and_beats_the_zonotope(seed):
    net = tiny_net(seed, 3, (6, 6, 5), scale=1.5)
    lo, up = box_for(seed, 3, eps=0.3)
    net64 = net.double()
    c = np.array([1.0, 0.0, -1.0])
    truth = exact_min(net.float(), lo.numpy().ravel(), up.numpy().ravel(), c)
    encoder = MilpEncoder(net64)
    spec = Spec.disjunctive([(c[None], np.zeros(1))])
    zono = float(spec.lower(run_zonotope(net64, lo, up).element)[0, 0])
    for start in (2, 3, 4, 5):
        eff = encoder.effective_start(start, len(net.blocks) - 1)
        run = run_zonotope(net64, lo, up, all_bounds=True, keep=(eff,))
        enc = encoder.encode(lo, up, run, start=start, max_binary_per_layer=100,
                             max_binary_total=100)
        res = solve_disjunct(enc, c[None], np.zeros(1), early_stop=False)
        assert zono - 1e-9 <= res.bound <= truth + 1e-6


def test_gurobi_and_highs_agree():
    if not gurobi_available():
        pytest.skip("no usable Gurobi licence")
    for seed in range(6):
        net = tiny_net(seed, 3, (5, 5), scale=1.5)
        lo, up = box_for(seed, 3, eps=0.2)
        net64 = net.double()
        run = run_zonotope(net64, lo, up, all_bounds=True)
        verdicts = {}
        for solver in ("highs", "gurobi"):
            enc = MilpEncoder(net64).encode(lo, up, run, start=-1, max_binary_per_layer=100,
                                            max_binary_total=100)
            for k, c in enumerate(([1.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, -1.0])):
                res = solve_disjunct(enc, np.array([c]), np.zeros(1), solver=solver,
                                     early_stop=False)
                assert res.solver == solver
                verdicts.setdefault(k, []).append((res.verified, res.bound))
        for (v1, b1), (v2, b2) in verdicts.values():
            assert v1 == v2
            assert b1 == pytest.approx(b2, abs=1e-5)


def test_multi_row_disjunct_objective():
    """min max_i (A_i y - b_i) over the box, against enumeration of a grid."""
    net = tiny_net(3, 2, (5, 5), scale=1.5)
    lo, up = box_for(3, 2, eps=0.3)
    net64 = net.double()
    A = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    b = np.array([0.1, -0.2])
    run = run_zonotope(net64, lo, up, all_bounds=True)
    enc = MilpEncoder(net64).encode(lo, up, run, start=-1, max_binary_per_layer=100,
                                    max_binary_total=100)
    res = solve_disjunct(enc, A, b, early_stop=False)
    g = torch.stack(torch.meshgrid(*[torch.linspace(float(lo.view(-1)[i]), float(up.view(-1)[i]),
                                                    301, dtype=torch.float64)
                                     for i in range(2)], indexing="ij"), -1).view(-1, 1, 1, 2)
    with torch.no_grad():
        y = net64(g).numpy()
    grid_min = (y @ A.T - b).max(1).min()
    assert res.bound <= grid_min + 1e-7
    assert res.bound >= grid_min - 0.05  # the grid is fine enough to get close


# ---------------------------------------------------------------------------------------------
# Soundness of zonotopes, slopes, compression and LP tightening


def small_convnet(seed: int = 0):
    torch.manual_seed(seed)
    net = build_net("convmed_1_1_8", (1, 20, 20), (0.2,), (0.4,), 10).eval()
    return net.requires_grad_(False)


def _samples(lo: torch.Tensor, up: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *lo.shape[1:])
    uniform = lo + (up - lo) * torch.rand(shape, dtype=torch.float64, generator=gen)
    corners = torch.where(torch.rand(shape, generator=gen) < 0.5, lo, up)
    return torch.cat([uniform, corners])


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_random_slopes_give_bounds_that_contain_sampled_outputs(kind):
    net = tiny_net(5, 4, (8, 8), n_out=4, scale=1.5) if kind == "fc" else small_convnet()
    net = net.double()
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(1, *net.input_shape, dtype=torch.float64, generator=gen)
    lo, up = input_box(x, 0.15)
    comp = GeneratorCompression.for_net(net) if kind == "conv" else None
    pts = _samples(lo, up, 2000)
    for trial in range(3):
        shapes = net.shapes()
        slopes = {r: torch.rand(1, *shapes[r], dtype=torch.float64, generator=gen)
                  for r in net.relu_indices}
        run = run_zonotope(net, lo, up, slopes=slopes, all_bounds=True, compression=comp)
        with torch.no_grad():
            z = pts
            for i, block in enumerate(net.blocks):
                if block.is_relu:
                    l, u = run.pre_bounds[i]
                    assert bool((z >= l - 1e-9).all() and (z <= u + 1e-9).all())
                z = block(z)
                l, u = run.block_bounds[i]
                assert bool((z.reshape(len(z), -1) >= l.reshape(1, -1) - 1e-9).all())
                assert bool((z.reshape(len(z), -1) <= u.reshape(1, -1) + 1e-9).all())
            # the final zonotope's margins bound the sampled margins
            spec = Spec.robustness(torch.tensor([0]), z.shape[1])
            lb = spec.lower(run.element)[0]
            assert bool((spec.margins(z).min(0).values >= lb - 1e-9).all())


def test_generator_compression_is_exact():
    net = small_convnet(1).double()
    comp = GeneratorCompression.for_net(net)
    assert comp is not None and comp.n_colors < 0.5 * 400 and comp.fuse_block is not None
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 20, 20, dtype=torch.float64, generator=gen)
    lo, up = input_box(x, 0.1)
    slopes = {r: torch.rand(3, *net.shapes()[r], dtype=torch.float64, generator=gen)
              for r in net.relu_indices}
    plain = run_zonotope(net, lo, up, slopes=slopes, all_bounds=True, keep=(3, 6))
    packed = run_zonotope(net, lo, up, slopes=slopes, all_bounds=True, keep=(3, 6),
                          compression=comp)
    assert torch.allclose(plain.element.center, packed.element.center, atol=1e-10)
    assert torch.allclose(plain.element.generators, packed.element.generators, atol=1e-10)
    for r in plain.pre_bounds:
        assert torch.allclose(plain.pre_bounds[r][0], packed.pre_bounds[r][0], atol=1e-10)
    for k in (3, 6):
        assert torch.allclose(plain.elements[k].generators, packed.elements[k].generators,
                              atol=1e-10)


def test_lp_tightening_is_sound_and_tighter():
    net = small_convnet(2).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 20, 20, dtype=torch.float64, generator=gen)
    lo, up = input_box(x, 0.1)
    run = run_zonotope(net, lo, up, end=3, all_bounds=True)
    run.pre_bounds[4] = run.block_bounds[3]
    tr = lp_tighten(MilpEncoder(net), lo, up, run, 4, max_neurons=40)
    l0, u0 = (t.detach().reshape(-1).numpy() for t in run.block_bounds[3])
    assert tr.attempted > 0 and tr.solved > 0
    assert (tr.lower >= l0 - 1e-12).all() and (tr.upper <= u0 + 1e-12).all()
    assert (tr.lower > l0 + 1e-6).any() or (tr.upper < u0 - 1e-6).any()
    with torch.no_grad():
        z = net.forward_until(3, _samples(lo, up, 3000)).reshape(-1, len(l0)).numpy()
    slack = 1e-6 * np.maximum(1, np.abs(z))
    assert (z >= tr.lower - slack).all() and (z <= tr.upper + slack).all()


# ---------------------------------------------------------------------------------------------
# The cascade


def fast_cfg(**kw) -> CertifyConfig:
    base = dict(pgd_restarts=10, pgd_steps=30, slope_iters=30, timeout_per_input_s=20.0)
    base.update(kw)
    return CertifyConfig(**base)


def test_cascade_verdicts_agree_with_strong_attacks():
    """Certified inputs survive a strong attack; falsified ones carry confirmed counterexamples;
    on tiny nets the complete MILP leaves nothing unknown."""
    statuses = set()
    for seed in range(8):
        net = tiny_net(seed, 3, (6, 6), n_out=3, scale=1.5, mean=0.5, std=0.15)
        cert = Certifier(net, fast_cfg(milp_from_input=True, max_binary_per_layer=100,
                                       max_binary_total=100))
        gen = torch.Generator().manual_seed(seed)
        for j in range(5):
            x = torch.rand(1, 1, 1, 3, generator=gen)
            label = int(net(x).argmax(1)) if j % 4 else int(torch.randint(3, (1,), generator=gen))
            eps = (0.02, 0.05, 0.2, 0.5, 0.9)[j]
            res = cert.certify(x, label, eps, index=j)
            statuses.add(res.status)
            lo, up = input_box(x.double(), eps)
            if res.status == "certified":
                attack = pgd_attack(net, x.repeat(20, 1, 1, 1), torch.tensor([label] * 20), eps,
                                    steps=60, step_size=0.05, restarts=5)
                assert not bool(attack.found.any())
                assert all(v > cert.cfg.margin_tolerance for v in res.bounds.values())
            elif res.status == "falsified":
                cex = torch.tensor(res.counterexample, dtype=torch.float64).view(1, 1, 1, 3)
                assert bool((cex >= lo).all() and (cex <= up).all())
                assert int(net.double()(cex).argmax(1)) != label
                net.float()
            elif res.status == "misclassified":
                assert int(net(x).argmax(1)) != label
            else:
                pytest.fail(f"a complete MILP left seed {seed} input {j} {res.status}")
    assert {"certified", "falsified"} <= statuses


def test_complete_milp_alone_decides_every_input_with_confirmed_counterexamples():
    """With the attacks off, the complete MILP from the input box must decide each input: a
    positive bound certifies, a negative optimum is a counterexample that a forward pass
    confirms; the verdicts match enumeration of activation patterns."""
    statuses = []
    for seed in range(6):
        net = tiny_net(seed, 3, (5, 5), n_out=3, scale=1.5)
        cert = Certifier(net, fast_cfg(milp_from_input=True, max_binary_per_layer=100,
                                       max_binary_total=100, pgd_restarts=0,
                                       pgd_quick_restarts=0, slope_iters=0))
        for j, eps in enumerate((0.05, 0.2, 0.6)):
            lo, up = box_for(seed, 3, eps)
            x = (lo + up) / 2
            label = int(net.double()(x).argmax(1))
            net.float()
            res = cert.certify_box(x, lo, up, label)
            truth = min(exact_min(net, lo.numpy().ravel(), up.numpy().ravel(),
                                  np.eye(3)[label] - np.eye(3)[k]) for k in range(3) if k != label)
            statuses.append(res.status)
            if res.status == "falsified":
                assert res.method == "milp"
                cex = torch.tensor(res.counterexample, dtype=torch.float64).view(1, 1, 1, 3)
                assert bool((cex >= lo).all() and (cex <= up).all())
                assert int(net.double()(cex).argmax(1)) != label
                net.float()
                assert truth < 0
            else:
                assert res.status == "certified", (seed, j, res.status, res.method)
                assert truth > 0
    assert {"certified", "falsified"} <= set(statuses)
    assert any(s == "falsified" for s in statuses)


def test_nan_is_never_certified():
    net = tiny_net(0, 3, (4, 4))
    cert = Certifier(net, fast_cfg())
    x = torch.full((1, 1, 1, 3), 0.5)
    label = int(net(x).argmax(1))
    assert cert.certify(x, label, 0.0).status == "certified"  # a point: trivially robust
    x_nan = x.clone()
    x_nan[0, 0, 0, 1] = float("nan")
    res = cert.certify(x_nan, label, 0.01)
    assert res.status == "unknown" and res.method == "nonfinite"
    bad = tiny_net(0, 3, (4, 4))
    with torch.no_grad():
        bad.blocks[2].weight[0, 0] = float("nan")
    res = Certifier(bad, fast_cfg()).certify(x, label, 0.0)
    assert res.status != "certified"
    inf_net = tiny_net(0, 3, (4, 4))
    with torch.no_grad():
        inf_net.blocks[-1].bias[0] = float("inf")
    assert Certifier(inf_net, fast_cfg()).certify(x, 0, 0.01).status != "certified"
    with pytest.raises(CertifyError):
        cert.certify(x, label, -0.1)
    with pytest.raises(CertifyError):
        cert.certify(torch.zeros(5), label, 0.1)


def test_general_property_and_timeout():
    net = tiny_net(2, 2, (5, 5), scale=1.5)
    cert = Certifier(net, fast_cfg(milp_from_input=True, max_binary_per_layer=100,
                                   max_binary_total=100))
    lo, up = box_for(2, 2, eps=0.2)
    with torch.no_grad():
        y = net.double()(((lo + up) / 2)).numpy()[0]
    net.float()
    safe = [(np.array([[1.0, 0.0, 0.0]]), np.array([y[0] - 100.0]))]  # y0 <= y0 - 100: empty
    assert cert.verify_property(lo, up, safe).status == "certified"
    unsafe = [(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), np.array([y[0] + 1, y[1] + 1]))]
    res = cert.verify_property(lo, up, unsafe)
    assert res.status == "falsified" and res.counterexample is not None


def test_certified_accuracy_counts():
    net = small_convnet(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 20, 20, generator=gen)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10  # three misclassified
    out = certified_accuracy(net, (x, y), 0.002, fast_cfg(milp=False), max_inputs=10)
    assert out["n"] == 10 and out["nat"] == 7
    assert out["cert"] <= out["pgd"] <= out["nat"]
    assert out["cert"] >= 1
    cert = Certifier(net, fast_cfg(milp=False))
    single = sum(cert.certify(x[i], int(y[i]), 0.002, index=i).status == "certified"
                 for i in range(10))
    assert single == out["cert"]


# ---------------------------------------------------------------------------------------------
# COLT's MNIST network


def colt_net():
    net = build_net("convmed_2_2_100", (1, 28, 28), (0.1307,), (0.3081,))
    return load_colt_state_dict(net, COLT_PT).eval()


def mnist_rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)[:n]
    return torch.tensor(rows[:, 1:] / 255.0).reshape(-1, 1, 28, 28), torch.tensor(rows[:, 0])


@needs_colt
@pytest.mark.slow
def test_colt_mnist_first_images_certified_at_0_1():
    """Images 0-17 through the cascade's stages before the MILP (attack, zonotope, slopes).

    These are bounded by iteration counts, not by the clock: the timeout is set out of reach,
    so the outcome does not depend on how busy the machine is. (The MILP, bounded only by
    seconds, would decide the few left unknown; it is tested on small nets elsewhere.)"""
    net = colt_net()
    x, y = mnist_rows(18)
    cert = Certifier(net, CertifyConfig(milp=False, timeout_per_input_s=1e9))
    methods, statuses = [], []
    for i in range(len(y)):
        res = cert.certify(x[i], int(y[i]), 0.1, index=i)
        assert res.predicted == int(y[i])
        # COLT's network is robust on these images: nothing may be falsified, nothing times out.
        assert res.status in ("certified", "unknown"), (i, res.status, res.method)
        assert res.method != "timeout", i
        methods.append(res.method)
        statuses.append(res.status)
    assert methods.count("zonotope") >= 14
    assert statuses.count("certified") >= 14


@needs_colt
def test_colt_mnist_deepz_and_falsified_at_large_eps():
    net = colt_net()
    x, y = mnist_rows(10)
    # At 0.3 the zonotopes are large (thousands of crossing ReLUs): no slopes, no MILP here.
    cert = Certifier(net, CertifyConfig(slope_iters=0, pgd_restarts=5, pgd_steps=50,
                                        milp=False, timeout_per_input_s=10))
    for i in (0, 1, 2):  # DeepZ alone at 0.1
        res = cert.certify(x[i], int(y[i]), 0.1, index=i)
        assert (res.status, res.method, res.predicted) == ("certified", "zonotope", int(y[i]))
    falsified = 0
    net64 = colt_net().double()
    for i in range(10):
        res = cert.certify(x[i], int(y[i]), 0.3, index=i)
        if res.status == "falsified":
            falsified += 1
            cex = torch.tensor(res.counterexample, dtype=torch.float64).view(1, 1, 28, 28)
            lo, up = input_box(x[i:i + 1].double(), 0.3)
            assert bool((cex >= lo).all() and (cex <= up).all())
            with torch.no_grad():
                assert int(net64(cex).argmax(1)) != int(y[i])
        elif res.status == "certified":  # then no attack may succeed
            attack = pgd_attack(net, x[i:i + 1].float().repeat(10, 1, 1, 1),
                                y[i:i + 1].repeat(10), 0.3, steps=50, step_size=0.05)
            assert not bool(attack.found.any())
    assert falsified >= 3


# ---------------------------------------------------------------------------------------------
# Command line


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in args] + ["--no-progress", "--threads", "1"])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_colt
def test_cli_writes_and_resumes_jsonl(tmp_path, capsys):
    if not (COLT_ONNX.exists() and (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()):
        pytest.skip("COLT ONNX file or MNIST IDX files not available")
    out = tmp_path / "res.jsonl"
    base = ["--model", COLT_ONNX, "--mean", "0.1307", "--std", "0.3081", "--dataset", "mnist",
            "--data-dir", MNIST_DIR, "--eps", "0.1", "--start", "0", "--end", "3", "--out", out,
            "--set", "milp=false"]
    code, stdout, _ = run_cli(base, capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(r["status"] == "certified" and r["method"] == "zonotope" for r in rows)
    assert "certified 3 (100.0%)" in stdout
    # resume: nothing recomputed
    before = out.read_bytes()
    code, stdout, _ = run_cli(base, capsys)
    assert code == 0 and out.read_bytes() == before and "3 inputs" in stdout
    # a torn last line is dropped and recomputed
    out.write_bytes(before[:-25])
    assert sorted(read_results(out, repair=False)) == [0, 1]
    code, _, _ = run_cli(base, capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    # resuming into a file of another eps is bad input, and leaves it alone
    before = out.read_bytes()
    code, _, stderr = run_cli([a if a != "0.1" else "0.2" for a in base], capsys)
    assert code == 2 and "eps" in stderr and out.read_bytes() == before


def test_cli_retry_unknown_reruns_only_unknown_inputs(tmp_path, capsys):
    """COLT's tries: a cheap first run leaves inputs unknown; --retry-unknown with the full
    cascade runs exactly those again, appends their new lines (try 2), and the summary counts the
    last line of each input."""
    if not (COLT_ONNX.exists() and (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()):
        pytest.skip("COLT ONNX file or MNIST IDX files not available")
    out = tmp_path / "res.jsonl"
    base = ["--model", COLT_ONNX, "--mean", "0.1307", "--std", "0.3081", "--dataset", "mnist",
            "--data-dir", MNIST_DIR, "--eps", "0.14", "--end", "6", "--out", out]
    cheap = ["--set", "milp=false", "--set", "slope_iters=0", "--set", "pgd_restarts=0",
             "--set", "pgd_quick_restarts=0"]
    assert run_cli(base + cheap, capsys)[0] == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    unknown = [r["index"] for r in first if r["status"] == "unknown"]
    assert unknown, "the cheap run should leave an input unknown at eps 0.14"
    before = out.read_bytes()
    assert run_cli(base, capsys)[0] == 0 and out.read_bytes() == before  # plain resume: nothing
    code, stdout, _ = run_cli(base + ["--retry-unknown"], capsys)
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert out.read_bytes().startswith(before)
    retried = lines[len(first):]
    assert [r["index"] for r in retried] == unknown and all(r["try"] == 2 for r in retried)
    final = read_results(out)
    n_cert = sum(r["status"] == "certified" for r in final.values())
    assert f"certified {n_cert} (" in stdout and len(final) == 6
    assert n_cert > sum(r["status"] == "certified" for r in first)


def _onnx_model(path: Path, op: str = "Relu", n_in: tuple[int, ...] = (3, 32, 32),
                hidden: int = 8, bias_boost: tuple[int, float] | None = None, seed: int = 0):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    n = int(np.prod(n_in))
    w1 = rng.normal(0, 1 / np.sqrt(n), (hidden, n)).astype(np.float32)
    b1 = rng.normal(0, 0.1, hidden).astype(np.float32)
    w2 = rng.normal(0, 1 / np.sqrt(hidden), (10, hidden)).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    if bias_boost is not None:
        b2[bias_boost[0]] = bias_boost[1]
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1),
             helper.make_node(op, ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(a, name) for a, name in
         ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_cli_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "never.jsonl"
    good = _onnx_model(tmp_path / "tiny.onnx", n_in=(1, 8, 8))
    sigmoid = _onnx_model(tmp_path / "sigmoid.onnx", op="Sigmoid", n_in=(1, 8, 8))
    bad_spec = tmp_path / "bad.vnnlib"
    bad_spec.write_text("(declare-const X_0 Real)\n(assert (<= X_0 \n")
    cases = [
        ["--model", sigmoid, "--dataset", "digits", "--eps", "0.1"],  # unsupported op
        ["--model", good, "--vnnlib", bad_spec],  # VNN-LIB that does not parse
        ["--model", good, "--dataset", "digits", "--eps", "-0.1"],  # eps < 0
        ["--model", good, "--dataset", "mnist", "--data-dir", tmp_path, "--eps", "0.1"],  # no data
        ["--model", tmp_path / "missing.onnx", "--dataset", "digits", "--eps", "0.1"],
        ["--model", good, "--dataset", "digits", "--eps", "0.1", "--set", "nonsense=1"],
        ["--model", good, "--dataset", "digits", "--eps", "0.1", "--frobnicate"],
    ]
    if COLT_ONNX.exists():  # shape mismatch: a 28x28 network on 8x8 digits
        cases.append(["--model", COLT_ONNX, "--mean", "0.1307", "--std", "0.3081",
                      "--dataset", "digits", "--eps", "0.1"])
    for args in cases:
        code, stdout, stderr = run_cli(args + ["--out", out], capsys)
        assert code == 2, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error:"), stderr
        assert not out.exists()


def test_cli_vnnlib_cifar_spec_with_tiny_network(tmp_path, capsys):
    if not CIFAR_SPEC.exists():
        pytest.skip("VNN-COMP cifar2020 specs not available")
    from pipeline.certify.onnx_import import load_onnx
    from pipeline.certify.vnnlib import load_vnnlib

    prop = load_vnnlib(CIFAR_SPEC, (3, 32, 32))
    label = prop.is_robustness_of()
    assert label == 3
    answers = {}
    for name, boost in (("random", None), ("robust", (label, 50.0)), ("broken", (0, 50.0))):
        model = _onnx_model(tmp_path / f"{name}.onnx", bias_boost=boost, seed=1)
        out = tmp_path / f"{name}.jsonl"
        code, stdout, _ = run_cli(["--model", model, "--vnnlib", CIFAR_SPEC, "--out", out,
                                   "--timeout-per-input", "60"], capsys)
        assert code == 0
        answer = stdout.strip().splitlines()[-1]
        assert answer in ("sat", "unsat", "unknown", "timeout")
        row = json.loads(out.read_text().splitlines()[-1])
        assert row["answer"] == answer
        net = load_onnx(model).double()
        # consistency with an attack: sampled corners and PGD inside the box
        lo = torch.tensor(prop.lower).view(1, 3, 32, 32)
        up = torch.tensor(prop.upper).view(1, 3, 32, 32)
        pts = _samples(lo, up, 200, seed=5)
        with torch.no_grad():
            ys = net(pts).numpy()
        attacked = any(prop.is_violated_by(y) for y in ys)
        if attacked:
            assert answer != "unsat"
        if answer == "sat":
            x = torch.tensor(row["counterexample"], dtype=torch.float64).view(1, 3, 32, 32)
            assert bool((x >= lo).all() and (x <= up).all())
            with torch.no_grad():
                assert prop.is_violated_by(net(x).numpy()[0])
        answers[name] = answer
    assert answers["robust"] == "unsat"
    assert answers["broken"] == "sat"


def test_cli_general_vnnlib_property(tmp_path, capsys):
    model = _onnx_model(tmp_path / "tiny.onnx", n_in=(1, 2, 2), hidden=6, seed=3)
    spec = tmp_path / "p.vnnlib"
    decl = "".join(f"(declare-const X_{i} Real)\n" for i in range(4))
    decl += "".join(f"(declare-const Y_{j} Real)\n" for j in range(10))
    box = "".join(f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 0.5))\n" for i in range(4))
    spec.write_text(decl + box + "(assert (or (and (>= Y_0 100.0) (>= Y_1 Y_2)) "
                    "(and (<= Y_3 -100.0))))\n")
    code, stdout, _ = run_cli(["--model", model, "--vnnlib", spec], capsys)
    assert code == 0 and stdout.strip().splitlines()[-1] == "unsat"
    spec.write_text(decl + box + "(assert (or (>= Y_0 -100.0) (<= Y_3 -100.0)))\n")
    code, stdout, _ = run_cli(["--model", model, "--vnnlib", spec], capsys)
    assert code == 0 and stdout.strip().splitlines()[-1] == "sat"


def test_cli_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "pipeline.certify", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--vnnlib" in out.stdout


def test_cli_project_checkpoint_and_certified_accuracy_on_digits(tmp_path, capsys):
    from torch.utils.data import DataLoader

    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import DataConfig, TrainConfig, to_dict
    from pipeline.data import DATASET_INFO, load_split

    info = DATASET_INFO["digits"]
    cfg = TrainConfig(data=DataConfig(dataset="digits"), net="fc_16", eps=0.01)
    torch.manual_seed(0)
    net = build_net("fc_16", info.input_shape, info.mean, info.std, info.num_classes)
    save_checkpoint({"model": net.state_dict(), "config": to_dict(cfg)}, tmp_path / "last.pt")
    out = tmp_path / "digits.jsonl"
    code, stdout, _ = run_cli(["--model", tmp_path / "last.pt", "--end", "6", "--out", out,
                               "--set", "pgd_restarts=2", "--set", "pgd_steps=10"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    assert {r["status"] for r in rows} <= {"certified", "falsified", "unknown", "misclassified"}
    # the same inputs through the batched scorer, from a DataLoader
    test = load_split(DataConfig(dataset="digits"), "test")
    counts = certified_accuracy(net, DataLoader(test, batch_size=4), 0.01,
                                CertifyConfig(pgd_restarts=2, pgd_steps=10), max_inputs=6)
    assert counts["n"] == 6
    assert counts["nat"] == sum(r["status"] != "misclassified" for r in rows)
    assert counts["cert"] == sum(r["status"] == "certified" for r in rows)


def test_batched_slopes_with_inputs_verified_along_the_way():
    """Inputs of one batch verified at different slope steps (the batched scorer's path)."""
    net = small_convnet(3)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 20, 20, generator=gen)
    with torch.no_grad():
        y = net(x).argmax(1)
    cfg = fast_cfg(milp=False, pgd_restarts=1, pgd_steps=5, slope_iters=30, slope_patience=0)
    for eps in (0.01, 0.013):
        out = certified_accuracy(net, (x, y), eps, cfg)
        cert = Certifier(net, cfg)
        single = [cert.certify(x[i], int(y[i]), eps, index=i) for i in range(8)]
        assert out["cert"] <= out["pgd"] <= out["nat"] == 8
        assert out["cert"] == sum(r.status == "certified" for r in single)
