"""The float64 zonotope pass and the MILP/LP encoding of a network, written once over MilpProblem.

Three pieces, used by the cascade's stages (:mod:`pipeline.certify.prepared`, ``slopes``,
``lp_milp_stage``) and by the tests on their own:

* :func:`run_zonotope` - DeepZ from an input box, block by block, with optional per-neuron slopes
  λ and refined pre-activation bounds, returning the bounds of every block and the exact zonotope
  at any requested block. For convolutional prefixes a :class:`GeneratorCompression` packs input
  noise symbols whose supports never overlap into one generator (graph colouring of the
  receptive fields), which is exact and cuts the cost of the conv layers several times.
* :class:`MilpEncoder` - the region after a start block (the exact zonotope there: one variable
  e ∈ [-1, 1] per noise symbol and one equality per coordinate; or, with no ReLU before the
  start, the input box itself) followed by each later block's own ``milp`` rule from
  :mod:`pipeline.layers`. Unstable ReLUs get a binary by priority (per layer and in total), the
  triangle otherwise. With ``start=-1`` and every unstable ReLU binary the MILP is complete.
* :func:`solve_disjunct` (minimise the margin of one property disjunct with early termination)
  and :func:`lp_tighten` (LP bound tightening of one ReLU layer's pre-activations, each neuron
  over its own dependency cone of the LP relaxation of the prefix).

Soundness: every bound is computed in float64; a MILP bound counts only when the solver proved
it (status optimal or stopped above the threshold: the MIP dual bound, or for an LP the bound its
duals prove, never the primal objective); everything else is "not verified". Verdicts compare
against the floating-point error threshold of :mod:`pipeline.certify.fp_error`.

    run = run_zonotope(net, lower, upper, all_bounds=True, keep=(6,))
    enc = MilpEncoder(net).encode(lower, upper, run, start=6, max_binary_per_layer=30)
    res = solve_disjunct(enc, A=np.eye(10)[[3]] - np.eye(10)[[5]], b=np.zeros(1))
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from pipeline.certify.solvers import MilpProblem, SolveResult, solve
from pipeline.domains.zonotope import Zonotope
from pipeline.layers import AffineBlock
from pipeline.nets import Net


class EncodingError(ValueError):
    """A network, region or start block that cannot be encoded (shape, index or non-finite)."""


# ---------------------------------------------------------------------------------------------
# Generator compression for convolutional prefixes


@dataclass
class GeneratorCompression:
    """Colouring of the input noise symbols of a network's convolutional prefix.

    Two input symbols whose (structural) supports never overlap in any block of the prefix
    ``0..segment_end`` can share one generator: the blocks are linear in the generators (ReLUs
    scale them elementwise), so the shared generator is the sum of both, and each one is
    recovered by masking with its support. Concretisation is exact on the shared form because at
    every coordinate at most one member of a colour is non-zero.
    """

    segment_end: int  # last block of the prefix (its output is decompressed)
    colors: Tensor  # (n_in,) int64: colour of each input symbol (C, H, W order)
    n_colors: int
    masks: dict[int, Tensor]  # block -> (n_in, 1, H_i, W_i) bool support of each symbol
    # When reshapes and then one affine block follow the prefix (Flatten -> Linear), the
    # decompression is fused into that block: its weight (k, C, H*W) and the sparse map from
    # (colour, position) to input symbols (n_in, n_colors * H*W).
    fuse_block: int | None = None
    fuse_weight: Tensor | None = None
    fuse_map: Tensor | None = None

    @classmethod
    def for_net(cls, net: Net, max_ratio: float = 0.5, chunk: int = 256
                ) -> "GeneratorCompression | None":
        """The colouring for ``net``'s prefix of (C, H, W)-shaped blocks, or None when it would
        not save at least ``1 - max_ratio`` of the symbols (e.g. fully connected nets)."""
        shapes = net.shapes()
        in_shape = tuple(net.input_shape)
        if len(in_shape) != 3:
            return None
        end = -1
        for i, s in enumerate(shapes):
            if len(s) != 3:
                break
            end = i
        if end < 0 or not any(net.blocks[i].is_relu for i in range(end + 1)):
            # Only worth it when generators would go through ReLUs before decompression.
            return None
        c_in, h, w = in_shape
        n_sp = h * w
        spatial: dict[int, Tensor] = {}
        with torch.no_grad():
            for i in range(end + 1):
                spatial[i] = torch.zeros(n_sp, *shapes[i][1:], dtype=torch.bool)
            for start in range(0, n_sp, chunk):
                stop = min(n_sp, start + chunk)
                z = torch.zeros(stop - start, c_in, n_sp, dtype=torch.float64)
                z[torch.arange(stop - start), :, torch.arange(start, stop)] = 1.0
                z = z.reshape(stop - start, c_in, h, w)
                for i in range(end + 1):
                    block = net.blocks[i]
                    if not block.is_relu:
                        # |W| applied to a non-negative indicator: a superset of any support
                        z = block.abs_linear(z).abs()
                    spatial[i][start:stop] = (z > 0).any(1)
                    z = (z > 0).to(torch.float64)
        conflict = torch.zeros(n_sp, n_sp, dtype=torch.bool)
        for i in range(end + 1):
            s = spatial[i].reshape(n_sp, -1).to(torch.float32)
            conflict |= (s @ s.T) > 0
        sp_colors = _greedy_colouring(conflict.numpy())
        n_sp_colors = int(sp_colors.max()) + 1
        n_colors = n_sp_colors * c_in
        if n_colors > max_ratio * c_in * n_sp:
            return None
        sym_colors = (torch.arange(c_in).view(-1, 1) * n_sp_colors
                      + torch.as_tensor(sp_colors).view(1, -1)).reshape(-1)
        masks = {i: spatial[i].unsqueeze(1).repeat(c_in, 1, 1, 1) for i in range(end + 1)}
        comp = cls(end, sym_colors.to(torch.int64), n_colors, masks)
        comp._set_fusion(net, shapes)
        return comp

    def _set_fusion(self, net: Net, shapes: list[tuple[int, ...]]) -> None:
        f = self.segment_end
        c, h, w = shapes[f]
        n = c * h * w
        g = f + 1
        with torch.no_grad():
            # Skip pure reshapes (Flatten): blocks that map arange(n) to itself.
            while g < len(net.blocks) and not net.blocks[g].is_relu:
                probe = torch.arange(n, dtype=torch.float64).reshape(1, *shapes[g - 1])
                out = net.blocks[g].linear(probe).reshape(-1)
                if out.numel() != n or not torch.equal(out, probe.reshape(-1)):
                    break
                g += 1
            if g >= len(net.blocks) or net.blocks[g].is_relu:
                return
            weight, _ = net.blocks[g].matrix(shapes[g - 1])
            if weight.shape[1] != n or weight.shape[0] * n > 2**26:
                return
        self.fuse_block = g
        self.fuse_weight = torch.as_tensor(weight.toarray()).reshape(-1, c, h * w)
        sp_mask = self.masks[f].reshape(len(self.colors), h * w)
        rows, pos = sp_mask.nonzero(as_tuple=True)
        cols = self.colors[rows] * (h * w) + pos
        self.fuse_map = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), torch.ones(len(rows), dtype=torch.float64),
            (len(self.colors), self.n_colors * h * w), check_invariants=True).coalesce()

    def compress(self, lower: Tensor, upper: Tensor) -> Zonotope:
        """The input box as a zonotope with one generator per colour (B, n_colors, C, H, W)."""
        b = lower.shape[0]
        radius = ((upper - lower) / 2).reshape(b, -1)
        n = radius.shape[1]
        gens = torch.zeros(b, self.n_colors, n, dtype=lower.dtype, device=lower.device)
        idx = self.colors.to(lower.device).view(1, 1, n).expand(b, 1, n)
        gens.scatter_(1, idx, radius.unsqueeze(1))
        return Zonotope((upper + lower) / 2, gens.reshape(b, self.n_colors, *lower.shape[1:]))

    def fused(self, element: Zonotope, net: Net) -> Zonotope:
        """The zonotope after ``fuse_block`` from the compressed one after ``segment_end``.

        Input symbol p's generator there is W (packed[colour(p)] masked to p's support), i.e.
        Σ_s mask_p[s] T[colour(p), s] with T[g, s] = Σ_channel W[:, channel, s] packed[g, ., s].
        """
        g = element.generators
        b, k = g.shape[:2]
        weight = self.fuse_weight.to(device=g.device, dtype=g.dtype)  # (m, C, S)
        m, c, s = weight.shape
        packed = g[:, : self.n_colors].reshape(b * self.n_colors, c, s)
        t = torch.bmm(packed.permute(2, 0, 1), weight.permute(2, 1, 0))  # (S, B*nc, m)
        t = t.reshape(s, b, self.n_colors, m).permute(2, 0, 1, 3).reshape(self.n_colors * s,
                                                                          b * m)
        fmap = self.fuse_map.to(device=g.device, dtype=g.dtype)
        full = torch.sparse.mm(fmap, t).reshape(-1, b, m).permute(1, 0, 2)  # (B, n_in, m)
        rest = g[:, self.n_colors:].reshape(b, k - self.n_colors, c * s) @ \
            weight.reshape(m, c * s).T
        center = element.center
        for i in range(self.segment_end + 1, self.fuse_block + 1):
            center = net.blocks[i](center)
        gens = torch.cat([full, rest], 1)
        return Zonotope(center, gens.reshape(b, gens.shape[1], *center.shape[1:]))

    def decompress(self, element: Zonotope, block: int) -> Zonotope:
        """The zonotope after ``block`` with one generator per input symbol again."""
        g = element.generators
        packed, rest = g[:, : self.n_colors], g[:, self.n_colors:]
        mask = self.masks[block].to(device=g.device, dtype=g.dtype)
        full = packed.index_select(1, self.colors.to(g.device)) * mask.unsqueeze(0)
        return Zonotope(element.center, torch.cat([full, rest], 1))


def _greedy_colouring(conflict: np.ndarray) -> np.ndarray:
    """Smallest-available-colour greedy colouring in index order (row-major pixels)."""
    n = conflict.shape[0]
    colors = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        used = colors[conflict[i] & (colors >= 0)]
        taken = np.zeros(len(used) + 1, dtype=bool)
        taken[used[used <= len(used)]] = True
        colors[i] = int(np.argmin(taken))
    return colors


# ---------------------------------------------------------------------------------------------
# The zonotope pass


@dataclass
class ZonotopeRun:
    """DeepZ from an input box: what the encoder and the cascade need of it.

    ``pre_bounds[r]`` are the bounds used at ReLU block ``r`` (the zonotope's own intersected with
    refined ones), ``block_bounds[i]`` the bounds of the output of block ``i`` (with
    ``all_bounds``), ``elements[i]`` the exact zonotope after block ``i`` (for ``keep``).
    """

    element: Zonotope
    pre_bounds: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    relaxations: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    block_bounds: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    elements: dict[int, Zonotope] = field(default_factory=dict)


def run_zonotope(net: Net, lower: Tensor, upper: Tensor, *, end: int | None = None,
                 slopes: dict[int, Tensor] | None = None,
                 refined: dict[int, tuple[Tensor, Tensor]] | None = None,
                 keep: tuple[int, ...] | list[int] = (), all_bounds: bool = False,
                 compression: GeneratorCompression | None = None,
                 rounding: Any = None) -> ZonotopeRun:
    """Push the box [lower, upper] (B, *input_shape) through blocks 0..end.

    The dtype is the inputs' (float64 for deciding bounds). Gradients flow to ``slopes`` if the
    caller enables them. Any λ ∈ [0, 1] gives a sound result (zonotope.relu_relaxation).
    ``rounding`` (a :class:`pipeline.certify.fp_error.ZonotopeRounding`) is told every block's
    input, to bound the rounding of a pass in a lower precision.
    """
    end = len(net.blocks) - 1 if end is None else end
    slopes, refined = slopes or {}, refined or {}
    use_compression = compression is not None and compression.segment_end <= end
    element = compression.compress(lower, upper) if use_compression else \
        Zonotope.from_bounds(lower, upper)
    run = ZonotopeRun(element)
    compressed = use_compression
    i = 0
    while i <= end:
        block = net.blocks[i]
        before = element
        element, pre, relax = block.abstract(element, slopes.get(i), refined.get(i))
        if rounding is not None:
            rounding.step(i, block, before, pre, relax)
        if pre is not None:
            run.pre_bounds[i] = pre
            run.relaxations[i] = relax
        if all_bounds:
            if pre is not None:
                run.block_bounds[i] = (pre[0].clamp_min(0), pre[1].clamp_min(0))
            else:
                run.block_bounds[i] = element.concretize()  # exact on the compressed form too
        if i in keep:
            run.elements[i] = compression.decompress(element, i) if compressed else element
        if compressed and i == compression.segment_end:
            compressed = False
            g = compression.fuse_block
            if g is not None and g <= end and not any(j in keep for j in range(i + 1, g)):
                # Fused decompression: blocks i+1..g-1 are reshapes, g is affine.
                for j in range(i + 1, g):
                    if all_bounds:
                        lo, up = run.block_bounds[i]
                        run.block_bounds[j] = (lo.reshape(lo.shape[0], -1),
                                               up.reshape(up.shape[0], -1))
                if rounding is not None:
                    for j in range(i + 1, g + 1):
                        rounding.step(j, net.blocks[j], element)
                element = compression.fused(element, net)
                i = g
                if all_bounds:
                    run.block_bounds[i] = element.concretize()
                if i in keep:
                    run.elements[i] = element
            else:
                element = compression.decompress(element, i)
        i += 1
    run.element = element
    return run


# ---------------------------------------------------------------------------------------------
# Encoding


class _Matrix:
    """Stands in for an affine block inside ``AffineBlock.milp``: a given (sub)matrix."""

    def __init__(self, weight: sp.csr_matrix, bias: np.ndarray) -> None:
        self.weight, self.bias = weight, bias

    def matrix(self, in_shape: tuple[int, ...]) -> tuple[sp.csr_matrix, np.ndarray]:
        return self.weight, self.bias


@dataclass
class NetEncoding:
    """A network region encoded into ``problem``: columns of each block's output (flattened)."""

    problem: MilpProblem
    start: int
    end: int
    columns: dict[int, np.ndarray]
    num_binary: int
    num_unstable: int
    complete: bool  # from the input box with every unstable ReLU binary: the exact network
    output_lower: np.ndarray
    output_upper: np.ndarray

    @property
    def output_columns(self) -> np.ndarray:
        return self.columns[self.end]


