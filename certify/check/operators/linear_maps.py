"""Numpy twins of the linear maps without a weight (``certify.graph.operators.linear_maps``),
each with a hand-written adjoint: a reshape goes back, a permutation is inverted, a slice
is zero-padded back into its input, a concatenation split, an expansion and a reduction
summed over the copies, zero padding cropped (and cropping padded). ``ScaleShift``
(``x * scale + shift``) carries a constant shift.

Every map acts on arrays with any number of leading axes (the batch, the rows of a
backward pass) before its per-input shape.
"""

from __future__ import annotations

import numpy as np

from certify.check.operators.base import (ROUND, LinearTwin, Twin, lead, row_sum, schur,
                                          unbroadcast)
from certify.check.operators.enclosure import Enclosure


class ReshapeTwin(LinearTwin):
    isometry = True

    def __call__(self, x):
        return x.reshape(*lead(x, self.in_shapes[0]), *self.out_shape)

    def adjoint(self, A):
        return (A.reshape(*lead(A, self.out_shape), *self.in_shapes[0]),)


class PermuteTwin(LinearTwin):
    isometry = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.dims = tuple(op.dims)

    def __call__(self, x):
        n = x.ndim - len(self.dims)
        return x.transpose(*range(n), *(d + n for d in self.dims))

    def adjoint(self, A):
        n = A.ndim - len(self.dims)
        inverse = np.argsort(self.dims)
        return (A.transpose(*range(n), *(int(d) + n for d in inverse)),)


class ExpandTwin(LinearTwin):
    def __call__(self, x):
        shape = self.in_shapes[0]
        front = lead(x, shape)
        x = x.reshape(*front, *[1] * (len(self.out_shape) - len(shape)), *shape)
        return np.broadcast_to(x, (*front, *self.out_shape))

    def adjoint(self, A):
        return (unbroadcast(A, self.out_shape, self.in_shapes[0]),)


class SliceTwin(LinearTwin):
    isometry = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.dim = op.dim
        self.where = op.index if op.index is not None else slice(op.start, op.end, op.step)

    def _index(self, n: int):
        return (slice(None),) * (n + self.dim) + (self.where,)

    def __call__(self, x):
        return x[self._index(len(lead(x, self.in_shapes[0])))]

    def adjoint(self, A):
        front = lead(A, self.out_shape)
        out = np.zeros((*front, *self.in_shapes[0]))
        out[self._index(len(front))] = A
        return (out,)


class CatTwin(LinearTwin):
    isometry = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.dim, self.arity, self.stack = op.dim, op.arity, op.stack

    def __call__(self, *xs):
        n = len(lead(xs[0], self.in_shapes[0]))
        return (np.stack if self.stack else np.concatenate)(xs, axis=n + self.dim)

    def adjoint(self, A):
        axis = len(lead(A, self.out_shape)) + self.dim
        if self.stack:
            return tuple(np.take(A, i, axis=axis) for i in range(self.arity))
        ends = np.cumsum([s[self.dim] for s in self.in_shapes])[:-1]
        return tuple(np.split(A, ends, axis=axis))

    def combine(self, norm, own, moving):
        """Disjoint parts: ``sqrt(sum L_i^2)`` in l2, ``max L_i`` in l_inf."""
        parts = [c * L for c, L in zip(own, moving) if L is not None]
        if not parts:
            return 0.0
        if norm == "fro":
            return sum(p * p for p in parts) ** 0.5 * (1 + 4 * len(parts) * 1e-16)
        return np.maximum.reduce(parts) if isinstance(parts[0], np.ndarray) else max(parts)


