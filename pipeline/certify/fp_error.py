"""How far a network's floating-point outputs can be from its exact ones, per input region.

A certificate is computed on the exact real-arithmetic network (the imported weights) in float64.
The network itself runs in float32 (or float64 for a DOUBLE ONNX model), and a margin proved for
the exact network holds for the network as it runs only when it exceeds the rounding error of
that run. This module bounds it, layer by layer, from the magnitudes the region can reach
(Higham's γ_n = n u / (1 - n u) for sums of n products, any summation order):

* the run in the model's precision (unit roundoff u = 2^-24 for float32): each layer's own rule
  (``fp_error`` in :mod:`pipeline.layers`; for y = Wx + b it is
  |W| e + γ_{n+k} (|W| (|x| + e) + |b|), ReLU is exact and 1-Lipschitz) on the reachable
  magnitudes |x| (an interval pass intersected with the zonotope's pre-activation bounds);
* the float64 bound computation itself (u = 2^-53): the same rule with the fan-in grown by the
  number of generators, on magnitudes that hold for every zonotope the cascade builds (any
  slopes λ in [0, 1]), and the rounding of the ReLU relaxation;
* the margin rows a·y - b in float64.

A disjunct's margin certifies only when its lower bound exceeds :func:`margin_threshold`.

    err = output_error(net64, lower, upper, run.pre_bounds, precision=torch.float32)
    tau = margin_threshold(err, A, b, owner, n_disjuncts)   # (B, D): lb > tau certifies

Covered: IEEE round-to-nearest float32/float64 with the products and sums of each output in any
order (fused multiply-add included), as CPU BLAS/oneDNN kernels and ONNX Runtime's default CPU
kernels compute them. Not covered: Winograd/FFT convolutions, TF32 or reduced-precision
accumulation, flush-to-zero of subnormals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.layers import gamma, underflow
from pipeline.nets import Net

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
U64 = UNIT_ROUNDOFF[torch.float64]
# Rounding of the float64 ReLU relaxation (λ, μ and the products λc, λg) per unit of magnitude,
# with room to spare.
_RELU_ABSTRACT_OPS = 8


class PrecisionError(ValueError):
    """A network whose precision is neither float32 nor float64."""


def model_precision(net: Net) -> torch.dtype:
    """The precision the network runs in: its ``precision`` attribute (set by the ONNX importer
    from the model's declared type), else the dtype of its parameters (float32 for this
    project's checkpoints)."""
    dtype = getattr(net, "precision", None)
    if dtype is None:
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()),
                     torch.float32)
    if dtype not in UNIT_ROUNDOFF:
        raise PrecisionError(f"network in {dtype}: only float32 and float64 networks can be "
                             "certified")
    return dtype


@dataclass
class OutputError:
    """What the margin thresholds need, per input (batched like the region)."""

    run: Tensor  # (B, n_out) forward bound on |fl_precision(f(x)) - f(x)| (for reports)
    bound: Tensor  # (B, n_out) error of the float64 bound computation (any cascade zonotope)
    magnitude: Tensor  # (B, n_out) magnitudes that computation handles at the output
    generators: int  # an upper bound on the number of zonotope generators
    # Per affine block: the rounding error it adds to its output in the run (block index ->
    # (B, *S)); per ReLU: the slope class of fl(relu) - relu (s = 1, s = 0, or s in [0, 1]).
    injected: dict[int, Tensor] = field(default_factory=dict)
    relu_one: dict[int, Tensor] = field(default_factory=dict)
    relu_zero: dict[int, Tensor] = field(default_factory=dict)
    net: Net | None = None
    shapes: list[tuple[int, ...]] = field(default_factory=list)


