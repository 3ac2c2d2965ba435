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

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
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


class ProjectedZonotope:
    """Zonotope whose generator groups are replaced by ``k`` Cauchy projections each.

    The groups are the input box and one per ReLU. ``groups[g]`` (B, k, *S) holds the k
    projections of group g; ``projections`` (B, G*k, *S) is all of them stacked along dim 1
    (built on demand). Keeping the groups apart lets a ReLU scale the old groups in place and
    append a new one without copying, and each median works on one group.
    """

    def __init__(self, center: Tensor, projections: Tensor | None, k: int,
                 groups: list[Tensor] | None = None) -> None:
        if groups is None:
            if projections is None:
                raise ValueError("ProjectedZonotope needs projections or groups")
            if projections.shape[1] % k:
                raise ValueError(f"{projections.shape[1]} projections are not groups of k={k}")
            groups = list(projections.split(k, dim=1))
        self.center = center
        self.k = k
        self.groups = list(groups)

    def __repr__(self) -> str:
        return (f"ProjectedZonotope(center={tuple(self.center.shape)}, k={self.k}, "
                f"groups={len(self.groups)})")

    @property
    def projections(self) -> Tensor:
        return self.groups[0] if len(self.groups) == 1 else torch.cat(self.groups, 1)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @classmethod
    def from_bounds(cls, lower: Tensor, upper: Tensor, k: int,
                    generator: torch.Generator | None = None) -> "ProjectedZonotope":
        radius = (upper - lower) / 2
        return cls((upper + lower) / 2, None, k, [_cauchy_scaled(radius, k, generator)])

    def affine(self, layer: AffineLayer) -> "ProjectedZonotope":
        """Each group through the linear part (one batched call per group); centre with bias."""
        groups = [_linear_images(layer, g) for g in self.groups]
        return ProjectedZonotope(layer(self.center), None, self.k, groups)

    def concretize(self) -> tuple[Tensor, Tensor]:
        # Median of |projection| estimates each group's L1 norm; clamp as COLT does (±1e10).
        radius = _median_abs(self.groups[0])
        for g in self.groups[1:]:
            radius = radius + _median_abs(g)
        return self.center - radius, self.center + radius

    def relu(self, slope: Tensor | None = None, bounds: tuple[Tensor, Tensor] | None = None,
             generator: torch.Generator | None = None, *, output: bool = True,
             inplace: bool = False
             ) -> tuple["ProjectedZonotope | None", tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The ReLU band: old groups scaled by λ, a new group of k Cauchy projections of μ.

        ``output=False`` returns ``None`` for the element (only the bounds and the relaxation are
        wanted, e.g. at the last layer of a region): no projections are scaled or drawn.
        ``inplace=True`` scales this element's groups in place when no gradient needs them (for
        a propagation that owns its intermediate elements).
        """
        lower, upper = self.concretize()
        if bounds is not None:
            lower, upper = torch.maximum(lower, bounds[0]), torch.minimum(upper, bounds[1])
        lam, mu = relu_relaxation(lower, upper, slope)
        if not output:
            return None, (lower, upper), (lam, mu)
        center = lam * self.center + mu
        lam_k = lam.unsqueeze(1)
        groups = [g.mul_(lam_k) if inplace and not _needs_grad(g, lam_k) else g * lam_k
                  for g in self.groups]
        groups.append(_cauchy_scaled(mu, self.k, generator))
        return ProjectedZonotope(center, None, self.k, groups), (lower, upper), (lam, mu)


# Projections are clamped to ±1e10 before their median (COLT); median(min(|p|, c)) equals
# min(median(|p|), c), so the clamp is applied to the median.
_CLAMP = 1e10


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _cauchy_scaled(scale: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """``_cauchy((B, k, *S)) * scale.unsqueeze(1)``: the same draws in the same order.

    On the CPU without gradient it is drawn in slices of the batch (the CPU generator gives the
    same stream in pieces), each finished while it is in the cache.
    """
    shape = (scale.shape[0], k, *scale.shape[1:])
    if _needs_grad(scale) or scale.device.type != "cpu":
        u = torch.rand(shape, dtype=scale.dtype, device=scale.device, generator=generator)
        return u.sub_(0.5).mul_(torch.pi).tan_() * scale.unsqueeze(1)  # tan(π (u - 1/2))
    out = torch.empty(shape, dtype=scale.dtype)
    rows = max(1, _CAUCHY_CHUNK // max(1, out[0].numel()))
    for b0 in range(0, shape[0], rows):
        b1 = min(shape[0], b0 + rows)
        part = out[b0:b1]
        torch.rand(part.shape, generator=generator, out=part)
        part.sub_(0.5).mul_(torch.pi).tan_().mul_(scale[b0:b1].unsqueeze(1))
    return out


_CAUCHY_CHUNK = 1 << 20  # values per slice


def _linear_images(layer: AffineLayer, g: Tensor) -> Tensor:
    b, k = g.shape[:2]
    x = g.reshape(b * k, *g.shape[2:])
    if _widening_cpu_conv(layer, x):
        x = _channels_last(x)
    out = layer.linear(x)
    return out.reshape(b, k, *out.shape[1:])


def _widening_cpu_conv(layer: AffineLayer, x: Tensor) -> bool:
    """A float32 CPU convolution whose output is at least 4x its input (e.g. the first layer).

    oneDNN computes in a blocked layout and, for NCHW tensors, reorders its input and output (and
    their gradients) into temporary copies; with channels-last tensors it needs none. Converting
    a small input is cheap and spares the copies of the large output (memory and time).
    """
    if not (isinstance(layer, torch.nn.Conv2d) and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype == torch.float32):
        return False
    _, c, h, w = x.shape
    sizes = [(n + 2 * p - d * (kk - 1) - 1) // s + 1 for n, p, d, kk, s in zip(
        (h, w), layer.padding, layer.dilation, layer.kernel_size, layer.stride)]
    return layer.out_channels * sizes[0] * sizes[1] >= 4 * c * h * w


def _channels_last(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) in channels-last order. With C = 1 both orders are the same memory, but
    only explicit channels-last strides make the convolution choose (and return) that layout."""
    _, c, h, w = x.shape
    if c == 1 and x.is_contiguous():
        return x.as_strided(x.shape, (h * w, 1, w, 1))
    return x.contiguous(memory_format=torch.channels_last)


