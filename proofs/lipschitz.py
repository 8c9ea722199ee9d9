"""THEORY.md section 5: the Lipschitz chain and the multi-layer recursion.

Chain. Downstream of ``z``: ``a_k = phi(z_k)``, ``z_{k+1} = W_{k+1} a_k + b_{k+1}``, up to the
margin ``m_j = c^T (W_L a_{L-1} + b_L)``, ``c = e_y - e_j``. Three facts compose:

1. Cauchy-Schwarz, ``|c^T W_L x| <= ||W_L^T c||_2 ||x||_2``: from Lagrange's identity
   ``||u||^2 ||v||^2 - (u.v)^2 = sum_{i<k} (u_i v_k - u_k v_i)^2``, checked as a polynomial
   identity.
2. A layer, ``||W x||_2 <= ||W||_2 ||x||_2``, the definition of the spectral norm.
3. An activation with ``|phi'| <= L`` is ``L``-Lipschitz entrywise, hence in l2. The
   maxima of ``|phi'|`` are derived: ReLU, tanh 1; sigmoid 1/4; LeakyReLU(alpha)
   ``max(1, |alpha|)``; GELU about 1.1290 (NOT 1-Lipschitz: a certificate must use it);
   hard-sigmoid 1/6, ReLU6 1, hard-swish 3/2; SiLU and Mish about 1.0998 and 1.0885.

So ``|Delta m_j| <= ||W_L^T c||_2 prod_{l<k<L} (L_phi ||W_k||_2) L_phi ||Delta z||_2``.

Multi-layer. ``(W + D)(h + dh) - W h = W dh + D h + D dh``, so by the triangle inequality
and 2., ``||dz|| <= (||W|| + e) ||dh|| + e ||h||`` for ``||D|| <= e``.
"""

from __future__ import annotations

from functools import partial

import sympy as sp

from proofs.closed_forms import GELU_LIPSCHITZ
from proofs.derivation import DerivationError, register, require_equal


def check_cauchy_schwarz(n: int) -> None:
    u = sp.symbols(f"u0:{n}", real=True)
    v = sp.symbols(f"v0:{n}", real=True)
    gap = sum(x**2 for x in u) * sum(y**2 for y in v) - sum(x * y for x, y in zip(u, v)) ** 2
    squares = sum((u[i] * v[k] - u[k] * v[i]) ** 2 for i in range(n) for k in range(i + 1, n))
    require_equal(gap, squares, "Lagrange's identity")


def check_chain(n: int, classes: int) -> None:
    """The pieces of the chain at the last layer ``W_L`` (classes x n) and the activation."""
    da = sp.Matrix(sp.symbols(f"da0:{n}", real=True))  # phi(z + dz) - phi(z)
    dz = sp.Matrix(sp.symbols(f"dz0:{n}", real=True))
    W = sp.Matrix(classes, n, lambda r, k: sp.Symbol(f"W{r}{k}", real=True))
    c = sp.Matrix([1, -1] + [0] * (classes - 2))
    require_equal((c.T * W * da)[0], ((W.T * c).T * da)[0], "Delta m_j = (W_L^T c)^T Delta a")
    check_cauchy_schwarz(n)
    # |da_i| <= L |dz_i| entrywise, i.e. da_i^2 = L^2 dz_i^2 - t_i with t_i >= 0, sums up to
    # ||da||^2 <= L^2 ||dz||^2.
    lip = sp.Symbol("L", positive=True)
    slack = sp.symbols(f"t0:{n}", nonnegative=True)
    gap = lip**2 * sum(x**2 for x in dz) - sum(x**2 for x in da)
    gap = gap.subs({da[i] ** 2: lip**2 * dz[i] ** 2 - slack[i] for i in range(n)})
    require_equal(gap, sum(slack), "||phi(z+dz) - phi(z)||^2 <= L^2 ||dz||^2")


