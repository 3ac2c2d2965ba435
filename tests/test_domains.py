"""Soundness tests of the abstract domains (Box, Zonotope, ProjectedZonotope) and of the
abstract rules of every layer, block by block and on whole COLT networks.

Everything is float64.  "Sound" is checked by sampling many concrete inputs of the input region
(all corners where the dimension is small, random corners and uniform points otherwise) and
checking that every concrete value lies in the abstract bounds of its block.  For the zonotope the
stronger property is checked too: the concrete value *is a point of the zonotope*, i.e. there are
noise coefficients e in [-1, 1] with ``centre + G e`` equal to it (the coefficients of the ReLU
noise symbols are solved from the band ``λx + μ + μ e``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.domains.box import Box
from pipeline.domains.zonotope import ProjectedZonotope, Zonotope, input_box, relu_relaxation
from pipeline.layers import Conv2d, Flatten, Linear, Normalize, ReLU
from pipeline.nets import Net, build_net

DT = torch.float64
TOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


# ---------------------------------------------------------------------------------------------
# Helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_net(name: str, shape: tuple[int, int, int], seed: int) -> Net:
    """A COLT net with seeded random weights and normalisation, float64, global RNG untouched."""
    g = gen(seed)
    c = shape[0]
    mean = tuple((0.2 + 0.5 * torch.rand(c, generator=g, dtype=DT)).tolist())
    std = tuple((0.2 + 0.3 * torch.rand(c, generator=g, dtype=DT)).tolist())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_net(name, shape, mean, std)
    return net.double().eval().requires_grad_(False)


def random_inputs(b: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return 0.15 + 0.7 * torch.rand(b, *shape, generator=gen(seed), dtype=DT)


def sign_corners(d: int) -> torch.Tensor:
    """All 2^d sign vectors (2^d, d)."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=DT)


def sample_coefficients(d: int, n: int, g: torch.Generator, all_corners_max: int = 12
                        ) -> torch.Tensor:
    """(N, d) coefficients in [-1, 1]: all corners (low d) or n random corners, plus n uniform
    points and the centre."""
    corners = (sign_corners(d) if d <= all_corners_max
               else torch.randint(0, 2, (n, d), generator=g).to(DT) * 2 - 1)
    uniform = 2 * torch.rand(n, d, generator=g, dtype=DT) - 1
    return torch.cat([corners, uniform, torch.zeros(1, d, dtype=DT)])


def sample_box(lower: torch.Tensor, upper: torch.Tensor, n: int, g: torch.Generator
               ) -> torch.Tensor:
    """(B, N, *S) points of the boxes [lower[b], upper[b]]."""
    b, shape = lower.shape[0], lower.shape[1:]
    d = lower[0].numel()
    e = sample_coefficients(d, n, g)  # shared pattern for every image
    c, r = (upper + lower) / 2, (upper - lower) / 2
    return c.unsqueeze(1) + r.unsqueeze(1) * e.reshape(1, -1, *shape)


def zono_points(z: Zonotope, e: torch.Tensor) -> torch.Tensor:
    """centre + G e for coefficients (B, N, K) -> (B, N, *S)."""
    return z.center.unsqueeze(1) + torch.einsum("bnk,bk...->bn...", e, z.generators)


def assert_inside(values: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                  tol: float = TOL) -> None:
    """values (B, N, *S) within [lower, upper] (B, *S)."""
    below = (lower - values.amin(1)).max().item()
    above = (values.amax(1) - upper).max().item()
    assert below <= tol and above <= tol, f"outside the bounds by {max(below, above):.3g}"


def random_zonotope(b: int, k: int, shape: tuple[int, ...], seed: int, scale: float = 1.0
                    ) -> Zonotope:
    g = gen(seed)
    center = torch.randn(b, *shape, generator=g, dtype=DT)
    gens = torch.randn(b, k, *shape, generator=g, dtype=DT) * scale / k ** 0.5
    return Zonotope(center, gens)


def relu_coefficients(pre: torch.Tensor, lam: torch.Tensor, mu: torch.Tensor, kmax: int,
                      ) -> torch.Tensor:
    """Noise coefficients of the new ReLU symbols that reproduce relu(pre) exactly.

    pre (B, N, *S) concrete pre-activations; (lam, mu) (B, *S); returns (B, N, kmax), the j-th
    slot of image b being its j-th neuron with μ != 0 in flat order (as Zonotope.relu lays them
    out). Asserts |e| <= 1, i.e. that (x, relu(x)) lies in the band.
    """
    b, n = pre.shape[:2]
    post = F.relu(pre)
    out = torch.zeros(b, n, kmax, dtype=DT)
    flat_mu, flat_lam = mu.reshape(b, -1), lam.reshape(b, -1)
    flat_pre, flat_post = pre.reshape(b, n, -1), post.reshape(b, n, -1)
    for i in range(b):
        cols = torch.nonzero(flat_mu[i] != 0).flatten()
        assert len(cols) <= kmax
        m = flat_mu[i, cols]
        e = (flat_post[i][:, cols] - flat_lam[i, cols] * flat_pre[i][:, cols] - m) / m
        if len(cols):
            worst = e.abs().max().item()
            assert worst <= 1 + 1e-7, f"(x, relu(x)) outside the band: |e| = {worst}"
        out[i, :, : len(cols)] = e.clamp(-1, 1)
        # Neurons without a new symbol are reproduced exactly by λx + μ.
        stable = flat_mu[i] == 0
        exact = flat_lam[i, stable] * flat_pre[i][:, stable]
        assert torch.allclose(exact, flat_post[i][:, stable], atol=TOL)
    return out


# ---------------------------------------------------------------------------------------------
# Zonotope basics


