"""The compressions certify knows (THEORY.md section 6): what a user writes,
``KIND=LEVEL[@LAYER,LAYER...]`` (``Compression``, ``parse_compression``), and what
each does to a weight matrix, ``g(W)``:

======================  =================================================================
kind                    ``g(W)`` (``W`` the ``m x n`` matrix; a kernel as ``c_out x c_in k k``)
======================  =================================================================
``rank=r``              SVD truncation ``U_r S_r V_r^T``; ``r >= min(m, n)`` is the identity
``bits=b``              ``s round(W / s)``, ``s = max|W| / (2^(b-1) - 1)`` over the tensor
``bits_per_channel=b``  the same with ``s`` per output row
``prune=p``             the ``floor(p m n)`` smallest magnitudes set to zero (``prune_count``)
``prune_global=p``      one threshold over all the chosen layers: their matrices flattened
                        row-major and concatenated in ``affine_indices`` order, the
                        ``prune_count(p, N)`` smallest of the ``N`` magnitudes set to zero
                        (ties: first in that order), split back; ``certify.attacks.compressors.
                        Prune(p, scope="global")`` on the matrices in that order, bit for bit
======================  =================================================================

Pruned entries, and kept ``-0.0`` weights, come out as ``+0.0`` (equal weights, equal bits).
``certify.radii.compressed`` applies them to a network and confronts them with its
certificate; ``certify.check.compressions`` is their numpy twin.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

KINDS = ("rank", "bits", "bits_per_channel", "prune", "prune_global")
PRUNE_KINDS = ("prune", "prune_global")  # a fraction of the weights, not an integer
MAX_BITS = 64
FORMAT_HELP = ("write a compression as KIND=LEVEL[@LAYER,LAYER...] with KIND one of "
               "rank, bits, bits_per_channel, prune, prune_global, e.g. 'rank=8', "
               "'bits=4@fc1', 'prune=0.5', 'prune_global=0.5@fc1,fc2'")



@dataclass(frozen=True)
class Compression:
    """One compression: ``kind`` in ``KINDS``, its ``level`` (rank >= 0, bits in 2..64, or
    pruned fraction in [0, 1] for ``prune`` and ``prune_global``), applied to the named affine
    ``layers`` (``None``: all)."""

    kind: str
    level: int | float
    layers: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown compression kind {self.kind!r}; {FORMAT_HELP}")
        level = self.level
        if isinstance(level, bool) or not isinstance(level, numbers.Real):
            raise ValueError(f"{self.kind} level must be a number, got {level!r}")
        if self.kind in PRUNE_KINDS:
            if not 0 <= level <= 1:
                raise ValueError(f"{self.kind} ratio must be a fraction in [0, 1], got "
                                 f"{level!r}")
            level = float(level)
        elif not isinstance(level, numbers.Integral):
            raise ValueError(f"{self.kind} must be an integer, got {level!r}")
        elif self.kind == "rank" and level < 0:
            raise ValueError(f"rank must be >= 0, got {level}")
        elif self.kind != "rank" and not 2 <= level <= MAX_BITS:
            raise ValueError(f"{self.kind} must be between 2 and {MAX_BITS}, got {level} "
                             "(symmetric quantisation needs a sign bit and one level)")
        object.__setattr__(self, "level", level if self.kind in PRUNE_KINDS else int(level))
        if self.layers is not None:
            layers = () if isinstance(self.layers, str) else tuple(self.layers)
            if not layers or not all(isinstance(n, str) and n for n in layers):
                raise ValueError(f"layers must be a non-empty sequence of layer names, got "
                                 f"{self.layers!r}")
            object.__setattr__(self, "layers", layers)

    def __str__(self) -> str:
        at = "@" + ",".join(self.layers) if self.layers else ""
        return f"{self.kind}={self.level}{at}"


def parse_compression(text: str, names: Sequence[str] | None = None) -> Compression:
    """``"rank=8"``, ``"bits=4"``, ``"bits_per_channel=4"``, ``"prune=0.5"``,
    ``"prune_global=0.5"``, optionally ``"...@fc1,fc2"``; with ``names`` (the network's
    affine layers) the layers are checked."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}; {FORMAT_HELP}")
    spec, at, layers = text.strip().partition("@")
    kind, eq, value = spec.partition("=")
    kind, value = kind.strip(), value.strip()
    if not eq or not value:
        raise ValueError(f"cannot read {text!r}; {FORMAT_HELP}")
    if kind not in KINDS:
        raise ValueError(f"unknown compression kind {kind!r} in {text!r}; {FORMAT_HELP}")
    try:
        level = float(value) if kind in PRUNE_KINDS else int(value)
    except ValueError:
        what = "a fraction in [0, 1]" if kind in PRUNE_KINDS else "an integer"
        raise ValueError(f"{kind} must be {what}, got {value!r} in {text!r}") from None
    chosen = None
    if at:
        chosen = tuple(n.strip() for n in layers.split(","))
        if not all(chosen):
            raise ValueError(f"empty layer name in {text!r}: list names after '@' separated by "
                             "commas, e.g. 'rank=8@fc1,fc2'")
    compression = Compression(kind, level, chosen)
    if names is not None:
        check_layers(compression, list(names))
    return compression


