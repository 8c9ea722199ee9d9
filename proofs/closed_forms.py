"""The closed forms of THEORY.md sections 1 to 3, as SymPy templates.

Every minimiser in sections 1 and 3 is rank one, ``D*_{ik} = row(u_i) * col(v_k)``,
so a closed form is three scalar expressions:

* ``value``: the minimal norm, in terms of norms of the two vectors;
* ``row``:   the factor applied to each entry ``u`` of the row-side vector;
* ``col``:   the factor applied to each entry ``v`` of the column-side vector.

Section 1 (``D h = r``) has ``u = r``, ``v = h``; section 3 (``<D, c h^T> = -m``) has
``u = c``, ``v = h``. The derivations in this package prove each template optimal on
fully symbolic instances; ``proofs.codegen`` prints the very same expressions to torch.

Norm symbols stand for norms of the whole vector: ``v_l2 = ||v||_2``,
``v_l1 = ||v||_1``, ``v_linf = ||v||_inf``, ``v_lq = ||v||_q`` (``q = p / (p - 1)``), and
``v_peak`` is the indicator of the first entry of largest magnitude (``1`` there, ``0``
elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

u, v = sp.symbols("u v", real=True)
m = sp.Symbol("m", real=True)
p = sp.Symbol("p", positive=True)
q = p / (p - 1)

u_l2, u_l1, u_linf, u_lp, u_lq = sp.symbols("u_l2 u_l1 u_linf u_lp u_lq", positive=True)
v_l2, v_l1, v_linf, v_lp, v_lq = sp.symbols("v_l2 v_l1 v_linf v_lp v_lq", positive=True)
u_peak, v_peak = sp.symbols("u_peak v_peak", nonnegative=True)

NORM_SYMBOLS = {
    u: {"l2": u_l2, "l1": u_l1, "linf": u_linf, "lp": u_lp, "lq": u_lq, "peak": u_peak},
    v: {"l2": v_l2, "l1": v_l1, "linf": v_linf, "lp": v_lp, "lq": v_lq, "peak": v_peak},
}

# Norms of D (entrywise unless "spectral") and their duals, for the Hoelder argument.
NORMS = ("fro", "spectral", "max", "sum", "lp")
DUAL = {"fro": "fro", "spectral": "nuclear", "max": "sum", "sum": "max", "lp": "lq"}


@dataclass(frozen=True)
class RankOneForm:
    """A rank-one minimiser ``D*_{ik} = row(u_i) col(v_k)`` and its minimal norm."""

    name: str
    norm: str
    section: str
    value: sp.Expr
    row: sp.Expr
    col: sp.Expr


def _target(norm: str, value: sp.Expr, col: sp.Expr) -> RankOneForm:
    return RankOneForm(f"target_change_{norm}", norm, "1", value, u, col)


# Section 1: minimise ||D|| subject to D h = r   (u = r, v = h).
TARGET_CHANGE = {
    "fro": _target("fro", u_l2 / v_l2, v / v_l2**2),
    "spectral": _target("spectral", u_l2 / v_l2, v / v_l2**2),
    "max": _target("max", u_linf / v_l1, sp.sign(v) / v_l1),
    "sum": _target("sum", u_l1 / v_linf, v_peak * sp.sign(v) / v_linf),
    "lp": _target("lp", u_lp / v_lq, sp.sign(v) * sp.Abs(v) ** (q - 1) / v_lq**q),
}


def _functional(norm: str, value: sp.Expr, row: sp.Expr, col: sp.Expr) -> RankOneForm:
    return RankOneForm(f"margin_functional_{norm}", norm, "3", value, row, col)


# Section 3: minimise ||D|| subject to <D, c h^T> = -m   (u = c, v = h).
MARGIN_FUNCTIONAL = {
    "fro": _functional("fro", sp.Abs(m) / (u_l2 * v_l2), -m * u / u_l2**2, v / v_l2**2),
    "spectral": _functional(
        "spectral", sp.Abs(m) / (u_l2 * v_l2), -m * u / u_l2**2, v / v_l2**2
    ),
    "max": _functional(
        "max", sp.Abs(m) / (u_l1 * v_l1), -m * sp.sign(u) / u_l1, sp.sign(v) / v_l1
    ),
    "sum": _functional(
        "sum",
        sp.Abs(m) / (u_linf * v_linf),
        -m * u_peak * sp.sign(u) / u_linf,
        v_peak * sp.sign(v) / v_linf,
    ),
    "lp": _functional(
        "lp",
        sp.Abs(m) / (u_lq * v_lq),
        -m * sp.sign(u) * sp.Abs(u) ** (q - 1) / u_lq**q,
        sp.sign(v) * sp.Abs(v) ** (q - 1) / v_lq**q,
    ),
}

# Section 3, last layer: c = e_y - e_j has ||c||_2 = sqrt(2), ||c||_1 = 2, ||c||_inf = 1,
# ||c||_q = 2^(1/q); the radius against class j is m_j / (||c||_dual ||h||_dual).
CLASS_PAIR = {
    "fro": m / (sp.sqrt(2) * v_l2),
    "spectral": m / (sp.sqrt(2) * v_l2),
    "max": m / (2 * v_l1),
    "sum": m / v_linf,
    "lp": m / (2 ** (1 / q) * v_lq),
}

# Section 5: sup |GELU'(x)|, attained at x = sqrt(2) (GELU is not 1-Lipschitz).
GELU_LIPSCHITZ = (1 + sp.erf(1)) / 2 + sp.exp(-1) / sp.sqrt(sp.pi)

# Section 2: minimise ||D||_F (or ||D||_2) subject to D H = R; feasible iff R H^+ H = R.
R_mat = sp.MatrixSymbol("R", sp.Symbol("m_rows"), sp.Symbol("N"))
Hpinv = sp.MatrixSymbol("H_pinv", sp.Symbol("N"), sp.Symbol("n_cols"))
BATCH_MINIMISER = R_mat * Hpinv