@pytest.mark.parametrize("shape", [(5,), (2, 3, 3)])
def test_from_bounds_point_concretize_consistent(shape: tuple[int, ...]) -> None:
    g = gen(0)
    lower = torch.rand(3, *shape, generator=g, dtype=DT)
    upper = lower + torch.rand(3, *shape, generator=g, dtype=DT)
    upper[0].view(-1)[0] = lower[0].view(-1)[0]  # a zero-width coordinate
    z = Zonotope.from_bounds(lower, upper)
    n = lower[0].numel()
    assert z.num_generators == n and z.generators.shape == (3, n, *shape)
    lo, up = z.concretize()
    assert torch.allclose(lo, lower, atol=1e-15) and torch.allclose(up, upper, atol=1e-15)
    ones = torch.ones(3, n, dtype=DT)
    assert torch.allclose(z.point(ones), upper) and torch.allclose(z.point(-ones), lower)
    assert torch.allclose(z.point(0 * ones), (lower + upper) / 2)
    # Generator i moves coordinate i only (flat C,H,W order), so point(e) = centre + r * e.
    e = 2 * torch.rand(3, n, generator=g, dtype=DT) - 1
    expected = (upper + lower) / 2 + (upper - lower) / 2 * e.reshape(3, *shape)
    assert torch.allclose(z.point(e), expected)
    box = Box.from_bounds(lower, upper)
    assert torch.equal(box.concretize()[0], lower) and torch.equal(box.concretize()[1], upper)


def test_from_eps_clips_to_pixel_range() -> None:
    x = torch.tensor([[[[0.0, 0.05, 0.5, 0.97, 1.0]]]], dtype=DT)
    lo, up = input_box(x, 0.1)
    assert torch.allclose(lo, torch.tensor([0.0, 0.0, 0.4, 0.87, 0.9], dtype=DT).view_as(x))
    assert torch.allclose(up, torch.tensor([0.1, 0.15, 0.6, 1.0, 1.0], dtype=DT).view_as(x))
    for element in (Zonotope.from_eps(x, 0.1), Box.from_eps(x, 0.1)):
        a, b = element.concretize()
        assert torch.allclose(a, lo) and torch.allclose(b, up)


def test_zonotope_to_and_point_shapes() -> None:
    z = random_zonotope(2, 4, (3,), 1)
    z32 = z.to(torch.float32)
    assert z32.center.dtype == torch.float32 and z32.generators.dtype == torch.float32
    assert z.point(torch.zeros(2, 4, dtype=DT)).shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# Affine transformers: exact images, sound and tight bounds


def _conv(cin, cout, k, s, p, bias=True, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Conv2d(cin, cout, k, stride=s, padding=p, bias=bias).double().requires_grad_(False)


def _linear(n, m, bias=True, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Linear(n, m, bias=bias).double().requires_grad_(False)


AFFINE_CASES = [
    ("normalize1", lambda: Normalize((0.3,), (0.2,)).double(), (1, 3, 3)),
    ("normalize3", lambda: Normalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.25)).double(), (3, 2, 2)),
    ("conv_k3_s1_p1", lambda: _conv(1, 3, 3, 1, 1), (1, 3, 3)),
    ("conv_k5_s2_p2", lambda: _conv(2, 4, 5, 2, 2, seed=1), (2, 6, 6)),
    ("conv_k4_s2_p1", lambda: _conv(3, 2, 4, 2, 1, seed=2), (3, 4, 4)),
    ("conv_k2_s1_p0_nobias", lambda: _conv(2, 3, 2, 1, 0, bias=False, seed=3), (2, 3, 3)),
    ("conv_k3_s3_p2", lambda: _conv(1, 2, 3, 3, 2, seed=4), (1, 5, 5)),
    ("linear", lambda: _linear(7, 4, seed=5), (7,)),
    ("linear_nobias", lambda: _linear(6, 3, bias=False, seed=6), (6,)),
    ("flatten", lambda: Flatten(), (2, 2, 2)),
]


@pytest.mark.parametrize("name,factory,shape", AFFINE_CASES, ids=[c[0] for c in AFFINE_CASES])
def test_affine_zonotope_exact_and_sound(name, factory, shape) -> None:
    layer = factory()
    z = random_zonotope(2, 6, shape, seed=10)
    out, pre, relax = layer.abstract(z)
    assert pre is None and relax is None
    e = sample_coefficients(6, 1000, gen(11)).unsqueeze(0).expand(2, -1, -1)
    points = zono_points(z, e)
    concrete = layer(points.reshape(-1, *shape)).reshape(2, e.shape[1], *out.center.shape[1:])
    # The image of every point is the point of the image for the same coefficients.
    assert torch.allclose(zono_points(out, e), concrete, atol=1e-10)
    lo, up = out.concretize()
    assert_inside(concrete, lo, up)
    # Concretisation is exact for a zonotope: the bounds are attained at corners (K=6: all 64).
    assert torch.allclose(concrete.max(1).values, up, atol=1e-10)
    assert torch.allclose(concrete.min(1).values, lo, atol=1e-10)


@pytest.mark.parametrize("name,factory,shape", AFFINE_CASES, ids=[c[0] for c in AFFINE_CASES])
def test_affine_box_sound_and_exact(name, factory, shape) -> None:
    layer = factory()
    g = gen(20)
    lower = torch.randn(2, *shape, generator=g, dtype=DT)
    upper = lower + torch.rand(2, *shape, generator=g, dtype=DT)
    out, _, _ = layer.abstract(Box(lower, upper))
    points = sample_box(lower, upper, 1000, g)
    concrete = layer(points.reshape(-1, *shape)).reshape(2, points.shape[1], *out.lower.shape[1:])
    assert_inside(concrete, out.lower, out.upper)
    if lower[0].numel() <= 12:  # all corners sampled: interval arithmetic of one map is exact
        assert torch.allclose(concrete.max(1).values, out.upper, atol=1e-10)
        assert torch.allclose(concrete.min(1).values, out.lower, atol=1e-10)


