"""The certified layers: ``z = W h + b`` for every operator with a weight parameter.

Dense (``linear``, ``addmm``, ``mm``/``matmul`` by a weight) acts on the last axis, so a
Linear layer over a sequence ``(B, *positions, n)`` is the batch case of THEORY.md section 2
like a convolution: ``Z = W P + b`` with the layer input as columns ``P`` ``(B, n, L)``
(``L`` positions; one column for a plain dense input). Convolutions (``conv1d``, ``conv2d``;
any stride, padding, dilation; one group) have the im2col patches as ``P`` and the kernel
reshaped to ``c_out x (c_in k)`` as ``W`` (section 4). A batch norm right after the layer is
folded into it (``fold_batchnorm``), so the weight certified is the deployed, folded one.

``FixedAffine`` is the same dense map with a weight that is not certified: the recurrent
weight of an unrolled LSTM, GRU or RNN, which every time step uses (``certify.capture.recurrent``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certify.closed_forms.thresholds import singular_values_upper
from certify.graph.operators.base import EPS, ROUND, Operator, adjoints, row_sum
from certify.graph.operators.enclosure import Enclosure


@dataclass(frozen=True, eq=False)
class Affine(Operator):
    weight: torch.Tensor  # (m, n) dense; (c_out, c_in, k) or (c_out, c_in, k_h, k_w) conv
    bias: torch.Tensor  # (m,)
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()

    @property
    def is_conv(self) -> bool:
        return self.weight.ndim > 2

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as a matrix ``(m, n)``: a kernel is reshaped to ``c_out x (c_in k)``."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def with_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Affine":
        return Affine(weight.reshape(self.weight.shape), self.bias if bias is None else bias,
                      self.stride, self.padding, self.dilation)

    def linear(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``W x`` without the bias (``weight`` replaces ``W``)."""
        W = self.weight if weight is None else weight
        if not self.is_conv:
            return x @ W.T
        conv = F.conv1d if W.ndim == 3 else F.conv2d
        return conv(x, W, None, self.stride, self.padding, self.dilation)

    def __call__(self, x):
        if not self.is_conv:
            return F.linear(x, self.weight, self.bias)
        conv = F.conv1d if self.weight.ndim == 3 else F.conv2d
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def _bias_rows(self, shape) -> torch.Tensor:
        """The bias broadcast to one output ``shape``."""
        b = self.bias if not self.is_conv else self.bias.reshape(-1, *[1] * (len(shape) - 1))
        return b.expand(shape)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as columns ``P`` ``(B, n, L)``: dense inputs ``(B, *positions, n)``
        (``L = 1`` for ``(B, n)``), convolutions their im2col patches."""
        if not self.is_conv:
            return x.reshape(len(x), -1, x.shape[-1]).transpose(1, 2)
        if self.weight.ndim == 3:  # conv1d as conv2d on a height-one map
            k = (1, self.weight.shape[-1])
            return F.unfold(x[:, :, None], k, dilation=(1, *self.dilation),
                            padding=(0, *self.padding), stride=(1, *self.stride))
        return F.unfold(x, self.weight.shape[-2:], dilation=self.dilation,
                        padding=self.padding, stride=self.stride)

    def columns(self, Z: torch.Tensor) -> torch.Tensor:
        """The output ``(B, *out)`` as columns ``(B, m, L)``, matching ``patches``."""
        if not self.is_conv:
            return Z.reshape(len(Z), -1, Z.shape[-1]).transpose(1, 2)
        return Z.reshape(*Z.shape[:2], -1)

    def uncolumns(self, Z: torch.Tensor, shape) -> torch.Tensor:
        """Inverse of ``columns``: ``(B, m, L)`` back to ``(B, *shape)``."""
        if not self.is_conv:
            return Z.transpose(1, 2).reshape(len(Z), *shape)
        return Z.reshape(len(Z), *shape)

    @property
    def overlap(self) -> int:
        """How many patches one input entry can lie in (1 for dense layers)."""
        if not self.is_conv:
            return 1
        count = 1
        for k, d, s in zip(self.weight.shape[2:], self.dilation, self.stride):
            # A dilated kernel touches k positions spread over (k - 1) d + 1; with stride s
            # an entry meets at most ceil(that / s) windows per axis, and never more than k.
            count *= min(k, math.ceil(((k - 1) * d + 1) / s))
        return count

    def interval(self, box):
        lo, hi = box
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        c = self(center)
        r = self.linear(radius, self.weight.abs()) * (1 + 1e-12)
        return c - r, c + r

    def times_weight(self, A: torch.Tensor, weight: torch.Tensor, in_shape) -> torch.Tensor:
        """Rows ``A`` ``(B, R, *out)`` composed with the linear part, ``weight`` for ``W``."""
        if not self.is_conv:
            return A @ weight
        (rows,) = adjoints(lambda x: self.linear(x, weight), A, [in_shape])
        return rows

    def backward(self, A, boxes, lower):
        d = row_sum(A * self._bias_rows(A.shape[2:]))
        return (self.times_weight(A, self.weight, boxes[0][0].shape[1:]),), d, None

    def enclose(self, inputs, boxes):
        shift = self.bias.reshape(-1, *[1] * (self.weight.ndim - 2))
        return Enclosure.through(self.linear, lambda x: self.linear(x, self.weight.abs()),
                                 inputs, shift)

    def jacobian(self, rows, boxes):
        lo, hi = rows
        shape = boxes[0][0].shape[1:]
        center = self.times_weight((hi + lo) / 2, self.weight, shape)
        radius = self.times_weight((hi - lo) / 2, self.weight.abs(), shape)
        radius = radius * (1 + ROUND) + ROUND * center.abs()
        return ((center - radius, center + radius),)

    def operator_norm(self, norm: str) -> float:
        """Rigorous upper bound of the operator norm of ``h -> W h`` (section 5): l2
        ``sqrt(overlap) sigma_max(W)`` (every entry lies in at most ``overlap`` patches, so
        ``||P(x)||_F <= sqrt(overlap) ||x||_2``); l_inf the largest row l1 norm, inflated by
        ``n eps`` for the summation (padding only removes terms). Computed once per weight
        (an SVD for l2): cached with the weight's version, which in-place changes bump."""
        key = (norm, self.weight._version)
        if key not in self._norms:
            W = self.matrix
            self._norms[key] = (
                math.sqrt(self.overlap) * float(singular_values_upper(W)[0]) if norm == "fro"
                else float(W.abs().sum(dim=1).max()) * (1 + W.shape[1] * EPS))
        return self._norms[key]

    @functools.cached_property
    def _norms(self) -> dict:
        return {}

    def lipschitz(self, norm, in_shapes):
        return (self.operator_norm(norm),)

    def reach_interval(self, box, nominal, reach):
        """``nominal_out +- ||W_i restricted to the inputs that vary||_2 reach``: the output
        box when ``||x - nominal||_2 <= reach`` (l2 geometry), per output entry."""
        varies = (box[1] > box[0]).to(self.weight.dtype)
        rows = torch.sqrt(self.linear(varies, self.weight**2)) * (1 + ROUND)
        center = self(nominal)
        spread = rows * reach.reshape(-1, *[1] * (center.ndim - 1)) * (1 + ROUND)
        return center - spread, center + spread


