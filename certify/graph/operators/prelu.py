"""PReLU: ``phi(x) = x`` for ``x > 0`` and ``a x`` otherwise, with a learned slope ``a`` per
channel of any sign (``nn.PReLU``), so not monotone where ``a < 0``.

Interval: a piecewise-linear function with its kink at 0 takes its extremes on ``[l, u]`` at
``l``, ``u`` and, for a box across 0, at ``phi(0) = 0``: exact. Linear rule, entry by entry
as LeakyReLU's (``certify.graph.operators.activation``): the chord line ``lam x + mu +- nu``,
``mu +- nu`` the range of ``phi(x) - lam x`` (at ``l``, 0 and ``u``); for a lower bound,
CROWN's adaptive lines where ``phi`` is convex (``0 <= a <= 1``): below ``s x`` (``s`` 1 or
``a``), above the chord. Jacobian: ``a`` left of 0, 1 right of it, both across it.
Constant: ``max(1, max |a|)`` in both norms (an entrywise map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from certify.graph.operators.activation import derivative_rows, kink_chord, kink_lines
from certify.graph.operators.base import Operator, row_sum


@dataclass(frozen=True, eq=False)
class PReLU(Operator):
    """``slopes``: broadcast against one input (``(C, 1, ..., 1)`` for ``C`` channels on the
    first axis, or one slope ``(1,)``)."""

    slopes: torch.Tensor

    nonlinear = True

    def __call__(self, x):
        return torch.where(x > 0, x, self.slopes * x)  # F.prelu's values, and its slope at 0

    def _slopes(self, like):
        return self.slopes.expand(like.shape[1:]).expand_as(like)

    def interval(self, box):
        lo, hi = box
        f_lo, f_hi = self(lo), self(hi)
        across = (lo < 0) & (hi > 0)
        low = torch.minimum(f_lo, f_hi)
        return torch.where(across, low.clamp(max=0), low), torch.maximum(f_lo, f_hi)

    def unstable(self, lo, hi):
        return (lo < 0) & (hi > 0)

    def symmetric(self, lo, hi):
        """``phi(x) in lam x + mu +- nu`` on ``[lo, hi]``."""
        return kink_chord(self(lo), self(hi), lo, hi, self._slopes(lo))

    def adaptive(self, lo, hi):
        """CROWN's lines where ``phi`` is convex: ``phi(x) >= s_l x`` and ``phi(x) <= s_u x +
        b_u`` on ``[lo, hi]``."""
        return kink_lines(self(lo), self(hi), lo, hi, self._slopes(lo))

    def backward(self, A, boxes, lower):
        lo, hi = boxes[0]
        lam, mu, nu = (t[:, None] for t in self.symmetric(lo, hi))
        if not lower:
            return (A * lam,), row_sum(A * mu), row_sum(A.abs() * nu)
        a = self._slopes(lo)[:, None]
        convex = (a >= 0) & (a <= 1)
        s_lower, s_upper, b_upper = (t[:, None] for t in self.adaptive(lo, hi))
        positive, negative = A.clamp(min=0), A.clamp(max=0)
        rows = torch.where(convex, positive * s_lower + negative * s_upper, A * lam)
        constant = torch.where(convex, negative * b_upper, A * mu - A.abs() * nu)
        return (rows,), row_sum(constant), None

    def enclose(self, inputs, boxes):
        (enclosure,), (lo, hi) = inputs, boxes[0]
        return enclosure.scaled(*self.symmetric(lo, hi))

    def tangent(self, inputs, tangents):
        """The clean (diagonal) Jacobian on forms ``(B, p, *shape)``: ``phi'(u) t``."""
        (u,), (t,) = inputs, tangents
        return torch.func.jvp(self, (u,), (torch.ones_like(u),))[1][:, None] * t

    def spread(self, inputs, radii):
        """``|phi'(u)| r`` with autograd's slope at ``u`` (``a`` at 0; section 9)."""
        (u,), (r,) = inputs, radii
        return torch.func.jvp(self, (u,), (torch.ones_like(u),))[1].abs() * r

    def remainder(self, inputs, radii, rows=None):
        """``|1 - a| (d - |u|)_+`` per channel (section 9): zero while ``u + delta`` cannot
        cross 0."""
        (u,), (d,) = inputs, radii
        return (1 - self._slopes(u)).abs() * (d - u.abs()).clamp(min=0)

    def derivative_range(self, lo, hi):
        """Every (generalised) derivative on ``[lo, hi]``: ``a``, 1, or between them."""
        a, one = self._slopes(lo), torch.ones_like(lo)
        low = torch.where(hi < 0, a, torch.where(lo > 0, one, torch.minimum(a, one)))
        high = torch.where(hi < 0, a, torch.where(lo > 0, one, torch.maximum(a, one)))
        return low, high

    def jacobian(self, rows, boxes):
        d_lo, d_hi = (t[:, None] for t in self.derivative_range(*boxes[0]))
        return (derivative_rows(rows, d_lo, d_hi),)

    def lipschitz(self, norm, in_shapes):
        return (max(1.0, float(self.slopes.abs().max())),)

    def describe(self) -> str:
        return f"PReLU({self.slopes.numel()} slopes)"
