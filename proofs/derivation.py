"""What a derivation is, how it fails, and the registry ``certify prove`` runs.

A derivation is a function that states an optimisation problem in SymPy, solves it,
proves the candidate optimal and asserts equality with a closed form. It returns nothing
and raises ``DerivationError`` at the first step that does not hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import sympy as sp


class DerivationError(AssertionError):
    """A step of a derivation does not hold."""


@dataclass(frozen=True)
class Derivation:
    """One result, checked on one shape (``"2x3"``, ``"general"``, ...)."""

    result: str
    section: str
    shape: str
    check: Callable[[], None]


@dataclass(frozen=True)
class Outcome:
    derivation: Derivation
    verified: bool
    seconds: float
    error: str = ""


REGISTRY: list[Derivation] = []


def register(result: str, section: str, shapes: dict[str, Callable[[], None]]) -> None:
    """Add one derivation per shape to the registry."""
    for shape, check in shapes.items():
        REGISTRY.append(Derivation(result, section, shape, check))


def run(derivation: Derivation) -> Outcome:
    start = time.perf_counter()
    try:
        derivation.check()
    except DerivationError as err:
        return Outcome(derivation, False, time.perf_counter() - start, str(err))
    return Outcome(derivation, True, time.perf_counter() - start)


def is_zero(expr: sp.Expr) -> bool:
    """Decide ``expr == 0`` symbolically (cheap canonical forms first, then simplify)."""
    expr = sp.sympify(expr)
    if expr == 0 or sp.cancel(expr) == 0 or sp.cancel(sp.expand(expr)) == 0:
        return True
    # Every base raised to a symbolic power here is a positive norm, so denesting holds.
    expr = sp.powdenest(expr, force=True)
    if sp.cancel(sp.expand(expr)) == 0:
        return True
    # Roots of products of such norms: sqrt(A B) = sqrt(A) sqrt(B) once A B is factored.
    expr = sp.expand_power_base(
        expr.replace(
            lambda e: e.is_Pow and not e.exp.is_integer and e.base.is_Add,
            lambda e: sp.Pow(sp.factor(e.base), e.exp),
        ),
        force=True,
    )
    if sp.cancel(sp.expand(expr)) == 0:
        return True
    return sp.simplify(expr) == 0


def require_equal(lhs, rhs, what: str, reduce: Callable = lambda e: e) -> None:
    """Raise unless ``lhs == rhs`` (scalars or matrices), naming the step.

    ``reduce`` rewrites the difference with facts the symbols' assumptions cannot carry
    (such as ``s^2 = 1`` for a sign ``s``) before deciding it is zero.
    """
    is_matrix = isinstance(lhs, sp.MatrixBase)
    diff = sp.Matrix(lhs) - sp.Matrix(rhs) if is_matrix else sp.sympify(lhs - rhs)
    diff = diff.applyfunc(reduce) if is_matrix else reduce(diff)
    entries = list(diff) if is_matrix else [diff]
    if not all(is_zero(e) for e in entries):
        raise DerivationError(f"{what}: {sp.simplify(diff)} is not 0")


def require_nonnegative(expr: sp.Expr, what: str) -> None:
    """Raise unless SymPy proves ``expr >= 0`` from the symbols' assumptions."""
    expr = sp.factor(sp.simplify(expr))
    if expr.is_nonnegative is not True:
        raise DerivationError(f"{what}: cannot prove {expr} >= 0")
