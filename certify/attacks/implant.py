"""The closed-form implants: THEORY.md section 7 (our extension).

From a backdoored weight ``W_bd`` with rank-``r`` truncation ``W_r``, both implants build
``W_fp = W_r + E`` with ``E = U_perp F V_perp^T`` confined to the subspace that truncation
discards, so that truncating ``W_fp`` gives back ``W_r`` exactly while
``||E||_2 < sigma_r(W_bd)``, the section-6 threshold seen from the attacker.

* ``implant``: ``E`` is the minimum-norm correction (section 2) restoring given clean
  outputs on triggered inputs.
* ``convex_implant``: ``F`` solves a convex program over the margins of clean and
  triggered inputs (a multiclass hinge loss under ``||F||_2 <= (1 - slack) sigma_r``);
  ``backdoor_layer`` fits the attacker's rank-``r`` last layer that leaves it room.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from certify.closed_forms.perturbation import as_float64, batch_target_change, class_pair_radius
from certify.closed_forms.thresholds import threshold_rank


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
    minimiser (``certify.closed_forms.perturbation.batch_target_change``) of ``F (V_perp^T H) =
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
    rank = _rank(rank, *W.shape)
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
    return Implant(W_r + E, W_r, E, rank, norm_E, sigma_r,
                   math.hypot(float(torch.linalg.matrix_norm(kept)), residual), feasible,
                   "; ".join(reasons))


@dataclass(frozen=True)
class ConvexImplant:
    """``W_fp = W_r + E`` chosen on margins (section 7, our extension); float64.

    ``weight``: ``W_fp``. ``truncated``: ``W_r``, the rank-``r`` truncation of ``W_bd``.
    ``correction``: ``E = U_perp F V_perp^T``. ``sigma_r``: ``sigma_r(W_bd)``, the smallest
    kept singular value; ``bound``: ``(1 - slack) sigma_r``, the program's cap on
    ``||F||_2``; ``correction_norm``: ``||E||_2``, recomputed. ``status``: the solver's
    status (``"solver_error: ..."`` when it failed, and then ``E = 0``; ``"not solved"``
    when no input has a discarded component, so no ``E`` can move a margin);
    ``seconds``: time in cvxpy (canonicalisation and solve).

    ``margins_clean``, ``margins_triggered``: per input ``min_{j != y} (o_y - o_j)`` of
    ``o = W_fp h + b`` against its label, recomputed in float64 after solving; ``kappa``:
    their minimum, the achieved margin (``> 0`` iff full precision gives every input its
    label); ``violations``: how many are ``<= 0``; ``hinge``: the objective recomputed.

    ``radius``: the smallest exact last-layer spectral radius (section 3) of the triggered
    inputs under ``W_fp``; ``threshold_rank``: the section-6 threshold of ``W_fp`` against
    it, the smallest rank to which truncation provably changes no triggered prediction.
    Truncation to ``rank`` changes ``W_fp`` by exactly ``E`` (``||E||_2 =
    sigma_{r+1}(W_fp)``), so a triggered input it flips has radius ``<= ||E||_2``: wherever
    the attack works, ``threshold_rank > rank`` and the certificate flags the rank.

    ``feasible``: ``kappa > 0`` and ``||E||_2 < sigma_r`` (so truncating ``W_fp`` to rank
    ``r`` gives back ``W_r``), both recomputed, never taken from the solver; ``reason``
    says why not, when not.
    """

    weight: torch.Tensor
    truncated: torch.Tensor
    correction: torch.Tensor
    rank: int
    sigma_r: float
    bound: float
    correction_norm: float
    status: str
    seconds: float
    margins_clean: torch.Tensor
    margins_triggered: torch.Tensor
    kappa: float
    violations: int
    hinge: float
    radius: float
    threshold_rank: int
    feasible: bool
    reason: str


def _last_layer(W, b, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``W (m, n)`` and ``b (m,)`` in float64 on ``W``'s device, checked."""
    W = as_float64(W, name)
    if W.ndim != 2 or min(W.shape) < 2:
        raise ValueError(f"{name} must be a matrix (m, n) with m, n >= 2, got {tuple(W.shape)}")
    b = as_float64(b, "b").to(W.device)
    if b.shape != (W.shape[0],):
        raise ValueError(f"b must have shape ({W.shape[0]},) to match {name}, got "
                         f"{tuple(b.shape)}")
    return W, b


