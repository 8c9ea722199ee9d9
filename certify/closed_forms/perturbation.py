"""Minimal-norm weight perturbations of one layer: THEORY.md sections 1 to 3.

Validated, batched entry points over the generated kernels of ``certify.closed_forms.kernels``.
Everything is computed in float64. A norm is named by a string:

====================  =============================================
``"fro"``             Frobenius norm
``"spectral"``        spectral norm (largest singular value)
``"max"``             entrywise max, ``max |D_ik|``
``"sum"``             entrywise sum, ``sum |D_ik|``
a number ``p > 1``    entrywise ``l_p`` (``2`` is ``"fro"``, ``inf`` is ``"max"``)
====================  =============================================
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from certify.closed_forms import kernels

NORMS = ("fro", "spectral", "max", "sum")


@dataclass(frozen=True)
class MinimalPerturbation:
    """A minimal-norm perturbation ``D`` and its norm, for a batch of problems.

    ``value`` has the batch shape; ``minimiser`` has the batch shape followed by the
    weight shape ``(m, n)`` (``(m, n + 1)`` with a perturbed bias: the last column is the
    change of the bias).
    """

    value: torch.Tensor
    minimiser: torch.Tensor
    norm: str


def canonical_norm(norm: str | float) -> tuple[str, float | None]:
    """Map a user's norm name to ``(kernel name, p)``; ``p`` is set only for ``"lp"``."""
    if isinstance(norm, str):
        if norm in NORMS:
            return norm, None
        raise ValueError(
            f"unknown norm {norm!r}: use one of {', '.join(map(repr, NORMS))} or a number "
            "p >= 1 for the entrywise l_p norm"
        )
    if isinstance(norm, numbers.Real) and not isinstance(norm, (bool, np.bool_)):
        p = float(norm)
        if p == 1.0:
            return "sum", None
        if p == 2.0:
            return "fro", None
        if p == math.inf:
            return "max", None
        if p > 1.0 and math.isfinite(p):
            return "lp", p
    raise ValueError(
        f"unknown norm {norm!r}: use one of {', '.join(map(repr, NORMS))} or a number p >= 1 "
        "for the entrywise l_p norm (1 is 'sum', 2 is 'fro', inf is 'max')"
    )


def as_float64(x, name: str) -> torch.Tensor:
    """Convert an array or tensor to float64, rejecting NaN, Inf and non-numeric data."""
    try:  # a tensor stays where it is; arrays and lists have no device (the CPU)
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numeric array or tensor: {err}") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    t = t.detach().to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf; remove or repair those entries")
    return t


def _vector(x, name: str) -> torch.Tensor:
    t = as_float64(x, name)
    if t.ndim == 0 or t.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., k) with k >= 1, got {tuple(t.shape)}")
    return t


def _common_batch(*vectors: torch.Tensor, scalar: torch.Tensor | None = None):
    """Broadcast the batch dimensions of vectors ``(..., k)`` and an optional scalar ``(...)``."""
    shapes = [t.shape[:-1] for t in vectors] + ([] if scalar is None else [scalar.shape])
    try:  # numpy's, not torch's: torch.broadcast_shapes imports sympy on first use
        batch = np.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"batch shapes {[tuple(s) for s in shapes]} do not broadcast") from None
    out = [t.expand(*batch, t.shape[-1]) for t in vectors]
    return out if scalar is None else (*out, scalar.expand(batch))


def _zero_rows(t: torch.Tensor) -> torch.Tensor:
    return (t == 0).all(dim=-1)


def _require_feasible(infeasible: torch.Tensor, why: str) -> None:
    if infeasible.any():
        where = torch.nonzero(infeasible).tolist()[:5]
        raise ValueError(f"infeasible at batch index {where}: {why}")


def power_of_two_scale(t: torch.Tensor) -> torch.Tensor:
    """``2^round(log2 max|t|)`` per batch entry (``1`` for zero rows): exact to divide by."""
    peak = t.abs().amax(dim=-1)
    exponent = torch.round(torch.log2(torch.where(peak > 0, peak, torch.ones_like(peak))))
    return torch.exp2(exponent)


def _rank_one(kernel, args, safe_vectors, zero, norm_name, p):
    """Run a rank-one kernel where its inputs are nonzero; the solution is 0 elsewhere.

    Each vector is first divided by a power of two near its largest entry, and the solution
    multiplied back: every problem here has a minimiser of degree +1 in the row-side vector
    and -1 in ``h``, so this changes no bit of the answer but keeps squared norms (``||h||^2``
    in the Frobenius minimiser) from overflowing or underflowing at extreme scales.
    """
    safe = [torch.where(zero[..., None], torch.ones_like(t), t) for t in safe_vectors] \
        if zero.any() else list(safe_vectors)
    row_scale, col_scale = (power_of_two_scale(t) for t in safe)
    safe = [safe[0] / row_scale[..., None], safe[1] / col_scale[..., None]]
    value, minimiser = kernel(*safe, *args, *(() if p is None else (p,)))
    # Section 1 (D h = r): degree +1 in r. Section 3 (<D, c h^T> = -m): degree -1 in c.
    factor = (row_scale if not args else 1 / row_scale) / col_scale
    value = value * factor
    minimiser = minimiser * factor[..., None, None]
    if zero.any():  # full-size copies only when some problem is trivial
        value = torch.where(zero, torch.zeros_like(value), value)
        minimiser = torch.where(zero[..., None, None], torch.zeros_like(minimiser), minimiser)
    return MinimalPerturbation(value, minimiser, norm_name)


