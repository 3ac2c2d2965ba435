"""Solver-neutral MILP/LP layer used by the certifier.

The certifier encodes a (network, input region, property) query as a mixed-integer
linear programme and only needs to know the sign of its minimum.  This module lets
the encoder accumulate the problem without committing to a solver:

    problem = MilpProblem()
    x = problem.add_variables(lower, upper)                  # continuous columns
    d = problem.add_variables(np.zeros(k), np.ones(k), integer=True)
    problem.add_rows(A, columns=np.concatenate([x, d]), lower=lo, upper=hi)
    problem.set_objective(x[:1], np.array([1.0]))            # always minimised
    result = solve(problem, solver="auto", time_limit_s=30.0, stop_when_bound_above=0.0)
    if result.bound > 0: ...                                   # property certified

The problem is built into a backend only inside :func:`solve`, so when Gurobi turns
out to be unusable (gurobipy missing, no/expired licence, or the pip wheel's
size-limited licence refusing the model with error 10010) the very same problem is
rebuilt for HiGHS (highspy), which is the default backend.

Soundness contract: ``SolveResult.bound`` is always a valid lower bound on the
minimum: for a MIP the solver's dual bound (Gurobi ObjBound, HiGHS mip_dual_bound);
for an LP never the primal objective but the bound the solver's dual solution proves
(:func:`lp_dual_bound`, weak duality evaluated in float64 with outward rounding, valid
for any dual vector, so also at an iteration or time limit); -inf when nothing is
known; +inf only when the solver proved infeasibility.  Solver trouble never raises:
it is reported as status ``"error"``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

Status = Literal[
    "optimal", "stopped_positive", "stopped_negative", "time_limit", "iteration_limit",
    "infeasible", "error"
]
SolverName = Literal["highs", "gurobi", "auto"]

# Size limits of Gurobi's pip-wheel ("size-limited") licence.
GUROBI_RESTRICTED_MAX_VARS = 2000
GUROBI_RESTRICTED_MAX_ROWS = 2000
# Gurobi error code raised at optimize() when the size-limited licence is exceeded.
_GUROBI_SIZE_LIMIT_ERRNO = 10010
# GRB_ERROR_NO_LICENSE: licence trouble surfacing after the Env was created.
_GUROBI_LICENCE_ERRNOS = (10009,)

# Certification only needs the sign of the optimum, but callers that ask for an exact
# optimum (and the HiGHS/Gurobi cross-checks) want both backends to close the gap
# completely rather than stop at their default 1e-4 relative gap.
MIP_REL_GAP = 0.0
MIP_ABS_GAP = 1e-9

# Gurobi represents infinity as 1e100; anything beyond this is treated as infinite.
_GRB_INF = 1e100


# --------------------------------------------------------------------------------------
# Problem container
# --------------------------------------------------------------------------------------


@dataclass
class MilpProblem:
    """Accumulates variables, rows and an objective; solver-neutral.

    Columns are numbered 0..num_variables-1 in the order they are added.  Rows are
    stored in blocks (as given) and assembled into one CSR matrix lazily, once, at
    solve time; the assembled form is cached so a Gurobi->HiGHS fallback does not
    pay for it twice.
    """

    _lower: list[np.ndarray] = field(default_factory=list, repr=False)
    _upper: list[np.ndarray] = field(default_factory=list, repr=False)
    _integer: list[np.ndarray] = field(default_factory=list, repr=False)
    _priority: list[np.ndarray] = field(default_factory=list, repr=False)
    _n: int = 0
    # Row blocks as (global row indices, global column indices, values, lower, upper)
    _row_blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=list, repr=False
    )
    _m: int = 0
    _n_int: int = 0
    _obj_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    _obj_vals: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    _obj_const: float = 0.0
    _compiled: _Compiled | None = field(default=None, repr=False)

    # ----- building --------------------------------------------------------------------

    def add_variables(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        integer: bool = False,
        priority: np.ndarray | None = None,
    ) -> np.ndarray:
        """Add ``len(lower)`` columns with bounds; return their int64 column indices.

        ``priority`` (integer columns only; higher branches first) is passed to Gurobi's
        BranchPriority.  HiGHS has no branching-priority API, so it is ignored there.
        """
        lo = np.atleast_1d(np.asarray(lower, dtype=np.float64)).ravel()
        up = np.atleast_1d(np.asarray(upper, dtype=np.float64)).ravel()
        if lo.shape != up.shape:
            raise ValueError(f"lower/upper shapes differ: {lo.shape} vs {up.shape}")
        k = lo.size
        if priority is None:
            pr = np.zeros(k, dtype=np.int64)
        else:
            pr = np.asarray(priority).ravel().astype(np.int64)
            if pr.size != k:
                raise ValueError(f"priority has {pr.size} entries, expected {k}")
        self._lower.append(lo.copy())
        self._upper.append(up.copy())
        self._integer.append(np.full(k, bool(integer)))
        self._priority.append(pr)
        idx = np.arange(self._n, self._n + k, dtype=np.int64)
        self._n += k
        if integer:
            self._n_int += k
        self._compiled = None
        return idx

    def add_rows(
        self,
        matrix,
        columns: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
    ) -> None:
        """Add rows ``lower <= matrix @ x[columns] <= upper``.

        ``matrix`` is any scipy.sparse matrix (or dense array) of shape (m, len(columns)).
        Use -inf/inf for one-sided rows; lower == upper gives an equality.  Duplicate
        entries (also via repeated columns) are summed.
        """
        cols = np.asarray(columns, dtype=np.int64).ravel()
        coo = sp.coo_matrix(matrix, dtype=np.float64)
        m, n = coo.shape
        if n != cols.size:
            raise ValueError(f"matrix has {n} columns but {cols.size} column indices given")
        if cols.size and (cols.min() < 0 or cols.max() >= self._n):
            raise ValueError("column index out of range")
        lo = np.broadcast_to(np.asarray(lower, dtype=np.float64).ravel(), (m,)).copy()
        up = np.broadcast_to(np.asarray(upper, dtype=np.float64).ravel(), (m,)).copy()
        if m == 0:
            return
        self._row_blocks.append(
            (
                coo.row.astype(np.int64) + self._m,
                cols[coo.col.astype(np.int64)],
                coo.data.astype(np.float64),
                lo,
                up,
            )
        )
        self._m += m
        self._compiled = None

    def set_objective(
        self, columns: np.ndarray, coefficients: np.ndarray, constant: float = 0.0
    ) -> None:
        """Set (replace) the objective ``constant + coefficients @ x[columns]`` (minimised)."""
        cols = np.asarray(columns, dtype=np.int64).ravel()
        vals = np.asarray(coefficients, dtype=np.float64).ravel()
        if cols.shape != vals.shape:
            raise ValueError("columns and coefficients must have the same length")
        if cols.size and (cols.min() < 0 or cols.max() >= self._n):
            raise ValueError("objective column index out of range")
        self._obj_cols = cols.copy()
        self._obj_vals = vals.copy()
        self._obj_const = float(constant)
        self._compiled = None

    # ----- sizes -----------------------------------------------------------------------

    @property
    def num_variables(self) -> int:
        return self._n

    @property
    def num_rows(self) -> int:
        return self._m

    @property
    def num_integer(self) -> int:
        return self._n_int

    # ----- assembly --------------------------------------------------------------------

    def _compile(self) -> _Compiled:
        if self._compiled is not None:
            return self._compiled
        n, m = self._n, self._m

        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        lower = cat(self._lower, np.float64)
        upper = cat(self._upper, np.float64)
        integer = cat(self._integer, bool)
        priority = cat(self._priority, np.int64)
        if self._row_blocks:
            r = np.concatenate([b[0] for b in self._row_blocks])
            c = np.concatenate([b[1] for b in self._row_blocks])
            v = np.concatenate([b[2] for b in self._row_blocks])
            row_lower = np.concatenate([b[3] for b in self._row_blocks])
            row_upper = np.concatenate([b[4] for b in self._row_blocks])
        else:
            r = c = np.zeros(0, dtype=np.int64)
            v = row_lower = row_upper = np.zeros(0)
        # csr_matrix from COO triplets sums duplicates, which is the documented semantics.
        a = sp.csr_matrix((v, (r, c)), shape=(m, n), dtype=np.float64)
        a.sum_duplicates()
        cost = np.zeros(n)
        np.add.at(cost, self._obj_cols, self._obj_vals)
        self._compiled = _Compiled(
            lower=lower,
            upper=upper,
            integer=integer,
            priority=priority,
            a=a,
            row_lower=row_lower,
            row_upper=row_upper,
            cost=cost,
            constant=self._obj_const,
        )
        return self._compiled


@dataclass(frozen=True)
class _Compiled:
    lower: np.ndarray
    upper: np.ndarray
    integer: np.ndarray
    priority: np.ndarray
    a: sp.csr_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    cost: np.ndarray
    constant: float

    @property
    def is_mip(self) -> bool:
        return bool(self.integer.any())


@dataclass(frozen=True)
class SolveResult:
    """Outcome of :func:`solve`.

    bound: valid lower bound on the minimum (-inf if none known, +inf if infeasible).
    value: objective of the best feasible solution found, or None.
    solution: the column values of that solution (None without one); callers turn it into a
    candidate counterexample, which they must confirm themselves.
    """

    status: Status
    bound: float
    value: float | None
    solver: str
    runtime_s: float
    message: str = ""
    solution: np.ndarray | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------------
# Bounds proved by a dual solution
# --------------------------------------------------------------------------------------


def lp_dual_bound(c: _Compiled, y: np.ndarray) -> float:
    """A lower bound on min cost·x + constant s.t. row_lower <= A x <= row_upper,
    lower <= x <= upper that any row multipliers ``y`` prove (weak duality).

    For every feasible x: cost·x = (cost - A^T y)·x + y·(A x), and y_i (A x)_i >= y_i
    row_lower_i for y_i > 0 (row_upper_i for y_i < 0); the first term is at least its
    minimum over the box. A multiplier whose side of the row is infinite is dropped
    (set to 0). Everything is evaluated in float64 with outward rounding: the reduced
    costs as intervals of the summation's error bound, the final sum lowered by its
    own. Solvers differ in the sign convention of their duals, so both signs of ``y``
    are tried (each gives a valid bound). -inf when no finite bound follows.
    """
    y = np.asarray(y, np.float64).reshape(-1)
    if y.size != c.a.shape[0] or not np.all(np.isfinite(y)):
        return -math.inf
    return max(_dual_bound_one(c, y), _dual_bound_one(c, -y))


_U64 = 2.0 ** -53


def _gamma64(n: int) -> float:
    return n * _U64 / (1 - n * _U64)


def _dual_bound_one(c: _Compiled, y: np.ndarray) -> float:
    y = np.where((y > 0) & ~np.isfinite(c.row_lower), 0.0, y)
    y = np.where((y < 0) & ~np.isfinite(c.row_upper), 0.0, y)
    with np.errstate(invalid="ignore", over="ignore"):
        row_terms = np.where(y > 0, y * c.row_lower, np.where(y < 0, y * c.row_upper, 0.0))
        a = c.a.tocsc()
        k = int(np.diff(a.indptr).max()) if a.shape[1] and a.nnz else 0
        reduced = c.cost - a.T @ y
        # |fl(cost - A^T y) - (cost - A^T y)| <= γ_{k+1} (|cost| + |A|^T |y|)
        err = _gamma64(k + 2) * (np.abs(c.cost) + abs(a).T @ np.abs(y))
        # ... and the subtraction/addition of err below rounds once more.
        err = err * (1 + 2.0 ** -40) + 2 * _U64 * np.abs(reduced) + 2.0 ** -1000
        r_lo, r_hi = reduced - err, reduced + err
        corners = np.stack([r_lo * c.lower, r_lo * c.upper, r_hi * c.lower, r_hi * c.upper])
        # 0 * inf: that endpoint of the reduced cost is exactly 0, so is its product.
        corners = np.where(np.isnan(corners), 0.0, corners)
        col_terms = corners.min(0)
    terms = np.concatenate([row_terms, col_terms, [c.constant]])
    if not np.all(np.isfinite(terms)):
        return -math.inf
    total = float(math.fsum(terms))  # correctly rounded
    # Each product above was rounded once (relative u); fsum rounds once more.
    slack = _gamma64(2) * float(np.abs(terms).sum()) * (1 + 2.0 ** -40) + 2.0 ** -1000
    bound = float(np.nextafter(total - slack, -np.inf))
    return bound if math.isfinite(bound) else -math.inf


# --------------------------------------------------------------------------------------
# Gurobi availability
# --------------------------------------------------------------------------------------

_gurobi_lock = threading.Lock()
_gurobi_checked = False
_gurobi_ok = False
_gurobi_reason = ""
_gurobi_env = None  # Env created by gurobi_available(), reused by the thread that made it
_gurobi_thread_envs = threading.local()  # Gurobi envs must not be shared across threads
# None: unknown; True: the licence is the size-limited one; False: unrestricted.
_gurobi_size_limited: bool | None = None
_warned_once: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    with _gurobi_lock:
        if key in _warned_once:
            return
        _warned_once.add(key)
    logger.warning(msg)


def gurobi_available() -> bool:
    """True iff gurobipy imports and a licence lets us create an Env.  Cached; never raises."""
    global _gurobi_checked, _gurobi_ok, _gurobi_reason, _gurobi_env
    with _gurobi_lock:
        if _gurobi_checked:
            return _gurobi_ok
        try:
            import gurobipy as gp

            # An explicit Env with OutputFlag 0 keeps the licence banner off stdout.
            _gurobi_env = gp.Env(params={"OutputFlag": 0})
            _gurobi_thread_envs.env = _gurobi_env
            _gurobi_ok = True
        except ImportError as exc:
            _gurobi_ok, _gurobi_reason = False, f"gurobipy not importable ({exc})"
        except Exception as exc:  # GurobiError: missing/expired/broken licence
            _gurobi_ok, _gurobi_reason = False, f"no usable Gurobi licence ({exc})"
        _gurobi_checked = True
        return _gurobi_ok


def _thread_env():
    """The calling thread's Gurobi Env (created on first use; OutputFlag 0, no banner)."""
    env = getattr(_gurobi_thread_envs, "env", None)
    if env is None:
        import gurobipy as gp

        env = gp.Env(params={"OutputFlag": 0})
        _gurobi_thread_envs.env = env
    return env


