"""Numpy twins of resampling (``certify.graph.operators.Pad``, ``Interpolate``), from the
index arithmetic of each axis rather than torch's kernels.

Both maps are separable: along each resampled axis, output entry ``o`` is ``sum_t w_t[o]
x[i_t[o]]`` over one tap (a gather: padding, nearest) or two (linear interpolation), with
nonnegative weights. The forward map takes the taps axis by axis (``np.take``, then the
weights: a gather never multiplies); the adjoint applies each axis's matrix ``M[o,
i_t[o]] += w_t[o]`` transposed (rows ``A`` become ``A M`` along that axis). The Lipschitz constants are Schur's test on these
coefficients (``LinearTwin``).

Padding by ``(a, b)`` of an axis of ``n`` entries reads ``j = o - a`` folded into ``[0, n)``:
reflect ``n - 1 - |n - 1 - |j||``, replicate ``clip(j, 0, n - 1)``, circular ``j mod n``.
Interpolation follows torch's CPU kernels in float64 (``aten/src/ATen/native/UpSample.h``
and ``cpu/UpSampleKernel.cpp``) to the floating-point type of each step: every source
position is floored after rounding to float32, and the two-axis nearest kernels round the
scale to float32 as well and copy when the size stays or doubles.
"""

from __future__ import annotations

import numpy as np

from certify.check.operators.base import LinearTwin

FOLDS = {
    "reflect": lambda j, n: (n - 1) - np.abs((n - 1) - np.abs(j)),
    "replicate": lambda j, n: np.clip(j, 0, n - 1),
    "circular": lambda j, n: np.mod(j, n),
}


def _nearest(n: int, m: int, scale, exact: bool, two: bool):
    """The entry each of ``m`` outputs reads, of ``n`` inputs, as torch's CPU kernels pick
    it: ``s = 1 / scale`` (``n / m`` without one), rounded to float32 on two axes; the
    position ``o s`` (nearest) or ``(o + 1/2) s`` (nearest-exact) in float64, rounded to
    float32, floored, at most ``n - 1``. Nearest on two axes copies when ``m = n`` and
    reads ``o // 2`` when ``m = 2 n``, whatever the scale."""
    o = np.arange(m)
    if two and not exact and m == n:
        return o
    if two and not exact and m == 2 * n:
        return o // 2
    given = scale is not None and scale > 0
    if two:
        s = np.float64(np.float32(1.0 / scale) if given else np.float32(n) / np.float32(m))
    else:
        s = 1.0 / scale if given else n / m
    position = ((o + 0.5) if exact else o) * s
    return np.minimum(np.floor(position.astype(np.float32)).astype(np.int64), n - 1)


def _linear(n: int, m: int, scale, align_corners: bool):
    """Two taps per output: ``(i, 1 - lambda)`` and ``(i + 1, lambda)`` (``i + 1`` capped at
    ``n - 1``) at the source position ``r``: ``o (n - 1) / (m - 1)`` with ``align_corners``,
    else ``max((o + 1/2) / scale - 1/2, 0)`` (``n / m`` for ``1 / scale`` when none); ``i``
    the float32 floor of ``r`` (at most ``n - 1``), ``lambda = clip(r - i, 0, 1)``. A copy
    when ``m = n``."""
    o = np.arange(m)
    if m == n:
        return [(o, None)]
    if align_corners:
        r = o * ((n - 1) / (m - 1) if m > 1 else 0.0)
    else:
        ratio = 1.0 / scale if scale is not None and scale > 0 else n / m
        r = np.maximum(ratio * (o + 0.5) - 0.5, 0.0)
    i = np.minimum(np.floor(r.astype(np.float32)).astype(np.int64), n - 1)
    lam = np.clip(r - i, 0.0, 1.0)
    return [(i, 1.0 - lam), (np.where(i < n - 1, i + 1, i), lam)]


class ResamplingTwin(LinearTwin):
    """A separable map of the last ``len(self.taps)`` axes: per axis, the taps ``(indices,
    weights)`` (weights ``None``: a gather, ``_taps``) and their matrix (the adjoint's)."""

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.taps = self._taps(op)
        self.matrices = []
        for n, taps in zip(self.in_shapes[0][-len(self.taps):], self.taps):
            M = np.zeros((len(taps[0][0]), n))
            for i, w in taps:
                np.add.at(M, (np.arange(len(i)), i), 1.0 if w is None else w)
            self.matrices.append(M)

    def _taps(self, op) -> list:
        raise NotImplementedError

    def __call__(self, x):
        k = len(self.taps)
        for axis, taps in zip(range(x.ndim - k, x.ndim), self.taps):
            shape = [1] * x.ndim
            shape[axis] = -1
            parts = [np.take(x, i, axis=axis) if w is None else
                     np.take(x, i, axis=axis) * w.reshape(shape) for i, w in taps]
            x = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        return x

    def adjoint(self, A):
        first = A.ndim - len(self.matrices)
        for axis, M in enumerate(self.matrices, start=first):
            A = np.moveaxis(np.moveaxis(A, axis, -1) @ M, -1, axis)
        return (A,)


class PadTwin(ResamplingTwin):
    def _taps(self, op):
        pad, fold = list(op.pad), FOLDS[op.mode]
        k = len(pad) // 2
        pairs = [(pad[2 * i], pad[2 * i + 1]) for i in reversed(range(k))]  # first axis first
        return [[(fold(np.arange(-a, n + b), n), None)]
                for n, (a, b) in zip(self.in_shapes[0][-k:], pairs)]


class InterpolateTwin(ResamplingTwin):
    def _taps(self, op):
        k = len(op.size)
        scales = tuple(op.scales) or (None,) * k
        taps = []
        for n, m, scale in zip(self.in_shapes[0][-k:], op.size, scales):
            if op.mode in ("linear", "bilinear"):
                taps.append(_linear(n, m, scale, op.align_corners))
            else:
                exact = op.mode == "nearest-exact"
                taps.append([(_nearest(n, m, scale, exact, k == 2), None)])
        return taps