@dataclass(frozen=True, eq=False)
class FixedAffine(Operator):
    """``z = W h + b`` on the last axis with ``W`` and ``b`` constants of the network, not a
    certified layer (not in ``Graph.affine_indices``): a weight that several nodes use, the
    hidden-to-hidden weight of a recurrence at every time step. A certificate perturbs one
    node, and a change of the weight moves every use at once, so no use is certified on its
    own. Every rule is ``Affine``'s."""

    weight: torch.Tensor  # (m, n)
    bias: torch.Tensor  # (m,)

    @functools.cached_property
    def map(self) -> Affine:
        return Affine(self.weight, self.bias)

    def __call__(self, x):
        return self.map(x)

    def interval(self, box):
        return self.map.interval(box)

    def backward(self, A, boxes, lower):
        return self.map.backward(A, boxes, lower)

    def enclose(self, inputs, boxes):
        return self.map.enclose(inputs, boxes)

    def jacobian(self, rows, boxes):
        return self.map.jacobian(rows, boxes)

    def lipschitz(self, norm, in_shapes):
        return self.map.lipschitz(norm, in_shapes)


def fold_batchnorm(affine: Affine, weight, bias, mean, var, eps: float) -> Affine:
    """``gamma (W h + b - mu) / sqrt(var + eps) + beta`` as one affine layer."""
    scale = (weight if weight is not None else 1.0) / torch.sqrt(var + eps)
    shift = bias if bias is not None else 0.0
    shape = (-1,) + (1,) * (affine.weight.ndim - 1)
    return Affine(affine.weight * scale.reshape(shape), (affine.bias - mean) * scale + shift,
                  affine.stride, affine.padding, affine.dilation)
