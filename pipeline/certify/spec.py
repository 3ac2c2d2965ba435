"""What the cascade decides and about what: statuses, deciding stages, per-input results and the
properties (robustness or a VNN-LIB disjunction) as stacked linear output constraints.

    spec = Spec.robustness(labels, n_classes)          # (B,) labels
    spec.lower(zonotope)                                # (B, D) lower bounds of the margins
    CertifyResult(index, label, predicted).to_json()    # one JSONL line of the CLI
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.domains.zonotope import Zonotope



STATUSES = ("certified", "falsified", "unknown", "misclassified")
# Deciding stages, in cascade order ("nonfinite": NaN/inf in the input, weights or bounds).
METHODS = ("clean", "pgd", "zonotope", "zonotope_slopes", "lp", "milp", "timeout", "nonfinite")


class CertifyError(ValueError):
    """An input that does not fit the network (shape), an empty box or a negative ε."""


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class CertifyResult:
    """The outcome for one input. ``bounds`` maps each adversarial label (or disjunct index of a
    general property) to the best proved lower bound of its margin."""

    index: int
    label: int
    predicted: int
    status: str = "unknown"
    method: str = ""
    time_s: float = 0.0
    counterexample: list[float] | None = None
    bounds: dict[int, float] = field(default_factory=dict)
    stage_times: dict[str, float] = field(default_factory=dict)
    message: str = ""
    outputs: list[float] | None = None  # the model's outputs at the counterexample (VNN-LIB)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "label": self.label,
                               "predicted": self.predicted, "status": self.status,
                               "method": self.method, "time_s": round(self.time_s, 4)}
        if self.status == "falsified":
            out["counterexample"] = self.counterexample
        out["bounds"] = {str(k): (v if math.isfinite(v) else None)
                         for k, v in sorted(self.bounds.items())}
        out["stages"] = {k: round(v, 4) for k, v in self.stage_times.items()}
        if self.message:
            out["message"] = self.message
        return out


def vnn_answer(result: CertifyResult) -> str:
    """VNN-COMP's answer: sat (a counterexample), unsat (verified), timeout or unknown."""
    if result.status in ("falsified", "misclassified") and result.counterexample is not None:
        return "sat"
    if result.status == "certified":
        return "unsat"
    return "timeout" if result.method == "timeout" else "unknown"


# ---------------------------------------------------------------------------------------------
# Properties


