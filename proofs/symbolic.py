"""Fully symbolic instances and the norms of them that the derivations need.

A vector entry is ``v_k = s_k a_k``: a sign symbol ``s_k`` with ``s_k^2 = 1`` and a
positive magnitude ``a_k`` (or an exact zero), so one symbolic check covers every sign
pattern. Where a derivation needs ``||v||_inf`` the vector designates a *peak*: its other
magnitudes are written ``a_k = a_peak / (1 + e_k)`` with ``e_k >= 0``, so that
``||v||_inf = a_peak`` is provable (any vector is such a one after permuting entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.simplify.simplify import factor_sum

from proofs import closed_forms as cf
from proofs.derivation import DerivationError, require_equal, require_nonnegative


@dataclass(frozen=True)
class SignedVector:
    signs: tuple
    magnitudes: tuple
    peak: int | None

    @classmethod
    def make(
        cls,
        name: str,
        n: int,
        zeros: tuple[int, ...] = (),
        peak: int | None = None,
        bias: bool = False,
    ) -> "SignedVector":
        """Symbolic ``n``-vector; with ``bias`` a last entry ``1`` is appended (``[h; 1]``).

        ``peak = n`` with ``bias`` makes the appended ``1`` the entry of largest magnitude.
        """
        if peak in zeros:
            raise ValueError("the peak entry cannot be zero")
        if peak == n and bias:
            top = sp.S.One
        elif bias and peak is not None:  # the peak must dominate the appended 1
            top = 1 + sp.Symbol(f"{name}_e{peak}", nonnegative=True)
        else:
            top = sp.Symbol(f"{name}_a{peak}", positive=True)
        signs, mags = [], []
        for k in range(n + bias):
            if k == n:
                signs.append(sp.S.One)
                mags.append(sp.S.One)
                continue
            if k in zeros:
                signs.append(sp.S.Zero)
                mags.append(sp.S.Zero)
                continue
            signs.append(sp.Symbol(f"{name}_s{k}", real=True))
            if peak is None:
                mags.append(sp.Symbol(f"{name}_a{k}", positive=True))
            else:
                e = sp.Symbol(f"{name}_e{k}", nonnegative=True)
                mags.append(top if k == peak else top / (1 + e))
        return cls(tuple(signs), tuple(mags), peak)

    def __len__(self) -> int:
        return len(self.signs)

    @property
    def entries(self) -> list[sp.Expr]:
        return [s * a for s, a in zip(self.signs, self.magnitudes)]

    @property
    def column(self) -> sp.Matrix:
        return sp.Matrix(self.entries)

    def norms(self, p: sp.Expr = cf.p) -> dict[str, sp.Expr]:
        q = p / (p - 1)
        a = self.magnitudes
        norms = {
            "l2": sp.sqrt(sum(x**2 for x in a)),
            "l1": sum(a),
            "lp": sum(x**p for x in a if x != 0) ** (1 / p),
            "lq": sum(x**q for x in a if x != 0) ** (1 / q),
        }
        if self.peak is not None:
            norms["linf"] = a[self.peak]
        return norms

    def apply(self, expr: sp.Expr, entry: sp.Symbol, k: int, p: sp.Expr = cf.p) -> sp.Expr:
        """Evaluate a closed-form factor (in ``entry`` and its norm symbols) at entry ``k``."""
        names = cf.NORM_SYMBOLS[entry]
        values = {names[kind]: value for kind, value in self.norms(p).items()}
        if self.peak is not None:
            values[names["peak"]] = sp.S.One if k == self.peak else sp.S.Zero
        values[entry] = self.entries[k]
        return self.signs_resolved(expr.subs(values))

    def signs_resolved(self, expr: sp.Expr) -> sp.Expr:
        """Use ``sign(s_k) = s_k``, ``|s_k| = 1`` and ``s_k^2 = 1``."""
        symbols = [s for s in self.signs if s.is_Symbol]
        rules = {sp.sign(s): s for s in symbols} | {sp.Abs(s): sp.S.One for s in symbols}
        expr = sp.sympify(expr).replace(
            lambda e: isinstance(e, (sp.Abs, sp.sign)) and e.args[0].is_Mul,
            lambda e: sp.Mul(*[e.func(f) for f in e.args[0].args]),
        )
        expr = sp.expand(expr.xreplace(rules))
        # In expanded form every sign enters as a power: s^k = s^(k mod 2), one pass.
        signs = set(symbols)
        return expr.replace(lambda e: e.is_Pow and e.base in signs and e.exp.is_Integer,
                            lambda e: e.base ** (int(e.exp) % 2))


def resolve(expr: sp.Expr, *vectors: SignedVector) -> sp.Expr:
    for vec in vectors:
        expr = vec.signs_resolved(expr)
    return expr


def abs_entry(expr: sp.Expr, *vectors: SignedVector) -> sp.Expr:
    """``|expr|`` for a product of signs, magnitudes and positive factors."""
    return resolve(sp.Abs(expr), *vectors)


def proven_max(values: list[sp.Expr], what: str) -> sp.Expr:
    """The maximum of ``values``: the first one provably ``>=`` all the others."""
    for candidate in values:
        try:
            for other in values:
                require_nonnegative(candidate - other, what)
        except DerivationError:
            continue
        return candidate
    raise DerivationError(f"{what}: no provable maximum among {values}")


def entrywise(D: sp.Matrix, norm: str, vectors, p=cf.p) -> sp.Expr:
    """Entrywise norm of a symbolic matrix: "fro", "max", "sum", "lp" or "lq"."""
    mags = [abs_entry(x, *vectors) for x in D]
    if norm == "fro":
        return sp.sqrt(sum(resolve(x**2, *vectors) for x in D))
    if norm == "max":
        return proven_max(mags, "entrywise max")
    if norm == "sum":
        return sum(mags)
    power = p if norm == "lp" else p / (p - 1)
    return sum(x**power for x in mags if x != 0) ** (1 / power)


def rank_one_singular_value(x: sp.Matrix, y: sp.Matrix, vectors) -> sp.Expr:
    """The only nonzero singular value of ``x y^T``: ``||x||_2 ||y||_2``.

    Proof: ``G = (x y^T)^T (x y^T) = ||x||^2 y y^T`` is positive semidefinite, has ``y`` as
    an eigenvector with eigenvalue ``||x||^2 ||y||^2`` and trace equal to that eigenvalue,
    so its other eigenvalues are zero. Hence spectral norm = nuclear norm = ``||x|| ||y||``.
    """
    M = x * y.T
    G = (M.T * M).applyfunc(lambda e: resolve(e, *vectors))
    x2 = resolve(sum(e**2 for e in x), *vectors)
    y2 = resolve(sum(e**2 for e in y), *vectors)
    reduce = lambda e: resolve(e, *vectors)  # noqa: E731
    require_equal(G * y, x2 * y2 * y, "rank one: y is an eigenvector of G", reduce)
    require_equal(G.trace(), x2 * y2, "rank one: trace(G) is that eigenvalue", reduce)
    return sp.sqrt(x2) * sp.sqrt(y2)


def require_equal_nonneg(lhs: sp.Expr, rhs: sp.Expr, what: str, power: sp.Expr = 2) -> None:
    """Equality of two nonnegative quantities, decided on their ``power``-th powers."""
    require_equal(sp.powdenest(sp.expand_power_base(lhs**power, force=True), force=True),
                  sp.powdenest(sp.expand_power_base(rhs**power, force=True), force=True), what)


def separate_sums(expr: sp.Expr) -> sp.Expr:
    """Split ``Sum(f(i) g(k), (k, ..), (i, ..))`` into ``Sum(f(i)) Sum(g(k))``."""

    def split(s: sp.Sum) -> sp.Expr:
        factors = list(sp.Mul.make_args(sp.expand(s.function)))
        result = sp.S.One
        for var, lo, hi in s.limits:
            mine = [f for f in factors if f.has(var)]
            factors = [f for f in factors if not f.has(var)]
            result *= factor_sum(sp.Sum(sp.Mul(*mine), (var, lo, hi)))
        return sp.Mul(*factors) * result

    return expr.replace(lambda e: isinstance(e, sp.Sum) and e.function.is_Mul, split)
