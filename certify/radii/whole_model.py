"""Whole-model compression: every chosen layer compressed at once, certified by the joint
bound of THEORY.md section 10 (``certify.bounds.joint``).

Two questions, per input:

* **This compression** (``point_sets``): the change ``E_k = g(W_k) - W_k`` that was made, at
  every layer at once; the first-order term is exact, so the certificate vouches for nearly
  every input whose class does not change.
* **Every compression of this strength** (``strength_sets``): each layer's change anywhere in
  the set a compression of that level can produce: the quantiser's cells ``|E_ij| <= s_ij / 2``
  (``s`` per tensor or per row; every rounding to a grid of that step), the pruning box
  ``|E_ij| <= |W_ij|`` on the weights no larger than the largest pruned one (every pruning of
  that threshold), the Frobenius ball of the truncation error (``rank``), or ``t ||W_k||_F``
  (``relative``). ``mildest`` searches, per input, the mildest level whose set is certified:
  the sets grow with the level, so the certificate is monotone in it.

The quantiser's cells are widened for its float64 rounding: ``fl(s round(fl(W / s)))``
lies within ``s / 2 + eps (2 |W| + s / 2)`` of ``W``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.bounds.deviations import unsupported
from certify.bounds.joint import WeightSet, joint_certified, joint_trace
from certify.closed_forms.compressions import Compression, compress_matrices
from certify.closed_forms.thresholds import EPS
from certify.graph.graph import Graph
from certify.graph.inputs import InputError

MILDEST_KINDS = ("bits", "bits_per_channel", "prune_global", "relative")
MAX_SEARCH_BITS = 32
RELATIVE_PRECISION = 1e-3  # the relative budget's bisection stops at this relative width


def _cells(W: torch.Tensor, bits: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``s / 2`` widened for rounding (module docstring), ``(B, m, n)`` for bit widths
    ``bits`` ``(B,)``."""
    top = W.abs().amax(1, keepdim=True) if per_channel else W.abs().max().reshape(1, 1)
    s = top[None] / (2.0 ** (bits.to(W) - 1) - 1).reshape(-1, 1, 1)
    return s / 2 * (1 + 2 * EPS) + EPS * (2 * W.abs() + s / 2)


