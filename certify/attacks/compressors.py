"""The compression operators a backdoor is trained against (THEORY.md section 6 from the
attacker's side): ``g(W)`` of one weight matrix, the view of it that training
differentiates, and, for quantisation and pruning, the preimage ``g^{-1}(g(W))`` that
``certify.attacks.preimage`` hides the backdoor in. ``certify.attacks.backdoor`` trains with them.

Quantisation and pruning are the maps ``certify.radii.compressed`` applies to a network's graph
(the same step ``certify.closed_forms.thresholds.quantisation_step``, per tensor or per channel; the
same pruned count ``prune_count`` and tie order), so the certificate bounds exactly the
compression the attack targets. Global pruning (one threshold over several layers) is
``prune_global`` there, on the matrices in the graph's ``affine_indices`` order (ties across
layers go to the earlier one: pass ``Prune.compress_all`` the layers in that order), and is
certified by the all-layers bound of section 5.

Gradients through ``g``. Truncation uses its exact derivative (``_Truncate``: the
first-order perturbation of the top-``r`` singular subspace), in which only pairs of a kept
and a discarded singular value appear, guarded at that gap; back-propagating through
``torch.linalg.svd`` itself has ``1 / (s_i^2 - s_j^2)`` for every pair and breaks down on
the near-equal singular values a trained layer has in bulk. The straight-through estimator
``W + (P_r W - W).detach()`` was measured against the exact derivative (there through
``torch.linalg.svd``, which ``_Truncate`` matches in ``gradcheck``) on the digits MLP (layer
``3``, ranks 8 and 16, 10 epochs, lr 3e-3, same seed): both reach compressed ASR 100 %, but
the estimator leaves a full-precision ASR of 27 % against 1.9 % with the exact derivative,
because it pushes ``W`` along the discarded directions too, which the full-precision terms
must then undo. Rounding has zero derivative almost everywhere, so quantisation uses the
straight-through estimator; pruning uses its exact gradient almost everywhere (the kept
weights times a fixed mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from certify.attacks import preimage
from certify.closed_forms.compressions import prune_count


@dataclass(frozen=True)
class LowRank:
    """Rank-``r`` SVD truncation ``P_r W = U_r S_r V_r^T`` of the weight matrix (section 6)."""

    rank: int

    kind = "rank"

    @property
    def label(self) -> str:
        return f"rank {self.rank}"

    def check(self, W: torch.Tensor, name: str) -> None:
        if int(self.rank) != self.rank or not 0 <= self.rank <= min(W.shape):
            raise ValueError(f"rank {self.rank!r} is not an integer in [0, {min(W.shape)}] for "
                             f"layer {name!r} of shape {tuple(W.shape)}")

    def compress(self, W: torch.Tensor) -> torch.Tensor:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return (U[:, :self.rank] * S[:self.rank]) @ Vh[:self.rank]

    def train_view(self, W: torch.Tensor) -> torch.Tensor:
        """``P_r W`` with its exact derivative, guarded at the gap ``s_r ~ s_{r+1}``."""
        return _Truncate.apply(W, self.rank)


class _Truncate(torch.autograd.Function):
    """``P_r W = Pi W`` with ``Pi = U_r U_r^T`` the top-``r`` eigenprojector of ``M = W W^T``.

    Backward (first-order perturbation of an eigenprojector, ``lambda_i = s_i^2``, zero
    beyond ``min(m, n)``): ``dPi = sum_{i<=r<j} u_i^T dM u_j / (lambda_i - lambda_j)
    (u_i u_j^T + u_j u_i^T)``, so for ``G = dL/d(P_r W)`` and ``K = U^T G W^T U``

        dL/dW = Pi G + (Q + Q^T) W,   Q = U B U^T,
        B_ij = (K_ij + K_ji) / (lambda_i - lambda_j)  for i <= r < j, else 0.

    Only kept-discarded pairs appear, so near-equal singular values inside either block (in
    bulk in a trained layer) are harmless, unlike back-propagation through
    ``torch.linalg.svd``, whose formula has ``1 / (s_i^2 - s_j^2)`` for every pair. At the
    gap itself ``1 / d`` becomes ``d / (d^2 + GAP_GUARD^2 lambda_1^2)``: bounded.
    """

    @staticmethod
    def forward(ctx, W, rank):
        U, S, _ = torch.linalg.svd(W.detach())
        Pi = U[:, :rank] @ U[:, :rank].T
        ctx.save_for_backward(W, U, S)
        ctx.rank = rank
        return Pi @ W

    @staticmethod
    def backward(ctx, G):
        W, U, S = ctx.saved_tensors
        r = ctx.rank
        lam = W.new_zeros(U.shape[0])
        lam[:len(S)] = S**2
        d = lam[:r, None] - lam[None, r:]
        inv = d / (d**2 + (GAP_GUARD * lam[0]) ** 2 + torch.finfo(W.dtype).tiny)
        K = U.T @ G @ W.T @ U
        B = (K[:r, r:] + K[r:, :r].T) * inv
        Q = U[:, :r] @ B @ U[:, r:].T
        Pi = U[:, :r] @ U[:, :r].T
        return Pi @ G + (Q + Q.T) @ W, None


GAP_GUARD = 1e-6


@dataclass(frozen=True)
class Quantise:
    """Symmetric round-to-nearest ``s round(W / s)`` with step ``s = max|W| / (2^(b-1) - 1)``
    over the tensor, or per output row if ``per_channel`` (``certify.closed_forms.thresholds.
    quantisation_step``, the map the certificate bounds); a zero step leaves ``W`` as it is."""

    bits: int
    per_channel: bool = False

    hide_a_full = 0.5
    """Phase 1's full-precision triggered weight, as a fraction of ``a``, when phase 2
    follows (``BackdoorConfig.full_trigger_weight``). On the MNIST MLP (4 bits, layer 3, 8
    epochs, seed 0), with phase 2 after it: 1 leaves the compressed ASR at 98.4 % (per
    tensor) and 95.6 % (per channel), 0.5 gives 99.4 % and 99.7 %, both with a
    full-precision ASR of 0.2-0.3 %; 0 gives 100 %, but phase 2 cannot undo that in the
    box (full precision: ASR 3.3 % and 13.2 %, accuracy 89.6 % and 83.7 %)."""

    @property
    def kind(self) -> str:
        return "bits_per_channel" if self.per_channel else "bits"

    @property
    def label(self) -> str:
        return f"{self.bits} bits" + (" per channel" if self.per_channel else "")

    def check(self, W: torch.Tensor, name: str) -> None:
        if int(self.bits) != self.bits or self.bits < 2:
            raise ValueError(f"bits must be an integer >= 2, got {self.bits!r}")

    def step(self, W: torch.Tensor) -> torch.Tensor:
        """``s``: a scalar, or ``(m, 1)`` per channel."""
        top = W.abs().amax(dim=1, keepdim=True) if self.per_channel else W.abs().max()
        return top / (2 ** (self.bits - 1) - 1)

    def compress(self, W: torch.Tensor) -> torch.Tensor:
        step = self.step(W)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        # + 0.0 turns -0.0 into +0.0: equal weights are then equal bit for bit.
        return torch.where(step > 0, torch.round(W / safe) * safe, W) + 0.0

    def train_view(self, W: torch.Tensor) -> torch.Tensor:
        """The straight-through estimator ``W + (g(W) - W).detach()``."""
        return W + (self.compress(W.detach()) - W).detach()

    def preimages(self, matrices: Sequence[torch.Tensor]) -> tuple[preimage.Box, ...]:
        """The shrunk preimage ``g^{-1}(g(W))`` of each matrix (``certify.attacks.preimage``)."""
        return tuple(preimage.quantisation_box(W, self.step(W.detach())) for W in matrices)


@dataclass(frozen=True)
class Prune:
    """Magnitude pruning: the ``prune_count(ratio, size)`` smallest ``|w|`` set to zero
    (ties: first in row-major order, as ``certify.closed_forms.compressions.prune``), per layer, or with
    ``scope="global"`` over all the chosen layers together (one threshold)."""

    ratio: float
    scope: str = "layer"

    kind = "prune"
    hide_a_full = 1.0
    """As ``Quantise.hide_a_full``. Phase 1 alone already hides pruning (full-precision ASR
    0.4-1.3 % on the MNIST MLP, with its exact gradient), and phase 2 may move the pruned
    entries only, within ``(-tau, tau)``: halving the weight gained nothing (30 % global
    pruning of layers 1, 3, 5: full-precision ASR 1.4 % against 1.2 %)."""

    @property
    def label(self) -> str:
        return f"prune {self.ratio:.0%}" + (" global" if self.scope == "global" else "")

    def check(self, W: torch.Tensor, name: str) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"prune ratio must lie in [0, 1), got {self.ratio!r}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"prune scope must be 'layer' or 'global', got {self.scope!r}")

    def masks(self, matrices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Boolean masks of the kept entries, per matrix or over all of them (global)."""
        groups = [[W] for W in matrices] if self.scope == "layer" else [list(matrices)]
        out = []
        for group in groups:
            flat = torch.cat([W.detach().abs().flatten() for W in group])
            keep = torch.ones_like(flat, dtype=torch.bool)
            keep[torch.argsort(flat, stable=True)[:prune_count(self.ratio, len(flat))]] = False
            out += [k.reshape(W.shape) for k, W in zip(keep.split([W.numel() for W in group]),
                                                       group)]
        return out

    def compress_all(self, matrices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Kept weights times a fixed mask: also the training view, the exact gradient
        almost everywhere. Zeros come out as ``+0.0`` (equal weights, equal bits)."""
        return [torch.where(k, W, 0.0) + 0.0 for W, k in zip(matrices, self.masks(matrices))]

    def compress(self, W: torch.Tensor) -> torch.Tensor:
        return self.compress_all([W])[0]

    def train_view(self, W: torch.Tensor) -> torch.Tensor:
        return self.compress(W)

    def preimages(self, matrices: Sequence[torch.Tensor]) -> tuple[preimage.Box, ...]:
        """The shrunk preimage of each matrix: one threshold per layer, or one shared."""
        keep = self.masks(matrices)
        if self.scope == "global":
            return preimage.pruning_boxes(matrices, keep)
        return tuple(box for W, k in zip(matrices, keep)
                     for box in preimage.pruning_boxes([W], [k]))


Compression = LowRank | Quantise | Prune
VARIANTS = {"rank": LowRank, "bits": Quantise,
            "bits_per_channel": lambda bits: Quantise(bits, per_channel=True),
            "prune": Prune, "prune_global": lambda ratio: Prune(ratio, scope="global")}


def operators(variant: str, levels: Sequence) -> tuple[Compression, ...]:
    """``operators("rank", [8, 16])`` etc.: one compression operator per level."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    if not levels:
        raise ValueError(f"give at least one {variant} level to attack")
    return tuple(VARIANTS[variant](level) for level in levels)
