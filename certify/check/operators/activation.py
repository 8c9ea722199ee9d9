"""Numpy twin of ``certify.graph.operators.Activation``: ReLU, LeakyReLU, ELU, Tanh, Sigmoid,
GELU (exact erf form and tanh approximation), Softplus (linear above ``threshold / beta``,
as torch computes it, where it jumps down by ``log1p(exp(-threshold)) / beta``: it has no
Lipschitz constant, and the jump widens its intervals and linear rule), SiLU, Mish,
hard-swish, hard-sigmoid and hardtanh (also ReLU6 and a clamp between constants).

Linear rules, as the torch operator makes them (so that the bounds confirm its radii):
piecewise-linear kinds, for a lower bound only and a convex function (negative slope in
``[0, 1]``), CROWN's adaptive lines (below ``s x``, above the chord); otherwise one line
``lam x + mu +- nu`` with the chord slope ``lam`` and ``mu +- nu`` the range of
``phi(x) - lam x`` on ``[l, u]``: at ``l``, ``0`` and ``u`` for piecewise-linear kinds, by
the mean value theorem with the derivative range for the smooth ones (plus the softplus
jump). Intervals: the ends' values for the monotone kinds (and the jump); for both GELUs,
which fall and then rise, the ends' values widened by ``ROUND``, or the floor when the box
contains the minimiser, and so for SiLU, Mish and hard-swish (``DIPS``); a LeakyReLU with
a negative slope is not monotone, its interval includes ``phi(0) = 0``. The mean value rule
needs only ``phi'`` almost everywhere: hardtanh and hard-sigmoid are the clipped lines
``clamp(a x + b, low, high)``, with ``phi' = a`` between their kinks and 0 outside.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf, expit

from certify.check.operators.base import ROUND, Twin, row_sum

# GELU' = Phi(x) + x phi(x) has its extremes at x = -+sqrt(2) (GELU'' = phi(x) (2 - x^2)):
# sup |GELU'| = Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = (1 + erf(1)) / 2 + exp(-1) / sqrt(pi),
# inf GELU' = 1 - that (Phi(-x) = 1 - Phi(x)). GELU falls left of its minimiser (the root of
# GELU', -0.75179...) and rises right of it; its minimum -0.16997... is above the floor.
GELU_LIPSCHITZ = (1 + math.erf(1)) / 2 + math.exp(-1) / math.sqrt(math.pi)
GELU_DERIVATIVE = (-(GELU_LIPSCHITZ - 1) * (1 + 1e-12), GELU_LIPSCHITZ * (1 + 1e-12))
GELU_ARGMIN = -0.7517916
GELU_FLOOR = -0.17
# GELU's tanh form phi(x) = x (1 + tanh(k (x + 0.044715 x^3))) / 2, k = sqrt(2 / pi): phi'
# peaks at the root 1.41850400879 of phi'' and phi'(-x) = 1 - phi'(x) (phi(x) - phi(-x) =
# x); phi falls left of the root of phi' and rises right of it, down to -0.17004075057.
GELU_TANH_LIPSCHITZ = 1.1289930686587718 * (1 + 1e-12)
GELU_TANH_DERIVATIVE = (1 - GELU_TANH_LIPSCHITZ * (1 + 1e-12), GELU_TANH_LIPSCHITZ * (1 + 1e-12))
GELU_TANH_ARGMIN = -0.7524614220710
GELU_TANH_FLOOR = -0.1700408
GELU_TANH_SCALE = math.sqrt(2 / math.pi)
# SiLU x expit(x): phi' = s (1 + x (1 - s)), s = expit(x), is 0 at the minimiser
# -1.27846454276107 (minimum -0.27846454276107); phi' peaks at 2.39935728051547 (1.09983932...)
# and bottoms at its mirror image (-0.09983932..., as phi'(-x) = 1 - phi'(x)).
SILU_DERIVATIVE = (-0.0998393201288670 * (1 + 1e-12), 1.0998393201288670 * (1 + 1e-12))
# Mish x tanh(log(1 + e^x)): minimiser -1.19243121451550 (minimum -0.30884341301725); the
# roots of phi'' at -2.25637639636079 and 1.49057117948543 give phi' its range.
MISH_DERIVATIVE = (-0.112526122389463 * (1 + 1e-12), 1.08849816125173 * (1 + 1e-12))
# (argmin, floor, derivative range) of the activations that fall, then rise; hard-swish
# x clip(x + 3, 0, 6) / 6 is x (x + 3) / 6 on [-3, 3]: minimum -3/8 at -3/2, phi' (2x + 3) / 6.
DIPS = {"gelu": (GELU_ARGMIN, GELU_FLOOR, GELU_DERIVATIVE),
        "gelu_tanh": (GELU_TANH_ARGMIN, GELU_TANH_FLOOR, GELU_TANH_DERIVATIVE),
        "silu": (-1.27846454276107, -0.27847, SILU_DERIVATIVE),
        "mish": (-1.19243121451550, -0.30885, MISH_DERIVATIVE),
        "hardswish": (-1.5, -0.37501, (-0.5, 1.5))}


# ball_offset's bisection on log lam: steps, and the range below the largest useful lam
# (as the torch operator's, so that the checker meets the same lam).
BALL_STEPS = 10
BALL_RANGE = 12.0
# Narrower boxes (relative to 1 + |l| + |u|) take phi' at the middle for the chord slope,
# whose quotient would keep only eps / width of its digits.
CHORD_WIDTH = 1e-5


def kink_chord(f_lo, f_hi, lo, hi, left):
    """``phi(x) in lam x + mu +- nu`` on ``[lo, hi]`` for ``phi`` of slope ``left`` below 0
    (a number, or an array like ``lo``) and 1 above: the chord slope across the kink, and
    ``mu +- nu`` the range of ``phi(x) - lam x`` at ``lo``, 0 and ``hi``."""
    unstable = (lo < 0) & (hi > 0)
    lam = np.where(unstable, (f_hi - f_lo) / np.where(unstable, hi - lo, 1.0),
                   np.where(lo >= 0, 1.0, left))
    g_lo, g_hi = f_lo - lam * lo, f_hi - lam * hi
    zero = np.where(unstable, 0.0, g_lo)  # phi(0) - lam 0, where 0 is inside
    low = np.minimum(np.minimum(g_lo, g_hi), zero)
    high = np.maximum(np.maximum(g_lo, g_hi), zero)
    return lam, (high + low) / 2, (high - low) / 2 + ROUND * (np.abs(lo) + np.abs(hi))


def kink_lines(f_lo, f_hi, lo, hi, left):
    """CROWN's lines for the same ``phi`` where convex: ``phi(x) >= s_l x`` and
    ``phi(x) <= s_u x + b_u`` on ``[lo, hi]``."""
    unstable = (lo < 0) & (hi > 0)
    stable = np.where(lo >= 0, 1.0, left)
    s_upper = np.where(unstable, (f_hi - f_lo) / np.where(unstable, hi - lo, 1.0), stable)
    b_upper = f_lo - s_upper * lo  # lifted by its miss at hi, so that it is above phi
    miss = np.maximum(f_hi - (s_upper * hi + b_upper), 0)
    b_upper = np.where(unstable, b_upper + miss + ROUND * (np.abs(f_lo) + np.abs(f_hi)), 0.0)
    s_lower = np.where(unstable, np.where(hi >= -lo, 1.0, left), stable)
    return s_lower, s_upper, b_upper


def derivative_rows(rows, d_lo, d_hi):
    """Interval rows times a derivative in ``[d_lo, d_hi]``: the extremes of the four
    products."""
    lo, hi = rows
    products = np.stack([lo * d_lo, lo * d_hi, hi * d_lo, hi * d_hi])
    return products.min(0), products.max(0)


class ActivationTwin(Twin):
    nonlinear = True

    def __init__(self, op, in_shapes, out_shape):
        super().__init__(op, in_shapes, out_shape)
        self.kind = op.kind
        self.slope, self.scale, self.input_scale = float(op.slope), float(op.scale), \
            float(op.input_scale)
        self.piecewise_linear = self.kind in ("relu", "leaky_relu")
        # (k1, k2, a) of the clipped lines: phi' = a between the kinks, 0 outside
        self.clip = {"hardsigmoid": (-3.0, 3.0, 1 / 6),
                     "hardtanh": (self.slope, self.scale, 1.0)}.get(self.kind)
        self.jump = math.log1p(math.exp(-self.scale)) / self.slope \
            if self.kind == "softplus" else 0.0

    def __call__(self, x):
        kind = self.kind
        if kind == "relu":
            return np.maximum(x, 0.0)
        if kind == "leaky_relu":
            return np.where(x > 0, x, self.slope * x)
        if kind == "elu":
            return np.where(x > 0, self.scale * x,
                            self.scale * self.slope * np.expm1(np.minimum(x, 0) * self.input_scale))
        if kind == "tanh":
            return np.tanh(x)
        if kind == "sigmoid":
            return expit(x)
        if kind == "gelu":
            return x * 0.5 * (1 + erf(x / math.sqrt(2)))
        if kind == "gelu_tanh":
            return x * 0.5 * (1 + np.tanh(GELU_TANH_SCALE * (x + 0.044715 * x ** 3)))
        if kind == "silu":
            return x * expit(x)
        if kind == "mish":
            return x * np.tanh(np.logaddexp(0.0, x))
        if kind == "hardswish":
            return x * np.clip(x + 3, 0.0, 6.0) / 6
        if kind == "hardsigmoid":
            return np.clip(x + 3, 0.0, 6.0) / 6
        if kind == "hardtanh":
            return np.clip(x, self.slope, self.scale)
        beta, threshold = self.slope, self.scale  # softplus
        with np.errstate(over="ignore"):
            return np.where(x * beta > threshold, x, np.logaddexp(0.0, x * beta) / beta)

    def derivative(self, x):
        """``phi'(x)``, with torch's gradient at kinks (ReLU: 0 at 0; ELU: the left one)."""
        kind = self.kind
        if kind in ("relu", "leaky_relu"):
            return np.where(x > 0, 1.0, self.slope if kind == "leaky_relu" else 0.0)
        if kind == "elu":
            return np.where(x > 0, self.scale, self.scale * self.slope * self.input_scale *
                            np.exp(np.minimum(x, 0) * self.input_scale))
        if kind == "tanh":
            return 1 - np.tanh(x) ** 2
        if kind == "sigmoid":
            s = expit(x)
            return s * (1 - s)
        if kind == "gelu":
            return 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        if kind == "gelu_tanh":  # (1 + t) / 2 + x (1 - t^2) u' / 2, t = tanh(u)
            t = np.tanh(GELU_TANH_SCALE * (x + 0.044715 * x ** 3))
            du = GELU_TANH_SCALE * (1 + 3 * 0.044715 * x * x)
            return (1 + t) / 2 + x * (1 - t * t) * du / 2
        if kind == "silu":
            s = expit(x)
            return s + x * s * (1 - s)
        if kind == "mish":  # tanh(sp) + x sp' (1 - tanh(sp)^2), sp' = expit
            t = np.tanh(np.logaddexp(0.0, x))
            return t + x * expit(x) * (1 - t * t)
        if kind == "hardswish":
            return np.where(x <= -3, 0.0, np.where(x < 3, x / 3 + 0.5, 1.0))  # torch's at -+3
        if self.clip is not None:
            k1, k2, a = self.clip
            return np.where((x > k1) & (x < k2), a, 0.0)
        return np.where(x * self.slope > self.scale, 1.0, expit(x * self.slope))

    def interval(self, box):
        lo, hi = box
        f_lo, f_hi = self(lo), self(hi)
        if self.kind in DIPS:
            argmin, floor, _ = DIPS[self.kind]
            high = np.maximum(f_lo, f_hi)
            slack = ROUND * (np.abs(high) + np.abs(lo) + np.abs(hi))  # erf cancels at x << 0
            return np.where((lo <= argmin) & (hi >= argmin), floor,
                            np.minimum(f_lo, f_hi) - slack), high + slack
        if self.kind == "leaky_relu" and self.slope < 0:
            inside = (lo < 0) & (hi > 0)
            low, high = np.minimum(f_lo, f_hi), np.maximum(f_lo, f_hi)
            return np.where(inside, np.minimum(low, 0.0), low), high
        return f_lo - self.jump, f_hi + self.jump

    def derivative_range(self, lo, hi):
        """An interval containing every (generalised) derivative on ``[lo, hi]``."""
        kind = self.kind
        if self.piecewise_linear:
            s = self.slope if kind == "leaky_relu" else 0.0
            a, b = min(s, 1.0), max(s, 1.0)
            low = np.where(hi < 0, s, np.where(lo > 0, 1.0, a))
            high = np.where(hi < 0, s, np.where(lo > 0, 1.0, b))
            return low, high
        if kind in DIPS:
            low, high = DIPS[kind][2]
            return np.full_like(lo, low), np.full_like(lo, high)
        if self.clip is not None:  # a between the kinks, 0 outside, [0, a] at a kink
            k1, k2, a = self.clip
            return np.where((lo > k1) & (hi < k2), a, 0.0), \
                np.where((hi >= k1) & (lo <= k2), a, 0.0)
        d_lo, d_hi = self.derivative(lo), self.derivative(hi)
        if kind in ("tanh", "sigmoid"):  # even about 0, falling with |x|
            top = np.where((lo <= 0) & (hi >= 0), self.derivative(np.zeros_like(lo)),
                           np.maximum(d_lo, d_hi))
            return np.minimum(d_lo, d_hi) * (1 - ROUND), top * (1 + ROUND)
        low, high = np.minimum(d_lo, d_hi), np.maximum(d_lo, d_hi)  # elu, softplus: monotone
        if kind == "elu":  # pieces: increasing on each side of the kink at 0
            inside = (lo <= 0) & (hi >= 0)
            left = self.scale * self.slope * self.input_scale
            low = np.where(inside, np.minimum(low, min(left, self.scale)), low)
            high = np.where(inside, np.maximum(high, max(left, self.scale)), high)
        return low * (1 - ROUND), high * (1 + ROUND)

    def unstable(self, lo, hi):
        if self.piecewise_linear:
            return (lo < 0) & (hi > 0)
        return np.ones(lo.shape, dtype=bool)

    def symmetric(self, lo, hi):
        """``phi(x) in lam x + mu +- nu`` for ``x`` in ``[lo, hi]``."""
        f_lo, f_hi = self(lo), self(hi)
        width = hi - lo
        if self.piecewise_linear:
            return kink_chord(f_lo, f_hi, lo, hi, self.slope if self.kind == "leaky_relu" else 0.0)
        wide = width > CHORD_WIDTH * (1 + np.abs(lo) + np.abs(hi))
        lam = np.where(wide, (f_hi - f_lo) / np.where(wide, width, 1.0),
                       self.derivative((lo + hi) / 2))
        d_lo, d_hi = self.derivative_range(lo, hi)
        g_lo = f_lo - lam * lo
        below = np.minimum(d_lo - lam, 0) * width
        above = np.maximum(d_hi - lam, 0) * width
        slack = ROUND * (np.abs(lo) + np.abs(hi) + np.abs(f_lo) + np.abs(f_hi)) + self.jump
        return lam, g_lo + (below + above) / 2, (above - below) / 2 + slack

    def adaptive(self, lo, hi):
        """CROWN's lines for a convex piecewise-linear ``phi`` on ``[lo, hi]``:
        ``phi(x) >= s_l x`` and ``phi(x) <= s_u x + b_u``."""
        return kink_lines(self(lo), self(hi), lo, hi,
                          self.slope if self.kind == "leaky_relu" else 0.0)

    def backward(self, A, boxes, lower, alpha=None):
        """``alpha`` (rows like ``A``): each row's lower slope ``s + (1 - s) alpha`` on the
        unstable entries, clipped to ``[s, 1]``; CROWN's where ``alpha < 0``."""
        lo, hi = boxes[0]
        s = self.slope if self.kind == "leaky_relu" else 0.0
        if lower and self.piecewise_linear and 0 <= s <= 1:
            s_lower, s_upper, b_upper = self.adaptive(lo, hi)
            s_lower = s_lower[:, None]
            if alpha is not None:
                chosen = np.clip(s + (1 - s) * alpha, s, 1.0)
                unstable = ((lo < 0) & (hi > 0))[:, None]
                s_lower = np.where(unstable & (alpha >= 0), chosen, s_lower)
            positive, negative = np.maximum(A, 0), np.minimum(A, 0)
            return (positive * s_lower + negative * s_upper[:, None],), \
                row_sum(negative * b_upper[:, None]), None
        lam, mu, nu = self.symmetric(lo, hi)
        return (A * lam[:, None],), row_sum(A * mu[:, None]), row_sum(np.abs(A) * nu[:, None])

    def ball_offset(self, A, G, box, center, radius):
        """SDP-CROWN's offset over the box and the ball ``||x - center|| <= radius``: a lower
        bound of ``sum_i A_i phi(x_i) - G_i x_i`` (``(B, R)``; ``None`` unless piecewise
        linear), as ``Activation.ball_offset`` computes it: the dual
        ``-lam r^2 / 2 + sum_i min_{x_i in box} A_i phi(x_i) - G_i x_i + lam / 2 (x_i - c_i)^2``
        on unstable entries (each side of the kink a clipped quadratic minimiser), the exact
        box minimum of the linear part on stable ones, at the best ``lam`` of
        ``BALL_STEPS`` bisection steps on ``log lam`` below ``||max_side |q|||_2 / r``."""
        if not self.piecewise_linear:
            return None
        B, R = A.shape[:2]
        lo, hi, c = (np.asarray(t).reshape(B, 1, -1) for t in (*box, center))
        A, G = A.reshape(B, R, -1), G.reshape(B, R, -1)
        s = self.slope if self.kind == "leaky_relu" else 0.0
        unstable = (lo < 0) & (hi > 0)
        q = A * np.where(lo >= 0, 1.0, s) - G
        linear = np.minimum(q * lo, q * hi)
        offset = np.where(unstable, 0.0, linear).sum(-1)
        offset = offset - ROUND * np.where(unstable, 0.0, np.abs(linear)).sum(-1)
        if not unstable.any():
            return offset
        k = int(unstable.sum(-1).max())
        order = np.argsort(~unstable, axis=-1, kind="stable")[..., :k]
        keep = np.take_along_axis(unstable, order, -1)

        def pick(t):
            index = np.broadcast_to(order, (*t.shape[:2], k))
            return np.where(keep, np.take_along_axis(t, index, -1), 0.0)

        lo, hi, c, A, G = pick(lo), pick(hi), pick(c), pick(A), pick(G)
        zero = np.zeros_like(lo)
        sides = [(s * A - G, lo, zero), (A - G, zero, hi)]
        r2 = np.reshape(radius * radius, (B, 1))

        def minima(lam):
            lam = lam[..., None]
            values, points = [], []
            for coefficient, a, b in sides:
                x = np.minimum(np.maximum(c - coefficient / lam, a), b)
                values.append(coefficient * x + lam / 2 * (x - c) ** 2)
                points.append(x)
            right = values[1] < values[0]
            return np.where(right, values[1], values[0]), np.where(right, points[1], points[0])

        largest = np.maximum(np.abs(sides[0][0]), np.abs(sides[1][0]))
        with np.errstate(divide="ignore"):
            top = np.log(np.maximum(np.linalg.norm(largest, axis=-1) /
                                    np.maximum(np.reshape(radius, (B, 1)), 1e-300), 1e-300))
        low, high = top - BALL_RANGE, top
        best, best_lam = np.full(top.shape, -np.inf), np.exp(top)
        for _ in range(BALL_STEPS):
            t = (low + high) / 2
            lam = np.exp(t)
            terms, x = minima(lam)
            value = terms.sum(-1) - lam * r2 / 2
            better = value > best
            best, best_lam = np.where(better, value, best), np.where(better, lam, best_lam)
            rising = ((x - c) ** 2).sum(-1) > r2
            low, high = np.where(rising, t, low), np.where(rising, high, t)
        terms, x = minima(best_lam)
        size = (np.abs(terms) + largest * (np.abs(x) + np.abs(c)) + best_lam[..., None] *
                ((x - c) ** 2 + x ** 2 + c ** 2)).sum(-1) + best_lam * r2
        return offset + terms.sum(-1) - best_lam * r2 / 2 - ROUND * size

    def enclose(self, inputs, boxes):
        """CROWN's lines where both slopes are nonnegative, else the symmetric line."""
        (enclosure,), (lo, hi) = inputs, boxes[0]
        s = self.slope if self.kind == "leaky_relu" else 0.0
        if self.piecewise_linear and 0 <= s <= 1:
            s_lower, s_upper, b_upper = self.adaptive(lo, hi)
            return enclosure.lines(s_lower, np.zeros_like(lo), s_upper, b_upper)
        return enclosure.scaled(*self.symmetric(lo, hi))

    def jacobian(self, rows, boxes):
        if self.jump:  # no mean value theorem across the softplus jump
            return None
        d_lo, d_hi = (t[:, None] for t in self.derivative_range(*boxes[0]))
        return (derivative_rows(rows, d_lo, d_hi),)

    def gradient(self, A, xs):
        return (A * self.derivative(xs[0])[:, None],)

    def lipschitz(self, norm):
        """``sup |phi'|``, the constant in every norm (entrywise map); none (``inf``) for
        softplus, which jumps at its threshold."""
        kind = self.kind
        if kind == "softplus":
            return (math.inf,)
        if kind == "elu":
            return (self.scale * max(1.0, self.slope * self.input_scale),)
        if kind in ("silu", "mish", "hardswish"):
            low, high = DIPS[kind][2]
            return (max(-low, high),)
        if self.clip is not None:
            return (self.clip[2],)
        return ({"relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "gelu": GELU_LIPSCHITZ,
                 "gelu_tanh": GELU_TANH_LIPSCHITZ,
                 "leaky_relu": max(1.0, abs(self.slope))}[kind],)
