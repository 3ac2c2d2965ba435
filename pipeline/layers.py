"""The layer types of COLT's networks, each with its concrete, abstract and MILP rules together.

Every block is a ``torch.nn.Module`` with:

* ``forward(x)``: the concrete layer;
* ``abstract(element, slope=None, bounds=None)``: the image of an abstract element (Box,
  Zonotope, ProjectedZonotope) -> ``(element, pre_activation_bounds, relaxation)``, the last two
  ``None`` for affine blocks;
* ``milp(problem, columns, lower, upper, ...)``: the layer encoded into a
  :class:`pipeline.certify.solvers.MilpProblem`, returning the output columns.

Affine blocks (Normalize, Conv2d, Linear, Flatten) share one implementation of the last two through
``linear`` (the map without bias), ``abs_linear`` (its absolute value) and ``matrix`` (a sparse
matrix of the map, for MILP/LP encodings). New layer types are added here and in ``LAYER_TYPES``.

Every block also has ``fp_error(err, mag, u, extra=0)``: a bound on |fl(y) - y| of its output when
it runs in a precision of unit roundoff ``u`` on an input that is already off by at most ``err``
from the exact one whose magnitude is at most ``mag`` (elementwise, batched like the input).
:mod:`pipeline.certify.fp_error` chains these rules through a network.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gamma(n: int | float, u: float) -> float:
    """Higham's γ_n = n u / (1 - n u): |fl(Σ_i^n a_i b_i) - Σ a_i b_i| <= γ_n Σ |a_i b_i| for any
    summation order (fused multiply-adds included)."""
    if n * u >= 0.5:
        return math.inf
    return n * u / (1 - n * u)


class AffineBlock(nn.Module):
    """Base of the affine blocks: y = linear(x) + bias."""

    is_relu = False
    # Roundings per output beyond the fan-in's products and sums: the bias add, and an ONNX
    # Gemm's alpha/beta scaling or a separate Add that the importer folded into the weights.
    FP_EXTRA_OPS = 3

    def fan_in(self) -> int:
        """Products summed per output coordinate (an upper bound)."""
        raise NotImplementedError

    def abs_bias(self, like: Tensor) -> Tensor:
        bias = getattr(self, "bias", None)
        if bias is None:
            return torch.zeros((), dtype=like.dtype, device=like.device)
        b = bias.detach().abs().to(like.dtype)
        return b.view(-1, 1, 1) if like.dim() == 4 else b

    def count_linear(self, mask: Tensor) -> Tensor:
        """Per output, how many of its products have a non-zero weight and an input in
        ``mask`` (the default: every product, the fan-in)."""
        return torch.full_like(self.linear(mask), float(self.fan_in()))

    def fp_error(self, err: Tensor, mag: Tensor, u: float, extra: int = 0,
                 upper: Tensor | None = None) -> Tensor:
        """|W| err + γ_{n+k} (|W| (mag + err) + |b|) + n η: the input's error carried through the
        exact map, plus the rounding of this output's n non-zero products (a product with an
        exact zero, e.g. a dead ReLU's output or a zero weight, is exact, and adding it is too)
        and k further operations, on the computed input (magnitude at most mag + err); η bounds
        an underflow's absolute error per operation."""
        nonzero = ((mag + err) > 0).to(err.dtype)
        n = self.count_linear(nonzero) + self.FP_EXTRA_OPS + extra
        g = n * u / (1 - n * u).clamp_min(0.5)
        g = torch.where(n * u < 0.5, g, torch.full_like(g, math.inf))
        out = self.abs_linear(err) + g * (self.abs_linear(mag + err) + self.abs_bias(err))
        return out + n * underflow(u)

    def abstract(self, element: Any, slope: Tensor | None = None,
                 bounds: tuple[Tensor, Tensor] | None = None) -> tuple[Any, None, None]:
        return element.affine(self), None, None

    def matrix(self, in_shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
               chunk: int = 2048) -> tuple[sp.csr_matrix, np.ndarray]:
        """(W, b) with y = W x + b over the flattened (C,H,W) input and output, float64."""
        n = int(np.prod(in_shape))
        cols = []
        with torch.no_grad():
            module = _retyped(self, dtype)
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                eye = torch.zeros(stop - start, n, dtype=dtype)
                eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                out = module.linear(eye.reshape(-1, *in_shape)).reshape(stop - start, -1)
                cols.append(sp.csr_matrix(out.cpu().numpy()))
            bias = module(torch.zeros(1, *in_shape, dtype=dtype)).reshape(-1).cpu().numpy()
        return sp.vstack(cols).T.tocsr(), bias.astype(np.float64)

    def milp(self, problem: Any, columns: np.ndarray, lower: np.ndarray, upper: np.ndarray,
             in_shape: tuple[int, ...], out_lower: np.ndarray, out_upper: np.ndarray,
             **_: Any) -> np.ndarray:
        """y = W x + b as equality rows; y boxed by the given output bounds."""
        weight, bias = self.matrix(in_shape)
        out = problem.add_variables(out_lower, out_upper)
        rows = sp.hstack([sp.identity(len(out), format="csr"), -weight]).tocsr()
        problem.add_rows(rows, np.concatenate([out, columns]), bias, bias)
        return out