def _gurobi_licence_is_size_limited() -> bool:
    """Probe (once) whether the licence is the size-limited pip one.

    An empty model one variable over the limit costs microseconds and answers with
    error 10010 under the restricted licence, which avoids building a large model
    just to learn that it will be refused.
    """
    global _gurobi_size_limited
    if _gurobi_size_limited is not None:
        return _gurobi_size_limited
    limited = False
    try:
        import gurobipy as gp

        with gp.Model(env=_thread_env()) as probe:
            probe.addMVar(GUROBI_RESTRICTED_MAX_VARS + 1, lb=0.0, ub=1.0)
            probe.optimize()
    except Exception as exc:
        limited = getattr(exc, "errno", None) == _GUROBI_SIZE_LIMIT_ERRNO
    _gurobi_size_limited = limited
    return limited


def _fits_restricted(c: _Compiled) -> bool:
    return (
        c.lower.size <= GUROBI_RESTRICTED_MAX_VARS
        and _gurobi_row_count(c) <= GUROBI_RESTRICTED_MAX_ROWS
    )


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def solve(
    problem: MilpProblem,
    solver: SolverName = "highs",
    time_limit_s: float = 60.0,
    stop_when_bound_above: float | None = None,
    stop_when_value_below: float | None = None,
    threads: int = 1,
    iteration_limit: int | None = None,
) -> SolveResult:
    """Minimise ``problem``.

    ``iteration_limit`` caps the simplex iterations of an LP (HiGHS
    simplex_iteration_limit, Gurobi IterationLimit); the bound then comes from the
    dual solution reached (status "iteration_limit").

    Early termination (MIPs only; an LP is simply solved): with
    ``stop_when_bound_above=t`` the search stops as soon as the dual bound exceeds t
    (status "stopped_positive"); with ``stop_when_value_below=t`` it stops as soon as an
    incumbent with objective below t is found ("stopped_negative").  If the solver
    reaches optimality first, the status is "optimal".
    """
    t0 = time.perf_counter()
    try:
        compiled = problem._compile()
    except Exception as exc:  # malformed input that slipped past add_*: report, don't raise
        return SolveResult("error", -math.inf, None, str(solver), time.perf_counter() - t0,
                           f"could not assemble problem: {exc}")
    args = (compiled, float(time_limit_s), stop_when_bound_above, stop_when_value_below,
            int(threads), iteration_limit)

    if solver not in ("highs", "gurobi", "auto"):
        return SolveResult("error", -math.inf, None, str(solver), 0.0,
                           f"unknown solver {solver!r}")

    use_gurobi = False
    if solver == "gurobi":
        if gurobi_available():
            use_gurobi = True
        else:
            _warn_once("gurobi-unavailable",
                       f"Gurobi requested but unavailable: {_gurobi_reason}; using HiGHS")
    elif solver == "auto" and gurobi_available():
        # With the size-limited licence only small models can go to Gurobi.
        use_gurobi = _fits_restricted(compiled) or not _gurobi_licence_is_size_limited()

    if use_gurobi and solver == "gurobi" and _gurobi_size_limited and \
            not _fits_restricted(compiled):
        # Already known to be refused (error 10010): skip building the Gurobi model.
        logger.warning("Gurobi failed (model too large for size-limited licence: %d vars, "
                       "%d rows); falling back to HiGHS",
                       compiled.lower.size, _gurobi_row_count(compiled))
        use_gurobi = False

    if use_gurobi:
        try:
            res = _solve_gurobi(*args)
            return _with_runtime(res, t0)
        except _GurobiFallback as fb:
            if fb.once_key is not None:
                _warn_once(fb.once_key, f"Gurobi failed ({fb.reason}); falling back to HiGHS")
            else:
                logger.warning("Gurobi failed (%s); falling back to HiGHS", fb.reason)

    return _with_runtime(_solve_highs(*args), t0)


