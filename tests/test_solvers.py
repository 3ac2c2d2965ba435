"""Tests for pipeline.certify.solvers: HiGHS/Gurobi agreement, soundness of the reported
bound against brute force, early termination, Gurobi->HiGHS fallback, infeasibility."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linprog

from pipeline.certify import solvers
from pipeline.certify.solvers import MilpProblem, SolveResult, gurobi_available, solve

try:
    import gurobipy  # noqa: F401

    HAVE_GUROBIPY = True
except ImportError:
    HAVE_GUROBIPY = False

needs_gurobi = pytest.mark.skipif(
    not gurobi_available(), reason="gurobipy not importable or no usable Gurobi licence"
)
BACKENDS = ["highs", pytest.param("gurobi", marks=needs_gurobi)]
INF = np.inf


# ---------------------------------------------------------------------------------------
# Small problems with known optimum
# ---------------------------------------------------------------------------------------


def lp_two_vars(upper: float = 10.0) -> tuple[MilpProblem, float]:
    """min -x - y  s.t. x + 2y <= 4, 3x + y <= 6, 0 <= x, y <= upper  ->  x=1.6, y=1.2,
    opt -2.8. (The bound of an LP is proved from its duals: a column without a finite bound
    needs a reduced cost of provable sign, which floating-point duals rarely give at a basic
    column, so the certifier's LPs bound every column; ``upper=inf`` shows what happens.)"""
    p = MilpProblem()
    x = p.add_variables(np.zeros(2), np.full(2, upper))
    p.add_rows(sp.csr_matrix([[1.0, 2.0], [3.0, 1.0]]), x, np.full(2, -INF), np.array([4.0, 6.0]))
    p.set_objective(x, np.array([-1.0, -1.0]))
    return p, -2.8


def knapsack() -> tuple[MilpProblem, float]:
    """0/1 knapsack, min -value; the LP relaxation is fractional (-22.5 vs -21)."""
    values = np.array([10.0, 13.0, 7.0, 8.0])
    weights = np.array([5.0, 6.0, 3.0, 4.0])
    cap = 10.0
    best = max(
        values @ np.array(z)
        for z in itertools.product([0, 1], repeat=4)
        if weights @ np.array(z) <= cap
    )
    p = MilpProblem()
    d = p.add_variables(np.zeros(4), np.ones(4), integer=True)
    p.add_rows(sp.csr_matrix(weights[None, :]), d, np.array([-INF]), np.array([cap]))
    p.set_objective(d, -values)
    return p, -float(best)


def relu_big_m(x_fixed: float, objective: str) -> tuple[MilpProblem, float]:
    """y = max(0, x) on x in [l, u] = [-1, 2] via the big-M encoding with binary a:
        y >= x, y >= 0, y <= x - l (1 - a), y <= u a.
    x is pinned by an equality row (or left free when x_fixed is nan)."""
    lo, up = -1.0, 2.0
    p = MilpProblem()
    x = p.add_variables(np.array([lo]), np.array([up]))
    y = p.add_variables(np.array([0.0]), np.array([up]))
    a = p.add_variables(np.array([0.0]), np.array([1.0]), integer=True, priority=np.array([5]))
    cols = np.concatenate([x, y, a])
    rows = sp.csr_matrix(
        np.array(
            [
                [-1.0, 1.0, 0.0],  # y - x >= 0
                [-1.0, 1.0, -lo],  # y - x - l a <= -l   (y <= x - l(1-a))
                [0.0, 1.0, -up],  # y - u a <= 0
            ]
        )
    )
    p.add_rows(rows, cols, np.array([0.0, -INF, -INF]), np.array([INF, -lo, 0.0]))
    if not math.isnan(x_fixed):
        p.add_rows(sp.csr_matrix([[1.0]]), x, np.array([x_fixed]), np.array([x_fixed]))
    if objective == "max_y":  # min -y + 3: the triangle relaxation allows y = 1 at x = .5
        p.set_objective(y, np.array([-1.0]), constant=3.0)
        return p, 3.0 - max(0.0, x_fixed)
    # min x - 2y over the whole interval: x=2 gives -2
    p.set_objective(np.concatenate([x, y]), np.array([1.0, -2.0]))
    return p, -2.0


KNOWN = {
    "lp": lp_two_vars,
    "knapsack": knapsack,
    "relu_fixed": lambda: relu_big_m(0.5, "max_y"),
    "relu_fixed_neg": lambda: relu_big_m(-0.5, "max_y"),
    "relu_free": lambda: relu_big_m(float("nan"), "x_minus_2y"),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
@pytest.mark.parametrize("backend", BACKENDS)
def test_known_optimum(name, backend):
    problem, optimum = KNOWN[name]()
    res = solve(problem, solver=backend, time_limit_s=10)
    assert isinstance(res, SolveResult)
    assert res.solver == backend
    assert res.status == "optimal", res
    assert res.value == pytest.approx(optimum, abs=1e-6)
    assert res.bound <= optimum + 1e-6
    assert res.bound == pytest.approx(optimum, abs=1e-6)


@pytest.mark.parametrize("name", sorted(KNOWN))
@pytest.mark.parametrize("backend", BACKENDS)
def test_solution_is_feasible_and_attains_the_value(name, backend):
    problem, _ = KNOWN[name]()
    res = solve(problem, solver=backend, time_limit_s=10)
    c = problem._compile()
    x = res.solution
    assert x is not None and x.shape == (problem.num_variables,)
    assert np.all(x >= c.lower - 1e-7) and np.all(x <= c.upper + 1e-7)
    ax = c.a @ x
    assert np.all(ax >= c.row_lower - 1e-7) and np.all(ax <= c.row_upper + 1e-7)
    assert np.allclose(x[c.integer], np.round(x[c.integer]), atol=1e-7)
    assert c.cost @ x + c.constant == pytest.approx(res.value, abs=1e-6)


@needs_gurobi
@pytest.mark.parametrize("name", sorted(KNOWN))
def test_highs_and_gurobi_agree(name):
    problem, _ = KNOWN[name]()
    rh = solve(problem, solver="highs")
    rg = solve(problem, solver="gurobi")  # same MilpProblem rebuilt for another backend
    assert (rh.solver, rg.solver) == ("highs", "gurobi")
    assert rh.status == rg.status == "optimal"
    assert rh.value == pytest.approx(rg.value, abs=1e-6)


def test_problem_accounting_and_duplicates():
    p = MilpProblem()
    a = p.add_variables(np.zeros(3), np.ones(3))
    b = p.add_variables(np.zeros(2), np.full(2, 4.0), integer=True)
    assert a.dtype == np.int64 and list(a) == [0, 1, 2] and list(b) == [3, 4]
    assert (p.num_variables, p.num_integer, p.num_rows) == (5, 2, 0)
    # repeated column inside one row: coefficients add up (x3 + x3 >= 3  ->  x3 >= 2)
    p.add_rows(sp.csr_matrix([[1.0, 1.0]]), np.array([3, 3]), np.array([3.0]), np.array([INF]))
    p.add_rows(
        np.array([[1.0, 1.0], [1.0, -1.0]]), b, np.array([-INF, -1.0]), np.array([6.0, 1.0])
    )
    assert p.num_rows == 3
    # objective with a repeated column and a constant: 2*x3 + x4 + 1 (x3 >= 2 integer,
    # x4 >= x3 - 1) -> x3 = 2, x4 = 1 -> 6
    p.set_objective(np.array([3, 3, 4]), np.array([1.0, 1.0, 1.0]), constant=1.0)
    for backend in ["highs"] + (["gurobi"] if gurobi_available() else []):
        res = solve(p, solver=backend)
        assert res.status == "optimal"
        assert res.value == pytest.approx(6.0, abs=1e-6)


def test_mip_without_rows_and_empty_problem():
    p = MilpProblem()
    x = p.add_variables(np.array([-2.5, 0.5]), np.array([3.7, 1.5]), integer=True)
    p.set_objective(x, np.array([1.0, -1.0]), constant=0.25)
    res = solve(p)
    assert res.status == "optimal"
    assert res.value == pytest.approx(-2 - 1 + 0.25)
    assert res.bound <= res.value + 1e-9

    empty = MilpProblem()
    empty.set_objective(np.zeros(0, dtype=np.int64), np.zeros(0), constant=4.0)
    res = solve(empty)
    assert res.status == "optimal" and res.bound == pytest.approx(4.0)


# ---------------------------------------------------------------------------------------
# Random MILPs against brute force over the integer variables
# ---------------------------------------------------------------------------------------


def random_milp(seed: int):
    rng = np.random.default_rng(seed)
    n_int, n_cont, m = 3, 3, 5
    int_lo, int_up = np.zeros(n_int), np.array([1.0, 2.0, 1.0])
    cont_lo, cont_up = np.full(n_cont, -2.0), np.full(n_cont, 2.0)
    a = rng.normal(size=(m, n_int + n_cont))
    # Rows of every kind around a random point, so most integer assignments are tight.
    z0 = np.concatenate([rng.integers(0, int_up + 1), rng.uniform(-1, 1, n_cont)])
    act = a @ z0
    lower = np.full(m, -INF)
    upper = np.full(m, INF)
    upper[0] = act[0] + 0.3  # <=
    lower[1] = act[1] - 0.2  # >=
    lower[2], upper[2] = act[2] - 0.5, act[2] + 0.5  # ranged
    lower[3] = upper[3] = act[3]  # equality
    upper[4] = act[4] + rng.uniform(0, 1)
    cost = rng.normal(size=n_int + n_cont)
    const = float(rng.normal())

    p = MilpProblem()
    ci = p.add_variables(int_lo, int_up, integer=True)
    cc = p.add_variables(cont_lo, cont_up)
    cols = np.concatenate([ci, cc])
    # Split the rows over two blocks with permuted columns to exercise the column mapping.
    perm = rng.permutation(cols.size)
    p.add_rows(sp.csr_matrix(a[:2][:, perm]), cols[perm], lower[:2], upper[:2])
    p.add_rows(sp.coo_matrix(a[2:]), cols, lower[2:], upper[2:])
    p.set_objective(cols, cost, constant=const)

    # Brute force: one LP in the continuous variables per integer assignment.
    best = INF
    for z in itertools.product(*[range(int(u) + 1) for u in int_up]):
        z = np.array(z, dtype=float)
        shift = a[:, :n_int] @ z
        ac = a[:, n_int:]
        a_ub, b_ub = [], []
        for i in range(m):
            if np.isfinite(upper[i]):
                a_ub.append(ac[i])
                b_ub.append(upper[i] - shift[i])
            if np.isfinite(lower[i]):
                a_ub.append(-ac[i])
                b_ub.append(-(lower[i] - shift[i]))
        lp = linprog(
            cost[n_int:], A_ub=np.array(a_ub), b_ub=np.array(b_ub),
            bounds=list(zip(cont_lo, cont_up)), method="highs",
        )
        if lp.status == 0:
            best = min(best, lp.fun + cost[:n_int] @ z + const)
    return p, best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_milp_matches_brute_force(seed, backend):
    problem, best = random_milp(seed)
    res = solve(problem, solver=backend, time_limit_s=10)
    assert res.solver == backend
    if best == INF:
        assert res.status == "infeasible"
        assert res.bound == INF
        return
    assert res.status == "optimal", res
    assert res.bound <= best + 1e-6  # soundness of the dual bound
    assert res.value == pytest.approx(best, abs=1e-6)


def test_random_milps_include_feasible_instances():
    # Guard against the brute-force test passing vacuously through infeasible instances.
    assert sum(random_milp(s)[1] < INF for s in range(8)) >= 6


# ---------------------------------------------------------------------------------------
# Early termination
# ---------------------------------------------------------------------------------------


def multi_knapsack(n: int, m: int, constant: float, seed: int = 0) -> MilpProblem:
    """min constant - v @ d  s.t.  W d <= W 1 / 3, d binary (non-trivial for HiGHS)."""
    rng = np.random.default_rng(seed)
    v = rng.integers(10, 100, n).astype(float)
    w = rng.integers(10, 100, (m, n)).astype(float)
    p = MilpProblem()
    d = p.add_variables(np.zeros(n), np.ones(n), integer=True)
    p.add_rows(sp.csr_matrix(w), d, np.full(m, -INF), w.sum(axis=1) / 3)
    p.set_objective(d, -v, constant=constant)
    return p


@pytest.fixture(scope="module")
def multi_knapsack_optimum() -> float:
    res = solve(multi_knapsack(40, 6, 0.0), solver="highs", time_limit_s=20)
    assert res.status == "optimal"
    return res.value


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_when_bound_above(backend, multi_knapsack_optimum):
    # Shift so that the optimum is +2: the property "min > 0" holds.
    p = multi_knapsack(40, 6, -multi_knapsack_optimum + 2.0)
    res = solve(p, solver=backend, time_limit_s=10, stop_when_bound_above=0.0)
    assert res.status in ("stopped_positive", "optimal"), res
    assert res.bound > 0.0
    assert res.bound <= 2.0 + 1e-6  # still a valid lower bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_when_value_below(backend, multi_knapsack_optimum):
    # Optimum is -50: any incumbent below 0 is a counterexample.
    p = multi_knapsack(40, 6, -multi_knapsack_optimum - 50.0)
    res = solve(p, solver=backend, time_limit_s=10, stop_when_value_below=0.0)
    assert res.status in ("stopped_negative", "optimal"), res
    assert res.value is not None and res.value < 0.0
    assert res.value >= -50.0 - 1e-6
    assert res.bound <= -50.0 + 1e-6


def test_highs_callback_really_interrupts(multi_knapsack_optimum):
    # The optimum is not known at the root for this instance, so reaching "stopped_*"
    # shows that cbMipInterrupt fired and terminated the search.
    p = multi_knapsack(40, 6, -multi_knapsack_optimum + 2.0)
    full = solve(p, solver="highs")
    stopped = solve(p, solver="highs", stop_when_bound_above=-1e3)
    assert full.status == "optimal"
    assert stopped.status == "stopped_positive"
    assert -1e3 < stopped.bound <= full.value + 1e-6


def test_stop_thresholds_on_lp_just_solve():
    p, optimum = lp_two_vars()
    res = solve(p, stop_when_bound_above=-100.0, stop_when_value_below=100.0)
    assert res.status == "optimal"
    assert res.bound == pytest.approx(optimum)


def test_time_limit_reports_sound_bound(multi_knapsack_optimum):
    p = multi_knapsack(40, 6, 0.0)
    res = solve(p, solver="highs", time_limit_s=0.0)
    assert res.status in ("time_limit", "optimal")
    assert res.bound <= multi_knapsack_optimum + 1e-6


# ---------------------------------------------------------------------------------------
# Fallback and infeasibility
# ---------------------------------------------------------------------------------------


def big_pairs_problem(n_pairs: int = 1050) -> tuple[MilpProblem, float]:
    """2*n_pairs binaries, x_{2i} + x_{2i+1} >= 1, min sum(x): optimum n_pairs."""
    n = 2 * n_pairs
    p = MilpProblem()
    x = p.add_variables(np.zeros(n), np.ones(n), integer=True)
    rows = np.repeat(np.arange(n_pairs), 2)
    mat = sp.csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(n_pairs, n))
    p.add_rows(mat, x, np.ones(n_pairs), np.full(n_pairs, INF))
    p.set_objective(x, np.ones(n))
    return p, float(n_pairs)


def test_gurobi_size_limit_falls_back_to_highs(caplog):
    if not HAVE_GUROBIPY:
        pytest.skip("gurobipy not importable")
    if not gurobi_available():
        pytest.skip("no usable Gurobi licence")
    if not solvers._gurobi_licence_is_size_limited():
        pytest.skip("Gurobi licence is not size-limited")
    problem, optimum = big_pairs_problem()
    assert problem.num_variables > 2000
    with caplog.at_level(logging.WARNING, logger="pipeline.certify.solvers"):
        res = solve(problem, solver="gurobi", time_limit_s=20)
    assert res.solver == "highs"
    assert res.status == "optimal"
    assert res.value == pytest.approx(optimum)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "size-limited" in warnings[0].getMessage()
    # auto picks HiGHS for this model directly; small models go to Gurobi.
    assert solve(problem, solver="auto", time_limit_s=20).solver == "highs"
    assert solve(knapsack()[0], solver="auto").solver == "gurobi"


def test_gurobi_fallback_after_fresh_10010(caplog, monkeypatch):
    """The first refusal is discovered at optimize() (error 10010), not from the cache."""
    if not gurobi_available() or not solvers._gurobi_licence_is_size_limited():
        pytest.skip("needs the size-limited Gurobi licence")
    monkeypatch.setattr(solvers, "_gurobi_size_limited", None)
    problem, optimum = big_pairs_problem()
    with caplog.at_level(logging.WARNING, logger="pipeline.certify.solvers"):
        res = solve(problem, solver="gurobi", time_limit_s=20)
    assert res.solver == "highs" and res.value == pytest.approx(optimum)
    assert any("size-limited" in r.getMessage() for r in caplog.records)


def test_missing_gurobi_falls_back_and_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(solvers, "_gurobi_checked", True)
    monkeypatch.setattr(solvers, "_gurobi_ok", False)
    monkeypatch.setattr(solvers, "_gurobi_reason", "no usable Gurobi licence (test)")
    monkeypatch.setattr(solvers, "_warned_once", set())
    problem, optimum = knapsack()
    with caplog.at_level(logging.WARNING, logger="pipeline.certify.solvers"):
        r1 = solve(problem, solver="gurobi")
        r2 = solve(problem, solver="gurobi")
        r3 = solve(problem, solver="auto")
    assert all(r.solver == "highs" and r.value == pytest.approx(optimum) for r in (r1, r2, r3))
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "licence" in msgs[0]


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_infeasible(backend, integer):
    p = MilpProblem()
    x = p.add_variables(np.zeros(2), np.ones(2), integer=integer)
    p.add_rows(sp.csr_matrix([[1.0, 1.0]]), x, np.array([2.5]), np.array([INF]))
    p.set_objective(x, np.ones(2))
    res = solve(p, solver=backend)
    assert res.status == "infeasible"
    assert res.bound == INF and res.value is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_integrality_makes_it_infeasible(backend):
    # x1 + x2 = 1.5 has LP solutions but no integer ones.
    p = MilpProblem()
    x = p.add_variables(np.zeros(2), np.full(2, 5.0), integer=True)
    p.add_rows(sp.csr_matrix([[1.0, 1.0]]), x, np.array([1.5]), np.array([1.5]))
    p.set_objective(x, np.ones(2))
    assert solve(p, solver=backend).status == "infeasible"


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbounded_is_error_without_bound(backend):
    p = MilpProblem()
    x = p.add_variables(np.zeros(1), np.full(1, INF))
    p.set_objective(x, np.array([-1.0]))
    res = solve(p, solver=backend)
    assert res.status == "error"
    assert res.bound == -INF and res.value is None


def test_highs_thread_count_can_change():
    # HiGHS's global scheduler keeps the first thread count; the solver must cope.
    problem, optimum = knapsack()
    for threads in (2, 1, 2):
        res = solve(problem, solver="highs", threads=threads)
        assert res.status == "optimal" and res.value == pytest.approx(optimum)


# ---------------------------------------------------------------------------------------
# LP bounds come from the dual solution, never from the primal objective
# ---------------------------------------------------------------------------------------


def small_lp(seed: int) -> tuple[MilpProblem, float]:
    """min c·x over x in [-1, 1]^3 and 3 random rows a·x <= 1 (the box's origin is feasible),
    with its optimum from the vertices (every choice of 3 active constraints)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(3, 3))
    c = rng.normal(size=3)
    p = MilpProblem()
    x = p.add_variables(-np.ones(3), np.ones(3))
    p.add_rows(sp.csr_matrix(a), x, np.full(3, -INF), np.ones(3))
    p.set_objective(x, c, 0.25)
    planes = [(a[i], 1.0) for i in range(3)] + [(s * np.eye(3)[j], 1.0) for j in range(3)
                                                 for s in (1.0, -1.0)]
    best = math.inf
    for trio in itertools.combinations(planes, 3):
        m = np.array([t[0] for t in trio])
        if abs(np.linalg.det(m)) < 1e-9:
            continue
        v = np.linalg.solve(m, np.array([t[1] for t in trio]))
        if np.all(np.abs(v) <= 1 + 1e-9) and np.all(a @ v <= 1 + 1e-9):
            best = min(best, float(c @ v) + 0.25)
    return p, best


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_lp_bound_matches_brute_force(backend, seed):
    p, optimum = small_lp(seed)
    full = solve(p, solver=backend)
    assert full.status == "optimal"
    assert optimum - 1e-9 <= full.bound <= optimum
    assert full.value == pytest.approx(optimum, abs=1e-9)


def boxed_random_lp(seed: int, n: int = 30, m: int = 40) -> MilpProblem:
    rng = np.random.default_rng(seed)
    p = MilpProblem()
    x = p.add_variables(-np.ones(n), np.ones(n))
    p.add_rows(sp.csr_matrix(rng.normal(size=(m, n))), x, np.full(m, -INF),
               rng.uniform(1, 2, m))
    p.set_objective(x, rng.normal(size=n), 0.5)
    return p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_lp_bound_is_proved_by_the_duals_even_when_stopped_early(backend, seed):
    """Stopped by an iteration limit the solver's point is no optimum (a primal objective read
    as the bound would be unsound): the reported bound is the one its duals prove, below the
    objective of every feasible point at every limit, and it meets the optimum at the end."""
    p = boxed_random_lp(seed)
    full = solve(p, solver=backend)
    assert full.status == "optimal"
    assert full.bound <= full.value and full.bound == pytest.approx(full.value, abs=1e-9)
    stopped = 0
    for limit in (0, 1, 2, 5, 10):
        res = solve(p, solver=backend, iteration_limit=limit)
        assert res.bound <= full.value, (limit, res)
        if res.status == "iteration_limit":
            stopped += 1
            assert res.bound < full.bound  # the primal and the dual side differ here
            if res.value is not None:
                assert res.bound < res.value
    assert stopped >= 1  # some limit stopped the solver before the optimum


def test_lp_dual_bound_any_multipliers_are_valid_and_the_primal_is_not_the_bound():
    p, optimum = lp_two_vars()
    compiled = p._compile()
    # The optimal duals of x + 2y <= 4, 3x + y <= 6 (both tight at (1.6, 1.2)): 0.4 and 0.2.
    tight = solvers.lp_dual_bound(compiled, np.array([-0.4, -0.2]))
    assert optimum - 1e-12 <= tight <= optimum
    rng = np.random.default_rng(1)
    for _ in range(50):
        y = rng.normal(size=2) * 3
        assert solvers.lp_dual_bound(compiled, y) <= optimum
    # A feasible but suboptimal primal point (0, 0) has objective 0 > -2.8: a bound read from
    # it would be wrong; suboptimal duals prove less than the optimum, not more.
    weak = solvers.lp_dual_bound(compiled, np.array([-1.0, 0.0]))
    assert weak < optimum
    assert solvers.lp_dual_bound(compiled, np.array([np.nan, 0.0])) == -math.inf
    # Zero multipliers prove the minimum over the box alone: -x - y >= -20 on [0, 10]^2.
    assert -20.0 - 1e-12 <= solvers.lp_dual_bound(compiled, np.zeros(2)) <= -20.0
    # Without upper bounds on x, y nothing finite is proved from them, even at the optimum:
    # sound (-inf), never the primal objective.
    p_inf, _ = lp_two_vars(INF)
    res = solve(p_inf)
    assert res.status == "optimal" and res.value == pytest.approx(optimum)
    assert res.bound <= optimum
    assert solvers.lp_dual_bound(p_inf._compile(), np.zeros(2)) == -math.inf


def test_lp_dual_bound_rounds_outward():
    """An LP whose exact optimum is not a float: the bound is at or below it (exactly checked
    with fractions), never rounded up."""
    from fractions import Fraction

    p = MilpProblem()
    x = p.add_variables(np.array([0.0]), np.array([10.0]))
    p.add_rows(sp.csr_matrix([[3.0]]), x, np.array([1.0]), np.array([INF]))  # 3x >= 1
    p.set_objective(x, np.array([1.0]))  # min x = 1/3
    res = solve(p)
    assert res.status == "optimal"
    assert Fraction(res.bound) <= Fraction(1, 3)
    assert res.bound >= 1 / 3 - 1e-12
