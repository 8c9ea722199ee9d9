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
* Residual blocks (``Save``/``Swap``/``Add`` steps of ``certify.network``): the constant of
  ``f(x) + g(x)`` is at most ``L_f + L_g`` (triangle inequality, any norm), so constants are
  combined by the same stack machine as the values (``downstream_constant``).
"""

from __future__ import annotations

import math

import torch

from certify.compression import singular_values_upper
from certify.network import STACK_STEPS, Activation, Add, Affine, Save, Swap

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


def step_lipschitz(step, norm: str) -> float | None:
    """Lipschitz constant of any step in the l2 (``"fro"``) or l_inf (``"max"``) geometry:
    operator norms for affine steps, ``sup |phi'|`` for activations, the pooling constants;
    ``None`` for the stack steps, which ``downstream_constant`` combines instead."""
    if isinstance(step, STACK_STEPS):
        return None
    if isinstance(step, Affine):
        return operator_norm_l2(step) if norm == "fro" else operator_norm_linf(step)
    if isinstance(step, Activation):
        return step.lipschitz
    return step.lipschitz_l2 if norm == "fro" else step.lipschitz_linf


def downstream_constant(steps, constants) -> float:
    """Lipschitz constant of the map from the current value before ``steps`` to the current
    value after them, the values already on the stack held fixed (THEORY.md sections 4, 5).

    ``constants[i]`` is ``step_lipschitz(steps[i])``. The constants run through the stack
    machine of the values: a step multiplies the current one, ``Save`` pushes it, ``Swap``
    exchanges it with the top, ``Add`` gives ``L_current + L_popped`` (``||f + g||_Lip <=
    ||f||_Lip + ||g||_Lip``); a value saved before ``steps`` is a constant, ``L = 0``. Without
    residual blocks this is the product ``1 * c_0 * c_1 ...``, in that order.
    """
    current, saved = 1.0, []
    for step, constant in zip(steps, constants):
        if isinstance(step, Save):
            saved.append(current)
        elif isinstance(step, Swap):
            top = saved.pop() if saved else 0.0
            saved.append(current)
            current = top
        elif isinstance(step, Add):
            current = current + (saved.pop() if saved else 0.0)
        else:
            current = current * constant
    return current
