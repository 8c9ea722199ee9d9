"""Hypothesis strategies shared by the oracle tests (THEORY.md sections 1 to 3).

Every instance draws its dimensions from 1..12 and a log-uniform scale from [1e-6, 1e6]
SEPARATELY for each operand, so the ratio of the scales (and hence the optimal value)
spans 1e-12..1e12. Entries are ``scale * sign * mantissa`` with mantissa in [1e-3, 1] (or
an exact 0 now and then): the largest magnitude lies in [1e-3, 1] * scale, and no entry is
subnormal or so small relative to the others that it is invisible to every norm.
Degenerate cases are drawn with fixed probabilities (the case index shrinks towards 0,
the generic case):

* a zero operand (``h = 0``, ``r = 0``, ``c = 0``, ``m = 0``, ``H = 0``);
* a single row (``m = 1``) or a single column (``n = 1``);
* ties among the largest magnitudes of ``h`` (and ``c``), which is where the argmax of the
  entrywise-sum minimiser has to pick one of several equally good columns;
* for the batch problem, rank-deficient ``H`` (rank ``k < min(n, N)``, condition number
  on its row space <= 100);
* ``extreme`` scales: operands up to 1e+-301, where squared norms overflow or underflow,
  with ``r / h`` (``c h^T``, logits / h) moderate so the answer is representable; for
  ``D H = R`` it is ``D* ~ X`` itself that is extreme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

MAX_DIM = 12
SCALE_LO, SCALE_HI = 1e-6, 1e6

dims = st.integers(1, MAX_DIM)

# Norms of THEORY.md section 1, as the API names them; a float is an entrywise l_p norm.
LP_VALUES = (1.5, 3.0, 4.0)
NAMED_NORMS = ("fro", "spectral", "max", "sum")


def log_uniform(lo: float = SCALE_LO, hi: float = SCALE_HI) -> st.SearchStrategy[float]:
    """A positive scale, log-uniform in [lo, hi]."""
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


def signed_scales(lo: float = SCALE_LO, hi: float = SCALE_HI) -> st.SearchStrategy[float]:
    """A log-uniform magnitude with a random sign."""
    return st.tuples(log_uniform(lo, hi), st.booleans()).map(lambda t: -t[0] if t[1] else t[0])


@st.composite
def _mantissa(draw, zeros: bool) -> float:
    if zeros and draw(st.integers(0, 7)) == 7:
        return 0.0
    magnitude = draw(st.floats(1e-3, 1.0))
    return -magnitude if draw(st.booleans()) else magnitude


@st.composite
def vectors(draw, n: int, scale: float, *, zeros: bool = True, ties: bool = False,
            nonzero: bool = True) -> np.ndarray:
    """A float64 vector of length ``n`` with entries ``scale * sign * [1e-3, 1]`` or 0.

    ``zeros``: some entries may be exactly 0. ``ties``: at least two entries (when
    ``n >= 2``) share the largest magnitude ``scale``. ``nonzero``: the vector is never
    all zero (an entry is set to ``scale`` if every entry came out 0).
    """
    u = [draw(_mantissa(zeros)) for _ in range(n)]
    if ties and n >= 2:
        k = draw(st.integers(2, n))
        for i in draw(st.permutations(range(n)))[:k]:
            u[i] = -1.0 if draw(st.booleans()) else 1.0
    if nonzero and not any(u):
        u[draw(st.integers(0, n - 1))] = 1.0
    return scale * np.asarray(u, dtype=np.float64)


def norms() -> st.SearchStrategy[str | float]:
    """A norm name or an entrywise l_p exponent."""
    return st.sampled_from(NAMED_NORMS + LP_VALUES)


def _case(draw, weighted: list[tuple[str, int]]) -> str:
    """Pick a case name; weights are integers, the first case is the shrink target."""
    total = sum(w for _, w in weighted)
    i = draw(st.integers(0, total - 1))
    for name, w in weighted:
        if i < w:
            return name
        i -= w
    raise AssertionError("unreachable")


# --------------------------------------------------------------------- section 1: D h = r


@dataclass(frozen=True)
class TargetInstance:
    r: np.ndarray
    h: np.ndarray
    case: str


TARGET_CASES = [("generic", 10), ("h_zero", 2), ("r_zero", 2), ("single_row", 2),
                ("single_col", 2), ("ties", 2), ("extreme", 2)]

# "extreme": operands far outside [1e-6, 1e6], where squared norms over- or underflow
# float64 although the answer is representable: a decimal exponent of magnitude 160..295
# (so ||x||_2^2 is beyond 1e+-308 even when the largest entry is 1e-3 * scale). The two
# operands share the exponent up to +-6 decades, so D* stays moderate and every entry of
# every operand (>= 1e-3 * 1e-301) is a normal float.
EXTREME_EXPONENT = 295.0


def extreme_exponents() -> st.SearchStrategy[float]:
    """A decimal exponent with magnitude in [160, 295] and a random sign."""
    return st.tuples(st.floats(160.0, EXTREME_EXPONENT), st.booleans()).map(
        lambda t: -t[0] if t[1] else t[0]
    )


@st.composite
def target_instances(draw, case: str | None = None) -> TargetInstance:
    """``(r, h)`` for ``minimise ||D|| s.t. D h = r``; ``case`` forces one case."""
    case = case or _case(draw, TARGET_CASES)
    m = 1 if case == "single_row" else draw(dims)
    n = 1 if case == "single_col" else draw(dims)
    if case == "extreme":
        e = draw(extreme_exponents())
        h_scale, r_scale = 10.0**e, 10.0 ** (e + draw(st.floats(-6.0, 6.0)))
    else:
        r_scale, h_scale = draw(log_uniform()), draw(log_uniform())
    r = np.zeros(m) if case == "r_zero" else draw(vectors(m, r_scale))
    h = np.zeros(n) if case == "h_zero" else draw(vectors(n, h_scale, ties=case == "ties"))
    return TargetInstance(r, h, case)


# ------------------------------------------------------------ section 3: <D, c h^T> = -m


@dataclass(frozen=True)
class MarginInstance:
    c: np.ndarray
    h: np.ndarray
    m: float
    case: str


MARGIN_CASES = [("generic", 10), ("c_zero", 2), ("h_zero", 2), ("m_zero", 2),
                ("single_row", 1), ("single_col", 1), ("ties", 2), ("extreme", 2)]


@st.composite
def margin_instances(draw, case: str | None = None) -> MarginInstance:
    """``(c, h, m)`` for ``minimise ||D|| s.t. <D, c h^T> = -m``."""
    case = case or _case(draw, MARGIN_CASES)
    k = 1 if case == "single_row" else draw(dims)
    n = 1 if case == "single_col" else draw(dims)
    ties = case == "ties"
    if case == "extreme":
        # ||c|| and ||h|| up to 1e+-301 (their squares over/underflow), c h^T moderate.
        e = draw(extreme_exponents())
        c_scale = 10.0**e
        h_scale = 10.0 ** (-e + draw(st.floats(-6.0, 6.0)))
    else:
        c_scale, h_scale = draw(log_uniform()), draw(log_uniform())
    c = np.zeros(k) if case == "c_zero" else draw(vectors(k, c_scale, ties=ties))
    h = np.zeros(n) if case == "h_zero" else draw(vectors(n, h_scale, ties=ties))
    m = 0.0 if case == "m_zero" else draw(signed_scales())
    return MarginInstance(c, h, m, case)


# --------------------------------------------------- section 3: last layer, class pairs


@dataclass(frozen=True)
class ClassPairInstance:
    logits: np.ndarray
    h: np.ndarray
    seed: int
    case: str


CLASS_PAIR_CASES = [("generic", 10), ("top_tie", 2), ("h_zero", 2), ("single_col", 2),
                    ("ties", 2), ("extreme", 2)]


@st.composite
def class_pair_instances(draw, case: str | None = None, max_classes: int = 6
                         ) -> ClassPairInstance:
    """Logits and the last layer's input ``h``.

    Logits are ``scale * k / 1000`` for integers ``k`` in [-1000, 1000]: two logits either
    tie exactly or differ by at least ``1e-3 * scale``, so a forward pass in float64
    resolves a ``1e-6`` relative change of the margin. ``top_tie`` makes the top logit
    shared (margin 0). ``extreme``: ``h`` up to 1e+-301 and the logits within 6 decades of
    it (so the radius is moderate). ``seed`` seeds the random weight matrix of the
    forward-pass check.
    """
    case = case or _case(draw, CLASS_PAIR_CASES)
    n_classes = draw(st.integers(2, max_classes))
    ints = draw(st.lists(st.integers(-1000, 1000), min_size=n_classes, max_size=n_classes))
    if case == "top_tie":
        top = int(np.argmax(ints))
        other = draw(st.integers(0, n_classes - 2))
        ints[other if other < top else other + 1] = ints[top]
    if case == "extreme":
        e = draw(extreme_exponents())
        h_scale, logit_scale = 10.0**e, 10.0 ** (e + draw(st.floats(-6.0, 6.0)))
    else:
        h_scale, logit_scale = draw(log_uniform()), draw(log_uniform())
    logits = logit_scale * np.asarray(ints, dtype=np.float64) / 1000.0
    n = 1 if case == "single_col" else draw(dims)
    h = np.zeros(n) if case == "h_zero" else draw(vectors(n, h_scale, ties=case == "ties"))
    return ClassPairInstance(logits, h, draw(st.integers(0, 2**32 - 1)), case)


# -------------------------------------------------------------- section 2: D H = R


@dataclass(frozen=True)
class BatchInstance:
    R: np.ndarray
    H: np.ndarray
    rank: int
    case: str


def _low_rank(rng: np.random.Generator, n: int, N: int, k: int, scale: float) -> np.ndarray:
    """A random ``n x N`` matrix of rank ``k``: ``U diag(s) V^T`` with orthonormal ``U``, ``V``
    and nonzero singular values ``s`` log-uniform in ``[1e-2, 1] * scale``.

    The condition number of ``H`` on its row space is capped at 100 on purpose: the
    oracle's value is only as good as its constraint residual (~1e-8) times that condition
    number (a Gaussian ``A B`` reached 2e5, and cvxpy's optimum then sat 1.2e-5 below the
    exact ``||R H^{-1}||_2``), see ``test_oracle_batch.oracle_slack``.
    """
    if k == 0:
        return np.zeros((n, N))
    U = np.linalg.qr(rng.standard_normal((n, k)))[0]
    V = np.linalg.qr(rng.standard_normal((N, k)))[0]
    s = 10.0 ** rng.uniform(-2.0, 0.0, k)
    return scale * (U * s) @ V.T


BATCH_FEASIBLE_CASES = [("full_rank", 6), ("rank_deficient", 6), ("R_zero", 1), ("H_zero", 1),
                        ("extreme", 2)]


@st.composite
def feasible_batch_instances(draw) -> BatchInstance:
    """``R = X H`` (so ``D H = R`` is feasible) with ``H`` full rank or of rank
    ``k < min(n, N)``; ``R = 0`` and ``H = R = 0`` as degenerate cases; ``extreme``: full
    rank ``H`` within 6 decades of 1 and ``X`` (hence ``R`` and ``D*``) near 1e+-160..295,
    where ``||D*||_F^2`` over- or underflows."""
    case = _case(draw, BATCH_FEASIBLE_CASES)
    m, n, N = draw(dims), draw(dims), draw(dims)
    if case == "rank_deficient" and min(n, N) == 1:
        n, N = draw(st.integers(2, MAX_DIM)), draw(st.integers(2, MAX_DIM))
    if case == "rank_deficient":
        k = draw(st.integers(1, min(n, N) - 1))
    else:
        k = 0 if case == "H_zero" else min(n, N)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if case == "extreme":
        x_scale = 10.0 ** draw(extreme_exponents())
        h_scale = 10.0 ** draw(st.floats(-6.0, 6.0))
    else:
        h_scale, x_scale = draw(log_uniform()), draw(log_uniform())
    H = _low_rank(rng, n, N, k, h_scale)
    X = x_scale * rng.standard_normal((m, n))
    if case in ("R_zero", "H_zero"):
        X = np.zeros((m, n))
    return BatchInstance(X @ H, H, k, case)


BATCH_INFEASIBLE_CASES = [("wide", 4), ("rank_deficient", 4), ("H_zero", 1)]


@st.composite
def infeasible_batch_instances(draw) -> BatchInstance:
    """Generic ``R`` with ``rank(H) < N``: ``N > n`` (``wide``), ``H`` of rank
    ``k < N`` (``rank_deficient``), or ``H = 0``. Such ``R`` lies outside the row space of
    ``H`` with probability one; the tests also check it numerically."""
    case = _case(draw, BATCH_INFEASIBLE_CASES)
    m = draw(dims)
    if case == "wide":
        n = draw(st.integers(1, MAX_DIM - 1))
        N = draw(st.integers(n + 1, MAX_DIM))
        k = n
    else:
        n, N = draw(dims), draw(st.integers(2, MAX_DIM))
        k = 0 if case == "H_zero" else draw(st.integers(1, min(n, N - 1)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    H = _low_rank(rng, n, N, k, draw(log_uniform()))
    R = draw(log_uniform()) * rng.standard_normal((m, N))
    return BatchInstance(R, H, k, case)
