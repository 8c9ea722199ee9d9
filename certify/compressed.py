"""Concrete compressions of a network's graph, confronted with its certificate (THEORY.md section 6).

``compression.py`` computes the compression levels that provably change no prediction;
this module applies a compression ``g`` to the weight matrices of chosen affine layers
(biases untouched) and measures what it does:

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
                        (ties: first in that order), split back; ``certify.compressors.
                        Prune(p, scope="global")`` on the matrices in that order, bit for bit
======================  =================================================================

Pruned entries, and kept ``-0.0`` weights, come out as ``+0.0`` (equal weights, equal bits).

``compression_check`` reports, per input, whether the class changed, and per layer the
weight error ``E = W - g(W)`` (rigorous upper bounds of ``||E||_F``, ``||E||_2``,
``||E||_max``) and the exact change of the layer's output ``E P`` on each input. Given
certified radii it marks an input harmless in a layer when the weight error is below the
radius in a matching norm (the Frobenius radius of a dense layer on a vector certifies the
spectral norm too, section 4: ``||E h|| <= ||E||_2 ||h||``; that of a convolution, or of a
dense layer over a sequence, only ``||E||_F``), or when the exact output change ``E P`` lies
in the section-4 region of the radius (``||E P||_F < rho sigma_max(P)``, or
``|E P|_ij < rho ||P_:j||_1``): the certificate covers every change of ``Z`` there, and a
compression's error, large as a weight, often moves the output of one input much less.
With one compressed layer, harmless implies the class cannot change; a harmless input
whose class changed is a ``violation`` (a soundness bug).

Radii of single layers do not compose, so with several compressed layers per-layer
harmlessness certifies nothing. There ``harmless`` is the all-layers bound of THEORY.md
section 5 (``certify.multilayer.multilayer_bound``, biases unperturbed): budgets ``e_k`` the
upper bounds of ``||W_k - g(W_k)||_F`` (``fro``) or ``||W_k - g(W_k)||_max`` (``max``) of
the compressed layers, 0 for the others; an input is harmless when either norm's bound
certifies it. That bound needs no radii: it is computed with or without them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from certify.compression import EPS, singular_values_upper
from certify.inputs import InputError, inputs_for
from certify.graph import Graph

KINDS = ("rank", "bits", "bits_per_channel", "prune", "prune_global")
PRUNE_KINDS = ("prune", "prune_global")  # a fraction of the weights, not an integer
MAX_BITS = 64
RADIUS_NORMS = ("fro", "max")
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
        _check_layers(compression, list(names))
    return compression


def _check_layers(compression: Compression, names: list[str]) -> None:
    unknown = [n for n in compression.layers or () if n not in names]
    if unknown:
        raise ValueError(f"unknown layer(s) {', '.join(map(repr, unknown))} in "
                         f"'{compression}'; the affine layers are: {', '.join(names)}")


def compressed_indices(network: Graph, compression: Compression) -> list[int]:
    """Node indices of the affine layers that ``compression`` applies to (all when
    unrestricted)."""
    _check_layers(compression, network.layer_names)
    return [i for i in network.affine_indices
            if compression.layers is None or network.nodes[i].name in compression.layers]


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


def compress(network: Graph, compression: Compression) -> Graph:
    """The same graph with the chosen affine layers' weights replaced by ``g(W)``."""
    indices = compressed_indices(network, compression)
    compressed = compress_matrices([network.layer(i).matrix for i in indices], compression)
    for i, G in zip(indices, compressed):
        network = network.replace(i, network.layer(i).with_weight(G))
    return network


@dataclass(frozen=True)
class LayerCompression:
    """What compressing one layer does; ``(B,)`` tensors have one entry per input.

    ``error_*``: upper bounds of ``||W - g(W)||`` (Frobenius, spectral, entrywise max),
    inflated for float64 rounding. ``change_fro``/``change_max``: ``||(W - g(W)) P||_F`` and
    ``max |(W - g(W)) P|``, the exact change of the layer's output (float64 values).
    ``reach_fro``/``reach_max``: that change as a weight radius, the smallest ``rho`` whose
    section-4 region contains it: ``||dZ||_F / sigma_max(P)`` and
    ``max_ij |dZ_ij| / ||P_:j||_1``. ``harmless``: the weight error or the reach is below the
    input's certified radius in this layer (``None`` without radii).
    """

    name: str
    error_fro: float
    error_spectral: float
    error_max: float
    change_fro: torch.Tensor
    change_max: torch.Tensor
    reach_fro: torch.Tensor
    reach_max: torch.Tensor
    harmless: torch.Tensor | None


