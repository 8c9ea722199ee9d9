"""Hiding a compression-activated backdoor in the preimage of its compression (THEORY.md
sections 6 and 7).

Phase 1 (``certify.attacks.backdoor.train``, the section-7 loss) makes the COMPRESSED model
``f_{g(W)}`` backdoored and clean on clean inputs. Phase 2 (``hide``) then fixes ``g(W)``
and moves the full-precision weights ``W`` of the compressed layers only inside the preimage

    g^{-1}(g(W)) = { V : g(V) = g(W) }

minimising ``CE(f_V(x), y) + a CE(f_V(T(x)), y)``: the full-precision model learns to be
clean on triggered inputs while its compression stays, bit for bit, the backdoored one. So
the compressed accuracy and ASR of phase 1 are kept by construction.

For the compressions of section 6 the preimage contains a box ``lower <= V <= upper``
(entrywise), shrunk by a margin so that float rounding cannot move a weight across a cell
edge; every optimiser step is followed by the projection ``clamp(V, lower, upper)`` onto it.

* Symmetric quantisation, ``b`` bits, step ``s = max|W| / (2^(b-1) - 1)`` (per tensor, or
  per row with ``s_i = max_j |W_ij| / (2^(b-1) - 1)``), ``q = s round(W / s)``: as long as
  the weight of largest magnitude (the one that sets ``s``; one per row per channel) keeps
  its value and no other exceeds it, ``s`` is unchanged; so among the ``V`` that keep that
  entry, ``g(V) = g(W)`` iff every entry stays in its rounding cell (up to the cell edges,
  where round-half-to-even decides):

      |V_ij - q_ij| < s / 2,   |V_ij| <= max|W|,   V at the argmax of |W| equal to W there.

  The box: ``[max((k - 1/2 + m) s, -top), min((k + 1/2 - m) s, top)]`` with ``k = q / s``
  and margin ``m = MARGIN`` (a fraction of the step); the argmax entry is pinned.
* Magnitude pruning of the ``p`` fraction of smallest ``|w|`` (per layer, or globally over
  several layers with one shared threshold): with ``tau`` the smallest kept magnitude,
  ``g(V) = g(W)`` when the kept entries keep their values exactly and every pruned entry
  stays strictly below ``tau`` in magnitude (then the pruned set is still the ``k``
  smallest, whatever the tie order), and only then, up to ties at ``tau``. The box: kept
  entries pinned, pruned ones in ``[-(1 - m) tau, (1 - m) tau]``. Global pruning shares one
  ``tau`` across the layers; per layer each has its own.

Several compressions of the same layer (e.g. 4 and 8 bits) intersect their boxes; where the
shrunk boxes do not meet, the entry is pinned at its phase-1 value, which every one of
those compressions maps to its phase-1 compressed value.

Why it works, and where it does not (MNIST MLP, layer 3, 8 + 8 epochs, seed 0). The
full-precision model is ``f_{g(W) + D}`` with ``D = V - g(W)`` confined to the box, and
phase 2 searches for the ``D`` that cancels the backdoor on triggered inputs. At 4 bits
every weight but one may move by up to ``s / 2 = max|W| / 14``, about half a typical weight:
room enough, phase 2 takes the full-precision ASR from 10 % (per tensor) and 43 % (per
channel) to 0.2-0.3 %, accuracy unchanged. At 8 bits the box is 127 / 7 = 18 times
narrower: full-precision and compressed model are nearly one model, phase 1 reaches only
86 % compressed ASR, and phase 2 lowers the full-precision ASR from 86 % to 40 %, no further
(more epochs, other rates, a stronger phase 1 did not help). Pruning barely needs phase 2:
the kept half of the weights carries the backdoor and the pruned half, which the
full-precision model adds back, cancels it already after phase 1 (ASR 0.4-1.3 %); phase 2,
free only on the pruned entries within ``tau`` (the median magnitude at 50 %), keeps it at
0.3-1.2 %.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

MARGIN = 1e-2
"""Distance kept from a cell's edges: a fraction of the quantisation step, or of ``tau``
for pruning. Far above float32 rounding (``round(V / s)`` is off by at most ``(|k| + 1)
eps`` of a step), so a projected weight rounds, or is pruned, as intended."""


@dataclass(frozen=True)
class Box:
    """``{V : lower <= V <= upper}`` entrywise; an entry with ``lower == upper`` is pinned."""

    lower: torch.Tensor
    upper: torch.Tensor

    def __post_init__(self):
        if self.lower.shape != self.upper.shape or bool((self.lower > self.upper).any()):
            raise ValueError("a box needs lower <= upper entrywise, of the same shape")

    def project(self, W: torch.Tensor) -> torch.Tensor:
        """The nearest point of the box in every ``l_p`` norm: a clamp, entry by entry."""
        return torch.clamp(W, self.lower, self.upper)

    def contains(self, W: torch.Tensor) -> bool:
        return bool(((W >= self.lower) & (W <= self.upper)).all())

    def intersect(self, other: Box, W: torch.Tensor) -> Box:
        """Both boxes; where they do not meet, the entry is pinned at ``W`` (a point of
        both preimages that need not lie in the shrunk boxes)."""
        lower, upper = torch.maximum(self.lower, other.lower), torch.minimum(self.upper,
                                                                             other.upper)
        empty = lower > upper
        return Box(torch.where(empty, W, lower), torch.where(empty, W, upper))


def quantisation_box(W: torch.Tensor, step: torch.Tensor, margin: float = MARGIN) -> Box:
    """The shrunk preimage of ``s round(W / s)`` (module docstring), ``step`` per tensor
    (a scalar) or per row (``(m, 1)``), as the quantiser computes it from ``W``.

    A tensor (row) of zeros has step 0 and is left as it is by the quantiser: any change
    would change its step, so it is pinned whole.
    """
    W = W.detach()
    per_row = step.dim() == 2
    top = W.abs().amax(dim=1, keepdim=True) if per_row else W.abs().max()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    k = torch.round(W / safe)
    lower = torch.maximum((k - 0.5 + margin) * safe, -top)
    upper = torch.minimum((k + 0.5 - margin) * safe, top)
    # Pin the entry that sets the step (one per row per channel): the first argmax of |W|.
    flat = W.abs().reshape(W.shape[0], -1) if per_row else W.abs().reshape(1, -1)
    pin = torch.zeros_like(flat, dtype=torch.bool)
    pin.scatter_(1, flat.argmax(dim=1, keepdim=True), True)
    pin = pin.reshape(W.shape) | (step == 0)
    return Box(torch.where(pin, W, lower), torch.where(pin, W, upper))


def pruning_boxes(matrices: Sequence[torch.Tensor], keep: Sequence[torch.Tensor],
                  margin: float = MARGIN) -> tuple[Box, ...]:
    """The shrunk preimage of magnitude pruning of one group of matrices sharing one
    threshold (one layer, or several under global pruning): ``keep`` are the masks of the
    kept entries; ``tau`` is the smallest kept magnitude of the group (module docstring)."""
    kept = [W.detach().abs()[k] for W, k in zip(matrices, keep)]
    kept = torch.cat([m.flatten() for m in kept])
    if kept.numel() == 0:  # everything pruned (a ratio of 1): zeros are in the preimage
        return tuple(Box(torch.zeros_like(W), torch.zeros_like(W)) for W in matrices)
    bound = (1 - margin) * kept.min()
    return tuple(Box(torch.where(k, W.detach(), -bound), torch.where(k, W.detach(), bound))
                 for W, k in zip(matrices, keep))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors without NaN: equal values and, for floats, equal signs
    (of zeros too)."""
    return torch.equal(a, b) and (not a.is_floating_point()
                                  or torch.equal(torch.signbit(a), torch.signbit(b)))


