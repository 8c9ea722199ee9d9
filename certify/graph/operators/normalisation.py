"""Normalisations over the last axis: LayerNorm and the l2 normalisation of a vector
(``F.normalize``, sentence embeddings); THEORY.md section 8.

LayerNorm: ``y = g * c s + b`` with ``c = x - mean(x)`` (linear in ``x``), ``v = mean(c^2)``
and ``s = 1 / sqrt(v + eps)``. On a box, ``c`` has a centre-radius interval, ``v`` lies
between the means of the entrywise extremes of ``c^2``, and ``c^ = c s`` is bounded by the
monotone ``t / sqrt(max(v_lo, t^2 / n) + eps)`` (because ``v >= c_k^2 / n``), so
``|c^_k| < sqrt(n)`` whatever the box. The Jacobian is ``J = diag(g) s (P - c^ c^^T / n)``
with ``P = I - 1 1^T / n``: a row ``a`` becomes ``s ((a' - mean(a')) - (a' . c^) c^ / n)``,
``a' = a * g``, in interval arithmetic. ``P - c^ c^^T / n`` has eigenvalues 0, 1 and
``1 - v / (v + eps)``, so ``||J||_2 <= max |g| / sqrt(eps)`` (and ``||J||_inf <= sqrt(n)``
times that): a constant, but a large one; local bounds carry (section 8).

l2 normalisation: ``y = x / N`` with ``N = max(||x||_2, eps)``. On a box ``||x||`` lies
between the norms of the entrywise smallest and largest magnitudes, and ``y_k`` is bounded
by the monotone ``t / max(N_lo, |t|)``. Where ``||x|| > eps`` the Jacobian is
``(I - y y^T) / ||x||``; inside the ball ``||x|| < eps`` it is ``I / eps``; every Jacobian on
a box is in ``(I - lam y y^T) / N'`` with ``lam`` in ``[0, 1]`` (1 when the box avoids the
ball) and ``N'`` in ``[max(n_lo, eps), max(n_hi, eps)]``. ``||J||_2 <= 1 / eps``.

Both linear rules are the mean-value rule on these interval Jacobians (``base``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certify.graph.operators.base import ROUND, Operator, interval_product, mean_value_rule


def _centred(lo, hi):
    """Interval of ``x - mean(x)`` over the last axis on the box ``[lo, hi]``."""
    n = lo.shape[-1]
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    c = center - center.mean(-1, keepdim=True)
    r = radius * (1 - 2 / n) + radius.sum(-1, keepdim=True) / n
    r = r * (1 + ROUND) + ROUND * (center.abs() + center.abs().mean(-1, keepdim=True))
    return c - r, c + r


def _square_range(lo, hi):
    """Entrywise range of ``x^2`` on ``[lo, hi]``."""
    low = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(lo),
                      torch.minimum(lo * lo, hi * hi))
    return low, torch.maximum(lo * lo, hi * hi)


def sphere_remainder(h, norm):
    """The remainder of ``y -> y / ||y||`` at ``y`` (``||y|| = norm``) for a change of l2 norm
    at most ``h``: ``||R|| <= h^2 / (sqrt 3 (||y|| - h)^2)`` (THEORY.md section 9: Taylor with
    ``||D^2 f(y)[h, h]|| <= (2 / sqrt 3) ||h||^2 / ||y||^2`` along the segment, whose points
    have norm at least ``||y|| - h``); ``inf`` where ``h >= ||y||``."""
    gap = (norm - h).clamp(min=0)
    bound = h * h / (math.sqrt(3) * gap * gap) * (1 + ROUND)
    return torch.where(h < norm, bound, torch.full_like(bound, math.inf))


def sphere_spread(yhat, norm, r):
    """``|(I - yhat yhat^T) r| / ||y|| <= (r + |yhat| (|yhat| . r)) / ||y||`` entrywise: the
    clean Jacobian of ``y / ||y||`` on a box of radii ``r``."""
    return (r + yhat.abs() * (yhat.abs() * r).sum(-1, keepdim=True)) / norm


def _row_bound(d, rows):
    """An l2 bound of each row of a deviation within the box ``|delta| <= d``: ``||d||_2``,
    or the given row bound where smaller."""
    h = torch.linalg.vector_norm(d, dim=-1, keepdim=True) * (1 + ROUND)
    return h if rows is None or rows[0] is None else torch.minimum(h, rows[0])


def _dot(a, b):
    """Interval of ``a . b`` over the last axis."""
    lo, hi = interval_product(a, b)
    return lo.sum(-1, keepdim=True), hi.sum(-1, keepdim=True)


@dataclass(frozen=True, eq=False)
class LayerNorm(Operator):
    """``F.layer_norm`` over the last axis with weight ``g`` and bias ``b``, ``(n,)`` each."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    nonlinear = True

    def __call__(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)

    def _normalised(self, box):
        """Intervals of ``s`` and of ``c^ = c s`` on the box."""
        n = box[0].shape[-1]
        c_lo, c_hi = _centred(*box)
        sq_lo, sq_hi = _square_range(c_lo, c_hi)
        v_lo, v_hi = sq_lo.mean(-1, keepdim=True), sq_hi.mean(-1, keepdim=True)
        s_lo = 1 / torch.sqrt(v_hi * (1 + ROUND) + self.eps) * (1 - ROUND)
        s_hi = 1 / torch.sqrt(v_lo * (1 - ROUND) + self.eps) * (1 + ROUND)

        def bound(t):  # t / sqrt(max(v_lo, t^2/n) + eps), increasing in t
            return t / torch.sqrt(torch.maximum(v_lo, t * t / n) * (1 - ROUND) + self.eps)

        up = torch.where(c_hi > 0, bound(c_hi), c_hi * s_lo)
        down = torch.where(c_lo < 0, bound(c_lo), c_lo * s_lo)
        root = math.sqrt(n)
        return (s_lo, s_hi), ((down - ROUND * down.abs()).clamp(min=-root),
                              (up + ROUND * up.abs()).clamp(max=root))

    def interval(self, box):
        _, (h_lo, h_hi) = self._normalised(box)
        g = self.weight
        lo = torch.where(g >= 0, g * h_lo, g * h_hi) + self.bias
        hi = torch.where(g >= 0, g * h_hi, g * h_lo) + self.bias
        size = ROUND * (g.abs() * torch.maximum(h_lo.abs(), h_hi.abs()) + self.bias.abs())
        return lo - size, hi + size

    def jacobian(self, rows, boxes):
        n = boxes[0][0].shape[-1]
        (s_lo, s_hi), (h_lo, h_hi) = (tuple(t[:, None] for t in pair)
                                      for pair in self._normalised(boxes[0]))
        g = self.weight
        a_lo, a_hi = rows
        a = (torch.where(g >= 0, a_lo * g, a_hi * g), torch.where(g >= 0, a_hi * g, a_lo * g))
        u = _centred(*a)
        w_lo, w_hi = _dot(a, (h_lo, h_hi))
        reach = torch.sqrt((torch.maximum(a[0].abs(), a[1].abs()) ** 2).sum(-1, keepdim=True)
                           * n) * (1 + ROUND)  # |a' . c^| <= ||a'|| ||c^||, ||c^|| < sqrt(n)
        w = (torch.maximum(w_lo, -reach), torch.minimum(w_hi, reach))
        t_lo, t_hi = interval_product(w, (h_lo / n, h_hi / n))
        return (interval_product((s_lo, s_hi), (u[0] - t_hi, u[1] - t_lo)),)

    def backward(self, A, boxes, lower):
        return mean_value_rule(self, A, boxes)

    def _sphere(self, u):
        """``LN(x) = b + g sqrt(n) (y / ||y||)[:n]`` with ``y = [C x; sqrt(n eps)]``
        (section 9): the clean ``(y / ||y||)[:n]`` and ``||y||``."""
        n = u.shape[-1]
        c = u - u.mean(-1, keepdim=True)
        norm = torch.sqrt((c * c).sum(-1, keepdim=True) + n * self.eps)
        return c / norm, norm

    def tangent(self, inputs, tangents):
        """The clean Jacobian on forms ``t`` ``(B, p, ..., n)``: ``sqrt(n) g ((C t) - yhat
        (yhat . C t)) / ||y||`` (section 9; the exact derivative autograd also takes)."""
        (u,), (t,) = inputs, tangents
        yhat, norm = (a[:, None] for a in self._sphere(u))
        c = t - t.mean(-1, keepdim=True)
        return math.sqrt(u.shape[-1]) * self.weight * (c - yhat * (yhat * c).sum(
            -1, keepdim=True)) / norm

    def spread(self, inputs, radii):
        """``sqrt(n) |g| |J_f| |C| r`` (section 9), with ``|C| r = (1 - 2/n) r + sum(r) / n``
        for the centring ``C`` and ``J_f`` the sphere map's (``sphere_spread``); the extra
        coordinate ``sqrt(n eps)`` does not move."""
        (u,), (r,) = inputs, radii
        n = u.shape[-1]
        yhat, norm = self._sphere(u)
        centred = r * (1 - 2 / n) + r.sum(-1, keepdim=True) / n
        return math.sqrt(n) * self.weight.abs() * sphere_spread(yhat, norm, centred) * \
            (1 + ROUND)

    row_norm = "centred"

    def remainder(self, inputs, radii, rows=None):
        """``R = sqrt(n) g * r`` with ``||r||_2 <= h^2 / (sqrt 3 (||y|| - h)^2)`` per token
        (section 9, ``sphere_remainder``), ``h`` bounding ``||C delta||_2``: ``||d||_2`` or
        the centred row bound."""
        (u,), (d,) = inputs, radii
        _, norm = self._sphere(u)
        h = _row_bound(d, rows)
        return math.sqrt(u.shape[-1]) * self.weight.abs(), sphere_remainder(h, norm)

    def local_reach(self, boxes, reaches, nominals):
        """``max |g| max s`` on the box times the input's reach: ``||J||_2 <= max|g| s`` at
        every point of the segment from the nominal input, which lies in the box."""
        if reaches[0] is None:
            return None
        (_, s_hi), _ = self._normalised(boxes[0])
        s_max = s_hi.reshape(len(s_hi), -1).amax(-1)
        return float(self.weight.abs().max()) * s_max * reaches[0] * (1 + ROUND)

    def lipschitz(self, norm, in_shapes):
        l2 = float(self.weight.abs().max()) / math.sqrt(self.eps) * (1 + 1e-12) \
            if self.eps > 0 else math.inf
        return (l2 if norm == "fro" else l2 * math.sqrt(in_shapes[0][-1]),)


