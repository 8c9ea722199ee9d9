"""Independent check of a certificate, in numpy float64 (not the torch path that made it).

Every claim the document makes is recomputed from the model's weights and the data, with
the numpy twins ``forward``, ``bounds`` and ``compressions`` of ``certify.check``:

* the document itself: well formed (``certify.certificate.schema``: JSON Schema, one entry per input
  everywhere) and about as many inputs as the data; otherwise nothing is claimed and
  ``CertificateFormatError`` or ``CheckInputError`` says why;
* ``predictions``: a numpy forward pass; ``labels`` (when present): the labels' hash, the
  misclassified inputs and the accuracy, from the data's ``y``;
* ``layers[].name`` and ``shape``: the model's affine layers (the ``Affine`` nodes of its
  graph, in topological order; a batch norm after a layer folded into it);
* ``method``: ``exact`` on the last dense layer (the logits node, dense on a vector) and
  only there; ``lower`` is checked by the method the certificate names (``(refined)``:
  some inputs were refined, so each claim is confirmed without refinement or with it);
* ``upper``: the stored witness ``D`` (its shape must fit the layer and
  ``bias_perturbed``) changes the class in a numpy forward pass with ``W + D`` (the
  layer's output ``(W~ + D) P~`` recomputed, then every node downstream of it; within
  ``WITNESS_TIE`` of a tie, where a search may end exactly on the boundary, either
  verdict), and
  ``||D||`` equals the claim; where ``upper`` is ``null`` the stored perturbation (the
  search's last iterate) must not change the class, else ``upper`` should be its norm;
* ``estimate``: the first-order value ``min_j m_j / ||g_j P~^T||_dual`` (section 3) with
  the exact numpy gradient ``g_j``, to ``ESTIMATE_SLACK`` relative;
* ``lower``, last dense layer: the exact class-pair formula (section 3); other layers:
  the numpy global Lipschitz bound (section 5) reaches it, or the numpy local bound
  (interval propagation, backward refinement when ``method`` says ``refined``, CROWN (with
  SDP-CROWN's offsets when it says ``ball``) and
  the interval Jacobian; for a layer with several columns concretised over ``{D P~}``,
  ``certify.check.regions``), or, when ``method`` names ``optimised``, the same bound
  refined with CROWN's adaptive lines as well and with the stored ReLU slopes (bytes ``k``
  read as ``alpha = k / 254``, 255 for CROWN's own; ``certify.bounds.slopes``) certifies
  the section-4 region of that radius, or, when
  ``method`` names ``deviation``, the second-order bound of section 9 at that radius
  (``certify.check.deviations``: exact first order, bounded remainders) keeps every margin
  positive; ``lower <= upper``;
* thresholds (``certify.check.compression_claims``): the compression error at the claimed level
  is below the layer's smallest ``lower``, and one level further it is not (up to the
  margins of ``THRESHOLD_SLACK``);
* ``multilayer``: the section-5 recursion for all layers at once, evaluated at each
  claimed ``t`` (budgets ``t ||W~_k||``), certifies every input, and ``min`` is the least;
* ``compression_checks`` (``certify.check.compression_claims``): the compression applied again
  in numpy: the layers it names, the
  inputs whose class changed (up to ties within ``TIE``), the weight errors, harmlessness
  per layer from the certificate's radii, overall (that one layer's, or for several layers
  the section-5 recursion with budgets the weight errors), and ``violations`` (which must
  be 0: a harmless input that changes class refutes the radii, or the recursion).

``tool_version`` and a compression check's ``note`` are free text, not claims.

The network is a ``certify.graph.graph.Graph``: the checker reads its structure and each
operator's parameters, and recomputes everything with the operators' numpy twins
(``certify.check.operators``, ``certify.check.forward.NumpyGraph``), never with the torch
rules or bounds that made the certificate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from certify.certificate.schema import array_sha256
from certify.certificate.schema import validate
from certify.check.bounds import (columns, exact_last_layer, global_lower, local_lower_bounds,
                                  multilayer_bound)
from certify.check.compression_claims import (SLACK, check_compression, check_thresholds,
                                              check_whole_model)
from certify.check.compression_claims import first_indices as _first
from certify.check.compression_claims import radii_array as _array
from certify.check.deviations import margin_bounds
from certify.check.forward import NumpyGraph, margin_gradients
from certify.check.operators import NoTwinError

ESTIMATE_SLACK = 1e-6  # the estimate divides by a gradient norm from another implementation
# Relative logit gap (to the largest logit, plus 1) within which two implementations may
# round a perturbed forward pass to either class: a few ulps through the network, far
# below the gap a witness keeps after its bisection (relative 2^-30 of its margin, typically).
WITNESS_TIE = 1e-12
# Stored ReLU slopes (method "optimised"): byte k is alpha = k / SLOPE_STEPS, the lower slope
# s + (1 - s) alpha of an unstable entry; SLOPE_ADAPTIVE keeps CROWN's.
SLOPE_STEPS = 254
SLOPE_ADAPTIVE = 255


class CheckInputError(ValueError):
    """The certificate does not fit the data (or labels, or model) it is checked against."""


@dataclass
class Report:
    """Confirmed and refuted claims; ``ok`` when nothing is refuted."""

    confirmed: int = 0
    refuted: list[str] = field(default_factory=list)

    def claim(self, holds: bool, what: str) -> None:
        if holds:
            self.confirmed += 1
        else:
            self.refuted.append(what)

    @property
    def ok(self) -> bool:
        return not self.refuted


def twin_and_inputs(network, x, n: int, producer: str):
    """The graph's numpy twin and the inputs as float64, after checking that there are the
    ``n`` inputs the certificate covers (``CheckInputError`` otherwise, or for an operator
    without a twin)."""
    try:
        graph = NumpyGraph.of(network)
    except NoTwinError as err:
        raise CheckInputError(str(err)) from None
    x = np.asarray(x, dtype=np.float64)
    if len(x) != n:
        raise CheckInputError(f"the certificate covers {n} inputs but the data has {len(x)}: "
                              f"check it with the data (and the --limit) {producer} used")
    return graph, x


def check(document: dict, witnesses, network, x: np.ndarray,
          y: np.ndarray | None = None) -> Report:
    """Recompute every claim of ``document`` (with its ``witnesses`` arrays) on ``network``
    (a ``certify.graph.graph.Graph``) and the inputs ``x`` (labels ``y`` when the certificate
    reports accuracy).

    Raises ``CertificateFormatError`` for a malformed document and ``CheckInputError`` when
    it does not cover these inputs, or when the graph holds an operator that the checker has
    no numpy twin of; otherwise every claim ends up confirmed or refuted.
    """
    validate(document)
    graph, x = twin_and_inputs(network, x, len(document["predictions"]), "certify model")
    n = len(x)
    if x.shape[1:] != graph.nodes[0].shape:
        raise CheckInputError(f"the inputs have shape {x.shape[1:]}, the model's graph takes "
                              f"{graph.nodes[0].shape}")
    report = Report()
    bias = document["bias_perturbed"]
    values = graph.values(x)
    logits = values[-1]
    predicted = logits.argmax(axis=1)
    wrong = np.nonzero(predicted != np.array(document["predictions"]))[0]
    report.claim(wrong.size == 0, f"predictions of inputs {_first(wrong)} differ from a numpy "
                 "forward pass")
    _check_labels(report, document.get("labels"), predicted, y)
    margins = logits[np.arange(n), predicted][:, None] - logits
    margins[np.arange(n), predicted] = np.inf
    names = [graph.nodes[i].name for i in graph.affine_indices]
    if names != [e["name"] for e in document["layers"]]:
        report.claim(False, f"the certificate's layers {[e['name'] for e in document['layers']]}"
                     f" are not the model's affine layers {names}")
        return report
    _check_multilayer(report, document["multilayer"], graph, values, predicted, margins, bias)
    for index, entry in zip(graph.affine_indices, document["layers"]):
        _check_layer(report, entry, witnesses, graph, index, values, predicted, margins, bias)
    lower = {e["name"]: {norm: _array(e[norm]["lower"]) for norm in ("fro", "max")}
             for e in document["layers"]}
    for entry in document.get("compression_checks", []):
        check_compression(report, entry, graph, values, predicted, lower)
    if "whole_model" in document:
        check_whole_model(report, document["whole_model"], graph, values, predicted)
    return report


def _check_labels(report: Report, labels: dict | None, predicted, y) -> None:
    if labels is None:
        return
    if y is None:
        report.claim(False, "labels: the certificate reports accuracy on labels, but the data "
                     "has no y")
        return
    y = np.asarray(y)
    if y.shape != predicted.shape:
        raise CheckInputError(f"y has shape {y.shape}, the data {predicted.shape[0]} inputs")
    report.claim(labels["labels_sha256"] == array_sha256(y), "labels: the labels' sha256 "
                 "differs from the certificate's")
    wrong = np.nonzero(predicted != y)[0]
    report.claim(labels["misclassified"] == wrong.tolist(), "labels: the misclassified inputs "
                 f"are {_first(wrong)}, not the certificate's")
    accuracy = 1 - wrong.size / len(y)
    report.claim(math.isclose(labels["accuracy"], accuracy, rel_tol=1e-12, abs_tol=1e-12),
                 f"labels: accuracy is {accuracy}, not {labels['accuracy']}")


def _weight(layer, bias: bool) -> np.ndarray:
    """``W~``: the weight matrix, with the bias as its last column when it is perturbed."""
    W = layer.matrix
    return np.concatenate([W, layer.bias[:, None]], axis=1) if bias else W


def _check_multilayer(report: Report, claims: dict, graph: NumpyGraph, values, y, margins,
                      bias: bool) -> None:
    weights = [_weight(graph.layer(i), bias) for i in graph.affine_indices]
    sizes = {"fro": np.array([np.linalg.norm(W) for W in weights]),  # ||W~_k|| per norm
             "max": np.array([np.abs(W).max() for W in weights])}
    for norm in ("fro", "max"):
        t = _array(claims[norm]["uniform_budget"])
        where = f"multilayer, {norm}"
        valid = np.isfinite(t) & (t >= 0)
        budgets = sizes[norm][:, None] * np.where(valid, t, 0.0)[None, :]
        bound = multilayer_bound(graph, values, y, budgets, norm, bias)
        certified = (bound < margins).all(axis=1) | (t == 0)  # t = 0 changes nothing
        bad = np.nonzero(~(valid & certified))[0]
        report.claim(bad.size == 0, f"{where}: uniform budget of inputs {_first(bad)} is not "
                     "certified by the all-layers recursion")
        report.claim(claims[norm]["min"] == float(t.min()), f"{where}: min is not the "
                     "smallest uniform budget")


# -- one layer ----------------------------------------------------------------------------

def _check_layer(report: Report, entry: dict, witnesses, graph: NumpyGraph, index: int, values,
                 y, margins, bias: bool) -> None:
    layer, name = graph.layer(index), graph.nodes[index].name
    report.claim(entry["shape"] == list(layer.weight.shape), f"layer {name}: shape "
                 f"{entry['shape']} is not the model's {list(layer.weight.shape)}")
    h = values[graph.input_of(index)]
    P = columns(layer, h, bias)
    W = _weight(layer, bias)
    last = graph.is_last_dense(index)
    for norm in ("fro", "max"):
        claims = entry[norm]
        where = f"layer {name}, {norm}"
        lower, upper = _array(claims["lower"]), _array(claims["upper"])
        report.claim((claims["method"] == "exact") == last,
                     f"{where}: method {claims['method']!r}, but the exact formula is the method "
                     f"of the last dense layer {'(this one)' if last else 'only'}")
        report.claim(bool(np.all(lower <= upper)), f"{where}: lower > upper")
        _check_witnesses(report, where, witnesses, f"{name}/{norm}", graph, index, values, P,
                         W, upper, y, bias)
        _check_estimate(report, where, _array(claims["estimate"]), graph, index, values, P, y,
                        norm)
        if last:
            exact = exact_last_layer(h, values[-1], y, norm, bias)
            bad = np.nonzero(lower > exact * (1 + 1e-12))[0]
        else:
            confirmed = lower <= global_lower(graph, index, P, y, margins, norm) * (1 + 1e-12)
            # "(refined)": some inputs were certified with refined intermediate bounds, the
            # others without; each claim is confirmed by either evaluation. "forward": both
            # with forward enclosures; "ball": with SDP-CROWN's offsets (Frobenius norm);
            # "deviation": the inputs neither confirms, by the deviation bound.
            options = set(claims["method"].partition("(")[2].rstrip(")").split(","))

            def confirm(rest: np.ndarray, **bound) -> None:
                """Confirm the claims of the inputs ``rest`` whose margins the local bound
                (with the options ``bound``) keeps positive."""
                bounds = local_lower_bounds(
                    graph, index, [v[rest] for v in values], P[rest], lower[rest], y[rest],
                    norm, enclose="forward" in options,  # noqa: B023 (called in this pass)
                    ball="ball" in options and norm == "fro", **bound)  # noqa: B023
                bounds[np.arange(len(bounds)), y[rest]] = np.inf
                confirmed[np.nonzero(rest)[0][(bounds > 0).all(-1)]] = True  # noqa: B023

            for refine in (False, True) if "refined" in options else (False,):
                rest = ~confirmed & (lower > 0)
                if not rest.any():
                    break
                confirm(rest, refine=refine)
            rest = ~confirmed & (lower > 0)
            if "optimised" in options:  # the stored slopes, on refined adaptive boxes
                alphas = _stored_slopes(witnesses, f"{name}/{norm}", graph, index, len(lower))
                report.claim(not isinstance(alphas, str), f"{where}: slopes {alphas}")
                if rest.any() and not isinstance(alphas, str):
                    confirm(rest, refine=True, adaptive=True,
                            alphas={i: a[rest] for i, a in alphas.items()})
                rest = ~confirmed & (lower > 0)
            if "deviation" in options and rest.any():  # section 9's bound, one evaluation
                bounds = margin_bounds(graph, index, [v[rest] for v in values], P[rest],
                                       lower[rest], y[rest], norm)
                if bounds is not None:
                    confirmed[np.nonzero(rest)[0][(bounds > 0).all(-1)]] = True
            bad = np.nonzero(~confirmed & (lower > 0))[0]
        report.claim(bad.size == 0, f"{where}: lower of inputs {_first(bad)} is not confirmed")
        check_thresholds(report, where, layer.matrix, claims["threshold"], float(lower.min()),
                         norm, graph.is_dense(index))


def _stored_slopes(witnesses, key: str, graph: NumpyGraph, index: int, n: int):
    """The stored ReLU slopes of one layer and norm (``<key>/slopes/<node>``), node index ->
    ``alpha`` ``(n, C, *x)`` (``-1``: CROWN's slope), or a reason they cannot be used: none
    stored, a node that is not a convex piecewise-linear activation downstream of the layer,
    a shape or type that does not fit it."""
    prefix, alphas = f"{key}/slopes/", {}
    names = {node.name: i for i, node in enumerate(graph.nodes)}
    downstream = set(graph.downstream(index))
    classes = graph.nodes[graph.output].shape[0]
    for stored in (k for k in witnesses.keys() if k.startswith(prefix)):
        node = stored[len(prefix):]
        i = names.get(node)
        twin = None if i is None else graph.nodes[i].twin
        if i not in downstream or not getattr(twin, "piecewise_linear", False) or \
                not 0 <= (twin.slope if twin.kind == "leaky_relu" else 0.0) <= 1:
            return f"{stored} name no ReLU or convex LeakyReLU downstream of the layer"
        codes = np.asarray(witnesses[stored])
        shape = (n, classes, *graph.nodes[i].shape)
        if codes.dtype != np.uint8 or codes.shape != shape:
            return f"{stored} are {codes.dtype} of shape {codes.shape}, need uint8 {shape}"
        alphas[i] = np.where(codes == SLOPE_ADAPTIVE, -1.0, codes / SLOPE_STEPS)
    return alphas or f"{prefix}* are missing from the witnesses file"


def _stored_witness(witnesses, key: str, shape: tuple[int, ...]):
    """``("full", D)`` or ``("factors", left, right)`` from the stored arrays, or a reason
    they do not fit the layer."""
    if f"{key}/full" in witnesses:
        D = np.asarray(witnesses[f"{key}/full"])
        if D.shape != shape:
            return f"has shape {D.shape}, the layer needs {shape}"
        return ("full", D)
    if f"{key}/left" in witnesses and f"{key}/right" in witnesses:
        left, right = (np.asarray(witnesses[f"{key}/{side}"]) for side in ("left", "right"))
        if (left.shape, right.shape) != (shape[:2], shape[::2]):
            return (f"has factors of shapes {left.shape} and {right.shape}, the layer needs "
                    f"{shape[:2]} and {shape[::2]}")
        return ("factors", left, right)
    return "is missing from the witnesses file"


def _check_witnesses(report: Report, where: str, witnesses, key: str, graph: NumpyGraph,
                     index: int, values, P, W, upper, y, bias: bool) -> None:
    found = np.isfinite(upper)
    stored = _stored_witness(witnesses, key, (len(P), *W.shape))
    if isinstance(stored, str):
        report.claim(not found.any(), f"{where}: the witness {key} {stored} (bias_perturbed="
                     f"{bias}), so no upper is supported")
        return
    with np.errstate(invalid="ignore", over="ignore"):
        if stored[0] == "full":
            D = stored[1].astype(np.float64)
            Z = np.matmul(W[None] + D, P)  # (W~ + D) P~
            norms = {"fro": np.linalg.norm(D, axis=(1, 2)), "max": np.abs(D).max(axis=(1, 2))}
            finite = np.isfinite(D).all(axis=(1, 2))
        else:
            left, right = (a.astype(np.float64) for a in stored[1:])
            Z = np.matmul(W, P) + left[:, :, None] * np.einsum("bn,bnl->bl", right, P)[:, None]
            norms = {"fro": np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1),
                     "max": np.abs(left).max(axis=1) * np.abs(right).max(axis=1)}
            finite = np.isfinite(left).all(axis=1) & np.isfinite(right).all(axis=1)
        layer = graph.layer(index)
        if not bias:
            Z = Z + layer.bias[:, None]
        logits = graph.run(index, layer.uncolumns(Z), values)
        # The best other class against y: a change where positive. Within WITNESS_TIE of a
        # tie the two implementations may round either way (a search can end exactly on the
        # boundary), so only a clear verdict refutes.
        rows = np.arange(len(y))
        top = logits[rows, y]
        others = np.where(np.arange(logits.shape[1]) == y[:, None], -np.inf, logits).max(axis=1)
        tie = WITNESS_TIE * (np.abs(np.where(np.isfinite(logits), logits, 0)).max(axis=1) + 1)
        kept, flipped = others - top < -tie, others - top > tie
    norm = key.rsplit("/", 1)[1]
    bad = np.nonzero(found & (kept | ~finite | np.isnan(others - top)))[0]
    report.claim(bad.size == 0, f"{where}: witnesses of inputs {_first(bad)} do not change the "
                 "class")
    bad = np.nonzero(found & ~np.isclose(norms[norm], upper, rtol=SLACK, atol=0))[0]
    report.claim(bad.size == 0, f"{where}: upper of inputs {_first(bad)} is not the witness's "
                 "norm")
    hidden = np.nonzero(~found & finite & flipped)[0]
    report.claim(hidden.size == 0, f"{where}: upper is null for inputs {_first(hidden)}, but "
                 "their stored perturbation changes the class: upper is its norm")


def _check_estimate(report: Report, where: str, estimate, graph: NumpyGraph, index: int,
                    values, P, y, norm: str) -> None:
    """``min_j m_j / ||g_j P~^T||_dual`` with ``g_j = d m_j / d Z`` (section 3)."""
    logits = values[-1]
    B, classes = logits.shape
    C = np.eye(classes)[y][:, None, :] - np.eye(classes)[None]  # e_y - e_j
    g = margin_gradients(graph, index, values, C)
    g = graph.layer(index).columns(g.reshape(B * classes, *g.shape[2:]))
    g = g.reshape(B, classes, *g.shape[1:])  # (B, C, m, L)
    if P.shape[-1] == 1:  # dense: ||g h^T|| = ||g|| ||h|| (l2, or l1 for the entrywise sum)
        ord = 2 if norm == "fro" else 1
        dual = np.linalg.norm(g[..., 0], ord=ord, axis=-1) * \
            np.linalg.norm(P[:, None, :, 0], ord=ord, axis=-1)
    elif norm == "fro":  # ||g P^T||_F^2 = <g, g P^T P>
        gram = np.matmul(P.transpose(0, 2, 1), P)[:, None]
        dual = np.sqrt(np.maximum((np.matmul(g, gram) * g).sum(axis=(-2, -1)), 0))
    else:
        dual = np.stack([np.abs(np.matmul(g[:, j], P.transpose(0, 2, 1))).sum(axis=(-2, -1))
                         for j in range(classes)], axis=1)
    m = logits[np.arange(B), y][:, None] - logits
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = m / dual
    ratio[np.arange(B), y] = np.inf
    value = np.where(np.isnan(ratio), np.inf, ratio).min(axis=-1)
    same = np.where(np.isfinite(value) & np.isfinite(estimate),
                    np.isclose(value, estimate, rtol=ESTIMATE_SLACK, atol=0),
                    np.isinf(value) == np.isinf(estimate))
    bad = np.nonzero(~same)[0]
    report.claim(bad.size == 0, f"{where}: estimate of inputs {_first(bad)} is not the "
                 "first-order value")
