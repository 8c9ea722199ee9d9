"""Products of two computed tensors: ``x * y`` (entrywise, broadcasting) and ``x @ y``
(matrix product over the last two axes): attention's ``Q K^T`` and ``A V`` (THEORY.md
section 8).

The product is bilinear. With the input boxes written as centre and radius,
``x = x_c + dx``, ``y = y_c + dy`` (``|dx| <= x_r``, ``|dy| <= y_r``),

    x . y = x . y_c + x_c . y - x_c . y_c + dx . dy,     |dx . dy| <= x_r . y_r

entry by entry of the output (``.`` the product, ``|dx @ dy| <= x_r @ y_r`` for matrices).
That is the linear rule, for both directions at once: it is the mean of McCormick's two
lower planes ``y_l x + x_l y - x_l y_l`` and ``y_u x + x_u y - x_u y_u`` (and of the two
upper ones), and exact when one factor is a constant of the map (``x_r = 0`` or
``y_r = 0``): a query, key or value projection perturbed inside its own attention block.
The interval rule takes the four corner products of every term; the interval Jacobian
(``x`` moves the product by ``A y^T``, ``y`` by ``x^T A``) is interval matrix arithmetic.

No Lipschitz constant: a product of two moving factors grows without bound, and with one
factor moving the constant is that of the other factor's value, which varies per input
(``inf`` here: the global bound of section 5 does not reach through attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.graph.operators.base import ROUND, Operator, row_sum


def _unbroadcast(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``t`` ``(B, R, *s)`` over the axes broadcast from ``shape`` ``(B, *x)``."""
    lead = t.ndim - len(shape) - 1  # axes added in front by broadcasting
    t = t.sum(dim=tuple(range(2, 2 + lead))) if lead else t
    keep = [i + 2 for i, n in enumerate(shape[1:]) if n == 1 and t.shape[i + 2] != 1]
    return t.sum(dim=keep, keepdim=True) if keep else t