@dataclass(frozen=True)
class Normalize(Operator):
    """``F.normalize(x, p=2, dim=-1, eps)``: ``x / max(||x||_2, eps)``."""

    eps: float

    nonlinear = True

    def __call__(self, x):
        return F.normalize(x, dim=-1, eps=self.eps)

    def _norms(self, box):
        """``[max(n_lo, eps), max(n_hi, eps)]`` for ``n = ||x||`` on the box, and ``n_lo``."""
        lo, hi = box
        small = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(lo),
                            torch.minimum(lo.abs(), hi.abs()))
        n_lo = torch.linalg.vector_norm(small, dim=-1, keepdim=True) * (1 - ROUND)
        n_hi = torch.linalg.vector_norm(torch.maximum(lo.abs(), hi.abs()), dim=-1,
                                        keepdim=True) * (1 + ROUND)
        return n_lo.clamp(min=self.eps), n_hi.clamp(min=self.eps), n_lo

    def _unit(self, box):
        lo, hi = box
        N_lo, N_hi, _ = self._norms(box)
        up = torch.where(hi > 0, hi / torch.maximum(N_lo, hi), hi / N_hi)
        down = torch.where(lo < 0, lo / torch.maximum(N_lo, -lo), lo / N_hi)
        return ((down - ROUND * down.abs()).clamp(min=-1.0),
                (up + ROUND * up.abs()).clamp(max=1.0))

    def interval(self, box):
        return self._unit(box)

    def jacobian(self, rows, boxes):
        N_lo, N_hi, n_lo = (t[:, None] for t in self._norms(boxes[0]))
        y = tuple(t[:, None] for t in self._unit(boxes[0]))
        a = rows
        w = _dot(a, y)
        t_lo, t_hi = interval_product(w, y)
        # Inside the ball ||x|| < eps the y y^T term is absent: lam in [0, 1].
        touches = n_lo <= self.eps
        t_lo, t_hi = torch.where(touches, t_lo.clamp(max=0), t_lo), \
            torch.where(touches, t_hi.clamp(min=0), t_hi)
        return (interval_product((1 / N_hi * (1 - ROUND), 1 / N_lo * (1 + ROUND)),
                         (a[0] - t_hi, a[1] - t_lo)),)

    def backward(self, A, boxes, lower):
        return mean_value_rule(self, A, boxes)

    def spread(self, inputs, radii):
        """``sphere_spread`` at the clean ``u`` where ``||u|| > eps``; ``r / eps`` inside the
        ball, where ``F.normalize`` divides by ``eps`` (section 9)."""
        (u,), (r,) = inputs, radii
        norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
        outside = sphere_spread(u / norm.clamp(min=self.eps), norm.clamp(min=self.eps), r)
        return torch.where(norm > self.eps, outside, r / self.eps) * (1 + ROUND)

    row_norm = "plain"

    def remainder(self, inputs, radii, rows=None):
        """``sphere_remainder`` (an l2 bound per row) where the segment stays outside the
        ball ``||x|| <= eps`` (``||u|| - h > eps``), else ``inf``; ``h`` bounds
        ``||delta||_2``: ``||d||_2`` or the row bound."""
        (u,), (d,) = inputs, radii
        norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
        h = _row_bound(d, rows)
        bound = sphere_remainder(h, norm)
        return torch.ones_like(u), torch.where(norm - h > self.eps, bound,
                                               torch.full_like(bound, math.inf))

    def local_reach(self, boxes, reaches, nominals):
        """``||J||_2 <= 1 / max(||x||, eps)``: the reach over the smallest norm on the box."""
        if reaches[0] is None:
            return None
        N_lo = self._norms(boxes[0])[0]
        return reaches[0] / N_lo.reshape(len(N_lo), -1).amin(-1) * (1 + ROUND)

    def lipschitz(self, norm, in_shapes):
        l2 = (1 / self.eps) * (1 + 1e-12) if self.eps > 0 else math.inf
        return (l2 if norm == "fro" else l2 * math.sqrt(in_shapes[0][-1]),)
