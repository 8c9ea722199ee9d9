"""Elementwise activations: ReLU, LeakyReLU (piecewise linear), ELU, Tanh, Sigmoid, GELU
(exact erf form and tanh approximation), Softplus, SiLU, Mish, hard-swish, hard-sigmoid and
hardtanh (which is also ReLU6 and a clamp between constants).

Linear rules (``backward``). ReLU and LeakyReLU: for bounds in both directions one line
``phi(x) = lam x + mu +- nu`` with ``lam`` the chord slope and ``mu +- nu`` the range of
``phi(x) - lam x`` on ``[l, u]`` (its extremes lie at ``l``, ``0`` and ``u``); for a lower
bound only (the margins), CROWN's adaptive lines: below ``s x`` (``s`` = 1 or the negative
slope), above the chord, when the function is convex (negative slope in ``[0, 1]``). The
smooth activations: the chord slope ``lam`` (``phi'`` at the middle on boxes narrower than
``CHORD_WIDTH``, where the quotient loses its digits) and, by the mean value theorem,
``phi(x) - lam x - (phi(l) - lam l) = (phi'(xi) - lam)(x - l)`` with ``phi'(xi)`` in the
derivative range on ``[l, u]`` (``derivative_range``), so ``nu <= (u - l) max(d_hi - lam,
lam - d_lo) / 2`` around the middle of that range. The rule holds for any absolutely
continuous ``phi`` with ``phi'`` in that range almost everywhere, so it serves the
piecewise-linear hardtanh and hard-sigmoid, and the piecewise-quadratic hard-swish, too.

Intervals: the ends' values for the monotone kinds; the "dips" (both GELUs, SiLU, Mish,
hard-swish fall to one minimum, then rise) take the ends' values, or a floor below the
minimum when the box contains the minimiser (``DIPS``).

Constants (``lipschitz``): ``sup |phi'|``, derived in proofs/lipschitz.py (GELU at
``x = sqrt(2)``; its tanh approximation, SiLU and Mish at the roots of ``phi''``, located
there; hard-swish ``3/2``, hard-sigmoid ``1/6``, hardtanh 1). Softplus follows torch: linear above ``threshold / beta``, where it jumps
down by at most ``log1p(exp(-threshold)) / beta``; that jump widens every bound, and leaves
softplus without a Lipschitz constant (``inf``: the global bound through it is 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certify.graph.operators.activation_shapes import (CURVATURE, DIPS, GELU_LIPSCHITZ,
                                                      GELU_TANH_LIPSCHITZ, HARDSIGMOID)
from certify.graph.operators.base import ROUND, Operator, row_sum

# Activation.ball_offset: bisection steps on log lam, over a range of e^BALL_RANGE below the
# largest useful lam.
BALL_STEPS = 10
BALL_RANGE = 12.0

# Below this width (relative to 1 + |l| + |u|) the chord (phi(u) - phi(l)) / (u - l) of a smooth
# activation keeps too few digits (eps / width); phi' at the middle is within O(width^2) of it,
# and any slope is sound in the linear rule.
CHORD_WIDTH = 1e-5

KINDS = ("relu", "leaky_relu", "elu", "tanh", "sigmoid", "gelu", "gelu_tanh", "softplus",
         "silu", "mish", "hardswish", "hardsigmoid", "hardtanh")


def kink_chord(f_lo, f_hi, lo, hi, left):
    """``phi(x) in lam x + mu +- nu`` on ``[lo, hi]`` for ``phi`` linear with slope ``left``
    below 0 and 1 above it (``phi(0) = 0``), at the ends' values ``f_lo``, ``f_hi``: the chord
    slope across the kink, and ``mu +- nu`` the range of ``phi(x) - lam x`` (at ``lo``, 0 and
    ``hi``). ``left``: a tensor like ``lo`` (LeakyReLU's one slope, PReLU's per channel)."""
    unstable = (lo < 0) & (hi > 0)
    stable = torch.where(lo >= 0, torch.ones_like(lo), left)
    lam = torch.where(unstable, (f_hi - f_lo) / torch.where(unstable, hi - lo, 1.0), stable)
    g_lo, g_hi = f_lo - lam * lo, f_hi - lam * hi
    zero = torch.where(unstable, 0.0, g_lo)
    low = torch.minimum(torch.minimum(g_lo, g_hi), zero)
    high = torch.maximum(torch.maximum(g_lo, g_hi), zero)
    return lam, (high + low) / 2, (high - low) / 2 + ROUND * (lo.abs() + hi.abs())


def kink_lines(f_lo, f_hi, lo, hi, left):
    """CROWN's lines for the same ``phi`` where it is convex (``0 <= left <= 1``):
    ``phi(x) >= s_l x`` and ``phi(x) <= s_u x + b_u`` on ``[lo, hi]``."""
    unstable = (lo < 0) & (hi > 0)
    chord = torch.where(unstable, (f_hi - f_lo) / torch.where(unstable, hi - lo, 1.0), 0.0)
    stable = torch.where(lo >= 0, torch.ones_like(lo), left)
    s_upper = torch.where(unstable, chord, stable)
    # The chord through (lo, f_lo) with the rounded slope: check both ends and lift by
    # the larger miss, so that the line is above phi on the whole interval.
    b_upper = f_lo - s_upper * lo
    miss = torch.clamp(f_hi - (s_upper * hi + b_upper), min=0)
    b_upper = torch.where(unstable, b_upper + miss + ROUND * (f_lo.abs() + f_hi.abs()), 0.0)
    s_lower = torch.where(unstable, torch.where(hi >= -lo, torch.ones_like(lo), left), stable)
    return s_lower, s_upper, b_upper


def derivative_rows(rows, d_lo, d_hi):
    """Interval rows times a derivative in ``[d_lo, d_hi]`` (``(B, R, *x)`` and
    ``(B, 1, *x)``): the extremes of the four products."""
    lo, hi = rows
    products = (lo * d_lo, lo * d_hi, hi * d_lo, hi * d_hi)
    low = torch.minimum(torch.minimum(products[0], products[1]),
                        torch.minimum(products[2], products[3]))
    high = torch.maximum(torch.maximum(products[0], products[1]),
                         torch.maximum(products[2], products[3]))
    return low, high


def ball_minima(sides, c, lam):
    """``min psi_i`` over each unstable entry's box, and the minimiser
    (``Activation.ball_offset``): ``psi_i(x) = q_side x + lam / 2 (x - c_i)^2`` on each side
    ``(q_side, a, b)`` of the kink, minimised at ``c_i - q_side / lam`` clipped to
    ``[a, b]``; the smaller side wins. ``lam``: ``(B, R)``; the rest ``(B, R or 1, k)``."""
    lam = lam[..., None]
    best = point = None
    for coefficient, a, b in sides:
        x = (c - coefficient / lam).clamp(min=a).minimum(b)
        value = coefficient * x + lam / 2 * (x - c) ** 2
        if best is None:
            best, point = value, x
        else:
            lower = value < best
            best, point = torch.where(lower, value, best), torch.where(lower, x, point)
    return best, point


def ball_dual(minima, lam, r2):
    """The dual ``q(lam) = sum_i min psi_i - lam r^2 / 2`` (``Activation.ball_offset``)."""
    return minima.sum(-1) - lam * r2 / 2


@dataclass(frozen=True)
class Activation(Operator):
    """An elementwise activation ``phi(x)`` of one ``kind`` (ReLU, LeakyReLU, ELU, tanh,
    sigmoid, GELU, softplus, SiLU, Mish, hard-swish, hard-sigmoid, hardtanh) with its
    parameters."""

    kind: str
    slope: float = 0.0  # leaky_relu: negative slope; elu: alpha; softplus: beta; hardtanh: min
    scale: float = 1.0  # elu: output scale (SELU); softplus: threshold; hardtanh: max
    input_scale: float = 1.0  # elu

    nonlinear = True

    @property
    def piecewise_linear(self) -> bool:
        return self.kind in ("relu", "leaky_relu")

    @property
    def ball_aware(self) -> bool:
        return self.piecewise_linear

    @property
    def clip(self) -> tuple[float, float, float] | None:
        """``(k1, k2, a)`` of a clipped line (``phi' = a`` between the kinks ``k1 < k2``, 0
        outside), else ``None``."""
        if self.kind == "hardsigmoid":
            return HARDSIGMOID
        return (self.slope, self.scale, 1.0) if self.kind == "hardtanh" else None

    def __call__(self, x):
        kind = self.kind
        if kind == "relu":
            return torch.relu(x)
        if kind == "leaky_relu":
            return F.leaky_relu(x, self.slope)
        if kind == "elu":
            return torch.ops.aten.elu(x, self.slope, self.scale, self.input_scale)
        if kind == "gelu":
            return F.gelu(x)
        if kind == "gelu_tanh":
            return F.gelu(x, approximate="tanh")
        if kind == "softplus":
            return F.softplus(x, self.slope, self.scale)
        if kind in ("silu", "mish", "hardswish"):
            return getattr(F, kind)(x)
        if kind == "hardsigmoid":  # F.hardsigmoid's arithmetic, with a second derivative
            return F.hardtanh(x + 3, 0.0, 6.0) / 6
        if kind == "hardtanh":
            return F.hardtanh(x, self.slope, self.scale)
        return torch.tanh(x) if kind == "tanh" else torch.sigmoid(x)

    @property
    def jump(self) -> float:
        """Largest downward jump of the forward map (softplus at its threshold)."""
        return math.log1p(math.exp(-self.scale)) / self.slope if self.kind == "softplus" else 0.0

    def interval(self, box):
        lo, hi = box
        f_lo, f_hi = self(lo), self(hi)
        if self.kind in DIPS:  # decreasing, then increasing
            argmin, floor, _ = DIPS[self.kind]
            low = torch.minimum(f_lo, f_hi)
            inside = (lo <= argmin) & (hi >= argmin)
            high = torch.maximum(f_lo, f_hi)
            # Phi(x) = (1 + erf(x / sqrt 2)) / 2 cancels for x << 0 (as 1 + tanh does): an
            # absolute error of about eps |x|, covered by ROUND times the inputs' magnitudes.
            slack = ROUND * (high.abs() + lo.abs() + hi.abs())
            return torch.where(inside, torch.full_like(low, floor), low - slack), high + slack
        return f_lo - self.jump, f_hi + self.jump

    def derivative(self, x):
        """``phi'`` of the smooth activations (right derivative at kinks)."""
        kind = self.kind
        if kind == "tanh":
            return 1 - torch.tanh(x) ** 2
        if kind == "sigmoid":
            s = torch.sigmoid(x)
            return s * (1 - s)
        if kind == "elu":
            curve = self.scale * self.slope * self.input_scale * torch.exp(self.input_scale * x)
            return torch.where(x > 0, torch.full_like(x, self.scale), curve)
        if kind == "softplus":
            return torch.where(self.slope * x > self.scale, torch.ones_like(x),
                               torch.sigmoid(self.slope * x))
        if kind == "gelu":  # Phi(x) + x phi(x)
            return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + \
                x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        if kind == "gelu_tanh":
            c = math.sqrt(2 / math.pi)
            t = torch.tanh(c * (x + 0.044715 * x**3))
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
        if kind == "silu":
            s = torch.sigmoid(x)
            return s * (1 + x * (1 - s))
        if kind == "mish":
            t = torch.tanh(F.softplus(x))
            return t + x * torch.sigmoid(x) * (1 - t * t)
        if kind == "hardswish":  # torch's gradient: 0 at -3, 1 at 3
            return torch.where(x <= -3, torch.zeros_like(x),
                               torch.where(x < 3, x / 3 + 0.5, torch.ones_like(x)))
        if self.clip is not None:
            k1, k2, a = self.clip
            return torch.where((x > k1) & (x < k2), torch.full_like(x, a), torch.zeros_like(x))
        # Tensors, not Python floats: torch.where would round a scalar slope to float32.
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(
            x, self.slope if self.kind == "leaky_relu" else 0.0))

    def derivative_range(self, lo, hi):
        """An interval containing every (generalised) derivative of ``phi`` on ``[lo, hi]``."""
        kind = self.kind
        if self.piecewise_linear:
            a, b = min(self.slope, 1.0), max(self.slope, 1.0)
            slope, one = torch.full_like(lo, self.slope), torch.ones_like(lo)
            low = torch.where(hi < 0, slope, torch.where(lo > 0, one, torch.full_like(lo, a)))
            high = torch.where(hi < 0, slope, torch.where(lo > 0, one, torch.full_like(lo, b)))
            return low, high
        if kind in DIPS:
            low, high = DIPS[kind][2]
            return torch.full_like(lo, low), torch.full_like(lo, high)
        if self.clip is not None:  # a between the kinks, 0 outside, [0, a] at a kink
            k1, k2, a = self.clip
            a, zero = torch.full_like(lo, a), torch.zeros_like(lo)
            return torch.where((lo > k1) & (hi < k2), a, zero), \
                torch.where((hi >= k1) & (lo <= k2), a, zero)
        d_lo, d_hi = self.derivative(lo), self.derivative(hi)
        if kind in ("tanh", "sigmoid"):  # phi' is even about 0 and falls with |x|
            inside = (lo <= 0) & (hi >= 0)
            top = torch.where(inside, self.derivative(torch.zeros_like(lo)),
                              torch.maximum(d_lo, d_hi))
            return torch.minimum(d_lo, d_hi) * (1 - ROUND), top * (1 + ROUND)
        # elu, softplus: phi' is monotone on each side of the kink at 0 (elu) and increasing.
        low, high = torch.minimum(d_lo, d_hi), torch.maximum(d_lo, d_hi)
        if kind == "elu":
            inside = (lo <= 0) & (hi >= 0)
            left = self.scale * self.slope * self.input_scale
            low = torch.where(inside, torch.clamp(low, max=min(left, self.scale)), low)
            high = torch.where(inside, torch.clamp(high, min=max(left, self.scale)), high)
        return low * (1 - ROUND), high * (1 + ROUND)

    def unstable(self, lo, hi):
        if self.piecewise_linear:
            return (lo < 0) & (hi > 0)
        return torch.ones_like(lo, dtype=torch.bool)

    def symmetric(self, lo, hi):
        """``phi(x) in lam x + mu +- nu`` on ``[lo, hi]``."""
        f_lo, f_hi = self(lo), self(hi)
        width = hi - lo
        if self.piecewise_linear:
            return kink_chord(f_lo, f_hi, lo, hi, torch.full_like(lo, self.slope))
        wide = width > CHORD_WIDTH * (1 + lo.abs() + hi.abs())
        lam = torch.where(wide, (f_hi - f_lo) / torch.where(wide, width, 1.0),
                          self.derivative((lo + hi) / 2))
        d_lo, d_hi = self.derivative_range(lo, hi)
        g_lo = f_lo - lam * lo
        below, above = torch.clamp(d_lo - lam, max=0) * width, torch.clamp(d_hi - lam, min=0) * width
        slack = ROUND * (lo.abs() + hi.abs() + f_lo.abs() + f_hi.abs()) + self.jump
        return lam, g_lo + (below + above) / 2, (above - below) / 2 + slack

    def adaptive(self, lo, hi):
        """CROWN's lines for a convex piecewise-linear ``phi``: ``phi(x) >= s_l x`` and
        ``phi(x) <= s_u x + b_u`` on ``[lo, hi]``."""
        return kink_lines(self(lo), self(hi), lo, hi, torch.full_like(lo, self.slope))

    @property
    def optimisable(self) -> bool:
        """Are CROWN's lower slopes free (``Activation.backward``'s ``alpha``)? For a convex
        piecewise-linear ``phi``: ReLU, LeakyReLU with a slope in ``[0, 1]``."""
        return self.piecewise_linear and 0 <= self.slope <= 1

    def backward(self, A, boxes, lower, alpha=None):
        """The linear rule (see the module). ``alpha`` ``(B, R, *x)``, with ``lower`` on an
        ``optimisable`` kind: each row's lower slope on an unstable entry is
        ``s + (1 - s) alpha`` (``s`` the negative slope; every value in ``[s, 1]`` keeps
        ``phi(x) >= slope x`` on the box, alpha-CROWN's freedom), CROWN's choice where
        ``alpha < 0``."""
        lo, hi = boxes[0]
        if lower and self.optimisable:
            s_lower, s_upper, b_upper = self.adaptive(lo, hi)
            s_lower = s_lower[:, None]
            if alpha is not None:
                chosen = (self.slope + (1 - self.slope) * alpha).clamp(min=self.slope, max=1.0)
                unstable = ((lo < 0) & (hi > 0))[:, None]
                s_lower = torch.where(unstable & (alpha >= 0), chosen, s_lower)
            positive, negative = A.clamp(min=0), A.clamp(max=0)
            return (positive * s_lower + negative * s_upper[:, None],), \
                row_sum(negative * b_upper[:, None]), None
        lam, mu, nu = self.symmetric(lo, hi)
        return (A * lam[:, None],), row_sum(A * mu[:, None]), row_sum(A.abs() * nu[:, None])

    def ball_offset(self, A, G, box, center, radius, steps: int = BALL_STEPS):
        """A lower bound of ``sum_i A_i phi(x_i) - G_i x_i`` over the box ``[lo, hi]``
        intersected with the l2 ball ``||x - c||_2 <= r`` (rows ``A``, ``G``: ``(B, R, *x)``;
        ``(B, R)``), for a piecewise-linear ``phi``; ``None`` for the smooth ones.

        SDP-CROWN's offset (Chiu et al., ICML 2025, Theorem 4.1), here with the box: on the
        ball ``lam / 2 (||x - c||^2 - r^2) <= 0`` for every ``lam >= 0``, so the sum is at
        least the separable dual

            q(lam) = -lam r^2 / 2 + sum_i min_{lo_i <= x_i <= hi_i} psi_i(x_i),
            psi_i(x) = A_i phi(x) - G_i x + lam / 2 (x - c_i)^2,

        each minimum that of a convex quadratic on each side of the kink: its minimiser
        ``c_i - (A_i phi'_side - G_i) / lam`` clipped to the side's part of the box.
        ``q(0)`` is the box bound that CROWN's lines leave. Only unstable entries carry the
        quadratic: elsewhere it is nonnegative, and dropping it leaves a lower bound (the
        exact box minimum of the linear part). ``q`` is concave with slope
        ``(sum_i (x_i* - c_i)^2 - r^2) / 2``, negative for ``lam >= ||q_max|| / r``
        (``|x_i* - c_i| <= |q_i| / lam``): a bisection on ``log lam`` over ``steps`` points
        below that; any ``lam`` is sound, so the best one met is kept.

        Rounding: ``psi`` at the computed minimiser exceeds the minimum by ``O(eps^2)``
        times ``|q_i| (|x_i| + |c_i|) + lam (x_i^2 + c_i^2)`` (clipping is 1-Lipschitz); the
        result is lowered by ``ROUND`` times every term's magnitude.
        """
        if not self.ball_aware:
            return None
        B, R = A.shape[:2]
        lo, hi, c = (t.reshape(B, 1, -1) for t in (*box, center))
        A, G = A.reshape(B, R, -1), G.reshape(B, R, -1)
        unstable = (lo < 0) & (hi > 0)
        # Stable entries: phi is linear, the minimum of (A phi' - G) x on [lo, hi] at an end.
        left = self.slope if self.kind == "leaky_relu" else 0.0
        # Tensors, not Python floats: torch.where would round the slope to float32.
        q = A * torch.where(lo >= 0, torch.ones_like(lo), torch.full_like(lo, left)) - G
        ends = torch.minimum(q * lo, q * hi)
        fixed = torch.where(unstable, 0.0, ends).sum(-1)
        fixed_size = torch.where(unstable, 0.0, ends.abs()).sum(-1)
        if not unstable.any():
            return fixed - ROUND * fixed_size
        # The unstable entries of each input, padded with zeros (which add nothing).
        k = int(unstable.sum(-1).max())
        order = torch.argsort(unstable.to(torch.int8), dim=-1, descending=True,
                              stable=True)[..., :k]
        keep = unstable.gather(-1, order)
        take = lambda t: torch.where(keep, t.gather(-1, order.expand(*t.shape[:2], k)), 0.0)  # noqa: E731
        lo, hi, c, A, G = take(lo), take(hi), take(c), take(A), take(G)
        zero = torch.zeros_like(lo)
        sides = ((A * left - G, lo, zero), (A - G, zero, hi))  # psi's x-coefficient, part
        r2 = (radius * radius).reshape(B, 1)
        largest = torch.maximum(sides[0][0].abs(), sides[1][0].abs())
        top = (torch.linalg.vector_norm(largest, dim=-1) /
               radius.reshape(B, 1).clamp(min=1e-300)).clamp(min=1e-300).log()
        a, b = top - BALL_RANGE, top
        best = torch.full_like(top, -math.inf)
        best_lam = top.exp()
        for _ in range(steps):
            t = (a + b) / 2
            lam = t.exp()
            terms, x = ball_minima(sides, c, lam)
            value = ball_dual(terms, lam, r2)
            better = value > best
            best, best_lam = torch.where(better, value, best), torch.where(better, lam, best_lam)
            grow = ((x - c) ** 2).sum(-1) > r2  # the slope is positive: the optimum lies right
            a, b = torch.where(grow, t, a), torch.where(grow, b, t)
        terms, x = ball_minima(sides, c, best_lam)
        lam_ = best_lam[..., None]
        size = (terms.abs() + largest * (x.abs() + c.abs()) +
                lam_ * ((x - c) ** 2 + x ** 2 + c ** 2)).sum(-1) + best_lam * r2
        return fixed - ROUND * fixed_size + ball_dual(terms, best_lam, r2) - ROUND * size

    def enclose(self, inputs, boxes):
        """CROWN's lines for ReLU and LeakyReLU with a slope in ``[0, 1]`` (both slopes
        nonnegative), else the symmetric line, of either sign."""
        (enclosure,), (lo, hi) = inputs, boxes[0]
        if self.piecewise_linear and 0 <= self.slope <= 1:
            s_lower, s_upper, b_upper = self.adaptive(lo, hi)
            return enclosure.lines(s_lower, torch.zeros_like(lo), s_upper, b_upper)
        return enclosure.scaled(*self.symmetric(lo, hi))

    def clean_slope(self, u):
        """``phi'(u)`` as autograd takes it (at a kink, the side torch picks): the diagonal of
        the clean Jacobian of THEORY.md section 9."""
        return torch.func.jvp(self, (u,), (torch.ones_like(u),))[1]

    def tangent(self, inputs, tangents):
        """The clean (diagonal) Jacobian on forms ``(B, p, *shape)``: ``phi'(u) t``."""
        return self.clean_slope(inputs[0])[:, None] * tangents[0]

    def spread(self, inputs, radii):
        """``|phi'(u)| r`` (section 9)."""
        return self.clean_slope(inputs[0]).abs() * radii[0]

    def remainder(self, inputs, radii, rows=None):
        """Section 9, for ``|delta| <= d`` at ``u``. ReLU and LeakyReLU with slope ``a``:
        ``|1 - a| (d - |u|)_+``, zero while ``u + delta`` cannot cross the kink (at ``u = 0``
        with either one-sided slope); the clipped lines (slope ``a`` between the kinks):
        ``|a| (d - dist(u, kinks))_+`` likewise; the smooth kinds of ``CURVATURE``:
        ``sup |phi''| d^2 / 2`` (Taylor); ``None`` for the others (ELU, softplus's jump,
        hard-swish)."""
        (u,), (d,) = inputs, radii
        if self.piecewise_linear:
            return abs(1 - self.slope) * (d - u.abs()).clamp(min=0)
        if self.clip is not None:
            k1, k2, a = self.clip
            return abs(a) * (d - torch.minimum((u - k1).abs(), (u - k2).abs())).clamp(min=0)
        if self.kind in CURVATURE:
            return CURVATURE[self.kind] * d * d / 2
        return None

    def jacobian(self, rows, boxes):
        if self.jump:  # the mean value theorem does not hold across a jump
            return None
        d_lo, d_hi = (t[:, None] for t in self.derivative_range(*boxes[0]))
        return (derivative_rows(rows, d_lo, d_hi),)

    def lipschitz(self, norm, in_shapes):
        return (self.constant,)

    @property
    def constant(self) -> float:
        """``sup |phi'|``: the constant in every norm, as phi acts entrywise; ``inf`` for
        torch's softplus, which jumps at its threshold (only local bounds then certify)."""
        kind = self.kind
        if kind == "softplus":
            return math.inf
        if kind == "elu":
            return self.scale * max(1.0, self.slope * self.input_scale)
        if kind in ("silu", "mish", "hardswish"):
            return max(-DIPS[kind][2][0], DIPS[kind][2][1])
        if self.clip is not None:
            return self.clip[2]
        return {"relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "gelu": GELU_LIPSCHITZ,
                "gelu_tanh": GELU_TANH_LIPSCHITZ,
                "leaky_relu": max(1.0, abs(self.slope))}[kind]
