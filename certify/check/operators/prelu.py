"""Numpy twin of ``certify.graph.operators.PReLU``: ``x`` for ``x > 0``, ``a x`` otherwise,
with one slope ``a`` per channel, of any sign.

The extremes of ``phi`` on ``[l, u]`` lie at ``l``, ``u`` and (across 0) at ``phi(0) = 0``.
Linear rule per entry: the chord line ``lam x + mu +- nu`` with ``mu +- nu`` the range of
``phi(x) - lam x`` at ``l``, 0, ``u``; for a lower bound, where ``0 <= a <= 1`` (convex),
CROWN's lines: below ``s x`` (``s = 1`` when ``u >= -l``, else ``a``), above the chord lifted
by its miss. The derivative is ``a`` left of 0 and 1 right of it (torch's ``a`` at 0).
"""

from __future__ import annotations

import numpy as np

from certify.check.operators.activation import derivative_rows, kink_chord, kink_lines
from certify.check.operators.base import Twin, row_sum


class PReLUTwin(Twin):
    nonlinear = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.slopes = np.broadcast_to(op.slopes.detach().cpu().numpy().astype(np.float64),
                                      self.in_shapes[0])

    def __call__(self, x):
        return np.where(x > 0, x, self.slopes * x)

    def interval(self, box):
        lo, hi = box
        f_lo, f_hi = self(lo), self(hi)
        low = np.minimum(f_lo, f_hi)
        return np.where((lo < 0) & (hi > 0), np.minimum(low, 0.0), low), np.maximum(f_lo, f_hi)

    def unstable(self, lo, hi):
        return (lo < 0) & (hi > 0)

    def symmetric(self, lo, hi):
        return kink_chord(self(lo), self(hi), lo, hi, self.slopes)

    def adaptive(self, lo, hi):
        return kink_lines(self(lo), self(hi), lo, hi, self.slopes)

    def backward(self, A, boxes, lower):
        lo, hi = boxes[0]
        lam, mu, nu = (t[:, None] for t in self.symmetric(lo, hi))
        if not lower:
            return (A * lam,), row_sum(A * mu), row_sum(np.abs(A) * nu)
        convex = (self.slopes >= 0) & (self.slopes <= 1)
        s_lower, s_upper, b_upper = (t[:, None] for t in self.adaptive(lo, hi))
        positive, negative = np.maximum(A, 0), np.minimum(A, 0)
        rows = np.where(convex, positive * s_lower + negative * s_upper, A * lam)
        constant = np.where(convex, negative * b_upper, A * mu - np.abs(A) * nu)
        return (rows,), row_sum(constant), None

    def enclose(self, inputs, boxes):
        (enclosure,), (lo, hi) = inputs, boxes[0]
        return enclosure.scaled(*self.symmetric(lo, hi))

    def jacobian(self, rows, boxes):
        b_lo, b_hi = boxes[0]
        a = self.slopes
        d_lo = np.where(b_hi < 0, a, np.where(b_lo > 0, 1.0, np.minimum(a, 1.0)))[:, None]
        d_hi = np.where(b_hi < 0, a, np.where(b_lo > 0, 1.0, np.maximum(a, 1.0)))[:, None]
        return (derivative_rows(rows, d_lo, d_hi),)

    def gradient(self, A, xs):
        return (A * np.where(xs[0] > 0, 1.0, self.slopes)[:, None],)

    def lipschitz(self, norm):
        return (max(1.0, float(np.abs(self.slopes).max())),)