def output_error(net: Net, lower: Tensor, upper: Tensor,
                 pre_bounds: dict[int, tuple[Tensor, Tensor]] | None = None,
                 precision: torch.dtype = torch.float32) -> OutputError:
    """Bounds for inputs in [lower, upper] (B, *input_shape); ``pre_bounds`` are valid bounds of
    the reachable pre-activations of the ReLU blocks (e.g. a zonotope run's), which tighten the
    interval magnitudes. ``net`` is the float64 copy.

    The run's error is kept as what each layer adds (``injected``): the difference of the run
    and the exact network evolves exactly as Δ' = W S Δ + δ, where S is diagonal with entries
    in [0, 1] (a ReLU's difference quotient; 1 or 0 where the neuron is stable under the error
    too), so a margin row's error is a sum over layers of (row · later maps) · δ, bounded in
    :func:`row_threshold` by a backward interval pass. The worst-case forward bound (|W| Δ per
    layer) only widens magnitudes and decides that stability.
    """
    u_run = UNIT_ROUNDOFF[precision]
    pre_bounds = pre_bounds or {}
    lo = lower.to(torch.float64)
    up = upper.to(torch.float64)
    n_gen = int(np.prod(lower.shape[1:])) + _relu_neurons(net)
    out = OutputError(lo, lo, lo, n_gen, net=net, shapes=[tuple(lower.shape[1:])])
    e_run = torch.zeros_like(lo)
    e_abs = torch.zeros_like(lo)
    big = torch.maximum(lo.abs(), up.abs())  # magnitudes of any zonotope of the cascade
    with torch.no_grad():
        for i, block in enumerate(net.blocks):
            mag = torch.maximum(lo.abs(), up.abs())
            if block.is_relu:
                if i in pre_bounds:
                    plo, pup = (t.to(torch.float64) for t in pre_bounds[i])
                    lo, up = torch.maximum(lo, plo), torch.minimum(up, pup)
                    lo = torch.minimum(lo, up)  # an empty intersection: nothing is reachable
                slack = _slack(e_abs, mag)
                out.relu_one[i] = (lo - slack - e_run) >= 0
                out.relu_zero[i] = (up + slack + e_run) <= 0
                e_run = block.fp_error(e_run, mag, u_run, upper=up + slack)
                # The relaxation's λ, μ from computed bounds: the error of the input (also in
                # the bounds) and the rounding of the band, on the abstract magnitude.
                e_abs = 3 * e_abs + (_RELU_ABSTRACT_OPS * U64 + 2 * gamma(n_gen, U64)) * big
                # Every zonotope of the cascade intersects its ReLU bounds with ``pre_bounds``:
                # a neuron stable there is stable in all of them (λ = 0 or 1, μ = 0); a crossing
                # one has |λc + μ| + Σ|λg| + μ <= |c| + Σ|g| + max(|l|, |u|) <= 2 · magnitude.
                if i in pre_bounds:
                    dead, active = pre_bounds[i][1] <= 0, pre_bounds[i][0] >= 0
                    big = torch.where(dead.to(big.device), torch.zeros_like(big),
                                      torch.where(active.to(big.device), big, 2 * big))
                else:
                    big = 2 * big
                lo, up = lo.clamp_min(0), up.clamp_min(0)
            else:
                wide = mag + _slack(e_abs, mag)
                before = block.fp_error(e_run, wide, u_run)
                carried = block.fp_error(e_run, wide, 0.0) if e_run.any() else \
                    torch.zeros_like(before)
                out.injected[i] = (before - carried).clamp_min(0)
                e_run = before
                e_abs = block.fp_error(e_abs, big, U64, extra=n_gen)
                big = _abs_affine(block, big)
                center, radius = (up + lo) / 2, (up - lo) / 2
                c, r = block(center), block.abs_linear(radius)
                # Outward by the error of this interval pass itself (float64, same rule).
                r = r + block.fp_error(torch.zeros_like(radius), mag, U64) * 2
                lo, up = c - r, c + r
            out.shapes.append(tuple(lo.shape[1:]))
    flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
    # Concretising the final zonotope sums up to n_gen generators.
    out.run = flat(e_run)
    out.bound = flat(e_abs) + gamma(n_gen, U64) * flat(big)
    out.magnitude = flat(big)
    return out