def select_binaries(pre_bounds: dict[int, tuple[np.ndarray, np.ndarray]],
                    priorities: dict[int, np.ndarray] | None, max_per_layer: int,
                    max_total: int) -> dict[int, np.ndarray]:
    """Which unstable ReLU neurons get a binary: the highest-priority ones, at most
    ``max_per_layer`` per ReLU block and ``max_total`` overall (priority: |∂loss/∂λ| when given,
    else the bound width u - l)."""
    chosen: dict[int, np.ndarray] = {}
    candidates = []  # (priority, relu, neuron)
    for r, (lo, up) in pre_bounds.items():
        unstable = np.flatnonzero((lo < 0) & (up > 0))
        chosen[r] = np.zeros(len(lo), dtype=bool)
        if not len(unstable) or max_per_layer <= 0:
            continue
        prio = priorities.get(r) if priorities else None
        score = (up - lo) if prio is None else np.asarray(prio, np.float64).reshape(-1)
        order = unstable[np.argsort(-score[unstable], kind="stable")][:max_per_layer]
        candidates += [(float(score[j]), r, int(j)) for j in order]
    candidates.sort(key=lambda t: -t[0])
    for _, r, j in candidates[:max_total]:
        chosen[r][j] = True
    return chosen


class MilpEncoder:
    """Encodes regions of one network; caches the float64 matrices of its affine blocks."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.shapes = [tuple(net.input_shape)] + net.shapes()  # shapes[i + 1]: output of block i
        self._matrices: dict[int, tuple[sp.csr_matrix, np.ndarray]] = {}

    def in_shape(self, block: int) -> tuple[int, ...]:
        return self.shapes[block]

    def out_shape(self, block: int) -> tuple[int, ...]:
        return self.shapes[block + 1]

    def matrix(self, block: int) -> tuple[sp.csr_matrix, np.ndarray]:
        if block not in self._matrices:
            w, b = self.net.blocks[block].matrix(self.in_shape(block))
            self._matrices[block] = (w.tocsr(), np.asarray(b, np.float64))
        return self._matrices[block]

    def effective_start(self, start: int, end: int) -> int:
        """-1 when no ReLU precedes ``start`` (the box encodes the same region with fewer
        symbols); otherwise ``start`` moved over following affine blocks that do not grow the
        dimension (the zonotope is exact through them)."""
        if start < -1 or start > end:
            raise EncodingError(f"start block {start} outside -1..{end}")
        if not any(self.net.blocks[i].is_relu for i in range(start + 1)):
            return -1
        while (start + 1 <= end and not self.net.blocks[start + 1].is_relu
               and np.prod(self.out_shape(start + 1)) <= np.prod(self.out_shape(start))):
            start += 1
        return start

    def encode(self, lower: Tensor, upper: Tensor, run: ZonotopeRun, *, start: int = -1,
               end: int | None = None, priorities: dict[int, np.ndarray] | None = None,
               max_binary_per_layer: int = 0, max_binary_total: int = 0,
               problem: MilpProblem | None = None) -> NetEncoding:
        """The region after ``start`` (-1: the input box) through blocks start+1..end.

        ``run`` must come from :func:`run_zonotope` on the same box with ``all_bounds=True``, and
        hold ``elements[start]`` when a ReLU precedes ``start`` (see :meth:`effective_start`).
        """
        net = self.net
        end = len(net.blocks) - 1 if end is None else end
        start = self.effective_start(start, end)
        problem = MilpProblem() if problem is None else problem
        bounds = {i: (_np(l), _np(u)) for i, (l, u) in run.block_bounds.items()}
        pre = {r: (_np(l), _np(u)) for r, (l, u) in run.pre_bounds.items() if start < r <= end}
        for i in range(start + 1, end + 1):
            if i not in bounds:
                raise EncodingError(f"no bounds for block {i}: run_zonotope(all_bounds=True)")
        for r, (lo, up) in pre.items():
            if not (np.isfinite(lo).all() and np.isfinite(up).all()):
                raise EncodingError(f"non-finite pre-activation bounds at ReLU block {r}")
        binary = select_binaries(pre, priorities, max_binary_per_layer, max_binary_total)
        ranks = _priority_ranks(pre, priorities)

        columns: dict[int, np.ndarray] = {}
        if start == -1:
            lo, up = _np(lower), _np(upper)
            if not (np.isfinite(lo).all() and np.isfinite(up).all()):
                raise EncodingError("non-finite input box")
            columns[-1] = problem.add_variables(lo, up)
        else:
            columns[start] = self._encode_zonotope(problem, run, start, bounds[start])
        cols = columns[start]
        for i in range(start + 1, end + 1):
            block = net.blocks[i]
            if block.is_relu:
                lo, up = pre[i]
                cols = block.milp(problem, cols, lo, up, self.in_shape(i), *bounds[i],
                                  binary=binary[i], priority=ranks.get(i))
            else:
                out_lo, out_up = self._var_bounds(i, bounds, pre)
                if type(block).milp is AffineBlock.milp:
                    cols = AffineBlock.milp(_Matrix(*self.matrix(i)), problem, cols, None, None,
                                            self.in_shape(i), out_lo, out_up)
                else:
                    cols = block.milp(problem, cols, None, None, self.in_shape(i), out_lo, out_up)
            columns[i] = np.asarray(cols, dtype=np.int64)
        unstable = sum(int(((lo < 0) & (up > 0)).sum()) for lo, up in pre.values())
        n_binary = sum(int(m.sum()) for m in binary.values())
        out_lo, out_up = bounds[end]
        return NetEncoding(problem, start, end, columns, n_binary, unstable,
                           complete=(start == -1 and n_binary == unstable),
                           output_lower=out_lo, output_upper=out_up)

    def _var_bounds(self, i: int, bounds: dict, pre: dict) -> tuple[np.ndarray, np.ndarray]:
        """Output bounds of affine block ``i``: the refined pre-activation bounds of the next
        ReLU when one follows (they are valid for every reachable point, so adding them keeps the
        encoding sound), else the zonotope's."""
        if i + 1 in pre:
            return pre[i + 1]
        return bounds[i]

    def _encode_zonotope(self, problem: MilpProblem, run: ZonotopeRun, start: int,
                         box: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """z = c + G e with e ∈ [-1, 1]^K: one variable per coordinate (bounded by its
        concretisation) and one equality row per coordinate that a later block reads."""
        kept = [k for k in run.elements if k <= start
                and not any(self.net.blocks[i].is_relu for i in range(k + 1, start + 1))]
        if not kept:
            raise EncodingError(f"run_zonotope(keep=({start},)) is needed to start at {start}")
        element = run.elements[max(kept)]
        for i in range(max(kept) + 1, start + 1):  # affine blocks: exact on the zonotope
            element = self.net.blocks[i].abstract(element)[0]
        if element.center.shape[0] != 1:
            raise EncodingError("the MILP encodes one input at a time (batch 1)")
        center = _np(element.center)
        gens = element.generators[0].reshape(element.num_generators, -1).detach().cpu()
        gens = gens.to(torch.float64).numpy()
        if not (np.isfinite(center).all() and np.isfinite(gens).all()):
            raise EncodingError(f"non-finite zonotope at block {start}")
        lo, up = box
        if start + 1 in run.pre_bounds:
            rl, ru = (_np(t) for t in run.pre_bounds[start + 1])
            lo, up = np.maximum(lo, rl), np.minimum(up, ru)
        z = problem.add_variables(lo, up)
        # Coordinates a following ReLU kills need no row (the ReLU rule fixes its output to 0).
        needed = np.ones(len(center), dtype=bool)
        if start + 1 < len(self.net.blocks) and self.net.blocks[start + 1].is_relu:
            needed = up > 0
        rows = np.flatnonzero(needed)
        used = np.flatnonzero(np.abs(gens[:, rows]).sum(1) > 0)  # symbols that matter
        if len(rows):
            e = problem.add_variables(-np.ones(len(used)), np.ones(len(used)))
            g = sp.csr_matrix(gens[np.ix_(used, rows)].T)
            a = sp.hstack([sp.identity(len(rows), format="csr"), -g]).tocsr()
            problem.add_rows(a, np.concatenate([z[rows], e]), center[rows], center[rows])
        return z


def _np(t: Tensor | np.ndarray) -> np.ndarray:
    """A batch-1 tensor (or array) as a flat float64 numpy array."""
    if isinstance(t, Tensor):
        t = t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, np.float64).reshape(-1)


