"""Numpy twins of max pooling (``certify.graph.operators.MaxPool``) and average pooling
(``AvgPool``), 1-D or 2-D over the last one or two axes.

Max pooling: every window as an explicit list of flat input indices (``-1`` for padding,
``-inf`` there), taken with ``sliding_window_view`` of an index map padded far enough on
the right for every window ``ceil_mode`` lets start inside the input; the output sizes are
the graph's. Linear rule as the torch operator makes it: in every window the entry ``k``
with the largest lower bound (the first one on ties) and the gap ``max(0, max_{i != k}
u_i - l_k)``, ``max = x_k + gap / 2 +- gap / 2`` (``>= x_k`` and ``<= x_k + gap`` for a
lower bound); rows go back to the chosen entries (``bincount`` adds the windows that share
one). The exact gradient picks the first maximum of each window, as torch does.

Average pooling is separable: per axis a matrix with ``1 / count`` on each window
(``count`` the window clipped to the padded input with ``count_include_pad``, to the
input without; adaptive windows ``[floor(o I / O), ceil((o + 1) I / O))``), and
``divisor_override`` replacing the product of the counts; its adjoint is the transpose.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from certify.check.operators.base import ROUND, LinearTwin, Twin, overlap, row_sum


def _axis(values, n: int, two: bool):
    """Per-axis ``values`` as 2-D: a 1-D pooling runs on a height-one map (``n`` there)."""
    values = tuple(values)
    return values if two else (n,) + values


class MaxPoolTwin(Twin):
    nonlinear = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.kernel, self.stride = tuple(op.kernel), tuple(op.stride)
        self.padding, self.dilation = tuple(op.padding), tuple(op.dilation)
        d = len(self.kernel)
        self.spatial, self.out_spatial = self.in_shapes[0][-d:], self.out_shape[-d:]
        self.index = self._index_windows()  # (L_out, window): flat input index or -1

    def _index_windows(self) -> np.ndarray:
        two = len(self.kernel) == 2
        k, s, d = (_axis(v, 1, two) for v in (self.kernel, self.stride, self.dilation))
        p = _axis(self.padding, 0, two)
        spatial, out = _axis(self.spatial, 1, two), _axis(self.out_spatial, 1, two)
        flat = np.arange(math.prod(spatial)).reshape(spatial)
        extra = [max(0, (o - 1) * st + (kk - 1) * dd + 1 - (n + 2 * pp))
                 for o, st, kk, dd, n, pp in zip(out, s, k, d, spatial, p)]
        padded = np.pad(flat, [(pp, pp + e) for pp, e in zip(p, extra)], constant_values=-1)
        span = [(kk - 1) * dd + 1 for kk, dd in zip(k, d)]
        windows = sliding_window_view(padded, span)[::s[0], ::s[1], ::d[0], ::d[1]]
        windows = windows[:out[0], :out[1]]
        return windows.reshape(out[0] * out[1], k[0] * k[1])

    def _windows(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``(*lead, *spatial)`` as windows ``(*lead, L_out, window)``, ``-inf`` pads."""
        front = x.shape[:x.ndim - len(self.spatial)]
        flat = x.reshape(*front, -1)
        flat = np.concatenate([flat, np.full((*front, 1), -np.inf)], axis=-1)
        return flat[..., self.index]  # index -1 reads the -inf column

    def __call__(self, x):
        front = x.shape[:x.ndim - len(self.spatial)]
        return self._windows(x).max(-1).reshape(*front, *self.out_spatial)

    def interval(self, box):
        return self(box[0]), self(box[1])  # monotone in every entry

    def _scatter(self, A: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Rows ``A`` ``(B, R, *out)`` onto the entries ``k`` (window positions, per
        input ``(B, *channels, L_out)``) that every window picks."""
        B, R = A.shape[:2]
        n_in, n_out = math.prod(self.spatial), math.prod(self.out_spatial)
        chosen = np.take_along_axis(np.broadcast_to(self.index, (*k.shape, self.index.shape[1])),
                                    k[..., None], -1)[..., 0].reshape(B, 1, -1, n_out)
        chosen = np.where(chosen < 0, n_in, chosen)  # a window of padding only: dropped
        channels = chosen.shape[2]
        base = np.arange(B * R * channels).reshape(B, R, channels, 1) * (n_in + 1)
        flat = np.bincount((base + chosen).ravel(), weights=A.reshape(B, R, channels, n_out).ravel(),
                           minlength=B * R * channels * (n_in + 1))
        return flat.reshape(B, R, channels, n_in + 1)[..., :n_in].reshape(B, R, *self.in_shapes[0])

    def backward(self, A, boxes, lower):
        lo, hi = boxes[0]
        low, high = self._windows(lo), self._windows(hi)
        k = low.argmax(-1)
        best = np.take_along_axis(low, k[..., None], -1)[..., 0]
        others = high.copy()
        np.put_along_axis(others, k[..., None], -np.inf, -1)
        others = others.max(-1)
        with np.errstate(invalid="ignore"):
            gap = np.maximum(others - best, 0)
        gap = np.where(np.isfinite(gap), gap, 0.0)
        gap = gap + ROUND * (np.abs(best) + np.where(np.isfinite(others), np.abs(others), 0.0))
        gap = gap.reshape(len(lo), *self.out_shape)[:, None]
        rows = self._scatter(A, k)
        if lower:
            return (rows,), row_sum(np.minimum(A, 0) * gap), None
        return (rows,), row_sum(A * gap / 2), row_sum(np.abs(A) * gap / 2)

    def gradient(self, A, xs):
        return (self._scatter(A, self._windows(xs[0]).argmax(-1)),)

    def lipschitz(self, norm):
        """l_inf 1; l2 ``sqrt(overlap)`` (an entry lies in at most ``overlap`` windows)."""
        if norm == "max":
            return (1.0,)
        return (math.sqrt(overlap(self.kernel, self.stride, self.dilation)),)


def _pool_matrix(n: int, out: int, k: int, s: int, p: int, include_pad: bool) -> np.ndarray:
    M = np.zeros((out, n))
    for o in range(out):
        start = o * s - p
        end = min(start + k, n + p)
        size = end - start
        start, end = max(start, 0), min(end, n)
        if start < end:
            M[o, start:end] = 1.0 / (size if include_pad else end - start)
    return M


def _adaptive_matrix(n: int, out: int) -> np.ndarray:
    M = np.zeros((out, n))
    for o in range(out):
        start, end = (o * n) // out, -((-(o + 1) * n) // out)
        M[o, start:end] = 1.0 / (end - start)
    return M


class AvgPoolTwin(LinearTwin):
    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        d = len(op.kernel)
        spatial, out = self.in_shapes[0][-d:], self.out_shape[-d:]
        if op.adaptive:
            self.matrices = [_adaptive_matrix(n, o) for n, o in zip(spatial, out)]
        else:
            self.matrices = [_pool_matrix(n, o, k, s, p, op.count_include_pad and
                                          op.divisor_override is None)
                             for n, o, k, s, p in zip(spatial, out, op.kernel, op.stride,
                                                      op.padding)]
        self.factor = 1.0
        if op.divisor_override is not None and d == 2 and not op.adaptive:
            # The matrices then hold ones on the windows clipped to the input; torch takes
            # any nonzero divisor, a negative one makes the map nonpositive.
            self.matrices = [(M > 0).astype(np.float64) for M in self.matrices]
            self.factor = 1.0 / op.divisor_override
        self.nonnegative = self.factor >= 0

    def _apply(self, x, matrices):
        for i, M in enumerate(matrices):  # axis -len(matrices) + i
            axis = x.ndim - len(matrices) + i
            x = np.moveaxis(np.tensordot(x, M, axes=([axis], [1])), -1, axis)
        return x * self.factor if self.factor != 1.0 else x

    def __call__(self, x):
        return self._apply(x, self.matrices)

    def adjoint(self, A):
        return (self._apply(A, [M.T for M in self.matrices]),)

    def absolute(self, x):  # the map is factor times one with nonnegative coefficients
        return self(x) if self.nonnegative else -self(x)

    def adjoint_absolute(self, A):
        return self.adjoint(A) if self.nonnegative else (-self.adjoint(A)[0],)