def _with_runtime(res: SolveResult, t0: float) -> SolveResult:
    # Report wall time of the whole call, including model building and any fallback.
    return SolveResult(res.status, res.bound, res.value, res.solver,
                       time.perf_counter() - t0, res.message, res.solution)


# --------------------------------------------------------------------------------------
# HiGHS backend
# --------------------------------------------------------------------------------------


_QUIET_HIGHS = None


def _quiet_highs_class(highspy):
    """A highspy.Highs whose constructor prints nothing.

    highspy.Highs.__init__ registers its callback trampoline (setCallback) while
    output_flag is still at its default True, which makes HiGHS print its two-line
    banner on stdout once per process.  Switching output off just before that call
    keeps stdout clean for the CLI.
    """
    global _QUIET_HIGHS
    if _QUIET_HIGHS is None:

        class _QuietHighs(highspy.Highs):
            def enableCallbacks(self):
                self.setOptionValue("output_flag", False)
                super().enableCallbacks()

        _QUIET_HIGHS = _QuietHighs
    return _QUIET_HIGHS


def _solve_highs(
    c: _Compiled,
    time_limit_s: float,
    stop_bound: float | None,
    stop_value: float | None,
    threads: int,
    iteration_limit: int | None = None,
) -> SolveResult:
    try:
        import highspy
    except ImportError as exc:
        return SolveResult("error", -math.inf, None, "highs", 0.0, f"highspy missing: {exc}")

    is_mip = c.is_mip
    state: dict = {"why": None, "bound": -math.inf, "value": math.inf}
    try:
        h = _quiet_highs_class(highspy)()
        h.setOptionValue("threads", int(threads))
        if math.isfinite(time_limit_s):
            h.setOptionValue("time_limit", max(float(time_limit_s), 0.0))
        h.setOptionValue("mip_rel_gap", MIP_REL_GAP)
        h.setOptionValue("mip_abs_gap", MIP_ABS_GAP)
        if iteration_limit is not None:
            h.setOptionValue("simplex_iteration_limit", int(iteration_limit))

        n, m = c.lower.size, c.a.shape[0]
        if n:
            h.addVars(n, c.lower, c.upper)
        if m:
            a = c.a
            h.addRows(
                m, c.row_lower, c.row_upper, int(a.nnz),
                a.indptr[:-1].astype(np.int32), a.indices.astype(np.int32),
                a.data.astype(np.float64),
            )
        if is_mip:
            idx = np.flatnonzero(c.integer).astype(np.int32)
            # HighsVarType.kInteger == 1
            h.changeColsIntegrality(idx.size, idx, np.ones(idx.size, dtype=np.uint8))
        nz = np.flatnonzero(c.cost).astype(np.int32)
        if nz.size:
            h.changeColsCost(nz.size, nz, c.cost[nz])
        if c.constant:
            h.changeObjectiveOffset(c.constant)

        if is_mip and (stop_bound is not None or stop_value is not None):
            # cbMipInterrupt fires regularly during branch and bound; data_out carries
            # the current global dual bound / incumbent in the original objective
            # space (offset included), and e.interrupt() sets data_in.user_interrupt.
            def on_mip_interrupt(e) -> None:
                try:
                    out = e.data_out
                    dual, primal = float(out.mip_dual_bound), float(out.mip_primal_bound)
                    if stop_bound is not None and dual > stop_bound:
                        state["why"], state["bound"] = "positive", dual
                        e.interrupt()
                    elif stop_value is not None and primal < stop_value:
                        state["why"], state["value"] = "negative", primal
                        e.interrupt()
                except Exception:  # never let a callback error escape into the C++ solver
                    pass

            h.cbMipInterrupt.subscribe(on_mip_interrupt)

        run_status = h.run()
        if run_status == highspy.HighsStatus.kError and \
                h.getModelStatus() == highspy.HighsModelStatus.kNotset:
            # HiGHS's global thread scheduler is created once per process with the
            # first `threads` value seen; a different value later makes run() fail
            # immediately.  Recreate the scheduler and try once more.
            highspy.Highs.resetGlobalScheduler(True)
            run_status = h.run()
        if is_mip and h.getModelStatus() == highspy.HighsModelStatus.kInfeasible:
            # HiGHS's MIP presolve has declared feasible certification models (big-M ReLUs
            # over ~20k columns) infeasible. Infeasibility must be proved, so check the claim
            # once without presolve, in the time that is left.
            left = time_limit_s - h.getRunTime()
            if left > 0:
                h.setOptionValue("presolve", "off")
                h.setOptionValue("time_limit", left)
                h.clearSolver()
                run_status = h.run()

        ms = h.getModelStatus()
        info = h.getInfo()
        lp_bound = -math.inf
        if not is_mip and info.dual_solution_status != highspy.SolutionStatus.kSolutionStatusNone:
            lp_bound = lp_dual_bound(c, np.asarray(h.getSolution().row_dual, np.float64))
    except Exception as exc:
        return SolveResult("error", -math.inf, None, "highs", 0.0, f"HiGHS raised: {exc}")

    MS = highspy.HighsModelStatus
    has_sol = info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible
    value = float(info.objective_function_value) if has_sol else None
    solution = np.asarray(h.getSolution().col_value, dtype=np.float64) if has_sol else None
    mip_bound = float(info.mip_dual_bound) if is_mip else -math.inf
    if is_mip and (math.isnan(mip_bound) or mip_bound >= math.inf):
        mip_bound = -math.inf  # no meaningful dual bound reported
    msg = h.modelStatusToString(ms)

    if ms == MS.kOptimal:
        if is_mip:
            return SolveResult("optimal", mip_bound, value, "highs", 0.0, msg, solution)
        # LP solved to optimality: the bound its dual solution proves (not the objective).
        return SolveResult("optimal", lp_bound, value, "highs", 0.0, msg, solution)
    if ms == MS.kModelEmpty:
        # No rows and no columns: the minimum is the constant.
        return SolveResult("optimal", c.constant, c.constant, "highs", 0.0, msg, solution)
    if ms == MS.kInfeasible:
        return SolveResult("infeasible", math.inf, None, "highs", 0.0, msg, solution)
    if ms == MS.kInterrupt and state["why"] == "positive":
        # Both numbers are valid lower bounds; the final one can only be tighter.
        return SolveResult("stopped_positive", max(mip_bound, state["bound"]), value,
                           "highs", 0.0, msg, solution)
    if ms == MS.kInterrupt and state["why"] == "negative":
        if value is None or value >= state["value"] + 1e-12:
            value = state["value"]
        return SolveResult("stopped_negative", mip_bound, value, "highs", 0.0, msg, solution)
    if ms == MS.kTimeLimit:
        return SolveResult("time_limit", mip_bound if is_mip else lp_bound, value, "highs", 0.0,
                           msg, solution)
    if ms == MS.kIterationLimit and not is_mip:
        return SolveResult("iteration_limit", lp_bound, value, "highs", 0.0, msg, solution)
    # Unbounded, unbounded-or-infeasible, iteration limit, solver failure...: claim
    # nothing (no bound, no incumbent) so that no caller can mistake it for a result.
    return SolveResult("error", -math.inf, None, "highs", 0.0,
                       f"HiGHS model status: {msg} (run status {run_status})")


