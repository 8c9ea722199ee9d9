"""THEORY.md section 6: error norms of compression operators.

* Low rank (Eckart-Young-Mirsky). ``W = U S V^T`` with symbolic orthogonal ``U``, ``V``
  (Cayley transforms of symbolic skew matrices, orthogonal for every parameter value) and
  ordered singular values ``s_1 >= s_2 >= ...``. The truncation error ``W - W_r`` has
  ``||W - W_r||_F^2 = sum_{i>r} s_i^2``; ``(W - W_r)^T (W - W_r)`` has eigenvectors ``v_i``
  with eigenvalues ``s_i^2`` (``i > r``) and ``0`` otherwise, so ``||W - W_r||_2 = s_{r+1}``;
  and ``||(W - W_r) h||^2 = sum_{i>r} s_i^2 (v_i^T h)^2``. (That no other rank-r matrix has
  a smaller error is Mirsky's theorem; the thresholds only use the identities above.)
* Quantisation. Round to nearest with step ``s``: ``w = s (k + f)`` with integer ``k`` and
  ``|f| <= 1/2`` gives error ``s f``, at most ``s/2``. With ``s = max|W| / (2^(b-1) - 1)``
  every ``w / s`` lies in the signed b-bit range. The error bound ``s(b)/2`` decreases in
  ``b`` and crosses a radius ``rho`` at ``b0 = 1 + log2(1 + max|W| / (2 rho))``, so the
  threshold is ``b* = floor(b0) + 1``.
* Magnitude pruning. ``W = K + P`` with disjoint supports, the pruned ``P`` holding the
  smallest magnitudes: the error is ``P``, with ``||P||_max`` its largest magnitude and
  ``||P||_F^2`` the sum of its squares.
"""

from __future__ import annotations

from functools import partial

import sympy as sp

from proofs.derivation import DerivationError, register, require_equal, require_nonnegative
from proofs.symbolic import proven_max


def cayley(name: str, n: int) -> sp.Matrix:
    """``Q = (I - A)(I + A)^{-1}`` for a symbolic skew-symmetric ``A``: orthogonal.

    Up to 3 x 3 ``A`` is fully symbolic; beyond, tridiagonal (``n - 1`` parameters), which
    keeps every entry of ``Q`` symbolic and the algebra tractable.
    """
    A = sp.zeros(n, n)
    for i in range(n):
        for k in range(i + 1, n if n <= 3 else min(i + 2, n)):
            A[i, k] = sp.Symbol(f"{name}{i}{k}", real=True)
            A[k, i] = -A[i, k]
    Q = ((sp.eye(n) - A) * (sp.eye(n) + A).inv()).applyfunc(sp.cancel)
    require_equal(Q.T * Q, sp.eye(n), f"{name}: Cayley transform is orthogonal")
    return Q


def singular_values(count: int) -> list[sp.Expr]:
    """``s_1 >= s_2 >= ... > 0``: ``s_{i+1} = s_i / (1 + e_i)`` with ``e_i >= 0``."""
    values = [sp.Symbol("s1", positive=True)]
    for i in range(1, count):
        values.append(values[-1] / (1 + sp.Symbol(f"e{i}", nonnegative=True)))
    return values


def check_low_rank(m: int, n: int, rank: int) -> None:
    U, V = cayley("a", m), cayley("b", n)
    sigma = singular_values(min(m, n))
    S = sp.zeros(m, n)
    for i, s in enumerate(sigma):
        S[i, i] = s
    kept = S.copy()
    for i in range(rank, len(sigma)):
        kept[i, i] = 0
    E = U * (S - kept) * V.T  # W - W_r
    tail = sigma[rank:]
    require_equal(sum(x**2 for x in E), sum(s**2 for s in tail), "||W - W_r||_F^2 = sum_{i>r} s_i^2")
    G = (E.T * E).applyfunc(sp.cancel)
    eigenvalues = []
    for i in range(n):
        lam = sigma[i] ** 2 if rank <= i < len(sigma) else sp.S.Zero
        require_equal(G * V[:, i], lam * V[:, i], f"v_{i + 1} is an eigenvector of E^T E")
        eigenvalues.append(lam)
    top = proven_max(eigenvalues, "largest eigenvalue of E^T E")
    require_equal(top, sigma[rank] ** 2, "||W - W_r||_2 = s_{r+1}")
    h = sp.Matrix(sp.symbols(f"h0:{n}", real=True))
    Eh = E * h
    projected = sum(sigma[i] ** 2 * ((V[:, i].T * h)[0]) ** 2 for i in range(rank, len(sigma)))
    require_equal(sum(x**2 for x in Eh), projected, "||(W - W_r) h||^2 = sum s_i^2 (v_i^T h)^2")


def check_quantisation() -> None:
    s, w_max, rho = sp.symbols("s M rho", positive=True)
    k = sp.Symbol("k", integer=True)
    # Rounding to nearest: w / s = k + f with k = round(w / s) and f = (1 - 2 u) / 2, u in [0, 1].
    u = 1 / (1 + sp.Symbol("e", nonnegative=True))  # u in (0, 1]; u = 0 is the limit e -> oo
    f = (1 - 2 * u) / 2
    w = s * (k + f)
    error = w - s * k
    require_equal(error, s * f, "quantisation error is s f")
    require_nonnegative(s / 2 - error, "error <= s/2")
    require_nonnegative(s / 2 + error, "error >= -s/2")
    b = sp.Symbol("b", positive=True)
    step = w_max / (2 ** (b - 1) - 1)
    require_equal(w_max / step, 2 ** (b - 1) - 1, "max|W| / s is the largest b-bit level")
    derivative = sp.diff(step / 2, b)
    if not sp.simplify(derivative * (2 ** (b - 1) - 1) ** 2 / w_max).is_negative:
        raise DerivationError("the error bound s(b)/2 must decrease in b")
    crossing = sp.solve(sp.Eq(step / 2, rho), b)
    expected = 1 + sp.log(1 + w_max / (2 * rho), 2)
    if len(crossing) != 1 or not sp.simplify(sp.expand_log(crossing[0] - expected, force=True)) == 0:
        raise DerivationError(f"threshold crossing {crossing} != {expected}")


def check_pruning(n: int) -> None:
    magnitudes = singular_values(n)  # any decreasing positive sequence
    signs = sp.symbols(f"t0:{n}", real=True)
    w = [s * a for s, a in zip(signs, magnitudes)]
    for pruned in range(1, n):
        error = [0] * (n - pruned) + w[n - pruned:]  # W - prune(W): the smallest entries
        mags = [sp.Abs(x).subs({sp.Abs(t): 1 for t in signs}) for x in error]
        largest = proven_max([sp.S.Zero if x == 0 else x for x in mags], "largest pruned magnitude")
        require_equal(largest, magnitudes[n - pruned], "||W - prune(W)||_max = largest pruned")
        fro2 = sum(x**2 for x in error)
        require_equal(fro2.subs({t**2: 1 for t in signs}), sum(a**2 for a in magnitudes[n - pruned:]),
                      "||W - prune(W)||_F^2 = sum of pruned squares")


register("low rank: Eckart-Young-Mirsky error norms", "6",
         {"2x3, r=1": partial(check_low_rank, 2, 3, 1),
          "3x4, r=1": partial(check_low_rank, 3, 4, 1),
          "3x4, r=2": partial(check_low_rank, 3, 4, 2)})
register("quantisation: error <= s/2, threshold bits", "6", {"scalar, symbolic b": check_quantisation})
register("magnitude pruning: error norms", "6", {"6 entries, every ratio": partial(check_pruning, 6)})
