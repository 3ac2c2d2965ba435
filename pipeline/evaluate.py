"""Accuracy of a network on a data loader: natural, under input PGD, and zonotope-certified.

These are the cheap measures used during training and to score tuning trials; the full
certification cascade (slopes, LP, MILP) lives in :mod:`pipeline.certify`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from pipeline.attacks import pgd_attack
from pipeline.domains.zonotope import Zonotope
from pipeline.nets import Net

NAT_ACC, PGD_ACC, CERT_ACC = "nat_acc", "pgd_acc", "cert_acc"


def zonotope_certified(net: Net, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """(B,) bool: DeepZ proves every margin positive, computed in float64: each margin's lower
    bound must exceed the bound on the floating-point error of that input's computation (the
    network's run in its own precision and the float64 bound itself, pipeline.certify.fp_error);
    a tie is never certified; non-finite inputs, weights or bounds are never certified."""
    from pipeline.certify import fp_error
    from pipeline.domains.zonotope import input_box

    net64 = _float64(net)
    x64 = x.to(torch.float64)
    lower, upper = input_box(x64, eps)
    with torch.no_grad():
        prop = net64.propagate(Zonotope.from_bounds(lower, upper))
        out = prop.element
        margin = out.margin_lower(y)
        err = fp_error.output_error(net64, lower, upper, prop.pre_bounds,
                                    fp_error.model_precision(net))
        tau = fp_error.robustness_threshold(err, y)
    margin.scatter_(1, y.view(-1, 1), float("inf"))
    finite = torch.isfinite(out.center).flatten(1).all(1) & torch.isfinite(x64).flatten(1).all(1)
    return (margin > tau).all(1) & finite


def _float64(net: Net) -> Net:
    import copy

    return copy.deepcopy(net).to(torch.float64)


def evaluate(net: Net, batches: Iterable[tuple[Tensor, Tensor]], eps: float, attack_steps: int,
             attack_step_size: float, attack_restarts: int = 1, certify: bool = True,
             max_inputs: int | None = None, device: torch.device | str = "cpu"
             ) -> dict[str, float]:
    """Natural, PGD and (optionally) DeepZ-certified accuracy over at most ``max_inputs``."""
    totals = {NAT_ACC: 0, PGD_ACC: 0, CERT_ACC: 0}
    seen = 0
    net.eval()
    for x, y in batches:
        if max_inputs is not None and seen >= max_inputs:
            break
        if max_inputs is not None:
            x, y = x[: max_inputs - seen], y[: max_inputs - seen]
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            correct = net(x).argmax(1) == y
        robust = correct & ~pgd_attack(net, x, y, eps, attack_steps, attack_step_size,
                                       attack_restarts).found
        totals[NAT_ACC] += int(correct.sum())
        totals[PGD_ACC] += int(robust.sum())
        if certify:
            totals[CERT_ACC] += int((robust & zonotope_certified(net, x, y, eps).to(device)).sum())
        seen += len(y)
    result = {k: v / max(seen, 1) for k, v in totals.items()}
    if not certify:
        result.pop(CERT_ACC)
    result["n_inputs"] = seen
    return result
