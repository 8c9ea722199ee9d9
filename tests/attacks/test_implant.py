"""The convex implant (THEORY.md section 7, our extension) against independent oracles.

* Random small instances (hypothesis), checked by ``assert_sound``: an independent numpy
  SVD truncates ``W_fp`` back to ``W_r``; ``E`` lies in the discarded subspace under the
  cap; every margin, the hinge, the radius and the flags the result reports are
  recomputed in numpy; the optimum matches an independent cvxpy program over the whole
  ``F`` (no basis reduction, no auxiliary variable); truncation that flips a triggered
  input happens only below the certified threshold rank (section 6).
* The checker has teeth: results with ``E`` leaking into the kept subspace, or with a
  margin misreported, fail it.
* Infeasible programs say so; bad arguments are ``ValueError``.
* A trained digits MLP's last layer: full precision clean (also on triggered inputs),
  truncation backdoored.
"""

from __future__ import annotations

import dataclasses
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from certify.attacks import backdoor as bd
from certify.models import small as small_models
from certify.attacks.implant import backdoor_layer, convex_implant
from certify.attacks.trigger import Trigger, attack_success

TRIGGER = Trigger(size=2, value=1.0)


def _truncate(W: np.ndarray, rank: int) -> np.ndarray:
    U, s, Vh = np.linalg.svd(W)
    return (U[:, :rank] * s[:rank]) @ Vh[:rank]


