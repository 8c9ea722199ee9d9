"""THEORY.md section 5: SDP-CROWN's offset of a piecewise-linear activation over a box and an
l2 ball (Chiu et al., ICML 2025, Theorem 4.1; ``certify.graph.operators.activation.ball_offset``).

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

from dataclasses import dataclass

import sympy as sp

from proofs.derivation import DerivationError, register, require_equal

x, q, c, a, star = sp.symbols("x q c a x_star", real=True)
lam, r = sp.symbols("lam r", positive=True)


@dataclass(frozen=True)
class BallForms:
    """The closed forms ``Activation.ball_offset`` computes (``ball_minima``, ``ball_dual``)."""
    dual_term: sp.Expr  # the multiplier's constant in q(lam)
    minimiser: sp.Expr  # x* of psi = q x + lam / 2 (x - c)^2 on one side
    minimum: sp.Expr  # psi(x*)
    slope: sp.Expr  # d/dlam of a side's minimum, at the minimiser x_star


FORMS = BallForms(dual_term=-lam * r**2 / 2, minimiser=c - q / lam,
                  minimum=q * c - q**2 / (2 * lam), slope=(star - c) ** 2 / 2)


def check_weak_duality(forms: BallForms, n: int) -> None:
    xs = sp.symbols(f"x0:{n}", real=True)
    cs = sp.symbols(f"c0:{n}", real=True)
    A = sp.symbols(f"A0:{n}", real=True)
    G = sp.symbols(f"G0:{n}", real=True)
    p = sp.symbols(f"p0:{n}", real=True)  # phi(x_i), any values
    f = sum(A[i] * p[i] - G[i] * xs[i] for i in range(n))
    ball = sum((xs[i] - cs[i]) ** 2 for i in range(n)) - r**2
    separable = sum(A[i] * p[i] - G[i] * xs[i] + lam / 2 * (xs[i] - cs[i]) ** 2
                    for i in range(n)) + forms.dual_term
    require_equal(f + lam / 2 * ball, separable, "f + lam/2 (||x - c||^2 - r^2) separates")
    # On the ball the added term is lam/2 (||x - c||^2 - r^2) = -lam/2 t, t >= 0.
    t = sp.Symbol("t", nonnegative=True)
    if not (-lam / 2 * t).is_nonpositive:
        raise DerivationError("lam/2 (||x - c||^2 - r^2) <= 0 on the ball for lam >= 0")


def check_side_minimum(forms: BallForms) -> None:
    psi = q * x + lam / 2 * (x - c) ** 2
    require_equal(sp.diff(psi, x), lam * (x - forms.minimiser), "psi'(x) = lam (x - x*)")
    if not sp.diff(psi, x, 2).is_positive:
        raise DerivationError("psi'' = lam > 0: psi is convex on each side")
    require_equal(psi.subs(x, forms.minimiser), forms.minimum, "psi(x*) = q c - q^2 / (2 lam)")
    # The envelope: interior and clipped minimisers.
    require_equal(sp.diff(psi.subs(x, forms.minimiser), lam),
                  forms.slope.subs(star, forms.minimiser), "d/dlam psi(x*(lam)) = (x* - c)^2 / 2")
    require_equal(sp.diff(psi.subs(x, a), lam), forms.slope.subs(star, a),
                  "d/dlam psi(a) = (a - c)^2 / 2 at a clipped end")


register("ball offset (SDP-CROWN): weak duality, side minima, dual slope", "5",
         {"3 entries": lambda: (check_weak_duality(FORMS, 3), check_side_minimum(FORMS))})
