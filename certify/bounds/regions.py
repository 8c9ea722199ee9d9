"""The section-4 region of a layer's output reachable by a weight ball (THEORY.md section 4).

A weight change ``D`` of an affine layer ``Z = W P~`` moves its output by ``dZ = D P~``. The
bounds of ``certify.bounds.linear`` need four things from the set of such ``dZ`` over
``||D|| <= rho``: a box around it (``box``), the support function of linear rows
(``dual``: ``sup <A, dZ>``), that of magnitudes (``dual_of_magnitude``: ``sup <A, |dZ|>``
for ``A >= 0``, the mean-value bound of an interval Jacobian), for the l2 ball a bound on
``||dZ||_F`` (``unit``), and ``coefficients``: ``dZ`` as a linear map of a variable ``v`` with
``||v|| <= rho`` (``vec D`` for ``WeightRegion``), where forward enclosures start
(``certify.graph.operators.enclosure``).

* ``Region``: a set in ``Z``-space containing every reachable ``dZ``: the l2 ball of radius
  ``rho sigma_max(P~)`` (Frobenius) or the box ``|dZ_cj| <= rho ||P~_:j||_1`` (entrywise
  max). Exact for a dense layer on one vector (one column, ``P~ = h``).
* ``WeightRegion``: the reachable set itself, for a layer with several columns (a
  convolution, a dense layer over a sequence), where one ``D`` is shared by every column:
  ``sup_{||D||_F <= rho} <A, D P~> = rho ||A P~^T||_F`` and
  ``sup_{||D||_max <= rho} <A, D P~> = rho ||A P~^T||_1`` (entrywise l1), both exact, and
  ``|dZ_cj| = |D_c: P~_:j| <= rho ||P~_:j||_2`` (Frobenius, exact per entry).

A grouped convolution's ``P~ = [P_1 ... P_g]`` (``certify.graph.operators.affine``) is read
per group here: row ``c`` of group ``i`` meets ``P_i`` only, so ``A P~^T`` is computed as
``g`` blocks ``A_i P_i^T`` (the same numbers as through ``columns``, at ``1 / g`` the work).

Floating point: ``A P~^T`` is computed with rounding; ``dual`` adds a rigorous bound of that
rounding (``gamma ||A||_F ||P~||_F``, ``gamma = (L + 2) eps``; for the max norm
``gamma sum_cj |A_cj| ||P~_:j||_1``), and the column norms are inflated like
``local_search.region_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Region:
    """``z + rho U`` in a layer's output space, per input.

    ``norm == "fro"``: ``U`` is the l2 ball of radius ``unit`` ``(B,)``;
    ``norm == "max"``: ``U`` is the box ``|dz| <= unit`` (``unit`` shaped like ``z``).
    """

    z: torch.Tensor
    norm: str
    unit: torch.Tensor

    def box(self, rho: torch.Tensor) -> torch.Tensor:
        """Per-entry radius of the smallest box around ``rho U`` (shaped like ``z``)."""
        if self.norm == "fro":
            return (rho * self.unit).reshape(-1, *[1] * (self.z.ndim - 1)).expand_as(self.z)
        return rho.reshape(-1, *[1] * (self.z.ndim - 1)) * self.unit

    def dual(self, A: torch.Tensor) -> torch.Tensor:
        """``sup_{u in U} A u`` for rows ``A`` ``(B, R, *z)``: ``(B, R)``."""
        flat = A.reshape(*A.shape[:2], -1)
        if self.norm == "fro":
            return torch.linalg.vector_norm(flat, dim=-1) * self.unit[:, None]
        return torch.einsum("brn,bn->br", flat.abs(), self.unit.reshape(len(flat), -1))

    def dual_of_magnitude(self, A: torch.Tensor) -> torch.Tensor:
        """``sup_{u in U} A |u|`` for rows ``A >= 0`` (the mean-value bound of an interval
        Jacobian): ``dual`` itself, as the ball and the box are symmetric in every entry."""
        return self.dual(A)

    @property
    def dimension(self) -> int:
        """How many entries the variable ``v`` of ``coefficients`` has."""
        return self.z[0].numel()

    def coefficients(self) -> torch.Tensor:
        """``M`` with ``z + rho U = {z + <M, v> : ||v|| <= rho}`` (l2 for ``fro``, l_inf for
        ``max``), ``(B, p, *z)``: the enclosure of the layer's output
        (``certify.graph.operators.enclosure``). Here ``v = dz / unit``: ``unit`` times the
        identity."""
        B, p = len(self.z), self.dimension
        eye = torch.eye(p, dtype=self.z.dtype, device=self.z.device)
        unit = self.unit.reshape(B, 1, -1) if self.norm == "max" else self.unit.reshape(B, 1, 1)
        return (eye * unit).reshape(B, p, *self.z.shape[1:])

    def value(self, A: torch.Tensor) -> torch.Tensor:
        """``A z`` and ``|A| |z|`` (the magnitude for rounding), ``(B, R)`` each."""
        flat, z = A.reshape(*A.shape[:2], -1), self.z.reshape(len(A), -1)
        return torch.einsum("brn,bn->br", flat, z), torch.einsum("brn,bn->br", flat.abs(), z.abs())


@dataclass(frozen=True)
class WeightRegion(Region):
    """``z + {D P~ : ||D|| <= rho}`` itself (module docstring); ``unit`` as in ``Region``
    (``sigma_max(P~)`` bounds ``||D P~||_F / rho`` for the l2 reach).

    ``P``: the layer input as columns ``P~`` ``(B, n, L)``; ``layer``: the affine operator,
    whose ``columns`` lays ``z``-shaped rows out as ``(m, L)`` matrices.
    """

    P: torch.Tensor = None
    layer: object = None

    @property
    def _groups(self) -> int:
        return getattr(self.layer, "groups", 1)

    def _blocks(self) -> torch.Tensor:
        """``P~`` per group, ``(B, g, n / g, L)`` (``(B, 1, n, L)`` for one group)."""
        B, n, gL = self.P.shape
        g = self._groups
        return self.P.reshape(B, n, g, gL // g).transpose(1, 2)

    def _column_norms(self) -> torch.Tensor:
        """``||P~_:j||_2`` ``(B, g, L)`` per group, inflated like ``local_search.region_scale``."""
        return torch.linalg.vector_norm(self._blocks(), dim=2) * (1 + self.P.shape[1] * 1e-15)

    def _rows(self, A: torch.Tensor) -> torch.Tensor:
        """Rows ``A`` ``(B, R, *z)`` as each group's output columns, ``(B, R, g, m / g, L)``."""
        B, R = A.shape[:2]
        if self._groups == 1:
            rows = self.layer.columns(A.reshape(B * R, *self.z.shape[1:]))
            return rows.reshape(B, R, 1, *rows.shape[1:])
        m = self.layer.weight.shape[0]  # a convolution: channels first
        return A.reshape(B, R, self._groups, m // self._groups, -1)

    @property
    def dimension(self) -> int:
        return self.layer.weight.shape[0] * self.P.shape[1]

    def coefficients(self) -> torch.Tensor:
        """``dZ = D P~`` is ``<M, vec D>`` with ``M[(c, k), c', j] = [c = c'] P~_kj``,
        ``(B, m n, *z)``; ``v = vec D`` and ``||v|| = ||D||`` in either norm."""
        B, n, L = self.P.shape
        m = self.layer.weight.shape[0]
        eye = torch.eye(m, dtype=self.P.dtype, device=self.P.device)
        M = (eye[None, :, None, :, None] * self.P[:, None, :, None, :]).reshape(B * m * n, m, L)
        return self.layer.uncolumns(M, self.z.shape[1:]).reshape(B, m * n, *self.z.shape[1:])

    def box(self, rho: torch.Tensor) -> torch.Tensor:
        if self.norm == "max":
            return super().box(rho)
        per_column = self._column_norms()  # (B, g, L)
        B, g, L = per_column.shape
        m = self.layer.weight.shape[0]
        unit = per_column[:, :, None, :].expand(B, g, m // g, L).reshape(B, m, L)
        # One group: the layer's own layout (a sequence's tokens); groups: channels first.
        unit = self.layer.uncolumns(unit, self.z.shape[1:]) if g == 1 else \
            unit.reshape(self.z.shape)
        return rho.reshape(-1, *[1] * (self.z.ndim - 1)) * unit

    def dual(self, A: torch.Tensor) -> torch.Tensor:
        B, R = A.shape[:2]
        rows, blocks = self._rows(A), self._blocks()
        # A P~^T per group: (B, R, g, m / g, n / g)
        M = torch.matmul(rows, blocks.transpose(-2, -1)[:, None])
        gamma = (blocks.shape[-1] + 2) * EPS
        if self.norm == "fro":
            rounding = gamma * torch.linalg.vector_norm(A.reshape(B, R, -1), dim=-1) * \
                torch.linalg.vector_norm(self.P.reshape(B, -1), dim=-1)[:, None]
            return torch.linalg.vector_norm(M.reshape(B, R, -1), dim=-1) * (1 + 2 * gamma) + \
                rounding
        column_l1 = blocks.abs().sum(dim=2)  # (B, g, L)
        rounding = gamma * torch.einsum("brgml,bgl->br", rows.abs(), column_l1)
        return M.abs().sum(dim=(-3, -2, -1)) * (1 + 2 * gamma) + rounding

    def dual_of_magnitude(self, A: torch.Tensor) -> torch.Tensor:
        """``sup A |D P~|`` over the weight ball, rows ``A >= 0``: ``{D P~}`` is not symmetric
        in each entry, so not ``dual``. Frobenius: ``sum_cj A_cj |D_c: P~_:j| <=
        sum_c ||D_c:||_2 (sum_j A_cj ||P~_:j||_2) <= ||(sum_j A_cj ||P~_:j||_2)_c||_2``
        (Cauchy-Schwarz twice, per unit ``rho``), or the Z-space ball's bound, whichever is
        smaller; entrywise max: the box ``|dZ_cj| <= ||P~_:j||_1``, which is exact."""
        if self.norm == "max":
            return super().dual(A)
        rows = self._rows(A)
        per_row = torch.einsum("brgml,bgl->brgm", rows, self._column_norms())
        rounding = 1 + (rows.shape[-1] + rows.shape[-2] * rows.shape[-3] + 2) * EPS
        return torch.minimum(torch.linalg.vector_norm(per_row.flatten(2), dim=-1) * rounding,
                             super().dual(A))