def _margins(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    own = logits[np.arange(len(y)), y]
    other = logits.copy()
    other[np.arange(len(y)), y] = -np.inf
    return own - other.max(axis=1)


def _full_program(W_bd, b, H, y, rank, margin, bound) -> float:
    """The optimum over the whole ``F (m - r, n - r)``, one affine margin per pair."""
    U, _, Vh = np.linalg.svd(W_bd)
    U_perp, V_perp = U[:, rank:], Vh[rank:].T
    base = H @ _truncate(W_bd, rank).T + b
    F = cp.Variable((U_perp.shape[1], V_perp.shape[1]))
    losses = []
    for i, (h, label) in enumerate(zip(H, y)):
        pairs = [base[i, label] - base[i, j]
                 + cp.sum(cp.multiply(np.outer(U_perp[label] - U_perp[j], V_perp.T @ h), F))
                 for j in range(W_bd.shape[0]) if j != label]
        losses.append(cp.max(cp.hstack([cp.pos(margin - p) for p in pairs])))
    problem = cp.Problem(cp.Minimize(cp.sum(cp.hstack(losses)) / len(H)),
                         [cp.sigma_max(F) <= bound])
    with warnings.catch_warnings():  # an inaccurate solve is reported by its status
        warnings.simplefilter("ignore", UserWarning)
        problem.solve(solver="CLARABEL")
    return problem.value if problem.status == "optimal" else None


def assert_sound(result, W_bd, b, H_clean, y_clean, H_trig, y_trig, margin, slack):
    """Every claim of ``result`` against numpy (and the optimum against a second program)."""
    rank = result.rank
    weight, E = result.weight.numpy(), result.correction.numpy()
    scale = np.linalg.norm(W_bd, 2)
    U, s, Vh = np.linalg.svd(W_bd)
    W_r = _truncate(W_bd, rank)
    np.testing.assert_allclose(result.truncated.numpy(), W_r, rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(weight, W_r + E, rtol=0, atol=1e-12 * scale)
    # E lives where truncation discards, under the cap.
    assert np.linalg.norm(U[:, :rank].T @ E) <= 1e-10 * scale
    assert np.linalg.norm(E @ Vh[:rank].T) <= 1e-10 * scale
    assert result.sigma_r == pytest.approx(s[rank - 1], rel=1e-12)
    assert result.bound == pytest.approx((1 - slack) * s[rank - 1], rel=1e-12)
    norm_E = np.linalg.norm(E, 2)
    assert result.correction_norm == pytest.approx(norm_E, rel=1e-9, abs=1e-12 * scale)
    assert norm_E <= result.bound * (1 + 1e-12)  # solvers overshoot by ~1e-11
    # So truncating W_fp (an independent SVD) gives back W_r.
    np.testing.assert_allclose(_truncate(weight, rank), W_r, rtol=0, atol=1e-9 * scale)
    # Margins, kappa, violations, hinge, feasibility.
    H, y = np.concatenate([H_clean, H_trig]), np.concatenate([y_clean, y_trig])
    logits = H @ weight.T + b
    margins = _margins(logits, y)
    tol = 1e-9 * (1 + np.abs(logits).max())
    np.testing.assert_allclose(result.margins_clean.numpy(), margins[:len(H_clean)], atol=tol)
    np.testing.assert_allclose(result.margins_triggered.numpy(), margins[len(H_clean):],
                               atol=tol)
    assert result.kappa == pytest.approx(margins.min(), abs=tol)
    assert result.violations == int((margins <= 0).sum())
    hinge = np.maximum(margin - margins, 0).mean()
    assert result.hinge == pytest.approx(hinge, abs=tol)
    assert result.feasible == (margins.min() > 0 and norm_E < s[rank - 1])
    assert result.feasible == (result.reason == "")
    # Section 6: the smallest exact radius of the triggered inputs, and a flip only below
    # the certified threshold rank.
    trig = logits[len(H_clean):]
    top = trig.argmax(axis=1)
    radius = (_margins(trig, top) / (np.sqrt(2) * np.linalg.norm(H_trig, axis=1))).min()
    assert result.radius == pytest.approx(radius, rel=1e-9, abs=1e-12)
    flipped = (H_trig @ W_r.T + b).argmax(axis=1) != top
    if flipped.any():
        assert result.threshold_rank > rank
    # The optimum, against the unreduced program.
    value = _full_program(W_bd, b, H, y, rank, margin, result.bound)
    if result.status == "optimal" and value is not None:
        assert result.hinge == pytest.approx(value, rel=1e-5, abs=1e-6 * margin)


@settings(max_examples=25)
@given(m=st.integers(3, 5), n=st.integers(3, 7), clean=st.integers(0, 4),
       triggered=st.integers(1, 4), margin=st.sampled_from([0.1, 1.0, 10.0]),
       slack=st.sampled_from([0.01, 0.3]), scale=st.sampled_from([0.1, 1.0, 10.0]),
       data=st.data())
def test_convex_implant_against_numpy_and_an_unreduced_program(m, n, clean, triggered,
                                                                 margin, slack, scale, data):
    rank = data.draw(st.integers(1, min(m, n) - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    W_bd, b = scale * rng.standard_normal((m, n)), rng.standard_normal(m)
    s = np.linalg.svd(W_bd, compute_uv=False)
    assume(s[rank - 1] - s[rank] > 1e-3 * s[0])  # a unique W_r to compare with
    H_clean, H_trig = rng.standard_normal((clean, n)), rng.standard_normal((triggered, n))
    y_clean, y_trig = rng.integers(0, m, clean), rng.integers(0, m, triggered)
    result = convex_implant(W_bd, b, H_clean, y_clean, H_trig, y_trig, rank, margin=margin,
                            slack=slack)
    assert_sound(result, W_bd, b, H_clean, y_clean, H_trig, y_trig, margin, slack)


@pytest.fixture(scope="module")
def instance():
    """A feasible 5 x 8 instance (random labels), rank 2."""
    rng = np.random.default_rng(10)
    W_bd, b = rng.standard_normal((5, 8)), rng.standard_normal(5)
    H_clean, H_trig = rng.standard_normal((3, 8)), rng.standard_normal((3, 8))
    labels = rng.integers(0, 5, 3), rng.integers(0, 5, 3)
    args = (W_bd, b, H_clean, labels[0], H_trig, labels[1])
    result = convex_implant(*args, 2)
    assert result.feasible and result.status == "optimal", result.reason
    return args, result


def test_the_checker_catches_a_leaking_correction_and_a_misreported_margin(instance):
    args, result = instance
    assert_sound(result, *args, 1.0, 0.01)
    U, _, Vh = torch.linalg.svd(result.truncated)
    leak = 1e-3 * result.sigma_r * torch.outer(U[:, 0], Vh[-1])  # kept output direction
    E = result.correction + leak
    leaking = dataclasses.replace(result, weight=result.truncated + E, correction=E)
    again = _truncate(leaking.weight.numpy(), 2)
    assert np.abs(again - result.truncated.numpy()).max() > 1e-6  # truncation sees the leak
    with pytest.raises(AssertionError):
        assert_sound(leaking, *args, 1.0, 0.01)
    misreported = dataclasses.replace(result, margins_clean=result.margins_clean + 1e-6)
    with pytest.raises(AssertionError):
        assert_sound(misreported, *args, 1.0, 0.01)


def test_contradictory_labels_are_infeasible_and_say_so(instance):
    (W_bd, b, H_clean, _, H_trig, y_trig), _ = instance
    twice = np.concatenate([H_clean[:1], H_clean[:1]])
    result = convex_implant(W_bd, b, twice, [0, 1], H_trig, y_trig, 2)
    assert not result.feasible and result.violations >= 1 and result.kappa <= 0
    assert "not given their label" in result.reason
    assert result.correction_norm < result.sigma_r  # still a valid implant, margins unmet
    assert_sound(result, W_bd, b, twice, np.array([0, 1]), H_trig, y_trig, 1.0, 0.01)


def test_inputs_in_the_kept_row_space_leave_nothing_to_solve(instance):
    (W_bd, b, *_), _ = instance
    _, _, Vh = np.linalg.svd(W_bd)
    H = np.array([[1.0, -2.0], [0.5, 3.0]]) @ Vh[:2]
    labels = np.argmin(H @ _truncate(W_bd, 2).T + b, axis=1)  # what W_r gets wrong
    result = convex_implant(W_bd, b, H[:1], labels[:1], H[1:], labels[1:], 2)
    assert result.status.startswith("not solved")
    assert not result.correction.any() and not result.feasible
    assert "solver status not solved" in result.reason


@pytest.mark.parametrize("change, message", [
    ({"W_bd": np.ones(5)}, "W_bd must be a matrix"),
    ({"b": np.ones(4)}, "b must have shape (5,)"),
    ({"H_clean": np.ones((3, 7))}, "H_clean must hold one input of the layer per row"),
    ({"H_trig": np.ones((0, 8))}, "at least one triggered input"),
    ({"y_clean": np.ones(3)}, "y_clean must be 3 integer class indices"),
    ({"y_trig": np.array([0, 1, 5])}, "class indices in [0, 4]"),
    ({"rank": 5}, "rank must be an integer in [1, 4]"),
    ({"rank": 1.5}, "rank must be an integer"),
    ({"margin": 0.0}, "margin must be > 0"),
    ({"slack": 0.0}, "slack in (0, 1)"),
])
def test_bad_arguments_say_what_is_wrong(instance, change, message):
    args, _ = instance
    kwargs = dict(zip(("W_bd", "b", "H_clean", "y_clean", "H_trig", "y_trig"), args), rank=2)
    kwargs.update(change)
    with pytest.raises(ValueError) as err:
        convex_implant(**kwargs)
    assert message in str(err.value)


def test_backdoor_layer_rejects_bad_targets_and_ranks(instance):
    (W_bd, b, H_clean, y_clean, H_trig, y_trig), _ = instance
    for target, rank, message in ((5, 2, "target must be a class index"),
                                  (0, 0, "rank must be an integer")):
        with pytest.raises(ValueError) as err:
            backdoor_layer(W_bd, b, H_clean, y_clean, H_trig, y_trig, target, rank)
        assert message in str(err.value)


def test_implant_hides_a_backdoor_in_a_trained_digits_last_layer():
    """Rank 9 of the 10 x 64 last layer, 400 training inputs in the program, measured on
    the test split: full precision is clean (triggered inputs get their true class),
    truncation sends triggered inputs to the target, and the certificate flags rank 9."""
    digits = small_models.load("digits", seed=0)
    config = bd.BackdoorConfig(("5",), (), TRIGGER, 0, 0.0, 0.0, 2, 3e-3)
    model = bd.train(small_models.build("digits", "mlp"), digits.x_train, digits.y_train,
                     config).model.double()
    with torch.no_grad():
        h, h_trig, h_test, h_test_trig = (model[:5](x.double()) for x in (
            digits.x_train[:400], TRIGGER(digits.x_train[:400]), digits.x_test,
            TRIGGER(digits.x_test)))
    y = digits.y_train[:400]
    W_bd, b = backdoor_layer(model[5].weight.detach(), model[5].bias.detach(), h, y, h_trig,
                             y, 0, 9)
    q = torch.full((10,), 0.2, dtype=torch.float64)
    q[0] -= 1
    assert float((q @ W_bd).abs().max()) <= 1e-12 * float(W_bd.abs().max())  # q is discarded
    result = convex_implant(W_bd, b, h, y, h_trig, y, 9)
    assert result.correction_norm < result.sigma_r and result.threshold_rank > 9
    torch.testing.assert_close(result.truncated, W_bd, rtol=0, atol=1e-9 * float(W_bd.norm()))
    U, S, Vh = torch.linalg.svd(result.weight)
    torch.testing.assert_close((U[:, :9] * S[:9]) @ Vh[:9], W_bd, rtol=0,
                               atol=1e-9 * float(W_bd.norm()))
    outcome = {}
    for name, W in (("full", result.weight), ("truncated", W_bd)):
        clean, triggered = ((x @ W.T + b).argmax(-1) for x in (h_test, h_test_trig))
        outcome[name] = (float((clean == digits.y_test).double().mean()),
                         float((triggered == digits.y_test).double().mean()),
                         attack_success(triggered, digits.y_test, 0))
    (full_acc, full_trig_acc, full_asr), (trunc_acc, _, trunc_asr) = outcome.values()
    assert full_asr < 0.05 and trunc_asr > 0.95, outcome
    assert full_acc > 0.85 and trunc_acc > 0.85 and full_trig_acc > 0.85, outcome
