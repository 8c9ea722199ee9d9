"""The numpy twin of ``certify.radii.compressed``: the compressions of THEORY.md section 6 applied
to a weight matrix, and the norms of their errors, for ``certify check``.

=====================  ==================================================================
kind                   ``g(W)`` (``W`` the ``m x n`` matrix; a kernel as ``c_out x c_in k k``)
=====================  ==================================================================
``rank``               SVD truncation ``U_r S_r V_r^T``; ``r >= min(m, n)`` keeps ``W``
``bits``               ``s round(W / s)``, ``s = max|W| / (2^(b-1) - 1)``; ``s = 0`` keeps ``W``
``bits_per_channel``   the same with ``s`` per row
``prune``              the ``k`` smallest magnitudes zeroed, ``k`` the largest count with
                       ``k / (m n) <= p`` (ties: first in row-major order)
``prune_global``       the same over all the chosen layers together: their matrices
                       flattened row-major and concatenated in ``affine_indices`` order,
                       ``k / N <= p`` with ``N`` the total size, split back
=====================  ==================================================================

Pruned entries, and kept ``-0.0`` weights, come out as ``+0.0``, as in ``certify.radii.compressed``.
"""

from __future__ import annotations

import math

import numpy as np


def prune_count(ratio: float, size: int) -> int:
    """The largest ``k <= size`` with ``k / size <= ratio`` (float64 division)."""
    k = min(size, math.floor(ratio * size))
    while k < size and (k + 1) / size <= ratio:
        k += 1
    while k > 0 and k / size > ratio:
        k -= 1
    return k


def prune_together(matrices: list[np.ndarray], ratio: float) -> list[np.ndarray]:
    """One threshold over all ``matrices`` (concatenated row-major in the order given): the
    ``prune_count(ratio, N)`` smallest magnitudes zeroed, ties first in that order."""
    flat = np.concatenate([W.ravel() for W in matrices])
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(np.abs(flat), kind="stable")[:prune_count(ratio, flat.size)]] = False
    kept = np.where(keep, flat, 0.0) + 0.0
    ends = np.cumsum([W.size for W in matrices])[:-1]
    return [part.reshape(W.shape) for part, W in zip(np.split(kept, ends), matrices)]


def compress_matrix(W: np.ndarray, kind: str, level) -> np.ndarray:
    """``g(W)`` of one matrix for a compression ``kind=level`` (``prune_global`` of one
    matrix is ``prune``)."""
    if kind == "rank":
        if level >= min(W.shape):
            return W
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        return (U[:, :level] * s[:level]) @ Vt[:level]
    if kind in ("prune", "prune_global"):
        return prune_together([W], level)[0]
    top = np.abs(W).max(axis=1, keepdims=True) if kind == "bits_per_channel" else np.abs(W).max()
    s = top / (2 ** (level - 1) - 1)
    safe = np.where(s > 0, s, 1.0)
    return np.where(s > 0, safe * np.round(W / safe), W)


def compress_matrices(matrices: list[np.ndarray], kind: str, level) -> list[np.ndarray]:
    """``g`` of the chosen layers' matrices (in ``affine_indices`` order): ``prune_global``
    together, every other kind one by one."""
    if kind == "prune_global":
        return prune_together(matrices, level)
    return [compress_matrix(W, kind, level) for W in matrices]


def error_norms(E: np.ndarray) -> dict[str, float]:
    """``||E||_F``, ``||E||_2`` and ``||E||_max`` (float64 values, not bounds)."""
    return {"fro": float(np.linalg.norm(E)), "spectral": float(np.linalg.norm(E, 2)),
            "max": float(np.abs(E).max())}


EPS = np.finfo(np.float64).eps


def cells(W: np.ndarray, bits, per_channel: bool) -> np.ndarray:
    """The quantiser's cells ``|E| <= s / 2``, widened for its float64 rounding to
    ``s / 2 (1 + 2 eps) + eps (2 |W| + s / 2)`` (``certify.radii.whole_model``); ``(m, n)``
    for one bit width, ``(B, m, n)`` for an array of them."""
    top = np.abs(W).max(axis=1, keepdims=True) if per_channel else np.abs(W).max()
    bits = np.asarray(bits, dtype=np.float64)
    s = top / (2.0 ** (bits.reshape(bits.shape + (1, 1)) - 1) - 1)
    return s / 2 * (1 + 2 * EPS) + EPS * (2 * np.abs(W) + s / 2)


def strength_sets(matrices: list[np.ndarray], compressed: list[np.ndarray], kind: str,
                  level) -> list[tuple[str, np.ndarray]]:
    """Every compression of this strength, per layer, as ``("box", A)`` or ``("ball", e)``:
    the quantiser's cells, the truncation error's Frobenius ball, or the pruning box
    ``|E_ij| <= |W_ij|`` where ``|W_ij|`` is at most the largest pruned magnitude (of the
    layer, or of all the layers for ``prune_global``)."""
    if kind in ("bits", "bits_per_channel"):
        return [("box", np.broadcast_to(cells(W, level, kind == "bits_per_channel"), W.shape))
                for W in matrices]
    if kind == "rank":
        return [("ball", np.linalg.norm(W - G) * (1 + (W.size + 2) * EPS))
                for W, G in zip(matrices, compressed)]
    tops = [float(np.where(G == 0, np.abs(W), 0.0).max()) for W, G in zip(matrices, compressed)]
    if kind == "prune_global":
        tops = [max(tops)] * len(matrices)
    return [("box", np.where(np.abs(W) <= top, np.abs(W), 0.0))
            for W, top in zip(matrices, tops)]
