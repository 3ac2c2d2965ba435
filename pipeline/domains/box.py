"""Boxes (intervals): the cheapest abstract domain, ``lower <= x <= upper`` elementwise.

Affine maps use the centre/radius form: centre through the layer with bias, radius through the
absolute value of its linear part. Same method set as :class:`pipeline.domains.zonotope.Zonotope`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.domains.zonotope import AffineLayer, input_box


@dataclass
class Box:
    lower: Tensor
    upper: Tensor

    @classmethod
    def from_bounds(cls, lower: Tensor, upper: Tensor) -> "Box":
        return cls(lower, upper)

    @classmethod
    def from_eps(cls, x: Tensor, eps: float, clip: tuple[float, float] = (0.0, 1.0)) -> "Box":
        return cls(*input_box(x, eps, clip))

    def affine(self, layer: AffineLayer) -> "Box":
        center, radius = (self.upper + self.lower) / 2, (self.upper - self.lower) / 2
        c, r = layer(center), layer.abs_linear(radius)
        return Box(c - r, c + r)

    def relu(self, slope: Tensor | None = None, bounds: tuple[Tensor, Tensor] | None = None
             ) -> tuple["Box", tuple[Tensor, Tensor], None]:
        lower, upper = self.lower, self.upper
        if bounds is not None:
            lower, upper = torch.maximum(lower, bounds[0]), torch.minimum(upper, bounds[1])
        return Box(lower.clamp_min(0), upper.clamp_min(0)), (lower, upper), None

    def concretize(self) -> tuple[Tensor, Tensor]:
        return self.lower, self.upper

    def margin_lower(self, label: Tensor) -> Tensor:
        idx = label.view(-1, 1)
        return self.lower.gather(1, idx) - self.upper