def target_change(r, h, norm: str | float = "fro", *, bias: bool = False) -> MinimalPerturbation:
    """Smallest ``D`` with ``D h = r`` (THEORY.md section 1).

    ==========  ==============================  =====================
    norm        minimiser ``D*``                value
    ==========  ==============================  =====================
    fro, spec.  ``r h^T / ||h||_2^2``            ``||r||_2 / ||h||_2``
    max         ``r sign(h)^T / ||h||_1``        ``||r||_inf / ||h||_1``
    sum         ``r e_k^T / h_k``, k = argmax    ``||r||_1 / ||h||_inf``
    l_p         ``r (sign(h)|h|^(q-1))^T/||h||_q^q``  ``||r||_p / ||h||_q``
    ==========  ==============================  =====================

    ``r`` has shape ``(..., m)``, ``h`` shape ``(..., n)``. With ``bias=True`` the bias is
    perturbed too: ``h`` is replaced by ``[h; 1]``. ``h = 0`` with ``r != 0`` is infeasible
    and raises ``ValueError``; ``r = 0`` gives ``D* = 0``.
    """
    name, p = canonical_norm(norm)
    r, h = _vector(r, "r"), _vector(h, "h")
    if bias:
        h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
    r, h = _common_batch(r, h)
    zero_h = _zero_rows(h)
    _require_feasible(zero_h & ~_zero_rows(r), "h = 0 but r != 0: no weight change moves z")
    kernel = getattr(kernels, f"target_change_{name}")
    return _rank_one(kernel, (), [r, h], zero_h | _zero_rows(r), norm_name(norm), p)


def margin_functional(c, h, m, norm: str | float = "fro", *, bias: bool = False) -> MinimalPerturbation:
    """Smallest ``D`` with ``<D, c h^T> = -m`` (THEORY.md section 3).

    The value is ``|m| / ||c h^T||_dual``: ``|m| / (||c||_2 ||h||_2)`` for Frobenius and
    spectral, ``|m| / (||c||_1 ||h||_1)`` for entrywise max, ``|m| / (||c||_inf ||h||_inf)``
    for entrywise sum, ``|m| / (||c||_q ||h||_q)`` for entrywise ``l_p``.

    ``c`` has shape ``(..., m)``, ``h`` ``(..., n)``, ``m`` the batch shape. ``c h^T = 0``
    with ``m != 0`` is infeasible (``ValueError``); ``m = 0`` gives ``D* = 0``.
    """
    name, p = canonical_norm(norm)
    c, h = _vector(c, "c"), _vector(h, "h")
    m = as_float64(m, "m")
    if bias:
        h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
    c, h, m = _common_batch(c, h, scalar=m)
    zero_g = _zero_rows(c) | _zero_rows(h)
    _require_feasible(zero_g & (m != 0), "c h^T = 0 but m != 0: the functional cannot move")
    kernel = getattr(kernels, f"margin_functional_{name}")
    zero = zero_g | (m == 0)
    safe_m = torch.where(zero, torch.ones_like(m), m)
    return _rank_one(kernel, (safe_m,), [c, h], zero, norm_name(norm), p)


def norm_name(norm: str | float) -> str:
    """Printable name of a norm: ``"fro"``, ``"max"``, ..., or ``"l3.0"``."""
    name, p = canonical_norm(norm)
    return name if p is None else f"l{p}"


@dataclass(frozen=True)
class ClassPairRadius:
    """Exact last-layer weight radius of each input (THEORY.md section 3).

    ``value[b]`` is the smallest ``||D||`` of a last-layer change that makes some class tie
    with the predicted one; ``runner_up[b]`` is the class it ties with; ``minimiser[b]``
    is such a ``D``. ``margin[b, j] = o_y - o_j`` (``+inf`` at ``j = y``).
    """

    value: torch.Tensor
    runner_up: torch.Tensor
    predicted: torch.Tensor
    margin: torch.Tensor
    minimiser: torch.Tensor
    norm: str