@dataclass(frozen=True)
class CompressionCheck:
    """A compression applied to a network on a batch of inputs.

    ``changed``: the compressed network predicts another class. ``harmless``: the class
    provably cannot change; with ONE compressed layer from its radii (``None`` without
    them), with several from the section-5 all-layers bound (module docstring).
    ``violations``: harmless yet changed (0 unless the certificate is wrong; ``None`` with
    ``harmless``). ``note`` says which certificate it is.
    """

    compression: Compression
    layers: tuple[LayerCompression, ...]
    predictions: torch.Tensor
    compressed_predictions: torch.Tensor
    changed: torch.Tensor
    harmless: torch.Tensor | None
    violations: int | None
    note: str


def _upper_norms(E: torch.Tensor) -> tuple[float, float, float]:
    """``(||E||_F, ||E||_2, ||E||_max)`` as upper bounds: ``E = fl(W - g(W))`` is within a
    relative ``eps`` of the true difference entrywise, and the Frobenius sum of ``mn``
    squares within ``mn eps``; ``singular_values_upper`` covers the SVD's error."""
    fro = float(torch.linalg.matrix_norm(E)) * (1 + (E.numel() + 2) * EPS)
    spectral = float(singular_values_upper(E)[0]) * (1 + 2 * EPS)
    return fro, spectral, float(E.abs().max()) * (1 + 2 * EPS)


