"""A network prepared once for certification: what every stage of the cascade
(:mod:`pipeline.certify.cascade`) reads, built once and reused for every input.

    prep = PreparedNet(net, device="cpu")
    prep.net32, prep.net64          # frozen copies (no gradients) for the fast and exact passes
    prep.precision, prep.net_run    # the precision the model runs in, and the copy in it
    run = prep.zonotope(lower, upper)   # DeepZ in float64 with the generator compression
    tau = prep.threshold(lower, upper, run, spec)   # what each lower bound must exceed

Nothing to run on its own; :class:`pipeline.certify.cascade.Certifier` is one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from pipeline.certify import fp_error
from pipeline.certify.milp import GeneratorCompression, MilpEncoder, ZonotopeRun, run_zonotope
from pipeline.certify.spec import Spec
from pipeline.nets import Net


class PreparedNet:
    """float32 and float64 copies of ``net`` on ``device``, the generator compression (on the
    device) and the MILP matrices (on the CPU)."""

    def __init__(self, net: Net, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net32 = _frozen_copy(net, torch.float32, self.device)
        self.net64 = _frozen_copy(net, torch.float64, self.device)
        # The precision the model runs in: counterexamples are checked, and the margins' error
        # bounds derived, in it (float64 only for a model that declares it, e.g. DOUBLE ONNX).
        self.precision = fp_error.model_precision(net)
        self.net_run = self.net32 if self.precision == torch.float32 else self.net64
        self.input_shape = tuple(net.input_shape)
        self.finite = all(bool(torch.isfinite(t).all()) for t in net.state_dict().values()
                          if t.is_floating_point())
        self.relu_indices = self.net64.relu_indices
        with torch.no_grad():
            out = self.net64(torch.zeros(1, *self.input_shape, dtype=torch.float64,
                                         device=self.device))
        self.n_outputs = out.shape[1]
        # The colouring and the MILP matrices are built on the CPU (numpy / scipy).
        cpu64 = self.net64 if self.device.type == "cpu" else \
            _frozen_copy(net, torch.float64, torch.device("cpu"))
        self.compression = GeneratorCompression.for_net(cpu64) if self.finite else None
        if self.compression is not None:
            self.compression = _to_device(self.compression, self.device)
        self.encoder = MilpEncoder(cpu64)

    def zonotope(self, lower: Tensor, upper: Tensor, net: Net | None = None,
                 **options: Any) -> ZonotopeRun:
        """:func:`run_zonotope` of ``net`` (default the float64 copy) with the compression."""
        return run_zonotope(self.net64 if net is None else net, lower, upper,
                            compression=self.compression, **options)

    def threshold(self, lower: Tensor, upper: Tensor, run: ZonotopeRun, spec: Spec) -> Tensor:
        """(B, D) what each disjunct's float64 lower bound must exceed: the bound on the
        floating-point error of the model's run and of the bound computation
        (:mod:`pipeline.certify.fp_error`), from this region's reachable magnitudes."""
        err = fp_error.output_error(self.net64, lower, upper, run.pre_bounds, self.precision)
        return fp_error.margin_threshold(err, spec.A, spec.b, spec.owner, spec.n_disjuncts)

    def tighter(self, lower: Tensor, upper: Tensor, slopes: dict[int, Tensor] | None,
                known: dict[int, tuple[Tensor, Tensor]]) -> dict[int, tuple[Tensor, Tensor]]:
        """The known ReLU bounds intersected with those of the zonotope with ``slopes``."""
        with torch.no_grad():
            run = self.zonotope(lower, upper, slopes=slopes, refined=known)
        return {r: (lo.detach(), up.detach()) for r, (lo, up) in run.pre_bounds.items()}


def _frozen_copy(net: Net, dtype: torch.dtype, device: torch.device) -> Net:
    out = copy.deepcopy(net).to(device=device, dtype=dtype).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _to_device(comp: GeneratorCompression, device: torch.device) -> GeneratorCompression:
    if device.type == "cpu":
        return comp
    out = copy.copy(comp)
    out.colors = comp.colors.to(device)
    out.masks = {k: v.to(device) for k, v in comp.masks.items()}
    if comp.fuse_weight is not None:
        out.fuse_weight = comp.fuse_weight.to(device)
        out.fuse_map = comp.fuse_map.to(device)
    return out
