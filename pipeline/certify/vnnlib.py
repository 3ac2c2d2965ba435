"""Properties from VNN-LIB files (as in VNN-COMP): an input box and a disjunction of linear
constraints over the outputs, read exactly.

    from pipeline.certify.vnnlib import load_vnnlib
    prop = load_vnnlib("cifar10_spec_idx_0_eps_0.00784_n1.vnnlib.gz", input_shape=(3, 32, 32))
    prop.lower, prop.upper          # the input box, shaped like the input (C, H, W order)
    prop.disjuncts                  # unsafe iff some disjunct's  A y <= b  holds for some x
    prop.is_robustness_of()         # the label k if the property is "y_k is the argmax"

The CLI answers one property with ``python -m pipeline.certify --model NET.onnx --vnnlib
SPEC.vnnlib[.gz]`` (README); networks come from :mod:`pipeline.certify.onnx_import`.


VNN-LIB: declarations ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)``, box bounds on
each X_i, and assertions over Y that are any and/or nesting of linear atoms (<=, >=, <, >, = over
+, -, * by a constant), turned into a disjunction of conjunctions ``A y <= b`` (``< b`` for the
strict atoms). Numbers are read exactly (rationals): the float64 box is rounded outwards (it
contains the written one: certificates cover it) and A, b to nearest, while
:meth:`VnnlibProperty.contains` and :meth:`Disjunct.holds` decide a counterexample exactly as
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.certify.input_files import one_line, read_maybe_gzipped

__all__ = ["PropertyFormatError", "Disjunct", "VnnlibProperty", "load_vnnlib"]


class PropertyFormatError(ValueError):
    """A VNN-LIB file that cannot be parsed (one line: file, line, problem)."""


@dataclass(frozen=True, eq=False)
class Disjunct:
    """A conjunction of linear constraints ``A y <= b`` over the network outputs."""

    A: np.ndarray  # (m, n_outputs) float64
    b: np.ndarray  # (m,) float64
    strict: np.ndarray | None = None  # (m,) bool: the row is A_i y < b_i (from < or >)
    # The rows as written: per row ({output j: coefficient}, b) in exact rationals.
    exact: tuple[tuple[dict[int, Fraction], Fraction], ...] | None = None

    def holds(self, y: np.ndarray, tol: float = 0.0) -> bool:
        """Whether the output vector ``y`` satisfies every constraint (within ``tol``; strict
        rows strictly), in exact rational arithmetic on the values of y and the constraints as
        written (the float64 A, b when the rows were not parsed)."""
        yf = [Fraction(float(v)) for v in np.asarray(y, np.float64).reshape(-1)]
        strict = np.zeros(len(self.b), bool) if self.strict is None else self.strict
        rows = self.exact if self.exact is not None else tuple(
            ({j: Fraction(float(c)) for j, c in enumerate(a) if c != 0}, Fraction(float(b)))
            for a, b in zip(self.A, self.b))
        for (coefs, b), st in zip(rows, strict):
            value = sum((c * yf[j] for j, c in coefs.items()), Fraction(0)) - b \
                - Fraction(float(tol))
            if not (value < 0 if st else value <= 0):
                return False
        return True


@dataclass(frozen=True, eq=False)
class VnnlibProperty:
    """Unsafe (sat) iff some x in [lower, upper] gives outputs satisfying some disjunct."""

    lower: np.ndarray  # input_shape, float64 (rounded outwards)
    upper: np.ndarray  # input_shape, float64 (rounded outwards)
    disjuncts: tuple[Disjunct, ...]
    # The box as written: per input (lower, upper, lower strict, upper strict), exact.
    exact_box: tuple[tuple[Fraction, Fraction, bool, bool], ...] | None = None

    def contains(self, x: np.ndarray) -> bool:
        """Whether the input ``x`` lies in the box exactly as written (strict bounds strictly;
        the float64 box when it was not parsed)."""
        flat = np.asarray(x, np.float64).reshape(-1)
        if self.exact_box is None:
            return bool(np.all(flat >= self.lower.reshape(-1)) and
                        np.all(flat <= self.upper.reshape(-1)))
        for v, (lo, up, lo_strict, up_strict) in zip(flat, self.exact_box):
            if not math.isfinite(v):
                return False
            f = Fraction(float(v))
            if not ((f > lo if lo_strict else f >= lo) and (f < up if up_strict else f <= up)):
                return False
        return True

    @property
    def n_outputs(self) -> int:
        return int(self.disjuncts[0].A.shape[1]) if self.disjuncts else 0

    def is_violated_by(self, y: np.ndarray, tol: float = 0.0) -> bool:
        """Whether the output ``y`` (of an x in the box) is a counterexample."""
        return any(d.holds(y, tol) for d in self.disjuncts)

    def is_robustness_of(self) -> int | None:
        """The label k if the disjuncts are exactly {y_j >= y_k : j != k}, else None."""
        n = self.n_outputs
        if n < 2 or len(self.disjuncts) != n - 1:
            return None
        label, others = None, set()
        for d in self.disjuncts:
            if d.A.shape[0] != 1 or d.b[0] != 0 or (d.strict is not None and d.strict.any()):
                return None  # strict rows (Y_j > Y_k) go through the general path
            row = d.A[0]
            pos, neg = np.flatnonzero(row > 0), np.flatnonzero(row < 0)
            if len(pos) != 1 or len(neg) != 1 or row[pos[0]] != -row[neg[0]]:
                return None
            k, j = int(pos[0]), int(neg[0])  # -y_j + y_k <= 0  <=>  y_j >= y_k
            if label is None:
                label = k
            if k != label or j in others:
                return None
            others.add(j)
        if others != set(range(n)) - {label}:
            return None
        return label


class _SList(list):
    """A parsed s-expression list, with the text offset of its opening parenthesis."""

    __slots__ = ("pos",)


_TOKEN = re.compile(r";[^\n]*|\(|\)|[^\s();]+")
_VAR = re.compile(r"([XY])_(\d+)$")
_IGNORED = {"check-sat", "get-model", "set-logic", "set-info", "set-option", "exit",
            "declare-fun"}


class _Vnnlib:
    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text

    def line(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def error(self, pos: int | None, problem: str) -> PropertyFormatError:
        where = f"{self.path}:{self.line(pos)}" if pos is not None else f"{self.path}"
        return PropertyFormatError(one_line(f"{where}: {problem}"))

    def parse(self) -> list[_SList]:
        stack: list[_SList] = []
        top: list[_SList] = []
        for match in _TOKEN.finditer(self.text):
            tok = match.group()
            c = tok[0]
            if c == ";":
                continue
            if c == "(":
                node = _SList()
                node.pos = match.start()
                if stack:
                    stack[-1].append(node)
                stack.append(node)
            elif c == ")":
                if not stack:
                    raise self.error(match.start(), "unbalanced ')'")
                node = stack.pop()
                if not stack:
                    top.append(node)
            else:
                if not stack:
                    raise self.error(match.start(), f"token {tok!r} outside parentheses")
                stack[-1].append(tok)
        if stack:
            raise self.error(stack[-1].pos, "unbalanced '(' (not closed by the end of file)")
        return top


def _number(tok: str) -> Fraction | None:
    """The exact value of a numeral (decimal, exponent or a rational like 1/3)."""
    try:
        value = Fraction(tok)
    except (ValueError, ZeroDivisionError):
        return None
    return value if abs(value) <= _FLOAT_MAX else None  # beyond float64: unusable


_FLOAT_MAX = Fraction(np.finfo(np.float64).max)


def _outward(value: Fraction, up: bool) -> float:
    """The float64 nearest ``value`` on the outside: >= value if ``up``, else <= value."""
    f = float(value)
    if up and Fraction(f) < value:
        f = float(np.nextafter(f, np.inf))
    elif not up and Fraction(f) > value:
        f = float(np.nextafter(f, -np.inf))
    return f


def load_vnnlib(path: str | Path, input_shape: tuple[int, ...]) -> VnnlibProperty:
    """A VNN-LIB property (plain or gzipped) over a network with the given input shape."""
    path = Path(path)
    input_shape = tuple(int(s) for s in input_shape)
    data = read_maybe_gzipped(path, PropertyFormatError, "bad gzip data ({err})",
                              gz_suffix=True)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PropertyFormatError(one_line(f"{path}: not a text file ({err})")) from None
    doc = _Vnnlib(path, text)
    commands = doc.parse()

    n_inputs = int(np.prod(input_shape))
    declared: dict[str, dict[int, int]] = {"X": {}, "Y": {}}  # kind -> index -> pos
    assertions: list[tuple[Any, int]] = []
    for cmd in commands:
        if not cmd or not isinstance(cmd[0], str):
            raise doc.error(cmd.pos, "expected a command like (declare-const ...) or (assert ...)")
        head = cmd[0]
        if head == "declare-const":
            if len(cmd) != 3 or not isinstance(cmd[1], str) or cmd[2] != "Real":
                raise doc.error(cmd.pos, "expected (declare-const <X_i|Y_j> Real)")
            m = _VAR.match(cmd[1])
            if not m:
                raise doc.error(cmd.pos, f"variable {cmd[1]!r}: only X_<i> (inputs) and Y_<j> "
                                         "(outputs) are supported")
            kind, idx = m.group(1), int(m.group(2))
            if idx in declared[kind]:
                raise doc.error(cmd.pos, f"{cmd[1]} declared twice")
            declared[kind][idx] = cmd.pos
        elif head == "assert":
            if len(cmd) != 2:
                raise doc.error(cmd.pos, "expected (assert <formula>)")
            assertions.append((cmd[1], cmd.pos))
        elif head in _IGNORED:
            if head == "declare-fun":
                raise doc.error(cmd.pos, "declare-fun is unsupported (use declare-const)")
        else:
            raise doc.error(cmd.pos, f"unsupported command {head!r}")

    xs, ys = declared["X"], declared["Y"]
    if len(xs) != n_inputs or (xs and max(xs) != len(xs) - 1):
        raise doc.error(None, f"declares {len(xs)} input variables X_i (indices "
                              f"{min(xs, default=None)}..{max(xs, default=None)}), but the "
                              f"input shape {input_shape} needs X_0..X_{n_inputs - 1}")
    if not ys or max(ys) != len(ys) - 1:
        raise doc.error(None, f"declares {len(ys)} output variables; expected Y_0..Y_<m-1> "
                              "with m >= 1")
    n_out = len(ys)

    lower = np.full(n_inputs, -np.inf)
    upper = np.full(n_inputs, np.inf)
    exact_lower: list[tuple[Fraction, bool] | None] = [None] * n_inputs
    exact_upper: list[tuple[Fraction, bool] | None] = [None] * n_inputs
    # Output constraint: a conjunction (over assertions) of DNFs; each DNF a list of row lists.
    output_dnfs: list[list[list[tuple[np.ndarray, float, bool]]]] = []

    def linear(expr: Any, pos: int) -> tuple[dict[tuple[str, int], float], float]:
        """A linear term as ({(kind, index): coefficient}, constant)."""
        if isinstance(expr, str):
            value = _number(expr)
            if value is not None:
                return {}, value
            m = _VAR.match(expr)
            if not m:
                raise doc.error(pos, f"unknown symbol {expr!r}")
            kind, idx = m.group(1), int(m.group(2))
            if idx not in declared[kind]:
                raise doc.error(pos, f"undeclared variable {expr}")
            return {(kind, idx): Fraction(1)}, Fraction(0)
        if not expr or not isinstance(expr[0], str):
            raise doc.error(expr.pos, "expected a term")
        op, args = expr[0], [linear(a, getattr(a, "pos", pos)) for a in expr[1:]]
        if not args:
            raise doc.error(expr.pos, f"({op}) without arguments")
        if op == "+" or (op == "-" and len(args) > 1):
            coefs, const = dict(args[0][0]), args[0][1]
            sign = 1 if op == "+" else -1
            for c, k in args[1:]:
                for var, v in c.items():
                    coefs[var] = coefs.get(var, Fraction(0)) + sign * v
                const += sign * k
            return coefs, const
        if op == "-":
            return {var: -v for var, v in args[0][0].items()}, -args[0][1]
        if op == "*":
            coefs, const = {}, Fraction(1)
            for c, k in args:
                if c and coefs:
                    raise doc.error(expr.pos, "non-linear product of variables")
                if c:
                    coefs = {var: v * const for var, v in c.items()}
                    const = k * const
                else:
                    coefs = {var: v * k for var, v in coefs.items()}
                    const *= k
            return coefs, const
        if op == "/" and len(args) == 2 and not args[1][0] and args[1][1] != 0:
            d = args[1][1]
            return {var: v / d for var, v in args[0][0].items()}, args[0][1] / d
        raise doc.error(expr.pos, f"unsupported term operator {op!r} (only + - * / by "
                                  "constants)")

    def atom_rows(expr: _SList) -> tuple[str | None, list[tuple[dict, float]]]:
        """(kind 'X'/'Y'/None, rows (coefs, b) meaning coefs . v <= b, or < b for < and >)."""
        op = expr[0]
        if len(expr) != 3:
            raise doc.error(expr.pos, f"({op} ...) needs exactly two arguments")
        (lc, lk), (rc, rk) = linear(expr[1], expr.pos), linear(expr[2], expr.pos)
        diff = dict(lc)
        for var, v in rc.items():
            diff[var] = diff.get(var, Fraction(0)) - v
        diff = {var: v for var, v in diff.items() if v != 0}
        b = rk - lk  # L - R <= 0  <=>  (lc - rc) . v <= rk - lk
        rows: list[tuple[dict, float]]
        if op in ("<=", "<"):
            rows = [(diff, b)]
        elif op in (">=", ">"):
            rows = [({var: -v for var, v in diff.items()}, -b)]
        else:  # "="
            rows = [(diff, b), ({var: -v for var, v in diff.items()}, -b)]
        kinds = {var[0] for var in diff}
        if len(kinds) > 1:
            raise doc.error(expr.pos, "constraint mixes inputs X and outputs Y")
        return (kinds.pop() if kinds else None), rows

    def input_bound(rows: list[tuple[dict, float]], pos: int, strict: bool = False) -> None:
        for coefs, b in rows:
            if len(coefs) != 1:
                raise doc.error(pos, "input constraints must bound a single X_i by a constant")
            ((_, idx), a), = coefs.items()
            edge = b / a
            # The tightest bound wins; at equal values a strict one (X_i < c excludes c).
            if a > 0:
                old = exact_upper[idx]
                if old is None or edge < old[0] or (edge == old[0] and strict):
                    exact_upper[idx] = (edge, strict)
                upper[idx] = _outward(exact_upper[idx][0], up=True)
            else:
                old = exact_lower[idx]
                if old is None or edge > old[0] or (edge == old[0] and strict):
                    exact_lower[idx] = (edge, strict)
                lower[idx] = _outward(exact_lower[idx][0], up=False)

    def output_dnf(expr: Any) -> list[list[tuple[np.ndarray, float, bool]]]:
        if not isinstance(expr, _SList) or not expr or not isinstance(expr[0], str):
            pos = getattr(expr, "pos", None)
            raise doc.error(pos if pos is not None else 0, f"expected a formula, got {expr!r}")
        op = expr[0]
        if op in ("<=", ">=", "<", ">", "="):
            kind, rows = atom_rows(expr)
            if kind == "X":
                raise doc.error(expr.pos, "input constraints inside or/and over outputs are "
                                          "unsupported (inputs must be a box)")
            dense = []
            for coefs, b in rows:
                a = np.zeros(n_out)
                for (_, j), v in coefs.items():
                    a[j] = float(v)
                exact = ({j: v for (_, j), v in coefs.items()}, b)
                dense.append((a, float(b), op in ("<", ">"), exact))
            return [dense]
        if op == "and":
            result: list[list[tuple[np.ndarray, float, bool]]] = [[]]
            for sub in expr[1:]:
                result = [r + s for r in result for s in output_dnf(sub)]
                if len(result) > 100_000:
                    raise doc.error(expr.pos, "disjunctive normal form too large")
            return result
        if op == "or":
            if len(expr) == 1:
                raise doc.error(expr.pos, "empty (or)")
            return [d for sub in expr[1:] for d in output_dnf(sub)]
        raise doc.error(expr.pos, f"unsupported formula operator {op!r} (only and, or, <=, >=, "
                                  "<, >, =)")

    def collect(expr: Any, pos: int) -> None:
        """Split top-level conjunctions; input atoms become bounds, the rest output DNFs."""
        if isinstance(expr, _SList) and expr and expr[0] == "and":
            for sub in expr[1:]:
                collect(sub, getattr(sub, "pos", pos))
            return
        if isinstance(expr, _SList) and expr and expr[0] in ("<=", ">=", "<", ">", "="):
            kind, rows = atom_rows(expr)
            if kind == "X":
                input_bound(rows, expr.pos, strict=expr[0] in ("<", ">"))
                return
            if kind is None:
                raise doc.error(expr.pos, "constraint without variables")
        if isinstance(expr, str):
            raise doc.error(pos, f"expected a formula, got {expr!r}")
        output_dnfs.append(output_dnf(expr))

    for formula, pos in assertions:
        collect(formula, pos)

    missing_lo, missing_up = np.flatnonzero(~np.isfinite(lower)), np.flatnonzero(
        ~np.isfinite(upper))
    if len(missing_lo) or len(missing_up):
        which = "lower" if len(missing_lo) else "upper"
        first = int((missing_lo if len(missing_lo) else missing_up)[0])
        count = len(set(missing_lo) | set(missing_up))
        raise doc.error(None, f"missing {which} bound for X_{first} ({count} input variables "
                              "without both bounds)")
    empty = np.flatnonzero(lower > upper)
    empty_exact = [i for i, (lo, up) in enumerate(zip(exact_lower, exact_upper))
                   if lo[0] > up[0] or (lo[0] == up[0] and (lo[1] or up[1]))]
    if empty_exact and not len(empty):
        i = empty_exact[0]
        raise doc.error(None, f"empty input box: X_{i} in {'(' if exact_lower[i][1] else '['}"
                              f"{float(exact_lower[i][0])}, {float(exact_upper[i][0])}"
                              f"{')' if exact_upper[i][1] else ']'}")
    if len(empty):
        i = int(empty[0])
        raise doc.error(None, f"empty input box: X_{i} in [{lower[i]}, {upper[i]}]")
    if not output_dnfs:
        raise doc.error(None, "no assertion over the outputs Y")

    dnf: list[list[tuple[np.ndarray, float, bool]]] = [[]]
    for part in output_dnfs:
        dnf = [r + s for r in dnf for s in part]
        if len(dnf) > 100_000:
            raise doc.error(None, "disjunctive normal form too large")
    disjuncts = []
    for rows in dnf:
        a = np.array([r[0] for r in rows], np.float64).reshape(len(rows), n_out)
        b = np.array([r[1] for r in rows], np.float64)
        strict = np.array([r[2] for r in rows], bool)
        a.flags.writeable = False
        b.flags.writeable = False
        strict.flags.writeable = False
        disjuncts.append(Disjunct(a, b, strict, tuple(r[3] for r in rows)))
    lower = lower.reshape(input_shape)
    upper = upper.reshape(input_shape)
    lower.flags.writeable = False
    upper.flags.writeable = False
    exact_box = tuple((lo[0], up[0], lo[1], up[1]) for lo, up in zip(exact_lower, exact_upper))
    return VnnlibProperty(lower, upper, tuple(disjuncts), exact_box)
