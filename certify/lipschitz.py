"""Rigorous upper bounds of layer norms: THEORY.md section 5.

A certificate may only use UPPER bounds of operator norms. Power iteration approaches the
spectral norm from below and is never used here.

* Dense spectral norm: the float64 SVD's ``sigma_1``, inflated by the LAPACK backward-error
  margin ``SVD_SLACK * max(m, n) * eps * sigma_1`` (see ``certify.compression``).
* Convolution as an operator on the whole feature map: ``Z = W P(x)``, and every input entry
  lies in at most ``ceil(k_h / s_h) ceil(k_w / s_w)`` patches, so
  ``||P(x)||_F <= sqrt(that count) ||x||_2`` and ``||conv||_2 <= sqrt(count) ||W||_2``.
* ``l_inf -> l_inf`` norms (entrywise-max certificates): the largest absolute row sum of
  the weight matrix, exact for dense layers and an upper bound for convolutions (padding
  only removes terms). Sums are inflated by ``n eps`` for the rounding of the summation.
"""

from __future__ import annotations

import math

import torch

from certify.compression import singular_values_upper
from certify.network import Activation, Affine

EPS = torch.finfo(torch.float64).eps


def spectral_norm_upper(weight: torch.Tensor) -> float:
    """Rigorous upper bound of ``||W||_2`` for a matrix ``W`` (section 5)."""
    return float(singular_values_upper(weight)[0])


def patch_overlap(layer: Affine) -> int:
    """How many patches of a convolution one input entry can lie in (1 for dense layers)."""
    if not layer.is_conv:
        return 1
    k_h, k_w = layer.weight.shape[-2:]
    d_h, d_w = layer.dilation
    s_h, s_w = layer.stride
    # A dilated kernel touches k positions spread over (k - 1) d + 1; with stride s an entry
    # meets at most ceil(k / s) windows per axis when d = 1, and never more than k.
    return min(k_h, math.ceil(((k_h - 1) * d_h + 1) / s_h)) * min(
        k_w, math.ceil(((k_w - 1) * d_w + 1) / s_w)
    )


def operator_norm_l2(layer: Affine) -> float:
    """Upper bound of the layer's l2 operator norm (the map ``h -> W h``, or ``x -> conv(x)``)."""
    return math.sqrt(patch_overlap(layer)) * spectral_norm_upper(layer.matrix)


def operator_norm_linf(layer: Affine) -> float:
    """Upper bound of the layer's ``l_inf -> l_inf`` operator norm: the largest row l1 norm."""
    W = layer.matrix
    return float(W.abs().sum(dim=1).max()) * (1 + W.shape[1] * EPS)


def step_lipschitz(step, norm: str) -> float:
    """Lipschitz constant of any step in the l2 (``"fro"``) or l_inf (``"max"``) geometry:
    operator norms for affine steps, ``sup |phi'|`` for activations, the pooling constants."""
    if isinstance(step, Affine):
        return operator_norm_l2(step) if norm == "fro" else operator_norm_linf(step)
    if isinstance(step, Activation):
        return step.lipschitz
    return step.lipschitz_l2 if norm == "fro" else step.lipschitz_linf