def _priority_ranks(pre: dict[int, tuple[np.ndarray, np.ndarray]],
                    priorities: dict[int, np.ndarray] | None) -> dict[int, np.ndarray]:
    """Branching priorities as integer ranks (higher branches first), comparable across layers."""
    scores = []
    for r, (lo, up) in pre.items():
        p = priorities.get(r) if priorities else None
        scores.append((r, (up - lo) if p is None else np.asarray(p, np.float64).reshape(-1)))
    if not scores:
        return {}
    flat = np.concatenate([s for _, s in scores])
    ranks = np.empty(len(flat), dtype=np.int64)
    ranks[np.argsort(flat, kind="stable")] = np.arange(len(flat))
    out, pos = {}, 0
    for r, s in scores:
        out[r] = ranks[pos: pos + len(s)] + 1
        pos += len(s)
    return out


# ---------------------------------------------------------------------------------------------
# Objectives and solving


@dataclass
class DisjunctResult:
    """Lower bound of min_x max_i (A_i y(x) - b_i) over the encoded region, and its verdict."""

    verified: bool  # the bound is proved and > tolerance: no point of the region is unsafe
    bound: float
    value: float | None  # best objective found (of the possibly relaxed encoding)
    status: str  # the solver's status
    runtime_s: float
    solver: str
    message: str = ""
    # The input part of the best solution when the encoding starts at the input box (a candidate
    # counterexample: exact only for a complete encoding, so callers confirm it by a forward pass).
    input_point: np.ndarray | None = field(default=None, repr=False)