def _pruning_box(W: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``|W|`` where ``|W| <= threshold`` (per input, ``(B,)``), else 0: ``(B, m, n)``."""
    magnitude = W.abs()[None]
    return torch.where(magnitude <= threshold.reshape(-1, 1, 1), magnitude, 0.0)


def point_sets(network: Graph, indices, compressed) -> dict:
    """The changes ``g(W_k) - W_k`` made, as exact ``WeightSet`` points."""
    return {i: WeightSet.exact(G - network.layer(i).matrix) for i, G in zip(indices, compressed)}


def strength_sets(network: Graph, indices, compression: Compression, compressed) -> dict:
    """Every compression of ``compression``'s strength, per layer (module docstring)."""
    matrices = [network.layer(i).matrix for i in indices]
    kind, level = compression.kind, compression.level
    if kind in ("bits", "bits_per_channel"):
        return {i: WeightSet("box", _cells(W, W.new_tensor([level]), kind == "bits_per_channel")[0])
                for i, W in zip(indices, matrices)}
    if kind == "rank":
        return {i: WeightSet("ball", torch.linalg.matrix_norm(W - G) * (1 + (W.numel() + 2) * EPS))
                for i, W, G in zip(indices, matrices, compressed)}
    pruned = [torch.where(G == 0, W.abs(), 0.0) for W, G in zip(matrices, compressed)]
    if kind == "prune_global":
        pruned = [torch.stack([p.max() for p in pruned]).max()] * len(matrices)
    return {i: WeightSet("box", _pruning_box(W, p.max().reshape(1))[0])
            for i, W, p in zip(indices, matrices, pruned)}


@dataclass(frozen=True)
class WholeModel:
    """One compression of every chosen layer at once, per input ``(B,)``: ``harmless`` (this
    compression provably keeps the class) and ``strength`` (every compression of its
    strength does)."""

    harmless: torch.Tensor
    strength: torch.Tensor


def whole_model(network: Graph, x: torch.Tensor, indices, compression: Compression,
                chunk: int = 16) -> WholeModel:
    """The joint certificates of ``compression`` on ``indices`` (module docstring)."""
    compressed = compress_matrices([network.layer(i).matrix for i in indices], compression)
    points = point_sets(network, indices, compressed)
    sets = strength_sets(network, indices, compression, compressed)
    harmless, strength = [], []
    for start in range(0, len(x), chunk):
        values = network.values(x[start:start + chunk])
        t = joint_trace(network, indices, values, values[-1].argmax(-1), supports=True)
        harmless.append(joint_certified(network, t, points))
        strength.append(joint_certified(network, t, sets))
    return WholeModel(torch.cat(harmless), torch.cat(strength))


def whole_model_supported(network: Graph, layers=None) -> bool:
    """Does every node downstream of the chosen layers have the remainder rules of section
    9 (``certify.bounds.deviations.unsupported``)?"""
    return all(unsupported(network, i) is None for i in network.affine_indices
               if layers is None or network.nodes[i].name in layers)


def _search(certified, lo: int, hi: int, batch: int, device) -> torch.Tensor:
    """Per input, the largest integer ``k`` in ``[lo, hi]`` with ``certified(k)`` (a
    monotone, decreasing predicate on ``(B,)`` levels), ``lo - 1`` where none is."""
    low = torch.full((batch,), lo - 1, dtype=torch.int64, device=device)  # certified (or none)
    high = torch.full((batch,), hi + 1, dtype=torch.int64, device=device)  # failed
    while bool((high - low > 1).any()):
        mid = (low + high) // 2
        ok = certified(mid.clamp(lo, hi))
        open_ = high - low > 1
        low = torch.where(open_ & ok, mid, low)
        high = torch.where(open_ & ~ok, mid, high)
    return low


def mildest(network: Graph, x: torch.Tensor, kind: str, layers=None,
            chunk: int = 16) -> torch.Tensor:
    """Per input ``(B,)``, the mildest level of ``kind`` whose every compression of all
    ``layers`` at once (default: every affine layer) is certified (``strength_sets``):

    * ``bits``, ``bits_per_channel``: the fewest bits in ``2..MAX_SEARCH_BITS`` (``nan``:
      none);
    * ``prune_global``: the largest fraction ``k / N`` of the ``N`` weights, the ``k``
      smallest magnitudes pruned in any way (ties included), 0 when none;
    * ``relative``: the largest ``t`` (within ``RELATIVE_PRECISION``, lowered to the
      certified end) with every ``||E_k||_F <= t ||W_k||_F``.
    """
    return mildest_levels(network, x, (kind,), layers, chunk)[kind]


def mildest_levels(network: Graph, x: torch.Tensor, kinds=MILDEST_KINDS, layers=None,
                   chunk: int = 16) -> dict:
    """``mildest`` of every kind of ``kinds`` (``kind -> (B,)``), on one joint trace per
    chunk of inputs: the gradients and first-order supports serve every kind."""
    bad = [kind for kind in kinds if kind not in MILDEST_KINDS]
    if bad:
        raise InputError(f"kind must be one of {', '.join(MILDEST_KINDS)}, got {bad[0]!r}")
    indices = [i for i in network.affine_indices
               if layers is None or network.nodes[i].name in layers]
    matrices = [network.layer(i).matrix for i in indices]
    out = {kind: [] for kind in kinds}
    for start in range(0, len(x), chunk):
        values = network.values(x[start:start + chunk])
        t = joint_trace(network, indices, values, values[-1].argmax(-1), supports=True)
        for kind in kinds:
            out[kind].append(_level(network, t, indices, matrices, kind, values[0]))
    return {kind: torch.cat(parts) for kind, parts in out.items()}


def _level(network: Graph, t, indices, matrices, kind: str, x: torch.Tensor) -> torch.Tensor:
    """One chunk's mildest level of ``kind`` (``mildest``) on its joint trace ``t``."""
    B = len(x)
    if kind in ("bits", "bits_per_channel"):
        def certified(k):  # k = MAX_SEARCH_BITS + 2 - bits: fewer bits, larger k
            bits = MAX_SEARCH_BITS + 2 - k
            return joint_certified(network, t, {
                i: WeightSet("box", _cells(W, bits, kind == "bits_per_channel"))
                for i, W in zip(indices, matrices)})
        k = _search(certified, 2, MAX_SEARCH_BITS, B, x.device)
        bits = (MAX_SEARCH_BITS + 2 - k).to(torch.float64)
        return torch.where(k >= 2, bits, math.nan)
    if kind == "prune_global":
        magnitudes = torch.sort(torch.cat([W.abs().flatten() for W in matrices])).values
        N = len(magnitudes)

        def certified(k):
            threshold = torch.where(k > 0, magnitudes[(k - 1).clamp(min=0)], -1.0)
            return joint_certified(network, t, {
                i: WeightSet("box", _pruning_box(W, threshold))
                for i, W in zip(indices, matrices)})
        return _search(certified, 1, N, B, x.device).clamp(min=0) / N
    sizes = [torch.linalg.matrix_norm(W) for W in matrices]

    def certified_at(r):
        return joint_certified(network, t, {i: WeightSet("ball", r * s)
                                            for i, s in zip(indices, sizes)})
    return _bisect(certified_at, B, x)


def _bisect(certified, batch: int, like: torch.Tensor) -> torch.Tensor:
    """The largest ``t`` found with ``certified(t)`` per input: octaves from 1 (up to
    ``2^60``), then bisection to ``RELATIVE_PRECISION``; 0 where no ``t >= 2^-60`` is."""
    lo = like.new_zeros(batch)
    hi = like.new_full((batch,), math.inf)
    t = like.new_ones(batch)
    for _ in range(60):
        ok = certified(t)
        lo, hi = torch.where(ok, torch.maximum(lo, t), lo), torch.where(ok, hi, torch.minimum(hi, t))
        if not bool(((lo == 0) | torch.isinf(hi)).any()):
            break
        t = torch.where(torch.isinf(hi), 2 * t, torch.where(lo == 0, t / 2, lo))
    while True:
        open_ = (lo > 0) & torch.isfinite(hi) & (hi - lo > RELATIVE_PRECISION * hi)
        if not bool(open_.any()):
            return lo
        mid = torch.where(open_, (lo + hi) / 2, lo)
        ok = certified(mid)
        lo = torch.where(open_ & ok, mid, lo)
        hi = torch.where(open_ & ~ok, mid, hi)
