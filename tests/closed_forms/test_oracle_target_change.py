"""Oracle tests for ``certify.target_change`` (THEORY.md section 1).

    minimise ||D||  subject to  D h = r        (h := [h; 1] with a perturbed bias)

is solved independently by cvxpy (``tests/support/cvx_oracles.py``) and compared with the closed
forms. Per instance:

(a) our value equals cvxpy's optimal value to ``VALUE_RTOL``;
(b) our minimiser is feasible (``D h = r`` to floating-point accuracy) and its norm,
    recomputed with numpy, equals our value;
(c) cvxpy's value is not below ours beyond ``VALUE_RTOL`` (nothing beats our D);
and for the Frobenius norm, whose minimiser is unique, D itself equals cvxpy's.
Infeasible instances (``h = 0``, ``r != 0``, no bias) must raise ``ValueError`` AND be
reported infeasible by cvxpy.

Tolerances and their reasons: ``tests/support/oracle_checks.py``.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import certify
import cvx_oracles as cvx
from oracle_checks import (
    NORM_KINDS,
    ZERO_ATOL,
    assert_feasible,
    augmented,
    check_against_oracle,
    norm_of,
)
from strategies import dims, log_uniform, target_instances, vectors


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kind", NORM_KINDS)
@given(inst=target_instances(), data=st.data())
def test_target_change_matches_cvxpy(kind, bias, inst, data):
    norm = data.draw(norm_of(kind), label="norm")
    event(f"case={inst.case}")
    r, h_eff = inst.r, augmented(inst.h, bias)
    oracle = cvx.target_change(r, h_eff, norm)

    if not h_eff.any() and r.any():
        with pytest.raises(ValueError, match=r"infeasible.*h = 0 but r != 0"):
            certify.target_change(r, inst.h, norm, bias=bias)
        assert oracle.status in cvx.INFEASIBLE, f"cvxpy: {oracle.status}"
        return

    result = certify.target_change(r, inst.h, norm, bias=bias)
    value, D = float(result.value), result.minimiser.numpy()
    assert result.value.shape == () and D.shape == (r.size, h_eff.size)
    assert result.value.dtype == torch.float64 and result.minimiser.dtype == torch.float64

    if not r.any():
        assert value == 0.0 and not D.any(), "r = 0 must give D* = 0 exactly"
        assert oracle.status == cp.OPTIMAL and abs(oracle.value) / oracle.unit <= ZERO_ATOL
        return

    assert_feasible(D, h_eff, r)  # (b)
    check_against_oracle(value, D, norm, oracle)


@pytest.mark.parametrize("kind", NORM_KINDS)
@given(data=st.data())
def test_target_change_h_zero_is_infeasible(kind, data):
    """h = 0, r != 0, no bias: a ValueError naming the problem, and cvxpy agrees."""
    norm = data.draw(norm_of(kind), label="norm")
    m, n = data.draw(dims, label="m"), data.draw(dims, label="n")
    r = data.draw(vectors(m, data.draw(log_uniform())), label="r")
    h = np.zeros(n)
    with pytest.raises(ValueError, match=r"h = 0 but r != 0"):
        certify.target_change(r, h, norm)
    assert cvx.target_change(r, h, norm).status in cvx.INFEASIBLE
    # r = 0 with h = 0 is feasible: D* = 0.
    result = certify.target_change(np.zeros(m), h, norm)
    assert float(result.value) == 0.0 and not result.minimiser.any()


@pytest.mark.parametrize("kind", NORM_KINDS)
@given(data=st.data())
def test_target_change_batched_equals_one_by_one(kind, data):
    """Leading batch dimensions: each problem is solved as if alone, and an infeasible
    member is reported by its batch index."""
    norm = data.draw(norm_of(kind), label="norm")
    m, n, B = data.draw(dims), data.draw(dims), data.draw(st.integers(1, 5))
    R = np.stack([data.draw(vectors(m, data.draw(log_uniform()))) for _ in range(B)])
    Hs = np.stack([data.draw(vectors(n, data.draw(log_uniform()))) for _ in range(B)])
    batched = certify.target_change(R, Hs, norm)
    assert batched.value.shape == (B,) and batched.minimiser.shape == (B, m, n)
    for b in range(B):
        alone = certify.target_change(R[b], Hs[b], norm)
        torch.testing.assert_close(batched.value[b], alone.value, rtol=1e-14, atol=0)
        torch.testing.assert_close(batched.minimiser[b], alone.minimiser, rtol=1e-14, atol=0)
    bad = data.draw(st.integers(0, B - 1))
    Hs[bad] = 0.0
    with pytest.raises(ValueError, match=rf"batch index \[\[{bad}\]\]"):
        certify.target_change(R, Hs, norm)
