"""Numpy twins of the transformer operators (``certify.graph.operators``: ``Product``,
``Softmax``, ``LayerNorm``, ``Normalize``; THEORY.md section 8), with the torch operators'
relaxations so that the checker's bounds confirm their radii.

Product ``x . y`` (entrywise with broadcasting, or ``x @ y`` over the last two axes), with
centres ``x_c, y_c`` and radii ``x_r, y_r`` of the boxes:
``x . y = x . y_c + x_c . y - x_c . y_c + dx . dy`` and ``|dx . dy| <= x_r . y_r``, the
linear rule in both directions; the interval takes the four corner products of every term
``x_i y_j``; rows ``a`` go back to ``x`` as ``a y^T`` and to ``y`` as ``x^T a`` (summed over
broadcast axes), in interval arithmetic for the interval Jacobian; no Lipschitz constant.

The others act on the last axis; their linear rule is the mean value one
(``base.mean_value_rule``) on their interval Jacobians, ``a J`` below, with products of
intervals in centre-radius form (``_times``):

* softmax ``p = exp(x) / sum exp(x)``: ``p_i`` in ``[1 / (1 + sum_{j != i} exp(u_j - l_i)),
  1 / (1 + sum_{j != i} exp(l_j - u_i))]``; ``(a J)_k = p_k (a_k - a . p)``, ``a . p`` in
  ``[min a, max a]``; constants ``||J||_2 <= 1``, ``||J||_inf = max 2 p_k (1 - p_k) <= 1/2``;
  with a mask, hidden entries weigh ``[0, 0]`` and the sums, the minimum and the maximum run
  over the kept ones;
* LayerNorm ``y = g c s + b``, ``c = x - mean x``, ``s = 1 / sqrt(mean(c^2) + eps)``:
  ``c^ = c s`` is at most ``t / sqrt(max(v_lo, t^2 / n) + eps)`` at ``c = t`` (``mean c^2
  >= c_k^2 / n``), and ``|c^_k| <= sqrt n``; ``a J = s (a' - mean a' - (a' . c^) c^ / n)``,
  ``a' = a g``, ``|a' . c^| <= ||a'|| sqrt n``; ``||J||_2 <= max |g| / sqrt(eps)``;
* l2 normalisation ``y = x / N``, ``N = max(||x||, eps)``: ``y_k`` at most
  ``t / max(N_lo, t)`` at ``x_k = t > 0`` (``N >= |x_k|``); ``a J = (a - lam (a . y) y) / N``
  with ``lam = 1`` where ``||x|| >= eps`` and ``0`` inside that ball; ``||J||_2 <= 1 / eps``.

l_inf constants are ``sqrt n`` times the l2 ones (``||J||_inf <= sqrt n ||J||_2``), softmax's
excepted. ``local_reach`` bounds ``||f(x) - f(x0)||_2`` from the box instead (for the checker's
interval bounds on the l2 ball): ``||J||_2`` at most ``max |g| max s`` (LayerNorm) or
``1 / N_lo`` (normalisation) on the box, and the expansion of ``x y - x0 y0`` (product).
"""

from __future__ import annotations

import math

import numpy as np

from certify.check.operators.base import ROUND, Twin, mean_value_rule, row_sum, unbroadcast


def _mid_rad(lo, hi):
    """Centre and radius of the box ``[lo, hi]``."""
    return (lo + hi) / 2, (hi - lo) / 2


def _corners(a, b):
    """``[a] [b]`` entrywise for broadcastable intervals ``(lo, hi)``: the least and the
    largest of the four corner products (the exact range)."""
    corners = np.stack(np.broadcast_arrays(a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]))
    slack = ROUND * np.abs(corners).max(0)
    return corners.min(0) - slack, corners.max(0) + slack


