"""Numpy twin of ``certify.graph.operators.Affine``: ``z = W h + b``.

Dense layers act on the last axis (a sequence ``(*positions, n)`` is the batch case of
THEORY.md section 2: the positions are the columns ``P``); convolutions (1-D as 2-D on a
height-one map) on their im2col patches, taken with ``sliding_window_view`` in torch's
``unfold`` order (channel, kernel row, kernel column; positions row-major), and the
adjoint of im2col (``fold``) scatters the columns back, summing overlaps.

``FixedAffineTwin``, the twin of ``certify.graph.operators.FixedAffine`` (a dense map whose
weight is not certified: a recurrent weight), has the same rules but is not a layer.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from certify.check.operators.base import (EPS, ROUND, Twin, overlap, per_input, row_sum,
                                          spectral_upper)
from certify.check.operators.enclosure import Enclosure


def _geometry(kernel, stride, padding, dilation):
    """Everything as 2-D: a 1-D convolution runs on a height-one map."""
    if len(kernel) == 1:
        return (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    return tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)


def unfold(x: np.ndarray, kernel, stride, padding, dilation) -> np.ndarray:
    """im2col of ``(N, C, H, W)``: ``(N, C k_h k_w, L)``, ``L`` the output positions."""
    (k_h, k_w), (s_h, s_w), (p_h, p_w), (d_h, d_w) = kernel, stride, padding, dilation
    x = np.pad(x, ((0, 0), (0, 0), (p_h, p_h), (p_w, p_w)))
    span = ((k_h - 1) * d_h + 1, (k_w - 1) * d_w + 1)
    windows = sliding_window_view(x, span, axis=(2, 3))[:, :, ::s_h, ::s_w, ::d_h, ::d_w]
    N, C, H, W = windows.shape[:4]
    return windows.transpose(0, 1, 4, 5, 2, 3).reshape(N, C * k_h * k_w, H * W)


def fold(cols: np.ndarray, shape, kernel, stride, padding, dilation) -> np.ndarray:
    """Adjoint of ``unfold``: ``(N, C k_h k_w, L)`` to ``(N, *shape)``, ``shape = (C, H, W)``."""
    (k_h, k_w), (s_h, s_w), (p_h, p_w), (d_h, d_w) = kernel, stride, padding, dilation
    N, (C, H, W) = len(cols), shape
    H_out = (H + 2 * p_h - (k_h - 1) * d_h - 1) // s_h + 1
    W_out = (W + 2 * p_w - (k_w - 1) * d_w - 1) // s_w + 1
    out = np.zeros((N, C, H + 2 * p_h, W + 2 * p_w))
    cols = cols.reshape(N, C, k_h, k_w, H_out, W_out)
    for i in range(k_h):
        for j in range(k_w):
            out[:, :, i * d_h: i * d_h + s_h * (H_out - 1) + 1: s_h,
                j * d_w: j * d_w + s_w * (W_out - 1) + 1: s_w] += cols[:, :, i, j]
    return out[:, :, p_h: p_h + H, p_w: p_w + W]


class AffineTwin(Twin):
    def __init__(self, op, in_shapes, out_shape, weight: np.ndarray | None = None):
        super().__init__(op, in_shapes, out_shape)
        self.op = op
        self.weight = np.array(op.weight.detach().numpy() if weight is None else weight,
                               dtype=np.float64).reshape(tuple(op.weight.shape))
        self.bias = np.array(op.bias.detach().numpy(), dtype=np.float64)
        self.is_conv = self.weight.ndim > 2
        if self.is_conv:
            self.geometry = _geometry(self.weight.shape[2:], op.stride, op.padding, op.dilation)

    def with_weight(self, weight: np.ndarray) -> AffineTwin:
        """The same layer with the weight (matrix or kernel) ``weight``."""
        return AffineTwin(self.op, self.in_shapes, self.out_shape, weight)

    @property
    def matrix(self) -> np.ndarray:
        return self.weight.reshape(self.weight.shape[0], -1)

    @property
    def overlap(self) -> int:
        if not self.is_conv:
            return 1
        kernel, stride, _, dilation = self.geometry
        return overlap(kernel, stride, dilation)

    def _maps(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``(B, C, *spatial)`` as ``(B, C, H, W)``."""
        shape = self.in_shapes[0]
        if self.weight.ndim == 3:
            return x.reshape(-1, shape[0], 1, shape[1])
        return x.reshape(-1, *shape)

    def patches(self, x: np.ndarray) -> np.ndarray:
        """The input ``(B, *in)`` as columns ``(B, n, L)`` (dense: the positions)."""
        B = len(x)
        if not self.is_conv:
            return x.reshape(B, -1, x.shape[-1]).transpose(0, 2, 1)
        return unfold(self._maps(x), *self.geometry)

    def columns(self, Z: np.ndarray) -> np.ndarray:
        """The output ``(B, *out)`` as columns ``(B, m, L)``, matching ``patches``."""
        if not self.is_conv:
            return Z.reshape(len(Z), -1, Z.shape[-1]).transpose(0, 2, 1)
        return Z.reshape(*Z.shape[:2], -1)

    def uncolumns(self, Z: np.ndarray) -> np.ndarray:
        """Inverse of ``columns``: ``(B, m, L)`` back to ``(B, *out)``."""
        if not self.is_conv:
            return Z.transpose(0, 2, 1).reshape(len(Z), *self.out_shape)
        return Z.reshape(len(Z), *self.out_shape)

    def linear(self, x: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        """``W x`` without the bias (``weight``: another matrix for ``W``), ``(B, *out)``."""
        W = self.matrix if weight is None else weight.reshape(self.weight.shape[0], -1)
        if not self.is_conv:
            return x @ W.T
        return self.uncolumns(np.matmul(W, self.patches(x)))

    def bias_full(self, shape) -> np.ndarray:
        """The bias broadcast to the output ``shape``."""
        if not self.is_conv:
            return np.broadcast_to(self.bias, shape)
        return np.broadcast_to(self.bias.reshape(-1, *[1] * (len(shape) - 1)), shape)

    def __call__(self, x):
        return self.linear(x) + self.bias_full(self.out_shape)

    def times_weight(self, A: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Rows ``A`` ``(B, R, *out)`` composed with ``h -> weight h``: ``(B, R, *in)``."""
        W = weight.reshape(self.weight.shape[0], -1)
        if not self.is_conv:
            return A @ W
        B, R = A.shape[:2]
        m = self.weight.shape[0]
        cols = np.einsum("mn,bml->bnl", W, A.reshape(B * R, m, -1))
        in_shape = self.in_shapes[0]
        maps = (in_shape[0], 1, in_shape[1]) if self.weight.ndim == 3 else in_shape
        return fold(cols, maps, *self.geometry).reshape(B, R, *in_shape)

    def interval(self, box):
        lo, hi = box
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        c = self(center)
        r = self.linear(radius, np.abs(self.matrix)) * (1 + 1e-12)
        return c - r, c + r

    def backward(self, A, boxes, lower):
        d = row_sum(A * self.bias_full(A.shape[2:]))
        return (self.times_weight(A, self.matrix),), d, None

    def jacobian(self, rows, boxes):
        lo, hi = rows
        center = self.times_weight((hi + lo) / 2, self.matrix)
        radius = self.times_weight((hi - lo) / 2, np.abs(self.matrix))
        radius = radius * (1 + ROUND) + ROUND * np.abs(center)
        return ((center - radius, center + radius),)

    def enclose(self, inputs, boxes):
        shift = self.bias.reshape(-1, *[1] * (self.weight.ndim - 2))
        return Enclosure.through(self.linear, lambda x: self.linear(x, np.abs(self.matrix)),
                                 inputs, shift)

    def gradient(self, A, xs):
        return (self.times_weight(A, self.matrix),)

    def operator_norm(self, norm: str) -> float:
        """Upper bound of the operator norm of ``h -> W h``: l2 ``sqrt(overlap)
        sigma_max(W)`` (an entry lies in at most ``overlap`` patches); l_inf the largest
        row l1 norm, inflated by ``n eps`` for its sum (padding only removes terms)."""
        W = self.matrix
        if norm == "fro":
            return math.sqrt(self.overlap) * spectral_upper(W)
        return float(np.abs(W).sum(axis=1).max()) * (1 + W.shape[1] * EPS)

    def lipschitz(self, norm):
        return (self.operator_norm(norm),)

    def reach_interval(self, box, nominal, reach):
        """``nominal_out +- ||W_i on the entries that vary||_2 reach`` when
        ``||x - nominal||_2 <= reach`` (per input)."""
        varies = (box[1] > box[0]).astype(np.float64)
        rows = np.sqrt(self.linear(varies, self.matrix ** 2)) * (1 + ROUND)
        center = self(nominal)
        spread = rows * per_input(reach, center.ndim) * (1 + ROUND)
        return center - spread, center + spread


class FixedAffineTwin(Twin):
    """The dense map ``z = W h + b`` of a weight that is not certified: ``AffineTwin``'s
    rules, but not an ``AffineTwin`` (the checker's layers are those)."""

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.map = AffineTwin(op, in_shapes, out_shape)

    def __call__(self, x):
        return self.map(x)

    def interval(self, box):
        return self.map.interval(box)

    def backward(self, A, boxes, lower):
        return self.map.backward(A, boxes, lower)

    def jacobian(self, rows, boxes):
        return self.map.jacobian(rows, boxes)

    def enclose(self, inputs, boxes):
        return self.map.enclose(inputs, boxes)

    def gradient(self, A, xs):
        return self.map.gradient(A, xs)

    def lipschitz(self, norm):
        return self.map.lipschitz(norm)