def set_disjunct_objective(enc: NetEncoding, A: np.ndarray, b: np.ndarray) -> MilpProblem:
    """Minimise max_i (A_i y - b_i) over the outputs y. One row: the objective itself (the
    problem can be reused for the next disjunct); several: a new variable t ≥ each row (then the
    problem is specific to this disjunct)."""
    A = np.atleast_2d(np.asarray(A, np.float64))
    b = np.atleast_1d(np.asarray(b, np.float64))
    out = enc.output_columns
    if A.shape[1] != len(out):
        raise EncodingError(f"property over {A.shape[1]} outputs, network has {len(out)}")
    problem = enc.problem
    if A.shape[0] == 1:
        problem.set_objective(out, A[0], -float(b[0]))
        return problem
    # t >= A_i y - b_i; the interval lower bound of each row is a valid lower bound of t.
    lo_rows = (np.where(A > 0, A * enc.output_lower, A * enc.output_upper).sum(1) - b)
    # ... and the upper ones bound the t that the minimum needs (t = max_i row_i): a finite
    # upper bound lets the duals of an LP prove its bound (solvers.lp_dual_bound).
    up_rows = (np.where(A > 0, A * enc.output_upper, A * enc.output_lower).sum(1) - b)
    top = float(up_rows.max())
    top = top + 1e-9 * max(1.0, abs(top)) if np.isfinite(top) else np.inf
    t = problem.add_variables(np.array([lo_rows.max()]), np.array([top]))
    m = A.shape[0]
    rows = sp.hstack([sp.csr_matrix(np.ones((m, 1))), sp.csr_matrix(-A)]).tocsr()
    problem.add_rows(rows, np.concatenate([t, out]), -b, np.full(m, np.inf))
    problem.set_objective(t, np.ones(1))
    return problem