def underflow(u: float) -> float:
    """Twice the smallest normal number of the precision with unit roundoff ``u``."""
    return 2.0 ** -125 if u > 2.0 ** -30 else 2.0 ** -1021


def _retyped(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` in ``dtype`` (parameters and buffers), leaving the original alone."""
    import copy

    return copy.deepcopy(module).to(dtype)


class Normalize(AffineBlock):
    """(x - mean) / std per channel; COLT's first block, so ε lives in [0,1] pixel space."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...],
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=dtype).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=dtype).view(-1, 1, 1))

    def fp_error(self, err: Tensor, mag: Tensor, u: float, extra: int = 0,
                 upper: Tensor | None = None) -> Tensor:
        """(x - mean) / std: a subtraction and a division (or a multiplication by 1/std, as an
        ONNX graph may hold it: one more rounding), each exact up to a factor (1 + u)."""
        g = gamma(3 + extra, u)
        mean, std = self._shaped(self.mean, err).abs(), self._shaped(self.std, err).abs()
        return err / std + g * (mag + err + mean) / std + 3 * underflow(u)

    def abs_bias(self, like: Tensor) -> Tensor:
        return (self._shaped(self.mean, like) / self._shaped(self.std, like)).abs()

    def _shaped(self, t: Tensor, x: Tensor) -> Tensor:
        return t.to(x.dtype) if x.dim() == 4 else t.to(x.dtype).view(-1)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self._shaped(self.mean, x)) / self._shaped(self.std, x)

    def linear(self, x: Tensor) -> Tensor:
        return x / self._shaped(self.std, x)

    abs_linear = linear

    def matrix(self, in_shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
               chunk: int = 2048) -> tuple[sp.csr_matrix, np.ndarray]:
        c = in_shape[0]
        per = int(np.prod(in_shape[1:]))
        std = np.repeat(self.std.double().cpu().numpy().reshape(c), per)
        mean = np.repeat(self.mean.double().cpu().numpy().reshape(c), per)
        return sp.diags(1.0 / std).tocsr(), -mean / std


class Conv2d(nn.Conv2d, AffineBlock):
    def fan_in(self) -> int:
        return int(self.in_channels // self.groups * np.prod(self.kernel_size))

    def count_linear(self, mask: Tensor) -> Tensor:
        nz = (self.weight != 0).to(mask.dtype)
        return F.conv2d(mask, nz, None, self.stride, self.padding)

    def linear(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)

    def abs_linear(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.abs().to(x.dtype), None, self.stride, self.padding)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), bias, self.stride, self.padding)


class Linear(nn.Linear, AffineBlock):
    def fan_in(self) -> int:
        return int(self.in_features)

    def count_linear(self, mask: Tensor) -> Tensor:
        return F.linear(mask, (self.weight != 0).to(mask.dtype))

    def linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def abs_linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.abs().to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def matrix(self, in_shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
               chunk: int = 2048) -> tuple[sp.csr_matrix, np.ndarray]:
        w = self.weight.detach().double().cpu().numpy()
        b = np.zeros(w.shape[0]) if self.bias is None else self.bias.detach().double().cpu().numpy()
        return sp.csr_matrix(w), b


class Flatten(AffineBlock):
    """(B, C, H, W) -> (B, C*H*W) in PyTorch's C,H,W order (as COLT and its ONNX files)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    linear = forward
    abs_linear = forward

    def fp_error(self, err: Tensor, mag: Tensor, u: float, extra: int = 0,
                 upper: Tensor | None = None) -> Tensor:
        return self.forward(err)  # a reshape: exact

    def milp(self, problem: Any, columns: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        return columns  # a reshape: the same variables


class ReLU(nn.Module):
    """max(0, x); abstractly the DeepZ transformer with an optional per-neuron slope λ ∈ [0, 1]."""

    is_relu = True

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)

    def fp_error(self, err: Tensor, mag: Tensor, u: float, extra: int = 0,
                 upper: Tensor | None = None) -> Tensor:
        """Exact in floating point and 1-Lipschitz: |relu(a) - relu(b)| <= min(|a - b|,
        max(relu(a), relu(b))), so the input's error, and none where the input (computed or
        exact, below ``upper`` + err) cannot be positive."""
        if upper is None:
            return err
        return torch.minimum(err, (upper + err).clamp_min(0))

    def abstract(self, element: Any, slope: Tensor | None = None,
                 bounds: tuple[Tensor, Tensor] | None = None) -> tuple[Any, Any, Any]:
        return element.relu(slope, bounds)

    def milp(self, problem: Any, columns: np.ndarray, lower: np.ndarray, upper: np.ndarray,
             in_shape: tuple[int, ...], out_lower: np.ndarray, out_upper: np.ndarray,
             binary: np.ndarray | None = None, priority: np.ndarray | None = None,
             **_: Any) -> np.ndarray:
        """Exact (binary) encoding where ``binary`` is set, the triangle relaxation elsewhere.

        Stable neurons need no constraint: active ones reuse the input variable, inactive ones
        become a variable fixed to 0.
        """
        lower, upper = np.asarray(lower, float), np.asarray(upper, float)
        n = len(columns)
        binary = np.zeros(n, bool) if binary is None else np.asarray(binary, bool)
        active, inactive = lower >= 0, upper <= 0
        crossing = ~active & ~inactive
        out = np.array(columns, dtype=np.int64)
        dead = np.flatnonzero(inactive)
        if len(dead):
            out[dead] = problem.add_variables(np.zeros(len(dead)), np.zeros(len(dead)))
        idx = np.flatnonzero(crossing)
        if not len(idx):
            return out
        lo, up = lower[idx], upper[idx]
        y = problem.add_variables(np.zeros(len(idx)), up)
        out[idx] = y
        x = columns[idx]
        m = len(idx)
        eye = sp.identity(m, format="csr")
        # y >= x
        problem.add_rows(sp.hstack([eye, -eye]).tocsr(), np.concatenate([y, x]),
                         np.zeros(m), np.full(m, np.inf))
        exact = binary[idx]
        tri = np.flatnonzero(~exact)
        if len(tri):
            # Triangle: (u - l) y <= u (x - l)  <=>  (u - l) y - u x <= -u l
            k = len(tri)
            a = sp.hstack([sp.diags(up[tri] - lo[tri]), sp.diags(-up[tri])]).tocsr()
            problem.add_rows(a, np.concatenate([y[tri], x[tri]]), np.full(k, -np.inf),
                             -up[tri] * lo[tri])
        ex = np.flatnonzero(exact)
        if len(ex):
            k = len(ex)
            prio = None if priority is None else np.asarray(priority)[idx][ex]
            delta = problem.add_variables(np.zeros(k), np.ones(k), integer=True, priority=prio)
            # y <= u δ  and  y <= x - l (1 - δ)  <=>  y - x - l δ <= -l
            a1 = sp.hstack([sp.identity(k), sp.diags(-up[ex])]).tocsr()
            problem.add_rows(a1, np.concatenate([y[ex], delta]), np.full(k, -np.inf), np.zeros(k))
            a2 = sp.hstack([sp.identity(k), -sp.identity(k), sp.diags(-lo[ex])]).tocsr()
            problem.add_rows(a2, np.concatenate([y[ex], x[ex], delta]), np.full(k, -np.inf),
                             -lo[ex])
            # Exact with y >= 0, y >= x: δ=1 gives y = x >= 0, δ=0 gives y = 0 >= x.
        return out


LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Normalize": Normalize,
    "Conv2d": Conv2d,
    "Linear": Linear,
    "Flatten": Flatten,
    "ReLU": ReLU,
}
