"""The numpy twin of ``certify.compressed``: the compressions of THEORY.md section 6 applied
to a weight matrix, and the norms of their errors, for ``certify check``.

=====================  ==================================================================
kind                   ``g(W)`` (``W`` the ``m x n`` matrix; a kernel as ``c_out x c_in k k``)
=====================  ==================================================================
``rank``               SVD truncation ``U_r S_r V_r^T``; ``r >= min(m, n)`` keeps ``W``
``bits``               ``s round(W / s)``, ``s = max|W| / (2^(b-1) - 1)``; ``s = 0`` keeps ``W``
``bits_per_channel``   the same with ``s`` per row
``prune``              the ``k`` smallest magnitudes zeroed, ``k`` the largest count with
                       ``k / (m n) <= p`` (ties: first in row-major order)
=====================  ==================================================================
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


def compress_matrix(W: np.ndarray, kind: str, level) -> np.ndarray:
    """``g(W)`` of one matrix for a compression ``kind=level``."""
    if kind == "rank":
        if level >= min(W.shape):
            return W
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        return (U[:, :level] * s[:level]) @ Vt[:level]
    if kind == "prune":
        flat = W.flatten()
        flat[np.argsort(np.abs(flat), kind="stable")[:prune_count(level, W.size)]] = 0.0
        return flat.reshape(W.shape)
    top = np.abs(W).max(axis=1, keepdims=True) if kind == "bits_per_channel" else np.abs(W).max()
    s = top / (2 ** (level - 1) - 1)
    safe = np.where(s > 0, s, 1.0)
    return np.where(s > 0, safe * np.round(W / safe), W)


def error_norms(E: np.ndarray) -> dict[str, float]:
    """``||E||_F``, ``||E||_2`` and ``||E||_max`` (float64 values, not bounds)."""
    return {"fro": float(np.linalg.norm(E)), "spectral": float(np.linalg.norm(E, 2)),
            "max": float(np.abs(E).max())}
