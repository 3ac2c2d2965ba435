"""Tests of pipeline.attacks: COLT's convex regions, the latent point, latent PGD, input PGD.

Small random COLT nets in float64 (seeded, global RNG untouched).  The region of a prefix is
checked against the exact DeepZ zonotope of the same prefix: ``latent_point`` must be a point of
it (inside its concretised bounds, and equal to ``Zonotope.point`` for the mapped coefficients).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.attacks import (
    AttackResult,
    coefficient_shapes,
    extend_relaxation,
    latent_pgd,
    latent_point,
    pgd_attack,
    prefix_relaxation,
)
from pipeline.domains.zonotope import Zonotope, input_box
from pipeline.nets import Net, build_net, load_colt_state_dict

DT = torch.float64
TOL = 1e-9
COLT_PT = Path("/work/shared/benchmarks/colt/mnist_0.1_convmed_flat_2_2_100.pt")
MNIST_DIR = Path("/work/shared/benchmarks/mnist")


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_net(name: str, shape: tuple[int, int, int], seed: int, dtype=DT,
             zero_bias: bool = False) -> Net:
    """Seeded random COLT net.  Default-initialised nets predict one class almost everywhere;
    ``zero_bias`` makes the prediction vary over the input space (attackable nets)."""
    c = shape[0]
    g = gen(seed)
    mean = tuple((0.2 + 0.5 * torch.rand(c, generator=g, dtype=DT)).tolist())
    std = tuple((0.2 + 0.3 * torch.rand(c, generator=g, dtype=DT)).tolist())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_net(name, shape, mean, std)
    if zero_bias:
        with torch.no_grad():
            for block in net.blocks:
                if getattr(block, "bias", None) is not None:
                    block.bias.zero_()
    return net.to(dtype).eval()


def inputs(b: int, shape, seed: int, dtype=DT) -> torch.Tensor:
    x = torch.rand(b, *shape, generator=gen(seed), dtype=dtype)
    x.view(b, -1)[:, :3] = torch.tensor([0.0, 1.0, 0.02], dtype=dtype)  # some clipped pixels
    return x


def random_coefficients(shapes, g, kind: str = "uniform") -> list[torch.Tensor]:
    if kind == "uniform":
        return [2 * torch.rand(s, generator=g, dtype=DT) - 1 for s in shapes]
    if kind == "signs":
        return [torch.randint(0, 2, s, generator=g).to(DT) * 2 - 1 for s in shapes]
    value = {"ones": 1.0, "minus_ones": -1.0, "zeros": 0.0}[kind]
    return [torch.full(s, value, dtype=DT) for s in shapes]


def mapped_coefficients(net: Net, region, layer: int, coeffs: list[torch.Tensor],
                        zono: Zonotope) -> torch.Tensor:
    """The zonotope's coefficient vector (B, K) for latent_point's per-group coefficients.

    Input group: one generator per input coordinate (flat order); each ReLU: one generator per
    neuron with μ != 0, in flat order, padded per batch to the maximum count.
    """
    b = coeffs[0].shape[0]
    parts = [coeffs[0].reshape(b, -1)]
    k = parts[0].shape[1]
    group = 1
    for i in net.relu_indices:
        if i > layer:
            break
        mu = region.relaxations[i][1].reshape(b, -1)
        c = coeffs[group].reshape(b, -1)
        counts = (mu != 0).sum(1)
        kmax = int(counts.max())
        block = torch.zeros(b, kmax, dtype=DT)
        for j in range(b):
            cols = torch.nonzero(mu[j] != 0).flatten()
            block[j, : len(cols)] = c[j, cols]
        parts.append(block)
        k += kmax
        group += 1
    out = torch.cat(parts, 1)
    assert out.shape[1] == zono.num_generators
    return out


NETS = [("convmed_1_1_8", (1, 8, 8)), ("convmedbig_1_1_1_8", (1, 8, 8)), ("fc_10_10", (1, 6, 6)),
        ("convmed_1_1_4", (3, 4, 4))]
NET_IDS = [n for n, _ in NETS]


# ---------------------------------------------------------------------------------------------
# Region and latent point


@pytest.mark.parametrize("name,shape", NETS, ids=NET_IDS)
def test_latent_point_inside_exact_zonotope_and_equal_to_its_point(name, shape) -> None:
    net = make_net(name, shape, 0).requires_grad_(False)
    x = inputs(2, shape, 1)
    eps = 0.08
    lower, upper = input_box(x, eps)
    g = gen(2)
    crossing = 0
    first = net.relu_indices[0]
    # The input box, the affine prefix, every ReLU output and the logits.
    layers = {-1, first - 1, *net.relu_indices, net.relu_indices[-1] + 1, len(net) - 1}
    for layer in sorted(layers):
        region = prefix_relaxation(net, x, eps, layer, bounds="exact")
        assert region.layer == layer
        assert torch.equal(region.lower, lower) and torch.equal(region.upper, upper)
        shapes = coefficient_shapes(net, region, layer)
        assert shapes[0] == x.shape
        assert len(shapes) == 1 + sum(1 for i in net.relu_indices if i <= layer)
        if layer < 0:
            zono = Zonotope.from_bounds(lower, upper)
        else:
            zono = region.propagation.element
            assert sorted(region.relaxations) == [i for i in net.relu_indices if i <= layer]
        lo, up = zono.concretize()
        for trial in range(8):
            kind = ["ones", "minus_ones", "zeros", "signs"][trial] if trial < 4 else "uniform"
            coeffs = random_coefficients(shapes, g, kind)
            z = latent_point(net, region, layer, coeffs)
            assert z.shape == zono.center.shape
            assert (lo - z).max() <= TOL and (z - up).max() <= TOL
            e = mapped_coefficients(net, region, layer, coeffs, zono)
            assert torch.allclose(z, zono.point(e), atol=1e-10)
            if layer < 0:
                assert torch.allclose(z, (lower + upper) / 2 + (upper - lower) / 2 * coeffs[0])
        if layer >= 0 and layer in net.relu_indices:
            crossing += int((region.relaxations[layer][1] != 0).sum())
    assert crossing > 0


@pytest.mark.parametrize("name,shape", NETS, ids=NET_IDS)
def test_latent_point_reproduces_concrete_forward(name, shape) -> None:
    """A concrete input x' of the box is a latent point: with e0 = (x' - c)/r and each ReLU's
    coefficient solved from relu(v) = λv + μ + μe (|e| <= 1), latent_point = forward_until."""
    net = make_net(name, shape, 10).requires_grad_(False)
    x = inputs(2, shape, 11)
    eps = 0.08
    lower, upper = input_box(x, eps)
    c, r = (upper + lower) / 2, (upper - lower) / 2
    last = net.relu_indices[-1]
    region = prefix_relaxation(net, x, eps, last, bounds="exact")
    e0 = 2 * torch.rand(x.shape, generator=gen(12), dtype=DT) - 1
    x_prime = c + r * e0
    coeffs = [e0]
    v = x_prime
    for i, block in enumerate(net.blocks[: last + 1]):
        if block.is_relu:
            lam, mu = region.relaxations[i]
            e = torch.where(mu != 0, (F.relu(v) - lam * v - mu) / torch.where(mu != 0, mu, 1), 0)
            assert e.abs().max() <= 1 + 1e-7
            coeffs.append(e)
        v = block(v)
    assert torch.allclose(latent_point(net, region, last, coeffs),
                          net.forward_until(last, x_prime), atol=1e-10)


def test_cauchy_region_equals_exact_before_first_relu() -> None:
    net = make_net("convmed_1_1_8", (1, 8, 8), 20).requires_grad_(False)
    x = inputs(2, (1, 8, 8), 21)
    first = net.relu_indices[0]
    exact = prefix_relaxation(net, x, 0.1, first - 1, bounds="exact")
    cauchy = prefix_relaxation(net, x, 0.1, first - 1, bounds="cauchy", generator=gen(0))
    coeffs = random_coefficients(coefficient_shapes(net, exact, first - 1), gen(1))
    assert torch.allclose(latent_point(net, exact, first - 1, coeffs),
                          latent_point(net, cauchy, first - 1, coeffs))
    # Cauchy regions are reproducible with a seeded generator, and depend on the seed.
    a = prefix_relaxation(net, x, 0.1, 4, generator=gen(3))
    b = prefix_relaxation(net, x, 0.1, 4, generator=gen(3))
    d = prefix_relaxation(net, x, 0.1, 4, generator=gen(4))
    for i in (2, 4):
        assert torch.equal(a.relaxations[i][0], b.relaxations[i][0])
        assert torch.equal(a.relaxations[i][1], b.relaxations[i][1])
    assert not torch.equal(a.relaxations[4][1], d.relaxations[4][1])


def test_extend_relaxation_equals_direct_prefix() -> None:
    net = make_net("convmedbig_1_1_1_8", (1, 8, 8), 30).requires_grad_(False)
    x = inputs(2, (1, 8, 8), 31)
    direct = prefix_relaxation(net, x, 0.05, 6, bounds="exact")
    extended = extend_relaxation(net, prefix_relaxation(net, x, 0.05, 2, bounds="exact"), 6)
    assert extended.layer == 6 and sorted(extended.relaxations) == [2, 4, 6]
    for i in (2, 4, 6):
        assert torch.allclose(direct.relaxations[i][1], extended.relaxations[i][1])
    coeffs = random_coefficients(coefficient_shapes(net, direct, 6), gen(2))
    assert torch.allclose(latent_point(net, direct, 6, coeffs),
                          latent_point(net, extended, 6, coeffs))
    with pytest.raises(ValueError):
        extend_relaxation(net, prefix_relaxation(net, x, 0.05, -1), 2)


# ---------------------------------------------------------------------------------------------
# Latent PGD


def _ce_random(net, region, layer, y, n, g) -> torch.Tensor:
    """Mean cross-entropy per image over n random points of the region."""
    shapes = coefficient_shapes(net, region, layer)
    total = torch.zeros(y.shape[0], dtype=DT)
    for _ in range(n):
        z = latent_point(net, region, layer, random_coefficients(shapes, g))
        total += F.cross_entropy(net.forward_from(layer, z), y, reduction="none")
    return total / n


@pytest.mark.parametrize("bounds", ["exact", "cauchy"])
@pytest.mark.parametrize("layer", [-1, 2, 4, 5])
def test_latent_pgd_beats_random_points_and_stays_inside(layer: int, bounds: str) -> None:
    net = make_net("convmed_1_1_8", (1, 8, 8), 40).requires_grad_(False)
    x = inputs(4, (1, 8, 8), 41)
    y = net(x).argmax(1)
    eps = 0.1
    region = prefix_relaxation(net, x, eps, layer, bounds=bounds, generator=gen(42))
    exact = prefix_relaxation(net, x, eps, layer, bounds="exact")
    lo, up = (region.lower, region.upper) if layer < 0 else exact.propagation.element.concretize()
    for seed in range(3):
        z = latent_pgd(net, region, layer, y, steps=10, step_size=0.25, generator=gen(100 + seed))
        assert not z.requires_grad
        ce_pgd = F.cross_entropy(net.forward_from(layer, z), y, reduction="none")
        ce_rand = _ce_random(net, region, layer, y, 50, gen(200 + seed))
        assert ce_pgd.sum() > ce_rand.sum()
        assert (ce_pgd > ce_rand).float().mean() >= 0.75
        if bounds == "exact" or layer < 0:  # a point of the (exact) region
            assert (lo - z).max() <= TOL and (z - up).max() <= TOL


def test_latent_pgd_deterministic_with_generator() -> None:
    net = make_net("convmedbig_1_1_1_8", (1, 8, 8), 50).requires_grad_(False)
    x = inputs(3, (1, 8, 8), 51)
    y = torch.tensor([0, 1, 2])
    region = prefix_relaxation(net, x, 0.1, 4, generator=gen(0))
    a = latent_pgd(net, region, 4, y, steps=5, step_size=0.25, generator=gen(7))
    b = latent_pgd(net, region, 4, y, steps=5, step_size=0.25, generator=gen(7))
    c = latent_pgd(net, region, 4, y, steps=5, step_size=0.25, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_latent_pgd_leaves_parameters_and_region_graph_alone() -> None:
    """Float32 training path: region with gradients (stability loss), net params requiring grad;
    the attack must not accumulate .grad and must return a detached point inside the region."""
    net = make_net("convmed_1_1_8", (1, 8, 8), 60, dtype=torch.float32)
    x = inputs(2, (1, 8, 8), 61, dtype=torch.float32)
    y = net(x).argmax(1)
    region = prefix_relaxation(net, x, 0.1, 4, generator=gen(0))
    assert region.relaxations[4][1].requires_grad
    z = latent_pgd(net, region, 4, y, steps=4, step_size=0.25, generator=gen(1))
    assert z.dtype == torch.float32 and not z.requires_grad
    assert all(p.grad is None for p in net.parameters())
    # The region's graph is still usable afterwards (e.g. for the stability loss).
    region.relaxations[4][1].sum().backward()
    assert any(p.grad is not None for p in net.parameters())


def test_latent_pgd_single_step_is_a_random_point() -> None:
    """steps=1: no gradient step, the uniform random start is evaluated."""
    net = make_net("fc_10_10", (1, 6, 6), 70).requires_grad_(False)
    x = inputs(2, (1, 6, 6), 71)
    region = prefix_relaxation(net, x, 0.1, 3, bounds="exact")
    lo, up = region.propagation.element.concretize()
    y = net(x).argmax(1)
    z = latent_pgd(net, region, 3, y, steps=1, step_size=0.25, generator=gen(0))
    assert (lo - z).max() <= TOL and (z - up).max() <= TOL
    centre = latent_point(net, region, 3,
                          random_coefficients(coefficient_shapes(net, region, 3), None, "zeros"))
    assert not torch.allclose(z, centre)


# ---------------------------------------------------------------------------------------------
# Input PGD


def test_pgd_attack_counterexamples_are_real_and_inside_the_box() -> None:
    net = make_net("convmed_1_1_8", (1, 8, 8), 80, zero_bias=True).requires_grad_(False)
    x = inputs(16, (1, 8, 8), 81)
    y = net(x).argmax(1)
    eps = 0.1
    res = pgd_attack(net, x, y, eps, steps=20, step_size=0.1, restarts=2, generator=gen(0))
    assert isinstance(res, AttackResult)
    assert res.found.shape == (16,) and res.found.dtype == torch.bool
    assert res.x_adv.shape == x.shape
    assert res.found.any(), "a zero-bias random net at eps=0.1 should be attackable"
    adv = res.x_adv[res.found]
    lower, upper = input_box(x, eps)
    assert (net(adv).argmax(1) != y[res.found]).all()
    assert torch.all(adv >= lower[res.found]) and torch.all(adv <= upper[res.found])
    assert torch.all(adv >= 0) and torch.all(adv <= 1)
    # Deterministic given the generator.
    again = pgd_attack(net, x, y, eps, steps=20, step_size=0.1, restarts=2, generator=gen(0))
    assert torch.equal(again.found, res.found) and torch.equal(again.x_adv, res.x_adv)


def test_pgd_attack_restarts_only_add_counterexamples() -> None:
    """With the same generator the first restart is the same run; later ones can only add."""
    net = make_net("fc_10_10", (1, 6, 6), 90, zero_bias=True).requires_grad_(False)
    x = inputs(32, (1, 6, 6), 91)
    y = net(x).argmax(1)
    one = pgd_attack(net, x, y, 0.05, steps=10, step_size=0.1, restarts=1, generator=gen(1))
    three = pgd_attack(net, x, y, 0.05, steps=10, step_size=0.1, restarts=3, generator=gen(1))
    assert one.found.any()
    assert torch.all(three.found[one.found])
    assert torch.equal(three.x_adv[one.found], one.x_adv[one.found])
    for res in (one, three):
        assert (net(res.x_adv[res.found]).argmax(1) != y[res.found]).all()


def test_pgd_attack_eps_zero() -> None:
    net = make_net("convmed_1_1_8", (1, 8, 8), 100, zero_bias=True).requires_grad_(False)
    x = inputs(8, (1, 8, 8), 101)
    pred = net(x).argmax(1)
    res = pgd_attack(net, x, pred, 0.0, steps=5, step_size=0.1, restarts=3, generator=gen(0))
    assert not res.found.any()
    wrong = (pred + 1) % 10  # every input misclassified w.r.t. these labels
    res = pgd_attack(net, x, wrong, 0.0, steps=5, step_size=0.1, generator=gen(0))
    assert res.found.all() and torch.equal(res.x_adv, x)


@pytest.mark.skipif(not COLT_PT.exists() or not (MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="COLT's MNIST-0.1 net or the MNIST test files are not present")
def test_pgd_attack_reports_every_counterexample_it_ends_on() -> None:
    """On COLT's MNIST-0.1 net at eps=0.3 (well above its training eps) PGD ends on many
    misclassified points of the box; each must be reported as found.

    PGD iterates sit on box corners (coefficients ±1); centre - radius can round below the lower
    bound by one ulp (about 0.2% of the pixels), so an exact ``>= lower`` check drops most real
    counterexamples of a 784-pixel image.
    """
    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:32]
    with gzip.open(MNIST_DIR / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:32]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_net("convmed_2_2_100", (1, 28, 28), (0.1307,), (0.3081,))
    net = load_colt_state_dict(net, COLT_PT).eval().requires_grad_(False)
    correct = net(x).argmax(1) == y
    x, y = x[correct], y[correct]
    eps = 0.3
    res = pgd_attack(net, x, y, eps, steps=8, step_size=0.25, restarts=1, generator=gen(0))
    lower, upper = input_box(x, eps)
    wrong = net(res.x_adv).argmax(1) != y
    inside = ((res.x_adv >= lower - 1e-6) & (res.x_adv <= upper + 1e-6)).flatten(1).all(1)
    assert int((wrong & inside).sum()) >= 10
    assert torch.equal(res.found, wrong & inside), (
        f"{int((wrong & inside & ~res.found).sum())} of {int((wrong & inside).sum())} "
        "misclassified points in the box not reported")


# ---------------------------------------------------------------------------------------------
# Cauchy regions: splitting, extending, keeping the element


@pytest.mark.parametrize("start", [1, 2], ids=["from-pre-relu", "from-relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cauchy_extend_equals_direct_and_leaves_region_alone(dtype, start) -> None:
    """prefix(start) + extend(6) with one generator draws what prefix(6) draws, in the same
    order: the same relaxations. The extended region's element is not modified by the extension
    (from layer 1 the next block is a ReLU, which must not scale the region's groups in place)."""
    net = make_net("convmedbig_1_1_1_8", (1, 8, 8), 400, dtype=dtype).requires_grad_(False)
    x = inputs(2, (1, 8, 8), 401, dtype=dtype)
    direct = prefix_relaxation(net, x, 0.05, 6, generator=gen(5))
    g = gen(5)
    part = prefix_relaxation(net, x, 0.05, start, generator=g)
    before = part.propagation.element.projections.clone()
    centre = part.propagation.element.center.clone()
    extended = extend_relaxation(net, part, 6, generator=g)
    assert torch.equal(part.propagation.element.projections, before)
    assert torch.equal(part.propagation.element.center, centre)
    assert sorted(extended.relaxations) == [2, 4, 6]
    assert sorted(part.relaxations) == [i for i in (2,) if i <= start]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for i in (2, 4, 6):
        for a, b in zip(direct.relaxations[i], extended.relaxations[i]):
            assert torch.allclose(a, b, rtol=tol, atol=tol)
        for a, b in zip(direct.propagation.pre_bounds[i], extended.propagation.pre_bounds[i]):
            assert torch.allclose(a, b, rtol=tol, atol=tol)
    # Extending the same region twice from fresh generators gives the same result twice.
    again = extend_relaxation(net, part, 6, generator=gen(9))
    once_more = extend_relaxation(net, part, 6, generator=gen(9))
    assert torch.equal(again.relaxations[6][1], once_more.relaxations[6][1])


def test_cauchy_keep_element_false_same_relaxations() -> None:
    net = make_net("convmed_1_1_8", (1, 8, 8), 410).requires_grad_(False)
    x = inputs(2, (1, 8, 8), 411)
    try:
        lean = prefix_relaxation(net, x, 0.1, 4, generator=gen(3), keep_element=False)
    except TypeError:
        pytest.skip("prefix_relaxation has no keep_element option")
    full = prefix_relaxation(net, x, 0.1, 4, generator=gen(3))
    assert lean.propagation.element is None and full.propagation.element is not None
    for i in (2, 4):
        assert torch.equal(lean.relaxations[i][0], full.relaxations[i][0])
        assert torch.equal(lean.relaxations[i][1], full.relaxations[i][1])
    with pytest.raises(ValueError):
        extend_relaxation(net, lean, 7)
    # Latent points only need the relaxations.
    coeffs = random_coefficients(coefficient_shapes(net, full, 4), gen(4))
    assert torch.equal(latent_point(net, lean, 4, coeffs), latent_point(net, full, 4, coeffs))


def test_cauchy_region_with_gradients_equals_without() -> None:
    """Training computes the region with gradients (stability loss) and in place without; the
    two paths must give the same numbers for the same draws, and the gradient must reach the
    parameters."""
    net = make_net("convmed_1_1_8", (1, 8, 8), 420, dtype=torch.float32)
    x = inputs(2, (1, 8, 8), 421, dtype=torch.float32)
    with torch.no_grad():
        plain = prefix_relaxation(net, x, 0.1, 7, generator=gen(6))
    graded = prefix_relaxation(net, x, 0.1, 7, generator=gen(6))
    for i in (2, 4, 7):
        assert torch.allclose(plain.relaxations[i][1], graded.relaxations[i][1].detach(),
                              rtol=1e-5, atol=1e-6)
        assert torch.allclose(plain.propagation.pre_bounds[i][0],
                              graded.propagation.pre_bounds[i][0].detach(), rtol=1e-5, atol=1e-6)
    lo, up = graded.propagation.pre_bounds[7]
    (-(lo.clamp(max=0) * up.clamp(min=0)).sum()).backward()  # a stability-like loss
    assert net.blocks[1].weight.grad is not None and net.blocks[1].weight.grad.abs().sum() > 0
