"""Max pooling (1-D or 2-D; any window, stride, padding, dilation, ``ceil_mode``).

Linear rule: in every window pick the entry ``k`` with the largest lower bound; then
``max_i x_i - x_k = max_i (x_i - x_k)`` lies in ``[0, max(0, max_{i != k} u_i - l_k)]``,
so ``max = x_k + gap / 2 +- gap / 2`` (exact, gap 0, where ``l_k`` beats every other upper
bound). Lower bounds only: ``max >= x_k`` for positive rows, ``<= x_k + gap`` for negative
ones. The windows are taken explicitly (``unfold`` of the input padded with ``-inf``).

Constants: l_inf 1; l2 ``sqrt(overlap)``, every entry lying in at most ``overlap`` windows
(a window's max changes by at most the l_inf change of its entries).

Deviations (THEORY.md section 9): the clean Jacobian picks each window's winner ``w``, so
``|J delta| <= max_window d``; the remainder ``max(u + delta) - u_w - delta_w`` lies in
``[0, (2 max_window d - gap)_+]``, ``gap`` the winner's lead over the runner-up (0 while no
other entry can overtake it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certify.graph.operators.base import ROUND, Operator, row_sum


@dataclass(frozen=True)
class MaxPool(Operator):
    """``max_pool1d/2d``: the largest entry of each window (any stride, padding, dilation,
    ``ceil_mode``)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool = False

    nonlinear = True

    def __call__(self, x):
        if len(self.kernel) == 1:
            return F.max_pool1d(x, self.kernel, self.stride, self.padding, self.dilation,
                                self.ceil_mode)
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation,
                            self.ceil_mode)

    def interval(self, box):
        return self(box[0]), self(box[1])  # monotone in every entry

    def _windows(self, x: torch.Tensor, out_shape) -> torch.Tensor:
        """``(B, C, window, positions)`` of ``x`` ``(B, C, *spatial)``, padding ``-inf``."""
        two = len(self.kernel) == 2
        x2 = x if two else x[:, :, None]
        k, s, d = ((1,) * (not two) + tuple(v) for v in (self.kernel, self.stride,
                                                          self.dilation))
        p = (0,) * (not two) + tuple(self.padding)
        out = out_shape[1:] if two else (1, out_shape[-1])
        # Right padding reaching every window that ceil_mode lets start inside the input.
        extra = [max(0, (o - 1) * st + (kk - 1) * dd + 1 - (n + 2 * pp))
                 for o, st, kk, dd, n, pp in zip(out, s, k, d, x2.shape[2:], p)]
        padded = F.pad(x2, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]), value=-math.inf)
        B, C = x.shape[:2]
        cols = F.unfold(padded.reshape(B * C, 1, *padded.shape[2:]), k, dilation=d, stride=s)
        return cols[..., :math.prod(out)].reshape(B, C, cols.shape[1], -1)

    def _selection(self, lo, hi, out_shape):
        """Per window: the index (into the padded windows) of the largest lower bound, and
        the gap ``max(0, max_{i != k} u_i - l_k)``."""
        low, high = self._windows(lo, out_shape), self._windows(hi, out_shape)
        best, k = low.max(dim=2, keepdim=True)
        others = high.scatter(2, k, -math.inf).amax(dim=2, keepdim=True)
        gap = torch.clamp(others - best, min=0)
        gap = torch.where(torch.isfinite(gap), gap, torch.zeros_like(gap))
        gap = gap + ROUND * (best.abs() + torch.where(torch.isfinite(others), others.abs(), 0))
        return k, gap[:, :, 0]

    def _scatter(self, A, k, in_shape, out_shape):
        """Rows on the chosen entries: the adjoint of picking entry ``k`` of every window."""
        B, R = A.shape[:2]
        C = in_shape[0]
        spots = self._index_windows(in_shape, out_shape, A.device)
        chosen = spots.expand(B, C, -1, -1).gather(2, k)[:, :, 0]  # (B, C, positions)
        flat = A.reshape(B, R, C, -1)
        rows = A.new_zeros(B, R, C, math.prod(in_shape[1:]) + 1)
        target = torch.where(chosen < 0, rows.shape[-1] - 1, chosen)
        rows.scatter_add_(-1, target[:, None].expand(B, R, C, -1), flat)
        return rows[..., :-1].reshape(B, R, *in_shape)

    def _index_windows(self, in_shape, out_shape, device) -> torch.Tensor:
        """Flat input index of every window entry, ``-1`` for padding: ``(1, 1, w, L)``."""
        flat = torch.arange(math.prod(in_shape[1:]), dtype=torch.float64, device=device) + 1
        spots = self._windows(flat.reshape(1, 1, *in_shape[1:]), (1, *out_shape[1:]))
        return torch.where(torch.isfinite(spots), spots - 1, -1.0).long()

    def backward(self, A, boxes, lower):
        lo, hi = boxes[0]
        out_shape = A.shape[2:]
        k, gap = self._selection(lo, hi, out_shape)
        rows = self._scatter(A, k, lo.shape[1:], out_shape)
        gap = gap.reshape(len(gap), *out_shape)[:, None]
        if lower:
            return (rows,), row_sum(A.clamp(max=0) * gap), None
        return (rows,), row_sum(A * gap / 2), row_sum(A.abs() * gap / 2)

    def spread(self, inputs, radii):
        """``|J r| <= max_window r`` (section 9; whichever tied entry ``J`` picks)."""
        return self(radii[0])

    def remainder(self, inputs, radii, rows=None):
        """``(2 max_window d - gap)_+`` (module docstring); ``gap`` lowered by its rounding,
        ``inf`` for a window of one entry."""
        (u,), (d,) = inputs, radii
        out_shape = self(u).shape
        top = self._windows(u, out_shape[1:]).topk(min(2, math.prod(self.kernel)), dim=2).values
        first, second = top[:, :, 0], top[:, :, -1] if top.shape[2] > 1 else \
            torch.full_like(top[:, :, 0], -math.inf)
        gap = first - second - ROUND * (first.abs() + torch.where(
            torch.isfinite(second), second.abs(), 0.0))
        gap = gap.reshape(out_shape)
        return (2 * self(d) * (1 + ROUND) - gap).clamp(min=0)

    def unstable(self, lo, hi):
        return torch.ones_like(lo, dtype=torch.bool)

    @property
    def overlap(self) -> int:
        return math.prod(min(k, math.ceil(((k - 1) * d + 1) / s))
                         for k, s, d in zip(self.kernel, self.stride, self.dilation))

    def lipschitz(self, norm, in_shapes):
        return (math.sqrt(self.overlap) if norm == "fro" else 1.0,)