class ZonotopeRounding:
    """An a-posteriori bound on the rounding of one zonotope pass computed in a lower precision
    (float32 DeepZ, ``CertifyConfig.zonotope_dtype``), from the values it computed:
    ``run_zonotope(..., rounding=tracker)`` calls :meth:`step` before every block.

    Invariant, per input and coordinate: every exact value the network reaches from the box at
    the current block lies in the computed zonotope (c, G) widened by the box ``radius``, and
    ``magnitude`` bounds its S = |c| + Σ_g |g|. No pass over the generators is needed:

    * the box: its float32 centre and radii round by u each, so the radius starts at
      3u max(|l|, |u|) (2u and room for the u² terms) and S at max(|l|, |u|) (1 + 4u);
    * an affine block maps the widened zonotope into W(c, G) ± |W| r; computing W c + b and
      every W g rounds by at most γ_n (|W| S + |b|) in all (summed over the generators), so the
      radius becomes the layer's own rule ``fp_error(r, S, u)`` (plus the underflow of every
      generator's products), and S at most |W| S + |b| plus that rounding;
    * a ReLU takes the computed bounds l', u' = fl(c ∓ fl(Σ|g|)): there S <= max(|l'|, |u'|)
      (1 + 2γ_{K+1}), and the true bounds of the widened zonotope are within d = r + γ_{K+1} S
      of l', u'. The band λ'x + μ' ± μ' built for [l', u'] then holds on [l' - d, u' + d] up to
      d (plus 8 u (|l'| + |u'| + d) for the rounding of λ' and μ'; nothing where the neuron is
      stable even d beyond its bounds), and the new centre λ'c + μ' and generators λ'g round by
      γ_2 (λ' S + |μ'|) + u λ' S: the radius becomes λ' r + those, S at most
      (1 + γ_2)(λ' S + 2|μ'|). ``widen[i]`` = d: the computed ReLU bounds widened by it are
      valid bounds for later (float64) zonotopes to intersect with.

    At the end, a margin row a · y of the exact network is at least the computed zonotope's
    lower bound minus |a| · ``radius`` (:meth:`add_to`).
    """

    def __init__(self, lower: Tensor, upper: Tensor,
                 precision: torch.dtype = torch.float32) -> None:
        self.u = UNIT_ROUNDOFF[precision]
        edge = torch.maximum(lower.double().abs(), upper.double().abs())
        self.radius = 3 * self.u * edge + underflow(self.u)  # 2u, and room for u^2 terms
        self.magnitude = edge * (1 + 4 * self.u) + underflow(self.u)
        self.widen: dict[int, Tensor] = {}

    def step(self, index: int, block: torch.nn.Module, element: Any,
             pre: tuple[Tensor, Tensor] | None = None,
             relax: tuple[Tensor, Tensor] | None = None) -> None:
        """Account for ``block`` (index ``index``) applied to ``element`` (its input; for a
        ReLU, ``pre`` and ``relax`` are the bounds and the relaxation it used)."""
        u = self.u
        k = element.generators.shape[1]
        r, mag = self.radius, self.magnitude
        if block.is_relu:
            shape = r.shape
            lo, up = (t.double().reshape(shape) for t in pre)
            lam, mu = (t.double().reshape(shape) for t in relax)
            g = gamma(k + 1, u)
            mag = torch.minimum(mag, torch.maximum(lo.abs(), up.abs()) * (1 + 2 * g))
            d = (r + g * mag) * (1 + 2.0 ** -40)
            robust = ((lo - d) >= 0) | ((up + d) <= 0)
            crossing = (lo < 0) & (up > 0)
            band = torch.where(crossing, 8 * u * (lo.abs() + up.abs() + d), 0.0)
            viol = torch.where(robust, 0.0, d + band)
            ops = gamma(2, u) * (lam * mag + mu.abs()) + u * lam * mag
            self.radius = (lam * r + viol + ops) * (1 + 2.0 ** -40)
            self.magnitude = (1 + gamma(2, u)) * (lam * mag + 2 * mu.abs()) * (1 + 2.0 ** -40)
            self.widen[index] = d
            return
        # The rule counts one output's underflows; every generator has its own.
        n_in = int(np.prod(r.shape[1:]))
        self.radius = (block.fp_error(r, mag, u) + (k + 1) * n_in * underflow(u)) \
            * (1 + 2.0 ** -40)
        self.magnitude = (_abs_affine(block, mag) + block.fp_error(torch.zeros_like(mag), mag, u)
                          + (k + 1) * n_in * underflow(u)) * (1 + 2.0 ** -40)

    def widened(self, pre_bounds: dict[int, tuple[Tensor, Tensor]]
                ) -> dict[int, tuple[Tensor, Tensor]]:
        """The computed ReLU bounds (cast to float64) widened into valid ones."""
        out = {}
        for i, (lo, up) in pre_bounds.items():
            lo, up = lo.double(), up.double()
            d = self.widen[i].reshape(lo.shape) * (1 + 2.0 ** -40)
            out[i] = (lo - d - lo.abs() * 2.0 ** -50, up + d + up.abs() * 2.0 ** -50)
        return out

    def add_to(self, err: OutputError) -> OutputError:
        """``err`` for margins computed on this zonotope: its radius joins the bound, its
        magnitudes those the float64 margin rows handle."""
        flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
        err.bound = err.bound + flat(self.radius)
        err.magnitude = torch.maximum(err.magnitude, flat(self.magnitude))
        return err


def _slack(e_abs: Tensor, mag: Tensor) -> Tensor:
    """Reachable magnitudes come from float64 bounds: widen them by that computation's error
    (and a relative 2^-40 for the interval pass)."""
    return e_abs + mag * 2.0 ** -40


def _abs_affine(block: torch.nn.Module, mag: Tensor) -> Tensor:
    """|W| mag + |b|: a bound on |W x + b| for |x| <= mag."""
    return block.abs_linear(mag) + block.abs_bias(mag)