def check_recursion(m: int, n: int) -> None:
    W, D = (sp.Matrix(m, n, lambda i, k, s=s: sp.Symbol(f"{s}{i}{k}", real=True)) for s in "WD")
    h = sp.Matrix(sp.symbols(f"h0:{n}", real=True))
    dh = sp.Matrix(sp.symbols(f"g0:{n}", real=True))
    require_equal((W + D) * (h + dh) - W * h, W * dh + D * h + D * dh,
                  "(W + D)(h + dh) - W h = W dh + D h + D dh")


def derivative_bound(phi: sp.Expr, x: sp.Symbol) -> sp.Expr:
    """``sup |phi'(x)|`` over the reals, from the critical points of ``phi'``."""
    d1 = sp.diff(phi, x)
    if isinstance(d1, sp.Piecewise):  # ReLU-like: the derivative takes finitely many values
        return sp.Max(*[sp.Abs(piece) for piece, _ in d1.args])
    return sp.Max(sp.maximum(d1, x, sp.S.Reals), -sp.minimum(d1, x, sp.S.Reals))


def check_activations() -> None:
    x = sp.Symbol("x", real=True)
    alpha = sp.Rational(1, 100)
    cases = {
        "tanh": (sp.tanh(x), 1),
        "sigmoid": (1 / (1 + sp.exp(-x)), sp.Rational(1, 4)),
        "relu": (sp.Piecewise((0, x < 0), (x, True)), 1),
        "leaky relu 0.01": (sp.Piecewise((alpha * x, x < 0), (x, True)), 1),
        "hard-sigmoid": (sp.Piecewise((0, x < -3), ((x + 3) / 6, x < 3), (1, True)),
                         sp.Rational(1, 6)),
        "ReLU6": (sp.Piecewise((0, x < 0), (x, x < 6), (6, True)), 1),
    }
    for name, (phi, expected) in cases.items():
        got = derivative_bound(phi, x)
        if sp.simplify(got - expected) != 0:
            raise DerivationError(f"{name}: sup |phi'| = {got}, expected {expected}")
    gelu = x * (1 + sp.erf(x / sp.sqrt(2))) / 2
    d1, d2 = sp.diff(gelu, x), sp.diff(gelu, x, 2)
    # d2 = (2 - x^2) exp(-x^2/2) / sqrt(2 pi): critical points of GELU' at x = +-sqrt(2).
    require_equal(sp.simplify(d2 * sp.sqrt(2 * sp.pi) * sp.exp(x**2 / 2)), 2 - x**2,
                  "GELU'' = (2 - x^2) phi(x)")
    peak, trough = d1.subs(x, sp.sqrt(2)), d1.subs(x, -sp.sqrt(2))
    limits = [sp.limit(d1, x, sp.oo), sp.limit(d1, x, -sp.oo)]
    if not all(float(peak) > abs(float(v)) for v in [trough, *limits]):
        raise DerivationError("GELU: x = sqrt(2) is not where |GELU'| is largest")
    require_equal(peak, GELU_LIPSCHITZ, "GELU: sup |phi'| = (1 + erf(1))/2 + exp(-1)/sqrt(pi)")
    check_gelu_tanh(x)
    check_hardswish(x)
    s = 1 / (1 + sp.exp(-x))
    check_dip("silu", x * s, x, (-2.4, 2.4))
    check_dip("mish", x * sp.tanh(sp.log(1 + sp.exp(x))), x, (-2.26, 1.49))


def check_hardswish(x: sp.Symbol) -> None:
    """Hard-swish ``x relu6(x + 3) / 6``: ``x (x + 3) / 6`` on ``[-3, 3]`` (0 left, ``x``
    right), so ``phi'`` ranges over ``[-1/2, 3/2]`` (its ends) and the minimum ``-3/8`` lies
    at ``-3/2``: the constants of ``DIPS["hardswish"]``."""
    from certify.graph.operators.activation_shapes import DIPS

    argmin, floor, (low, high) = DIPS["hardswish"]
    middle = x * (x + 3) / 6
    d1 = sp.diff(middle, x)
    require_equal(sp.solve(d1, x)[0], sp.Rational(-3, 2), "hard-swish: its minimiser")
    require_equal(middle.subs(x, sp.Rational(-3, 2)), sp.Rational(-3, 8), "hard-swish: minimum")
    if not (argmin == -1.5 and floor <= -3 / 8 and (low, high) == (-0.5, 1.5)
            and (d1.subs(x, -3), d1.subs(x, 3)) == (sp.Rational(-1, 2), sp.Rational(3, 2))):
        raise DerivationError(f"hard-swish: DIPS holds {DIPS['hardswish']}")