@pytest.mark.parametrize("name,factory,shape", AFFINE_CASES, ids=[c[0] for c in AFFINE_CASES])
def test_affine_projected_zonotope_centre_and_linearity(name, factory, shape) -> None:
    """ProjectedZonotope: centre as the exact one; projections mapped by the linear part."""
    layer = factory()
    g = gen(30)
    lower = torch.rand(2, *shape, generator=g, dtype=DT)
    upper = lower + torch.rand(2, *shape, generator=g, dtype=DT)
    pz = ProjectedZonotope.from_bounds(lower, upper, 5, gen(31))
    out = pz.affine(layer)
    exact = Zonotope.from_bounds(lower, upper).affine(layer)
    assert torch.allclose(out.center, exact.center)
    expected = layer.linear(pz.projections.reshape(-1, *shape)).reshape(out.projections.shape)
    assert torch.allclose(out.projections, expected)


@pytest.mark.parametrize("name,factory,shape", AFFINE_CASES, ids=[c[0] for c in AFFINE_CASES])
def test_matrix_equals_forward(name, factory, shape) -> None:
    layer = factory()
    w, b = layer.matrix(shape)
    x = torch.randn(5, *shape, generator=gen(40), dtype=DT)
    y = layer(x).detach().reshape(5, -1).numpy()
    assert w.shape == (y.shape[1], int(np.prod(shape))) and b.shape == (y.shape[1],)
    assert np.allclose(x.reshape(5, -1).numpy() @ w.T.toarray() + b, y, atol=1e-10)


