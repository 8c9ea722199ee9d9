"""Softmax over the last axis inside a network (attention weights): THEORY.md section 8.

``p_i = exp(x_i) / sum_j exp(x_j)`` rises with its own score and falls with every other, so
over a box ``p_i >= 1 / (1 + sum_{j != i} exp(u_j - l_i))`` and
``p_i <= 1 / (1 + sum_{j != i} exp(l_j - u_i))`` (the interval rule, computed with
differences of scores so that nothing overflows).

The Jacobian is ``J = diag(p) - p p^T``, so a row ``a`` becomes ``(a J)_k = p_k (a_k - s)``
with ``s = sum_i a_i p_i``, a convex combination of the ``a_i`` because ``p`` is a
probability vector: ``s`` lies in ``[min a, max a]`` as well as in the interval sum. The
linear rule is the mean-value one (``base.mean_value_rule``) on that interval Jacobian.

A constant mask ``keep`` (an attention mask: torch adds ``-inf`` where it is False) sets
those weights to 0 exactly and leaves the softmax of the kept entries: every rule above
holds with the sums over kept entries only (a hidden ``p_k`` is the point 0, its row and
column of ``J`` are 0, and ``s`` is a convex combination of the kept ``a_i``). Every row
must keep an entry.

Lipschitz: ``J`` is positive semidefinite and ``J <= diag(p)``, so ``||J||_2 <= max p <= 1``;
its row ``k`` has absolute sum ``p_k (1 - p_k) + p_k sum_{i != k} p_i = 2 p_k (1 - p_k)
<= 1/2``, so ``||J||_inf <= 1/2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.graph.operators.base import ROUND, Operator, interval_product, mean_value_rule


@dataclass(frozen=True, eq=False)
class Softmax(Operator):
    """Softmax over the last axis; ``keep`` (boolean, broadcast against the input per input):
    the entries that take part, the others weighing 0 (``None``: all)."""

    keep: torch.Tensor | None = None

    nonlinear = True

    def __post_init__(self):
        if self.keep is not None and not bool(self.keep.any(-1).all()):
            raise ValueError("a softmax mask must keep an entry in every row")

    def __call__(self, x):
        if self.keep is not None:
            x = x.masked_fill(~self.keep, -math.inf)
        return torch.softmax(x, dim=-1)

    def interval(self, box):
        lo, hi = box
        # p_i >= 1 / sum_j exp(u_j - l_i) with the j = i term exp(l_i - l_i) = 1 in place of
        # exp(u_i - l_i); likewise above. Hidden j add nothing; hidden i weigh 0.
        eye = torch.eye(lo.shape[-1], dtype=torch.bool, device=lo.device)
        drop = eye if self.keep is None else eye | ~self.keep[..., None, :]

        def reciprocal(exponents):  # 1 / (1 + sum_{j kept, j != i} exp(exponents[i, j]))
            return 1 / (1 + torch.exp(exponents).masked_fill(drop, 0.0).sum(-1))

        low = reciprocal(hi[..., None, :] - lo[..., :, None])  # [i, j] = u_j - l_i
        high = reciprocal(lo[..., None, :] - hi[..., :, None])  # [i, j] = l_j - u_i
        low, high = (low * (1 - ROUND)).clamp(min=0.0), (high * (1 + ROUND)).clamp(max=1.0)
        if self.keep is None:
            return low, high
        return low.masked_fill(~self.keep, 0.0), high.masked_fill(~self.keep, 0.0)

    def jacobian(self, rows, boxes):
        a_lo, a_hi = rows
        p_lo, p_hi = (t[:, None] for t in self.interval(boxes[0]))
        s_lo, s_hi = interval_product((a_lo, a_hi), (p_lo, p_hi))
        s_lo, s_hi = s_lo.sum(-1, keepdim=True), s_hi.sum(-1, keepdim=True)
        # s is a convex combination of the kept a_i: within [min a, max a] over them too.
        kept_lo, kept_hi = a_lo, a_hi
        if self.keep is not None:
            kept_lo, kept_hi = a_lo.masked_fill(~self.keep, math.inf), \
                a_hi.masked_fill(~self.keep, -math.inf)
        s_lo = torch.maximum(s_lo, kept_lo.amin(-1, keepdim=True))
        s_hi = torch.minimum(s_hi, kept_hi.amax(-1, keepdim=True))
        widen = ROUND * (a_lo.abs() + a_hi.abs()).amax(-1, keepdim=True)
        diff = (a_lo - s_hi - widen, a_hi - s_lo + widen)
        return (interval_product((p_lo.expand_as(a_lo), p_hi.expand_as(a_lo)), diff),)

    def backward(self, A, boxes, lower):
        return mean_value_rule(self, A, boxes)

    def tangent(self, inputs, tangents):
        """The clean Jacobian ``diag(p) - p p^T`` on forms ``t`` ``(B, p, *shape)``:
        ``p (t - p . t)`` (section 9; hidden entries have ``p = 0``)."""
        p = self(inputs[0])[:, None]
        t = tangents[0]
        return p * (t - (p * t).sum(-1, keepdim=True))

    def spread(self, inputs, radii):
        """``|J r| <= p r + p (p . r)`` for the clean ``J = diag(p) - p p^T`` (section 9)."""
        (u,), (r,) = inputs, radii
        p = self(u)
        return p * r + p * (p * r).sum(-1, keepdim=True)

    row_norm = "centred"

    def remainder(self, inputs, radii, rows=None):
        """``1/2 sup p_i osc^2`` with ``osc = max_j eta_j - min_j eta_j`` over the kept ``j``
        (section 9: along the segment ``p_i'' = p_i ((eta_i - eta_bar)^2 - Var_p eta)``,
        within ``[-osc^2 / 4, osc^2] p_i``), ``osc <= 2 max_j d_j`` and, from a bound ``c``
        of the centred row's l2 norm, ``osc <= sqrt(2) c`` (``(a - b)^2 <= 2 (a - m)^2 +
        2 (b - m)^2``); ``sup p_i`` from the interval rule on ``u +- d``. Hidden entries
        stay 0."""
        (u,), (d,) = inputs, radii
        _, p_sup = self.interval((u - d, u + d))
        kept = d if self.keep is None else d.masked_fill(~self.keep, 0.0)
        osc = 2 * kept.amax(-1, keepdim=True)
        if rows is not None and rows[0] is not None:
            osc = torch.minimum(osc, math.sqrt(2) * rows[0])
        bound = p_sup * osc * osc / 2
        return torch.where(p_sup > 0, bound, torch.zeros_like(bound)) * (1 + ROUND)

    def lipschitz(self, norm, in_shapes):
        return (1.0 if norm == "fro" else 0.5,)