def check_layers(compression: Compression, names: list[str]) -> None:
    unknown = [n for n in compression.layers or () if n not in names]
    if unknown:
        raise ValueError(f"unknown layer(s) {', '.join(map(repr, unknown))} in "
                         f"'{compression}'; the affine layers are: {', '.join(names)}")



def truncate(W: torch.Tensor, rank: int) -> torch.Tensor:
    """``W_r = U_r S_r V_r^T`` (Eckart-Young-Mirsky optimum); ``W`` itself at full rank."""
    if rank >= min(W.shape):
        return W
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :rank] * s[:rank]) @ Vh[:rank]


def quantise(W: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Symmetric round-to-nearest ``s round(W / s)``, ``s = max|W| / (2^(b-1) - 1)`` per
    tensor or per row; an all-zero tensor (or row) is left as it is."""
    top = W.abs().amax(dim=1, keepdim=True) if per_channel else W.abs().max()
    s = top / (2 ** (bits - 1) - 1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, safe * torch.round(W / safe), W)


def prune_count(ratio: float, size: int) -> int:
    """The largest ``k`` with ``k / size <= ratio`` in float64 (``floor(ratio size)``, except
    that a ratio written as ``k / size``, as ``threshold_prune_ratio`` does, gives ``k``)."""
    count = min(size, math.floor(ratio * size))
    while count < size and (count + 1) / size <= ratio:
        count += 1
    while count > 0 and count / size > ratio:
        count -= 1
    return count


def prune_together(matrices: Sequence[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """One magnitude threshold over all ``matrices``: flattened row-major and concatenated in
    the order given, the ``prune_count(ratio, N)`` smallest of the ``N`` magnitudes zeroed
    (stable sort: ties first in that order), split back; zeros come out as ``+0.0``."""
    flat = torch.cat([W.flatten() for W in matrices])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), stable=True)[:prune_count(ratio, flat.numel())]] = False
    kept = torch.where(keep, flat, 0.0) + 0.0  # + 0.0 turns -0.0 into +0.0
    return [part.reshape(W.shape)
            for part, W in zip(kept.split([W.numel() for W in matrices]), matrices)]


def prune(W: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``prune_count(ratio, m n)`` smallest magnitudes (ties: first in row-major order)."""
    return prune_together([W], ratio)[0]


def compress_matrices(matrices: Sequence[torch.Tensor],
                      compression: Compression) -> list[torch.Tensor]:
    """``g`` of the chosen layers' ``(m, n)`` weight matrices, given in ``affine_indices``
    order: ``prune_global`` prunes them together, every other kind one by one."""
    kind, level = compression.kind, compression.level
    if kind == "prune_global":
        return prune_together(matrices, level)
    if kind == "rank":
        return [truncate(W, level) for W in matrices]
    if kind == "prune":
        return [prune(W, level) for W in matrices]
    return [quantise(W, level, per_channel=kind == "bits_per_channel") for W in matrices]