def _times(a, b):
    """``[a] [b]`` entrywise in centre-radius form, ``a_c b_c +- (|a_c| b_r + a_r (|b_c| +
    b_r))`` (exact when either is a point)."""
    (ac, ar), (bc, br) = _mid_rad(*a), _mid_rad(*b)
    centre = ac * bc
    radius = (np.abs(ac) * br + ar * (np.abs(bc) + br)) * (1 + ROUND) + ROUND * np.abs(centre)
    return centre - radius, centre + radius


def _inner(a, b):
    """``[a . b]`` over the last axis, ``keepdims``."""
    lo, hi = _times(a, b)
    return lo.sum(-1, keepdims=True), hi.sum(-1, keepdims=True)


def _centred(lo, hi):
    """The box of ``x - mean(x)`` (last axis) for ``x`` in ``[lo, hi]``: centre ``c -
    mean c``, radius ``r_k (1 - 2/n) + sum r / n`` (``x_k`` enters with weight ``1 - 1/n``,
    every other ``x_j`` with ``-1/n``)."""
    n = lo.shape[-1]
    c, r = _mid_rad(lo, hi)
    centre = c - c.mean(-1, keepdims=True)
    radius = r * (1 - 2 / n) + r.sum(-1, keepdims=True) / n
    radius = radius * (1 + ROUND) + ROUND * (np.abs(c) + np.abs(c).mean(-1, keepdims=True))
    return centre - radius, centre + radius


def _smallest_magnitude(lo, hi):
    """``min |x|`` over ``[lo, hi]``, entrywise."""
    return np.where((lo <= 0) & (hi >= 0), 0.0, np.minimum(np.abs(lo), np.abs(hi)))


def _largest_magnitude(lo, hi):
    """``max |x|`` over ``[lo, hi]``, entrywise."""
    return np.maximum(np.abs(lo), np.abs(hi))


def _last_axis(l2: float, shape, norm: str) -> tuple[float]:
    """The constant of a map acting on each vector along the last axis (size ``n``) with
    ``||J||_2 <= l2``: ``l2`` (rounded up), and ``sqrt(n) l2`` in l_inf."""
    l2 = l2 * (1 + 1e-12)
    return (l2 if norm == "fro" else l2 * math.sqrt(shape[-1]),)


