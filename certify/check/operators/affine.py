"""Numpy twin of ``certify.graph.operators.Affine``: ``z = W h + b``.

Dense layers act on the last axis (a sequence ``(*positions, n)`` is the batch case of
THEORY.md section 2: the positions are the columns ``P``); convolutions (1-D as 2-D on a
height-one map) on their im2col patches, taken with ``sliding_window_view`` in torch's
``unfold`` order (channel, kernel row, kernel column; positions row-major), and the
adjoint of im2col (``fold``) scatters the columns back, summing overlaps.

Grouped convolutions: the patches of group ``i`` are the rows of its channels, laid side by
side as columns ``(n / g, g L)``; an output row keeps the block of its own group. A
transposed convolution runs as a convolution on its input with ``stride - 1`` zeros
inserted, padded by ``d (k - 1) - p`` (cropped where negative) and ``output_padding`` at the
end; the operator already holds the flipped, channel-swapped kernel of that convolution.

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
        self.groups = op.groups
        self.transposed = op.transposed
        if self.is_conv:
            stride, padding = op.stride, op.padding
            if self.transposed:  # a plain convolution on the stuffed input
                stride, padding = (1,) * len(stride), (0,) * len(padding)
            self.geometry = _geometry(self.weight.shape[2:], stride, padding, op.dilation)

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
        kernel, stride, _, dilation = self.geometry  # transposed: stride 1 on the stuffing
        return overlap(kernel, stride, dilation)

    def _maps(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``(B, C, *spatial)`` as ``(B, C, H, W)``, stuffed for a transposed layer."""
        shape = self.in_shapes[0]
        x = x.reshape(-1, *shape)
        if self.transposed:
            x = self._stuff(x)
        return x[:, :, None] if self.weight.ndim == 3 else x

    def _stuff_geometry(self):
        """Per spatial axis: (stride, zeros before, zeros after) of the stuffed input."""
        op = self.op
        return [(s, d * (k - 1) - p, d * (k - 1) - p + e) for k, s, p, d, e in zip(
            self.weight.shape[2:], op.stride, op.padding, op.dilation, op.output_padding)]

    def _stuff(self, x: np.ndarray) -> np.ndarray:
        for axis, (s, before, after) in enumerate(self._stuff_geometry(), start=2):
            n = x.shape[axis]
            out = np.zeros(x.shape[:axis] + ((n - 1) * s + 1,) + x.shape[axis + 1:])
            out[(slice(None),) * axis + (slice(None, None, s),)] = x
            x = np.pad(out, [(0, 0)] * axis + [(max(before, 0), max(after, 0))] +
                       [(0, 0)] * (x.ndim - axis - 1))
            x = x[(slice(None),) * axis + (slice(max(-before, 0), x.shape[axis] -
                                                 max(-after, 0)),)]
        return x

    def _unstuff(self, y: np.ndarray) -> np.ndarray:
        """Adjoint of ``_stuff``: crop the padding (zero-fill the cropped), take every
        ``stride``-th entry."""
        for axis, (s, before, after) in enumerate(self._stuff_geometry(), start=2):
            y = np.pad(y, [(0, 0)] * axis + [(max(-before, 0), max(-after, 0))] +
                       [(0, 0)] * (y.ndim - axis - 1))
            end = y.shape[axis] - max(after, 0)
            y = y[(slice(None),) * axis + (slice(max(before, 0), end, s),)]
        return y

    def patches(self, x: np.ndarray) -> np.ndarray:
        """The input ``(B, *in)`` as columns ``(B, n, L)`` (dense: the positions; ``g``
        groups: ``(B, n / g, g L)``)."""
        B = len(x)
        if not self.is_conv:
            return x.reshape(B, -1, x.shape[-1]).transpose(0, 2, 1)
        P = unfold(self._maps(x), *self.geometry)
        _, n, L = P.shape
        g = self.groups
        return P.reshape(B, g, n // g, L).transpose(0, 2, 1, 3).reshape(B, n // g, g * L)

    def columns(self, Z: np.ndarray) -> np.ndarray:
        """The output ``(B, *out)`` as columns ``(B, m, L)``, matching ``patches`` (``g``
        groups: ``(B, m, g L)``, zero off each row's own group)."""
        if not self.is_conv:
            return Z.reshape(len(Z), -1, Z.shape[-1]).transpose(0, 2, 1)
        B, m, g = len(Z), Z.shape[1], self.groups
        Z = Z.reshape(B, g, m // g, -1)
        out = np.zeros((B, g, m // g, g, Z.shape[-1]))
        for i in range(g):
            out[:, i, :, i] = Z[:, i]
        return out.reshape(B, m, -1)

    def uncolumns(self, Z: np.ndarray) -> np.ndarray:
        """Inverse of ``columns``: ``(B, m, L)`` back to ``(B, *out)``."""
        if not self.is_conv:
            return Z.transpose(0, 2, 1).reshape(len(Z), *self.out_shape)
        B, m, g = len(Z), Z.shape[1], self.groups
        Z = Z.reshape(B, g, m // g, g, -1)
        return np.stack([Z[:, i, :, i] for i in range(g)], axis=1).reshape(B, *self.out_shape)

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
        m, g = self.weight.shape[0], self.groups
        rows = A.reshape(B * R, g, m // g, -1)
        cols = np.einsum("gmn,bgml->bgnl", W.reshape(g, m // g, -1), rows)
        cols = cols.reshape(B * R, -1, rows.shape[-1])  # group-major, as unfold's rows
        in_shape = self.in_shapes[0]
        maps = self._maps(np.zeros((1, *in_shape))).shape[1:]
        x = fold(cols, maps, *self.geometry)
        if self.weight.ndim == 3:
            x = x[:, :, 0]
        if self.transposed:
            x = self._unstuff(x)
        return x.reshape(B, R, *in_shape)

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
        sigma_max(W)`` (an entry lies in at most ``overlap`` patches; grouped: the largest
        of the groups' blocks); l_inf the largest row l1 norm, inflated by ``n eps`` for its
        sum (padding only removes terms)."""
        W = self.matrix
        if norm == "fro":
            blocks = W.reshape(self.groups, -1, W.shape[1])
            return math.sqrt(self.overlap) * max(spectral_upper(w) for w in blocks)
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
        self.map = AffineTwin(op.map, in_shapes, out_shape)

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
