"""Independent check of a certificate, in numpy float64 (not the torch path that made it).

Every claim the document makes is recomputed from the model's weights and the data, with
the numpy twins ``numpy_forward``, ``numpy_bounds`` and ``numpy_compression``:

* the document itself: well formed (``certify.schema``: JSON Schema, one entry per input
  everywhere) and about as many inputs as the data; otherwise nothing is claimed and
  ``CertificateFormatError`` or ``CheckInputError`` says why;
* ``predictions``: a numpy forward pass; ``labels`` (when present): the labels' hash, the
  misclassified inputs and the accuracy, from the data's ``y``;
* ``layers[].name`` and ``shape``: the model's affine layers, in order (BatchNorm folded);
* ``method``: ``exact`` on the last dense layer and only there; ``lower`` is checked by
  the method the certificate names (refined or not);
* ``upper``: the stored witness ``D`` (its shape must fit the layer and
  ``bias_perturbed``) changes the class in a numpy forward pass with ``W + D``, and
  ``||D||`` equals the claim; where ``upper`` is ``null`` the stored perturbation (the
  search's last iterate) must not change the class, else ``upper`` should be its norm;
* ``estimate``: the first-order value ``min_j m_j / ||g_j P~^T||_dual`` (section 3) with
  the exact numpy gradient ``g_j``, to ``ESTIMATE_SLACK`` relative;
* ``lower``, last dense layer: the exact class-pair formula (section 3); other layers:
  the numpy global Lipschitz bound (section 5) reaches it, or the numpy local bound
  (interval propagation, backward refinement when ``method`` says ``refined``, CROWN and
  the interval Jacobian) certifies the section-4 region of that radius; ``lower <= upper``;
* thresholds: the compression error at the claimed level is below the layer's smallest
  ``lower``, and one level further it is not (up to the margins of ``THRESHOLD_SLACK``);
* ``multilayer``: the section-5 recursion for all layers at once, evaluated at each
  claimed ``t`` (budgets ``t ||W~_k||``), certifies every input, and ``min`` is the least;
* ``compression_checks``: the compression applied again in numpy: the layers it names, the
  inputs whose class changed (up to ties within ``TIE``), the weight errors, harmlessness
  per layer and overall from the certificate's radii, and ``violations`` (which must be 0:
  a harmless input that changes class refutes the radii).

``tool_version`` and a compression check's ``note`` are free text, not claims.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from certify.certificate import array_sha256
from certify.compression import SVD_SLACK
from certify.compressed import parse_compression
from certify.network import Network
from certify.numpy_bounds import (exact_last_layer, global_lower, local_lower_bounds,
                                  multilayer_bound)
from certify.numpy_compression import compress_matrix, error_norms, prune_count
from certify.numpy_forward import columns, forward, layer_states, margin_gradients
from certify.schema import CertificateFormatError, validate

SLACK = 1e-9  # relative tolerance for equalities between two float64 computations
ESTIMATE_SLACK = 1e-6  # the estimate divides by a gradient norm from another implementation
THRESHOLD_SLACK = 1e-9  # relative margin of the threshold minimality checks
TIE = 1e-9  # relative logit gap below which two implementations may disagree on a class
EPS = np.finfo(np.float64).eps


class CheckInputError(ValueError):
    """The certificate does not fit the data (or labels) it is checked against."""


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


def _array(values) -> np.ndarray:
    return np.array([np.inf if v is None else v for v in values], dtype=np.float64)


def _first(indices: np.ndarray) -> str:
    return f"{indices[:5].tolist()}" + (f" (and {indices.size - 5} more)" if indices.size > 5 else "")


def check(document: dict, witnesses, network: Network, x: np.ndarray,
          y: np.ndarray | None = None) -> Report:
    """Recompute every claim of ``document`` (with its ``witnesses`` arrays) on ``network``
    and the inputs ``x`` (labels ``y`` when the certificate reports accuracy).

    Raises ``CertificateFormatError`` for a malformed document and ``CheckInputError`` when
    it does not cover these inputs; otherwise every claim ends up confirmed or refuted.
    """
    validate(document)
    x = np.asarray(x, dtype=np.float64)
    n = len(document["predictions"])
    if len(x) != n:
        raise CheckInputError(f"the certificate covers {n} inputs but the data has {len(x)}: "
                              "check it with the data (and the --limit) certify model used")
    report = Report()
    bias = document["bias_perturbed"]
    states = layer_states(network, x)
    values = [value for value, _ in states]
    logits = values[-1]
    predicted = logits.argmax(axis=1)
    wrong = np.nonzero(predicted != np.array(document["predictions"]))[0]
    report.claim(wrong.size == 0, f"predictions of inputs {_first(wrong)} differ from a numpy "
                 "forward pass")
    _check_labels(report, document.get("labels"), predicted, y)
    margins = logits[np.arange(n), predicted][:, None] - logits
    margins[np.arange(n), predicted] = np.inf
    names = [network.steps[i].name for i in network.affine_indices]
    if names != [e["name"] for e in document["layers"]]:
        report.claim(False, f"the certificate's layers {[e['name'] for e in document['layers']]}"
                     f" are not the model's affine layers {names}")
        return report
    _check_multilayer(report, document["multilayer"], network, values, predicted, margins, bias)
    for index, entry in zip(network.affine_indices, document["layers"]):
        _check_layer(report, entry, witnesses, network, index, states, predicted, margins, bias)
    lower = {e["name"]: {norm: _array(e[norm]["lower"]) for norm in ("fro", "max")}
             for e in document["layers"]}
    for entry in document.get("compression_checks", []):
        _check_compression(report, entry, network, x, predicted, lower)
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


def _check_multilayer(report: Report, claims: dict, network: Network, values, y, margins,
                      bias: bool) -> None:
    weights = [network.steps[i].matrix.numpy() for i in network.affine_indices]
    if bias:
        weights = [np.concatenate([W, network.steps[i].bias.numpy()[:, None]], axis=1)
                   for W, i in zip(weights, network.affine_indices)]
    sizes = {"fro": np.array([np.linalg.norm(W) for W in weights]),  # ||W~_k|| per norm
             "max": np.array([np.abs(W).max() for W in weights])}
    for norm in ("fro", "max"):
        t = _array(claims[norm]["uniform_budget"])
        where = f"multilayer, {norm}"
        valid = np.isfinite(t) & (t >= 0)
        budgets = sizes[norm][:, None] * np.where(valid, t, 0.0)[None, :]
        bound = multilayer_bound(network, values, y, budgets, norm, bias)
        certified = (bound < margins).all(axis=1) | (t == 0)  # t = 0 changes nothing
        bad = np.nonzero(~(valid & certified))[0]
        report.claim(bad.size == 0, f"{where}: uniform budget of inputs {_first(bad)} is not "
                     "certified by the all-layers recursion")
        report.claim(claims[norm]["min"] == float(t.min()), f"{where}: min is not the "
                     "smallest uniform budget")


# -- one layer ----------------------------------------------------------------------------

def _check_layer(report: Report, entry: dict, witnesses, network: Network, index: int, states,
                 y, margins, bias: bool) -> None:
    layer = network.steps[index]
    report.claim(entry["shape"] == list(layer.weight.shape), f"layer {layer.name}: shape "
                 f"{entry['shape']} is not the model's {list(layer.weight.shape)}")
    values = [value for value, _ in states]
    P, spatial = columns(layer, values[index], bias)
    W = layer.matrix.numpy()
    if bias:
        W = np.concatenate([W, layer.bias.numpy()[:, None]], axis=1)
    last = index == len(network.steps) - 1 and not layer.is_conv
    for norm in ("fro", "max"):
        claims = entry[norm]
        where = f"layer {layer.name}, {norm}"
        lower, upper = _array(claims["lower"]), _array(claims["upper"])
        report.claim((claims["method"] == "exact") == last,
                     f"{where}: method {claims['method']!r}, but the exact formula is the method "
                     f"of the last dense layer {'(this one)' if last else 'only'}")
        report.claim(bool(np.all(lower <= upper)), f"{where}: lower > upper")
        _check_witnesses(report, where, witnesses, f"{layer.name}/{norm}", network, index, states,
                         P, spatial, W, upper, y, bias)
        _check_estimate(report, where, _array(claims["estimate"]), network, index, states, P, y,
                        norm)
        if last:
            exact = exact_last_layer(values[index], values[-1], y, norm, bias)
            bad = np.nonzero(lower > exact * (1 + 1e-12))[0]
        else:
            confirmed = lower <= global_lower(network, index, P, y, margins, norm) * (1 + 1e-12)
            rest = ~confirmed & (lower > 0)
            if rest.any():
                stack = tuple(v[rest] for v in states[index + 1][1])
                bounds = local_lower_bounds(network, index, values[index + 1][rest], P[rest],
                                            lower[rest], y[rest], norm,
                                            refine="refined" in claims["method"], stack=stack)
                bounds[np.arange(len(bounds)), y[rest]] = np.inf
                confirmed[np.nonzero(rest)[0][(bounds > 0).all(-1)]] = True
            bad = np.nonzero(~confirmed & (lower > 0))[0]
        report.claim(bad.size == 0, f"{where}: lower of inputs {_first(bad)} is not confirmed")
        _check_thresholds(report, where, layer.matrix.numpy(), claims["threshold"],
                          float(lower.min()), norm, layer.is_conv)


def _stored_witness(witnesses, key: str, shape: tuple[int, ...]):
    """``(D P~ maker, norms)`` inputs from the stored arrays, or a reason they do not fit."""
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


def _check_witnesses(report: Report, where: str, witnesses, key: str, network: Network,
                     index: int, states, P, spatial, W, upper, y, bias: bool) -> None:
    found = np.isfinite(upper)
    stored = _stored_witness(witnesses, key, (len(P), *W.shape))
    if isinstance(stored, str):
        report.claim(not found.any(), f"{where}: the witness {key} {stored} (bias_perturbed="
                     f"{bias}), so no upper is supported")
        return
    if stored[0] == "full":
        D = stored[1]
        change = np.matmul(D, P)
        norms = {"fro": np.linalg.norm(D, axis=(1, 2)), "max": np.abs(D).max(axis=(1, 2))}
        finite = np.isfinite(D).all(axis=(1, 2))
    else:
        left, right = stored[1:]
        change = left[:, :, None] * np.einsum("bn,bnl->bl", right, P)[:, None, :]
        norms = {"fro": np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1),
                 "max": np.abs(left).max(axis=1) * np.abs(right).max(axis=1)}
        finite = np.isfinite(left).all(axis=1) & np.isfinite(right).all(axis=1)
    layer = network.steps[index]
    Z = np.matmul(W, P) + change
    if not bias:
        Z = Z + layer.bias.numpy()[:, None]
    Z = Z.reshape(len(P), W.shape[0], *spatial) if spatial else Z[..., 0]
    with np.errstate(invalid="ignore", over="ignore"):
        flipped = forward(network, Z, index + 1, states[index + 1][1]).argmax(axis=1) != y
    norm = key.rsplit("/", 1)[1]
    bad = np.nonzero(found & ~(flipped & finite))[0]
    report.claim(bad.size == 0, f"{where}: witnesses of inputs {_first(bad)} do not change the "
                 "class")
    bad = np.nonzero(found & ~np.isclose(norms[norm], upper, rtol=SLACK, atol=0))[0]
    report.claim(bad.size == 0, f"{where}: upper of inputs {_first(bad)} is not the witness's "
                 "norm")
    hidden = np.nonzero(~found & finite & flipped)[0]
    report.claim(hidden.size == 0, f"{where}: upper is null for inputs {_first(hidden)}, but "
                 "their stored perturbation changes the class: upper is its norm")


def _check_estimate(report: Report, where: str, estimate, network: Network, index: int, states,
                    P, y, norm: str) -> None:
    """``min_j m_j / ||g_j P~^T||_dual`` with ``g_j = d m_j / d Z`` (section 3)."""
    logits = states[-1][0]
    B, classes = logits.shape
    C = np.eye(classes)[y][:, None, :] - np.eye(classes)[None]  # e_y - e_j
    g = margin_gradients(network, index + 1, states, C).reshape(B, classes, -1, P.shape[-1])
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


def _check_thresholds(report: Report, where: str, W: np.ndarray, t: dict, radius: float,
                      norm: str, conv: bool) -> None:
    """Each level is safe against ``radius`` (the layer's smallest ``lower``), and the next
    stricter level is not: truncation to ``rank - 1``, ``bits - 1`` bits (or 64 bits when
    ``bits`` is ``null``), pruning one weight more. The stricter levels are compared with
    the producer's documented margins (SVD slack, rounding of the quantiser) added."""
    s = np.linalg.svd(W, compute_uv=False)
    tail = np.sqrt(np.cumsum((s ** 2)[::-1])[::-1])

    def truncation(rank: int) -> float:
        if rank >= len(s):
            return 0.0
        return float(tail[rank] if norm == "fro" and conv else s[rank])

    rank = t["rank"]
    report.claim(truncation(rank) == 0 or truncation(rank) < radius,
                 f"{where}: rank {rank} error {truncation(rank)} >= {radius}")
    svd_slack = 2 * SVD_SLACK * max(W.shape) * EPS * s[0] * math.sqrt(len(s))
    report.claim(rank == 0 or truncation(rank - 1) + svd_slack >= radius * (1 - THRESHOLD_SLACK),
                 f"{where}: rank {rank} is not the smallest safe rank ({rank - 1} is safe too)")
    per_entry = radius / math.sqrt(W.size) if norm == "fro" else radius
    for key, per_channel in (("bits", False), ("bits_per_channel", True)):
        top = np.abs(W).max(axis=1) if per_channel else np.abs(W).max()

        def error(bits: int) -> float:
            return float(np.max(top / (2 ** (bits - 1) - 1))) / 2

        bits = t[key]
        if bits is not None:
            report.claim(error(bits) == 0 or error(bits) < per_entry,
                         f"{where}: {bits} {key} not safe")
        stricter = 64 if bits is None else bits - 1
        if stricter >= 2:  # the producer's bound adds 4 eps relative, 3 eps max|W|, 2^-1072
            bound = error(stricter) * (1 + THRESHOLD_SLACK) + 4 * EPS * float(np.max(top)) + 1e-320
            report.claim(bound >= per_entry * (1 - THRESHOLD_SLACK),
                         f"{where}: {key} {bits} is not the smallest safe bit width")
    magnitudes = np.sort(np.abs(W), axis=None)

    def pruned(k: int) -> float:
        if norm == "fro":
            return float(np.linalg.norm(magnitudes[:k]))
        return float(magnitudes[:k].max(initial=0.0))

    k = prune_count(t["prune_ratio"], W.size)
    report.claim(pruned(k) == 0 or pruned(k) < radius,
                 f"{where}: prune ratio {t['prune_ratio']} not safe")
    report.claim(k == W.size or (pruned(k + 1) != 0 and pruned(k + 1) * (1 + THRESHOLD_SLACK)
                                 >= radius * (1 - THRESHOLD_SLACK)),
                 f"{where}: prune ratio {t['prune_ratio']} is not the largest safe ratio")


# -- compression checks -------------------------------------------------------------------

def _check_compression(report: Report, entry: dict, network: Network, x, predicted,
                       lower: dict) -> None:
    """Apply the compression again in numpy and confront every field with the result."""
    try:
        compression = parse_compression(entry["compression"])
    except ValueError as err:
        raise CertificateFormatError(f"compression_checks: {err}") from None
    where = f"compression {entry['compression']}"
    names = [network.steps[i].name for i in network.affine_indices]
    unknown = [name for name in compression.layers or () if name not in names]
    if unknown:
        report.claim(False, f"{where}: the model has no affine layer {unknown}")
        return
    indices = [i for i in network.affine_indices
               if compression.layers is None or network.steps[i].name in compression.layers]
    chosen = [network.steps[i].name for i in indices]
    report.claim(entry["layers"] == chosen, f"{where}: layers {entry['layers']} are not the "
                 f"compressed layers {chosen}")
    steps, errors = list(network.steps), {}
    for i in indices:
        step = steps[i]
        W = step.matrix.numpy()
        G = compress_matrix(W, compression.kind, compression.level)
        errors[step.name] = (error_norms(W - G), not step.is_conv)
        steps[i] = dataclasses.replace(step, weight=torch.from_numpy(G.reshape(step.weight.shape)))
    logits = forward(Network(tuple(steps)), x)
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > TIE * (np.abs(logits).max(axis=1) + 1)
    changed = logits.argmax(axis=1) != predicted
    claimed_changed = np.zeros(len(x), dtype=bool)
    claimed_changed[entry["changed"]] = True
    bad = np.nonzero((claimed_changed != changed) & clear)[0]
    report.claim(bad.size == 0, f"{where}: inputs {_first(bad)} are claimed changed (or not), "
                 "but the compressed model says otherwise")
    report.claim(set(entry["weight_error"]) == set(chosen) == set(entry["harmless_per_layer"]),
                 f"{where}: weight_error and harmless_per_layer must name exactly {chosen}")
    harmless = {}
    for name, (norms, dense) in errors.items():
        claimed = entry["weight_error"].get(name, {})
        wrong = [key for key, value in norms.items() if key not in claimed or not
                 value * (1 - SLACK) <= claimed[key] <= value * (1 + 1e-6) + 1e-300]
        report.claim(not wrong, f"{where}: weight_error of {name} ({', '.join(wrong)}) is not "
                     "an upper bound equal to the error up to rounding")
        # The Frobenius radius of a dense layer bounds the spectral norm (section 4).
        error = {"fro": norms["spectral" if dense else "fro"], "max": norms["max"]}
        lenient = np.zeros(len(x), dtype=bool)
        strict = np.zeros(len(x), dtype=bool)
        for norm, radius in lower[name].items():
            zero = error[norm] == 0
            lenient |= zero | (error[norm] * (1 - 1e-6) < radius)
            strict |= zero | (error[norm] * (1 + 1e-6) < radius)
        harmless[name] = lenient
        claimed = np.array(entry["harmless_per_layer"].get(name, [False] * len(x)), dtype=bool)
        bad = np.nonzero((claimed & ~lenient) | (~claimed & strict))[0]
        report.claim(bad.size == 0, f"{where}: harmless_per_layer of {name} is wrong for inputs "
                     f"{_first(bad)} (weight error against their certified radius)")
    if len(chosen) != 1:
        report.claim(entry["harmless"] is None and entry["violations"] is None,
                     f"{where}: {len(chosen)} layers compressed at once certify nothing, so "
                     "harmless and violations must be null")
        return
    claimed = entry["harmless"]
    if claimed is None or entry["violations"] is None:
        report.claim(False, f"{where}: one compressed layer: harmless and violations are due")
        return
    claimed = np.array(claimed, dtype=bool)
    report.claim(claimed.tolist() == entry["harmless_per_layer"].get(chosen[0]),
                 f"{where}: harmless differs from harmless_per_layer of {chosen[0]}")
    report.claim(entry["violations"] == int((claimed & claimed_changed).sum()),
                 f"{where}: violations is not the number of harmless inputs claimed changed")
    broken = np.nonzero(harmless[chosen[0]] & changed & clear)[0]
    report.claim(broken.size == 0, f"{where}: inputs {_first(broken)} are certified harmless "
                 "(weight error below their radius) yet change class: the radii are wrong")
