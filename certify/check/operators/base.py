"""What every numpy twin of an operator provides (the numpy side of ``certify.graph.operators``).

A twin is built from a graph node: the torch operator's parameters read as float64 numpy
arrays, and the node's per-input shapes (``in_shapes``, ``out_shape``; the batch axis
excluded). It recomputes, independently of the torch rules, what ``certify check`` needs:

* ``__call__``: the forward map (on arrays with any number of leading axes);
* ``interval``: an output box over input boxes;
* ``backward``: the linear (CROWN-style) rule, rows ``A`` ``(B, R, *out)`` to rows on every
  input and constants ``d +- e`` (``lower=True``: a lower bound only), with the same
  relaxations as the torch operators, so that the bounds confirm the claimed radii;
* ``jacobian``: interval rows through a (generalised) Jacobian on the boxes, or ``None``;
* ``gradient``: rows times the exact Jacobian at a point (torch's choice at kinks);
* ``lipschitz`` and ``combine``: upper bounds of the l2 (``"fro"``) or l_inf (``"max"``)
  Lipschitz constants and their composition along the graph.

Floating point: results are widened by ``ROUND`` times the magnitudes that entered them,
the margin the torch rules use (far above float64 rounding, relative 1e-16).
"""

from __future__ import annotations

import math

import numpy as np

from certify.check.operators.enclosure import Enclosure
from certify.check.operators.rounding import EPS, ROUND


def row_sum(t: np.ndarray) -> np.ndarray:
    """Sum of rows ``(B, R, *shape)`` over ``shape``: ``(B, R)``."""
    return t.reshape(*t.shape[:2], -1).sum(-1)


def per_input(t: np.ndarray, ndim: int) -> np.ndarray:
    """A per-input array ``(B,)`` shaped to broadcast against ``(B, *shape)``."""
    return np.asarray(t).reshape(-1, *[1] * (ndim - 1))


def lead(x: np.ndarray, shape) -> tuple[int, ...]:
    """The leading axes of ``x`` before a per-input ``shape`` (batch, rows, ...)."""
    return x.shape[:x.ndim - len(shape)]


def unbroadcast(A: np.ndarray, out_shape, in_shape) -> np.ndarray:
    """Adjoint of broadcasting ``in_shape`` to ``out_shape`` (right-aligned, per input):
    ``A`` ``(*lead, *out_shape)`` summed over the broadcast axes, ``(*lead, *in_shape)``."""
    n = len(lead(A, out_shape))
    extra = len(out_shape) - len(in_shape)
    if extra:
        A = A.sum(axis=tuple(range(n, n + extra)))
    axes = tuple(n + i for i, (a, b) in enumerate(zip(in_shape, out_shape[extra:]))
                 if a == 1 and b != 1)
    return A.sum(axis=axes, keepdims=True) if axes else A


def spectral_upper(W: np.ndarray) -> float:
    """Upper bound of ``||W||_2``: LAPACK's largest singular value plus
    ``8 max(m, n) eps sigma_1`` (its documented error is a small multiple of
    ``eps sigma_1``)."""
    s = float(np.linalg.svd(W, compute_uv=False)[0]) if W.size else 0.0
    return s + 8.0 * max(W.shape) * EPS * s


def overlap(kernel, stride, dilation) -> int:
    """How many windows one input entry lies in, at most: a dilated window spans
    ``(k - 1) d + 1`` positions, which ``ceil(span / s)`` windows start within, never more
    than ``k`` (one per window entry)."""
    return math.prod(min(k, math.ceil(((k - 1) * d + 1) / s))
                     for k, s, d in zip(kernel, stride, dilation))


class Twin:
    """Base of every twin; defaults for rules an operator lacks."""

    arity = 1
    nonlinear = False

    def __init__(self, op, in_shapes, out_shape):
        self.in_shapes = tuple(tuple(s) for s in in_shapes)
        self.out_shape = tuple(out_shape)

    def __call__(self, *xs):
        raise NotImplementedError

    def interval(self, *boxes):
        raise NotImplementedError

    def backward(self, A, boxes, lower: bool):
        """The output box as a constant (no rows go on)."""
        low, high = self.interval(*boxes)
        center, radius = (high + low) / 2, (high - low) / 2
        return (None,) * self.arity, row_sum(A * center[:, None]), \
            row_sum(np.abs(A) * radius[:, None])

    def jacobian(self, rows, boxes):
        return None

    def enclose(self, inputs, boxes):
        """The forward rule (``certify.check.operators.enclosure``); ``None``: the box only."""
        return None

    def gradient(self, A, xs):
        raise NotImplementedError

    def unstable(self, lo, hi):
        return np.ones(lo.shape, dtype=bool)

    def lipschitz(self, norm: str) -> tuple:
        raise NotImplementedError

    def local_reach(self, boxes, reaches, nominals):
        """An l2 bound ``(B,)`` of ``||f(x) - f(nominal)||`` for ``x`` in the boxes with
        ``||x_i - nominal_i|| <= reaches[i]`` (``None``: a constant input), or ``None``
        where only the Lipschitz constants (``combine``) bound it."""
        return None

    def combine(self, norm: str, own, moving):
        """``sum_i own_i L_i`` over the inputs that move (triangle inequality)."""
        return sum(times(c, L) for c, L in zip(own, moving) if L is not None)


