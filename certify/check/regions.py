"""The numpy twin of ``certify.bounds.regions``: the section-4 region of a layer's output reachable
by a weight ball (THEORY.md section 4), for ``certify check``.

``Region``: the l2 ball of radius ``rho sigma_max(P~)`` or the box
``|dZ_cj| <= rho ||P~_:j||_1`` in ``Z``-space. ``WeightRegion`` (several columns): the set
``{D P~ : ||D|| <= rho}`` itself, with ``sup <A, D P~> = rho ||A P~^T||_F`` (Frobenius) or
``rho ||A P~^T||_1`` (entrywise max) plus a rigorous bound of the rounding of ``A P~^T``
(``(L + 2) eps ||A||_F ||P~||_F``, or ``(L + 2) eps sum_cj |A_cj| ||P~_:j||_1``), the
per-entry box ``|dZ_cj| <= rho ||P~_:j||_2`` (Frobenius), and ``sup <A, |D P~|>`` for
``A >= 0`` (the interval Jacobian's mean-value bound; the set is not symmetric in each entry).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = np.finfo(np.float64).eps


@dataclass(frozen=True)
class Region:
    """``z + rho U``: the l2 ball of radius ``unit`` ``(B,)`` (fro) or the box
    ``|dz| <= unit`` (max, shaped like ``z``)."""

    z: np.ndarray
    norm: str
    unit: np.ndarray

    def box(self, rho):
        shape = (-1, *[1] * (self.z.ndim - 1))
        if self.norm == "fro":
            return np.broadcast_to((rho * self.unit).reshape(shape), self.z.shape)
        return rho.reshape(shape) * self.unit

    def dual(self, A):
        """``sup_{u in U} A u`` for rows ``(B, R, *z)``."""
        flat = A.reshape(*A.shape[:2], -1)
        if self.norm == "fro":
            return np.linalg.norm(flat, axis=-1) * self.unit[:, None]
        return np.einsum("brn,bn->br", np.abs(flat), self.unit.reshape(len(flat), -1))

    def dual_of_magnitude(self, A):
        """``sup_{u in U} A |u|`` for rows ``A >= 0``: ``dual`` (symmetric in each entry)."""
        return self.dual(A)

    @property
    def dimension(self) -> int:
        return self.z[0].size

    def coefficients(self):
        """``M`` ``(B, p, *z)`` with ``z + rho U = {z + <M, v> : ||v|| <= rho}``: the
        identity times ``unit``."""
        B, p = len(self.z), self.dimension
        unit = self.unit.reshape(B, 1, -1) if self.norm == "max" else self.unit.reshape(B, 1, 1)
        return (np.eye(p) * unit).reshape(B, p, *self.z.shape[1:])

    def value(self, A):
        """``A z`` and ``|A| |z|``."""
        flat, z = A.reshape(*A.shape[:2], -1), self.z.reshape(len(A), -1)
        return np.einsum("brn,bn->br", flat, z), np.einsum("brn,bn->br", np.abs(flat), np.abs(z))


@dataclass(frozen=True)
class WeightRegion(Region):
    """``z + {D P~ : ||D|| <= rho}``; ``P`` ``(B, n, L)`` the columns ``P~``, ``layer`` the
    affine twin (its ``columns`` layout)."""

    P: np.ndarray = None
    layer: object = None

    def _column_norms(self):
        """``||P~_:j||_2`` ``(B, L)``, inflated."""
        return np.linalg.norm(self.P, axis=1) * (1 + self.P.shape[1] * 1e-15)

    def _rows(self, A):
        """Rows ``(B, R, *z)`` as the layer's columns ``(B, R, m, L)``."""
        B, R = A.shape[:2]
        rows = self.layer.columns(A.reshape(B * R, *self.z.shape[1:]))
        return rows.reshape(B, R, *rows.shape[1:])

    @property
    def dimension(self) -> int:
        return self.layer.weight.shape[0] * self.P.shape[1]

    def coefficients(self):
        """``D P~`` as ``<M, vec D>``: direction ``(c, k)`` moves row ``c`` of the columns
        by ``P~_k:``, ``(B, m n, *z)``."""
        B, n, L = self.P.shape
        m = self.layer.weight.shape[0]
        M = np.einsum("cd,bkl->bckdl", np.eye(m), self.P).reshape(B * m * n, m, L)
        return self.layer.uncolumns(M).reshape(B, m * n, *self.z.shape[1:])

    def box(self, rho):
        if self.norm == "max":
            return super().box(rho)
        per_column = self._column_norms()
        B, L = per_column.shape
        unit = self.layer.uncolumns(np.ascontiguousarray(
            np.broadcast_to(per_column[:, None, :], (B, self.layer.weight.shape[0], L))))
        return rho.reshape(-1, *[1] * (self.z.ndim - 1)) * unit

    def dual(self, A):
        B, R = A.shape[:2]
        rows = self._rows(A)
        M = rows @ self.P.transpose(0, 2, 1)[:, None]  # A P~^T: (B, R, m, n)
        gamma = (self.P.shape[-1] + 2) * EPS
        if self.norm == "fro":
            rounding = gamma * np.linalg.norm(A.reshape(B, R, -1), axis=-1) * \
                np.linalg.norm(self.P.reshape(B, -1), axis=-1)[:, None]
            return np.linalg.norm(M, axis=(-2, -1)) * (1 + 2 * gamma) + rounding
        rounding = gamma * np.einsum("brml,bl->br", np.abs(rows), np.abs(self.P).sum(axis=1))
        return np.abs(M).sum(axis=(-2, -1)) * (1 + 2 * gamma) + rounding

    def dual_of_magnitude(self, A):
        """``sup A |D P~|``, ``A >= 0``: Frobenius ``||(sum_j A_cj ||P~_:j||_2)_c||_2`` or
        the Z-space ball's bound, whichever is smaller; max: the exact box."""
        if self.norm == "max":
            return super().dual(A)
        rows = self._rows(A)
        per_row = np.einsum("brml,bl->brm", rows, self._column_norms())
        rounding = 1 + (self.P.shape[-1] + rows.shape[2] + 2) * EPS
        return np.minimum(np.linalg.norm(per_row, axis=-1) * rounding, super().dual(A))