def test_matrix_float32_layer_and_small_chunks() -> None:
    """A float32 layer's matrix is float64 and equals its float64 forward; chunking is invisible;
    the layer itself is left in float32."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        conv = Conv2d(2, 3, 3, stride=2, padding=1)
    shape = (2, 5, 5)
    w, b = conv.matrix(shape)
    w_small, b_small = conv.matrix(shape, chunk=7)
    assert conv.weight.dtype == torch.float32
    assert w.dtype == np.float64 and b.dtype == np.float64
    assert np.allclose(w.toarray(), w_small.toarray()) and np.allclose(b, b_small)
    x = torch.randn(4, *shape, generator=gen(1), dtype=DT)
    assert np.allclose(x.reshape(4, -1).numpy() @ w.T.toarray() + b,
                       conv(x).detach().reshape(4, -1).numpy(), atol=1e-10)


def test_matrix_special_cases_structure() -> None:
    norm = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 0.2))
    w, b = norm.matrix((3, 2, 2))
    assert np.allclose(w.diagonal(), np.repeat([2.0, 4.0, 5.0], 4))
    assert w.nnz == 12
    assert np.allclose(b, np.repeat([-0.2, -0.8, -1.5], 4), atol=1e-7)
    lin = _linear(4, 3)
    w, b = lin.matrix((4,))
    assert np.allclose(w.toarray(), lin.weight.detach().numpy())
    assert np.allclose(b, lin.bias.detach().numpy())
    w, b = _linear(4, 3, bias=False).matrix((4,))
    assert np.array_equal(b, np.zeros(3))
    w, b = Flatten().matrix((2, 2, 2))
    assert np.allclose(w.toarray(), np.eye(8)) and np.array_equal(b, np.zeros(8))


@pytest.mark.parametrize("name,shape", [("convmed_1_1_8", (1, 8, 8)),
                                        ("convmedbig_1_1_1_8", (3, 8, 8)),
                                        ("fc_10_10", (1, 4, 4))])
def test_matrix_of_every_affine_block_of_a_net(name, shape) -> None:
    net = make_net(name, shape, 3)
    x = torch.randn(3, *shape, generator=gen(2), dtype=DT)
    for block in net.blocks:
        if not block.is_relu:
            w, b = block.matrix(tuple(x.shape[1:]))
            y = block(x)
            assert np.allclose(x.reshape(3, -1).numpy() @ w.T.toarray() + b,
                               y.detach().reshape(3, -1).numpy(), atol=1e-10)
        x = block(x)


# ---------------------------------------------------------------------------------------------
# ReLU transformer


def _crossing_zonotope(seed: int) -> Zonotope:
    z = random_zonotope(3, 6, (4, 3, 3), seed, scale=0.8)
    lo, up = z.concretize()
    crossing = (lo < 0) & (up > 0)
    assert crossing.sum() >= 20 and (lo >= 0).any() and (up <= 0).any()
    return z


SLOPES = ["deepz", "random", "zero", "one", "above_one", "below_zero"]


def _slope(kind: str, like: torch.Tensor, seed: int) -> torch.Tensor | None:
    if kind == "deepz":
        return None
    if kind == "random":
        return torch.rand(like.shape, generator=gen(seed), dtype=DT)
    return torch.full_like(like, {"zero": 0.0, "one": 1.0, "above_one": 1.7,
                                  "below_zero": -0.3}[kind])


@pytest.mark.parametrize("kind", SLOPES)
def test_relu_relaxation_formulas(kind: str) -> None:
    z = _crossing_zonotope(50)
    lo, up = z.concretize()
    slope = _slope(kind, lo, 51)
    lam, mu = relu_relaxation(lo, up, slope)
    crossing = (lo < 0) & (up > 0)
    deepz = up / (up - lo)
    want = deepz if slope is None else slope.clamp(0, 1)
    assert torch.allclose(lam[crossing], want[crossing])
    # Reference §4.1: λ <= u/(u-l): μ = u(1-λ)/2; else μ = -λl/2 (DeepZ: both equal -λl/2).
    small = crossing & (want <= deepz)
    large = crossing & (want > deepz)
    assert torch.allclose(mu[small], (up * (1 - want) / 2)[small])
    assert torch.allclose(mu[large], (-want * lo / 2)[large])
    if kind == "random":
        assert small.sum() >= 5 and large.sum() >= 5, "both band formulas exercised"
    if kind == "deepz":
        assert torch.allclose(mu[crossing], (-deepz * lo / 2)[crossing])
    active, inactive = lo >= 0, up <= 0
    assert torch.all(lam[active] == 1) and torch.all(mu[active] == 0)
    assert torch.all(lam[inactive] == 0) and torch.all(mu[inactive] == 0)
    assert torch.all(mu >= 0) and torch.all((lam >= 0) & (lam <= 1))


@pytest.mark.parametrize("kind", SLOPES)
def test_relu_band_contains_graph(kind: str) -> None:
    """For every neuron and x in [l, u]: λx <= relu(x) <= λx + 2μ (the band λx + μ ± μ)."""
    z = _crossing_zonotope(60)
    lo, up = z.concretize()
    lam, mu = relu_relaxation(lo, up, _slope(kind, lo, 61))
    t = torch.linspace(0, 1, 401, dtype=DT).view(-1, 1, 1, 1, 1)
    x = lo + t * (up - lo)  # (T, B, *S) including both endpoints and 0 where crossing
    x = torch.cat([x, torch.zeros_like(lo).clamp(lo, up).unsqueeze(0)])
    y = F.relu(x)
    assert (lam * x - y).max() <= TOL
    assert (y - (lam * x + 2 * mu)).max() <= TOL


@pytest.mark.parametrize("kind", SLOPES)
def test_relu_zonotope_maps_points_into_output(kind: str) -> None:
    z = _crossing_zonotope(70)
    lo, up = z.concretize()
    out, pre, (lam, mu) = ReLU().abstract(z, slope=_slope(kind, lo, 71))
    assert torch.equal(pre[0], lo) and torch.equal(pre[1], up)
    kmax = out.num_generators - z.num_generators
    counts = (mu.reshape(3, -1) != 0).sum(1)
    assert kmax == int(counts.max()) and kmax > 0
    # The old generators are scaled by λ; the new ones are one-hot, scaled by μ.
    assert torch.allclose(out.generators[:, :6], lam.unsqueeze(1) * z.generators)
    assert torch.allclose(out.generators[:, 6:].abs().sum(1), mu)
    e = sample_coefficients(6, 2000, gen(72)).unsqueeze(0).expand(3, -1, -1)
    x = zono_points(z, e)
    y = F.relu(x)
    o_lo, o_up = out.concretize()
    assert_inside(y, o_lo, o_up)
    e_new = relu_coefficients(x, lam, mu, kmax)
    assert torch.allclose(zono_points(out, torch.cat([e, e_new], 2)), y, atol=1e-10)


def test_relu_padding_of_new_generators_per_image() -> None:
    """Images with different numbers of crossing neurons: the batch is padded with zero rows."""
    center = torch.tensor([[-0.5, 0.5, 0.2], [0.1, -0.1, 3.0], [5.0, -5.0, 2.0]], dtype=DT)
    gens = torch.ones(3, 1, 3, dtype=DT)
    out, _, (lam, mu) = Zonotope(center, gens).relu()
    # Image 0: all three cross; image 1: two cross; image 2: none.
    assert out.num_generators == 1 + 3
    assert torch.count_nonzero(out.generators[0, 1:]) == 3
    assert torch.count_nonzero(out.generators[1, 1:]) == 2
    assert torch.count_nonzero(out.generators[1, 3]) == 0
    assert torch.count_nonzero(out.generators[2, 1:]) == 0
    # Per image, the new symbols follow the crossing neurons in flat order (j-th slot: one-hot).
    assert out.generators[1, 1, 0] == mu[1, 0] and out.generators[1, 2, 1] == mu[1, 1]
    # Same result as propagating each image alone (up to the zero padding).
    for i in range(3):
        alone, _, _ = Zonotope(center[i:i + 1], gens[i:i + 1]).relu()
        k = alone.num_generators
        assert torch.allclose(out.center[i], alone.center[0])
        assert torch.allclose(out.generators[i, :k], alone.generators[0])
        assert torch.count_nonzero(out.generators[i, k:]) == 0


def test_relu_no_crossing_adds_no_generator() -> None:
    z = Zonotope(torch.tensor([[2.0, -2.0]], dtype=DT), torch.ones(1, 1, 2, dtype=DT) * 0.5)
    out, _, (lam, mu) = z.relu()
    assert out.num_generators == 1
    assert torch.equal(lam, torch.tensor([[1.0, 0.0]], dtype=DT)) and torch.all(mu == 0)
    assert torch.allclose(out.center, torch.tensor([[2.0, 0.0]], dtype=DT))


@pytest.mark.parametrize("domain", ["zonotope", "box", "projected"])
@pytest.mark.parametrize("kind", ["deepz", "random"])
def test_relu_refined_bounds_are_intersected(domain: str, kind: str) -> None:
    z = _crossing_zonotope(80)
    lo, up = z.concretize()
    g = gen(81)
    width = up - lo
    r_lo = lo + 0.4 * torch.rand(lo.shape, generator=g, dtype=DT) * width
    r_up = up - 0.4 * torch.rand(lo.shape, generator=g, dtype=DT) * width
    flat_lo, flat_up = r_lo.view(-1), r_up.view(-1)
    crossing = ((lo < 0) & (up > 0)).view(-1).nonzero().flatten()
    flat_lo[crossing[:4]] = 0.0  # refinement proves these active ...
    flat_up[crossing[:4]] = up.view(-1)[crossing[:4]]
    flat_up[crossing[4:8]] = 0.0  # ... and these inactive
    flat_lo[crossing[4:8]] = lo.view(-1)[crossing[4:8]]
    # A looser refinement on some neurons must change nothing there.
    loose = torch.rand(lo.shape, generator=g) < 0.3
    loose.view(-1)[crossing[:8]] = False
    r_lo, r_up = torch.where(loose, lo - 1, r_lo), torch.where(loose, up + 1, r_up)
    slope = _slope(kind, lo, 82)
    if domain == "zonotope":
        element = z
    elif domain == "box":
        element = Box(lo, up)
    else:  # bounds from medians of |projections| (here 6 per neuron), then intersected
        element = ProjectedZonotope(z.center, z.generators, 6)
    own_lo, own_up = element.concretize()
    i_lo, i_up = torch.maximum(own_lo, r_lo), torch.minimum(own_up, r_up)
    out, pre, relax = element.relu(slope, (r_lo, r_up))
    assert torch.equal(pre[0], i_lo) and torch.equal(pre[1], i_up)
    if domain == "box":
        assert relax is None
        assert torch.equal(out.lower, i_lo.clamp_min(0)) and torch.equal(out.upper,
                                                                          i_up.clamp_min(0))
        return
    lam, mu = relax
    want_lam, want_mu = relu_relaxation(i_lo, i_up, slope)
    assert torch.equal(lam, want_lam) and torch.equal(mu, want_mu)
    if domain == "zonotope":
        flat_lam, flat_mu = lam.view(-1), mu.view(-1)
        assert torch.all(flat_lam[crossing[:4]] == 1) and torch.all(flat_mu[crossing[:8]] == 0)
        assert torch.all(flat_lam[crossing[4:8]] == 0)
        # The band is sound on the refined interval of every neuron.
        t = torch.linspace(0, 1, 201, dtype=DT).view(-1, 1, 1, 1, 1)
        x = i_lo + t * (i_up - i_lo)
        y = F.relu(x)
        assert (lam * x - y).max() <= TOL and (y - (lam * x + 2 * mu)).max() <= TOL
        # Unrefined neurons are as without bounds.
        plain_lam, plain_mu = relu_relaxation(lo, up, slope)
        assert torch.equal(lam[loose], plain_lam[loose])
        assert torch.equal(mu[loose], plain_mu[loose])


def test_box_relu_sound() -> None:
    g = gen(90)
    lower = torch.randn(2, 3, 4, 4, generator=g, dtype=DT)
    upper = lower + torch.rand(2, 3, 4, 4, generator=g, dtype=DT) * 2
    out, pre, relax = ReLU().abstract(Box(lower, upper))
    assert relax is None and torch.equal(pre[0], lower) and torch.equal(pre[1], upper)
    y = F.relu(sample_box(lower, upper, 500, g))
    assert_inside(y, out.lower, out.upper)
    assert torch.all(out.lower >= 0)


# ---------------------------------------------------------------------------------------------
# Whole networks


NETS = [
    ("fc_10_10", (1, 3, 3)),  # 9 inputs: all 512 corners
    ("fc_10_10", (1, 8, 8)),
    ("fc_12", (1, 2, 2)),  # 4 inputs: all 16 corners
    ("convmed_1_1_8", (1, 8, 8)),
    ("convmed_1_1_4", (3, 4, 4)),
    ("convmed_1_2_6", (1, 4, 4)),
    ("convmedbig_1_1_1_8", (3, 8, 8)),
    ("convmedbig_1_1_1_6", (1, 4, 4)),
]
NET_IDS = [f"{n}-{'x'.join(map(str, s))}" for n, s in NETS]
EPS = (0.03, 0.08)  # one per image of the batch


def _input_region(shape, seed):
    x = random_inputs(2, shape, seed)
    eps = torch.tensor(EPS, dtype=DT).view(2, *[1] * len(shape))
    return x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def _blockwise(net: Net, element, slopes=None, bounds=None):
    """Elements after every block (via Net.propagate one block at a time), plus pre-bounds."""
    elements, pre_bounds, relaxations = [], {}, {}
    for i in range(len(net)):
        prop = net.propagate(element, i - 1, i, slopes=slopes, bounds=bounds)
        element = prop.element
        elements.append(element)
        pre_bounds.update(prop.pre_bounds)
        relaxations.update(prop.relaxations)
    return elements, pre_bounds, relaxations


def _random_slopes(net: Net, shape, seed):
    shapes = net.shapes()
    g = gen(seed)
    return {i: torch.rand(2, *shapes[i], generator=g, dtype=DT) for i in net.relu_indices}


@pytest.mark.parametrize("slopes_kind", ["deepz", "random"])
@pytest.mark.parametrize("name,shape", NETS, ids=NET_IDS)
def test_net_soundness_every_block(name, shape, slopes_kind) -> None:
    net = make_net(name, shape, 100)
    x, lower, upper = _input_region(shape, 101)
    slopes = _random_slopes(net, shape, 102) if slopes_kind == "random" else None
    zonos, z_pre, relax = _blockwise(net, Zonotope.from_bounds(lower, upper), slopes)
    boxes, b_pre, _ = _blockwise(net, Box.from_bounds(lower, upper))
    # The whole-net propagation equals the block-by-block one.
    whole = net.propagate(Zonotope.from_bounds(lower, upper), slopes=slopes)
    assert torch.allclose(whole.element.center, zonos[-1].center)
    assert torch.allclose(whole.element.generators, zonos[-1].generators)
    assert sorted(whole.pre_bounds) == net.relu_indices == sorted(z_pre)

    d = lower[0].numel()
    n_coef = 100
    e_in = sample_coefficients(d, n_coef, gen(103))  # the points whose coefficients we track
    c, r = (upper + lower) / 2, (upper - lower) / 2
    tracked = c.unsqueeze(1) + r.unsqueeze(1) * e_in.reshape(1, -1, *shape)
    sampled = sample_box(lower, upper, 1000, gen(104))
    n_tracked = tracked.shape[1]
    v = torch.cat([tracked, sampled], 1)  # (2, N, *S)
    n = v.shape[1]
    coeff = e_in.unsqueeze(0).expand(2, -1, -1)
    crossing_total = 0
    for i, block in enumerate(net.blocks):
        pre = v
        v = block(v.reshape(2 * n, *v.shape[2:])).reshape(2, n, *zonos[i].center.shape[1:])
        if block.is_relu:
            lam, mu = relax[i]
            crossing_total += int((mu != 0).sum())
            assert_inside(pre, *z_pre[i])
            assert_inside(pre, *b_pre[i])
            kmax = zonos[i].num_generators - zonos[i - 1].num_generators
            e_new = relu_coefficients(pre[:, :n_tracked], lam, mu, kmax)
            coeff = torch.cat([coeff, e_new], 2)
        assert_inside(v, *zonos[i].concretize())
        assert_inside(v, boxes[i].lower, boxes[i].upper)
        # The tracked concrete points are points of the zonotope, with coefficients in [-1, 1].
        assert torch.allclose(zono_points(zonos[i], coeff), v[:, :n_tracked], atol=1e-9)
    assert crossing_total > 0, "the test should exercise crossing neurons"


@pytest.mark.parametrize("name,shape", NETS[:: 2], ids=NET_IDS[:: 2])
def test_net_batch_equals_single_images(name, shape) -> None:
    net = make_net(name, shape, 110)
    x, lower, upper = _input_region(shape, 111)
    both = net.propagate(Zonotope.from_bounds(lower, upper))
    for i in range(2):
        alone = net.propagate(Zonotope.from_bounds(lower[i:i + 1], upper[i:i + 1]))
        for a, b in zip(both.element.concretize(), alone.element.concretize()):
            assert torch.allclose(a[i], b[0], atol=1e-10)
        for j in net.relu_indices:
            assert torch.allclose(both.pre_bounds[j][0][i], alone.pre_bounds[j][0][0], atol=1e-10)


def _split_refinement(net: Net, lower: torch.Tensor, upper: torch.Tensor, n_dims: int = 4):
    """Sound pre-activation bounds, tighter than DeepZ's after the first ReLU: split the input
    box in halves along ``n_dims`` coordinates, propagate every piece, take the hull."""
    b, shape = lower.shape[0], lower.shape[1:]
    d = lower[0].numel()
    dims = list(range(0, d, max(1, d // n_dims)))[:n_dims]
    lo_f, up_f = lower.reshape(b, -1), upper.reshape(b, -1)
    mid = (lo_f + up_f) / 2
    los, ups = [], []
    for bits in itertools.product([0, 1], repeat=len(dims)):
        lo, up = lo_f.clone(), up_f.clone()
        for dim, bit in zip(dims, bits):
            (lo if bit else up)[:, dim] = mid[:, dim]
        los.append(lo)
        ups.append(up)
    p = len(los)
    pieces = net.propagate(Zonotope.from_bounds(torch.stack(los, 1).reshape(b * p, *shape),
                                                torch.stack(ups, 1).reshape(b * p, *shape)))
    return {j: (lo.reshape(b, p, *lo.shape[1:]).amin(1), up.reshape(b, p, *up.shape[1:]).amax(1))
            for j, (lo, up) in pieces.pre_bounds.items()}


@pytest.mark.parametrize("name,shape", NETS, ids=NET_IDS)
def test_net_refined_bounds_argument(name, shape) -> None:
    """Sound refined bounds at every ReLU are intersected with the zonotope's own and keep
    soundness; they tighten the later layers."""
    net = make_net(name, shape, 120)
    x, lower, upper = _input_region(shape, 121)
    refined = _split_refinement(net, lower, upper, 4 if lower[0].numel() <= 64 else 2)
    zonos, z_pre, _ = _blockwise(net, Zonotope.from_bounds(lower, upper), bounds=refined)
    plain, p_pre, _ = _blockwise(net, Zonotope.from_bounds(lower, upper))
    first = net.relu_indices[0]
    assert torch.equal(z_pre[first][0], torch.maximum(p_pre[first][0], refined[first][0]))
    assert torch.equal(z_pre[first][1], torch.minimum(p_pre[first][1], refined[first][1]))
    tightened = 0
    for j in net.relu_indices:  # never looser than either source
        assert torch.all(z_pre[j][0] >= refined[j][0]) and torch.all(z_pre[j][1] <= refined[j][1])
        assert torch.all(z_pre[j][0] >= p_pre[j][0] - TOL)
        assert torch.all(z_pre[j][1] <= p_pre[j][1] + TOL)
        tightened += int(((z_pre[j][0] > p_pre[j][0] + 1e-9)
                          | (z_pre[j][1] < p_pre[j][1] - 1e-9)).sum())
    if len(net.relu_indices) > 1:
        assert tightened > 0, "the refinement should bite somewhere"
    v = sample_box(lower, upper, 1500, gen(122))
    n = v.shape[1]
    for i, block in enumerate(net.blocks):
        if block.is_relu:
            assert_inside(v, *z_pre[i])
        v = block(v.reshape(2 * n, *v.shape[2:])).reshape(2, n, *zonos[i].center.shape[1:])
        assert_inside(v, *zonos[i].concretize())


@pytest.mark.parametrize("name,shape", NETS, ids=NET_IDS)
def test_zonotope_tighter_than_box_before_first_relu(name, shape) -> None:
    net = make_net(name, shape, 130)
    _, lower, upper = _input_region(shape, 131)
    zonos, z_pre, _ = _blockwise(net, Zonotope.from_bounds(lower, upper))
    boxes, b_pre, _ = _blockwise(net, Box.from_bounds(lower, upper))
    first = net.relu_indices[0]
    for i in range(first):  # affine prefix: |W G| row sums <= |W| |G| row sums
        lo, up = zonos[i].concretize()
        assert torch.all(lo >= boxes[i].lower - TOL) and torch.all(up <= boxes[i].upper + TOL)
    assert torch.all(z_pre[first][0] >= b_pre[first][0] - TOL)
    # At the ReLU itself DeepZ's upper bound is the (tighter) pre-activation upper bound.
    assert torch.all(zonos[first].concretize()[1] <= boxes[first].upper + TOL)


@pytest.mark.parametrize("name,shape", NETS, ids=NET_IDS)
def test_zonotope_tighter_than_box_on_the_output_here(name, shape) -> None:
    """Not a theorem (see the next test), but on these seeded nets the zonotope's logit bounds
    and margins are at least as tight as the Box's on the whole."""
    net = make_net(name, shape, 140)
    x, lower, upper = _input_region(shape, 141)
    z = net.propagate(Zonotope.from_bounds(lower, upper)).element
    b = net.propagate(Box.from_bounds(lower, upper)).element
    z_lo, z_up = z.concretize()
    assert (z_up - z_lo).sum() <= (b.upper - b.lower).sum()
    y = net(x).argmax(1)
    assert z.margin_lower(y).sum() >= b.margin_lower(y).sum() - TOL


