"""THEORY.md section 1: minimise ||D|| subject to D h = r.

Proof pattern, for every norm, on fully symbolic ``r`` and ``h`` (all sign patterns):

1. the closed-form minimiser is feasible, ``D* h = r``;
2. it attains the closed-form value, ``||D*|| = value``;
3. nothing feasible does better: a dual certificate ``lam`` with ``||lam h^T||_dual <= 1``
   and ``lam^T r = value`` gives, for every feasible ``D``,
   ``value = lam^T D h = <lam h^T, D> <= ||lam h^T||_dual ||D|| <= ||D||`` (Hoelder).

The Frobenius case is also solved from scratch: the Lagrangian
``1/2 ||D||_F^2 - lam^T (D h - r)`` is strictly convex in ``D``, so its KKT point is the
unique minimiser, and it equals the closed form. A general-dimension version uses
indexed sums over symbolic ``m`` and ``n``.
"""

from __future__ import annotations

from functools import partial

import sympy as sp

from proofs import closed_forms as cf
from proofs.derivation import DerivationError, register, require_equal, require_nonnegative
from proofs.symbolic import (
    SignedVector,
    entrywise,
    rank_one_singular_value,
    require_equal_nonneg,
    resolve,
    separate_sums,
)

# Powers that turn each norm's roots into polynomials before comparing.
POWER = {"fro": sp.S(2), "spectral": sp.S(2), "max": sp.S.One, "sum": sp.S.One, "lp": cf.p}
DUAL_POWER = {"fro": sp.S(2), "spectral": sp.S(2), "max": sp.S.One, "sum": sp.S.One, "lp": cf.q}
# Exponents at which the l_p results are derived: one on each side of p = 2.
P_VALUES = (sp.Integer(3), sp.Rational(3, 2))


def dual_certificate(norm: str, r: SignedVector, h: SignedVector, p) -> sp.Matrix:
    """A maximiser ``lam`` of the dual problem ``max lam^T r s.t. ||lam h^T||_dual <= 1``."""
    nr, nh = r.norms(p), h.norms(p)
    if norm in ("fro", "spectral"):
        lam = [x / (nr["l2"] * nh["l2"]) for x in r.entries]
    elif norm == "max":
        lam = [s / nh["l1"] if i == r.peak else 0 for i, s in enumerate(r.signs)]
    elif norm == "sum":
        lam = [s / nh["linf"] for s in r.signs]
    else:
        lam = [s * a ** (p - 1) / (nr["lp"] ** (p - 1) * nh["lq"])
               for s, a in zip(r.signs, r.magnitudes)]
    return sp.Matrix(lam)


def matrix_norm(D: sp.Matrix, norm: str, x: sp.Matrix, y: sp.Matrix, vectors, p) -> sp.Expr:
    """``||D||`` for ``D = x y^T`` in one of the norms of THEORY.md (or their duals)."""
    if norm in ("spectral", "nuclear"):
        return rank_one_singular_value(x, y, vectors)
    return entrywise(D, norm, vectors, p)


def require_at_most_one(expr: sp.Expr, power, what: str) -> None:
    try:
        require_equal_nonneg(expr, sp.S.One, what, power)
    except DerivationError:
        require_nonnegative(1 - expr, what)


def at_p(form: cf.RankOneForm, p: sp.Rational) -> cf.RankOneForm:
    """The ``l_p`` form at a concrete exponent (symbolic ``p`` defeats SymPy's root handling)."""
    fields = {k: getattr(form, k).subs(cf.p, p) for k in ("value", "row", "col")}
    return cf.RankOneForm(form.name, form.norm, form.section, **fields)