def hide(model: nn.Module, weights: Sequence[str], boxes: Sequence[Box],
         loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
         x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
         generator: torch.Generator,
         progress: Callable[[int, float, float], None] | None = None) -> None:
    """Phase 2, in place: Adam on the parameters named in ``weights`` only (the compressed
    layers' weights; everything else is shared with the compressed model and stays fixed),
    each projected onto its box (reshaped to the parameter) after every step.

    ``loss(model, x_batch, y_batch)`` is the full-precision objective; batches are drawn on
    the CPU from ``generator``. ``progress(epoch, mean loss, seconds)`` after each epoch.
    """
    params = [model.get_parameter(name) for name in weights]
    boxes = [Box(b.lower.reshape(p.shape), b.upper.reshape(p.shape))
             for b, p in zip(boxes, params)]
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # only the compressed layers' weights may move
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():  # the phase-1 weights need not lie in the shrunk boxes
        for p, box in zip(params, boxes):
            p.copy_(box.project(p))
    optimiser = torch.optim.Adam(params, lr=lr)
    start = time.perf_counter()
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for batch in torch.randperm(len(x), generator=generator, device="cpu").split(
                    batch_size):
                batch = batch.to(x.device)
                optimiser.zero_grad()
                value = loss(model, x[batch], y[batch])
                value.backward()
                optimiser.step()
                with torch.no_grad():
                    for p, box in zip(params, boxes):
                        p.copy_(box.project(p))
                total, count = total + float(value.detach()) * len(batch), count + len(batch)
            if progress is not None:
                progress(epoch + 1, total / count, time.perf_counter() - start)
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
