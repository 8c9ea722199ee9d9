"""Softmax over the last axis inside a network (attention weights): THEORY.md section 8.

``p_i = exp(x_i) / sum_j exp(x_j)`` rises with its own score and falls with every other, so
over a box ``p_i >= 1 / (1 + sum_{j != i} exp(u_j - l_i))`` and
``p_i <= 1 / (1 + sum_{j != i} exp(l_j - u_i))`` (the interval rule, computed with
differences of scores so that nothing overflows).

The Jacobian is ``J = diag(p) - p p^T``, so a row ``a`` becomes ``(a J)_k = p_k (a_k - s)``
with ``s = sum_i a_i p_i``, a convex combination of the ``a_i`` because ``p`` is a
probability vector: ``s`` lies in ``[min a, max a]`` as well as in the interval sum. The
linear rule is the mean-value one (``base.mean_value_rule``) on that interval Jacobian.

Lipschitz: ``J`` is positive semidefinite and ``J <= diag(p)``, so ``||J||_2 <= max p <= 1``;
its row ``k`` has absolute sum ``p_k (1 - p_k) + p_k sum_{i != k} p_i = 2 p_k (1 - p_k)
<= 1/2``, so ``||J||_inf <= 1/2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from certify.graph.operators.base import ROUND, Operator, interval_product, mean_value_rule


@dataclass(frozen=True)
class Softmax(Operator):
    """``softmax`` over the last axis (attention weights inside the network)."""

    nonlinear = True

    def __call__(self, x):
        return torch.softmax(x, dim=-1)

    def interval(self, box):
        lo, hi = box
        # p_i >= 1 / sum_j exp(u_j - l_i) with the j = i term exp(l_i - l_i) = 1 in place of
        # exp(u_i - l_i); likewise above.
        up = hi[..., None, :] - lo[..., :, None]  # [i, j] = u_j - l_i
        eye = torch.eye(lo.shape[-1], dtype=torch.bool, device=lo.device)
        low = 1 / torch.exp(up.masked_fill(eye, 0.0)).sum(-1)
        down = lo[..., None, :] - hi[..., :, None]  # [i, j] = l_j - u_i
        high = 1 / torch.exp(down.masked_fill(eye, 0.0)).sum(-1)
        return (low * (1 - ROUND)).clamp(min=0.0), (high * (1 + ROUND)).clamp(max=1.0)

    def jacobian(self, rows, boxes):
        a_lo, a_hi = rows
        p_lo, p_hi = (t[:, None] for t in self.interval(boxes[0]))
        s_lo, s_hi = interval_product((a_lo, a_hi), (p_lo, p_hi))
        s_lo, s_hi = s_lo.sum(-1, keepdim=True), s_hi.sum(-1, keepdim=True)
        # s is a convex combination of the a_i: within [min a, max a] too.
        s_lo = torch.maximum(s_lo, a_lo.amin(-1, keepdim=True))
        s_hi = torch.minimum(s_hi, a_hi.amax(-1, keepdim=True))
        widen = ROUND * (a_lo.abs() + a_hi.abs()).amax(-1, keepdim=True)
        diff = (a_lo - s_hi - widen, a_hi - s_lo + widen)
        return (interval_product((p_lo.expand_as(a_lo), p_hi.expand_as(a_lo)), diff),)

    def backward(self, A, boxes, lower):
        return mean_value_rule(self, A, boxes)

    def lipschitz(self, norm, in_shapes):
        return (1.0 if norm == "fro" else 0.5,)
