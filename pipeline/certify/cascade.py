"""COLT's certification cascade, batched: the cheap stages on many inputs at once, LP and MILP
per input.

Per input (reference §4.1, reordered so that the common case is cheap):

1. clean prediction (float64): a wrong one is "misclassified";
2. a quick input attack (``pgd_quick_restarts`` x ``pgd_quick_steps``, restarts batched);
3. the zonotope (DeepZ) in float64 - it alone certifies most inputs of a COLT network;
4. per-neuron ReLU slopes λ ∈ [0, 1] optimised by Adam on the worst-case margins (COLT's
   learn_slopes: DeepZ start, lr ``slope_lr``, StepLR(``slope_lr_step``, 0.1), clamp, early exit
   when verified or on a plateau of ``slope_patience`` steps), in float32 for speed; a margin
   counts only when recomputed in float64 with the same λ (any λ ∈ [0, 1] is sound);
5. the full attack (``pgd_restarts`` x ``pgd_steps``, one batch);
6. LP tightening of the ReLU bounds the MILP takes from the zonotope (``lp_refine``), then the
   slopes again with them;
7. one MILP per adversarial label still open, hardest first: from the exact zonotope at the last
   ReLU's input, then (``milp_layer`` -1) from the one before it, binaries for the
   highest-priority unstable ReLUs (|∂loss/∂λ|), early termination on the sign.

From stage 3 on, every zonotope intersects its ReLU bounds with the tightest ones known so far
(earlier zonotopes with other λ, LP): any valid bound may be used.
A counterexample counts only after a forward pass in the model's own precision (float32, or float64
for a DOUBLE ONNX model) on a point of that precision inside the box satisfies the property exactly
(strict rows strictly); a certificate only when every label's float64 (or solver-proved) lower
bound exceeds the bound of :mod:`pipeline.certify.fp_error` on the floating-point error of that
input's computation (plus ``margin_tolerance`` for solver-proved bounds). Ties: robustness means
the label's logit is strictly above every other; a tie is a counterexample and never certified.
Non-finite inputs, weights or bounds are never certified; a timeout is "unknown".

    certifier = Certifier(net, CertifyConfig())
    result = certifier.certify(x, label, eps=0.1, index=0)     # x: (C, H, W) in [0, 1]
    result.status, result.method, result.time_s

    certified_accuracy(net, (images, labels), eps, cfg, max_inputs=500)  # nat / pgd / cert counts
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.certify import fp_error
# The result and property types live in spec.py; re-exported here for existing imports.
from pipeline.certify.spec import (  # noqa: F401
    METHODS,
    STATUSES,
    CertifyError,
    CertifyResult,
    Spec,
    vnn_answer,
)
from pipeline.certify.milp import (
    EncodingError,
    GeneratorCompression,
    MilpEncoder,
    ZonotopeRun,
    lp_tighten,
    run_zonotope,
    solve_disjunct,
)
from pipeline.config import CertifyConfig
from pipeline.domains.zonotope import input_box
from pipeline.nets import Net

log = logging.getLogger(__name__)
# Memory a batch of zonotopes (certify_batch, certified_accuracy) may take, in bytes.
ZONOTOPE_MEMORY_BUDGET = 1 << 30
# Host syncs of the batched loops: the attack confirms its float32 candidates in float64 every
# this many steps, the slope loop re-checks its ready inputs in float64 every this many steps.
ATTACK_CONFIRM_EVERY = 5
SLOPE_CHECK_EVERY = 5


# ---------------------------------------------------------------------------------------------
# The certifier


@dataclass
class _SlopeOutcome:
    bounds: Tensor  # (B, D) best float64 lower bounds proved
    verified: Tensor  # (B, D)
    slopes: dict[int, Tensor]  # float64, the best λ per image (for the MILP)
    priority: dict[int, Tensor]  # |∂loss/∂λ| of each input's last step
    iterations: int
    stepped: list[bool]  # per input: did it take a step (else its priority means nothing)


@dataclass
class OpenInput:
    """An input the batched stages (clean, attacks, zonotope, slopes) left undecided: all that
    LP and MILP (:meth:`Certifier.finish`) need. Picklable (``.to("cpu")``) for a worker."""

    result: CertifyResult  # predicted, stage times so far
    names: list[int]
    lower: Tensor  # (1, ...)
    upper: Tensor
    spec: Spec  # of this input alone
    best: Tensor  # (D,) float64 CPU: best proved lower bounds
    todo: Tensor  # (D,) bool CPU: disjuncts still open
    tau: Tensor  # (D,) float64 CPU: what each lower bound must exceed (fp_error)
    spent: float  # seconds of its budget the batched stages used
    slopes: dict[int, Tensor] | None
    priority: dict[int, Tensor] | None
    known: dict[int, tuple[Tensor, Tensor]]  # the tightest ReLU bounds so far

    @property
    def index(self) -> int:
        return self.result.index

    def to(self, device: str | torch.device) -> "OpenInput":
        device = torch.device(device)
        move = (lambda d: None if d is None else {k: v.to(device) for k, v in d.items()})
        return OpenInput(self.result, self.names, self.lower.to(device), self.upper.to(device),
                         self.spec.to(device), self.best, self.todo, self.tau, self.spent,
                         move(self.slopes), move(self.priority),
                         {k: (lo.to(device), up.to(device)) for k, (lo, up) in self.known.items()})


class Certifier:
    """The cascade for one network: float32 and float64 copies, the generator compression and
    the MILP matrices are prepared once and reused for every input."""

    def __init__(self, net: Net, cfg: CertifyConfig | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.cfg = cfg or CertifyConfig()
        self.device = torch.device(device)
        self.net32 = _frozen_copy(net, torch.float32, self.device)
        self.net64 = _frozen_copy(net, torch.float64, self.device)
        # The precision the model runs in: counterexamples are checked, and the margins' error
        # bounds derived, in it (float64 only for a model that declares it, e.g. DOUBLE ONNX).
        self.precision = fp_error.model_precision(net)
        self.net_run = self.net32 if self.precision == torch.float32 else self.net64
        # float32 DeepZ only where the float32 copy is the model itself and the convolutions are
        # the CPU's (summation-order rounding only: no TF32, Winograd or FFT).
        want32 = self.cfg.zonotope_dtype == "float32"
        self.zonotope_dtype = torch.float32 if want32 and self.precision == torch.float32 \
            and self.device.type == "cpu" else torch.float64
        if want32 and self.zonotope_dtype == torch.float64:
            log.info("zonotope_dtype float32 applies to float32 models on the CPU only: "
                     "DeepZ runs in float64 here")
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
        self.compression = _compression(cpu64) if self.finite else None
        if self.compression is not None:
            self.compression = _to_device(self.compression, self.device)
        self.encoder = MilpEncoder(cpu64)
        # Most inputs per batch of the cascade's batched stages (the memory cap may lower it).
        self.max_batch = 64
        # Per ReLU block, the most crossing neurons one input has had so far (sizes chunks).
        self._crossing_seen: dict[int, int] = {}

    # -- public entry points -------------------------------------------------------------------

    def certify(self, x: Tensor | np.ndarray, label: int, eps: float, index: int = 0
                ) -> CertifyResult:
        """Robustness of ``x`` (in [0, 1] pixel space) in the L∞ ball of ``eps`` clipped to
        [0, 1]."""
        if not eps >= 0:
            raise CertifyError(f"eps = {eps}: must be >= 0")
        x64 = self._input(x)
        lower, upper = input_box(x64, eps)
        return self._certify(x64, lower, upper, self._robustness(label), index, label)

    def certify_box(self, x: Tensor | np.ndarray | None, lower: Tensor | np.ndarray,
                    upper: Tensor | np.ndarray, label: int, index: int = 0,
                    strict: bool = False) -> CertifyResult:
        """Robustness over an arbitrary box (e.g. a VNN-LIB one in normalised space); ``x`` is
        the clean point (the box centre when None). A tie is a counterexample (VNN-LIB's
        ``Y_j >= Y_label``); ``strict=True``: only ``Y_j > Y_label`` is."""
        lower, upper = self._input(lower), self._input(upper)
        x64 = (lower + upper) / 2 if x is None else self._input(x)
        return self._certify(x64, lower, upper, self._robustness(label, strict), index, label)

    def _robustness(self, label: int, strict: bool = False) -> Spec:
        if not 0 <= int(label) < self.n_outputs:
            raise CertifyError(f"label {label} outside 0..{self.n_outputs - 1}")
        return Spec.robustness(torch.tensor([int(label)]), self.n_outputs, strict)

    def verify_property(self, lower: Tensor | np.ndarray, upper: Tensor | np.ndarray,
                        disjuncts: Iterable[Any], index: int = 0) -> CertifyResult:
        """A general disjunctive property (VNN-LIB): "certified" = no point of the box reaches
        any disjunct's region; "falsified" = a confirmed point that does."""
        lower, upper = self._input(lower), self._input(upper)
        spec = Spec.disjunctive(disjuncts)
        if spec.A.shape[1] != self.n_outputs:
            raise CertifyError(f"the property is over {spec.A.shape[1]} outputs, the network "
                               f"has {self.n_outputs}")
        return self._certify((lower + upper) / 2, lower, upper, spec, index, -1)

    # -- the cascade ---------------------------------------------------------------------------

    def _input(self, t: Tensor | np.ndarray) -> Tensor:
        t = torch.as_tensor(np.array(t) if isinstance(t, np.ndarray) else t)
        t = t.to(self.device, torch.float64)
        if t.numel() != int(np.prod(self.input_shape)):
            raise CertifyError(f"input of {t.numel()} values (shape {tuple(t.shape)}) does not "
                               f"fit the network's input shape {self.input_shape}")
        return t.reshape(1, *self.input_shape)

    def _certify(self, x: Tensor, lower: Tensor, upper: Tensor, spec: Spec, index: int,
                 label: int) -> CertifyResult:
        """One input: the batched stages with a batch of one, then LP and MILP."""
        out = self._front(x, lower, upper, spec, [index], [label])[0]
        return out if isinstance(out, CertifyResult) else self.finish(out)

    def certify_batch(self, x: Tensor | np.ndarray, labels: Any, eps: float,
                      indices: Iterable[int] | None = None, finish: bool = True
                      ) -> list["CertifyResult | OpenInput"]:
        """Robustness of many inputs (B, C, H, W) at once, chunked to the memory cap: clean,
        attack, zonotope and slopes run on batches; the inputs they leave open go on to LP and
        MILP one at a time (with ``finish``) or come back as :class:`OpenInput` for
        :meth:`finish` (e.g. in worker processes). Verdicts are those of :meth:`certify` on each
        input (the attack of input i is seeded by ``cfg.seed + indices[i]``)."""
        if not eps >= 0:
            raise CertifyError(f"eps = {eps}: must be >= 0")
        x64 = torch.as_tensor(np.array(x) if isinstance(x, np.ndarray) else x)
        x64 = x64.to(self.device, torch.float64).reshape(-1, *self.input_shape)
        labels = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
        indices = list(range(len(labels))) if indices is None else [int(i) for i in indices]
        if not len(labels) == len(indices) == x64.shape[0]:
            raise CertifyError(f"{x64.shape[0]} inputs, {len(labels)} labels, "
                               f"{len(indices)} indices: must agree")
        for v in labels:
            if not 0 <= v < self.n_outputs:
                raise CertifyError(f"label {v} outside 0..{self.n_outputs - 1}")
        out: list[CertifyResult | OpenInput] = []
        s = 0
        while s < len(labels):
            part = slice(s, s + self._chunk_size())  # sized by the zonotopes seen so far
            lower, upper = input_box(x64[part], eps)
            spec = Spec.robustness(torch.tensor(labels[part]), self.n_outputs)
            out += self._front(x64[part], lower, upper, spec, indices[part], labels[part])
            s = part.stop
        if finish:
            out = [r if isinstance(r, CertifyResult) else self.finish(r) for r in out]
        return out

    def _front(self, x: Tensor, lower: Tensor, upper: Tensor, spec: Spec, indices: list[int],
               labels: list[int]) -> list["CertifyResult | OpenInput"]:
        """Stages 1-5 on a batch: clean, quick attack, zonotope, slopes, full attack. Each
        batched stage's wall time is shared equally among the inputs that took part in it
        (stage times and the per-input budget ``timeout_per_input_s``)."""
        cfg = self.cfg
        bsz = x.shape[0]
        spec = spec.to(self.device)
        n_d = spec.n_disjuncts
        res = [CertifyResult(int(i), int(l), -1) for i, l in zip(indices, labels)]
        names = [self._names(spec, labels[j]) for j in range(bsz)]
        best = torch.full((bsz, n_d), -math.inf, dtype=torch.float64)
        todo = torch.ones((bsz, n_d), dtype=torch.bool)
        # Per disjunct, what a lower bound must exceed (fp_error; set at the first zonotope).
        tau = torch.full((bsz, n_d), math.inf, dtype=torch.float64)
        spent = [0.0] * bsz
        decided: list[bool] = [False] * bsz

        def charge(stage: str, rows: list[int], seconds: float) -> None:
            share = seconds / max(len(rows), 1)
            for j in rows:
                res[j].stage_times[stage] = res[j].stage_times.get(stage, 0.0) + share
                spent[j] += share

        def decide(j: int, status: str, method: str, message: str = "") -> None:
            r = res[j]
            r.status, r.method, r.message = status, method, message
            r.bounds = {names[j][k]: float(best[j, k]) for k in range(n_d)}
            r.time_s = spent[j]
            decided[j] = True

        def record(rows: list[int], bounds: Tensor) -> list[bool]:
            """Merge proved bounds (len(rows), D); per row: is every disjunct verified?"""
            b = bounds.detach().cpu().to(torch.float64).reshape(len(rows), n_d)
            r = torch.as_tensor(rows, dtype=torch.int64)
            ok = torch.isfinite(b)
            best[r] = torch.where(ok, torch.maximum(best[r], b), best[r])
            todo[r] &= ~(ok & (b > tau[r]))
            return (~todo[r].any(1)).tolist()

        def budget(rows: list[int]) -> float:
            """The batch's deadline: the sum of the inputs' remaining budgets from now."""
            return time.perf_counter() + sum(max(cfg.timeout_per_input_s - spent[j], 0.0)
                                             for j in rows)

        def timed_out(rows: list[int]) -> list[int]:
            for j in rows:
                if spent[j] > cfg.timeout_per_input_s:
                    decide(j, "unknown", "timeout")
            return [j for j in rows if not decided[j]]

        if bool((lower > upper).any()):
            raise CertifyError("empty input box (a lower bound above its upper bound)")
        everyone = list(range(bsz))
        t = time.perf_counter()
        finite_in = (torch.isfinite(x).flatten(1).all(1) & torch.isfinite(lower).flatten(1).all(1)
                     & torch.isfinite(upper).flatten(1).all(1))
        with torch.no_grad():
            # The clean point as the model takes it: in its precision, inside the box (rows with
            # a non-finite input keep it: they are decided "nonfinite" below).
            x_run = torch.where(finite_in.view(-1, *([1] * (x.dim() - 1))),
                                _round_into(x, lower, upper, self.precision).double(), x)
            logits = self.net_run(x_run.to(self.precision)).double()
        finite = (finite_in & torch.isfinite(logits).all(1)).cpu()
        predicted = logits.argmax(1).cpu()
        logits_host = logits.cpu()
        charge("clean", everyone, time.perf_counter() - t)
        for j in everyone:
            if bool(finite[j]):
                res[j].predicted = int(predicted[j])
            if not (bool(finite[j]) and self.finite):
                decide(j, "unknown", "nonfinite", "NaN or inf in the input, box or weights")
            elif spec.violated_exactly(logits_host[j].tolist(), j if spec.A.dim() == 3 else 0):
                res[j].counterexample = x_run[j].reshape(-1).tolist()  # the clean point itself
                # A tie with the label's logit (argmax may still name the label) is falsified.
                decide(j, "misclassified" if spec.labels is not None
                       and res[j].predicted != labels[j] else "falsified", "clean")
        rows = [j for j in everyone if not decided[j]]

        def attack(rows: list[int], stage: str, restarts: int, steps: int, step: float,
                   offset: int, deadline: float | None) -> list[int]:
            t = time.perf_counter()
            r = torch.as_tensor(rows, device=self.device)
            found, points = self.attack_batch(
                lower[r], upper[r], spec.select(r), restarts, steps, step,
                seeds=[cfg.seed + indices[j] + offset for j in rows], deadline=deadline)
            found = found.cpu().tolist()
            charge(stage, rows, time.perf_counter() - t)
            for k, j in enumerate(rows):
                if found[k]:
                    res[j].counterexample = points[k].reshape(-1).tolist()
                    decide(j, "falsified", "pgd")
            return [j for j in rows if not decided[j]]

        # 2. A cheap attack first: a counterexample makes every later stage unnecessary.
        if rows and cfg.pgd_quick_restarts > 0:
            rows = attack(rows, "pgd_quick", cfg.pgd_quick_restarts, cfg.pgd_quick_steps,
                          cfg.pgd_step_size * cfg.pgd_steps / cfg.pgd_quick_steps, 0, None)
        if not rows:
            return res

        # 3. DeepZ, in float64 (or float32: ``zonotope_dtype``), its bounds then in float64.
        t = time.perf_counter()
        r = torch.as_tensor(rows, device=self.device)
        with torch.no_grad():
            run, rounding = self._deepz(lower[r], upper[r])
            self._note_crossing(run)
            tau[torch.as_tensor(rows)] = \
                self._threshold(lower[r], upper[r], run, spec.select(r), rounding).cpu()
            ok = record(rows, spec.select(r).lower(run.element))
        charge("zonotope", rows, time.perf_counter() - t)
        for k, j in enumerate(rows):
            if ok[k]:
                decide(j, "certified", "zonotope")
        # Every later zonotope intersects its ReLU bounds with the best ones known so far (any
        # valid bound may be used: λ then relaxes a smaller interval). Per-row state below is
        # aligned with ``rows`` and narrowed with it.
        known = {q: (lo.detach(), up.detach()) for q, (lo, up) in run.pre_bounds.items()}
        relax = dict(run.relaxations)
        slopes: dict[int, Tensor] | None = None
        priority: dict[int, Tensor] | None = None
        stepped: list[bool] = []

        def narrow(old: list[int], new: list[int]) -> None:
            nonlocal known, relax, slopes, priority, stepped
            if new == old:
                return
            pos = {j: k for k, j in enumerate(old)}
            sel = torch.as_tensor([pos[j] for j in new], dtype=torch.int64, device=self.device)
            known = {q: (lo[sel], up[sel]) for q, (lo, up) in known.items()}
            relax = {q: (lam[sel], mu[sel]) for q, (lam, mu) in relax.items()}
            if slopes is not None:
                slopes = {q: s_[sel] for q, s_ in slopes.items()}
            if priority is not None:
                priority = {q: p[sel] for q, p in priority.items()}
            stepped = [stepped[pos[j]] for j in new] if stepped else stepped

        old = rows
        rows = timed_out([j for j in rows if not decided[j]])
        narrow(old, rows)

        # 4. Optimised slopes.
        if rows and cfg.slope_iters > 0 and self.relu_indices:
            t = time.perf_counter()
            r = torch.as_tensor(rows, device=self.device)
            tr = torch.as_tensor(rows, dtype=torch.int64)
            out = self._optimise_slopes(lower[r], upper[r], spec.select(r),
                                        todo[tr].to(self.device),
                                        ZonotopeRun(run.element, relaxations=relax),
                                        budget(rows), refined=known,
                                        tau=tau[tr].to(self.device))
            slopes, priority, stepped = out.slopes, out.priority, out.stepped
            known = self._tighter(lower[r], upper[r], slopes, known)
            ok = record(rows, out.bounds)
            charge("zonotope_slopes", rows, time.perf_counter() - t)
            for k, j in enumerate(rows):
                if ok[k]:
                    decide(j, "certified", "zonotope_slopes")
            old = rows
            rows = timed_out([j for j in rows if not decided[j]])
            narrow(old, rows)

        # 5. The full attack.
        if rows and cfg.pgd_restarts > 0:
            old = rows
            rows = attack(rows, "pgd", cfg.pgd_restarts, cfg.pgd_steps, cfg.pgd_step_size,
                          7919, budget(rows))
            rows = timed_out(rows)
            narrow(old, rows)

        for k, j in enumerate(rows):
            one = slice(k, k + 1)
            res[j] = OpenInput(
                res[j], names[j], lower[j:j + 1], upper[j:j + 1],
                spec.select(torch.tensor([j], device=self.device)), best[j].clone(),
                todo[j].clone(), tau[j].clone(), spent[j],
                None if slopes is None else {q: s_[one] for q, s_ in slopes.items()},
                None if priority is None or not stepped[k] else
                {q: p[one] for q, p in priority.items()},
                {q: (lo[one], up[one]) for q, (lo, up) in known.items()})
        return res

    def _names(self, spec: Spec, label: int) -> list[int]:
        """Per disjunct, its name in the result's bounds: the adversarial label or the index."""
        if spec.labels is not None:
            return [a for a in range(self.n_outputs) if a != int(label)]
        return spec.names or list(range(spec.n_disjuncts))

    def finish(self, state: "OpenInput") -> CertifyResult:
        """Stages 6-7 for an input the batched stages left open: LP tightening, then the MILP
        per open disjunct, within what is left of its ``timeout_per_input_s``."""
        cfg = self.cfg
        state = state.to(self.device)
        res = state.result
        t0 = time.perf_counter()
        deadline = t0 + max(cfg.timeout_per_input_s - state.spent, 0.0)
        lower, upper, spec = state.lower, state.upper, state.spec
        best, todo, names, tau = state.best, state.todo, state.names, state.tau
        slopes, priority, known = state.slopes, state.priority, state.known
        timer = _Timer(res)

        def finish(status: str, method: str, message: str = "") -> CertifyResult:
            res.status, res.method, res.message = status, method, message
            res.bounds = {names[k]: float(best[k]) for k in range(spec.n_disjuncts)}
            res.time_s = state.spent + time.perf_counter() - t0
            return res

        def record(bounds: Tensor, stage: str) -> bool:
            """Merge proved bounds; True when every disjunct is verified."""
            bounds = bounds.detach().cpu().to(torch.float64).reshape(-1)
            finite = torch.isfinite(bounds)
            best[finite] = torch.maximum(best[finite], bounds[finite])
            todo[finite & (bounds > tau)] = False
            return not bool(todo.any())

        # 6. LP tightening of the ReLU bounds the MILP takes from the zonotope, then slopes
        # again with them (warm start).
        if cfg.lp_refine and self._lp_layers():
            try:
                with timer("lp"):
                    known = self._lp_refine(lower, upper, slopes, known, priority, deadline)
                    with torch.no_grad():
                        run = run_zonotope(self.net64, lower, upper, slopes=slopes,
                                           refined=known, compression=self.compression)
                    done = record(spec.lower(run.element)[0], "lp")
                    if not done and slopes is not None and time.perf_counter() < deadline:
                        out = self._optimise_slopes(
                            lower, upper, spec, todo.view(1, -1).to(self.device), run, deadline,
                            refined=known, init={r: s_.float() for r, s_ in slopes.items()},
                            tau=tau.view(1, -1).to(self.device))
                        slopes = out.slopes
                        priority = (out.priority if out.stepped[0] else None) or priority
                        known = self._tighter(lower, upper, slopes, known)
                        done = record(out.bounds[0], "lp")
                if done:
                    return finish("certified", "lp")
            except EncodingError as err:
                return finish("unknown", "nonfinite", str(err))
            if time.perf_counter() > deadline:
                return finish("unknown", "timeout")

        # 7. One MILP per disjunct still open, from the last ReLU layer's input first and, where
        # that fails, from deeper starts (milp_layer -1), while time remains.
        if cfg.milp:
            outcome = "failed"
            try:
                with timer("milp"):
                    for start in self._milp_starts():
                        outcome, cex = self._milp(lower, upper, spec, start, todo, best, slopes,
                                                  known, priority, deadline, record, tau)
                        if outcome != "failed":
                            break
            except EncodingError as err:
                return finish("unknown", "nonfinite", str(err))
            if outcome == "falsified":
                res.counterexample = cex
                return finish("falsified", "milp")
            if outcome == "certified":
                return finish("certified", "milp")
            if outcome == "timeout" or time.perf_counter() > deadline:
                return finish("unknown", "timeout")
            return finish("unknown", "milp")
        last = "lp" if cfg.lp_refine and self._lp_layers() else \
            ("zonotope_slopes" if slopes is not None else "zonotope")
        return finish("unknown", last)

    # -- stages --------------------------------------------------------------------------------

    def _attack(self, lower: Tensor, upper: Tensor, spec: Spec, restarts: int, steps: int,
                step_size: float, seed: int, deadline: float | None = None) -> list[float] | None:
        found, points = self.attack_batch(lower, upper, spec, restarts, steps, step_size,
                                          seeds=[seed], deadline=deadline)
        return points[0].reshape(-1).tolist() if bool(found[0]) else None

    def attack_batch(self, lower: Tensor, upper: Tensor, spec: Spec, restarts: int, steps: int,
                     step_size: float, seed: int = 0, deadline: float | None = None,
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
        found = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        best = center64.clone()
        if seeds is not None:
            coeff = torch.cat([
                2 * torch.rand((restarts, *c.shape[1:]), device=self.device,
                               generator=torch.Generator(device=self.device).manual_seed(int(s)))
                - 1 for s in seeds])
        else:
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
            coeff = 2 * torch.rand(c.shape, generator=gen, device=self.device) - 1
        use_ce = torch.zeros(bsz * restarts, dtype=torch.bool, device=self.device)
        labels = None
        if spec.labels is not None:
            use_ce[1::2] = True
            labels = spec.labels.to(self.device).repeat_interleave(restarts, 0)
        cand = torch.zeros(bsz * restarts, dtype=torch.bool, device=self.device)
        cand_coeff = torch.zeros_like(coeff)
        view = (-1,) + (1,) * (coeff.dim() - 1)
        for step in range(steps + 1):
            with torch.enable_grad():
                coeff.requires_grad_(True)
                logits = self.net32(c + r * coeff)
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
                        self._confirm(cand, cand_coeff, center64, radius64, lower, upper, spec,
                                      restarts, found, best)
                    cand.zero_()
                    if bool(found.all()):
                        break
                if grad is None or late:
                    break
                coeff = (coeff.detach() - step_size * grad.sign()).clamp(-1, 1)
        return found, best

    def _confirm(self, cand: Tensor, coeff: Tensor, center64: Tensor, radius64: Tensor,
                 lower: Tensor, upper: Tensor, spec: Spec, restarts: int, found: Tensor,
                 best: Tensor) -> None:
        idx = cand.nonzero().reshape(-1)
        owner = idx // restarts
        point = (center64[owner] + radius64[owner] * coeff.detach()[idx].double())
        point = torch.maximum(torch.minimum(point, upper[owner]), lower[owner])
        sub = spec.select(owner) if spec.A.dim() == 3 else spec
        ok, point = self._check_points(point, lower[owner], upper[owner], sub)
        for j in ok.nonzero().reshape(-1).tolist():
            b = int(owner[j])
            if not found[b]:
                found[b] = True
                best[b] = point[j]

    def _check_points(self, point: Tensor, lower: Tensor, upper: Tensor, spec: Spec
                      ) -> tuple[Tensor, Tensor]:
        """(ok (N,), points (N, ...) float64): each point rounded into its box in the model's
        precision, run by the model in that precision, and ok where the outputs satisfy the
        property exactly (:meth:`Spec.violated_exactly`, strict rows strictly)."""
        with torch.no_grad():
            x = _round_into(point, lower, upper, self.precision)
            y = self.net_run(x).double()
        ok = torch.zeros(len(x), dtype=torch.bool)
        inside = ((x.double() >= lower) & (x.double() <= upper)).flatten(1).all(1)
        cand = (spec.violated(y) & torch.isfinite(y).all(1) & inside).cpu()
        for j in cand.nonzero().reshape(-1).tolist():
            ok[j] = spec.violated_exactly(y[j].tolist(), j if spec.A.dim() == 3 else 0)
        return ok.to(point.device), x.double()

    def _optimise_slopes(self, lower: Tensor, upper: Tensor, spec: Spec, todo: Tensor,
                         run: ZonotopeRun, deadline: float | None,
                         refined: dict[int, tuple[Tensor, Tensor]] | None = None,
                         iterations: int | None = None,
                         init: dict[int, Tensor] | None = None,
                         tau: Tensor | None = None) -> _SlopeOutcome:
        """COLT's learn_slopes for a batch: Adam on λ (float32) against the worst-case margins of
        the open disjuncts; candidates are re-checked in float64 (the only bounds that count)
        and verified above ``tau`` (B, D), the floating-point error bound of each margin.

        Every decision is per input, so an input's slopes do not depend on its batch: its
        plateau (``slope_patience``), its best λ, its priorities; an input that has stopped
        keeps its λ (masked Adam step). Decisions stay on the device; the host syncs once every
        ``SLOPE_CHECK_EVERY`` steps, when the inputs whose float32 bounds all pass are re-checked
        in float64."""
        cfg = self.cfg
        tol = tau if tau is not None else \
            torch.full(todo.shape, math.inf, dtype=torch.float64, device=self.device)
        bsz = lower.shape[0]
        dev = self.device
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
                out = run_zonotope(self.net64, lower[idx], upper[idx],
                                   slopes={r: s[idx].double() for r, s in slopes.items()},
                                   refined={r: (lo[idx], up[idx])
                                            for r, (lo, up) in refined.items()},
                                   compression=self.compression)
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
            out = run_zonotope(self.net32, lo32, up32, slopes=params, refined=refined32,
                               compression=self.compression)
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
        return _SlopeOutcome(bounds.cpu(), verified.cpu(), slopes, priority, it + 1,
                             stepped.cpu().tolist())

    def _tighter(self, lower: Tensor, upper: Tensor, slopes: dict[int, Tensor] | None,
                 known: dict[int, tuple[Tensor, Tensor]]) -> dict[int, tuple[Tensor, Tensor]]:
        """The known ReLU bounds intersected with those of the zonotope with ``slopes``."""
        with torch.no_grad():
            run = run_zonotope(self.net64, lower, upper, slopes=slopes, refined=known,
                               compression=self.compression)
        return {r: (lo.detach(), up.detach()) for r, (lo, up) in run.pre_bounds.items()}

    def _lp_refine(self, lower: Tensor, upper: Tensor, slopes: dict[int, Tensor] | None,
                   known: dict[int, tuple[Tensor, Tensor]], priority: dict[int, Tensor] | None,
                   deadline: float) -> dict[int, tuple[Tensor, Tensor]]:
        """LP-tighten the ReLU bounds of :meth:`_lp_layers`, at most ``lp_refine_max_neurons``
        neurons in all (highest priority first); returns ``known`` with them."""
        cfg = self.cfg
        known = dict(known)
        budget = cfg.lp_refine_max_neurons
        for r in self._lp_layers():
            if budget <= 0 or time.perf_counter() > deadline:
                break
            with torch.no_grad():
                run = run_zonotope(self.net64, lower, upper, end=r - 1, slopes=slopes,
                                   refined=known, all_bounds=True, compression=self.compression)
                run = _with_pre(run, self.net64, r, slopes, known)
            order = None
            if priority is not None and r in priority:
                order = np.argsort(-priority[r][0].reshape(-1).cpu().numpy(), kind="stable")
            tr = lp_tighten(self.encoder, lower, upper, run, r, max_neurons=budget, order=order,
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
            known[r] = (torch.as_tensor(np.maximum(lo, lo0), device=self.device).view(shape),
                        torch.as_tensor(np.minimum(up, up0), device=self.device).view(shape))
            log.debug("LP at ReLU %d: %d LPs, %d neurons stabilised in %.2fs", r, tr.solved,
                      tr.stabilised, tr.runtime_s)
        return known

    def _milp_starts(self) -> list[int]:
        """Where the MILPs start: the input box with ``milp_from_input``; the given block with
        ``milp_layer`` >= 0; else the input of the last ReLU, then of the one before it."""
        cfg = self.cfg
        end = len(self.net64.blocks) - 1
        if cfg.milp_from_input or not self.relu_indices:
            return [-1]
        if cfg.milp_layer >= 0:
            return [self.encoder.effective_start(min(cfg.milp_layer, end), end)]
        starts = [self.encoder.effective_start(r - 1, end) for r in self.relu_indices[-2:][::-1]]
        return list(dict.fromkeys(starts))

    def _lp_layers(self) -> list[int]:
        """ReLU layers worth LP tightening: not the first (its bounds are exact already) and only
        those the first MILP takes from the zonotope (its own ReLUs get binaries or the
        triangle with their zonotope bounds)."""
        limit = self._milp_starts()[0] if self.cfg.milp else len(self.net64.blocks)
        return [r for r in self.relu_indices[1:] if r <= max(limit, 0)] if limit >= 0 else []

    def _milp(self, lower: Tensor, upper: Tensor, spec: Spec, start: int, todo: Tensor,
              best: Tensor, slopes: dict[int, Tensor] | None,
              refined: dict[int, tuple[Tensor, Tensor]], priority: dict[int, Tensor] | None,
              deadline: float, record: Any, tau: Tensor) -> tuple[str, list[float] | None]:
        """Per open disjunct, hardest first; stops at the first one that fails (COLT's
        fail_break). Returns ("certified" | "failed" | "timeout", None) or ("falsified", the
        counterexample): an encoding from the input box yields input points, and a negative one
        that a plain forward pass confirms is a counterexample."""
        cfg = self.cfg
        with torch.no_grad():
            run = run_zonotope(self.net64, lower, upper, slopes=slopes, refined=refined,
                               keep=(start,) if start >= 0 else (), all_bounds=True,
                               compression=self.compression)
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
                enc = self.encoder.encode(lower, upper, run, start=start, priorities=prio,
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
                cex = self._confirmed_point(out.input_point, lower, upper, spec)
                if cex is not None:
                    return "falsified", cex
            if not out.verified:
                return ("timeout" if out.status == "time_limit" else "failed"), None
        return ("certified" if not bool(todo.any()) else "failed"), None

    def _confirmed_point(self, point: np.ndarray, lower: Tensor, upper: Tensor,
                         spec: Spec) -> list[float] | None:
        """``point`` (a solver's input values) clipped into the box, if the network's forward
        pass in its own precision violates the property there exactly; else None."""
        x = torch.as_tensor(point, dtype=torch.float64, device=lower.device).reshape(lower.shape)
        x = torch.maximum(torch.minimum(x, upper), lower)
        ok, x = self._check_points(x, lower, upper, spec)
        if bool(ok.all()):
            return x.reshape(-1).tolist()
        return None

    # -- batched (tuning) ----------------------------------------------------------------------

    def batch(self, x: Tensor, labels: Tensor, eps: float, start_index: int = 0
              ) -> dict[str, Tensor]:
        """The cascade on a batch (:meth:`certify_batch`, inputs numbered from
        ``start_index``): (B,) bool tensors nat (correct clean prediction), pgd (not falsified)
        and cert, the verdicts :meth:`certify` gives each input."""
        labels = torch.as_tensor(labels).reshape(-1)
        results = self.certify_batch(x, labels, eps,
                                     range(start_index, start_index + len(labels)))
        nat = torch.tensor([r.status != "misclassified" and r.method != "nonfinite"
                            for r in results], dtype=torch.bool)
        pgd = nat & torch.tensor([r.status != "falsified" for r in results], dtype=torch.bool)
        cert = torch.tensor([r.status == "certified" for r in results], dtype=torch.bool)
        return {"nat": nat, "pgd": pgd, "cert": cert}

    def _deepz(self, lower: Tensor, upper: Tensor
               ) -> tuple[ZonotopeRun, "fp_error.ZonotopeRounding | None"]:
        """The first zonotope in ``self.zonotope_dtype``, returned in float64 (exact casts), and
        for float32 the bound on its rounding. In float32 the box is rounded outwards first, so
        that it contains the float64 one, and the ReLU bounds every later stage intersects with
        are widened by that bound into valid ones."""
        if self.zonotope_dtype == torch.float64:
            return run_zonotope(self.net64, lower, upper, compression=self.compression), None
        lo32, up32 = _outward(lower, upper, self.zonotope_dtype)
        rounding = fp_error.ZonotopeRounding(lo32, up32, self.zonotope_dtype)
        run = run_zonotope(self.net32, lo32, up32, compression=self.compression,
                           rounding=rounding)
        pair = lambda p: tuple(t.double() for t in p)  # noqa: E731
        return ZonotopeRun(run.element.to(torch.float64), rounding.widened(run.pre_bounds),
                           {q: pair(v) for q, v in run.relaxations.items()}), rounding

    def _threshold(self, lower: Tensor, upper: Tensor, run: ZonotopeRun, spec: Spec,
                   rounding: "fp_error.ZonotopeRounding | None" = None) -> Tensor:
        """(B, D) what each disjunct's float64 lower bound must exceed: the bound on the
        floating-point error of the model's run and of the bound computations (with
        ``rounding``, that of a float32 first zonotope too; :mod:`pipeline.certify.fp_error`),
        from this region's reachable magnitudes."""
        err = fp_error.output_error(self.net64, lower, upper, run.pre_bounds, self.precision)
        if rounding is not None:
            err = rounding.add_to(err)
        return fp_error.margin_threshold(err, spec.A, spec.b, spec.owner, spec.n_disjuncts)

    def _note_crossing(self, run: ZonotopeRun) -> None:
        for r, (lo, up) in run.pre_bounds.items():
            n = int(((lo < 0) & (up > 0)).flatten(1).sum(1).max()) if lo.shape[0] else 0
            self._crossing_seen[r] = max(self._crossing_seen.get(r, 0), n)

    def _chunk_size(self) -> int:
        """Inputs per zonotope batch so that the generator tensors stay within the budget
        (with autograd for the slopes, about 4 copies of the largest one). Before any input
        has run, a quarter of all ReLUs are assumed to cross; then twice the most generators
        a zonotope has had (new generators come only from crossing ReLUs)."""
        shapes = self.net64.shapes()
        widest = max(int(np.prod(s)) for s in shapes)
        n_in = int(np.prod(self.input_shape))
        gens = (self.compression.n_colors if self.compression else n_in)
        gens += sum(int(np.prod(shapes[r])) for r in self.relu_indices) // 4
        per_input = 8 * 4 * gens * widest
        if self._crossing_seen:
            # Generators after block i: the input's (or colours) plus one per crossing ReLU up to
            # i; twice the most seen, as the next inputs may cross more.
            base = self.compression.n_colors if self.compression else n_in
            per_input = max(8 * 4 * int(np.prod(shape)) * (base + 2 * sum(
                c for r, c in self._crossing_seen.items() if r <= i))
                for i, shape in enumerate(shapes[1:]))
        return max(1, min(self.max_batch, ZONOTOPE_MEMORY_BUDGET // max(per_input, 1)))



# ---------------------------------------------------------------------------------------------
# Batched accuracy for tuning


def certified_accuracy(net: Net, data: Any, eps: float, cfg: CertifyConfig | None = None,
                       max_inputs: int | None = None, *, batch_size: int = 256,
                       device: str | torch.device | None = None) -> dict[str, Any]:
    """Natural, PGD-robust and certified counts (and rates) on up to ``max_inputs`` inputs.

    ``data``: a DataLoader / iterable of (x, y) batches, an (images, labels) pair of tensors or an
    indexable data set of (image, label). The cascade of :meth:`Certifier.certify_batch`: clean,
    quick attack, zonotope and slopes on batches (chunked to the memory cap), the full attack on
    the inputs still open, then (``cfg.lp_refine``, ``cfg.milp``) LP and MILP per input; input i
    (counted from 0) gets the verdict ``Certifier.certify(x_i, y_i, eps, index=i)`` gives it.
    ``per_image``: {"nat", "pgd", "cert"} -> lists of n bools (:class:`PerImage`, JSON-ready, with a
    tensor's ``tolist()``), one per input in order, for paired comparisons of trials.
    """
    cfg = cfg or CertifyConfig()
    if not eps >= 0:
        raise CertifyError(f"eps = {eps}: must be >= 0")
    device = device if device is not None else next(net.parameters()).device
    certifier = Certifier(net, cfg, device)
    t0 = time.perf_counter()
    counts = {"n": 0, "nat": 0, "pgd": 0, "cert": 0}
    per_image: dict[str, list[Tensor]] = {"nat": [], "pgd": [], "cert": []}
    for x, y in _batches(data, batch_size, max_inputs):
        out = certifier.batch(x, y, eps, start_index=counts["n"])
        counts["n"] += len(y)
        for k in ("nat", "pgd", "cert"):
            counts[k] += int(out[k].sum())
            per_image[k].append(out[k].cpu())
    n = max(counts["n"], 1)
    # Per-image outcomes, in input order, for paired comparisons of trials on the same images.
    # Lists of bools (JSON-ready: the scores dict may be stored as Optuna user attributes) that
    # also answer .tolist() as a tensor would.
    per = {k: PerImage(bool(b) for t in v for b in t.tolist()) for k, v in per_image.items()}
    return {**counts, "nat_acc": counts["nat"] / n, "pgd_acc": counts["pgd"] / n,
            "cert_acc": counts["cert"] / n, "time_s": time.perf_counter() - t0,
            "per_image": per}


class PerImage(list):
    """Per-image outcomes of :func:`certified_accuracy`: a list of bools with ``tolist()``."""

    def tolist(self) -> list[bool]:
        return list(self)


def _batches(data: Any, batch_size: int, max_inputs: int | None
             ) -> Iterable[tuple[Tensor, Tensor]]:
    limit = math.inf if not max_inputs else max_inputs
    seen = 0
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        images, labels = data
        data = [(images[i: i + batch_size], torch.as_tensor(labels[i: i + batch_size]))
                for i in range(0, len(images), batch_size)]
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and \
            not isinstance(data, torch.utils.data.DataLoader):
        ds = data
        data = ((torch.stack([ds[j][0] for j in range(i, min(i + batch_size, len(ds)))]),
                 torch.tensor([int(ds[j][1]) for j in range(i, min(i + batch_size, len(ds)))]))
                for i in range(0, len(ds), batch_size))
    for x, y in data:
        if seen >= limit:
            return
        take = int(min(len(y), limit - seen))
        seen += take
        yield x[:take], torch.as_tensor(y)[:take]


# ---------------------------------------------------------------------------------------------
# Helpers


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


class _Timer:
    """Adds the wall time of each ``with timer(stage):`` block to ``result.stage_times``."""

    def __init__(self, result: CertifyResult) -> None:
        self.result = result

    def __call__(self, stage: str) -> "_Timer":
        self.stage = stage
        return self

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        times = self.result.stage_times
        times[self.stage] = times.get(self.stage, 0.0) + time.perf_counter() - self.t


def _frozen_copy(net: Net, dtype: torch.dtype, device: torch.device) -> Net:
    out = copy.deepcopy(net).to(device=device, dtype=dtype).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _compression(net64: Net) -> GeneratorCompression | None:
    return GeneratorCompression.for_net(net64)


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


def _outward(lower: Tensor, upper: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[lower, upper] in ``dtype``, rounded outwards: a box that contains the given one."""
    lo, up = lower.to(dtype), upper.to(dtype)
    inf = torch.tensor(math.inf, dtype=dtype, device=lo.device)
    lo = torch.where(lo.double() > lower, torch.nextafter(lo, -inf), lo)
    up = torch.where(up.double() < upper, torch.nextafter(up, inf), up)
    return lo, up


def _round_into(x: Tensor, lower: Tensor, upper: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` (nearest) inside [lower, upper]: the box edges rounded inwards to that
    precision (a box without a point of it keeps the rounded edge, which then fails the box)."""
    xr = x.to(dtype)
    lo, up = lower.to(dtype), upper.to(dtype)
    lo = torch.where(lo.double() < lower, torch.nextafter(lo, torch.full_like(lo, math.inf)), lo)
    up = torch.where(up.double() > upper, torch.nextafter(up, torch.full_like(up, -math.inf)),
                     up)
    return torch.maximum(torch.minimum(xr, up), lo)


def _inside(x: Tensor, lower: Tensor, upper: Tensor) -> bool:
    return bool(((x >= lower) & (x <= upper)).all())


def _with_pre(run: ZonotopeRun, net: Net, relu: int, slopes: dict[int, Tensor] | None,
              refined: dict[int, tuple[Tensor, Tensor]]) -> ZonotopeRun:
    """Add the pre-activation bounds of ReLU ``relu`` (the output bounds of block relu-1, which
    ``run_zonotope(end=relu-1)`` has) intersected with refined ones."""
    lo, up = run.block_bounds[relu - 1]
    if relu in refined:
        lo, up = torch.maximum(lo, refined[relu][0]), torch.minimum(up, refined[relu][1])
    run.pre_bounds[relu] = (lo, up)
    return run