def _median_abs(p: Tensor) -> Tensor:
    """min(lower median over dim 1 of |p|, 1e10) for p (B, k, *S): the value and gradient of
    ``p.abs().clamp_max(1e10).median(1).values``, whose gradient goes to the selected element."""
    if _needs_grad(p):
        return _MedianAbs.apply(p)
    return _median_abs_values(p)[0].clamp_max(_CLAMP)


class _MedianAbs(torch.autograd.Function):
    """The median with a cheap backward: d|p_sel|/dp = sign(p_sel) at the selected element.

    Ties between non-zero values (a measure-zero event for Cauchy draws) would give each tied
    element the gradient; torch.median picks one of them.
    """

    @staticmethod
    def forward(ctx, p: Tensor) -> Tensor:  # type: ignore[override]
        m, signs = _median_abs_values(p.detach(), want_signs=True)
        ctx.signs, ctx.unclamped = signs, m <= _CLAMP
        return m.clamp_max(_CLAMP)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = torch.where(ctx.unclamped, grad, torch.zeros((), dtype=grad.dtype,
                                                             device=grad.device))
        return torch.mul(ctx.signs, grad.unsqueeze(1))  # int8 × float: one full-size pass


_MEDIAN_BLOCK = 1024  # columns per block: the block (k × 1024 values) stays in the L2 cache


def _median_abs_values(p: Tensor, want_signs: bool = False) -> tuple[Tensor, Tensor | None]:
    """Lower median over dim 1 of |p| (B, k, *S), no gradient; with ``want_signs`` also the
    sign of p where |p| is the median, 0 elsewhere (int8, shaped as p)."""
    k = p.shape[1]
    mid = (k - 1) // 2
    if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64) or p.numel() == 0:
        a = p.abs()
        m = a.median(dim=1).values
        if not want_signs:
            return m, None
        return m, torch.where(a == m.unsqueeze(1), p.sign(), 0).to(torch.int8)
    # numpy's partition (a SIMD quickselect, values only) is several times faster than
    # torch.median on the CPU (NaNs: numpy sorts them last, torch.median returns them; finite
    # weights and inputs give no NaN). Walk the memory in its physical order: trailing dims
    # by stride.
    tail = sorted(range(2, p.dim()), key=lambda d: -p.stride(d))
    q = p.permute(0, 1, *tail)
    if not q.is_contiguous():
        q = q.contiguous()
    b, n = q.shape[0], q[0, 0].numel()
    a = q.numpy().reshape(b, k, n)
    med = np.empty((b, n), dtype=a.dtype)
    signs = np.empty((b, k, n), dtype=np.int8) if want_signs else None
    _partition_blocks(a, med, signs, mid)
    back = [0] + [1 + tail.index(d) for d in range(2, p.dim())]
    m = torch.from_numpy(med).view(b, *q.shape[2:]).permute(*back)
    if signs is None:
        return m, None
    return m, torch.from_numpy(signs).view(q.shape).permute(0, 1, *[i + 1 for i in back[1:]])


def _partition_blocks(a: np.ndarray, med: np.ndarray, signs: np.ndarray | None,
                      mid: int) -> None:
    """med[i, j] = the (mid+1)-th smallest of |a[i, :, j]|; signs as in _median_abs_values."""
    b, k, n = a.shape
    blocks = [(i, j) for i in range(b) for j in range(0, n, _MEDIAN_BLOCK)]

    def work(part: list[tuple[int, int]]) -> None:
        buf = np.empty((_MEDIAN_BLOCK, k), dtype=a.dtype)
        for i, j0 in part:
            j1 = min(n, j0 + _MEDIAN_BLOCK)
            block = a[i, :, j0:j1]
            w = buf[: j1 - j0]
            np.abs(block.T, out=w)  # (columns, k): one contiguous row per median
            w.partition(mid, axis=1)
            row = med[i, j0:j1]
            row[...] = w[:, mid]
            if signs is not None:
                sel = np.abs(block) == row
                np.multiply(np.sign(block), sel, out=signs[i, :, j0:j1], casting="unsafe")

    threads = min(_MEDIAN_THREADS or torch.get_num_threads(), len(blocks))
    if threads <= 1 or a.size < 1 << 20:
        work(blocks)
        return
    step = -(-len(blocks) // threads)
    list(_pool(threads).map(work, [blocks[s:s + step] for s in range(0, len(blocks), step)]))


_MEDIAN_THREADS: int | None = int(os.environ.get("PIPELINE_MEDIAN_THREADS", "0")) or None
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    key = (os.getpid(), threads)  # a forked child needs its own threads
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="median")
    return _POOLS[key]


def _cauchy(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    return torch.tan(torch.pi * (u - 0.5))


def input_box(x: Tensor, eps: float, clip: tuple[float, float] = (0.0, 1.0)
              ) -> tuple[Tensor, Tensor]:
    """The L∞ ball of radius ``eps`` around ``x`` intersected with the pixel range."""
    return (x - eps).clamp(*clip), (x + eps).clamp(*clip)