class ProductTwin(Twin):
    """``x * y`` (broadcasting) or ``x @ y``: bilinear, no Lipschitz constant."""

    arity = 2
    nonlinear = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.matmul = bool(op.matmul)

    def __call__(self, x, y):
        return np.matmul(x, y) if self.matmul else x * y

    def _pull(self, A, factor, index):
        """Rows ``A`` ``(B, R, *out)`` through ``u -> u . y`` (``index`` 0, ``factor = y``)
        or ``v -> x . v`` (``index`` 1, ``factor = x``), ``factor`` ``(B, *in)``:
        ``A y^T`` or ``x^T A`` for matrices, ``A y`` or ``A x`` entrywise, summed back onto
        input ``index``'s shape."""
        factor = factor[:, None]
        if not self.matmul:
            rows = A * factor
        elif index == 0:
            rows = A @ np.swapaxes(factor, -1, -2)
        else:
            rows = np.swapaxes(factor, -1, -2) @ A
        return unbroadcast(rows, rows.shape[2:], self.in_shapes[index])

    def interval(self, xb, yb):
        if not self.matmul:
            return _corners(xb, yb)
        # the terms x_ik y_kj on axes (..., i, k, j), summed over k
        lo, hi = _corners(tuple(t[..., None] for t in xb), tuple(t[..., None, :, :] for t in yb))
        return lo.sum(-2), hi.sum(-2)

    def backward(self, A, boxes, lower):
        (xc, xr), (yc, yr) = (_mid_rad(*b) for b in boxes)
        rows = (self._pull(A, yc, 0), self._pull(A, xc, 1))
        d = -row_sum(A * self(xc, yc)[:, None])
        e = row_sum(np.abs(A) * self(xr, yr)[:, None])
        size = row_sum(np.abs(A) * self(np.abs(xc) + xr, np.abs(yc) + yr)[:, None])
        return rows, d, e + ROUND * size

    def jacobian(self, rows, boxes):
        """``[a] y^T`` and ``x^T [a]`` with the other factor in its box: centre through the
        centres, radius ``|a_c| f_r + a_r (|f_c| + f_r)``."""
        ac, ar = _mid_rad(*rows)
        (xc, xr), (yc, yr) = (_mid_rad(*b) for b in boxes)
        out = []
        for index, (fc, fr) in enumerate(((yc, yr), (xc, xr))):
            centre = self._pull(ac, fc, index)
            radius = self._pull(np.abs(ac), fr, index) + self._pull(ar, np.abs(fc) + fr, index)
            radius = radius * (1 + ROUND) + ROUND * self._pull(np.abs(ac), np.abs(fc), index)
            out.append((centre - radius, centre + radius))
        return tuple(out)

    def gradient(self, A, xs):
        x, y = xs
        return self._pull(A, y, 0), self._pull(A, x, 1)

    def local_reach(self, boxes, reaches, nominals):
        """``x y - x0 y0 = dx . y0 + x0 . dy + dx . dy``, so ``||x y - x0 y0|| <= f_x r_x
        |y0| + f_y |x0| r_y + min(f_x, f_y) r_x r_y``: ``|.|`` the largest entry (``*``) or
        matrix Frobenius norm (``@``), ``f`` the square root of how often the product
        repeats an entry (a matrix) of that factor."""
        if reaches[0] is None and reaches[1] is None:
            return None
        B = len(nominals[0])

        def blocks(t):  # the axes of the factor's entries (matrices)
            return t.shape[1:-2] if self.matmul else t.shape[1:]

        def largest(t):
            size = np.linalg.norm(t, axis=(-2, -1)) if self.matmul else np.abs(t)
            return size.reshape(B, -1).max(-1)

        out = math.prod(np.broadcast_shapes(*(blocks(t) for t in nominals)))
        (f_x, f_y), (r_x, r_y) = ((math.sqrt(out / math.prod(blocks(t))) for t in nominals),
                                  (np.zeros(B) if r is None else r for r in reaches))
        x0, y0 = nominals
        return (f_x * r_x * largest(y0) + f_y * largest(x0) * r_y + min(f_x, f_y) * r_x * r_y) \
            * (1 + ROUND)

    def lipschitz(self, norm):
        return (math.inf, math.inf)


class SoftmaxTwin(Twin):
    """``p = exp(x) / sum exp(x)``, ``J = diag(p) - p p^T``; with a mask ``keep``, the
    entries it hides weigh 0 and the sums run over the kept ones."""

    nonlinear = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.keep = None if op.keep is None else np.array(op.keep.cpu().numpy(), dtype=bool)

    def __call__(self, x):
        if self.keep is not None:
            x = np.where(self.keep, x, -np.inf)
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def interval(self, box):
        lo, hi = box
        n = lo.shape[-1]
        others = ~np.eye(n, dtype=bool)  # [i, j]: j != i
        if self.keep is not None:
            others = others & self.keep[..., None, :]  # ... and j kept

        def reciprocal(exponents):  # 1 / (1 + sum_{j != i} exp(exponents[i, j]))
            with np.errstate(over="ignore"):
                return 1 / (1 + np.where(others, np.exp(exponents), 0.0).sum(-1))

        low = reciprocal(hi[..., None, :] - lo[..., :, None])
        high = reciprocal(lo[..., None, :] - hi[..., :, None])
        low, high = np.maximum(low * (1 - ROUND), 0.0), np.minimum(high * (1 + ROUND), 1.0)
        if self.keep is None:
            return low, high
        return np.where(self.keep, low, 0.0), np.where(self.keep, high, 0.0)

    def jacobian(self, rows, boxes):
        a = rows
        p = tuple(t[:, None] for t in self.interval(boxes[0]))
        s_lo, s_hi = _inner(a, p)
        keep = True if self.keep is None else self.keep
        s = (np.maximum(s_lo, np.where(keep, a[0], np.inf).min(-1, keepdims=True)),
             np.minimum(s_hi, np.where(keep, a[1], -np.inf).max(-1, keepdims=True)))
        widen = ROUND * (np.abs(a[0]) + np.abs(a[1])).max(-1, keepdims=True)
        return (_times(p, (a[0] - s[1] - widen, a[1] - s[0] + widen)),)

    def backward(self, A, boxes, lower):
        return mean_value_rule(self, A, boxes)

    def gradient(self, A, xs):
        p = self(xs[0])[:, None]
        return (p * (A - (A * p).sum(-1, keepdims=True)),)

    def lipschitz(self, norm):
        return (1.0 if norm == "fro" else 0.5,)


