"""THEORY.md section 3: minimise ||D|| subject to <D, c h^T> = -m.

For every norm, on fully symbolic ``c``, ``h`` and ``m``:

1. the closed-form minimiser is feasible, ``<D*, c h^T> = -m``;
2. it attains the closed-form value, ``||D*|| = value``;
3. nothing feasible does better: for every feasible ``D``,
   ``|m| = |<D, G>| <= ||G||_dual ||D||`` (Hoelder), so ``||D|| >= |m| / ||G||_dual``,
   and ``value = |m| / ||G||_dual`` with the dual norm computed from the entries of
   ``G = c h^T``.

The last layer (``o = W h + b``, ``c = e_y - e_j``) is exact: the change of the margin
``m_j = o_y - o_j`` under ``W -> W + D`` is exactly ``<D, c h^T>``, and substituting ``c``
gives the ``sqrt(2)`` (Frobenius, spectral) and ``2`` (entrywise max) factors.
"""

from __future__ import annotations

from functools import partial

import sympy as sp

from proofs import closed_forms as cf
from proofs.derivation import register, require_equal
from proofs.symbolic import SignedVector, require_equal_nonneg, resolve
from proofs.target_change import POWER, at_p, cases, matrix_norm

DUAL_ENTRYWISE = {"fro": "fro", "max": "sum", "sum": "max", "lp": "lq"}


def check(form: cf.RankOneForm, m: int, n: int, zeros: bool = False, bias: bool = False,
          p: sp.Rational = cf.p, c: SignedVector | None = None) -> None:
    form = at_p(form, p)
    norm = form.norm
    peak = 0 if norm == "sum" else None  # ||c||_inf and ||h||_inf enter only there
    if c is None:
        c = SignedVector.make("c", m, zeros=(m - 1,) if zeros and m > 1 else (), peak=peak)
    h = SignedVector.make("h", n, zeros=(n - 1,) if zeros else (), peak=peak, bias=bias)
    vectors = (c, h)
    reduce = lambda e: resolve(e, *vectors)  # noqa: E731
    row = sp.Matrix([c.apply(form.row, cf.u, i, p) for i in range(len(c))])
    col = sp.Matrix([h.apply(form.col, cf.v, k, p) for k in range(len(h))])
    D = row * col.T
    G = c.column * h.column.T
    value = reduce(c.apply(h.apply(form.value, cf.v, 0, p), cf.u, 0, p))

    require_equal(sum(D.multiply_elementwise(G)), -cf.m, f"{norm}: <D*, c h^T> = -m", reduce)
    power = POWER[norm].subs(cf.p, p)
    require_equal_nonneg(matrix_norm(D, norm, row, col, vectors, p), value,
                         f"{norm}: ||D*|| = value", power)
    dual = "nuclear" if norm == "spectral" else DUAL_ENTRYWISE[norm]
    dual_norm = matrix_norm(G, dual, c.column, h.column, vectors, p)
    require_equal_nonneg(value, sp.Abs(cf.m) / dual_norm, f"{norm}: value = |m| / ||G||_{dual}",
                         power)


def check_class_pair(norm: str, n: int, p: sp.Rational = cf.p) -> None:
    """Last layer with 3 classes, y = 0, j = 1: exactness and the class-pair factor."""
    h = SignedVector.make("h", n, peak=0 if norm == "sum" else None)
    c = SignedVector((sp.S.One, -sp.S.One, sp.S.Zero), (sp.S.One, sp.S.One, sp.S.Zero), 0)
    W = sp.Matrix(3, n, lambda i, k: sp.Symbol(f"W{i}{k}", real=True))
    D = sp.Matrix(3, n, lambda i, k: sp.Symbol(f"D{i}{k}", real=True))
    b = sp.Matrix(sp.symbols("b0:3", real=True))
    margin = lambda weight: ((weight * h.column + b)[0] - (weight * h.column + b)[1])  # noqa: E731
    require_equal(margin(W + D) - margin(W), sum(D.multiply_elementwise(c.column * h.column.T)),
                  "last layer: the margin moves by exactly <D, c h^T>")
    general = at_p(cf.MARGIN_FUNCTIONAL[norm], p).value
    pair = cf.CLASS_PAIR[norm].subs(cf.p, p)
    # The margin is positive at a correct prediction, so |m| = m.
    general = c.apply(h.apply(general, cf.v, 0, p), cf.u, 0, p).subs(sp.Abs(cf.m), cf.m)
    require_equal(resolve(general, h), resolve(h.apply(pair, cf.v, 0, p), h),
                  f"{norm}: m / (||e_y - e_j||_dual ||h||_dual) is the class-pair form")
    check(cf.MARGIN_FUNCTIONAL[norm], 3, n, p=p, c=c)


for _norm, _form in cf.MARGIN_FUNCTIONAL.items():
    register(f"margin functional <D, c h^T> = -m, {_norm}", "3", cases(partial(check, _form)))
    _pvals = (sp.Integer(3), sp.Rational(3, 2)) if _norm == "lp" else (cf.p,)
    register(
        f"last layer, class pair, {_norm}",
        "3",
        {f"3 classes x 3{'' if p == cf.p else f', p={p}'}": partial(check_class_pair, _norm, 3, p)
         for p in _pvals},
    )
