"""Compression errors and thresholds: THEORY.md section 6.

A compression ``g`` is harmless on an input when ``||W - g(W)||`` is below that input's
certified radius in the matching norm. The functions here bound ``||W - g(W)||`` from above
(soundly, in float64) and turn a radius into the threshold compression level:

=============================  ========================================  ==============
compression                    error bound                               norm
=============================  ========================================  ==============
SVD truncation to rank ``r``   ``sigma_{r+1}``; ``sqrt(sum_{i>r} s_i^2)``  spectral; Fro.
symmetric quantisation, ``b``  ``s/2``, ``s = max|W| / (2^(b-1) - 1)``     entrywise max
magnitude pruning              largest pruned ``|w|``; ``||pruned||_F``    max; Fro.
=============================  ========================================  ==============

Floating point. Singular values from LAPACK carry an absolute error of at most a small
multiple of ``eps ||W||_2``; every singular value used as an upper bound is inflated by
``SVD_SLACK * max(m, n) * eps * sigma_1`` (a documented safety margin, far above LAPACK's
observed error). Comparisons with a radius add a relative margin of ``COMPARE_SLACK``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.closed_forms.perturbation import as_float64, power_of_two_scale

EPS = torch.finfo(torch.float64).eps
SVD_SLACK = 8.0
COMPARE_SLACK = 1e-12
# Four times the smallest subnormal: the absolute rounding error of the few float64
# operations of quantisation (each at most half of it) when their results underflow.
UNDERFLOW = 4 * 2.0**-1074


def _matrix(W) -> torch.Tensor:
    W = as_float64(W, "W")
    if W.ndim != 2 or W.numel() == 0:
        raise ValueError(f"W must be a non-empty matrix (m, n), got shape {tuple(W.shape)}")
    return W


def singular_values_upper(W) -> torch.Tensor:
    """Upper bounds of the singular values of ``W``, in decreasing order (float64)."""
    W = _matrix(W)
    s = torch.linalg.svdvals(W)
    return s + SVD_SLACK * max(W.shape) * EPS * s[0]


def _below(error: torch.Tensor, radius) -> torch.Tensor:
    """``error < radius`` with the comparison's safety margin; a zero error changes nothing."""
    radius = torch.as_tensor(radius, dtype=torch.float64, device=error.device)
    return (error == 0) | (error * (1 + COMPARE_SLACK) < radius)


@dataclass(frozen=True)
class TruncationError:
    """Errors of SVD truncation to every rank ``r = 0 .. min(m, n)`` (index ``r``)."""

    spectral: torch.Tensor  # ||W - W_r||_2 = sigma_{r+1}
    frobenius: torch.Tensor  # ||W - W_r||_F = sqrt(sum_{i>r} sigma_i^2)


def truncation_error(W) -> TruncationError:
    """Eckart-Young-Mirsky error norms of rank-r truncation, for every ``r`` (section 6)."""
    s = singular_values_upper(W)
    zero = s.new_zeros(1)
    spectral = torch.cat([s, zero])
    tail = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0])
    frobenius = torch.cat([torch.sqrt(tail), zero])
    return TruncationError(spectral, frobenius)


def threshold_rank(W, radius) -> int:
    """Smallest ``r`` with ``sigma_{r+1} < radius``: truncation to any rank ``>= r`` is safe.

    ``radius`` is the smallest spectral (equivalently, for one input, Frobenius) radius
    of the inputs to protect. Returns ``min(m, n)`` when only the full matrix is safe.
    """
    spectral = truncation_error(W).spectral
    safe = _below(spectral, radius)
    return int(torch.nonzero(safe)[0, 0])


def truncation_change(W, h, rank: int) -> torch.Tensor:
    """Exact change of ``z`` on input ``h``: ``||(W - W_r) h|| = sqrt(sum_{i>r} s_i^2 (v_i^T h)^2)``.

    ``h`` has shape ``(..., n)``; an estimate in float64 (not an upper bound), to compare
    with the certified radius of each input.
    """
    W = _matrix(W)
    h = as_float64(h, "h")
    if h.shape[-1] != W.shape[1]:
        raise ValueError(f"h has {h.shape[-1]} features but W has {W.shape[1]} columns")
    _, s, Vh = torch.linalg.svd(W, full_matrices=False)
    coefficients = (h @ Vh[rank:].T) * s[rank:]
    if coefficients.shape[-1] == 0:  # nothing truncated
        return coefficients.new_zeros(coefficients.shape[:-1])
    # Scaled by a power of two (exact) first: the squares underflow for tiny W or h.
    scale = power_of_two_scale(coefficients)[..., None]
    return torch.linalg.vector_norm(coefficients / scale, dim=-1) * scale[..., 0]


