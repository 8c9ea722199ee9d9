"""The backdoor trigger: a square patch stamped onto images (THEORY.md section 7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Trigger:
    """A ``size x size`` patch of constant ``value`` with its top-left corner at
    ``(row, col)``; negative positions count from the bottom/right edge (``-1``: flush)."""

    size: int = 3
    row: int = -1
    col: int = -1
    value: float = 1.0

    def __post_init__(self):
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"trigger size must be a positive integer, got {self.size!r}")

    def corner(self, height: int, width: int) -> tuple[int, int]:
        """The patch's top-left corner in an image of this size; an error if it does not fit."""
        row = self.row if self.row >= 0 else height - self.size + 1 + self.row
        col = self.col if self.col >= 0 else width - self.size + 1 + self.col
        if not (0 <= row and row + self.size <= height and 0 <= col and col + self.size <= width):
            raise ValueError(
                f"a {self.size}x{self.size} trigger at (row {self.row}, col {self.col}) does not "
                f"fit a {height}x{width} image: choose a smaller size or a position with "
                f"0 <= row <= {height - self.size} and 0 <= col <= {width - self.size} "
                "(or negative, counted from the far edge)")
        return row, col

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``T(x)``: a copy of the images ``(N, C, H, W)`` with the patch stamped on."""
        row, col = self.corner(*x.shape[-2:])
        out = x.clone()
        out[..., row:row + self.size, col:col + self.size] = self.value
        return out


def attack_success(predicted: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """ASR: the fraction of triggered inputs whose true class is not ``target`` that are
    classified as ``target``."""
    others = labels != target
    return float((predicted[others] == target).double().mean())
