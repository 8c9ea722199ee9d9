"""Defects in ``certify.perturbation`` found by the oracle tests, pinned as strict xfails.

Each test states the behaviour the API documents (or that THEORY.md implies) and fails
today. ``strict=True``: once the defect is fixed the test XPASSes, which fails the run; then
drop the ``xfail`` marker (or move the test to ``test_regressions.py``) so it guards the fix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import certify


def scaled_fro(D: np.ndarray) -> float:
    """||D||_F without overflow or underflow: divide by a power of two first (exact)."""
    s = float(np.ldexp(1.0, int(np.frexp(np.max(np.abs(D)))[1])))
    return s * float(np.linalg.norm(D / s))


@pytest.mark.xfail(strict=True, reason="class_pair_radius computes its VALUE with the "
                   "unscaled kernels.class_pair_fro/spectral: ||h||_2 over/underflows, so the "
                   "value is 0 (||h|| > ~1e154) or inf (< ~1e-154) while the minimiser, which "
                   "goes through the rescaled margin_functional, is right")
@pytest.mark.parametrize("norm", ["fro", "spectral"])
@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_class_pair_radius_value_at_extreme_scales(norm, scale):
    # logits (1, 0): m = 1; h = (s, s): ||h||_2 = sqrt(2) s; radius 1 / (sqrt(2) sqrt(2) s).
    result = certify.class_pair_radius([1.0, 0.0], [scale, scale], norm)
    assert scaled_fro(result.minimiser.numpy()) == pytest.approx(1 / (2 * scale), rel=1e-12,
                                                                 abs=0)
    assert float(result.value) == pytest.approx(1 / (2 * scale), rel=1e-12, abs=0)


@pytest.mark.xfail(strict=True, reason="batch_target_change takes the Frobenius VALUE from "
                   "torch.linalg.matrix_norm(D, 'fro'), which over/underflows: ||D||_F ~ 1e-170 "
                   "gives 0, ~1e-160 loses 5 digits (subnormal squares), ~1e160 gives inf")
@pytest.mark.parametrize("scale", [1e160, 1e-160, 1e-170])
def test_batch_target_change_fro_value_at_extreme_scales(scale):
    rng = np.random.default_rng(0)
    H, X = rng.standard_normal((3, 3)), rng.standard_normal((2, 3))
    result = certify.batch_target_change(scale * (X @ H), H, "fro")
    D = result.minimiser.numpy()
    # The minimiser itself is right (pinv is scale-safe); its norm must be the value.
    assert scaled_fro(D) == pytest.approx(scale * np.linalg.norm(X), rel=1e-9, abs=0)
    assert float(result.value) == pytest.approx(scaled_fro(D), rel=1e-12, abs=0)
