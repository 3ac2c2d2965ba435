"""A network prepared once for certification: what every stage of the cascade
(:mod:`pipeline.certify.cascade`) reads, built once and reused for every input.

    prep = PreparedNet(net, device="cpu")
    prep.net32, prep.net64          # frozen copies (no gradients) for the fast and exact passes
    prep.precision, prep.net_run    # the precision the model runs in, and the copy in it
    run = prep.zonotope(lower, upper)   # DeepZ in float64 with the generator compression
    run, rounding = prep.deepz(lower, upper)   # in float32 too (zonotope_dtype), rounding bounded
    tau = prep.threshold(lower, upper, run, spec)   # what each lower bound must exceed

Nothing to run on its own; :class:`pipeline.certify.cascade.Certifier` is one.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import Tensor

from pipeline.certify import fp_error
from pipeline.certify.milp import GeneratorCompression, MilpEncoder, ZonotopeRun, run_zonotope
from pipeline.certify.spec import Spec
from pipeline.nets import Net

log = logging.getLogger(__name__)


class PreparedNet:
    """float32 and float64 copies of ``net`` on ``device``, the generator compression (on the
    device) and the MILP matrices (on the CPU)."""

    def __init__(self, net: Net, device: str | torch.device = "cpu",
                 zonotope_dtype: str = "float64") -> None:
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
        # float32 DeepZ only where the float32 copy is the model itself and the convolutions are
        # the CPU's (summation-order rounding only: no TF32, Winograd or FFT).
        want32 = zonotope_dtype == "float32"
        self.zonotope_dtype = torch.float32 if want32 and self.precision == torch.float32 \
            and self.device.type == "cpu" else torch.float64
        if want32 and self.zonotope_dtype == torch.float64:
            log.info("zonotope_dtype float32 applies to float32 models on the CPU only: "
                     "DeepZ runs in float64 here")

    def zonotope(self, lower: Tensor, upper: Tensor, net: Net | None = None,
                 **options: Any) -> ZonotopeRun:
        """:func:`run_zonotope` of ``net`` (default the float64 copy) with the compression."""
        return run_zonotope(self.net64 if net is None else net, lower, upper,
                            compression=self.compression, **options)

    def deepz(self, lower: Tensor, upper: Tensor
              ) -> tuple[ZonotopeRun, "fp_error.ZonotopeRounding | None"]:
        """The first zonotope in ``self.zonotope_dtype``, returned in float64 (exact casts), and
        for float32 the bound on its rounding. In float32 the box is rounded outwards first, so
        that it contains the float64 one, and the ReLU bounds every later stage intersects with
        are widened by that bound into valid ones."""
        if self.zonotope_dtype == torch.float64:
            return self.zonotope(lower, upper), None
        lo32, up32 = _outward(lower, upper, self.zonotope_dtype)
        rounding = fp_error.ZonotopeRounding(lo32, up32, self.zonotope_dtype)
        run = self.zonotope(lo32, up32, self.net32, rounding=rounding)
        pair = lambda p: tuple(t.double() for t in p)  # noqa: E731
        return ZonotopeRun(run.element.to(torch.float64), rounding.widened(run.pre_bounds),
                           {q: pair(v) for q, v in run.relaxations.items()}), rounding

    def threshold(self, lower: Tensor, upper: Tensor, run: ZonotopeRun, spec: Spec,
                  rounding: "fp_error.ZonotopeRounding | None" = None) -> Tensor:
        """(B, D) what each disjunct's float64 lower bound must exceed: the bound on the
        floating-point error of the model's run and of the bound computations (with
        ``rounding``, that of a float32 first zonotope too; :mod:`pipeline.certify.fp_error`),
        from this region's reachable magnitudes."""
        err = fp_error.output_error(self.net64, lower, upper, run.pre_bounds, self.precision)
        if rounding is not None:
            err = rounding.add_to(err)
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


def _outward(lower: Tensor, upper: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[lower, upper] in ``dtype``, rounded outwards: a box that contains the given one."""
    lo, up = lower.to(dtype), upper.to(dtype)
    inf = torch.tensor(math.inf, dtype=dtype, device=lo.device)
    lo = torch.where(lo.double() > lower, torch.nextafter(lo, -inf), lo)
    up = torch.where(up.double() < upper, torch.nextafter(up, inf), up)
    return lo, up


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