def solve_disjunct(enc: NetEncoding, A: np.ndarray, b: np.ndarray, *, solver: str = "highs",
                   time_limit_s: float = 60.0, tolerance: float = 1e-6, early_stop: bool = True,
                   threads: int = 1) -> DisjunctResult:
    """Minimise the disjunct's margin; with ``early_stop`` stop once the bound exceeds
    ``tolerance`` (verified) or an incumbent is below 0 (this encoding cannot verify it)."""
    problem = set_disjunct_objective(enc, A, b)
    t0 = time.perf_counter()
    if time_limit_s <= 0:
        return DisjunctResult(False, -math.inf, None, "time_limit", 0.0, solver, "no time left")
    res: SolveResult = solve(problem, solver=solver, time_limit_s=time_limit_s,
                             stop_when_bound_above=tolerance if early_stop else None,
                             stop_when_value_below=0.0 if early_stop else None, threads=threads)
    # Only a proved bound certifies: a time limit or solver trouble never does.
    verified = (res.status in ("optimal", "stopped_positive") and math.isfinite(res.bound)
                and res.bound > tolerance)
    point = None
    if enc.start == -1 and res.solution is not None:
        point = res.solution[enc.columns[-1]]
    return DisjunctResult(verified, res.bound, res.value, res.status,
                          time.perf_counter() - t0, res.solver, res.message, point)