def test_zonotope_not_always_tighter_than_box_after_relu() -> None:
    """DeepZ vs intervals is incomparable after a crossing ReLU: x in [-1, 1], y = -relu(x)."""
    net = Net([ReLU(), _linear(1, 1)], (1,))
    with torch.no_grad():
        net.blocks[1].weight.fill_(-1.0)
        net.blocks[1].bias.zero_()
    lower, upper = torch.tensor([[-1.0]], dtype=DT), torch.tensor([[1.0]], dtype=DT)
    z = net.propagate(Zonotope.from_bounds(lower, upper)).element.concretize()
    b = net.propagate(Box.from_bounds(lower, upper)).element.concretize()
    assert torch.allclose(b[1], torch.zeros(1, 1, dtype=DT))
    assert torch.allclose(z[1], torch.full((1, 1), 0.5, dtype=DT))  # looser than the Box
    assert torch.allclose(z[0], b[0])


@pytest.mark.parametrize("name,shape", NETS, ids=NET_IDS)
def test_margin_lower_bounds_every_sample(name, shape) -> None:
    net = make_net(name, shape, 150)
    x, lower, upper = _input_region(shape, 151)
    y = net(x).argmax(1)
    z = net.propagate(Zonotope.from_bounds(lower, upper)).element
    b = net.propagate(Box.from_bounds(lower, upper)).element
    m_z, m_b = z.margin_lower(y), b.margin_lower(y)
    assert m_z.shape == (2, 10) and m_b.shape == (2, 10)
    v = sample_box(lower, upper, 2000, gen(152))
    logits = net(v.reshape(-1, *shape)).reshape(2, -1, 10)
    true = logits.gather(2, y.view(2, 1, 1).expand(-1, logits.shape[1], 1)) - logits
    true_min = true.min(1).values
    assert torch.all(m_z <= true_min + TOL) and torch.all(m_b <= true_min + TOL)
    assert torch.allclose(m_z.gather(1, y.view(2, 1)), torch.zeros(2, 1, dtype=DT))
    # Keeping the correlations is never worse than the difference of the concretised bounds.
    lo, up = z.concretize()
    naive = lo.gather(1, y.view(2, 1)) - up
    assert torch.all(m_z >= naive - TOL)