# --------------------------------------------------------------------------------------
# Gurobi backend
# --------------------------------------------------------------------------------------


class _GurobiFallback(Exception):
    def __init__(self, reason: str, once_key: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.once_key = once_key  # log this reason only once per process when set


def _gurobi_row_split(c: _Compiled):
    """Gurobi rows are one-sided or equalities; ranged rows become two rows."""
    lo, up = c.row_lower, c.row_upper
    eq = (lo == up) & np.isfinite(lo)
    ge = np.flatnonzero(np.isfinite(lo) & ~eq)
    le = np.flatnonzero(np.isfinite(up) & ~eq)
    eq = np.flatnonzero(eq)
    return eq, ge, le


def _gurobi_row_count(c: _Compiled) -> int:
    eq, ge, le = _gurobi_row_split(c)
    return eq.size + ge.size + le.size


def _grb_clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -_GRB_INF, _GRB_INF)


def _grb_num(x: float) -> float:
    if x >= _GRB_INF * 0.99:
        return math.inf
    if x <= -_GRB_INF * 0.99:
        return -math.inf
    return float(x)


def _solve_gurobi(
    c: _Compiled,
    time_limit_s: float,
    stop_bound: float | None,
    stop_value: float | None,
    threads: int,
    iteration_limit: int | None = None,
) -> SolveResult:
    """Solve with Gurobi; raise _GurobiFallback whenever HiGHS should take over."""
    try:
        import gurobipy as gp
        from gurobipy import GRB
    except ImportError as exc:
        raise _GurobiFallback(f"gurobipy not importable: {exc}", "gurobi-unavailable")
    global _gurobi_size_limited, _gurobi_ok, _gurobi_reason

    is_mip = c.is_mip
    state: dict = {"why": None, "bound": -math.inf, "value": math.inf}
    model = None
    try:
        model = gp.Model(env=_thread_env())
        model.Params.OutputFlag = 0
        model.Params.Threads = int(threads)
        if math.isfinite(time_limit_s):
            model.Params.TimeLimit = max(float(time_limit_s), 0.0)
        model.Params.MIPGap = MIP_REL_GAP
        model.Params.MIPGapAbs = MIP_ABS_GAP
        if iteration_limit is not None:
            model.Params.IterationLimit = float(iteration_limit)

        n = c.lower.size
        vtype = np.where(c.integer, GRB.INTEGER, GRB.CONTINUOUS)
        x = model.addMVar(n, lb=_grb_clip(c.lower), ub=_grb_clip(c.upper), vtype=vtype)
        if is_mip and c.priority.any():
            x.BranchPriority = np.where(c.integer, c.priority, 0).astype(int)

        eq, ge, le = _gurobi_row_split(c)
        parts, senses, rhs = [], [], []
        for rows, sense, bounds in ((eq, GRB.EQUAL, c.row_lower),
                                    (ge, GRB.GREATER_EQUAL, c.row_lower),
                                    (le, GRB.LESS_EQUAL, c.row_upper)):
            if rows.size:
                parts.append(c.a[rows])
                senses.append(np.full(rows.size, sense))
                rhs.append(bounds[rows])
        stacked = None
        if parts:
            stacked = sp.vstack(parts, format="csr")
            model.addMConstr(stacked, x, np.concatenate(senses), np.concatenate(rhs))
        model.setObjective(c.cost @ x + c.constant, GRB.MINIMIZE)

        callback = None
        if is_mip and (stop_bound is not None or stop_value is not None):
            CB = GRB.Callback

            def callback(mdl, where):
                try:
                    if where == CB.MIP:
                        dual, best = mdl.cbGet(CB.MIP_OBJBND), mdl.cbGet(CB.MIP_OBJBST)
                    elif where == CB.MIPSOL:
                        dual = mdl.cbGet(CB.MIPSOL_OBJBND)
                        # MIPSOL_OBJ is the new solution; OBJBST may not include it yet.
                        best = min(mdl.cbGet(CB.MIPSOL_OBJBST), mdl.cbGet(CB.MIPSOL_OBJ))
                    elif where == CB.MIPNODE:
                        dual, best = mdl.cbGet(CB.MIPNODE_OBJBND), mdl.cbGet(CB.MIPNODE_OBJBST)
                    else:
                        return
                    if stop_bound is not None and dual > stop_bound and dual < _GRB_INF:
                        state["why"], state["bound"] = "positive", float(dual)
                        mdl.terminate()
                    elif stop_value is not None and best < stop_value and best > -_GRB_INF:
                        state["why"], state["value"] = "negative", float(best)
                        mdl.terminate()
                except Exception:
                    pass

        model.optimize(callback)
        status = model.Status
        if status == GRB.INF_OR_UNBD:
            # Presolve could not tell infeasible from unbounded; decide it.
            model.Params.DualReductions = 0
            model.reset()
            model.optimize(callback)
            status = model.Status

        sol_count = model.SolCount
        value = _grb_num(model.ObjVal) if sol_count > 0 else None
        solution = np.asarray(x.X, dtype=np.float64) if sol_count > 0 else None

        def mip_bound() -> float:
            try:
                return _grb_num(model.ObjBound)
            except Exception:
                return -math.inf

        def lp_bound() -> float:
            """The bound Gurobi's duals (Pi, one per row of the stacked system) prove."""
            try:
                pi = np.asarray(model.Pi, np.float64) if stacked is not None else np.zeros(0)
            except Exception:
                return -math.inf
            inf = np.full(ge.size + le.size, np.inf)
            lo = np.concatenate([c.row_lower[eq], c.row_lower[ge], -inf[:le.size]])
            up = np.concatenate([c.row_lower[eq], inf[:ge.size], c.row_upper[le]])
            a = stacked if stacked is not None else sp.csr_matrix((0, n))
            return lp_dual_bound(_Compiled(c.lower, c.upper, c.integer, c.priority, a, lo, up,
                                           c.cost, c.constant), pi)

        if status == GRB.OPTIMAL:
            bound = mip_bound() if is_mip else lp_bound()
            return SolveResult("optimal", bound, value, "gurobi", 0.0, "optimal", solution)
        if status == GRB.ITERATION_LIMIT and not is_mip:
            return SolveResult("iteration_limit", lp_bound(), value, "gurobi", 0.0,
                               "iteration limit", solution)
        if status == GRB.INFEASIBLE:
            return SolveResult("infeasible", math.inf, None, "gurobi", 0.0, "infeasible", solution)
        if status == GRB.INTERRUPTED and state["why"] == "positive":
            return SolveResult("stopped_positive", max(mip_bound(), state["bound"]), value,
                               "gurobi", 0.0, "interrupted: dual bound above threshold", solution)
        if status == GRB.INTERRUPTED and state["why"] == "negative":
            if value is None:
                value = state["value"]
            return SolveResult("stopped_negative", mip_bound(), value, "gurobi", 0.0,
                               "interrupted: incumbent below threshold", solution)
        if status == GRB.TIME_LIMIT:
            bound = mip_bound() if is_mip else lp_bound()
            return SolveResult("time_limit", bound, value, "gurobi", 0.0, "time limit", solution)
        # Unbounded, numerical trouble, ...: claim nothing (see the HiGHS backend).
        names = {GRB.UNBOUNDED: "unbounded", GRB.NUMERIC: "numerical trouble",
                 GRB.SUBOPTIMAL: "suboptimal", GRB.INF_OR_UNBD: "infeasible or unbounded"}
        return SolveResult("error", -math.inf, None, "gurobi", 0.0,
                           f"Gurobi status {status} ({names.get(status, 'unexpected')})")
    except gp.GurobiError as exc:
        if exc.errno == _GUROBI_SIZE_LIMIT_ERRNO:
            _gurobi_size_limited = True
            raise _GurobiFallback(f"model too large for size-limited licence "
                                  f"({c.lower.size} vars, {_gurobi_row_count(c)} rows): {exc}")
        if exc.errno in _GUROBI_LICENCE_ERRNOS:
            # Licence trouble that only shows at model/optimize time (e.g. expired while
            # running): stop trying Gurobi for the rest of the process, say so once.
            _gurobi_ok, _gurobi_reason = False, f"no usable Gurobi licence ({exc})"
            raise _GurobiFallback(f"no usable Gurobi licence ({exc})", "gurobi-unavailable")
        raise _GurobiFallback(f"GurobiError {exc.errno}: {exc}")
    except _GurobiFallback:
        raise
    except Exception as exc:
        raise _GurobiFallback(f"unexpected error: {exc!r}")
    finally:
        if model is not None:
            try:
                model.dispose()
            except Exception:
                pass