def quantisation_step(W, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Step ``s = max|W| / (2^(b-1) - 1)`` of symmetric quantisation, per tensor or per row."""
    W = _matrix(W)
    if int(bits) != bits or bits < 2:
        raise ValueError(f"bits must be an integer >= 2, got {bits!r}")
    top = W.abs().amax(dim=1) if per_channel else W.abs().max()
    return top / (2 ** (int(bits) - 1) - 1)


def quantisation_error(W, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Entrywise-max error bound of round-to-nearest quantisation: ``max s / 2``, plus the
    float64 rounding of ``round(W / s) s`` (a division and a product, each within
    ``eps |W|``; ``3 eps max|W|`` covers both), plus ``UNDERFLOW`` for the absolute error
    of those operations among subnormal numbers, where relative bounds fail. An all-zero
    ``W`` quantises exactly (error 0)."""
    W = _matrix(W)
    top = W.abs().max()
    if top == 0:
        return top
    return quantisation_step(W, bits, per_channel).max() / 2 * (1 + 4 * EPS) + \
        3 * EPS * top + UNDERFLOW


def threshold_bits(W, radius_max, per_channel: bool = False, max_bits: int = 64) -> int | None:
    """Smallest ``b`` with ``s/2 < radius_max`` (entrywise-max radius), or ``None`` if even
    ``max_bits`` is not enough. Quantisation to ``>= b`` bits then cannot change a class."""
    for bits in range(2, max_bits + 1):
        if _below(quantisation_error(W, bits, per_channel), radius_max):
            return bits
    return None


@dataclass(frozen=True)
class PruningError:
    """Errors of pruning the ``k`` smallest magnitudes, for every ``k`` (index ``k``)."""

    max: torch.Tensor  # largest pruned magnitude
    frobenius: torch.Tensor  # norm of the pruned weights


def pruning_error(W) -> PruningError:
    """Error norms of magnitude pruning for every number of pruned weights (section 6)."""
    magnitudes = torch.sort(_matrix(W).abs().flatten()).values
    zero = magnitudes.new_zeros(1)
    largest = torch.cat([zero, magnitudes])
    frobenius = torch.cat([zero, torch.sqrt(torch.cumsum(magnitudes**2, 0))]) * (1 + 4 * EPS)
    return PruningError(largest, frobenius)


def threshold_prune_ratio(W, radius_max=None, radius_fro=None) -> float:
    """Largest fraction of smallest-magnitude weights that can be pruned safely.

    Safe if the largest pruned magnitude is below ``radius_max`` or the norm of the pruned
    weights is below ``radius_fro`` (either bound alone suffices; the best is returned).
    """
    if radius_max is None and radius_fro is None:
        raise ValueError("give radius_max (entrywise max) and/or radius_fro (Frobenius)")
    errors = pruning_error(W)
    safe = torch.zeros_like(errors.max, dtype=torch.bool)
    if radius_max is not None:
        safe |= _below(errors.max, radius_max)
    if radius_fro is not None:
        safe |= _below(errors.frobenius, radius_fro)
    # Both error sequences increase with k, so the safe k form a prefix.
    count = int(torch.nonzero(safe)[-1, 0])
    return count / (len(safe) - 1)


@dataclass(frozen=True)
class Thresholds:
    """The compression levels that provably change no certified prediction (section 6).

    ``rank``: truncation to any rank ``>= rank`` is safe. ``bits`` and ``bits_per_channel``:
    symmetric quantisation to ``>= bits`` (``None``: not even 64 bits). ``prune_ratio``: the
    largest safe fraction of smallest-magnitude weights.
    """

    rank: int
    bits: int | None
    bits_per_channel: int | None
    prune_ratio: float


def thresholds(W, radius: float, norm: str, dense: bool = True) -> Thresholds:
    """Thresholds of a weight matrix against the smallest certified radius in ``norm``.

    ``fro``: for one input of a dense layer the Frobenius and spectral radii coincide
    (section 4), so the truncation error is ``sigma_{r+1}``; for a convolution
    (``dense=False``) the radius is a Frobenius one and the error is the Frobenius tail.
    Quantisation error ``sqrt(m n) s / 2``; pruning error ``||P||_F``.
    ``max``: ``||E||_max <= ||E||_2 = sigma_{r+1}``; quantisation ``s / 2``; pruning the
    largest pruned magnitude.
    """
    W = _matrix(W)
    if norm == "fro":
        errors = truncation_error(W)
        safe = _below(errors.spectral if dense else errors.frobenius, radius)
        per_entry = radius / math.sqrt(W.numel())  # ||E||_F <= sqrt(m n) ||E||_max
        return Thresholds(
            int(torch.nonzero(safe)[0, 0]),
            threshold_bits(W, per_entry),
            threshold_bits(W, per_entry, per_channel=True),
            threshold_prune_ratio(W, radius_fro=radius),
        )
    if norm == "max":
        return Thresholds(
            threshold_rank(W, radius),
            threshold_bits(W, radius),
            threshold_bits(W, radius, per_channel=True),
            threshold_prune_ratio(W, radius_max=radius),
        )
    raise ValueError(f"norm must be 'fro' or 'max', got {norm!r}")