@pytest.mark.parametrize("name,shape", NETS, ids=NET_IDS)
def test_margin_lower_exact_for_degenerate_region(name, shape) -> None:
    net = make_net(name, shape, 160)
    x = random_inputs(2, shape, 161)
    logits = net(x)
    labels = torch.tensor([0, 7])
    margin = logits.gather(1, labels.view(2, 1)) - logits
    for cls in (Zonotope, Box):
        out = net.propagate(cls.from_eps(x, 0.0))
        assert torch.allclose(out.element.margin_lower(labels), margin, atol=1e-10)
        lo, up = out.element.concretize()
        assert torch.allclose(lo, logits, atol=1e-10) and torch.allclose(up, logits, atol=1e-10)
    z = net.propagate(Zonotope.from_eps(x, 0.0)).element
    assert z.num_generators == x[0].numel()  # no crossing neuron, no new symbol


# ---------------------------------------------------------------------------------------------
# Cauchy random-projection estimate


def _relative_errors(estimate: tuple, exact: tuple) -> torch.Tensor:
    r_est = (estimate[1] - estimate[0]) / 2
    r_ex = (exact[1] - exact[0]) / 2
    keep = r_ex > 1e-6
    return ((r_est - r_ex).abs() / r_ex)[keep]


@pytest.mark.parametrize("name,shape", [("convmed_1_1_8", (1, 8, 8)), ("fc_10_10", (1, 8, 8)),
                                        ("convmedbig_1_1_1_8", (1, 4, 4))])