class LayerNormTwin(Twin):
    """``y = g c s + b``, ``J = diag(g) s (I - 1 1^T / n - c^ c^^T / n)``."""

    nonlinear = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.weight = np.array(op.weight.detach().numpy(), dtype=np.float64)
        self.bias = np.array(op.bias.detach().numpy(), dtype=np.float64)
        self.eps = float(op.eps)

    def _scaled(self, x):
        """``c^ = (x - mean x) s`` and ``s`` at a point."""
        c = x - x.mean(-1, keepdims=True)
        s = 1 / np.sqrt((c * c).mean(-1, keepdims=True) + self.eps)
        return c * s, s

    def __call__(self, x):
        return self._scaled(x)[0] * self.weight + self.bias

    def _boxes(self, box):
        """Boxes of ``s`` and of ``c^``."""
        n = box[0].shape[-1]
        c = _centred(*box)
        v_lo = (_smallest_magnitude(*c) ** 2).mean(-1, keepdims=True)
        v_hi = (_largest_magnitude(*c) ** 2).mean(-1, keepdims=True)
        s = (1 / np.sqrt(v_hi * (1 + ROUND) + self.eps) * (1 - ROUND),
             1 / np.sqrt(v_lo * (1 - ROUND) + self.eps) * (1 + ROUND))

        def extreme(t):  # the largest c^ at c = t > 0 (smallest at t < 0): monotone in t
            return t / np.sqrt(np.maximum(v_lo, t * t / n) * (1 - ROUND) + self.eps)

        top = np.where(c[1] > 0, extreme(c[1]), c[1] * s[0])
        bottom = np.where(c[0] < 0, extreme(c[0]), c[0] * s[0])
        root = math.sqrt(n)
        return s, (np.maximum(bottom - ROUND * np.abs(bottom), -root),
                   np.minimum(top + ROUND * np.abs(top), root))

    def interval(self, box):
        _, (h_lo, h_hi) = self._boxes(box)
        g, positive = self.weight, self.weight >= 0
        low = np.where(positive, g * h_lo, g * h_hi) + self.bias
        high = np.where(positive, g * h_hi, g * h_lo) + self.bias
        slack = ROUND * (np.abs(g) * np.maximum(np.abs(h_lo), np.abs(h_hi)) + np.abs(self.bias))
        return low - slack, high + slack

    def jacobian(self, rows, boxes):
        n = boxes[0][0].shape[-1]
        s, h = ((lo[:, None], hi[:, None]) for lo, hi in self._boxes(boxes[0]))
        g, positive = self.weight, self.weight >= 0
        a = (np.where(positive, rows[0] * g, rows[1] * g),
             np.where(positive, rows[1] * g, rows[0] * g))
        centred = _centred(*a)
        reach = np.sqrt(n * (_largest_magnitude(*a) ** 2).sum(-1, keepdims=True)) * (1 + ROUND)
        w_lo, w_hi = _inner(a, h)
        w = (np.maximum(w_lo, -reach), np.minimum(w_hi, reach))
        t = _times(w, (h[0] / n, h[1] / n))
        return (_times(s, (centred[0] - t[1], centred[1] - t[0])),)

    def backward(self, A, boxes, lower):
        return mean_value_rule(self, A, boxes)

    def local_reach(self, boxes, reaches, nominals):
        """``||J||_2 <= max |g| s`` at every point of the box (which holds the segment from
        the nominal input): ``max |g| max s`` times the reach."""
        if reaches[0] is None:
            return None
        s_hi = self._boxes(boxes[0])[0][1]
        return float(np.abs(self.weight).max()) * s_hi.reshape(len(s_hi), -1).max(-1) * \
            reaches[0] * (1 + ROUND)

    def gradient(self, A, xs):
        h, s = (t[:, None] for t in self._scaled(xs[0]))
        a = A * self.weight
        n = a.shape[-1]
        return (s * (a - a.mean(-1, keepdims=True) - (a * h).sum(-1, keepdims=True) * h / n),)

    def lipschitz(self, norm):
        return _last_axis(float(np.abs(self.weight).max()) / math.sqrt(self.eps)
                          if self.eps > 0 else math.inf, self.in_shapes[0], norm)