def check(form: cf.RankOneForm, m: int, n: int, zeros: bool = False, bias: bool = False,
          p: sp.Rational = cf.p) -> None:
    form = at_p(form, p)
    norm = form.norm
    r_peak = 0 if norm == "max" else None  # where ||r||_inf or ||h||_inf enters
    h_peak = 0 if norm == "sum" else None
    r = SignedVector.make("r", m, zeros=(m - 1,) if zeros and m > 1 else (), peak=r_peak)
    h = SignedVector.make("h", n, zeros=(n - 1,) if zeros else (), peak=h_peak, bias=bias)
    vectors = (r, h)
    reduce = lambda e: resolve(e, *vectors)  # noqa: E731
    row = sp.Matrix([r.apply(form.row, cf.u, i, p) for i in range(m)])
    col = sp.Matrix([h.apply(form.col, cf.v, k, p) for k in range(len(h))])
    D = row * col.T
    value = resolve(r.apply(h.apply(form.value, cf.v, 0, p), cf.u, 0, p), *vectors)

    require_equal(D * h.column, r.column, f"{norm}: D* h = r", reduce)
    require_equal_nonneg(matrix_norm(D, norm, row, col, vectors, p), value,
                         f"{norm}: ||D*|| = value", POWER[norm].subs(cf.p, p))

    lam = dual_certificate(norm, r, h, p)
    require_equal((lam.T * r.column)[0], value, f"{norm}: lam^T r = value", reduce)
    dual = cf.DUAL[norm]
    G = lam * h.column.T
    require_at_most_one(matrix_norm(G, dual, lam, h.column, vectors, p),
                        DUAL_POWER[norm].subs(cf.p, p), f"{norm}: ||lam h^T||_{dual} <= 1")
    if norm == "fro":
        check_kkt(D, r, h)


def check_kkt(D_closed: sp.Matrix, r: SignedVector, h: SignedVector) -> None:
    """Solve the Frobenius problem from its Lagrangian and compare with the closed form."""
    m, n = D_closed.shape
    D = sp.Matrix(m, n, lambda i, k: sp.Symbol(f"D{i}{k}", real=True))
    lam = sp.Matrix(sp.symbols(f"lam0:{m}", real=True))
    objective = sum(x**2 for x in D) / 2
    hessian = sp.hessian(objective, list(D))
    if hessian != sp.eye(m * n):
        raise DerivationError("Frobenius: the objective's Hessian is not the identity")
    lagrangian = objective - (lam.T * (D * h.column - r.column))[0]
    equations = [sp.diff(lagrangian, x) for x in D] + list(D * h.column - r.column)
    solution = sp.solve(equations, list(D) + list(lam), dict=True)
    if len(solution) != 1:
        raise DerivationError(f"Frobenius: KKT system has {len(solution)} solutions, not 1")
    require_equal(D.subs(solution[0]), D_closed, "Frobenius: KKT point = D*",
                  lambda e: resolve(e, r, h))


def check_general_dimension() -> None:
    """Frobenius in symbolic dimensions m x n: (D* h)_i = r_i and ||D*||_F = ||r|| / ||h||."""
    m, n = sp.symbols("m n", integer=True, positive=True)
    i, k = sp.symbols("i k", integer=True)
    r, h = sp.IndexedBase("r", real=True), sp.IndexedBase("h", real=True)
    h2 = sp.Sum(h[k] ** 2, (k, 1, n))
    r2 = sp.Sum(r[i] ** 2, (i, 1, m))
    D = r[i] * h[k] / h2  # D*_ik = r_i h_k / ||h||^2
    require_equal(separate_sums(sp.Sum(D * h[k], (k, 1, n))), r[i], "general: (D* h)_i = r_i")
    fro2 = separate_sums(sp.Sum(D**2, (k, 1, n), (i, 1, m)))
    require_equal(fro2, r2 / h2, "general: ||D*||_F^2 = ||r||^2 / ||h||^2")


SHAPES = {"2x3": (2, 3), "3x4": (3, 4)}

def cases(check_shape, general=None) -> dict:
    """Every shape a section-1 or section-3 result is derived on; l_p at each P_VALUES."""
    out = {}
    for p in P_VALUES if check_shape.args[0].norm == "lp" else (cf.p,):
        at = "" if p == cf.p else f", p={p}"
        for label, mn in SHAPES.items():
            out[label + at] = partial(check_shape, *mn, p=p)
        out["2x3 with zero entries" + at] = partial(check_shape, 2, 3, zeros=True, p=p)
        out["2x3 with bias" + at] = partial(check_shape, 2, 3, bias=True, p=p)
    if general is not None:
        out["m x n (general)"] = general
    return out


for _norm, _form in cf.TARGET_CHANGE.items():
    register(f"target change D h = r, {_norm}", "1",
             cases(partial(check, _form), check_general_dimension if _norm == "fro" else None))
