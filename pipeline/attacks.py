"""COLT's convex regions and the attacks inside them.

* :func:`prefix_relaxation` computes the DeepZ region C_l(x) of the prefix up to block ``l``: the
  bounds and ReLU relaxations (λ, μ) at every ReLU, from exact zonotope bounds or from COLT's
  Cauchy random-projection estimate (:func:`propagate_projected`, which skips work the caller
  does not need); :func:`extend_relaxation` continues it to a later block.
* :func:`latent_point` evaluates the point of that region for noise coefficients e ∈ [-1, 1]: the
  prefix with every ReLU replaced by its band ``λx + μ + μ e``. This is exactly
  ``centre + Σ generators · e`` of the zonotope, computed in one forward pass instead of one pass
  per noise group.
* :func:`latent_pgd` is PGD on those coefficients, projected by clipping to the box (reference
  §1.4); layer -1 is the input box, so it is also input PGD.
* :func:`pgd_attack` is input PGD with restarts that keeps any misclassifying point (certification).
* :func:`retain_freed_memory` keeps glibc from unmapping the large freed tensors of a training
  step, so that they are not page-faulted in again every iteration.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.domains.zonotope import ProjectedZonotope, Zonotope, input_box
from pipeline.nets import Net, Propagation


@dataclass
class Region:
    """The convex region of a prefix: input box plus (λ, μ) of every ReLU up to ``layer``."""

    lower: Tensor
    upper: Tensor
    layer: int
    propagation: Propagation

    @property
    def relaxations(self) -> dict[int, tuple[Tensor, Tensor]]:
        return self.propagation.relaxations


def prefix_relaxation(net: Net, x: Tensor, eps: float, layer: int, bounds: str = "cauchy",
                      n_rand_proj: int = 50, generator: torch.Generator | None = None, *,
                      keep_element: bool = True) -> Region:
    """DeepZ region after block ``layer`` for the L∞ ball of ``eps`` around ``x`` (clipped to [0,1]).

    ``bounds="cauchy"`` estimates each ReLU's bounds with ``n_rand_proj`` Cauchy projections per
    noise group (COLT's training default, random and unsound); ``"exact"`` concretises the zonotope.
    Gradients flow if enabled by the caller (the ReLU-stability loss needs them).

    ``keep_element=False`` (Cauchy bounds): the caller wants only the bounds and relaxations, not
    the propagated element, so a last ReLU block draws no new projection group and the region's
    ``propagation.element`` is None (it cannot be extended).
    """
    lower, upper = input_box(x, eps)
    if layer < 0:
        return Region(lower, upper, layer, Propagation(None))
    if bounds == "exact":
        element = Zonotope.from_bounds(lower, upper)
        prop = net.propagate(element, -1, layer)
    else:
        element = ProjectedZonotope.from_bounds(lower, upper, n_rand_proj, generator)
        prop = propagate_projected(net, element, -1, layer, generator, keep_element=keep_element,
                                   owned=True)
    return Region(lower, upper, layer, prop)


def extend_relaxation(net: Net, region: Region, layer: int,
                      generator: torch.Generator | None = None, *,
                      keep_element: bool = True) -> Region:
    """Continue a region's propagation from its layer to a later ``layer`` (e.g. with gradients).

    ``keep_element`` as in :func:`prefix_relaxation`; the region itself is left unchanged.
    """
    if region.layer < 0 or region.propagation.element is None:
        raise ValueError("extend_relaxation needs a region with a propagated element")
    element = region.propagation.element
    if isinstance(element, ProjectedZonotope):
        prop = propagate_projected(net, element, region.layer, layer, generator,
                                   keep_element=keep_element, owned=False)
    else:
        prop = net.propagate(element, region.layer, layer)
    merged = Propagation(prop.element, {**region.propagation.pre_bounds, **prop.pre_bounds},
                         {**region.propagation.relaxations, **prop.relaxations})
    return Region(region.lower, region.upper, layer, merged)


def propagate_projected(net: Net, element: ProjectedZonotope, start: int, end: int,
                        generator: torch.Generator | None = None, *, keep_element: bool = True,
                        owned: bool = False) -> Propagation:
    """``net.propagate`` for the Cauchy estimate (DeepZ slopes, no refined bounds), cheaper:

    * ``keep_element=False``: a last ReLU block computes its bounds and (λ, μ) only;
    * ``owned=True`` (``element`` is the caller's to consume): groups that no gradient needs are
      scaled by λ in place; intermediate elements are always owned.

    The random draws are the same as ``net.propagate``'s, in the same order (except the last
    ReLU's new group when it is not kept).
    """
    result = Propagation(element)
    for i in range(start + 1, end + 1):
        block = net.blocks[i]
        if block.is_relu:
            element, pre, relax = element.relu(None, None, generator,
                                               output=keep_element or i < end, inplace=owned)
            result.pre_bounds[i] = pre
            result.relaxations[i] = relax
            owned = True
        else:
            before = element.groups
            element, _, _ = block.abstract(element)
            # An affine block may return views (Flatten): still owned only if it was before.
            owned = owned or not any(_same_memory(a, b) for a, b in zip(before, element.groups))
    result.element = element
    return result


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def coefficient_shapes(net: Net, region: Region, layer: int) -> list[torch.Size]:
    """Shapes of the noise-coefficient tensors of the region up to ``layer``: input, then ReLUs."""
    shapes = [region.lower.shape]
    shapes += [region.relaxations[i][1].shape for i in net.relu_indices if i <= layer]
    return shapes


def latent_point(net: Net, region: Region, layer: int, coefficients: list[Tensor]) -> Tensor:
    """The point of the region after block ``layer`` for coefficients in [-1, 1]."""
    center, radius = (region.upper + region.lower) / 2, (region.upper - region.lower) / 2
    z = torch.addcmul(center, radius, coefficients[0])
    group = 1
    for i in range(layer + 1):
        block = net.blocks[i]
        if block.is_relu:
            lam, mu = region.relaxations[i]
            # λ z + μ (1 + e), as two fused multiply-adds
            z = torch.addcmul(torch.addcmul(mu, mu, coefficients[group]), lam, z)
            group += 1
        else:
            z = block(z)
    return z


def latent_pgd(net: Net, region: Region, layer: int, y: Tensor, steps: int, step_size: float,
               generator: torch.Generator | None = None) -> Tensor:
    """COLT's latent attack: ``steps - 1`` signed-gradient steps on the coefficients, clipped to
    [-1, 1], from a uniform random start; returns the final iterate's latent point (detached)."""
    shapes = coefficient_shapes(net, region, layer)
    region = _detached(region)
    coeffs = [2 * torch.rand(s, device=y.device, dtype=region.lower.dtype, generator=generator) - 1
              for s in shapes]
    with torch.enable_grad():
        for _ in range(steps - 1):
            for c in coeffs:
                c.requires_grad_(True)
            loss = F.cross_entropy(net.forward_from(layer, latent_point(net, region, layer, coeffs)),
                                   y, reduction="sum")
            grads = torch.autograd.grad(loss, coeffs)
            coeffs = [(c.detach() + step_size * g.sign()).clamp(-1, 1)
                      for c, g in zip(coeffs, grads)]
    with torch.no_grad():
        return latent_point(net, region, layer, coeffs)


def _detached(region: Region) -> Region:
    relax = {i: (lam.detach(), mu.detach()) for i, (lam, mu) in region.relaxations.items()}
    return Region(region.lower.detach(), region.upper.detach(), region.layer,
                  Propagation(None, {}, relax))


_RETAINED: bool | None = None


def retain_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the system.

    A training step allocates and frees the same few hundred MB of projections every iteration.
    By default glibc serves each block over 32 MB from a fresh ``mmap`` and unmaps it on free, so
    every page is faulted in and zeroed again in every iteration; on virtual machines that costs
    more than the arithmetic on it (measured 2-5x on single large ops here). With ``mmap``
    disabled and trimming off, freed blocks stay in the heap and are reused. The process's peak
    memory is unchanged, but it keeps that memory until it exits.

    Idempotent; process-wide. Returns whether it is in effect (False where the C library is not
    glibc, or with ``PIPELINE_RETAIN_FREED_MEMORY=0`` in the environment).
    """
    global _RETAINED
    if _RETAINED is None:
        _RETAINED = False
        if os.environ.get("PIPELINE_RETAIN_FREED_MEMORY", "1") != "0":
            try:
                libc = ctypes.CDLL(None)
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                return False
            m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
            # mmap off: every block comes from the heap; trim threshold -1: never give it back;
            # one arena, so that threads started later (the median's) reuse the same memory.
            _RETAINED = (bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))
                         and bool(mallopt(m_arena_max, 1)))
    return _RETAINED


@dataclass
class AttackResult:
    """Per input: whether a misclassifying point was found, and the point (or the last iterate)."""

    found: Tensor  # (B,) bool
    x_adv: Tensor  # (B, *S)


def pgd_attack(net: Net, x: Tensor, y: Tensor, eps: float, steps: int, step_size: float,
               restarts: int = 1, generator: torch.Generator | None = None) -> AttackResult:
    """Input PGD with random restarts (step in units of ε, as COLT's certifier); keeps every
    point that a plain forward pass misclassifies, checked again at the end."""
    lower, upper = input_box(x, eps)
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best = x.clone()
    for _ in range(max(restarts, 1)):
        coeff = 2 * torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) - 1
        for _ in range(steps):
            coeff.requires_grad_(True)
            with torch.enable_grad():
                point = torch.minimum(torch.maximum(center + radius * coeff, lower), upper)
                logits = net(point)
                loss = F.cross_entropy(logits, y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, coeff)
            with torch.no_grad():
                wrong = (logits.argmax(1) != y) & ~found
                best[wrong] = point[wrong]
                found |= wrong
            coeff = (coeff.detach() + step_size * grad.sign()).clamp(-1, 1)
        with torch.no_grad():
            # Clamped: rounding can put centre + radius at a corner just outside the box.
            final = torch.minimum(torch.maximum(center + radius * coeff, lower), upper)
            wrong = (net(final).argmax(1) != y) & ~found
            best[wrong] = final[wrong]
            found |= wrong
        if bool(found.all()):
            break
    with torch.no_grad():
        # A counterexample counts only if a plain forward pass confirms it and it is in the box.
        inside = ((best >= lower) & (best <= upper)).flatten(1).all(1)
        found &= (net(best).argmax(1) != y) & inside
    return AttackResult(found, best)