@dataclass(frozen=True)
class Product(Operator):
    """``x * y`` (``matmul=False``) or ``x @ y`` (``matmul=True``) of two computed tensors."""

    matmul: bool = False

    arity = 2
    nonlinear = True

    def __call__(self, x, y):
        return x @ y if self.matmul else x * y

    # ``A`` (B, R, *out) pulled back through ``u -> u . y`` and ``v -> x . v`` (y, x fixed).
    def _through_left(self, A, y, x_shape):
        if self.matmul:
            return _unbroadcast(A @ y[:, None].transpose(-1, -2), x_shape)
        return _unbroadcast(A * y[:, None], x_shape)

    def _through_right(self, A, x, y_shape):
        if self.matmul:
            return _unbroadcast(x[:, None].transpose(-1, -2) @ A, y_shape)
        return _unbroadcast(A * x[:, None], y_shape)

    def interval(self, xb, yb):
        (x_lo, x_hi), (y_lo, y_hi) = xb, yb
        if self.matmul:  # corners of every term x_ik y_kj, summed over k
            x_lo, x_hi = x_lo[..., :, :, None], x_hi[..., :, :, None]
            y_lo, y_hi = y_lo[..., None, :, :], y_hi[..., None, :, :]
        corners = torch.stack([x_lo * y_lo, x_lo * y_hi, x_hi * y_lo, x_hi * y_hi])
        low, high = corners.amin(0), corners.amax(0)
        size = corners.abs().amax(0)
        if self.matmul:
            low, high, size = low.sum(-2), high.sum(-2), size.sum(-2)
        return low - ROUND * size, high + ROUND * size

    def backward(self, A, boxes, lower):
        (x_lo, x_hi), (y_lo, y_hi) = boxes
        xc, xr, yc, yr = (x_hi + x_lo) / 2, (x_hi - x_lo) / 2, (y_hi + y_lo) / 2, (y_hi - y_lo) / 2
        rows_x = self._through_left(A, yc, x_lo.shape)
        rows_y = self._through_right(A, xc, y_lo.shape)
        d = -row_sum(A * self(xc, yc)[:, None])
        e = row_sum(A.abs() * self(xr, yr)[:, None])
        size = row_sum(A.abs() * self(xc.abs() + xr, yc.abs() + yr)[:, None])
        return (rows_x, rows_y), d, e + ROUND * size

    def jacobian(self, rows, boxes):
        """``[A] y^T`` and ``x^T [A]`` in interval arithmetic (centre and radius)."""
        lo, hi = rows
        Ac, Ar = (hi + lo) / 2, (hi - lo) / 2
        (x_lo, x_hi), (y_lo, y_hi) = boxes
        xc, xr, yc, yr = (x_hi + x_lo) / 2, (x_hi - x_lo) / 2, (y_hi + y_lo) / 2, (y_hi - y_lo) / 2
        out = []
        for through, c, r, shape in ((self._through_left, yc, yr, x_lo.shape),
                                     (self._through_right, xc, xr, y_lo.shape)):
            center = through(Ac, c, shape)
            radius = through(Ac.abs(), r, shape) + through(Ar, c.abs() + r, shape)
            radius = radius * (1 + ROUND) + ROUND * through(Ac.abs(), c.abs(), shape)
            out.append((center - radius, center + radius))
        return tuple(out)

    def local_reach(self, boxes, reaches, nominals):
        """``x y - x0 y0 = dx . y0 + x0 . dy + dx . dy``, so in Frobenius norms
        ``<= f_x r_x ||y0|| + f_y ||x0|| r_y + min(f_x, f_y) r_x r_y`` with ``||.||`` the
        largest entry (``*``) or the largest Frobenius norm of a matrix (``@``, over the
        leading axes), and ``f`` the square root of how many times broadcasting repeats an
        entry (or a matrix) of the factor in the product."""
        if reaches[0] is None and reaches[1] is None:
            return None
        x0, y0 = nominals
        B = len(x0)
        out = math.prod(torch.broadcast_shapes(x0.shape[1:-2], y0.shape[1:-2])) \
            if self.matmul else math.prod(torch.broadcast_shapes(x0.shape[1:], y0.shape[1:]))

        def repeats(t):
            return math.sqrt(out / math.prod(t.shape[1:-2] if self.matmul else t.shape[1:]))

        def size(t):
            if self.matmul:
                return torch.linalg.matrix_norm(t).reshape(B, -1).amax(-1)
            return t.abs().reshape(B, -1).amax(-1)

        zero = x0.new_zeros(B)
        r_x = zero if reaches[0] is None else reaches[0]
        r_y = zero if reaches[1] is None else reaches[1]
        f_x, f_y = repeats(x0), repeats(y0)
        return (f_x * r_x * size(y0) + f_y * size(x0) * r_y + min(f_x, f_y) * r_x * r_y) * \
            (1 + ROUND)

    def tangent(self, inputs, tangents):
        """The clean Jacobian on forms ``(B, p, *shape)`` (``None``: a constant input):
        ``dx y + x dy`` (section 9)."""
        (x, y), (dx, dy) = inputs, tangents
        out = 0
        if dx is not None:
            out = out + self(dx, y[:, None])
        if dy is not None:
            out = out + self(x[:, None], dy)
        return out

    def spread(self, inputs, radii):
        """``|J (dx, dy)| = |dx y + x dy| <= r_x |y| + |x| r_y`` at the clean ``x, y``
        (section 9)."""
        (x, y), (r_x, r_y) = inputs, radii
        return self(r_x, y.abs()) + self(x.abs(), r_y)

    def remainder(self, inputs, radii, rows=None):
        """The product's remainder is ``dx dy`` exactly: ``|dx dy| <= r_x r_y`` (section 9;
        for ``@`` summed over the inner axis)."""
        return self(*radii)

    def lipschitz(self, norm, in_shapes):
        return (math.inf, math.inf)

    def describe(self):
        return "matmul" if self.matmul else "mul"