def _relu_neurons(net: Net) -> int:
    shapes = net.shapes()
    return sum(int(np.prod(shapes[i - 1])) for i in net.relu_indices if i > 0)


def row_threshold(err: OutputError, A: Tensor, b: Tensor) -> Tensor:
    """(B, R): a bound on how far the computed lower bound of a_r·y - b_r may be above the true
    minimum of that row over the network as it runs. ``A`` (R, n) or (B, R, n), ``b`` (R,) or
    (B, R)."""
    dev = err.run.device
    A = A.to(dev, torch.float64)
    b = b.to(dev, torch.float64)
    bsz = err.run.shape[0]
    if A.dim() == 2:
        A = A.unsqueeze(0).expand(bsz, *A.shape)
    if b.dim() == 1:
        b = b.unsqueeze(0).expand(bsz, -1)
    rows = A.shape[1]
    g = gamma(A.shape[-1] + err.generators + 4, U64)
    a_abs = A.abs()
    tau = torch.einsum("brn,bn->br", a_abs, err.bound) + g * (
        torch.einsum("brn,bn->br", a_abs, err.magnitude) + b.abs())
    tau = tau + _run_error(err, A.reshape(bsz * rows, -1)).reshape(bsz, rows)
    # The threshold itself is computed in float64: a relative 2^-40 more covers its rounding.
    return tau * (1 + 2.0 ** -40)


def _run_error(err: OutputError, rows: Tensor) -> Tensor:
    """(B*R,): Σ_k max|v_k| · δ_k, v_k the row pulled back to block k's output through every
    later block (an interval: S in [0, 1] at ReLUs where the run may differ in sign)."""
    net = err.net
    per = rows.shape[0] // err.run.shape[0]
    c, r = rows, torch.zeros_like(rows)  # centre and radius of the pulled-back row
    total = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    with torch.no_grad():
        for i in range(len(net.blocks) - 1, -1, -1):
            block = net.blocks[i]
            shape = err.shapes[i + 1]
            c, r = c.reshape(-1, *shape), r.reshape(-1, *shape)
            if block.is_relu:
                one = err.relu_one[i].repeat_interleave(per, 0)
                zero = err.relu_zero[i].repeat_interleave(per, 0)
                lo, hi = c - r, c + r
                lo = torch.where(one, lo, torch.where(zero, 0.0, lo.clamp_max(0)))
                hi = torch.where(one, hi, torch.where(zero, 0.0, hi.clamp_min(0)))
                c, r = (hi + lo) / 2, (hi - lo) / 2
                continue
            delta = err.injected.get(i)
            if delta is not None:
                d = delta.repeat_interleave(per, 0)
                total = total + ((c.abs() + r) * d).flatten(1).sum(1)
            if i > 0:
                c, r = _pull_back(block, c, r, err.shapes[i])
    return total


def _pull_back(block: torch.nn.Module, c: Tensor, r: Tensor, in_shape: tuple[int, ...]
               ) -> tuple[Tensor, Tensor]:
    """W^T c and |W|^T r for an affine block (vector-Jacobian products of its linear parts)."""
    with torch.enable_grad():
        x = torch.zeros(c.shape[0], *in_shape, dtype=c.dtype, device=c.device,
                        requires_grad=True)
        (wc,) = torch.autograd.grad(block.linear(x), x, c)
        x2 = torch.zeros_like(x, requires_grad=True)
        (wr,) = torch.autograd.grad(block.abs_linear(x2), x2, r)
    return wc, wr


def margin_threshold(err: OutputError, A: Tensor, b: Tensor, owner: Tensor,
                     n_disjuncts: int) -> Tensor:
    """(B, D): per disjunct, the largest threshold of its rows. A disjunct's margin is the max of
    its rows, so a lower bound above every row's threshold leaves some row positive in the run."""
    tau = row_threshold(err, A, b)
    out = torch.zeros(tau.shape[0], n_disjuncts, dtype=tau.dtype, device=tau.device)
    return out.scatter_reduce(1, owner.to(tau.device).expand_as(tau), tau, "amax",
                              include_self=True)


def robustness_threshold(err: OutputError, labels: Tensor) -> Tensor:
    """(B, C): the threshold of y_label - y_j for every j (the label's own column is 0)."""
    n = err.run.shape[1]
    labels = labels.reshape(-1).to(err.run.device)
    eye = torch.eye(n, dtype=torch.float64, device=err.run.device)
    A = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # (B, C, C): e_label - e_j
    tau = row_threshold(err, A, torch.zeros(A.shape[:2], dtype=torch.float64,
                                            device=A.device))
    return tau.scatter(1, labels.view(-1, 1), 0.0)
