"""Zonotopes (DeepZ) and their Cauchy random-projection estimate.

A :class:`Zonotope` is ``centre + G e`` with ``e`` in [-1, 1]^K, stored batched:
``center`` (B, *S) and ``generators`` (B, K, *S). Affine maps act on the centre with bias and on
each generator without; the ReLU transformer adds one new generator per crossing neuron.

A :class:`ProjectedZonotope` keeps, instead of the generators of each noise group, ``k`` random
Cauchy projections of them (Wong et al. 2018, as COLT does during training): the L1 norm of each
generator row is then estimated by the median of the absolute projections. It is cheap and random,
and therefore never used for certification (it is not sound).

Both classes share one method set: ``affine``, ``relu``, ``concretize``; the layers in
:mod:`pipeline.layers` call them, so the domains know nothing of layer types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class AffineLayer(Protocol):
    """What the domains need of an affine layer (see :mod:`pipeline.layers`)."""

    def __call__(self, x: Tensor) -> Tensor: ...  # with bias
    def linear(self, x: Tensor) -> Tensor: ...  # without bias
    def abs_linear(self, x: Tensor) -> Tensor: ...  # |W| x, without bias


def relu_relaxation(lower: Tensor, upper: Tensor, slope: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Slope λ and offset μ of the ReLU band ``λx + μ ± μ`` for bounds [lower, upper].

    With ``slope=None`` λ is DeepZ's minimal-area u/(u-l). Any λ in [0, 1] is sound: for
    λ <= u/(u-l) the band is [λx, λx + u(1-λ)], else [λx, λx - λl]. Stable neurons get
    λ=1, μ=0 (active) or λ=0, μ=0 (inactive).
    """
    crossing = (lower < 0) & (upper > 0)
    active = lower >= 0
    width = (upper - lower).clamp_min(1e-30)
    deepz = upper / width
    lam = deepz if slope is None else slope.clamp(0, 1).expand_as(lower)
    mu_upper_side = upper * (1 - lam) / 2  # band [λx, λx + u(1-λ)]
    mu_lower_side = -lam * lower / 2       # band [λx, λx - λl]
    mu = torch.where(lam <= deepz, mu_upper_side, mu_lower_side)
    zero = torch.zeros_like(lower)
    lam = torch.where(crossing, lam, torch.where(active, torch.ones_like(lower), zero))
    mu = torch.where(crossing, mu, zero)
    return lam, mu