def _radii(certificate_lower, name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The radii of layer ``name``, one per input of ``x``, on its device."""
    batch = len(x)
    if name not in certificate_lower:
        raise ValueError(f"certificate_lower has no radii for the compressed layer {name!r} "
                         f"(it has {', '.join(map(repr, certificate_lower))})")
    radii = certificate_lower[name]
    if not isinstance(radii, Mapping) or not radii or set(radii) - set(RADIUS_NORMS):
        raise ValueError(f"certificate_lower[{name!r}] must map 'fro' and/or 'max' to "
                         f"per-input lower radii, got {radii!r}")
    out = {}
    for norm, lower in radii.items():
        lower = torch.as_tensor(lower, dtype=torch.float64, device=x.device)
        if lower.shape != (batch,) or torch.isnan(lower).any():
            raise ValueError(f"certificate_lower[{name!r}][{norm!r}] must hold one radius per "
                             f"input ({batch}, not NaN), got shape {tuple(lower.shape)}")
        out[norm] = lower
    return out


REACH_MARGIN = 1e-9  # relative: rounding of dZ = E P and of the region's scale


def _reach(delta: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output change ``dZ = E P`` ``(B, m, L)`` as a weight radius per input (section 4:
    the certificate covers every ``dZ`` with ``||dZ||_F <= rho sigma_max(P~)``, or with
    ``|dZ_ij| <= rho ||P~_:j||_1``; ``P`` without the bias row only shrinks the region)."""
    from certify.radius import region_scale

    fro = torch.linalg.matrix_norm(delta) / region_scale(P, "fro")
    per_column = delta.abs().amax(dim=1) / region_scale(P, "max")
    return fro * (1 + REACH_MARGIN), per_column.amax(dim=-1) * (1 + REACH_MARGIN)


def _harmless(errors: tuple[float, float, float], reach: tuple[torch.Tensor, torch.Tensor],
              radii: dict, dense: bool) -> torch.Tensor:
    """Weight error or reach below the radius in some norm: a zero error changes nothing.
    The ``fro`` radius bounds the spectral norm of a dense layer on a vector (section 4),
    only the Frobenius norm of a layer with several columns (a convolution, a dense layer
    over a sequence); the reach is the exact output change, so it certifies in both."""
    fro, spectral, max_ = errors
    ok = torch.zeros_like(next(iter(radii.values())), dtype=torch.bool)
    for norm, lower in radii.items():
        error = (spectral if dense else fro) if norm == "fro" else max_
        ok |= (error == 0) | (error < lower) | (reach[norm == "max"] < lower)
    return ok


def _jointly_harmless(network: Graph, x: torch.Tensor, indices: list[int],
                      layers: list[LayerCompression], chunk: int) -> torch.Tensor:
    """Section 5, all layers at once: ``multilayer_bound`` certifies the input with budgets
    ``e_k`` = the compressed layer's ``error_fro`` (``fro``) or ``error_max`` (``max``),
    ``e_k = 0`` for the other layers, in either norm (biases unperturbed)."""
    from certify.multilayer import multilayer_bound

    errors = dict(zip(indices, layers))
    budgets = {norm: [getattr(errors[i], f"error_{norm}") if i in errors else 0.0
                      for i in network.affine_indices] for norm in RADIUS_NORMS}
    parts = []
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        parts.append(multilayer_bound(network, part, budgets["fro"], "fro").certified |
                     multilayer_bound(network, part, budgets["max"], "max").certified)
    return torch.cat(parts)


def compression_check(network: Graph, x: torch.Tensor, compression: Compression,
                      certificate_lower: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                      chunk: int = 64) -> CompressionCheck:
    """Apply ``compression`` and confront it with the certified radii (section 6), or, with
    several compressed layers, with the all-layers bound (section 5).

    ``certificate_lower[name][norm]`` (``norm`` in ``fro``, ``max``) holds the certified
    lower radius of layer ``name`` per input (``layer_radii(...).lower`` or the certificate's
    ``lower``, with ``inf`` for ``null``), for at least every compressed layer; without it
    one compressed layer certifies nothing, several still get the section-5 ``harmless``.

    Raises ``certify.inputs.InputTypeError`` (a ``TypeError``) for inputs that are not floats
    or a non-``Graph``, and ``ValueError`` (``certify.inputs.InputError`` for the inputs)
    for NaN/Inf inputs or weights, an empty batch, a shape the network cannot take, a bad
    ``chunk``, unknown layers or radii that do not match the inputs.
    """
    if chunk < 1:
        raise InputError(f"chunk must be a positive number of inputs, got {chunk}")
    x = inputs_for(network, x)
    indices = compressed_indices(network, compression)
    small = compress(network, compression)
    before, after, changes = [], [], []
    for start in range(0, len(x), chunk):
        values = network.values(x[start:start + chunk])
        before.append(values[-1].argmax(-1))
        after.append(small(x[start:start + chunk]).argmax(-1))
        parts = []
        for i in indices:  # E P: the change of the layer's output, bias untouched
            layer, E = network.layer(i), network.layer(i).matrix - small.layer(i).matrix
            P = layer.patches(values[network.input_of(i)])
            delta = torch.matmul(E, P)
            parts.append((torch.linalg.matrix_norm(delta), delta.abs().amax(dim=(-2, -1)),
                          *_reach(delta, P)))
        changes.append(parts)
    predictions, compressed_predictions = torch.cat(before), torch.cat(after)
    layers = []
    for k, i in enumerate(indices):
        name = network.nodes[i].name
        errors = _upper_norms(network.layer(i).matrix - small.layer(i).matrix)
        change_fro, change_max, reach_fro, reach_max = (
            torch.cat([c[k][part] for c in changes]) for part in range(4))
        harmless = None
        if certificate_lower is not None:
            harmless = _harmless(errors, (reach_fro, reach_max),
                                 _radii(certificate_lower, name, x), dense=network.is_dense(i))
        layers.append(LayerCompression(name, *errors, change_fro, change_max, reach_fro,
                                       reach_max, harmless))
    changed = compressed_predictions != predictions
    harmless, violations = None, None
    if len(layers) > 1:
        harmless = _jointly_harmless(network, x, indices, layers, chunk)
        violations = int((harmless & changed).sum())
        note = (f"{len(layers)} layers compressed at once: harmless is the all-layers bound of "
                "THEORY.md section 5 with budgets the layers' weight errors (single-layer radii "
                "do not compose: per-layer harmlessness alone certifies nothing)")
    elif certificate_lower is None:
        note = "no certified radii given: nothing is certified"
    else:
        harmless = layers[0].harmless
        violations = int((harmless & changed).sum())
        note = "one compressed layer: harmless inputs provably keep their class"
    return CompressionCheck(compression, tuple(layers), predictions, compressed_predictions,
                            changed, harmless, violations, note)