# ---------------------------------------------------------------------------------------------
# LP bound tightening


@dataclass
class TightenResult:
    lower: np.ndarray  # refined pre-activation bounds of the ReLU (flattened)
    upper: np.ndarray
    attempted: int  # neurons tried
    solved: int  # LPs solved to optimality
    stabilised: int  # neurons that became stable
    runtime_s: float


def lp_tighten(encoder: MilpEncoder, lower: Tensor, upper: Tensor, run: ZonotopeRun, relu: int,
               *, max_neurons: int = 200, order: np.ndarray | None = None, solver: str = "highs",
               time_limit_s: float = 10.0, deadline: float | None = None,
               threads: int = 1) -> TightenResult:
    """Tighten the pre-activation bounds of ReLU block ``relu`` by LP.

    For each unstable neuron (at most ``max_neurons``, in ``order`` or widest first) minimise and
    maximise it over the LP relaxation of the prefix: the input box, the affine blocks as
    equalities and the triangle at every earlier ReLU (with the bounds in ``run``, which may be
    refined already). Only the neuron's dependency cone is encoded (its receptive field for
    convolutions; dead ReLUs cut it). A bound is only taken from an LP solved to optimality.
    """
    net = encoder.net
    if not net.blocks[relu].is_relu:
        raise EncodingError(f"block {relu} is not a ReLU")
    t0 = time.perf_counter()
    lo, up = (_np(t).copy() for t in run.pre_bounds[relu])
    unstable = np.flatnonzero((lo < 0) & (up > 0))
    if order is None:
        order = unstable[np.argsort(-(up - lo)[unstable], kind="stable")]
    else:
        order = np.asarray([j for j in order if lo[j] < 0 < up[j]], dtype=np.int64)
    order = order[:max_neurons]
    pre = {r: (_np(a), _np(b)) for r, (a, b) in run.pre_bounds.items() if r <= relu}
    bounds = {i: (_np(a), _np(b)) for i, (a, b) in run.block_bounds.items()}
    box = (_np(lower), _np(upper))
    solved = stabilised = attempted = 0
    for j in order:
        if deadline is not None and time.perf_counter() > deadline:
            break
        attempted += 1
        problem, target = _cone_lp(encoder, box, pre, bounds, relu - 1, int(j))
        remaining = time_limit_s if deadline is None else min(time_limit_s,
                                                              deadline - time.perf_counter())
        for sign in (1.0, -1.0):
            if remaining <= 0:
                break
            problem.set_objective(np.array([target]), np.array([sign]))
            res = solve(problem, solver=solver, time_limit_s=remaining, threads=threads)
            if res.status == "optimal" and math.isfinite(res.bound):
                solved += 1
                if sign > 0:
                    lo[j] = max(lo[j], res.bound)
                else:
                    up[j] = min(up[j], -res.bound)
            if lo[j] >= 0 or up[j] <= 0:
                break
        if lo[j] >= 0 or up[j] <= 0:
            stabilised += 1
    return TightenResult(lo, up, attempted, solved, stabilised, time.perf_counter() - t0)