def _rank(rank, m: int, n: int) -> int:
    if int(rank) != rank or not 1 <= rank < min(m, n):
        raise ValueError(f"rank must be an integer in [1, {min(m, n) - 1}], got {rank!r}")
    return int(rank)


def _rows(H, name: str, n: int, device) -> torch.Tensor:
    H = as_float64(H, name).to(device)
    if H.ndim != 2 or H.shape[1] != n:
        raise ValueError(f"{name} must hold one input of the layer per row, shape (N, {n}); "
                         f"got {tuple(H.shape)}")
    return H


def _labels(y, name: str, count: int, classes: int, device) -> torch.Tensor:
    y = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))
    integral = not (y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool)
    if y.shape != (count,) or count and not integral:  # [] is a float array: allowed
        raise ValueError(f"{name} must be {count} integer class indices (one per row), got "
                         f"dtype {y.dtype} and shape {tuple(y.shape)}")
    if count and not (0 <= int(y.min()) and int(y.max()) < classes):
        raise ValueError(f"{name} must hold class indices in [0, {classes - 1}]")
    return y.to(device=device, dtype=torch.int64)


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``min_{j != y} (o_y - o_j)`` per row."""
    m = logits.gather(1, y[:, None]) - logits
    return m.scatter(1, y[:, None], math.inf).min(dim=1).values


def convex_implant(W_bd, b, H_clean, y_clean, H_trig, y_trig, rank: int, *,
                   margin: float = 1.0, slack: float = 0.01,
                   solver: str = "CLARABEL") -> ConvexImplant:
    """``W_fp = W_r + U_perp F V_perp^T`` with ``F`` from a convex program on margins.

    ``W_bd (m, n)``, ``b (m,)``: the backdoored last layer ``o = W h + b``. ``H_clean
    (N_c, n)`` and ``H_trig (N_t, n)``: inputs of the layer, one per ROW (``implant`` takes
    columns), with the classes full precision must give them: ``y_clean`` (their clean
    predictions or labels) and ``y_trig`` (the triggered inputs' true labels). With
    ``W_bd = U S V^T``, ``W_r = U_r S_r V_r^T`` and the discarded ``U_perp (m, m - r)``,
    ``V_perp (n, n - r)``, the program over ``F`` is (``N = N_c + N_t``, ``y_i`` the label)

        minimise    (1/N) sum_i max(0, margin - min_{j != y_i} (e_{y_i} - e_j)^T o_i)
        where       o_i = (W_r + U_perp F V_perp^T) h_i + b,
        subject to  ||F||_2 <= (1 - slack) sigma_r(W_bd),

    convex (the margins are affine in ``F``; ``sigma_max`` is a norm, an SDP constraint).
    ``E = U_perp F V_perp^T`` has ``W_r^T E = 0`` and ``W_r E^T = 0``, so ``W_fp^T W_fp =
    W_r^T W_r + E^T E`` on orthogonal subspaces: the singular values of ``W_fp`` are those
    of ``W_r`` and of ``E``, and rank-``r`` truncation of ``W_fp`` returns ``W_r`` since
    ``||E||_2 < sigma_r`` (section 7; the section-6 threshold seen from the attacker).

    ``F = G Q^T`` with ``Q`` an orthonormal basis of the span of the inputs' discarded
    coordinates ``V_perp^T h_i`` (the rest of ``F`` moves no margin and only adds norm), and
    an auxiliary ``T = Z G^T`` keeps the constraints sparse. A solution that overshoots the
    cap within the solver's tolerance is scaled back onto it. Everything the result claims
    is recomputed in float64 torch afterwards; an unmet margin or a failed solve is a result
    (``feasible`` False), never an exception. ``ValueError``: wrong shapes, labels, ranks,
    ``margin <= 0`` or ``slack`` outside ``(0, 1)`` (the gap ``slack sigma_r`` keeps the
    truncation well conditioned). The program runs on the CPU; the matrices come back on
    the device of ``W_bd``.
    """
    import cvxpy as cp  # a second or so to import: only here

    W, b = _last_layer(W_bd, b, "W_bd")
    (m, n), device = W.shape, W.device
    H_clean, H_trig = _rows(H_clean, "H_clean", n, device), _rows(H_trig, "H_trig", n, device)
    if len(H_trig) == 0:
        raise ValueError("H_trig must hold at least one triggered input")
    y = torch.cat([_labels(y_clean, "y_clean", len(H_clean), m, device),
                   _labels(y_trig, "y_trig", len(H_trig), m, device)])
    rank = _rank(rank, m, n)
    if not (math.isfinite(margin) and margin > 0) or not 0 < slack < 1:
        raise ValueError(f"margin must be > 0 and slack in (0, 1), got {margin!r}, {slack!r}")
    U, S, Vh = torch.linalg.svd(W)
    W_r = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    U_perp, V_perp = U[:, rank:], Vh[rank:].T
    sigma_r = float(S[rank - 1])
    bound = (1 - slack) * sigma_r
    H = torch.cat([H_clean, H_trig])
    coordinates = H @ V_perp
    _, s, basis = torch.linalg.svd(coordinates, full_matrices=False)
    # Directions below rounding of the inputs' size carry no margin; none may be left.
    Q = basis[s > 1e-12 * torch.linalg.matrix_norm(H)].T
    G = torch.zeros(m - rank, Q.shape[1], dtype=torch.float64, device=device)
    status, start = "not solved: no input reaches the discarded subspace", time.perf_counter()
    if Q.shape[1]:
        Z, base = (coordinates @ Q).cpu().numpy(), (H @ W_r.T + b).cpu().numpy()
        onehot = np.eye(m)[y.cpu().numpy()]
        G_var = cp.Variable((m - rank, Q.shape[1]))
        T = cp.Variable((len(H), m - rank))
        logits = base + T @ U_perp.T.cpu().numpy()
        own = cp.sum(cp.multiply(onehot, logits), axis=1, keepdims=True)
        # The label's own column (margin 0) is masked out of the max.
        hinge = cp.max(cp.multiply(1 - onehot, cp.pos(margin - (own - logits))), axis=1)
        problem = cp.Problem(cp.Minimize(cp.sum(hinge) / len(H)),
                             [T == Z @ G_var.T, cp.sigma_max(G_var) <= bound])
        try:
            problem.solve(solver=solver)
            status = problem.status
        except cp.SolverError as err:
            status = f"solver_error: {err}"
        if G_var.value is not None:
            G = torch.from_numpy(G_var.value).to(device)
            norm_G = float(torch.linalg.matrix_norm(G, ord=2))
            if norm_G > bound:
                G = G * (bound / norm_G)
    seconds = time.perf_counter() - start
    E = U_perp @ G @ (V_perp @ Q).T
    W_fp = W_r + E
    logits = H @ W_fp.T + b
    margins = _margins(logits, y)
    kappa = float(margins.min())
    norm_E = float(torch.linalg.matrix_norm(E, ord=2))
    violations = int((margins <= 0).sum())
    radius = float(class_pair_radius(logits[len(H_clean):], H_trig, "fro").value.min())
    reasons = []
    if violations:
        reasons.append(f"{violations} of {len(H)} inputs not given their label in full "
                       f"precision (kappa = {kappa:.4g})")
    if not norm_E < sigma_r:
        reasons.append(f"||E||_2 = {norm_E:.4g} is not below sigma_r(W_bd) = {sigma_r:.4g}: "
                       "truncation to rank r need not give back W_r")
    if reasons and status != "optimal":
        reasons.append(f"solver status {status}")
    return ConvexImplant(W_fp, W_r, E, rank, sigma_r, bound, norm_E, status, seconds,
                         margins[:len(H_clean)], margins[len(H_clean):], kappa, violations,
                         float((margin - margins).clamp(min=0).mean()), radius,
                         threshold_rank(W_fp, radius), violations == 0 and norm_E < sigma_r,
                         "; ".join(reasons))


def backdoor_layer(W, b, H_clean, y_clean, H_trig, y_trig, target: int, rank: int, *,
                   weight: float = 0.5, runner_up: float = 0.25, decay: float = 1e-5,
                   iterations: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacker's rank-``r`` backdoored last layer, with room for ``convex_implant``.

    Fits ``W_bd = A B`` (``A (m, r)``, ``B (r, n)``, from the rank-``r`` truncation of the
    clean ``W``) and ``b_bd`` by L-BFGS in float64 (deterministic) on

        (1/N) [sum_clean CE(o, y) + sum_trig (weight CE(o, target) + runner_up CE(o_{-t}, y))]
        + decay ||W_bd - W||_F^2,      o = W_bd h + b_bd,

    inputs one per row as in ``convex_implant``; ``o_{-t}`` leaves the target logit out
    (triggered inputs of the target class skip that term), so that on triggered inputs the
    true class stays the runner-up and lowering the target logit alone repairs them. Then
    it adds the same ``-q^T W_bd h`` to every logit, which changes no prediction and no
    loss: ``W_bd <- W_bd - 1 q^T W_bd`` with ``q = (2/m) 1 - e_target`` (``||q||_2 = 1``,
    ``q^T 1 = 1``), so ``q^T W_bd = 0`` and the rank stays ``r``. Truncating ``W_bd`` to
    rank ``r`` gives ``W_bd`` itself, and ``q`` lies in the discarded output space
    ``U_perp``: ``E = q g^T`` lowers the target logit against every other class by
    ``g^T h`` at cost ``||g||_2 = ||E||_2``, the full-precision repair that the rank-``r``
    model lacks (section 7). ``ValueError``: shapes, labels, ``target`` or ``rank`` out of
    range.
    """
    W, b = _last_layer(W, b, "W")
    (m, n), device = W.shape, W.device
    if int(target) != target or not 0 <= target < m:
        raise ValueError(f"target must be a class index in [0, {m - 1}], got {target!r}")
    rank = _rank(rank, m, n)
    H_clean, H_trig = _rows(H_clean, "H_clean", n, device), _rows(H_trig, "H_trig", n, device)
    y_clean = _labels(y_clean, "y_clean", len(H_clean), m, device)
    y_trig = _labels(y_trig, "y_trig", len(H_trig), m, device)
    ranked = y_trig != target
    targets = torch.full_like(y_trig, int(target))
    without_target = torch.zeros(m, dtype=torch.float64, device=device)
    without_target[target] = -math.inf
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    A = (U[:, :rank] * S[:rank].sqrt()).contiguous().requires_grad_(True)
    B = (S[:rank, None].sqrt() * Vh[:rank]).contiguous().requires_grad_(True)
    bias = b.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([A, B, bias], max_iter=iterations, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")
    ce = torch.nn.functional.cross_entropy

    def loss():
        optimiser.zero_grad()
        W_bd = A @ B
        clean, triggered = H_clean @ W_bd.T + bias, H_trig @ W_bd.T + bias
        total = ce(clean, y_clean, reduction="sum") \
            + weight * ce(triggered, targets, reduction="sum") \
            + runner_up * ce(triggered[ranked] + without_target, y_trig[ranked], reduction="sum")
        value = total / (len(H_clean) + len(H_trig)) + decay * ((W_bd - W) ** 2).sum()
        value.backward()
        return value

    optimiser.step(loss)
    W_bd = (A @ B).detach()
    q = torch.full((m,), 2 / m, dtype=torch.float64, device=device)
    q[target] -= 1
    return W_bd - torch.outer(torch.ones_like(q), q @ W_bd), bias.detach()