def check_dip(name: str, phi: sp.Expr, x: sp.Symbol, guesses) -> None:
    """An activation that falls to one minimum and then rises (``DIPS[name]``): the root of
    ``phi'`` is the minimiser (located to 30 digits; the floor lies below the minimum, by at
    most 1e-4), ``phi' < 0`` left of it and ``> 0`` right of it on a grid over [-50, 50],
    and ``phi'`` lies in the stated range there, whose ends are the values at the roots of
    ``phi''`` near ``guesses`` (up to the range's relative widening of 1e-12)."""
    from certify.graph.operators.activation_shapes import DIPS

    argmin, floor, (low, high) = DIPS[name]
    d1 = sp.diff(phi, x)
    root = sp.nsolve(d1, x, argmin, prec=30)
    minimum = float(phi.subs(x, root).evalf(30))
    if not (abs(float(root) - argmin) < 1e-12 and floor <= minimum < floor + 1e-4):
        raise DerivationError(f"{name}: minimum {minimum} at {root}, DIPS says {argmin}, {floor}")
    extremes = [float(d1.subs(x, sp.nsolve(sp.diff(d1, x), x, g, prec=30)).evalf(30))
                for g in guesses]
    if not (low <= min(extremes) <= low * (1 - 1e-11) and
            high * (1 - 1e-11) <= max(extremes) <= high):
        raise DerivationError(f"{name}: phi' ranges over {extremes}, DIPS says {(low, high)}")
    slope = sp.lambdify(x, d1, "mpmath")
    for k in range(-1000, 1001):
        point = sp.Rational(k, 20)
        value = float(slope(point))
        if not (low <= value <= high and (value < 0) == (point < root) or value == 0):
            raise DerivationError(f"{name}: phi'({point}) = {value} breaks the dip's shape or "
                                  f"range {(low, high)}")


def check_gelu_tanh(x: sp.Symbol) -> None:
    """GELU's tanh approximation: ``phi(x) - phi(-x) = x``, so ``phi'(-x) = 1 - phi'(x)`` and
    the derivative's range is ``[1 - L, L]`` with ``L`` its peak, at the positive root of
    ``phi''`` (located to 30 digits; a grid over [-50, 50] finds no larger value)."""
    from certify.graph.operators.activation_shapes import GELU_TANH_LIPSCHITZ

    u = sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 10**6) * x**3)
    phi = x * (1 + sp.tanh(u)) / 2
    require_equal(sp.simplify((phi - phi.subs(x, -x)).rewrite(sp.exp)), x,
                  "GELU tanh: phi(x) - phi(-x) = x")
    d1 = sp.diff(phi, x)
    root = sp.nsolve(sp.diff(d1, x), x, 1.4185, prec=30)
    peak = float(d1.subs(x, root).evalf(30))
    grid = sp.lambdify(x, d1, "mpmath")
    top = max(float(grid(sp.Rational(k, 20))) for k in range(-1000, 1001))
    if not (top <= peak * (1 + 1e-12) and peak <= GELU_TANH_LIPSCHITZ):
        raise DerivationError(f"GELU tanh: sup phi' = {peak} (grid {top}) exceeds the constant "
                              f"{GELU_TANH_LIPSCHITZ}")


register("Lipschitz chain inequality", "5",
         {"3 -> 2 classes": partial(check_chain, 3, 2),
          "4 -> 3 classes": partial(check_chain, 4, 3)})
register("multi-layer recursion identity", "5",
         {"2x3": partial(check_recursion, 2, 3), "3x4": partial(check_recursion, 3, 4)})
register("activation Lipschitz constants", "5", {"scalar": check_activations})
