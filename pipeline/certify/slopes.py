"""Optimised ReLU slopes for a batch of zonotopes (COLT's learn_slopes).

    out = optimise_slopes(prep, cfg, lower, upper, spec, todo, run, deadline, refined=known,
                          tau=tau)
    out.bounds, out.verified        # (B, D) the best float64 lower bounds proved, and which pass
    out.slopes, out.priority        # the best λ per ReLU block (for the MILP), |∂loss/∂λ|

Adam on λ ∈ [0, 1] (float32, DeepZ start, lr ``slope_lr``, StepLR(``slope_lr_step``, 0.1)) on the
worst-case margins of the open disjuncts, early exit when verified or on a plateau of
``slope_patience`` steps; a bound counts only when recomputed in float64 with the same λ (any
λ ∈ [0, 1] is sound). Stage 4 (and, after LP, 6) of :mod:`pipeline.certify.cascade`; nothing to
run on its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.certify.milp import ZonotopeRun
from pipeline.certify.prepared import PreparedNet
from pipeline.certify.spec import Spec
from pipeline.config import CertifyConfig

# The slope loop re-checks its ready inputs in float64 every this many steps (one host sync).
SLOPE_CHECK_EVERY = 5


@dataclass
class SlopeOutcome:
    """What :func:`optimise_slopes` proved for a batch."""

    bounds: Tensor  # (B, D) best float64 lower bounds proved
    verified: Tensor  # (B, D)
    slopes: dict[int, Tensor]  # float64, the best λ per image (for the MILP)
    priority: dict[int, Tensor]  # |∂loss/∂λ| of each input's last step
    iterations: int
    stepped: list[bool]  # per input: did it take a step (else its priority means nothing)


def optimise_slopes(prep: PreparedNet, cfg: CertifyConfig, lower: Tensor, upper: Tensor,
                    spec: Spec, todo: Tensor, run: ZonotopeRun, deadline: float | None,
                    refined: dict[int, tuple[Tensor, Tensor]] | None = None,
                    iterations: int | None = None,
                    init: dict[int, Tensor] | None = None,
                    tau: Tensor | None = None) -> SlopeOutcome:
    """COLT's learn_slopes for a batch: Adam on λ (float32) against the worst-case margins of
    the open disjuncts; candidates are re-checked in float64 (the only bounds that count)
    and verified above ``tau`` (B, D), the floating-point error bound of each margin.

    Every decision is per input, so an input's slopes do not depend on its batch: its
    plateau (``slope_patience``), its best λ, its priorities; an input that has stopped
    keeps its λ (masked Adam step). Decisions stay on the device; the host syncs once every
    ``SLOPE_CHECK_EVERY`` steps, when the inputs whose float32 bounds all pass are re-checked
    in float64."""
    tol = tau if tau is not None else \
        torch.full(todo.shape, math.inf, dtype=torch.float64, device=prep.device)
    bsz = lower.shape[0]
    dev = prep.device
    lo32, up32 = lower.float(), upper.float()
    refined = refined or {}
    refined32 = {r: (lo.float(), up.float()) for r, (lo, up) in refined.items()}
    start = init if init is not None else {r: lam for r, (lam, _) in run.relaxations.items()}
    params = {r: lam.detach().float().clone().requires_grad_(True)
              for r, lam in start.items()}
    opt = _Adam(list(params.values()), lr=cfg.slope_lr, step_size=cfg.slope_lr_step)
    pending = todo.clone()
    bounds = torch.full(pending.shape, -math.inf, dtype=torch.float64, device=dev)
    verified = torch.zeros_like(pending)
    best_score = torch.full((bsz,), -math.inf, device=dev)
    best = {r: p.detach().clone() for r, p in params.items()}
    priority = {r: torch.zeros_like(p) for r, p in params.items()}
    stepped = torch.zeros(bsz, dtype=torch.bool, device=dev)
    stopped = torch.zeros(bsz, dtype=torch.bool, device=dev)
    best_loss = torch.full((bsz,), math.inf, device=dev)
    best_at = torch.zeros(bsz, dtype=torch.int64, device=dev)

    def per_input(mask: Tensor, like: Tensor) -> Tensor:
        return mask.view(-1, *([1] * (like.dim() - 1)))

    def check(idx: Tensor, slopes: dict[int, Tensor]) -> None:
        with torch.no_grad():
            out = prep.zonotope(lower[idx], upper[idx],
                                slopes={r: s[idx].double() for r, s in slopes.items()},
                                refined={r: (lo[idx], up[idx])
                                         for r, (lo, up) in refined.items()})
            lb = spec.select(idx).lower(out.element)
        ok = torch.isfinite(lb)
        bounds[idx] = torch.where(ok, torch.maximum(bounds[idx], lb), bounds[idx])
        verified[idx] |= ok & (lb > tol[idx])
        pending[idx] &= ~verified[idx]

    it = 0
    for it in range(cfg.slope_iters if iterations is None else iterations):
        if deadline is not None and time.perf_counter() > deadline:
            break
        sync = it % SLOPE_CHECK_EVERY == 0
        if sync and not bool((pending.any(1) & ~stopped).any()):
            break
        active = pending.any(1) & ~stopped
        out = prep.zonotope(lo32, up32, prep.net32, slopes=params, refined=refined32)
        lb = spec.lower(out.element)  # (B, D) float32
        # A copy: check() below updates ``pending`` in place, autograd keeps this mask.
        open_ = pending.clone() & active.unsqueeze(1)
        neg = torch.where(open_, -lb, torch.full_like(lb, -math.inf))
        loss = torch.logsumexp(torch.cat([torch.zeros_like(lb[:, :1]), neg], 1), 1)
        with torch.no_grad():
            score = torch.where(pending, lb, torch.full_like(lb, math.inf)).min(1).values
            better = (score > best_score) & active
            for r, p in params.items():
                best[r] = torch.where(per_input(better, p), p.detach(), best[r])
            best_score = torch.where(better, score, best_score)
            ready = ((lb > tol) | ~pending).all(1) & active
        if sync:
            idx = ready.nonzero().reshape(-1)
            if len(idx):
                check(idx, {r: p.detach() for r, p in params.items()})
            active = active & pending.any(1)
        with torch.no_grad():
            total = loss.detach()
            # The first step always improves on "nothing yet" (inf - inf would be NaN).
            improved = active & (~torch.isfinite(best_loss) |
                                 (total < best_loss - 1e-3 * best_loss.abs()))
            best_loss = torch.where(improved, total, best_loss)
            best_at = torch.where(improved, torch.full_like(best_at, it), best_at)
            if cfg.slope_patience:
                plateau = active & ~improved & (it - best_at >= cfg.slope_patience)
                stopped |= plateau  # a plateau: the MILP takes over
                active = active & ~plateau
        grads = torch.autograd.grad(loss.sum(), list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g
                 for p, g in zip(params.values(), grads)]
        with torch.no_grad():
            for (r, p), g in zip(params.items(), grads):
                priority[r] = torch.where(per_input(active, p), g.abs(), priority[r])
            stepped |= active
        opt.step(grads, mask=active)  # then λ is clamped to [0, 1]
    left = pending.any(1)
    if bool(left.any()) and (deadline is None or time.perf_counter() < deadline):
        check(left.nonzero().reshape(-1), best)
    slopes = {r: p.detach().double() for r, p in best.items()}
    return SlopeOutcome(bounds.cpu(), verified.cpu(), slopes, priority, it + 1,
                        stepped.cpu().tolist())



class _Adam:
    """Adam with COLT's StepLR (×0.1 every ``step_size`` steps) and λ clamped to [0, 1] after each
    step. Written out because torch.optim's first use imports torch._dynamo (seconds)."""

    def __init__(self, params: list[Tensor], lr: float, step_size: int,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.step_size = params, lr, max(int(step_size), 1)
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: list[Tensor], mask: Tensor | None = None) -> None:
        """``mask`` (B,): only these rows (inputs) of each parameter move."""
        lr = self.lr * 0.1 ** (self.t // self.step_size)
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            new = (p - lr * (m / c1) / ((v / c2).sqrt() + self.eps)).clamp_(0, 1)
            if mask is not None:
                new = torch.where(mask.view(-1, *([1] * (p.dim() - 1))), new, p)
            p.copy_(new)

