"""Oracle tests for ``certify.margin_functional`` and ``certify.class_pair_radius``
(THEORY.md section 3).

    minimise ||D||  subject to  <D, c h^T> = -m

is solved independently by cvxpy and compared with the closed forms, with the same checks
and tolerances as ``test_oracle_target_change.py`` (reasons in ``oracle_checks.py``):
(a) value = cvxpy's optimum to ``VALUE_RTOL = 1e-6``; (b) the minimiser satisfies the
constraint and its numpy-recomputed norm is the value; (c) cvxpy finds nothing smaller;
the Frobenius minimiser equals cvxpy's. ``c h^T = 0`` with ``m != 0`` is infeasible
(``ValueError`` and cvxpy infeasible); ``m = 0`` gives value 0.

The last-layer radius (``o = W h + b``, ``c = e_y - e_j``) is checked three ways:
against ``min_j`` of the cvxpy optimum of each class pair, against the section-3 factors
recomputed in numpy (``sqrt(2) ||h||_2``, ``2 ||h||_1``, ``||h||_inf``,
``2^(1/q) ||h||_q``; relative ``1e-12``: both sides are a few float64 operations), and by
a forward pass through a random ``W``: ``(1 + 1e-6) D*`` makes the runner-up reach the
predicted logit, ``0.999 D*`` keeps the prediction.
"""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import certify
import cvx_oracles as cvx
from oracle_checks import (
    FEAS_RTOL,
    NORM_KINDS,
    VALUE_RTOL,
    ZERO_ATOL,
    augmented,
    check_against_oracle,
    norm_of,
)
from strategies import (
    class_pair_instances,
    dims,
    log_uniform,
    margin_instances,
    signed_scales,
    vectors,
)

FACTOR_RTOL = 1e-12


def assert_margin_feasible(D: np.ndarray, c: np.ndarray, h: np.ndarray, m: float) -> None:
    G = np.outer(c, h)
    residual = abs(np.sum(D * G) + m)
    scale = np.sum(np.abs(D * G)) + abs(m)
    assert residual <= FEAS_RTOL * scale, (
        f"<D, c h^T> != -m: residual {residual:.3e}, scale {scale:.3e}"
    )


# ------------------------------------------------------------------ margin_functional


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kind", NORM_KINDS)
@given(inst=margin_instances(), data=st.data())
def test_margin_functional_matches_cvxpy(kind, bias, inst, data):
    norm = data.draw(norm_of(kind), label="norm")
    event(f"case={inst.case}")
    c, h_eff, m = inst.c, augmented(inst.h, bias), inst.m
    oracle = cvx.margin_functional(c, h_eff, m, norm)

    if (not c.any() or not h_eff.any()) and m != 0:
        with pytest.raises(ValueError, match=r"infeasible.*c h\^T = 0 but m != 0"):
            certify.margin_functional(c, inst.h, m, norm, bias=bias)
        assert oracle.status in cvx.INFEASIBLE, f"cvxpy: {oracle.status}"
        return

    result = certify.margin_functional(c, inst.h, m, norm, bias=bias)
    value, D = float(result.value), result.minimiser.numpy()
    assert result.value.shape == () and D.shape == (c.size, h_eff.size)

    if m == 0:
        assert value == 0.0 and not D.any(), "m = 0 must give D* = 0 exactly"
        assert oracle.status == cp.OPTIMAL and abs(oracle.value) / oracle.unit <= ZERO_ATOL
        return

    assert_margin_feasible(D, c, h_eff, m)  # (b)
    check_against_oracle(value, D, norm, oracle)


@pytest.mark.parametrize("kind", NORM_KINDS)
@given(data=st.data())
def test_margin_functional_zero_gradient_is_infeasible(kind, data):
    """c = 0 or h = 0 with m != 0: ValueError naming the problem, and cvxpy infeasible;
    with m = 0 the answer is D* = 0."""
    norm = data.draw(norm_of(kind), label="norm")
    k, n = data.draw(dims), data.draw(dims)
    c = data.draw(vectors(k, data.draw(log_uniform())))
    h = data.draw(vectors(n, data.draw(log_uniform())))
    m = data.draw(signed_scales())
    if data.draw(st.booleans(), label="zero c (else zero h)"):
        c = np.zeros(k)
    else:
        h = np.zeros(n)
    with pytest.raises(ValueError, match=r"c h\^T = 0 but m != 0"):
        certify.margin_functional(c, h, m, norm)
    assert cvx.margin_functional(c, h, m, norm).status in cvx.INFEASIBLE
    result = certify.margin_functional(c, h, 0.0, norm)
    assert float(result.value) == 0.0 and not result.minimiser.any()


# ------------------------------------------------------------------ class_pair_radius


def dual_factor(h: np.ndarray, norm) -> float:
    """||e_y - e_j||_dual * ||h||_dual for the norm of D (section 3), in numpy."""
    if norm in ("fro", "spectral"):
        return math.sqrt(2.0) * cvx.vec_norm(h, 2)
    if norm == "max":
        return 2.0 * cvx.vec_norm(h, 1)
    if norm == "sum":
        return 1.0 * cvx.vec_norm(h, np.inf)
    q = norm / (norm - 1.0)
    return 2.0 ** (1.0 / q) * cvx.vec_norm(h, q)


