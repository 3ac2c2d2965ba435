"""COLT's certification cascade, batched: the cheap stages on many inputs at once, LP and MILP
per input.

Per input (reference §4.1, reordered so that the common case is cheap):

1. clean prediction (float64): a wrong one is "misclassified";
2. a quick input attack (``pgd_quick_restarts`` x ``pgd_quick_steps``, restarts batched);
3. the zonotope (DeepZ) in float64 (or float32, ``zonotope_dtype``, its rounding bounded) - it
   alone certifies most inputs of a COLT network;
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

The stages live in their own modules: :mod:`~pipeline.certify.counterexamples` (attacks and the
exact counterexample check), :mod:`~pipeline.certify.slopes` (stage 4), DeepZ and the error
bounds on :class:`~pipeline.certify.prepared.PreparedNet`, :mod:`~pipeline.certify.lp_milp_stage`
(stages 6-7); this module orders them, shares each input's budget and keeps its verdict.
Validation scoring over a data set is :func:`pipeline.certify.scoring.certified_accuracy`; the
CLI (``python -m pipeline.certify``, README) certifies data sets and VNN-LIB properties.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.certify.counterexamples import attack_batch, round_into
from pipeline.certify.lp_milp_stage import lp_layers, lp_refine, milp_starts, run_milps
from pipeline.certify.milp import EncodingError, ZonotopeRun
from pipeline.certify.prepared import PreparedNet
from pipeline.certify.slopes import optimise_slopes
from pipeline.certify.spec import CertifyError, CertifyResult, Spec
from pipeline.config import CertifyConfig
from pipeline.domains.zonotope import input_box
from pipeline.nets import Net

# Memory a batch of zonotopes (certify_batch, certified_accuracy) may take, in bytes.
ZONOTOPE_MEMORY_BUDGET = 1 << 30


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


class Certifier(PreparedNet):
    """The cascade for one network: float32 and float64 copies, the generator compression and
    the MILP matrices are prepared once (:class:`PreparedNet`) and reused for every input."""

    def __init__(self, net: Net, cfg: CertifyConfig | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.cfg = cfg or CertifyConfig()
        super().__init__(net, device, self.cfg.zonotope_dtype)
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

        def close(rows: list[int], bounds: Tensor, stage: str, t0: float) -> None:
            """Merge a stage's proved bounds (len(rows), D), charge its time since ``t0``, and
            certify the rows whose every disjunct is verified."""
            b = bounds.detach().cpu().to(torch.float64).reshape(len(rows), n_d)
            r = torch.as_tensor(rows, dtype=torch.int64)
            ok = torch.isfinite(b)
            best[r] = torch.where(ok, torch.maximum(best[r], b), best[r])
            todo[r] &= ~(ok & (b > tau[r]))
            verified = (~todo[r].any(1)).tolist()
            charge(stage, rows, time.perf_counter() - t0)
            for k, j in enumerate(rows):
                if verified[k]:
                    decide(j, "certified", stage)

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
                                round_into(x, lower, upper, self.precision).double(), x)
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
            found, points = attack_batch(
                self, lower[r], upper[r], spec.select(r), restarts, steps, step,
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
            run, rounding = self.deepz(lower[r], upper[r])
            self._note_crossing(run)
            tau[torch.as_tensor(rows)] = \
                self.threshold(lower[r], upper[r], run, spec.select(r), rounding).cpu()
            bounds = spec.select(r).lower(run.element)
        close(rows, bounds, "zonotope", t)
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

        def advance(old: list[int]) -> list[int]:
            """The rows of ``old`` still open and in budget; the per-row state narrowed."""
            new = timed_out([j for j in old if not decided[j]])
            narrow(old, new)
            return new

        rows = advance(rows)

        # 4. Optimised slopes.
        if rows and cfg.slope_iters > 0 and self.relu_indices:
            t = time.perf_counter()
            r = torch.as_tensor(rows, device=self.device)
            tr = torch.as_tensor(rows, dtype=torch.int64)
            out = optimise_slopes(self, cfg, lower[r], upper[r], spec.select(r),
                                  todo[tr].to(self.device),
                                  ZonotopeRun(run.element, relaxations=relax),
                                  budget(rows), refined=known, tau=tau[tr].to(self.device))
            slopes, priority, stepped = out.slopes, out.priority, out.stepped
            known = self.tighter(lower[r], upper[r], slopes, known)
            close(rows, out.bounds, "zonotope_slopes", t)
            rows = advance(rows)

        # 5. The full attack.
        if rows and cfg.pgd_restarts > 0:
            attack(rows, "pgd", cfg.pgd_restarts, cfg.pgd_steps, cfg.pgd_step_size, 7919,
                   budget(rows))
            rows = advance(rows)

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
        if cfg.lp_refine and lp_layers(self, cfg):
            try:
                with timer("lp"):
                    known = lp_refine(self, cfg, lower, upper, slopes, known, priority,
                                      deadline)
                    with torch.no_grad():
                        run = self.zonotope(lower, upper, slopes=slopes, refined=known)
                    done = record(spec.lower(run.element)[0], "lp")
                    if not done and slopes is not None and time.perf_counter() < deadline:
                        out = optimise_slopes(
                            self, cfg, lower, upper, spec, todo.view(1, -1).to(self.device), run,
                            deadline, refined=known,
                            init={r: s_.float() for r, s_ in slopes.items()},
                            tau=tau.view(1, -1).to(self.device))
                        slopes = out.slopes
                        priority = (out.priority if out.stepped[0] else None) or priority
                        known = self.tighter(lower, upper, slopes, known)
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
                    for start in milp_starts(self, cfg):
                        outcome, cex = run_milps(self, cfg, lower, upper, spec, start, todo,
                                                 best, slopes, known, priority, deadline,
                                                 record, tau)
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
        last = "lp" if cfg.lp_refine and lp_layers(self, cfg) else \
            ("zonotope_slopes" if slopes is not None else "zonotope")
        return finish("unknown", last)

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

