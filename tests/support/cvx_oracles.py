"""Independent oracles: the convex programs of THEORY.md sections 1 to 3 solved by cvxpy.

Nothing here uses a closed form under test. The programs are stated literally (variable
``D``, the linear constraint, the norm as a cvxpy atom) and solved by Clarabel with its
default tolerances (two numerical fallback settings, ``CLARABEL_SETTINGS``, where the
defaults stall; SCS only confirms infeasibility where Clarabel cannot, see ``_solve``).

Scaling. The instances span scales 1e-6..1e6 per operand, so optimal values span
1e-12..1e12. Clarabel's stopping rules are partly absolute (``tol_gap_abs = 1e-8``,
``tol_feas = 1e-8``), and on raw data it returns ``optimal_inaccurate`` or errors near
5e-3 relative (spectral norm), or fails outright (``SolverError``, entrywise max). So
every operand is divided by a power of two ``2^e`` that brings its largest entry into
[0.5, 1) -- exact in floating point -- and the answer is mapped back by homogeneity
alone: for ``r = a r'``, ``h = b h'``, ``D h = r  <=>  (D b / a) h' = r'``, hence
``D = (a / b) D'`` and ``||D|| = (a / b) ||D'||`` for ANY norm. (Likewise
``<D, c h^T> = -m`` with ``c = a c'``, ``h = b h'``, ``m = s m'`` gives
``D = s / (a b) D'``, and ``D H = R`` as ``D h = r``.) This uses only the linearity of the
constraint and the absolute homogeneity of a norm, not any formula under test.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

SOLVER = "CLARABEL"
FALLBACK_SOLVER = "SCS"  # for infeasibility verdicts only, see _solve
INFEASIBLE = (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE)


@dataclass(frozen=True)
class Oracle:
    """cvxpy's answer, mapped back to the original scale.

    ``value`` and ``D`` are None unless ``status`` is optimal. ``unit`` is the factor the
    normalised problem was scaled back by (so ``value / unit`` is the normalised value).
    """

    status: str
    value: float | None
    D: np.ndarray | None
    unit: float


def pow2_scale(x: np.ndarray) -> float:
    """A power of two ``2^e`` with ``max |x| / 2^e`` in [0.5, 1); 1 for ``x = 0``."""
    a = float(np.max(np.abs(x))) if np.size(x) else 0.0
    if a == 0.0:
        return 1.0
    return float(np.ldexp(1.0, int(np.frexp(a)[1])))


def cvx_norm(D: cp.Expression, norm: str | float) -> cp.Expression:
    """The norm as a cvxpy atom; a float is the entrywise l_p norm."""
    if norm == "fro":
        return cp.norm(D, "fro")
    if norm == "spectral":
        return cp.sigma_max(D)
    if norm == "max":
        return cp.max(cp.abs(D))
    if norm == "sum":
        return cp.sum(cp.abs(D))
    return cp.pnorm(cp.vec(D, order="F"), float(norm))


def np_norm(D: np.ndarray, norm: str | float) -> float:
    """The norm recomputed with numpy, independently of certify.

    ``D`` is divided by a power of two first (exact) and the norm multiplied back, so the
    squares inside numpy's Frobenius and l_p norms neither overflow nor underflow.
    """
    D = np.asarray(D, dtype=np.float64)
    s = pow2_scale(D)
    return s * _np_norm(D / s, norm)


def vec_norm(x: np.ndarray, ord: float) -> float:
    """``np.linalg.norm(x, ord)`` of a vector, scaled by a power of two like ``np_norm``."""
    x = np.asarray(x, dtype=np.float64)
    s = pow2_scale(x)
    return s * float(np.linalg.norm(x / s, ord))


def _np_norm(D: np.ndarray, norm: str | float) -> float:
    if norm == "fro":
        return float(np.linalg.norm(D, "fro"))
    if norm == "spectral":
        return float(np.linalg.norm(D, 2))
    if norm == "max":
        return float(np.max(np.abs(D)))
    if norm == "sum":
        return float(np.sum(np.abs(D)))
    return float(np.linalg.norm(D.ravel(), float(norm)))


# Clarabel settings tried in turn until one ends OPTIMAL. The defaults almost always do;
# redundant equality constraints (D H = R with rank(H) < N, e.g. a rank-1 H with 8
# columns) occasionally end OPTIMAL_INACCURATE or in a SolverError, and a stronger
# static regularisation of the KKT system, or no equilibration, then converges (seen in the
# "thorough" profile). Only the solver's numerics change, never the program.
CLARABEL_SETTINGS = ({}, {"static_regularization_constant": 1e-7}, {"equilibrate_enable": False})


def _run(problem: cp.Problem, solver: str, **settings) -> str:
    try:
        with warnings.catch_warnings():  # "Solution may be inaccurate": the status says so
            warnings.simplefilter("ignore", UserWarning)
            problem.solve(solver=solver, **settings)
        return problem.status
    except cp.error.SolverError:
        return "solver_error"
    except BaseException as err:
        # Clarabel's Rust core can panic in its PSD cone ("Eigval error", seen once in
        # ~10^4 spectral-norm solves); pyo3 raises that as PanicException, a
        # BaseException. Treat it as a failed solve; re-raise anything else.
        if type(err).__name__ == "PanicException":
            return "solver_error"
        raise


# An OPTIMAL point must satisfy the (normalised, O(1)) equality constraints to this absolute
# tolerance. Clarabel has ended OPTIMAL on an infeasible spectral-norm program with a point
# 75% off ``D H = R`` (a wide rank-4 H, found by the ci profile); such an answer is a failed
# solve, not a verdict.
FEASIBILITY_ATOL = 1e-6


def _feasible(constraints: list) -> bool:
    return all(float(np.max(c.violation(), initial=0.0)) <= FEASIBILITY_ATOL for c in constraints)


def _solve(objective: cp.Expression, constraints: list, D: cp.Variable, unit: float) -> Oracle:
    # A fresh Problem per attempt: cvxpy caches the solver object on the Problem, and a
    # failed (possibly panicked) solver must not be reused.
    for settings in CLARABEL_SETTINGS:
        problem = cp.Problem(cp.Minimize(objective), constraints)
        status = _run(problem, SOLVER, **settings)
        if status == cp.OPTIMAL and not _feasible(constraints):
            status = "optimal_off_the_constraints"
        if status in (cp.OPTIMAL, *INFEASIBLE):
            break
    if status not in (cp.OPTIMAL, *INFEASIBLE):
        # Clarabel also stalls on some INFEASIBLE programs with redundant equality
        # constraints: about 3% of the infeasible batch instances end in a SolverError.
        # SCS solves the SAME program and certified infeasibility in 300 of 300; it is
        # consulted only for that verdict -- its optimal values (~1e-4 accurate) are
        # never used.
        problem = cp.Problem(cp.Minimize(objective), constraints)
        if _run(problem, FALLBACK_SOLVER) in INFEASIBLE:
            status = problem.status
    if status != cp.OPTIMAL:
        return Oracle(status, None, None, unit)
    return Oracle(status, float(problem.value) * unit, np.asarray(D.value) * unit, unit)


def target_change(r: np.ndarray, h: np.ndarray, norm: str | float) -> Oracle:
    """``minimise ||D|| s.t. D h = r`` (``h`` already augmented with 1 for a bias)."""
    a, b = pow2_scale(r), pow2_scale(h)
    D = cp.Variable((r.size, h.size))
    return _solve(cvx_norm(D, norm), [D @ (h / b) == r / a], D, a / b)


def margin_functional(c: np.ndarray, h: np.ndarray, m: float, norm: str | float) -> Oracle:
    """``minimise ||D|| s.t. <D, c h^T> = -m``."""
    a, b, s = pow2_scale(c), pow2_scale(h), pow2_scale(np.array([m]))
    G = np.outer(c / a, h / b)
    D = cp.Variable((c.size, h.size))
    return _solve(cvx_norm(D, norm), [cp.sum(cp.multiply(D, G)) == -m / s], D, s / (a * b))


def batch_target_change(R: np.ndarray, H: np.ndarray, norm: str | float) -> Oracle:
    """``minimise ||D|| s.t. D H = R``."""
    a, b = pow2_scale(R), pow2_scale(H)
    D = cp.Variable((R.shape[0], H.shape[0]))
    return _solve(cvx_norm(D, norm), [D @ (H / b) == R / a], D, a / b)
