"""THEORY.md section 2: minimise ||D|| subject to D H = R (H is n x N).

* Frobenius, full column rank: the Lagrangian ``1/2 ||D||_F^2 - <Lam, D H - R>`` is strictly
  convex; stationarity gives ``D = Lam H^T``, the constraint ``Lam = R (H^T H)^{-1}``, so
  ``D* = R (H^T H)^{-1} H^T = R H^+``. Solved from scratch with symbolic entries.
* Spectral: every feasible ``D`` satisfies ``D P = R H^+`` with ``P = H H^+`` the orthogonal
  projector onto range(H); ``||D||_2 >= ||D P||_2`` since ``||P||_2 <= 1``, and ``D* = R H^+``
  has ``D* P = D*``, so it also minimises the spectral norm.
* Feasibility: if ``D H = R`` then ``R H^+ H = D H H^+ H = D H = R`` (Penrose); conversely
  ``R H^+`` is feasible when ``R H^+ H = R``. Checked on a rank-deficient ``H``, where a ``R``
  outside the row space of ``H`` is shown infeasible.
* General dimension: with matrix symbols, ``R (H^T H)^{-1} H^T H = R``.
"""

from __future__ import annotations

from functools import partial

import sympy as sp

from proofs.derivation import DerivationError, register, require_equal


def _matrix(name: str, rows: int, cols: int) -> sp.Matrix:
    return sp.Matrix(rows, cols, lambda i, k: sp.Symbol(f"{name}{i}{k}", real=True))


def check_frobenius(m: int, n: int, N: int) -> None:
    R, H = _matrix("R", m, N), _matrix("H", n, N)
    D, Lam = _matrix("D", m, n), _matrix("L", m, N)
    objective = sum(x**2 for x in D) / 2
    if sp.hessian(objective, list(D)) != sp.eye(m * n):
        raise DerivationError("batch: the objective's Hessian is not the identity")
    lagrangian = objective - sum((D * H - R).multiply_elementwise(Lam))
    equations = [sp.diff(lagrangian, x) for x in D] + list(D * H - R)
    solution = sp.solve(equations, list(D) + list(Lam), dict=True)
    if len(solution) != 1:
        raise DerivationError(f"batch: KKT system has {len(solution)} solutions, not 1")
    pinv = (H.T * H).inv() * H.T  # H^+ for full column rank
    require_equal(D.subs(solution[0]), R * pinv, "batch: KKT point = R H^+")
    require_equal(R * pinv * H, R, "batch: R H^+ is feasible")


def check_spectral(m: int, n: int, N: int) -> None:
    R, H = _matrix("R", m, N), _matrix("H", n, N)
    pinv = (H.T * H).inv() * H.T
    P = H * pinv
    require_equal(P * P, P, "batch: P = H H^+ is idempotent")
    require_equal(P.T, P, "batch: P = H H^+ is symmetric (so ||P||_2 <= 1)")
    D = _matrix("D", m, n)
    # Any D with D H = R: D P = D H H^+ = R H^+.
    require_equal(D * H * pinv, D * P, "batch: D P = (D H) H^+")
    require_equal((R * pinv) * P, R * pinv, "batch: D* P = D*")


def check_feasibility() -> None:
    """Rank-one H (3 x 2): feasible iff R lies in its row space."""
    h = sp.Matrix(sp.symbols("h0:3", real=True))
    H = h.row_join(2 * h)
    pinv = H.pinv()
    r, s = sp.Matrix(sp.symbols("r0:2", real=True)), sp.Matrix(sp.symbols("s0:2", real=True))
    feasible = r.row_join(2 * r)
    require_equal(feasible * pinv * H, feasible, "batch: R = [r, 2r] satisfies R H^+ H = R")
    D = _matrix("D", 2, 3)
    require_equal(D * H * pinv * H, D * H, "batch: Penrose H H^+ H = H")
    generic = r.row_join(s)
    residual = (generic * pinv * H - generic).applyfunc(sp.simplify)
    # The residual vanishes exactly when s = 2 r, i.e. R is in the row space.
    solutions = sp.solve(list(residual), list(s), dict=True)
    if solutions != [{s[0]: 2 * r[0], s[1]: 2 * r[1]}]:
        raise DerivationError(f"batch: R H^+ H = R should force s = 2 r, got {solutions}")


def _general():
    m, n, N = sp.symbols("m n N", integer=True, positive=True)
    R, H = sp.MatrixSymbol("R", m, N), sp.MatrixSymbol("H", n, N)
    return R, H, sp.Inverse(H.T * H) * H.T


def _require_same(lhs, rhs, what: str) -> None:
    if (lhs - rhs).doit() != sp.ZeroMatrix(*lhs.shape):
        raise DerivationError(f"{what}: {lhs.doit()} != {rhs.doit()}")


def check_general() -> None:
    R, H, pinv = _general()
    _require_same(R * pinv * H, R, "batch, general: R H^+ H = R for D* = R H^+")


def check_spectral_general() -> None:
    R, H, pinv = _general()
    P = H * pinv
    _require_same(H * pinv * H * pinv, P, "batch, general: P = H H^+ is idempotent")
    _require_same(P.T, P, "batch, general: P is symmetric")
    _require_same(R * pinv * P, R * pinv, "batch, general: D* P = D*")


register("batch D H = R, Frobenius (KKT)", "2",
         {"2x3, N=2": partial(check_frobenius, 2, 3, 2),
          "3x4, N=2": partial(check_frobenius, 3, 4, 2),
          "m x n, N (general)": check_general})
register("batch D H = R, spectral", "2",
         {"2x3, N=2": partial(check_spectral, 2, 3, 2),
          "m x n, N (general)": check_spectral_general})
register("batch D H = R, feasibility R H^+ H = R", "2", {"2x3, rank-deficient H": check_feasibility})
