"""Defects the oracle tests found in ``certify.closed_forms.perturbation``, pinned after their fixes."""

from __future__ import annotations

import math

import numpy as np
import pytest

import certify


def test_class_pair_h_zero_with_tied_logits_has_radius_zero():
    # Logits (1, 1, 0): classes 0 and 1 already tie, so D = 0 does it and the radius is 0,
    # even though no weight change can move the output when h = 0.
    result = certify.class_pair_radius([1.0, 1.0, 0.0], [0.0, 0.0], "fro")
    assert float(result.value) == 0.0
    assert math.isinf(float(certify.class_pair_radius([2.0, 1.0], [0.0, 0.0], "fro").value))


def test_numpy_integer_exponent_is_a_number():
    by_int = certify.target_change([1.0, 2.0], [1.0, -1.0], np.int64(3))
    by_float = certify.target_change([1.0, 2.0], [1.0, -1.0], 3.0)
    assert float(by_int.value) == float(by_float.value)
    assert by_int.norm == "l3.0"


def test_batch_target_change_batch_mismatch_is_value_error():
    with pytest.raises(ValueError, match="broadcast"):
        certify.batch_target_change(np.ones((2, 3, 4)), np.ones((5, 2, 4)))


@pytest.mark.parametrize("norm", ["fro", "spectral", "max", "sum", 3.0])
@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_closed_form_at_extreme_scales(norm, scale):
    # ||h||_2^2 overflows (underflows) here although the answer is representable.
    r, h = np.array([1.0]), np.array([scale, -scale])
    result = certify.target_change(r, h, norm)
    D = result.minimiser.numpy()
    expected = {"fro": math.sqrt(2.0), "spectral": math.sqrt(2.0), "max": 2.0, "sum": 1.0,
                3.0: 2 ** (2 / 3)}[norm]
    assert float(result.value) == pytest.approx(1.0 / (expected * scale), rel=1e-12, abs=0)
    assert D @ h == pytest.approx(r, rel=1e-12, abs=0)


@pytest.mark.parametrize("norm", ["fro", "max", "sum", 1.5])
def test_margin_functional_at_extreme_scales(norm):
    c, h = np.array([1e-160, -2e-160]), np.array([3e170, 1e170])
    result = certify.margin_functional(c, h, 1.0, norm)
    D = result.minimiser.numpy()
    assert np.sum(D * np.outer(c, h)) == pytest.approx(-1.0, rel=1e-12)
    assert np.isfinite(float(result.value)) and float(result.value) > 0


def scaled_fro(D: np.ndarray) -> float:
    """||D||_F without overflow or underflow: divide by a power of two first (exact)."""
    s = float(np.ldexp(1.0, int(np.frexp(np.max(np.abs(D)))[1])))
    return s * float(np.linalg.norm(D / s))


@pytest.mark.parametrize("norm", ["fro", "spectral"])
@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_class_pair_radius_value_at_extreme_scales(norm, scale):
    # logits (1, 0): m = 1; h = (s, s): ||h||_2 = sqrt(2) s; radius 1 / (sqrt(2) sqrt(2) s).
    result = certify.class_pair_radius([1.0, 0.0], [scale, scale], norm)
    assert scaled_fro(result.minimiser.numpy()) == pytest.approx(1 / (2 * scale), rel=1e-12,
                                                                 abs=0)
    assert float(result.value) == pytest.approx(1 / (2 * scale), rel=1e-12, abs=0)


@pytest.mark.parametrize("scale", [1e160, 1e-160, 1e-170])
def test_batch_target_change_fro_value_at_extreme_scales(scale):
    rng = np.random.default_rng(0)
    H, X = rng.standard_normal((3, 3)), rng.standard_normal((2, 3))
    result = certify.batch_target_change(scale * (X @ H), H, "fro")
    D = result.minimiser.numpy()
    # The minimiser itself is right (pinv is scale-safe); its norm must be the value.
    assert scaled_fro(D) == pytest.approx(scale * np.linalg.norm(X), rel=1e-9, abs=0)
    assert float(result.value) == pytest.approx(scaled_fro(D), rel=1e-12, abs=0)


@pytest.mark.parametrize("norm", ["fro", "spectral"])
@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_batch_target_change_infeasible_at_extreme_scales(norm, scale):
    # D [1, 1] = s I has no solution (rank(H) = 1 < N = 2), at any scale s != 0; unscaled,
    # the residual and the tolerance both overflow (or underflow) and the check passed.
    with pytest.raises(ValueError, match="not in the row space of H"):
        certify.batch_target_change(scale * np.eye(2), np.array([[1.0, 1.0]]), norm)


@pytest.mark.parametrize("scale", [1e160, 1e-160])
def test_batch_target_change_feasible_at_extreme_scales(scale):
    H = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]]) * scale
    X = np.array([[1.0, -2.0, 0.5]])
    result = certify.batch_target_change(X @ H, H)
    D = result.minimiser.numpy()
    np.testing.assert_allclose(D @ (H / scale), X @ (H / scale), rtol=1e-10)


def test_batch_target_change_accepts_exponent_two_as_frobenius():
    H = np.array([[1.0, 0.0], [0.0, 2.0]])
    R = np.array([[1.0, 1.0]])
    assert float(certify.batch_target_change(R, H, 2).value) == pytest.approx(
        float(certify.batch_target_change(R, H, "fro").value), rel=1e-15)


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantisation_bound_survives_subnormal_weights(per_channel):
    # Found by hypothesis 6.170: W = [[5e-324]] gave an error bound of 0 (s / 2 underflows),
    # so a radius that underflowed to 0 was certified at 2 bits.
    from certify.closed_forms import thresholds

    W = np.array([[5e-324]])
    assert float(thresholds.quantisation_error(W, 2, per_channel)) > 0
    assert thresholds.threshold_bits(W, 0.5 * 5e-324, per_channel) is None
    # A subnormal matrix whose quantisation really errs: the bound still covers it.
    W = np.array([[5e-324, 1.5e-323, -2.5e-323]])
    top = np.abs(W).max(axis=1, keepdims=True) if per_channel else np.abs(W).max()
    for bits in (2, 3):
        step = top / (2 ** (bits - 1) - 1)
        error = np.abs(W - np.round(W / step) * step).max()
        assert error <= float(thresholds.quantisation_error(W, bits, per_channel))
    assert thresholds.quantisation_error(np.zeros((2, 2)), 2) == 0
