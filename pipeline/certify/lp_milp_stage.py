"""The complete stages for one input the batched ones left open: LP tightening of the ReLU
bounds the MILP takes from the zonotope, and one MILP per open disjunct.

    known = lp_refine(prep, cfg, lower, upper, slopes, known, priority, deadline)
    for start in milp_starts(prep, cfg):
        outcome, cex = run_milps(prep, cfg, lower, upper, spec, start, todo, best, slopes, known,
                                 priority, deadline, record, tau)

Stages 6 and 7 of :mod:`pipeline.certify.cascade` (``Certifier.finish`` runs them, within the
input's budget); the encoding itself is :mod:`pipeline.certify.milp`. Nothing to run on its own.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.certify.counterexamples import confirmed_point
from pipeline.certify.milp import ZonotopeRun, lp_tighten, solve_disjunct
from pipeline.certify.prepared import PreparedNet
from pipeline.certify.spec import Spec
from pipeline.config import CertifyConfig

log = logging.getLogger(__name__)


def lp_refine(prep: PreparedNet, cfg: CertifyConfig, lower: Tensor, upper: Tensor,
              slopes: dict[int, Tensor] | None, known: dict[int, tuple[Tensor, Tensor]],
              priority: dict[int, Tensor] | None, deadline: float
              ) -> dict[int, tuple[Tensor, Tensor]]:
    """LP-tighten the ReLU bounds of :func:`lp_layers`, at most ``lp_refine_max_neurons``
    neurons in all (highest priority first); returns ``known`` with them."""
    known = dict(known)
    budget = cfg.lp_refine_max_neurons
    for r in lp_layers(prep, cfg):
        if budget <= 0 or time.perf_counter() > deadline:
            break
        with torch.no_grad():
            run = prep.zonotope(lower, upper, end=r - 1, slopes=slopes, refined=known,
                                all_bounds=True)
            run = _with_pre(run, r, known)
        order = None
        if priority is not None and r in priority:
            order = np.argsort(-priority[r][0].reshape(-1).cpu().numpy(), kind="stable")
        tr = lp_tighten(prep.encoder, lower, upper, run, r, max_neurons=budget, order=order,
                        solver=cfg.solver, time_limit_s=max(deadline - time.perf_counter(), 0),
                        deadline=deadline, threads=cfg.solver_threads)
        budget -= tr.attempted
        lo0, up0 = (t.reshape(-1).cpu().numpy() for t in run.pre_bounds[r])
        # LP optima hold up to the solver's tolerances: loosen the LP values a little.
        lo = np.where(tr.lower > lo0, tr.lower - 1e-6 * np.maximum(1.0, np.abs(tr.lower)),
                      lo0)
        up = np.where(tr.upper < up0, tr.upper + 1e-6 * np.maximum(1.0, np.abs(tr.upper)),
                      up0)
        shape = run.pre_bounds[r][0].shape
        known[r] = (torch.as_tensor(np.maximum(lo, lo0), device=prep.device).view(shape),
                    torch.as_tensor(np.minimum(up, up0), device=prep.device).view(shape))
        log.debug("LP at ReLU %d: %d LPs, %d neurons stabilised in %.2fs", r, tr.solved,
                  tr.stabilised, tr.runtime_s)
    return known


def milp_starts(prep: PreparedNet, cfg: CertifyConfig) -> list[int]:
    """Where the MILPs start: the input box with ``milp_from_input``; the given block with
    ``milp_layer`` >= 0; else the input of the last ReLU, then of the one before it."""
    end = len(prep.net64.blocks) - 1
    if cfg.milp_from_input or not prep.relu_indices:
        return [-1]
    if cfg.milp_layer >= 0:
        return [prep.encoder.effective_start(min(cfg.milp_layer, end), end)]
    starts = [prep.encoder.effective_start(r - 1, end) for r in prep.relu_indices[-2:][::-1]]
    return list(dict.fromkeys(starts))


def lp_layers(prep: PreparedNet, cfg: CertifyConfig) -> list[int]:
    """ReLU layers worth LP tightening: not the first (its bounds are exact already) and only
    those the first MILP takes from the zonotope (its own ReLUs get binaries or the
    triangle with their zonotope bounds)."""
    limit = milp_starts(prep, cfg)[0] if cfg.milp else len(prep.net64.blocks)
    return [r for r in prep.relu_indices[1:] if r <= max(limit, 0)] if limit >= 0 else []


def run_milps(prep: PreparedNet, cfg: CertifyConfig, lower: Tensor, upper: Tensor, spec: Spec,
              start: int, todo: Tensor, best: Tensor, slopes: dict[int, Tensor] | None,
              refined: dict[int, tuple[Tensor, Tensor]], priority: dict[int, Tensor] | None,
              deadline: float, record: Any, tau: Tensor) -> tuple[str, list[float] | None]:
    """Per open disjunct, hardest first; stops at the first one that fails (COLT's
    fail_break). Returns ("certified" | "failed" | "timeout", None) or ("falsified", the
    counterexample): an encoding from the input box yields input points, and a negative one
    that a plain forward pass confirms is a counterexample."""
    with torch.no_grad():
        run = prep.zonotope(lower, upper, slopes=slopes, refined=refined,
                            keep=(start,) if start >= 0 else (), all_bounds=True)
    if record(spec.lower(run.element)[0], "milp"):
        return "certified", None
    prio = None
    if priority:
        prio = {r: p[0].reshape(-1).cpu().numpy() for r, p in priority.items()}
    enc = None
    for k in sorted(todo.nonzero().reshape(-1).tolist(), key=lambda k: float(best[k])):
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return "timeout", None
        a, b = spec.disjunct(k)
        if enc is None or len(a) > 1:  # a multi-row objective adds rows: a fresh encoding
            enc = prep.encoder.encode(lower, upper, run, start=start, priorities=prio,
                                      max_binary_per_layer=cfg.max_binary_per_layer,
                                      max_binary_total=cfg.max_binary_total)
        # A solver's bound holds up to its tolerances: it must clear the error bound by
        # margin_tolerance more.
        out = solve_disjunct(enc, a, b, solver=cfg.solver, time_limit_s=remaining,
                             tolerance=float(tau[k]) + cfg.margin_tolerance,
                             threads=cfg.solver_threads)
        log.debug("MILP from block %d, disjunct %d: %s bound %.4g (%d/%d binary) in %.2fs",
                  start, k, out.status, out.bound, enc.num_binary, enc.num_unstable,
                  out.runtime_s)
        if math.isfinite(out.bound) and out.status != "error":
            bound = torch.full((spec.n_disjuncts,), -math.inf, dtype=torch.float64)
            # A proved bound (any status but infeasible/error) is kept for the report;
            # only a verified one closes the disjunct (record's tolerance test).
            bound[k] = out.bound if out.verified else min(out.bound, float(tau[k]))
            record(bound, "milp")
        if out.input_point is not None and out.value is not None and out.value < 0:
            cex = confirmed_point(prep, out.input_point, lower, upper, spec)
            if cex is not None:
                return "falsified", cex
        if not out.verified:
            return ("timeout" if out.status == "time_limit" else "failed"), None
    return ("certified" if not bool(todo.any()) else "failed"), None


def _with_pre(run: ZonotopeRun, relu: int, refined: dict[int, tuple[Tensor, Tensor]]
              ) -> ZonotopeRun:
    """Add the pre-activation bounds of ReLU ``relu`` (the output bounds of block relu-1, which
    ``run_zonotope(end=relu-1)`` has) intersected with refined ones."""
    lo, up = run.block_bounds[relu - 1]
    if relu in refined:
        lo, up = torch.maximum(lo, refined[relu][0]), torch.minimum(up, refined[relu][1])
    run.pre_bounds[relu] = (lo, up)
    return run
