"""Oracle tests for ``certify.batch_target_change`` (THEORY.md section 2).

    minimise ||D||  subject to  D H = R        (H is n x N, R is m x N)

for the Frobenius and spectral norms, solved independently by cvxpy. Feasible instances
are ``R = X H`` with ``H`` of full rank or rank-deficient (rank ``k < min(n, N)``, built as
``U diag(s) V^T``), ``N`` from 1 to 12. Checks: (a) our value equals cvxpy's optimum;
(b) ``D H = R`` and the numpy-recomputed norm of ``D`` is the value; (c) cvxpy finds nothing
smaller; for Frobenius, ``D`` equals cvxpy's (unique). Infeasible instances (generic ``R``
with ``rank(H) < N``) raise ``ValueError`` and cvxpy reports infeasibility.

Tolerances: as in ``oracle_checks.py``, plus an a-posteriori allowance for cvxpy's own
constraint residual (``oracle_slack``). H is generated with condition number <= 100 so the
allowance stays near 1e-6 of the value; the test fails outright if it ever exceeds 1e-4.
Feasibility of our D: ``R = X H`` is itself rounded, so ``R`` lies in the row space of
``H`` only to ~1e-16 relative, and ``R H^+ H`` loses a further factor ``cond(H)``; the
API's documented test is ``||D H - R||_F <= 1e-8 ||R||_F`` and we assert exactly that
contract (a wrong D, e.g. ``sqrt(2) R H^+``, misses it by 40%).
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import assume, event, given

import certify
import cvx_oracles as cvx
from oracle_checks import ZERO_ATOL, check_against_oracle
from strategies import feasible_batch_instances, infeasible_batch_instances

BATCH_FEAS_RTOL = 1e-8  # the documented default rtol of batch_target_change
# The a-posteriori slack may not exceed this fraction of the value: beyond it the oracle
# could no longer tell a wrong constant (sqrt(2) is +41%) from its own error.
MAX_SLACK = 1e-4


def oracle_slack(oracle: cvx.Oracle, R: np.ndarray, H: np.ndarray, rank: int) -> float:
    """How far cvxpy's optimum can sit from the true one because its D is not exactly
    feasible. Its residual E = D_c H - R lies in the row space of H (R does), so
    D_f = D_c - E H^+ is feasible with ||D_f - D_c|| <= ||E||_F / sigma_rank(H) in both
    norms: the true optimum is within that distance of cvxpy's (plus its gap tolerance).
    Only numpy's singular values of H and cvxpy's residual enter, not the formula under
    test."""
    E = cvx.np_norm(oracle.D @ H - R, "fro")
    scale = cvx.pow2_scale(H)
    sigma = np.linalg.svd(H / scale, compute_uv=False)[rank - 1] * scale
    return E / sigma


@pytest.mark.parametrize("norm", ["fro", "spectral"])
@given(inst=feasible_batch_instances())
def test_batch_target_change_matches_cvxpy(norm, inst):
    event(f"case={inst.case}")
    R, H = inst.R, inst.H
    result = certify.batch_target_change(R, H, norm)
    value, D = float(result.value), result.minimiser.numpy()
    assert D.shape == (R.shape[0], H.shape[0])
    oracle = cvx.batch_target_change(R, H, norm)
    assert oracle.status == cp.OPTIMAL, f"cvxpy: {oracle.status}"

    if not R.any():
        assert value == 0.0 and not D.any(), "R = 0 must give D* = 0 exactly"
        assert abs(oracle.value) / oracle.unit <= ZERO_ATOL
        return

    residual = cvx.np_norm(D @ H - R, "fro")  # scaled: no overflow at extreme scales
    assert residual <= BATCH_FEAS_RTOL * cvx.np_norm(R, "fro"), f"D H != R: residual {residual:.3e}"
    slack = oracle_slack(oracle, R, H, inst.rank)
    assert slack <= MAX_SLACK * value, f"oracle too inaccurate here: slack {slack:.3e}"
    check_against_oracle(value, D, norm, oracle, slack)


def check_infeasible(inst, norm) -> None:
    event(f"case={inst.case}")
    R, H = inst.R, inst.H
    # Precondition, checked independently of certify: the least-squares residual of
    # min_D ||D H - R||_F (numpy lstsq on H^T D^T = R^T) is far from zero. R is divided by
    # a power of two first (feasibility is invariant under scaling R).
    Rn = R / cvx.pow2_scale(R)
    Dt = np.linalg.lstsq(H.T, Rn.T, rcond=None)[0]
    assume(np.linalg.norm(H.T @ Dt - Rn.T) > 1e-6 * np.linalg.norm(Rn))
    with pytest.raises(ValueError, match=r"infeasible.*not in the row space of H"):
        certify.batch_target_change(R, H, norm)
    status = cvx.batch_target_change(R, H, norm).status
    assert status in cvx.INFEASIBLE, f"cvxpy: {status}"


@pytest.mark.parametrize("norm", ["fro", "spectral"])
@given(inst=infeasible_batch_instances())
def test_batch_target_change_infeasible(norm, inst):
    check_infeasible(inst, norm)


@pytest.mark.parametrize("norm", ["max", "sum", 1.5, 3.0, "nuclear"])
def test_batch_target_change_rejects_other_norms(norm):
    rng = np.random.default_rng(0)
    H = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match=r"supports 'fro' and 'spectral'"):
        certify.batch_target_change(rng.standard_normal((2, 4)) @ H, H, norm)


def test_batch_target_change_single_column_is_target_change():
    """N = 1 is section 1: the same minimiser as ``target_change``."""
    rng = np.random.default_rng(1)
    r, h = rng.standard_normal(5), rng.standard_normal(3)
    batch = certify.batch_target_change(r[:, None], h[:, None], "fro")
    single = certify.target_change(r, h, "fro")
    np.testing.assert_allclose(batch.minimiser.numpy(), single.minimiser.numpy(), rtol=1e-12)
    expected = np.linalg.norm(r) / np.linalg.norm(h)
    assert float(batch.value) == pytest.approx(expected, rel=1e-12, abs=0)
