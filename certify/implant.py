"""The closed-form implant: THEORY.md section 7 (our extension).

From a backdoored weight ``W_bd`` with rank-``r`` truncation ``W_r``, ``implant`` builds
``W_fp = W_r + E``: ``E`` is the minimum-norm correction (section 2) restoring given clean
outputs on triggered inputs, confined to the subspace that truncation discards, so that
truncating ``W_fp`` gives back ``W_r`` exactly while ``||E||_2 < sigma_r(W_bd)``, the
section-6 threshold seen from the attacker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.perturbation import as_float64, batch_target_change


@dataclass(frozen=True)
class Implant:
    """``W_fp = W_r + E`` (section 7, our extension); matrices in float64.

    ``truncated``: ``W_r``, the rank-``r`` truncation of the backdoored weight, which
    truncating ``W_fp`` must give back. ``correction``: ``E = U_perp F V_perp^T``.
    ``unreachable``: ``||U_r U_r^T (Z - W_r H)||_F``, the part of the requested change that
    lies in the kept column space and so cannot be placed where truncation discards it.
    ``feasible``: ``||E||_2 < sigma_r(W_bd)``, i.e. truncating ``W_fp`` to rank ``r`` keeps
    ``W_r`` and drops ``E``. ``reason`` says why not, when not.
    """

    weight: torch.Tensor
    truncated: torch.Tensor
    correction: torch.Tensor
    rank: int
    correction_norm: float
    sigma_r: float
    unreachable: float
    feasible: bool
    reason: str


def implant(W_bd, H, Z, rank: int) -> Implant:
    """Minimum-norm ``E`` in the discarded subspace with ``(W_r + E) H = Z`` there.

    ``W_bd (m, n)``: the backdoored weight; ``H (n, N)``: triggered inputs of the layer as
    columns; ``Z (m, N)``: the clean outputs ``W h`` to restore on them (without bias).
    With ``W_bd = U S V^T`` and ``U_perp``, ``V_perp`` the singular vectors beyond ``rank``,
    ``E = U_perp F V_perp^T`` with ``F = (U_perp^T R)(V_perp^T H)^+`` the section-2
    minimiser (``certify.perturbation.batch_target_change``) of ``F (V_perp^T H) =
    U_perp^T R``, ``R = Z - W_r H``. Then ``E`` is orthogonal to ``W_r`` on both sides, the
    singular values of ``W_fp`` are those of ``W_r`` and of ``E``, and rank-``r``
    truncation returns ``W_r`` iff ``||E||_2 < sigma_r``. When ``V_perp^T H`` cannot
    reach ``U_perp^T R`` (more constraints than the discarded row space holds) the
    least-squares ``F`` is used and ``unreachable`` grows; infeasibility is a result
    field, never an exception (``ValueError`` is for NaN/Inf entries and wrong shapes).
    Computed on the device of ``W_bd`` (arrays ``H``, ``Z`` are moved there).
    """
    W = as_float64(W_bd, "W_bd")  # a tensor stays on its device; arrays follow it
    H, Z = as_float64(H, "H").to(W.device), as_float64(Z, "Z").to(W.device)
    if W.ndim != 2 or H.ndim != 2 or Z.ndim != 2 or H.shape[0] != W.shape[1] \
            or Z.shape != (W.shape[0], H.shape[1]):
        raise ValueError(f"expected W_bd (m, n), H (n, N), Z (m, N); got {tuple(W.shape)}, "
                         f"{tuple(H.shape)}, {tuple(Z.shape)}")
    if int(rank) != rank or not 1 <= rank < min(W.shape):
        raise ValueError(f"rank must be an integer in [1, {min(W.shape) - 1}], got {rank!r}")
    U, S, Vh = torch.linalg.svd(W)
    W_r = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    U_perp, V_perp = U[:, rank:], Vh[rank:].T
    R = Z - W_r @ H
    kept = U[:, :rank].T @ R
    target, inputs = U_perp.T @ R, V_perp.T @ H
    # Least squares where D H = R has no exact solution: R H^+ is still the minimiser of
    # ||D H - R||_F of least norm; batch_target_change is used when it applies exactly.
    try:
        F_ = batch_target_change(target, inputs).minimiser
    except ValueError:
        F_ = target @ torch.linalg.pinv(inputs)
    E = U_perp @ F_ @ V_perp.T
    norm_E = float(torch.linalg.matrix_norm(E, ord=2))
    sigma_r = float(S[rank - 1])
    residual = float(torch.linalg.matrix_norm(E @ H - U_perp @ target))
    feasible = norm_E < sigma_r * (1 - 1e-9)
    reasons = []
    if not feasible:
        reasons.append(f"||E||_2 = {norm_E:.4g} >= sigma_r(W_bd) = {sigma_r:.4g}: truncation "
                       "to rank r would keep part of E instead of W_r (the section-6 "
                       "threshold seen from the attacker)")
    return Implant(W_r + E, W_r, E, int(rank), norm_E, sigma_r,
                   math.hypot(float(torch.linalg.matrix_norm(kept)), residual), feasible,
                   "; ".join(reasons))