@dataclass
class Zonotope:
    center: Tensor  # (B, *S)
    generators: Tensor  # (B, K, *S)

    @classmethod
    def from_bounds(cls, lower: Tensor, upper: Tensor) -> "Zonotope":
        """One generator per input coordinate: the box [lower, upper] (B, *S)."""
        batch, shape = lower.shape[0], lower.shape[1:]
        n = lower[0].numel()
        radius = ((upper - lower) / 2).reshape(batch, n)
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        gens = (eye.unsqueeze(0) * radius.unsqueeze(1)).reshape(batch, n, *shape)
        return cls((upper + lower) / 2, gens)

    @classmethod
    def from_eps(cls, x: Tensor, eps: float, clip: tuple[float, float] = (0.0, 1.0)) -> "Zonotope":
        lower, upper = input_box(x, eps, clip)
        return cls.from_bounds(lower, upper)

    @property
    def num_generators(self) -> int:
        return self.generators.shape[1]

    def affine(self, layer: AffineLayer) -> "Zonotope":
        """Image under an affine layer: with bias on the centre, without on the generators."""
        b, k = self.generators.shape[:2]
        center = layer(self.center)
        gens = layer.linear(self.generators.reshape(b * k, *self.generators.shape[2:]))
        return Zonotope(center, gens.reshape(b, k, *gens.shape[1:]))

    def concretize(self) -> tuple[Tensor, Tensor]:
        radius = self.generators.abs().sum(1)
        return self.center - radius, self.center + radius

    def relu(self, slope: Tensor | None = None, bounds: tuple[Tensor, Tensor] | None = None
             ) -> tuple["Zonotope", tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """DeepZ ReLU. ``bounds`` (e.g. from LP refinement) are intersected with the zonotope's own.

        Returns the new zonotope, the pre-activation bounds used and the relaxation (λ, μ).
        A new generator is appended for each crossing neuron only (padded to the batch maximum).
        """
        lower, upper = self.concretize()
        if bounds is not None:
            lower, upper = torch.maximum(lower, bounds[0]), torch.minimum(upper, bounds[1])
        lam, mu = relu_relaxation(lower, upper, slope)
        center = lam * self.center + mu
        gens = lam.unsqueeze(1) * self.generators
        b = center.shape[0]
        flat_mu = mu.reshape(b, -1)
        crossing = flat_mu != 0
        counts = crossing.sum(1)
        kmax = int(counts.max()) if b else 0
        if kmax:
            # new[b, j, :] is one-hot at the j-th crossing neuron of image b, scaled by its μ.
            new = torch.zeros(b, kmax, flat_mu.shape[1], dtype=mu.dtype, device=mu.device)
            rows, cols = crossing.nonzero(as_tuple=True)
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(rows.numel(), device=mu.device) - starts[rows]
            new[rows, slot, cols] = flat_mu[rows, cols]
            gens = torch.cat([gens, new.reshape(b, kmax, *mu.shape[1:])], 1)
        return Zonotope(center, gens), (lower, upper), (lam, mu)

    def margin_lower(self, label: Tensor) -> Tensor:
        """Lower bound of logit[label] - logit[j] for every j (B, C); keeps the correlations."""
        idx = label.view(-1, 1)
        c_diff = self.center.gather(1, idx) - self.center
        g_y = self.generators.gather(2, idx.view(-1, 1, 1).expand(-1, self.num_generators, 1))
        return c_diff - (g_y - self.generators).abs().sum(1)

    def to(self, dtype: torch.dtype) -> "Zonotope":
        return Zonotope(self.center.to(dtype), self.generators.to(dtype))

    def point(self, coefficients: Tensor) -> Tensor:
        """centre + G e for coefficients e (B, K) in [-1, 1]."""
        return self.center + torch.einsum("bk,bk...->b...", coefficients, self.generators)


@dataclass
class ProjectedZonotope:
    """Zonotope whose generator groups are replaced by ``k`` Cauchy projections each.

    ``projections`` (B, G*k, *S) holds the k projections of every noise group stacked along dim 1
    (one affine call per layer for all groups together).
    """

    center: Tensor
    projections: Tensor
    k: int

    @classmethod
    def from_bounds(cls, lower: Tensor, upper: Tensor, k: int,
                    generator: torch.Generator | None = None) -> "ProjectedZonotope":
        radius = (upper - lower) / 2
        cauchy = _cauchy((radius.shape[0], k, *radius.shape[1:]), radius, generator)
        return cls((upper + lower) / 2, cauchy * radius.unsqueeze(1), k)

    def affine(self, layer: AffineLayer) -> "ProjectedZonotope":
        b, n = self.projections.shape[:2]
        proj = layer.linear(self.projections.reshape(b * n, *self.projections.shape[2:]))
        return ProjectedZonotope(layer(self.center), proj.reshape(b, n, *proj.shape[1:]), self.k)

    def concretize(self) -> tuple[Tensor, Tensor]:
        b, n = self.projections.shape[:2]
        groups = self.projections.reshape(b, n // self.k, self.k, *self.projections.shape[2:])
        # Median of |projection| estimates each group's L1 norm; clamp as COLT does (±1e10).
        radius = groups.abs().clamp_max(1e10).median(dim=2).values.sum(1)
        return self.center - radius, self.center + radius

    def relu(self, slope: Tensor | None = None, bounds: tuple[Tensor, Tensor] | None = None,
             generator: torch.Generator | None = None
             ) -> tuple["ProjectedZonotope", tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        lower, upper = self.concretize()
        if bounds is not None:
            lower, upper = torch.maximum(lower, bounds[0]), torch.minimum(upper, bounds[1])
        lam, mu = relu_relaxation(lower, upper, slope)
        center = lam * self.center + mu
        proj = lam.unsqueeze(1) * self.projections
        new = _cauchy((mu.shape[0], self.k, *mu.shape[1:]), mu, generator) * mu.unsqueeze(1)
        return (ProjectedZonotope(center, torch.cat([proj, new], 1), self.k),
                (lower, upper), (lam, mu))


def _cauchy(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    return torch.tan(torch.pi * (u - 0.5))


def input_box(x: Tensor, eps: float, clip: tuple[float, float] = (0.0, 1.0)
              ) -> tuple[Tensor, Tensor]:
    """The L∞ ball of radius ``eps`` around ``x`` intersected with the pixel range."""
    return (x - eps).clamp(*clip), (x + eps).clamp(*clip)
