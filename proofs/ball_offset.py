"""THEORY.md section 5: SDP-CROWN's offset of a piecewise-linear activation over a box and an
l2 ball (Chiu et al., ICML 2025, Theorem 4.1; ``certify.operators.activation.ball_offset``).

For ``f(x) = sum_i A_i phi(x_i) - G_i x_i`` on ``{lo <= x <= hi, ||x - c||_2 <= r}``:

1. Weak duality. ``f(x) + lam / 2 (||x - c||^2 - r^2) = sum_i psi_i(x_i) - lam r^2 / 2`` with
   ``psi_i(x) = A_i phi(x) - G_i x + lam / 2 (x - c_i)^2`` (an identity), and the added term
   is ``<= 0`` on the ball for ``lam >= 0``: so ``min f >= q(lam) = sum_i min psi_i -
   lam r^2 / 2``, separable over the entries.
2. Each side of the kink. ``phi`` is linear there (slope ``s``), ``psi(x) = q x + lam / 2
   (x - c)^2`` with ``q = A s - G``: ``psi'(x) = lam (x - x*)``, ``x* = c - q / lam``,
   ``psi'' = lam > 0``; so ``psi`` falls left of ``x*`` and rises right of it, and its
   minimum over ``[a, b]`` is at ``x*`` clipped to ``[a, b]``. There
   ``psi(x*) = q c - q^2 / (2 lam)``.
3. The dual's slope (envelope): at an interior minimiser ``d/dlam psi(x*(lam)) =
   q^2 / (2 lam^2) = (x* - c)^2 / 2``; at a clipped end ``a``, ``(a - c)^2 / 2``; so
   ``q'(lam) = (sum_i (x_i* - c_i)^2 - r^2) / 2``, which guides the bisection.
"""

from __future__ import annotations

import sympy as sp

from proofs.derivation import DerivationError, register, require_equal


def check_weak_duality(n: int) -> None:
    x = sp.symbols(f"x0:{n}", real=True)
    c = sp.symbols(f"c0:{n}", real=True)
    A = sp.symbols(f"A0:{n}", real=True)
    G = sp.symbols(f"G0:{n}", real=True)
    p = sp.symbols(f"p0:{n}", real=True)  # phi(x_i), any values
    lam, r = sp.symbols("lam r", positive=True)
    f = sum(A[i] * p[i] - G[i] * x[i] for i in range(n))
    ball = sum((x[i] - c[i]) ** 2 for i in range(n)) - r**2
    separable = sum(A[i] * p[i] - G[i] * x[i] + lam / 2 * (x[i] - c[i]) ** 2
                    for i in range(n)) - lam * r**2 / 2
    require_equal(f + lam / 2 * ball, separable, "f + lam/2 (||x - c||^2 - r^2) separates")
    # On the ball the added term is lam/2 (||x - c||^2 - r^2) = -lam/2 t, t >= 0.
    t = sp.Symbol("t", nonnegative=True)
    if not (-lam / 2 * t).is_nonpositive:
        raise DerivationError("lam/2 (||x - c||^2 - r^2) <= 0 on the ball for lam >= 0")


def check_side_minimum() -> None:
    x, q, c = sp.symbols("x q c", real=True)
    lam = sp.Symbol("lam", positive=True)
    psi = q * x + lam / 2 * (x - c) ** 2
    star = c - q / lam
    require_equal(sp.diff(psi, x), lam * (x - star), "psi'(x) = lam (x - x*)")
    if not sp.diff(psi, x, 2).is_positive:
        raise DerivationError("psi'' = lam > 0: psi is convex on each side")
    require_equal(psi.subs(x, star), q * c - q**2 / (2 * lam), "psi(x*) = q c - q^2 / (2 lam)")
    # The envelope: interior and clipped minimisers.
    require_equal(sp.diff(psi.subs(x, star), lam), (star - c) ** 2 / 2,
                  "d/dlam psi(x*(lam)) = (x* - c)^2 / 2")
    a = sp.Symbol("a", real=True)
    require_equal(sp.diff(psi.subs(x, a), lam), (a - c) ** 2 / 2,
                  "d/dlam psi(a) = (a - c)^2 / 2 at a clipped end")


register("ball offset (SDP-CROWN): weak duality, side minima, dual slope", "5",
         {"3 entries": lambda: (check_weak_duality(3), check_side_minimum())})
