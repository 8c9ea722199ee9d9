"""The numpy twin of ``certify.graph.operators.enclosure``: forward linear enclosures
``x(v) in C(v) +- R(v)`` of downstream values as affine functions of the layer's weight
change ``v`` (``||v|| <= rho``: l2 for ``fro``, l_inf for ``max``), for ``certify check``.

Linear maps give ``f(C) +- |f|(R)``; activations their lines on the input box,
``s_l L + b_l <= phi <= s_u U + b_u`` (slopes ``>= 0``, ``L, U = C -+ R``) or
``lam C + mu +- (|lam| R + nu)``; over the ball ``inf/sup <a, v> = -+ rho ||a||_*`` (l2 for
``fro``, l1 for ``max``). ``bounds`` widens by ``ROUND`` times the magnitudes (``size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from certify.check.operators.rounding import ROUND


@dataclass(frozen=True)
class Enclosure:
    """``c``, ``r``, ``size`` ``(B, *shape)``; ``Ac``, ``Ar`` ``(B, p, *shape)`` or ``None``."""

    c: np.ndarray
    r: np.ndarray
    Ac: np.ndarray | None
    Ar: np.ndarray | None
    size: np.ndarray

    @staticmethod
    def point(value):
        return Enclosure(value, np.zeros_like(value), None, None, np.abs(value))

    @staticmethod
    def box(lo, hi):
        return Enclosure((hi + lo) / 2, (hi - lo) / 2, None, None,
                         np.maximum(np.abs(lo), np.abs(hi)))

    @staticmethod
    def through(linear, absolute, inputs, shift=None) -> "Enclosure":
        """``f(C) + shift +- |f|(R)`` for ``f = linear``, ``|f| = absolute``."""
        c = linear(*(e.c for e in inputs))
        r = absolute(*(e.r for e in inputs))
        size = absolute(*(e.size for e in inputs))
        if shift is not None:
            c, size = c + shift, size + np.abs(shift)
        return Enclosure(c, r, _mapped(linear, [e.Ac for e in inputs], inputs),
                         _mapped(absolute, [e.Ar for e in inputs], inputs), size)

    def lines(self, s_lower, b_lower, s_upper, b_upper) -> "Enclosure":
        low = s_lower * (self.c - self.r) + b_lower
        high = s_upper * (self.c + self.r) + b_upper
        size = np.maximum(s_lower, s_upper) * self.size + np.abs(b_lower) + np.abs(b_upper)
        if self.Ac is None:
            return Enclosure((high + low) / 2, (high - low) / 2, None, None, size)
        Ar = self.Ar if self.Ar is not None else 0.0
        A_low = (self.Ac - Ar) * s_lower[:, None]
        A_high = (self.Ac + Ar) * s_upper[:, None]
        return Enclosure((high + low) / 2, (high - low) / 2, (A_high + A_low) / 2,
                         (A_high - A_low) / 2, size)

    def scaled(self, lam, mu, nu) -> "Enclosure":
        return Enclosure(lam * self.c + mu, np.abs(lam) * self.r + nu,
                         None if self.Ac is None else self.Ac * lam[:, None],
                         None if self.Ar is None else self.Ar * np.abs(lam)[:, None],
                         np.abs(lam) * self.size + np.abs(mu) + nu)

    def bounds(self, rho, norm: str):
        """``c - r - rho ||Ac - Ar||_*`` to ``c + r + rho ||Ac + Ar||_*``, widened."""
        rho = rho.reshape(-1, *[1] * (self.c.ndim - 1))
        if self.Ac is None:
            low = high = np.zeros_like(self.c)
        else:
            order = 2 if norm == "fro" else 1
            Ar = self.Ar if self.Ar is not None else 0.0
            low = rho * np.linalg.norm(self.Ac - Ar, ord=order, axis=1)
            high = rho * np.linalg.norm(self.Ac + Ar, ord=order, axis=1)
        slack = ROUND * (self.size + self.r + low + high)
        return self.c - self.r - low - slack, self.c + self.r + high + slack


def _mapped(f, coefficients, inputs):
    """``f`` on every input's coefficients (zeros for inputs without), ``(B, p, *out)``."""
    given = [A for A in coefficients if A is not None]
    if not given:
        return None
    B, p = given[0].shape[:2]
    parts = [A.reshape(B * p, *A.shape[2:]) if A is not None else
             np.zeros((B * p, *e.c.shape[1:])) for A, e in zip(coefficients, inputs)]
    out = f(*parts)
    return out.reshape(B, p, *out.shape[1:])
