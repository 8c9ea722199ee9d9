"""Numeric cross-check of the generated kernels against cvxpy, for ``certify prove``.

The derivations prove the closed forms; this checks that what runs (``certify.closed_forms.kernels``
through the public API) agrees with an independent convex solver on random instances.
Agreement is required to relative ``1e-6``: Clarabel's default interior-point tolerances
are ``1e-8``, and a wrong constant or norm is off by far more.
"""

from __future__ import annotations

from functools import partial

import cvxpy as cp
import numpy as np

import certify
from proofs.derivation import DerivationError, register

RTOL = 1e-6
OBJECTIVES = {
    "fro": lambda D: cp.norm(D, "fro"),
    "spectral": lambda D: cp.sigma_max(D),
    "max": lambda D: cp.max(cp.abs(D)),
    "sum": lambda D: cp.sum(cp.abs(D)),
    3.0: lambda D: cp.pnorm(cp.vec(D, order="F"), 3),
}


def _agree(ours: float, theirs: float, what: str) -> None:
    if abs(ours - theirs) > RTOL * max(abs(theirs), 1e-12):
        raise DerivationError(f"{what}: ours {ours!r} vs cvxpy {theirs!r}")


def check(problem: str, norm, instances: int = 5, m: int = 3, n: int = 4) -> None:
    rng = np.random.default_rng(0)
    for _ in range(instances):
        h, c = rng.normal(size=n), rng.normal(size=m)
        D = cp.Variable((m, n))
        if problem == "target change":
            r = rng.normal(size=m)
            ours = certify.target_change(r, h, norm)
            constraint = D @ h == r
        else:
            margin = float(rng.uniform(0.1, 2.0))
            ours = certify.margin_functional(c, h, margin, norm)
            constraint = cp.sum(cp.multiply(D, np.outer(c, h))) == -margin
        value = cp.Problem(cp.Minimize(OBJECTIVES[norm](D)), [constraint]).solve()
        _agree(float(ours.value), value, f"{problem}, {norm}")


for _problem in ("target change", "margin functional"):
    for _norm in OBJECTIVES:
        _name = _norm if isinstance(_norm, str) else "lp"
        _section = "1" if _problem == "target change" else "3"
        _shape = f"3x4, 5 random{', p=3' if _norm == 3.0 else ''}"
        register(f"cvxpy agrees: {_problem}, {_name}", _section,
                 {_shape: partial(check, _problem, _norm)})