@dataclass
class Spec:
    """Unsafe outputs: the union over disjuncts k of {y : A_i y <= b_i for every row i of k}.

    Rows of all disjuncts are stacked: ``A`` (R, n) or per input (B, R, n), ``b`` (R,) or (B, R),
    ``owner`` (R,) the disjunct of each row. A disjunct's margin is max_i (A_i y - b_i): the point
    is safe for it iff the margin is > 0. ``strict``: a counterexample needs a margin < 0 rather
    than <= 0; ``row_strict`` (R,) sets it per row (VNN-LIB's < and > atoms). Robustness uses
    non-strict rows: a tie with another label is a counterexample.
    """

    A: Tensor
    b: Tensor
    owner: Tensor
    n_disjuncts: int
    strict: bool
    labels: Tensor | None = None  # (B,) for robustness (enables the CE attack loss)
    names: list[int] | None = None  # per disjunct: the adversarial label (single input)
    row_strict: Tensor | None = None  # (R,) bool; None: ``strict`` for every row

    @classmethod
    def robustness(cls, labels: Tensor, n_classes: int, strict: bool = False) -> "Spec":
        """Disjunct k of input b: y_{a_k} >= y_{label_b}, for the labels a_k != label_b."""
        labels = labels.reshape(-1).to(torch.int64).cpu()
        bsz = labels.shape[0]
        eye = torch.eye(n_classes, dtype=torch.float64)
        others = torch.stack([torch.tensor([a for a in range(n_classes) if a != int(y)])
                              for y in labels])  # (B, n-1)
        A = eye[labels].unsqueeze(1) - eye[others]  # (B, n-1, n): e_y - e_a
        names = others[0].tolist() if bsz == 1 else None
        return cls(A, torch.zeros(bsz, n_classes - 1, dtype=torch.float64),
                   torch.arange(n_classes - 1), n_classes - 1, strict, labels, names)

    @classmethod
    def disjunctive(cls, disjuncts: Iterable[Any], strict: bool = False) -> "Spec":
        """From (A, b) pairs or objects with ``.A``/``.b`` (VNN-LIB disjuncts)."""
        rows, offsets, owner, stricts = [], [], [], []
        for k, d in enumerate(disjuncts):
            a, b = (d.A, d.b) if hasattr(d, "A") else d
            a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_1d(np.asarray(b, float))
            rows.append(a)
            offsets.append(b)
            owner += [k] * len(a)
            st = getattr(d, "strict", None)
            stricts.append(np.full(len(a), strict) if st is None else np.asarray(st, bool))
        if not rows:
            raise CertifyError("the property has no disjunct")
        return cls(torch.as_tensor(np.concatenate(rows)), torch.as_tensor(np.concatenate(offsets)),
                   torch.as_tensor(owner, dtype=torch.int64), len(rows), strict, None,
                   list(range(len(rows))), torch.as_tensor(np.concatenate(stricts)))

    def to(self, device: torch.device) -> "Spec":
        return Spec(self.A.to(device), self.b.to(device), self.owner.to(device), self.n_disjuncts,
                    self.strict, None if self.labels is None else self.labels.to(device),
                    self.names, None if self.row_strict is None else self.row_strict.to(device))

    def select(self, idx: Tensor) -> "Spec":
        """The spec of a subset of the inputs (per-input A/b only)."""
        if self.A.dim() == 2:
            return self
        return Spec(self.A[idx], self.b[idx], self.owner, self.n_disjuncts, self.strict,
                    None if self.labels is None else self.labels[idx], self.names,
                    self.row_strict)

    def disjunct(self, k: int, item: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rows = (self.owner == k).nonzero().reshape(-1)
        a = self.A if self.A.dim() == 2 else self.A[item]
        b = self.b if self.b.dim() == 1 else self.b[item]
        return a[rows].cpu().numpy(), b[rows].cpu().numpy()

    def _reduce(self, rows: Tensor) -> Tensor:
        out = torch.full((rows.shape[0], self.n_disjuncts), -math.inf, dtype=rows.dtype,
                         device=rows.device)
        return out.scatter_reduce(1, self.owner.to(rows.device).expand_as(rows), rows, "amax")

    def margins(self, y: Tensor) -> Tensor:
        """(B, D) margin of each disjunct at outputs y (B, n); B may be a multiple of the spec's
        batch (restarts of one input are consecutive)."""
        a, b = self._expand(y.shape[0], y.dtype)
        return self._reduce(torch.einsum("bn,brn->br", y, a) - b)

    def lower(self, element: Zonotope) -> Tensor:
        """(B, D) lower bounds of the disjunct margins over a zonotope of outputs."""
        center = element.center.reshape(element.center.shape[0], -1)
        gens = element.generators.reshape(*element.generators.shape[:2], -1)
        a, b = self._expand(center.shape[0], center.dtype)
        radius = torch.einsum("bkn,brn->bkr", gens, a).abs().sum(1)
        return self._reduce(torch.einsum("bn,brn->br", center, a) - b - radius)

    def violated(self, y: Tensor) -> Tensor:
        """(B,) whether outputs y lie in some disjunct's unsafe region, computed in y's dtype (a
        candidate test: :meth:`violated_exactly` decides)."""
        a, b = self._expand(y.shape[0], y.dtype)
        rows = torch.einsum("bn,brn->br", y, a) - b
        strict = self._strict(rows.device)
        bad = torch.where(strict, rows < 0, rows <= 0).to(rows.dtype)
        all_rows = torch.ones(rows.shape[0], self.n_disjuncts, dtype=rows.dtype,
                              device=rows.device)
        all_rows = all_rows.scatter_reduce(1, self.owner.to(rows.device).expand_as(rows), bad,
                                           "amin")
        return all_rows.amax(1) > 0

    def violated_exactly(self, y: Iterable[float], item: int = 0) -> bool:
        """Whether the output vector y (finite floats, e.g. a float32 forward pass) satisfies
        some disjunct exactly as written: every row a·y - b <= 0, or < 0 where strict, in exact
        rational arithmetic on the values of y, A and b."""
        from fractions import Fraction

        yf = [Fraction(float(v)) for v in y]
        a = (self.A if self.A.dim() == 2 else self.A[item]).cpu().numpy()
        b = (self.b if self.b.dim() == 1 else self.b[item]).cpu().numpy()
        strict = self._strict(torch.device("cpu")).numpy()
        owner = self.owner.cpu().numpy()
        unsafe = np.ones(self.n_disjuncts, dtype=bool)
        for r in range(a.shape[0]):
            value = sum((Fraction(float(c)) * v for c, v in zip(a[r], yf) if c != 0),
                        Fraction(0)) - Fraction(float(b[r]))
            if not (value < 0 if strict[r] else value <= 0):
                unsafe[owner[r]] = False
        return bool(unsafe.any())

    def _strict(self, device: torch.device) -> Tensor:
        if self.row_strict is not None:
            return self.row_strict.to(device)
        return torch.full((self.owner.shape[0],), bool(self.strict), device=device)

    def _expand(self, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        a, b = self.A.to(dtype), self.b.to(dtype)
        if a.dim() == 2:
            return a.unsqueeze(0).expand(batch, *a.shape), b.unsqueeze(0).expand(batch, -1)
        rep = batch // a.shape[0]
        return a.repeat_interleave(rep, 0), b.repeat_interleave(rep, 0)
