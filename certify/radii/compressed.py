"""Concrete compressions of a network's graph, confronted with its certificate (THEORY.md section 6).

``certify.closed_forms.thresholds`` computes the compression levels that provably change no
prediction; this module applies a compression ``g`` (``certify.closed_forms.compressions``)
to the weight matrices of chosen affine layers (biases untouched) and measures what it does.

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
harmlessness certifies nothing. Every compression, on one layer or many, is certified
jointly by THEORY.md section 10 (``certify.radii.whole_model``): ``jointly`` for the change
made (exact first order), ``strength`` for every compression of that strength (the
quantiser's cells, the pruning box, the truncation's Frobenius ball); both need no radii,
and ``None`` where a node downstream has no remainder rule (section 9). ``harmless`` is the
union of the certificates that apply: ``jointly``, the radii (one layer), and with several
layers the all-layers bound of section 5 (``certify.radii.multilayer.multilayer_bound``,
biases unperturbed, budgets ``e_k`` the upper bounds of ``||W_k - g(W_k)||_F`` (``fro``) or
``||W_k - g(W_k)||_max`` (``max``) of the compressed layers, 0 for the others, either
norm), kept so that no input is vouched for less than before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from certify.closed_forms.compressions import Compression, check_layers, compress_matrices
from certify.closed_forms.thresholds import EPS, singular_values_upper
from certify.graph.graph import Graph
from certify.bounds.deviations import unsupported
from certify.graph.inputs import InputError, inputs_for
from certify.radii.whole_model import whole_model

RADIUS_NORMS = ("fro", "max")
JOINT_CHUNK = 16  # inputs per joint trace: it holds G_k P_k^T, (C, m, n) per input and layer


def compressed_indices(network: Graph, compression: Compression) -> list[int]:
    """Node indices of the affine layers that ``compression`` applies to (all when
    unrestricted)."""
    check_layers(compression, network.layer_names)
    return [i for i in network.affine_indices
            if compression.layers is None or network.nodes[i].name in compression.layers]


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
    provably cannot change, by any certificate that applies (module docstring; ``None``
    when none does). ``jointly``: by the section-10 bound on the change made; ``strength``:
    no compression of this strength can change it (both ``None`` without the remainder
    rules); ``all_layers``: by the section-5 bound (several layers only). ``violations``:
    harmless yet changed (0 unless the certificate is wrong;
    ``None`` with ``harmless``). ``note`` says which certificates were used.
    """

    compression: Compression
    layers: tuple[LayerCompression, ...]
    predictions: torch.Tensor
    compressed_predictions: torch.Tensor
    changed: torch.Tensor
    harmless: torch.Tensor | None
    violations: int | None
    note: str
    jointly: torch.Tensor | None = None
    strength: torch.Tensor | None = None
    all_layers: torch.Tensor | None = None


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
    from certify.radii.radius import region_scale

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
    from certify.radii.multilayer import multilayer_bound

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

    Raises ``certify.graph.inputs.InputTypeError`` (a ``TypeError``) for inputs that are not floats
    or a non-``Graph``, and ``ValueError`` (``certify.graph.inputs.InputError`` for the inputs)
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
            # (columns of uncolumns: a grouped layer's rows keep their own group's blocks)
            delta = layer.columns(layer.uncolumns(torch.matmul(E, P), values[i].shape[1:]))
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
    whole, notes = None, []
    why = next(filter(None, (unsupported(network, i) for i in indices)), None)
    if why is None:
        whole = whole_model(network, x, indices, compression, min(chunk, JOINT_CHUNK))
        notes.append("the joint bound of THEORY.md section 10 on the change made")
    else:
        notes.append(f"no joint bound ({why} has no remainder rule)")
    harmless = None if whole is None else whole.harmless
    section5 = None
    if len(layers) > 1:
        section5 = _jointly_harmless(network, x, indices, layers, chunk)
        harmless = section5 if harmless is None else harmless | section5
        notes.append("the all-layers bound of section 5 with budgets the layers' weight errors "
                     "(single-layer radii do not compose)")
    elif certificate_lower is not None:
        harmless = layers[0].harmless if harmless is None else harmless | layers[0].harmless
        notes.append("the layer's certified radii")
    violations = None if harmless is None else int((harmless & changed).sum())
    note = f"{len(layers)} layer(s) compressed; harmless by " + "; ".join(notes) \
        if harmless is not None else "nothing is certified: " + "; ".join(notes)
    return CompressionCheck(compression, tuple(layers), predictions, compressed_predictions,
                            changed, harmless, violations, note,
                            None if whole is None else whole.harmless,
                            None if whole is None else whole.strength, section5)
