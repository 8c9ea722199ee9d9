"""Test your own model with certify: pytest assertions.

Assertions (plain functions: they raise ``AssertionError`` with a short, precise message,
and return the proved ``Claim`` objects otherwise)::

    from certify.testing import assert_robust, assert_compression_safe

    assert_robust(model, x_calibration, rank=32, bits=8, prune=0.2, radius=1e-3)
    assert_compression_safe(model, x_calibration, "bits=8")

``assert_robust`` proves, layer by layer (each layer compressed or perturbed ALONE), that no
prediction on ``x`` can change under SVD truncation to any rank ``>= rank``, symmetric
quantisation (per tensor or per channel) to any ``>= bits`` bits, magnitude pruning of any
fraction ``<= prune``, or any weight change of norm ``< radius``. The proof is the
certificate: the sound per-input radii of ``certify.radii.radius.layer_radii`` against the
section-6 error bounds of ``certify.closed_forms.thresholds`` (THEORY.md sections 4 to 6).
``assert_compression_safe`` proves one concrete compression (also of several layers at
once, through the section-5 multi-layer bound) and runs the compressed model as well.

The hypothesis strategies are in ``certify.testing.strategies``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from certify.closed_forms.compressions import Compression, parse_compression, prune_count
from certify.closed_forms.perturbation import as_float64
from certify.closed_forms.thresholds import (EPS, _below, pruning_error, quantisation_error,
                                             truncation_error)
from certify.graph.graph import Graph
from certify.radii.compressed import compression_check
from certify.radii.multilayer import multilayer_bound
from certify.radii.radius import NORMS, layer_radii, predictions
from certify.testing.subjects import affine_index, network_of

CHUNK = 64  # inputs per layer_radii call (memory)


@dataclass(frozen=True)
class Claim:
    """One claim about one layer (or several at once) on every input.

    ``required[norm]``: the weight error (or perturbation norm) the inputs must tolerate in
    that norm; ``lower[norm]``: their certified radii (``(B,)``). Several layers at once
    (``certificate="multilayer"``): ``required[norm]`` is 1 and ``lower[norm]`` the smallest
    ``m_j / bound_j`` of the section-5 bound with the layers' errors as budgets.
    ``proved``: the claim is certified on that input; ``refuted``: a verified
    counterexample exists there (a witness of smaller norm, or the concrete compressed model
    changing the class).
    """

    layer: str
    statement: str
    required: dict[str, float]
    lower: dict[str, torch.Tensor]
    proved: torch.Tensor
    refuted: torch.Tensor
    certificate: str = "radius"


class _Certificate:
    """Radii per (layer, norm), computed once per assertion, in chunks of inputs."""

    def __init__(self, network: Graph, x: torch.Tensor, bias: bool):
        self.network, self.x, self.bias = network, x, bias
        self.classes, margins = predictions(network, x)
        self.margins = margins.amin(dim=-1)
        self._radii: dict = {}

    def radii(self, index: int, norm: str):
        if (index, norm) not in self._radii:
            parts = [layer_radii(self.network, self.x[i:i + CHUNK], index, norm, self.bias)
                     for i in range(0, len(self.x), CHUNK)]
            self._radii[index, norm] = (torch.cat([p.lower for p in parts]),
                                        torch.cat([p.upper for p in parts]))
        return self._radii[index, norm]


def _setup(model, x, layers, bias: bool):
    x = as_float64(x, "x")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch (B, ...) of inputs, got shape "
                         f"{tuple(x.shape)}; add a batch axis with x[None]")
    network = network_of(model, x)
    if isinstance(layers, str):
        layers = [layers]
    indices = network.affine_indices if layers is None else \
        [affine_index(network, name) for name in layers]
    return network, x, indices, _Certificate(network, x, bias)


def _compression_errors(W: torch.Tensor, kind: str, level, dense: bool) -> dict[str, float]:
    """Upper bounds of ``||W - g(W)||`` over every level at least as gentle as ``level``,
    in the geometry of each radius (section 6; ``compression.thresholds``' comparisons).

    ``fro`` radius: the spectral norm of a dense layer on a vector (section 4), the Frobenius
    norm of a convolution or a dense layer over a sequence; ``max`` radius: the entrywise max. Rank ``>= r``: ``sigma_{r+1}`` (and the
    Frobenius tail), ``||E||_max <= ||E||_2``. Bits ``>= b``: ``s/2`` entrywise with the
    per-tensor step, which bounds the per-channel steps too, ``sqrt(m n) s/2`` in Frobenius.
    Pruning ``<= p``: the largest pruned magnitude and the norm of the pruned weights.
    """
    if kind == "rank":
        errors = truncation_error(W)
        r = min(level, min(W.shape))
        spectral = float(errors.spectral[r])
        return {"fro": spectral if dense else float(errors.frobenius[r]), "max": spectral}
    if kind == "bits":
        entry = float(quantisation_error(W, level))
        return {"fro": math.sqrt(W.numel()) * entry * (1 + 4 * EPS), "max": entry}
    errors = pruning_error(W)
    k = prune_count(level, W.numel())
    return {"fro": float(errors.frobenius[k]), "max": float(errors.max[k])}


def _proved(required: dict[str, float], lower: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([_below(torch.tensor(required[n], dtype=torch.float64,
                                            device=lower[n].device), lower[n])
                        for n in required]).any(dim=0)


def _describe(claim: Claim, certificate: _Certificate, note) -> str:
    """One line: the claim, its worst input (a refuted one first), that input's radius
    against the requirement; ``note(input)`` adds the counterexample, if any."""
    failed = ~claim.proved
    total = len(failed)
    ratio = torch.stack([claim.lower[n] / claim.required[n] if claim.required[n] > 0
                         else torch.full_like(claim.lower[n], math.inf)
                         for n in claim.required]).amax(dim=0)
    pool = claim.refuted if claim.refuted.any() else failed
    worst = int(torch.nonzero(pool)[ratio[pool].argmin(), 0])
    norm = max(claim.required, key=lambda n: float(claim.lower[n][worst] / claim.required[n])
               if claim.required[n] > 0 else math.inf)
    verdict = "REFUTED" if claim.refuted[worst] else "not proved"
    value = float(claim.lower[norm][worst])
    evidence = (f"certified radius {value:.3g} ({norm}) < required {claim.required[norm]:.3g}"
                if claim.certificate == "radius" else
                f"section-5 bound: margin / margin change {value:.3g} ({norm}) <= 1")
    layer = f"layer{'s' if ',' in claim.layer else ''} '{claim.layer}'"
    return (f"{layer}, {claim.statement}: {verdict} on input {worst} "
            f"(class {int(certificate.classes[worst])}, margin "
            f"{float(certificate.margins[worst]):.3g}): {evidence}{note(worst)}; "
            f"{int(failed.sum())} of {total} inputs not certified")


def _fail(claims: list[tuple[Claim, object]], certificate: _Certificate) -> None:
    bad = [(c, note) for c, note in claims if not c.proved.all()]
    if bad:
        lines = [_describe(c, certificate, note) for c, note in bad]
        raise AssertionError(f"certify: {len(bad)} claim(s) fail on {len(certificate.x)} "
                             "inputs\n  " + "\n  ".join(lines))


def assert_robust(model, x, *, rank: int | None = None, bits: int | None = None,
                  prune: float | None = None, radius: float | None = None, layers=None,
                  norm: str = "fro", bias: bool = False) -> tuple[Claim, ...]:
    """Prove that no prediction of ``model`` on ``x`` changes when ONE chosen layer (each of
    ``layers``, default every affine layer, in turn) is truncated to any rank ``>= rank``,
    quantised to any ``>= bits`` bits, magnitude-pruned by any fraction ``<= prune``, or
    changed by any ``D`` with ``||D|| < radius`` in ``norm`` (``"fro"`` or ``"max"``;
    ``bias``: the bias is perturbed too, radius claims only).

    Certified when the section-6 error bound (``_compression_errors``) is below the input's
    certified radius in ``fro`` or ``max`` (sections 4 to 6), or ``radius <= lower``.
    Otherwise raises ``AssertionError`` naming, per failing claim, the layer, the worst
    input, its class and logit margin, its certified radius against the required one, and
    ``REFUTED`` when a verified witness of norm ``< radius`` changes that input's class.
    Returns the proved claims.
    """
    claims_asked = {"rank": rank, "bits": bits, "prune": prune, "radius": radius}
    if all(v is None for v in claims_asked.values()):
        raise ValueError("nothing to prove: give at least one of rank=, bits=, prune=, "
                         "radius=")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    for kind in ("rank", "bits", "prune"):  # validated as certify.radii.compressed does
        if claims_asked[kind] is not None:
            Compression(kind, claims_asked[kind])
    if radius is not None and not (isinstance(radius, (int, float)) and radius >= 0):
        raise ValueError(f"radius must be a number >= 0, got {radius!r}")
    network, x, indices, certificate = _setup(model, x, layers, bias)
    claims = []
    for index in indices:
        layer, name = network.layer(index), network.nodes[index].name
        for kind, statement in (("rank", f"rank >= {rank}"), ("bits", f"bits >= {bits}"),
                                ("prune", f"prune <= {prune}")):
            if claims_asked[kind] is None:
                continue
            required = _compression_errors(layer.matrix, kind, claims_asked[kind],
                                           dense=network.is_dense(index))
            lower = {n: certificate.radii(index, n)[0] for n in NORMS}
            claims.append((Claim(name, statement, required, lower,
                                 _proved(required, lower),
                                 torch.zeros(len(x), dtype=bool, device=x.device)),
                           lambda i: " (weight error bound)"))
        if radius is not None:
            lower, upper = certificate.radii(index, norm)
            sign = "||D||_F" if norm == "fro" else "||D||_max"
            claims.append((Claim(name, f"{sign} < {radius:g}", {norm: float(radius)},
                                 {norm: lower}, radius <= lower, upper < radius),
                           lambda i, upper=upper: f"; a witness of norm {float(upper[i]):.3g} "
                           "changes its class" if upper[i] < radius else ""))
    _fail(claims, certificate)
    return tuple(c for c, _ in claims)


def assert_compression_safe(model, x, compression: str | Compression | None = None, *,
                            rank: int | None = None, bits: int | None = None,
                            bits_per_channel: int | None = None, prune: float | None = None,
                            layers=None) -> tuple[Claim, ...]:
    """Prove that one concrete compression changes no prediction on ``x``, and run it.

    ``compression``: ``"bits=4@fc1"`` or a ``Compression``; or keywords ``rank=``, ``bits=``,
    ``bits_per_channel=``, ``prune=`` (each applied to ``layers``, default all affine
    layers). Proved by the joint bound of THEORY.md section 10 on the compression made
    (``certify.radii.whole_model``: exact first order, bounded remainders), or, with one
    compressed layer, its exact weight error below the certified radius
    (``certify.radii.compressed.compression_check``), with several the section-5 multi-layer
    bound with budgets the layers' exact errors, in ``fro`` or ``max``. The compressed model is
    also run: a changed prediction is reported as ``REFUTED``; an unchanged one without a
    proof still fails (a test passing is not a proof).
    """
    network, x, _, certificate = _setup(model, x, None, False)
    if isinstance(layers, str):
        layers = [layers]
    asked = [Compression(kind, level, None if layers is None else tuple(layers))
             for kind, level in (("rank", rank), ("bits", bits),
                                 ("bits_per_channel", bits_per_channel), ("prune", prune))
             if level is not None]
    if compression is not None:
        asked.insert(0, compression if isinstance(compression, Compression)
                     else parse_compression(compression))
    if not asked:
        raise ValueError("nothing to check: give a compression such as 'bits=8' or one of "
                         "rank=, bits=, bits_per_channel=, prune=")
    claims = []
    for c in asked:
        chosen = list(c.layers) if c.layers is not None else network.layer_names
        indices = [affine_index(network, name) for name in chosen]
        lower = {network.nodes[i].name: {n: certificate.radii(i, n)[0] for n in NORMS}
                 for i in indices}
        result = compression_check(network, x, c, lower, CHUNK)
        errors = {layer.name: {"fro": layer.error_fro, "max": layer.error_max}
                  for layer in result.layers}
        if len(result.layers) == 1:
            layer = result.layers[0]
            dense = network.is_dense(indices[0])
            required = {"fro": layer.error_spectral if dense else layer.error_fro,
                        "max": layer.error_max}
            claim = Claim(layer.name, str(c), required, lower[layer.name], result.harmless,
                          result.changed)
        else:  # several layers at once: the section-5 bound, as result.harmless
            ratios, proved = {}, torch.zeros(len(x), dtype=torch.bool, device=x.device)
            for n in NORMS:
                budgets = [errors.get(network.nodes[i].name, {n: 0.0})[n]
                           for i in network.affine_indices]
                bound = multilayer_bound(network, x, budgets, n)
                ratios[n] = (bound.margins / bound.bound).amin(dim=-1)
                proved |= bound.certified
            claim = Claim(",".join(chosen), str(c), {n: 1.0 for n in NORMS}, ratios, proved,
                          result.changed, "multilayer")
        def note(i, result=result):
            if not result.changed[i]:
                return ""
            return f"; the compressed model predicts {int(result.compressed_predictions[i])}"

        proved = claim.proved if result.jointly is None else claim.proved | result.jointly
        claims.append((dataclasses.replace(claim, proved=proved & ~result.changed), note))
    _fail(claims, certificate)
    return tuple(c for c, _ in claims)