class NormalizeTwin(Twin):
    """``y = x / max(||x||, eps)``, ``J = (I - y y^T) / ||x||`` outside the ball ``||x|| <
    eps``, ``I / eps`` inside."""

    nonlinear = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.eps = float(op.eps)

    def __call__(self, x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), self.eps)

    def _norms(self, box):
        """``[N_lo, N_hi]`` with ``N = max(||x||, eps)`` over the box, and the least
        ``||x||``."""
        least = np.linalg.norm(_smallest_magnitude(*box), axis=-1, keepdims=True) * (1 - ROUND)
        most = np.linalg.norm(_largest_magnitude(*box), axis=-1, keepdims=True) * (1 + ROUND)
        return np.maximum(least, self.eps), np.maximum(most, self.eps), least

    def interval(self, box):
        lo, hi = box
        N_lo, N_hi, _ = self._norms(box)
        top = np.where(hi > 0, hi / np.maximum(N_lo, hi), hi / N_hi)
        bottom = np.where(lo < 0, lo / np.maximum(N_lo, -lo), lo / N_hi)
        return (np.maximum(bottom - ROUND * np.abs(bottom), -1.0),
                np.minimum(top + ROUND * np.abs(top), 1.0))

    def jacobian(self, rows, boxes):
        N_lo, N_hi, least = (t[:, None] for t in self._norms(boxes[0]))
        y = tuple(t[:, None] for t in self.interval(boxes[0]))
        t_lo, t_hi = _times(_inner(rows, y), y)
        inside = least <= self.eps  # lam in [0, 1]: the interval of lam t holds 0 too
        t_lo, t_hi = np.where(inside, np.minimum(t_lo, 0), t_lo), \
            np.where(inside, np.maximum(t_hi, 0), t_hi)
        return (_times((1 / N_hi * (1 - ROUND), 1 / N_lo * (1 + ROUND)),
                       (rows[0] - t_hi, rows[1] - t_lo)),)

    def backward(self, A, boxes, lower):
        return mean_value_rule(self, A, boxes)

    def local_reach(self, boxes, reaches, nominals):
        """``||J||_2 <= 1 / max(||x||, eps) <= 1 / N_lo`` on the box: the reach over
        ``N_lo``."""
        if reaches[0] is None:
            return None
        N_lo = self._norms(boxes[0])[0]
        return reaches[0] / N_lo.reshape(len(N_lo), -1).min(-1) * (1 + ROUND)

    def gradient(self, A, xs):
        """``(a - (a . y) y) / ||x||`` where ``||x|| >= eps`` (torch's side at the floor),
        ``a / eps`` inside."""
        x = xs[0][:, None]
        length = np.linalg.norm(x, axis=-1, keepdims=True)
        N = np.maximum(length, self.eps)
        y = x / N
        return ((A - np.where(length >= self.eps, (A * y).sum(-1, keepdims=True) * y, 0.0)) / N,)

    def lipschitz(self, norm):
        return _last_axis(1 / self.eps if self.eps > 0 else math.inf, self.in_shapes[0], norm)
