"""Section 6 error bounds against real compression operators applied to the weights."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from certify.closed_forms import thresholds

SCALES = st.floats(-6, 6).map(lambda e: 10.0**e)


@st.composite
def weights(draw, max_dim: int = 12) -> np.ndarray:
    m, n = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    entries = draw(arrays(np.float64, (m, n), elements=st.floats(-1, 1)))
    if draw(st.booleans()):  # low rank: W = A B
        k = draw(st.integers(1, min(m, n)))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        entries = rng.normal(size=(m, k)) @ rng.normal(size=(k, n))
    return entries * draw(SCALES)


def truncate(W: np.ndarray, rank: int) -> np.ndarray:
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    return (U[:, :rank] * s[:rank]) @ Vt[:rank]


@given(weights(), st.data())
def test_truncation_error_bounds_real_truncation(W, data):
    rank = data.draw(st.integers(0, min(W.shape)))
    error = W - truncate(W, rank)
    bound = thresholds.truncation_error(W)
    scale = np.linalg.norm(W, 2)
    tol = 1e-12 * scale  # the residual itself is computed in floating point
    assert np.linalg.norm(error, 2) <= float(bound.spectral[rank]) + tol
    assert np.linalg.norm(error, "fro") <= float(bound.frobenius[rank]) + tol
    # Tight: Eckart-Young-Mirsky is an identity, not just a bound.
    assert float(bound.spectral[rank]) <= np.linalg.norm(error, 2) + 1e-9 * scale + 1e-300


@given(weights(), st.floats(0.0, 1.0), st.data())
def test_threshold_rank_is_the_smallest_safe_rank(W, fraction, data):
    sigma = np.linalg.svd(W, compute_uv=False)
    radius = fraction * sigma[0] * 1.5
    r = thresholds.threshold_rank(W, radius)
    errors = [np.linalg.norm(W - truncate(W, k), 2) for k in range(min(W.shape) + 1)]
    if r < min(W.shape):  # at full rank nothing is truncated
        assert errors[r] < radius or errors[r] == 0.0  # a zero error changes nothing
    if r > 0:  # one rank less is not certified (up to the documented safety margins: the
        # relative 1e-9 and the SVD slack added to every singular value)
        slack = thresholds.SVD_SLACK * max(W.shape) * np.finfo(float).eps * sigma[0]
        assert errors[r - 1] + slack >= radius * (1 - 1e-9)


@given(weights(), st.data())
def test_truncation_change_is_exact(W, data):
    rank = data.draw(st.integers(0, min(W.shape)))
    # Moderate entries: numpy's oracle norm squares them, which underflows below ~1e-154.
    entries = st.floats(-1e3, 1e3).filter(lambda x: x == 0 or abs(x) > 1e-100)
    h = data.draw(arrays(np.float64, (3, W.shape[1]), elements=entries))
    change = thresholds.truncation_change(W, h, rank).numpy()
    change_z = (W - truncate(W, rank)) @ h.T
    # numpy's norm squares its entries, which underflows for tiny W: scale them first.
    top = np.abs(change_z).max(axis=0)
    actual = top * np.linalg.norm(change_z / np.where(top > 0, top, 1.0), axis=0)
    np.testing.assert_allclose(change, actual, rtol=1e-7, atol=1e-9 * np.abs(W).max() * np.abs(h).max())


def quantise(W: np.ndarray, bits: int, per_channel: bool) -> np.ndarray:
    top = np.abs(W).max(axis=1, keepdims=True) if per_channel else np.abs(W).max()
    step = top / (2 ** (bits - 1) - 1)
    step = np.where(step == 0, 1.0, step)
    levels = 2 ** (bits - 1) - 1
    return np.clip(np.round(W / step), -levels, levels) * step


@given(weights(), st.integers(2, 16), st.booleans())
def test_quantisation_error_bounds_real_quantisation(W, bits, per_channel):
    actual = np.abs(W - quantise(W, bits, per_channel)).max()
    assert actual <= float(thresholds.quantisation_error(W, bits, per_channel))


@given(weights(), st.floats(1e-6, 1.0), st.booleans())
def test_threshold_bits_is_minimal(W, fraction, per_channel):
    radius = fraction * np.abs(W).max()
    b = thresholds.threshold_bits(W, radius, per_channel)
    if np.abs(W).max() == 0:
        assert b == 2
        return
    if b is None:  # not even 64 bits: the bound there must not be below the radius
        assert float(thresholds.quantisation_error(W, 64, per_channel)) >= radius * (1 - 1e-12)
        return
    assert np.abs(W - quantise(W, b, per_channel)).max() < radius
    if b > 2:  # the bound at b - 1 bits is not below the radius
        assert float(thresholds.quantisation_error(W, b - 1, per_channel)) >= radius * (1 - 1e-12)


@given(weights(), st.data())
def test_pruning_error_matches_real_pruning(W, data):
    k = data.draw(st.integers(0, W.size))
    order = np.argsort(np.abs(W), axis=None, kind="stable")
    pruned = W.flatten().copy()
    pruned[order[:k]] = 0.0
    error = W.flatten() - pruned
    bound = thresholds.pruning_error(W)
    assert np.abs(error).max(initial=0.0) == float(bound.max[k])
    assert np.linalg.norm(error) <= float(bound.frobenius[k])
    assert float(bound.frobenius[k]) <= np.linalg.norm(error) * (1 + 1e-12) + 1e-300


@given(weights(), st.floats(0.0, 1.0))
def test_threshold_prune_ratio_is_safe_and_maximal(W, fraction):
    radius = fraction * np.abs(W).max()
    ratio = thresholds.threshold_prune_ratio(W, radius_max=radius)
    k = round(ratio * W.size)
    magnitudes = np.sort(np.abs(W), axis=None)
    largest_pruned = magnitudes[:k].max(initial=0.0)
    assert largest_pruned < radius or largest_pruned == 0.0  # pruning zeros changes nothing
    if k < W.size:
        assert magnitudes[k] >= radius * (1 - 1e-12)


def test_bad_inputs_are_named():
    import pytest

    with pytest.raises(ValueError, match="matrix"):
        thresholds.threshold_rank(np.ones(3), 1.0)
    with pytest.raises(ValueError, match="bits"):
        thresholds.quantisation_step(np.ones((2, 2)), 1)
    with pytest.raises(ValueError, match="radius"):
        thresholds.threshold_prune_ratio(np.ones((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        thresholds.truncation_error(torch.tensor([[float("nan")]]))