def _cone_lp(encoder: MilpEncoder, box: tuple[np.ndarray, np.ndarray],
             pre: dict[int, tuple[np.ndarray, np.ndarray]],
             bounds: dict[int, tuple[np.ndarray, np.ndarray]], last: int, neuron: int
             ) -> tuple[MilpProblem, int]:
    """LP of the cone of coordinate ``neuron`` of block ``last``'s output (triangle ReLUs)."""
    net = encoder.net
    # Backward: the coordinates of each block's output that the target depends on.
    need: dict[int, np.ndarray] = {last: np.array([neuron])}
    for i in range(last, -1, -1):
        idx = need[i]
        block = net.blocks[i]
        if block.is_relu:
            # A dead ReLU's output is 0 whatever its input: it leaves the cone.
            need[i - 1] = idx[pre[i][1][idx] > 0]
        elif type(block).milp is AffineBlock.milp:
            w, _ = encoder.matrix(i)
            need[i - 1] = np.unique(w[idx].indices)
        else:  # a reshape (Flatten): the same coordinates
            need[i - 1] = idx
    problem = MilpProblem()
    idx = need[-1]
    cols = problem.add_variables(box[0][idx], box[1][idx])
    for i in range(0, last + 1):
        block = net.blocks[i]
        if block.is_relu or type(block).milp is not AffineBlock.milp:
            # Elementwise or reshape: the same coordinates as the input (dead ReLUs dropped;
            # the next affine block reads only the live ones, the others being 0).
            need[i] = need[i - 1]
        prev, idx = need[i - 1], need[i]
        if block.is_relu:
            lo, up = pre[i]
            cols = block.milp(problem, cols, lo[idx], up[idx], (len(idx),),
                              *(b[idx] for b in bounds[i]))
        elif type(block).milp is AffineBlock.milp:
            w, bias = encoder.matrix(i)
            out_lo, out_up = pre[i + 1] if i + 1 in pre else bounds[i]
            cols = AffineBlock.milp(_Matrix(w[idx][:, prev], bias[idx]), problem, cols, None,
                                    None, (len(prev),), out_lo[idx], out_up[idx])
        else:
            cols = block.milp(problem, cols, None, None, (len(prev),), bounds[i][0][idx],
                              bounds[i][1][idx])
    return problem, int(cols[0])
