"""Counterexamples: PGD in an input box, batched over inputs and restarts, and the exact check
that every counterexample the cascade reports passes.

    found, points = attack_batch(prep, lower, upper, spec, restarts=5, steps=50, step_size=0.02,
                                 seeds=[seed + i for i in indices])
    ok, points = check_points(prep, points, lower, upper, spec)

A point counts only when the model, run in its own precision (``prep.precision``) on a point of
that precision inside the box (:func:`round_into`), satisfies the property exactly
(:meth:`Spec.violated_exactly`, strict rows strictly). Used by :mod:`pipeline.certify.cascade`
(clean check, quick and full attack) and :mod:`pipeline.certify.lp_milp_stage` (a MILP's input
point); nothing to run on its own.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.certify.prepared import PreparedNet
from pipeline.certify.spec import Spec

# The attack confirms its float32 candidates in float64 every this many steps (one host sync).
ATTACK_CONFIRM_EVERY = 5


def attack_batch(prep: PreparedNet, lower: Tensor, upper: Tensor, spec: Spec, restarts: int,
                 steps: int, step_size: float, seed: int = 0, deadline: float | None = None,
                 seeds: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """PGD in the box, all restarts of all inputs in one batch, on the coefficients in
    [-1, 1] (step in their units). Half of the restarts of a robustness spec minimise the
    margin, half maximise the cross-entropy. Returns (found (B,), point (B, ...) float64):
    a point counts only when a float64 forward pass confirms the violation inside the box.

    ``seeds``: one per input, so that an input's random starts (and so its outcome) do not
    depend on the batch it is in; else one generator seeded by ``seed`` for the batch.
    Candidates (float32 violations, the latest per restart) are kept on the device and
    confirmed every ``ATTACK_CONFIRM_EVERY`` steps: one host sync per interval."""
    bsz = lower.shape[0]
    center64, radius64 = (upper + lower) / 2, (upper - lower) / 2
    c = center64.float().repeat_interleave(restarts, 0)
    r = radius64.float().repeat_interleave(restarts, 0)
    found = torch.zeros(bsz, dtype=torch.bool, device=prep.device)
    best = center64.clone()
    if seeds is not None:
        coeff = torch.cat([
            2 * torch.rand((restarts, *c.shape[1:]), device=prep.device,
                           generator=torch.Generator(device=prep.device).manual_seed(int(s)))
            - 1 for s in seeds])
    else:
        gen = torch.Generator(device=prep.device).manual_seed(int(seed))
        coeff = 2 * torch.rand(c.shape, generator=gen, device=prep.device) - 1
    use_ce = torch.zeros(bsz * restarts, dtype=torch.bool, device=prep.device)
    labels = None
    if spec.labels is not None:
        use_ce[1::2] = True
        labels = spec.labels.to(prep.device).repeat_interleave(restarts, 0)
    cand = torch.zeros(bsz * restarts, dtype=torch.bool, device=prep.device)
    cand_coeff = torch.zeros_like(coeff)
    view = (-1,) + (1,) * (coeff.dim() - 1)
    for step in range(steps + 1):
        with torch.enable_grad():
            coeff.requires_grad_(True)
            logits = prep.net32(c + r * coeff)
            margin = spec.margins(logits).min(1).values
            objective = margin
            if labels is not None:
                ce = F.cross_entropy(logits, labels, reduction="none")
                objective = torch.where(use_ce, -ce, margin)
            grad = None
            if step < steps:
                (grad,) = torch.autograd.grad(objective.sum(), coeff)
        with torch.no_grad():
            hit = spec.violated(logits.detach()) | (margin <= 0)
            cand_coeff = torch.where(hit.view(view), coeff.detach(), cand_coeff)
            cand |= hit
            late = deadline is not None and time.perf_counter() > deadline
            if grad is None or late or step % ATTACK_CONFIRM_EVERY == ATTACK_CONFIRM_EVERY - 1:
                cand &= ~found.repeat_interleave(restarts, 0)
                if bool(cand.any()):
                    _confirm(prep, cand, cand_coeff, center64, radius64, lower, upper, spec,
                             restarts, found, best)
                cand.zero_()
                if bool(found.all()):
                    break
            if grad is None or late:
                break
            coeff = (coeff.detach() - step_size * grad.sign()).clamp(-1, 1)
    return found, best


def _confirm(prep: PreparedNet, cand: Tensor, coeff: Tensor, center64: Tensor, radius64: Tensor,
             lower: Tensor, upper: Tensor, spec: Spec, restarts: int, found: Tensor,
             best: Tensor) -> None:
    idx = cand.nonzero().reshape(-1)
    owner = idx // restarts
    point = (center64[owner] + radius64[owner] * coeff.detach()[idx].double())
    point = torch.maximum(torch.minimum(point, upper[owner]), lower[owner])
    sub = spec.select(owner) if spec.A.dim() == 3 else spec
    ok, point = check_points(prep, point, lower[owner], upper[owner], sub)
    for j in ok.nonzero().reshape(-1).tolist():
        b = int(owner[j])
        if not found[b]:
            found[b] = True
            best[b] = point[j]


def check_points(prep: PreparedNet, point: Tensor, lower: Tensor, upper: Tensor, spec: Spec
                 ) -> tuple[Tensor, Tensor]:
    """(ok (N,), points (N, ...) float64): each point rounded into its box in the model's
    precision, run by the model in that precision, and ok where the outputs satisfy the
    property exactly (:meth:`Spec.violated_exactly`, strict rows strictly)."""
    with torch.no_grad():
        x = round_into(point, lower, upper, prep.precision)
        y = prep.net_run(x).double()
    ok = torch.zeros(len(x), dtype=torch.bool)
    inside = ((x.double() >= lower) & (x.double() <= upper)).flatten(1).all(1)
    cand = (spec.violated(y) & torch.isfinite(y).all(1) & inside).cpu()
    for j in cand.nonzero().reshape(-1).tolist():
        ok[j] = spec.violated_exactly(y[j].tolist(), j if spec.A.dim() == 3 else 0)
    return ok.to(point.device), x.double()


def confirmed_point(prep: PreparedNet, point: np.ndarray, lower: Tensor, upper: Tensor,
                    spec: Spec) -> list[float] | None:
    """``point`` (a solver's input values) clipped into the box, if the network's forward
    pass in its own precision violates the property there exactly; else None."""
    x = torch.as_tensor(point, dtype=torch.float64, device=lower.device).reshape(lower.shape)
    x = torch.maximum(torch.minimum(x, upper), lower)
    ok, x = check_points(prep, x, lower, upper, spec)
    if bool(ok.all()):
        return x.reshape(-1).tolist()
    return None


def round_into(x: Tensor, lower: Tensor, upper: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` (nearest) inside [lower, upper]: the box edges rounded inwards to that
    precision (a box without a point of it keeps the rounded edge, which then fails the box)."""
    xr = x.to(dtype)
    lo, up = lower.to(dtype), upper.to(dtype)
    lo = torch.where(lo.double() < lower, torch.nextafter(lo, torch.full_like(lo, math.inf)), lo)
    up = torch.where(up.double() > upper, torch.nextafter(up, torch.full_like(up, -math.inf)),
                     up)
    return torch.maximum(torch.minimum(xr, up), lo)