def test_cauchy_estimate_close_to_exact(name, shape) -> None:
    net = make_net(name, shape, 170)
    _, lower, upper = _input_region(shape, 171)
    g = gen(172)
    pz = ProjectedZonotope.from_bounds(lower, upper, 2000, g)
    # Input group: median |projection| of a single coordinate = its radius, approximately.
    errs = [_relative_errors(pz.concretize(), (lower, upper))]
    assert errs[0].median() < 0.1
    est = net.propagate(pz, generator=g)
    exact = net.propagate(Zonotope.from_bounds(lower, upper))
    first = net.relu_indices[0]
    # Before the first ReLU the centres agree exactly and only the radius is estimated.
    assert torch.allclose(est.pre_bounds[first][0] + est.pre_bounds[first][1],
                          exact.pre_bounds[first][0] + exact.pre_bounds[first][1], atol=1e-10)
    for j in net.relu_indices:
        errs.append(_relative_errors(est.pre_bounds[j], exact.pre_bounds[j]))
    errs.append(_relative_errors(est.element.concretize(), exact.element.concretize()))
    for err in errs:
        assert len(err) > 0
        assert err.median() < 0.1, f"median relative error {err.median():.3f}"
        assert err.mean() < 0.2
    # It is an estimate: with k=2000 some neurons are below, some above the exact radius.
    r_est = (est.pre_bounds[first][1] - est.pre_bounds[first][0])
    r_ex = (exact.pre_bounds[first][1] - exact.pre_bounds[first][0])
    assert (r_est < r_ex).any() and (r_est > r_ex).any()


