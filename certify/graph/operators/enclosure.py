"""Forward linear enclosures: a node's value as affine functions of the layer's weight change.

Perturbing one layer by ``D`` (the variable ``v = vec D``, ``||v|| <= rho`` in the layer's
norm: l2 for ``fro``, l_inf for ``max``; for a dense layer on one vector the Z-space change
itself) makes every downstream value a function of ``v``. An enclosure brackets it between
two affine functions, in centre-radius form,

    x(v) in C(v) +- R(v),   C(v) = c + <Ac, v>,   R(v) = r + <Ar, v>,

for every ``v`` in the ball (``R >= 0`` there, as ``C - R <= x <= C + R``). The layer's own
output is exact: ``Z(v) = Z + D P~`` (``certify.bounds.regions``: ``coefficients``). The operators
carry enclosures forward (``Operator.enclose``): a linear map ``f`` gives
``f(C) +- |f|(R)`` (``x = C + t R`` with ``|t| <= 1``); an activation's lines
``s_l x + b_l <= phi(x) <= s_u x + b_u`` on the input box give
``s_l L + b_l <= phi <= s_u U + b_u`` with ``L, U = C -+ R`` when both slopes are
nonnegative. Over the ball (``bounds``), ``inf/sup <a, v> = -+ rho ||a||_*`` exactly
(``||.||_*``: l2 for ``fro``, l1 for ``max``), so an enclosure gives a box for the value in
one pass for every entry at once: ``p`` forward passes (``p`` the number of entries of ``D``)
where backward refinement needs one backward pass per entry (``certify.bounds.linear``).

Floating point: ``size`` bounds the magnitudes that entered each entry (``|f|`` of the
inputs' sizes plus constants); ``bounds`` widens by ``ROUND`` times it and the spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from certify.graph.operators.base import ROUND


def _folded(t: torch.Tensor) -> torch.Tensor:
    """Coefficients ``(B, p, *shape)`` as a batch ``(B p, *shape)``, for the maps."""
    return t.reshape(-1, *t.shape[2:])


@dataclass(frozen=True)
class Enclosure:
    """``C(v) +- R(v)`` (module docstring): ``c``, ``r``, ``size`` ``(B, *shape)``; ``Ac``,
    ``Ar`` ``(B, p, *shape)``, ``None`` where the function does not depend on ``v``."""

    c: torch.Tensor
    r: torch.Tensor
    Ac: torch.Tensor | None
    Ar: torch.Tensor | None
    size: torch.Tensor

    @staticmethod
    def point(value: torch.Tensor) -> "Enclosure":
        """A constant of the map (a node that does not depend on the layer)."""
        return Enclosure(value, torch.zeros_like(value), None, None, value.abs())

    @staticmethod
    def box(lo: torch.Tensor, hi: torch.Tensor) -> "Enclosure":
        """The constant functions of a box: what an operator without a forward rule gives."""
        return Enclosure((hi + lo) / 2, (hi - lo) / 2, None, None,
                         torch.maximum(lo.abs(), hi.abs()))

    @staticmethod
    def through(linear, absolute, inputs: list["Enclosure"],
                shift: torch.Tensor | None = None) -> "Enclosure":
        """``f(C) + shift +- |f|(R)`` for a map ``f = linear`` linear in its inputs, with
        ``absolute`` the map with the absolute values of its coefficients."""
        c = linear(*(e.c for e in inputs))
        r = absolute(*(e.r for e in inputs))
        size = absolute(*(e.size for e in inputs))
        if shift is not None:
            c, size = c + shift, size + shift.abs()
        B = c.shape[0]
        return Enclosure(c, r, _mapped(linear, [e.Ac for e in inputs], inputs, B),
                         _mapped(absolute, [e.Ar for e in inputs], inputs, B), size)

    def lines(self, s_lower, b_lower, s_upper, b_upper) -> "Enclosure":
        """``s_l L + b_l`` to ``s_u U + b_u`` (slopes ``>= 0``, entrywise): an activation's
        lower and upper lines applied to ``L, U = C -+ R``."""
        low = s_lower * (self.c - self.r) + b_lower
        high = s_upper * (self.c + self.r) + b_upper
        size = torch.maximum(s_lower, s_upper) * self.size + b_lower.abs() + b_upper.abs()
        if self.Ac is None:
            return Enclosure((high + low) / 2, (high - low) / 2, None, None, size)
        L, U = self._ends()
        A_low, A_high = L * s_lower[:, None], U * s_upper[:, None]
        return Enclosure((high + low) / 2, (high - low) / 2, (A_high + A_low) / 2,
                         (A_high - A_low) / 2, size)

    def scaled(self, lam, mu, nu) -> "Enclosure":
        """``lam C + mu +- (|lam| R + nu)``: a line ``phi(x) in lam x + mu +- nu`` valid on
        the input box, of either sign."""
        return Enclosure(lam * self.c + mu, lam.abs() * self.r + nu,
                         None if self.Ac is None else self.Ac * lam[:, None],
                         None if self.Ar is None else self.Ar * lam.abs()[:, None],
                         lam.abs() * self.size + mu.abs() + nu)

    def _ends(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The coefficients of ``L = C - R`` and ``U = C + R`` (``Ac`` is given)."""
        if self.Ar is None:
            return self.Ac, self.Ac
        return self.Ac - self.Ar, self.Ac + self.Ar

    def bounds(self, rho: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A box containing the value over ``||v|| <= rho`` (per input): ``c - r - rho
        ||Ac - Ar||_*`` to ``c + r + rho ||Ac + Ar||_*``."""
        rho = rho.reshape(-1, *[1] * (self.c.ndim - 1))
        if self.Ac is None:
            low = high = torch.zeros_like(self.c)
        else:
            order = 2 if norm == "fro" else 1
            L, U = self._ends()
            low = rho * torch.linalg.vector_norm(L, ord=order, dim=1)
            high = rho * torch.linalg.vector_norm(U, ord=order, dim=1)
        slack = ROUND * (self.size + self.r + low + high)
        return self.c - self.r - low - slack, self.c + self.r + high + slack


def _mapped(f, coefficients: list, inputs: list[Enclosure], B: int):
    """``f`` applied to the coefficients of every input, ``(B, p, *out)``; ``None`` when no
    input has any (zeros stand in for the inputs that do not depend on ``v``)."""
    given = [A for A in coefficients if A is not None]
    if not given:
        return None
    p = given[0].shape[1]
    parts = [_folded(A) if A is not None else
             e.c.new_zeros(B * p, *e.c.shape[1:]) for A, e in zip(coefficients, inputs)]
    out = f(*parts)
    return out.reshape(B, p, *out.shape[1:])
