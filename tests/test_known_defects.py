"""Defects in ``certify.perturbation`` found by the oracle tests, pinned as strict xfails.

Each test states the behaviour the API documents (or that THEORY.md implies) and fails
today. ``strict=True``: once the defect is fixed the test XPASSes, which fails the run, and
the ``xfail`` marker must be removed -- the test then guards the fix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import certify


@pytest.mark.xfail(strict=True, reason="class_pair_radius returns inf for h = 0 even when "
                   "the top logits already tie (margin 0, so the radius is 0)")
def test_class_pair_h_zero_with_tied_logits_has_radius_zero():
    # Docstring: value is the smallest ||D|| that makes some class tie with the predicted
    # one. With logits (1, 1, 0) classes 0 and 1 already tie: D = 0 does it, radius 0
    # (margin_functional agrees: m = 0 gives value 0 even when c h^T = 0).
    result = certify.class_pair_radius([1.0, 1.0, 0.0], [0.0, 0.0], "fro")
    assert float(certify.margin_functional([1.0, -1.0, 0.0], [0.0, 0.0], 0.0).value) == 0.0
    assert float(result.value) == 0.0


@pytest.mark.xfail(strict=True, reason="canonical_norm rejects numpy integers as p with a "
                   "misleading message ('needs a number p >= 1, got np.int64(3)')")
def test_numpy_integer_exponent_is_a_number():
    by_int = certify.target_change([1.0, 2.0], [1.0, -1.0], np.int64(3))
    by_float = certify.target_change([1.0, 2.0], [1.0, -1.0], 3.0)
    assert float(by_int.value) == float(by_float.value)


@pytest.mark.xfail(strict=True, raises=(RuntimeError, AssertionError),
                   reason="batch_target_change lets torch's RuntimeError through for batch "
                   "shapes that do not broadcast (the rank-one API raises ValueError)")
def test_batch_target_change_batch_mismatch_is_value_error():
    with pytest.raises(ValueError, match="broadcast"):
        certify.batch_target_change(np.ones((2, 3, 4)), np.ones((5, 2, 4)))


@pytest.mark.xfail(strict=True, reason="Frobenius/spectral kernels square ||h||_2 (and "
                   "torch.linalg.vector_norm does not rescale): ||h|| > ~1e154 gives D* = 0 "
                   "and value 0, ||h|| < ~1e-154 gives inf, silently")
@pytest.mark.parametrize("norm", ["fro", "spectral"])
@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_frobenius_closed_form_at_extreme_scales(norm, scale):
    # THEORY.md section 1: D* = r h^T / ||h||_2^2, value ||r||_2 / ||h||_2 -- both finite
    # and representable here (1e-160 .. 1e170), and D* h = r must hold.
    r, h = np.array([1.0]), np.array([scale, scale])
    result = certify.target_change(r, h, norm)
    D = result.minimiser.numpy()
    assert float(result.value) == pytest.approx(1.0 / (math.sqrt(2.0) * scale), rel=1e-12, abs=0)
    assert D @ h == pytest.approx(r, rel=1e-12, abs=0)