def test_cauchy_same_seed_same_bounds() -> None:
    net = make_net("convmed_1_1_8", (1, 8, 8), 180)
    _, lower, upper = _input_region((1, 8, 8), 181)

    def run(seed):
        g = gen(seed)
        pz = ProjectedZonotope.from_bounds(lower, upper, 50, g)
        return net.propagate(pz, generator=g)

    a, b, c = run(5), run(5), run(6)
    for j in net.relu_indices:
        assert torch.equal(a.pre_bounds[j][0], b.pre_bounds[j][0])
        assert torch.equal(a.pre_bounds[j][1], b.pre_bounds[j][1])
    assert torch.equal(a.element.projections, b.element.projections)
    assert not torch.equal(a.pre_bounds[net.relu_indices[-1]][0],
                           c.pre_bounds[net.relu_indices[-1]][0])


def test_cauchy_group_layout() -> None:
    """k projections per noise group: the input group, then one group per ReLU."""
    net = make_net("convmed_1_1_8", (1, 8, 8), 190)
    _, lower, upper = _input_region((1, 8, 8), 191)
    pz = ProjectedZonotope.from_bounds(lower, upper, 7, gen(0))
    assert pz.projections.shape == (2, 7, 1, 8, 8)
    out = net.propagate(pz, generator=gen(1)).element
    assert out.k == 7 and out.projections.shape == (2, 7 * (1 + len(net.relu_indices)), 10)


# ---------------------------------------------------------------------------------------------
# ProjectedZonotope internals: the median of |projections| per group


def _reference_radius(groups: list[torch.Tensor]) -> torch.Tensor:
    """COLT's estimate written plainly: Σ_groups lower-median_k min(|p|, 1e10)."""
    return sum(g.abs().clamp_max(1e10).median(1).values for g in groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k,shape,layout", [
    (7, (3,), "plain"),
    (8, (2, 4, 4), "plain"),  # even k: the lower median
    (9, (3, 5, 5), "channels_last"),
    (50, (16, 32, 32), "channels_last"),  # > 2^20 values per group: the blocked/threaded path
], ids=["k7-flat", "k8-image", "k9-channels-last", "k50-large"])
def test_projected_concretize_matches_plain_median(dtype, k, shape, layout) -> None:
    if shape == (16, 32, 32):
        torch.set_num_threads(2)  # the median's thread pool (restored by the fixture)
    g = gen(300)
    groups = []
    for _ in range(2):
        p = (torch.randn(2 * k, *shape, generator=g, dtype=DT) * 3).to(dtype)
        if layout == "channels_last":
            p = p.contiguous(memory_format=torch.channels_last)
        groups.append(p.view(2, k, *shape))
    # More than half the projections of one neuron huge: its median is clamped to 1e10.
    groups[1][(0, slice(0, k // 2 + 1)) + (0,) * len(shape)] = 1e12
    center = torch.randn(2, *shape, generator=g, dtype=DT).to(dtype)
    if _has_groups():  # keep the groups' memory layout (channels-last)
        pz = ProjectedZonotope(center, None, k, groups)
    else:
        pz = ProjectedZonotope(center, torch.cat(groups, 1), k)
    lo, up = pz.concretize()
    ref = _reference_radius(groups)
    assert ref.view(2, -1)[0, 0] >= 1e10  # the clamp is exercised
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert torch.allclose(up - center, ref, **tol) and torch.allclose(center - lo, ref, **tol)
    # The stacked projections view is the concatenation of the groups.
    assert torch.equal(pz.projections, torch.cat(groups, 1))


def _has_groups() -> bool:
    import inspect
    return "groups" in inspect.signature(ProjectedZonotope.__init__).parameters


@pytest.mark.parametrize("k", [9, 10])
def test_projected_concretize_gradient_matches_plain_median(k: int) -> None:
    """The ReLU-stability loss differentiates the estimated bounds: same gradient as the plain
    ``abs().clamp_max().median()``."""
    p = torch.randn(2, 2 * k, 3, 4, 4, generator=gen(310), dtype=DT, requires_grad=True)
    w = torch.randn(2, 3, 4, 4, generator=gen(311), dtype=DT)
    center = torch.zeros(2, 3, 4, 4, dtype=DT)
    lo, up = ProjectedZonotope(center, p, k).concretize()
    (grad,) = torch.autograd.grad((up * w).sum() - (lo * w).sum(), p)
    q = p.detach().clone().requires_grad_(True)
    ref = _reference_radius(list(q.split(k, 1)))
    (grad_ref,) = torch.autograd.grad(2 * (ref * w).sum(), q)
    assert torch.allclose(grad, grad_ref)
    assert torch.count_nonzero(grad) == 2 * 2 * 3 * 4 * 4  # one selected element per column


def test_projected_float32_image_path_matches_float64() -> None:
    """Float32 image projections (channels-last convolutions, numpy medians) give the float64
    values of the same projections through the affine prefix of a conv net."""
    net = make_net("convmedbig_1_1_1_8", (3, 8, 8), 320)
    net32 = make_net("convmedbig_1_1_1_8", (3, 8, 8), 320).float()
    _, lower, upper = _input_region((3, 8, 8), 321)
    pz32 = ProjectedZonotope.from_bounds(lower.float(), upper.float(), 40, gen(322))
    pz64 = ProjectedZonotope(pz32.center.double(), pz32.projections.double(), 40)
    for i in range(net.relu_indices[0]):
        pz32 = pz32.affine(net32.blocks[i])
        pz64 = pz64.affine(net.blocks[i])
    for a, b in zip(pz32.concretize(), pz64.concretize()):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4)
    # The ReLU scales the old group by λ (same values in both precisions) and adds a new one.
    out32, _, (lam32, _) = pz32.relu(generator=gen(0))
    assert out32.projections.shape[1] == 80
    assert torch.allclose(out32.projections[:, :40].double(),
                          lam32.unsqueeze(1).double() * pz32.projections.double(), atol=1e-6)