def forward(W, b, D, h, s, bias):
    """Logits of the perturbed last layer: (W + s D_W) h + (b + s D_b)."""
    DW, Db = (D[:, :-1], D[:, -1]) if bias else (D, 0.0)
    return (W + s * DW) @ h + (b + s * Db)


@pytest.mark.parametrize("kind", NORM_KINDS)
@given(inst=class_pair_instances(), bias=st.booleans(), data=st.data())
def test_class_pair_radius_matches_cvxpy_and_flips(kind, inst, bias, data):
    norm = data.draw(norm_of(kind), label="norm")
    event(f"case={inst.case}")
    logits, h = inst.logits, inst.h
    h_eff = augmented(h, bias)
    C = logits.size
    result = certify.class_pair_radius(logits, h, norm, bias=bias)

    # Bookkeeping, recomputed in numpy.
    y = int(np.argmax(logits))
    margins = logits[y] - logits
    assert int(result.predicted) == y
    expected = margins.copy()
    expected[y] = np.inf
    np.testing.assert_array_equal(result.margin.numpy(), expected)
    j = int(result.runner_up)
    others = [i for i in range(C) if i != y]
    m_min = min(margins[i] for i in others)
    assert j != y and margins[j] == m_min, f"runner_up {j} does not have the smallest margin"

    value, D = float(result.value), result.minimiser.numpy()
    assert D.shape == (C, h_eff.size)
    oracles = {i: cvx.margin_functional(np.eye(C)[y] - np.eye(C)[i], h_eff, margins[i], norm)
               for i in others}

    if not h_eff.any():
        # The output is the bias alone: no weight change moves a positive margin.
        for i in others:
            if margins[i] > 0:
                assert oracles[i].status in cvx.INFEASIBLE, f"cvxpy: {oracles[i].status}"
        if m_min > 0:
            assert value == math.inf and not D.any()
        # m_min == 0 here (tied logits, h = 0) is the known defect pinned by
        # test_known_defects.py::test_class_pair_h_zero_with_tied_logits_has_radius_zero.
        return

    for i in others:
        assert oracles[i].status == cp.OPTIMAL, f"cvxpy on pair ({y}, {i}): {oracles[i].status}"

    if m_min == 0:  # tied logits: the class already ties, nothing to change
        assert value == 0.0 and not D.any()
        assert abs(oracles[j].value) / oracles[j].unit <= ZERO_ATOL
        return

    # The section-3 factors, recomputed independently.
    assert value == pytest.approx(m_min / dual_factor(h_eff, norm), rel=FACTOR_RTOL, abs=0)
    # (a), (b), (c) against the runner-up's own program (D* solves that one; for the
    # Frobenius norm it is that program's unique minimiser) ...
    c = np.eye(C)[y] - np.eye(C)[j]
    assert_margin_feasible(D, c, h_eff, margins[j])
    check_against_oracle(value, D, norm, oracles[j])
    # ... and the radius is the minimum over ALL pairs.
    best = min(oracles[i].value for i in others)
    assert value == pytest.approx(best, rel=VALUE_RTOL, abs=0), f"min_j of cvxpy is {best!r}"
    assert best >= value * (1 - VALUE_RTOL)

    # Forward pass through a random last layer with these logits.
    rng = np.random.default_rng(inst.seed)
    scale = np.max(np.abs(logits)) / cvx.vec_norm(h_eff, 2)
    W = scale * rng.standard_normal((C, h.size))
    b = logits - W @ h
    flipped = forward(W, b, D, h, 1 + 1e-6, bias)
    assert flipped[j] >= flipped[y], (
        f"(1 + 1e-6) D* does not flip: o_y' - o_j' = {flipped[y] - flipped[j]!r}"
    )
    kept = forward(W, b, D, h, 0.999, bias)
    assert int(np.argmax(kept)) == y and kept[y] > np.max(np.delete(kept, y)), (
        f"0.999 D* already changes the prediction: {kept!r}"
    )


@pytest.mark.parametrize("norm,factor", [("fro", math.sqrt(2)), ("spectral", math.sqrt(2)),
                                         ("max", 2.0)])
def test_class_pair_radius_section3_constants(norm, factor):
    """The exact constants of section 3 on one hand-checkable instance:
    logits (3, 1, 0.5): m = 2 against class 1; h = (3, 4): ||h||_2 = 5, ||h||_1 = 7."""
    h = np.array([3.0, 4.0])
    dual_h = {"fro": 5.0, "spectral": 5.0, "max": 7.0}[norm]
    result = certify.class_pair_radius(np.array([3.0, 1.0, 0.5]), h, norm)
    assert int(result.predicted) == 0 and int(result.runner_up) == 1
    assert float(result.value) == pytest.approx(2.0 / (factor * dual_h), rel=1e-15, abs=0)
