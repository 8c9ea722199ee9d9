"""Checks and tolerances shared by the oracle tests.

Tolerances (all relative) and why:

* ``VALUE_RTOL = 1e-6``, our optimal value against cvxpy's: Clarabel with its default
  tolerances (1e-8 on gap and feasibility) on the power-of-two normalised data (see
  ``cvx_oracles.py``); the worst disagreement seen over thousands of random instances of
  every norm was 4e-8 (entrywise max), 25x inside. A wrong constant (sqrt(2), 2) or a
  wrong norm (l1 instead of l2 or l_inf of r, l_inf instead of l_1 of h) is off by a
  factor >= 1 + 1e-3 on any instance with two or more entries of magnitude >= 1e-3
  (our strategies draw no smaller nonzero mantissa), so it cannot pass.
* ``FEAS_RTOL = 1e-12`` of ``max_i (|D| |h|)_i + ||r||_inf``: the residual of a closed
  form from rounding alone (at most 13 float64 products per entry) is ~1e-15.
* ``NORM_RTOL = 1e-10``: numpy's recomputed ``||D*||`` and our value differ by rounding
  only (~1e-15; the spectral norm goes through an SVD).
* ``D_RTOL = 1e-6``, the Frobenius minimiser against cvxpy's: it is unique, and cvxpy's
  agreed to 2e-14 (the second-order cone solve of a strongly convex objective). The
  other norms' minimisers are not compared: spectral, max and sum minimisers are not
  unique, and for l_p the interior-point D is only accurate to ~sqrt(gap) ~ 1e-3.
  Uniqueness makes that unnecessary anyway: a feasible D whose norm equals the optimum
  IS the minimiser of a strictly convex norm.
* ``ZERO_ATOL = 1e-7``: where the optimum is 0 (r = 0, m = 0), cvxpy's value of the
  normalised problem is 0 up to its absolute gap tolerance 1e-8.

Every ``pytest.approx`` here passes ``abs=0``: its default absolute tolerance of 1e-12
would otherwise accept ANY value below ~1e-12, and optimal values go down to 1e-12.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import strategies as st

import cvx_oracles as cvx
from strategies import LP_VALUES

VALUE_RTOL = 1e-6
FEAS_RTOL = 1e-12
NORM_RTOL = 1e-10
D_RTOL = 1e-6
ZERO_ATOL = 1e-7

NORM_KINDS = ["fro", "spectral", "max", "sum", "lp"]


def norm_of(kind: str) -> st.SearchStrategy[str | float]:
    return st.sampled_from(LP_VALUES) if kind == "lp" else st.just(kind)


def augmented(h: np.ndarray, bias: bool) -> np.ndarray:
    return np.append(h, 1.0) if bias else h


def assert_feasible(D: np.ndarray, h: np.ndarray, r: np.ndarray) -> None:
    residual = np.max(np.abs(D @ h - r))
    scale = np.max(np.abs(D) @ np.abs(h)) + np.max(np.abs(r))
    assert residual <= FEAS_RTOL * scale, f"D h != r: residual {residual:.3e}, scale {scale:.3e}"


def check_against_oracle(value: float, D: np.ndarray, norm, oracle: cvx.Oracle,
                         slack: float = 0.0) -> None:
    """(a), (c), the recomputed norm of (b), and the Frobenius minimiser.

    ``slack``: an absolute allowance for the oracle's own inaccuracy beyond its gap
    tolerance (an a-posteriori bound from its constraint residual; 0 for rank-one
    problems, see ``test_oracle_batch.oracle_slack``).
    """
    assert oracle.status == cp.OPTIMAL, f"cvxpy: {oracle.status}"
    recomputed = cvx.np_norm(D, norm)
    assert recomputed == pytest.approx(value, rel=NORM_RTOL, abs=0), (
        f"||D*|| recomputed {recomputed!r} != reported value {value!r}"
    )
    # (a) agreement with the independent optimum
    assert abs(value - oracle.value) <= VALUE_RTOL * abs(value) + slack, (
        f"value {value!r} but cvxpy's optimum is {oracle.value!r} "
        f"(ratio {value / oracle.value!r}, slack {slack!r})"
    )
    # (c) optimality: the solver finds nothing smaller than our value
    assert oracle.value >= value * (1 - VALUE_RTOL) - slack, (
        f"cvxpy found ||D|| = {oracle.value!r} < ours {value!r}: ours is not minimal"
    )
    if norm == "fro":
        err = cvx.np_norm(D - oracle.D, "fro")
        assert err <= D_RTOL * cvx.np_norm(D, "fro") + slack, (
            f"Frobenius minimiser differs from cvxpy's by {err:.3e} (absolute)"
        )