class AddTwin(LinearTwin):
    arity = 2

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.alpha = float(op.alpha)
        self.nonnegative = self.alpha >= 0

    def __call__(self, a, b):
        return a + b if self.alpha == 1 else a + self.alpha * b

    def adjoint(self, A):
        return (unbroadcast(A, self.out_shape, self.in_shapes[0]),
                self.alpha * unbroadcast(A, self.out_shape, self.in_shapes[1]))

    def absolute(self, a, b):
        return a + abs(self.alpha) * b

    def adjoint_absolute(self, A):
        return (unbroadcast(A, self.out_shape, self.in_shapes[0]),
                abs(self.alpha) * unbroadcast(A, self.out_shape, self.in_shapes[1]))


class ReduceTwin(LinearTwin):
    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.dims, self.keepdim, self.mean = tuple(sorted(op.dims)), op.keepdim, op.mean
        shape = self.in_shapes[0]
        self.count = int(np.prod([shape[d] for d in self.dims]))

    def __call__(self, x):
        n = len(lead(x, self.in_shapes[0]))
        axes = tuple(d + n for d in self.dims)
        return (np.mean if self.mean else np.sum)(x, axis=axes, keepdims=self.keepdim)

    def adjoint(self, A):
        front = lead(A, self.out_shape)
        if not self.keepdim:
            A = np.expand_dims(A, tuple(d + len(front) for d in self.dims))
        out = np.broadcast_to(A, (*front, *self.in_shapes[0]))
        return (out / self.count if self.mean else out.copy(),)


class ZeroPadTwin(LinearTwin):
    """``F.pad`` with zeros; ``pad`` lists (before, after) per axis from the last one;
    a negative amount crops."""

    isometry = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        pad = list(op.pad)
        self.pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]  # last first

    @staticmethod
    def _apply(x, pairs):
        """Crop the negative amounts, then pad the positive ones, axis by axis from the end."""
        crop = [slice(None)] * x.ndim
        widths = [(0, 0)] * x.ndim
        for i, (before, after) in enumerate(pairs):
            axis = x.ndim - 1 - i
            crop[axis] = slice(max(-before, 0), x.shape[axis] - max(-after, 0))
            widths[axis] = (max(before, 0), max(after, 0))
        return np.pad(x[tuple(crop)], widths)

    def __call__(self, x):
        return self._apply(x, self.pairs)

    def adjoint(self, A):
        return (self._apply(A, [(-b, -a) for b, a in self.pairs]),)


class ScaleShiftTwin(Twin):
    """``x * scale + shift`` with constant arrays broadcast against the input."""

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.scale = np.array(op.scale.detach().numpy(), dtype=np.float64)
        self.shift = np.array(op.shift.detach().numpy(), dtype=np.float64)

    def __call__(self, x):
        return x * self.scale + self.shift

    def _adjoint(self, A, scale):
        return unbroadcast(A * scale, self.out_shape, self.in_shapes[0])

    def interval(self, box):
        lo, hi = box
        center = self((lo + hi) / 2)
        spread = (hi - lo) / 2 * np.abs(self.scale) * (1 + ROUND) + ROUND * np.abs(center)
        return center - spread, center + spread

    def backward(self, A, boxes, lower):
        shift = np.broadcast_to(self.shift, A.shape[2:])
        return (self._adjoint(A, self.scale),), row_sum(A * shift), None

    def jacobian(self, rows, boxes):
        lo, hi = rows
        c = self._adjoint((lo + hi) / 2, self.scale)
        r = self._adjoint((hi - lo) / 2, np.abs(self.scale))
        r = r * (1 + ROUND) + ROUND * np.abs(c)
        return ((c - r, c + r),)

    def enclose(self, inputs, boxes):
        return Enclosure.through(lambda x: x * self.scale, lambda x: x * np.abs(self.scale),
                                 inputs, self.shift)

    def gradient(self, A, xs):
        return (self._adjoint(A, self.scale),)

    def lipschitz(self, norm):
        """Schur's test on ``x -> x |scale|``."""
        magnitude = np.abs(self.scale)
        l2, linf = schur(lambda x: x * magnitude, lambda A: (self._adjoint(A, magnitude),),
                         self.in_shapes, self.out_shape, 0)
        return (l2 if norm == "fro" else linf,)