def times(c: float, L):
    """``c L`` for a constant ``c`` and a bound ``L`` (a float or per-input array), with
    ``inf * 0 = 0``: an input that does not move moves nothing, whatever the constant."""
    if c != math.inf:
        return c * L
    return np.where(L > 0, math.inf, 0.0) if isinstance(L, np.ndarray) else \
        (math.inf if L > 0 else 0.0)


def mean_value_rule(twin: Twin, A: np.ndarray, boxes):
    """The linear rule of a (Lipschitz) map from its interval Jacobian (``jacobian``).

    The mean value theorem at the centres ``c_i`` of the boxes (radii ``r_i``):
    ``A f(x) - A f(c) = sum_i G_i (x_i - c_i)`` with every ``G_i`` in the interval rows
    ``[L_i, U_i]``, so with ``M_i = (L_i + U_i) / 2`` and ``S_i = (U_i - L_i) / 2``,
    ``A f(x) in sum_i M_i x_i + (A f(c) - sum_i M_i c_i) +- sum_i S_i r_i``."""
    centres = [(lo + hi) / 2 for lo, hi in boxes]
    value = twin(*centres)
    d, size = row_sum(A * value[:, None]), row_sum(np.abs(A * value[:, None]))
    e = np.zeros_like(d)
    rows = []
    for (L, U), (lo, hi), c in zip(twin.jacobian((A, A), boxes), boxes, centres):
        M = (L + U) / 2
        d = d - row_sum(M * c[:, None])
        size = size + row_sum(np.abs(M * c[:, None]))
        e = e + row_sum((U - L) / 2 * ((hi - lo) / 2)[:, None])
        rows.append(M)
    return tuple(rows), d, e + ROUND * (size + e)


class LinearTwin(Twin):
    """A map linear in all its inputs: ``adjoint`` gives ``A J_i`` for every input;
    ``absolute`` and ``adjoint_absolute`` are the map with absolute coefficients (the map
    itself when ``nonnegative``)."""

    nonnegative = True
    isometry = False  # l2 and l_inf constants exactly 1 (reshape, permutation, slice, ...)

    def adjoint(self, A) -> tuple:
        raise NotImplementedError

    def absolute(self, *xs):
        return self(*xs)

    def adjoint_absolute(self, A) -> tuple:
        return self.adjoint(A)

    def interval(self, *boxes):
        if self.nonnegative:  # monotone, also in floating point
            return self(*(lo for lo, _ in boxes)), self(*(hi for _, hi in boxes))
        center = self(*((lo + hi) / 2 for lo, hi in boxes))
        radius = self.absolute(*((hi - lo) / 2 for lo, hi in boxes))
        spread = radius * (1 + ROUND) + ROUND * np.abs(center)
        return center - spread, center + spread

    def backward(self, A, boxes, lower):
        return self.adjoint(A), None, None

    def enclose(self, inputs, boxes):
        return Enclosure.through(self, self.absolute, inputs)

    def jacobian(self, rows, boxes):
        lo, hi = rows
        if self.nonnegative:
            return tuple(zip(self.adjoint(lo), self.adjoint(hi)))
        out = []
        for c, r in zip(self.adjoint((lo + hi) / 2), self.adjoint_absolute((hi - lo) / 2)):
            r = r * (1 + ROUND) + ROUND * np.abs(c)
            out.append((c - r, c + r))
        return tuple(out)

    def gradient(self, A, xs):
        return self.adjoint(A)

    def lipschitz(self, norm):
        if self.isometry:
            return (1.0,) * self.arity
        return tuple(self.schur(i)[0 if norm == "fro" else 1] for i in range(self.arity))

    def schur(self, index: int) -> tuple[float, float]:
        return schur(self.absolute, self.adjoint_absolute, self.in_shapes, self.out_shape, index)


def schur(absolute, adjoint_absolute, in_shapes, out_shape, index: int) -> tuple[float, float]:
    """``(||M_i||_2, ||M_i||_inf)`` upper bounds for input ``index``'s part ``M_i`` of a
    linear map whose entrywise absolute value is ``absolute`` (its adjoint
    ``adjoint_absolute``): the largest row sum of ``|M_i|`` and, by Schur's test,
    ``sqrt(||M_i||_1 ||M_i||_inf)``; inflated by ``2 n eps`` for the summations."""
    ones = [np.zeros((1, *s)) for s in in_shapes]
    ones[index] = np.ones_like(ones[index])
    out = absolute(*ones)
    rows = float(out.max()) if out.size else 0.0
    back = adjoint_absolute(np.ones((1, 1, *out_shape)))[index]
    columns = float(back.max()) if back.size else 0.0
    slack = 1 + 2 * (math.prod(in_shapes[index]) + math.prod(out_shape)) * EPS
    return math.sqrt(rows * columns) * slack, rows * slack