def class_pair_radius(logits, h, norm: str | float = "fro", *, bias: bool = False) -> ClassPairRadius:
    """Exact last-layer radius ``min_j m_j / (||e_y - e_j||_dual ||h||_dual)``.

    Frobenius and spectral: ``min_j m_j / (sqrt(2) ||h||_2)``; entrywise max:
    ``min_j m_j / (2 ||h||_1)``; entrywise sum: ``min_j m_j / ||h||_inf``; entrywise
    ``l_p``: ``min_j m_j / (2^(1/q) ||h||_q)``. ``logits (..., C)`` with ``C >= 2`` and
    ``h (..., n)`` the input of the last layer (``o = W h + b``).
    """
    name, p = canonical_norm(norm)
    logits, h = _vector(logits, "logits"), _vector(h, "h")
    if logits.shape[-1] < 2:
        raise ValueError(f"logits need at least 2 classes, got shape {tuple(logits.shape)}")
    if logits.shape[:-1] != h.shape[:-1]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and h {tuple(h.shape)} must share the batch shape"
        )
    if bias:
        h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
    predicted = logits.argmax(dim=-1)
    margin = logits.gather(-1, predicted[..., None]) - logits
    margin = margin.scatter(-1, predicted[..., None], math.inf)
    runner_up = margin.argmin(dim=-1)
    m = margin.gather(-1, runner_up[..., None])[..., 0]
    c = torch.nn.functional.one_hot(predicted, logits.shape[-1]).to(h) - torch.nn.functional.one_hot(
        runner_up, logits.shape[-1]
    ).to(h)
    # h = 0: the output is the bias alone, which no weight change moves (radius inf).
    zero_h = _zero_rows(h)
    safe_h = torch.where(zero_h[..., None], torch.ones_like(h), h)
    minimiser = margin_functional(c, safe_h, m, norm).minimiser
    minimiser = torch.where(zero_h[..., None, None], torch.zeros_like(minimiser), minimiser)
    pair = getattr(kernels, f"class_pair_{name}")
    scale = power_of_two_scale(safe_h)  # the value has degree -1 in h: see _rank_one
    value = pair(m, safe_h / scale[..., None], *(() if p is None else (p,))) / scale
    value = torch.where(zero_h, torch.full_like(value, math.inf), value)
    value = torch.where(m == 0, torch.zeros_like(value), value)  # already tied: radius 0
    return ClassPairRadius(value, runner_up, predicted, margin, minimiser, norm_name(norm))


def batch_target_change(R, H, norm: str = "fro", *, rtol: float | None = None) -> MinimalPerturbation:
    """Smallest ``D`` with ``D H = R`` for a whole batch of columns (THEORY.md section 2).

    ``D* = R H^+`` minimises both the Frobenius and the spectral norm; the value is
    ``||R H^+||_F`` or ``||R H^+||_2``. Feasible iff ``R H^+ H = R``, checked to relative
    tolerance ``rtol`` (default ``1e-8``) of ``||R||_F``; otherwise ``ValueError``.
    ``R (..., m, N)``, ``H (..., n, N)``. Entrywise norms have no closed form here (they
    decouple by rows into linear programs) and are rejected.
    """
    if not isinstance(norm, str):  # an exponent: 2 is "fro"
        norm = canonical_norm(norm)[0]
    if norm not in ("fro", "spectral"):
        raise ValueError(
            f"batch_target_change supports 'fro' and 'spectral', got {norm!r}: entrywise "
            "norms of D H = R are linear programs without a closed form"
        )
    R, H = as_float64(R, "R"), as_float64(H, "H")
    if R.ndim < 2 or H.ndim < 2 or R.shape[-1] != H.shape[-1]:
        raise ValueError(
            f"R must be (..., m, N) and H (..., n, N) with the same N, got "
            f"{tuple(R.shape)} and {tuple(H.shape)}"
        )
    try:
        np.broadcast_shapes(R.shape[:-2], H.shape[:-2])
    except ValueError:
        raise ValueError(
            f"batch shapes {tuple(R.shape[:-2])} of R and {tuple(H.shape[:-2])} of H do not "
            "broadcast"
        ) from None
    # D* = R H^+ has degree +1 in R and -1 in H: solve for R and H divided by powers of two
    # near their largest entries (exact), so no square over- or underflows, and scale back.
    r_scale = power_of_two_scale(R.flatten(-2))[..., None, None]
    h_scale = power_of_two_scale(H.flatten(-2))[..., None, None]
    R, H = R / r_scale, H / h_scale
    # H^+ = V S^+ U^T from the thin SVD (cut-off as torch.linalg.pinv's default), so that
    # ||D*||_2 = ||R V S^+||_2 needs only an m x N SVD (U has orthonormal columns).
    U, S, Vh = torch.linalg.svd(H, full_matrices=False)
    cutoff = max(H.shape[-2:]) * torch.finfo(H.dtype).eps * S[..., :1]
    S_pinv = torch.where(S > cutoff, 1 / torch.where(S > 0, S, torch.ones_like(S)),
                         torch.zeros_like(S))
    RVS = (R @ Vh.mT) * S_pinv[..., None, :]
    D = kernels.batch_minimiser(R, (Vh.mT * S_pinv[..., None, :]) @ U.mT)
    residual = torch.linalg.matrix_norm(D @ H - R)
    tol = 1e-8 if rtol is None else rtol
    _require_feasible(
        residual > tol * torch.linalg.matrix_norm(R),
        "R is not in the row space of H (R H^+ H != R): no D satisfies D H = R",
    )
    factor = r_scale / h_scale
    value = torch.linalg.matrix_norm(RVS, ord="fro" if norm == "fro" else 2) * factor[..., 0, 0]
    D = D * factor
    return MinimalPerturbation(value, D, norm)
