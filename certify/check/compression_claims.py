"""``certify check``'s compression claims, in numpy: the thresholds of every layer
(THEORY.md section 6) and the ``compression_checks`` of ``certify model --compress``.

* thresholds: the compression error at the claimed level is below the layer's smallest
  ``lower``, and one level further it is not (up to ``THRESHOLD_SLACK`` and the producer's
  documented margins: the SVD slack of ``certify.closed_forms.thresholds``, the quantiser's rounding);
* ``compression_checks``: the compression applied again in numpy
  (``certify.check.compressions``) to the named layers of the graph's numpy twin: the layers
  it names, the inputs whose class changed (up to ties within ``TIE``), the weight errors,
  harmlessness per layer from the certificate's radii (the weight error, or the exact
  output change as a radius, below ``lower``), overall harmlessness (that of the one layer,
  or with several layers the section-5 all-layers bound, ``certify.check.bounds.
  multilayer_bound``, with budgets the numpy weight errors, up to ``JOINT_SLACK``), and
  ``violations``.
"""

from __future__ import annotations

import math

import numpy as np

from certify.certificate.schema import CertificateFormatError
from certify.check.bounds import multilayer_bound, region_scale
from certify.check.compressions import (cells, compress_matrices, error_norms, prune_count,
                                        strength_sets)
from certify.check.joint import joint_margin_bounds
from certify.closed_forms.compressions import parse_compression
from certify.closed_forms.thresholds import SVD_SLACK

SLACK = 1e-9  # relative tolerance for equalities between two float64 computations
THRESHOLD_SLACK = 1e-9  # relative margin of the threshold minimality checks
TIE = 1e-9  # relative logit gap below which two implementations may disagree on a class
# Relative slack on the budgets of the all-layers bound: the producer's budgets are upper
# bounds of these weight errors within (m n + 2) eps, its recursion agrees to ~1e-12, and
# the bound grows at least linearly with a common factor on every budget.
JOINT_SLACK = 1e-6
EPS = np.finfo(np.float64).eps


def radii_array(values) -> np.ndarray:
    """A certificate's per-input numbers, ``null`` as ``inf``."""
    return np.array([np.inf if v is None else v for v in values], dtype=np.float64)


def first_indices(indices: np.ndarray) -> str:
    return f"{indices[:5].tolist()}" + (f" (and {indices.size - 5} more)" if indices.size > 5 else "")


_first = first_indices


def check_thresholds(report, where: str, W: np.ndarray, t: dict, radius: float, norm: str,
                     dense: bool) -> None:
    """Each level is safe against ``radius`` (the layer's smallest ``lower``), and the next
    stricter level is not: truncation to ``rank - 1``, ``bits - 1`` bits (or 64 bits when
    ``bits`` is ``null``), pruning one weight more. The stricter levels are compared with
    the producer's documented margins (SVD slack, rounding of the quantiser) added. The
    Frobenius radius of a dense layer on a vector bounds the spectral error of truncation;
    with several columns (a convolution, a dense layer over a sequence) the Frobenius one."""
    s = np.linalg.svd(W, compute_uv=False)
    tail = np.sqrt(np.cumsum((s ** 2)[::-1])[::-1])

    def truncation(rank: int) -> float:
        if rank >= len(s):
            return 0.0
        return float(tail[rank] if norm == "fro" and not dense else s[rank])
    rank = t["rank"]
    report.claim(truncation(rank) == 0 or truncation(rank) < radius,
                 f"{where}: rank {rank} error {truncation(rank)} >= {radius}")
    svd_slack = 2 * SVD_SLACK * max(W.shape) * EPS * s[0] * math.sqrt(len(s))
    report.claim(rank == 0 or truncation(rank - 1) + svd_slack >= radius * (1 - THRESHOLD_SLACK),
                 f"{where}: rank {rank} is not the smallest safe rank ({rank - 1} is safe too)")
    per_entry = radius / math.sqrt(W.size) if norm == "fro" else radius
    for key, per_channel in (("bits", False), ("bits_per_channel", True)):
        top = np.abs(W).max(axis=1) if per_channel else np.abs(W).max()

        def error(bits: int, top=top) -> float:
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

def _reach(E: np.ndarray, layer, P: np.ndarray) -> dict[str, np.ndarray]:
    """The output change ``E P`` as a weight radius per input: the smallest radius whose
    section-4 region (``||dZ||_F <= rho sigma_max(P)``, ``|dZ_ij| <= rho ||P_:j||_1``)
    contains it (a grouped layer's rows keep their own group's blocks)."""
    delta = layer.columns(layer.uncolumns(E @ P))
    return {"fro": np.linalg.norm(delta, axis=(-2, -1)) / region_scale(P, "fro"),
            "max": (np.abs(delta).max(axis=1) / region_scale(P, "max")).max(axis=-1)}


def check_compression(report, entry: dict, graph, values, predicted, lower: dict) -> None:
    """Apply the compression again in numpy and confront every field with the result;
    ``graph`` is the model's ``NumpyGraph``, ``values`` its node values on the inputs."""
    try:
        compression = parse_compression(entry["compression"])
    except ValueError as err:
        raise CertificateFormatError(f"compression_checks: {err}") from None
    where = f"compression {entry['compression']}"
    names = [graph.nodes[i].name for i in graph.affine_indices]
    unknown = [name for name in compression.layers or () if name not in names]
    if unknown:
        report.claim(False, f"{where}: the model has no affine layer {unknown}")
        return
    indices = [i for i in graph.affine_indices
               if compression.layers is None or graph.nodes[i].name in compression.layers]
    chosen = [graph.nodes[i].name for i in indices]
    report.claim(entry["layers"] == chosen, f"{where}: layers {entry['layers']} are not the "
                 f"compressed layers {chosen}")
    small, errors, reach = graph, {}, {}
    compressed = compress_matrices([graph.layer(i).matrix for i in indices], compression.kind,
                                   compression.level)
    for i, G in zip(indices, compressed):
        W = graph.layer(i).matrix
        errors[graph.nodes[i].name] = (error_norms(W - G), graph.is_dense(i))
        reach[graph.nodes[i].name] = _reach(W - G, graph.layer(i), graph.layer(i).patches(
            values[graph.input_of(i)]))
        small = small.with_weight(i, G)
    n = len(predicted)
    logits = small(values[0])
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > TIE * (np.abs(logits).max(axis=1) + 1)
    changed = logits.argmax(axis=1) != predicted
    claimed_changed = np.zeros(n, dtype=bool)
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
        lenient = np.zeros(n, dtype=bool)
        strict = np.zeros(n, dtype=bool)
        for norm, radius in lower[name].items():
            zero = error[norm] == 0
            lenient |= zero | (error[norm] * (1 - 1e-6) < radius) | \
                (reach[name][norm] * (1 - 1e-6) < radius)
            strict |= zero | (error[norm] * (1 + 1e-6) < radius) | \
                (reach[name][norm] * (1 + 1e-6) < radius)
        harmless[name] = lenient
        claimed = np.array(entry["harmless_per_layer"].get(name, [False] * n), dtype=bool)
        bad = np.nonzero((claimed & ~lenient) | (~claimed & strict))[0]
        report.claim(bad.size == 0, f"{where}: harmless_per_layer of {name} is wrong for inputs "
                     f"{_first(bad)} (weight error and output change against their certified "
                     "radius)")
    jointly = _claimed(entry, "jointly", n)
    # The change made: confirmed on the compressed model itself (its class, clear of ties).
    bad = np.nonzero(jointly & changed & clear)[0]
    report.claim(bad.size == 0, f"{where}: inputs {_first(bad)} are claimed jointly harmless "
                 "but the compressed model changes their class")
    check_strength(report, f"{where}: ", _claimed(entry, "strength", n), graph, values, predicted,
                   indices, compressed, compression)
    claimed = entry["harmless"]
    if claimed is None or entry["violations"] is None:
        # Certificates before the all-layers bound left both null for several layers: that
        # claims nothing, and is no error.
        report.claim(len(chosen) > 1 and claimed is None and entry["violations"] is None,
                     f"{where}: harmless and violations are due")
        return
    claimed = np.array(claimed, dtype=bool)
    if len(chosen) == 1:
        radii = np.array(entry["harmless_per_layer"].get(chosen[0]), dtype=bool)
        report.claim(np.array_equal(claimed, radii | jointly),
                     f"{where}: harmless is not harmless_per_layer of {chosen[0]} or jointly")
        certified = harmless[chosen[0]] | jointly
        why = "(weight error or output change below their radius, or the joint bound) yet " \
            "change class: a certificate is wrong"
    else:
        section5 = _jointly_certified(graph, values, predicted, indices, errors,
                                      1 - JOINT_SLACK)
        strict = _jointly_certified(graph, values, predicted, indices, errors, 1 + JOINT_SLACK)
        certified = section5 | jointly
        bad = np.nonzero((claimed & ~certified) | (~claimed & (strict | jointly)))[0]
        report.claim(bad.size == 0, f"{where}: harmless is wrong for inputs {_first(bad)} (the "
                     "all-layers bound of section 5 with budgets the weight errors, or jointly)")
        why = "by the all-layers bound or the joint bound yet change class: a bound is wrong"
    report.claim(entry["violations"] == int((claimed & claimed_changed).sum()),
                 f"{where}: violations is not the number of harmless inputs claimed changed")
    broken = np.nonzero(certified & changed & clear)[0]
    report.claim(broken.size == 0, f"{where}: inputs {_first(broken)} are certified harmless "
                 f"{why}")


def check_strength(report, where: str, claimed: np.ndarray, graph, values, predicted, indices,
                   compressed, compression) -> None:
    """Every input ``claimed`` safe against every compression of this strength is certified
    by the numpy twin of the joint bound (``certify.check.joint``) on the sets of
    ``certify.check.compressions.strength_sets`` (``compressed``: the nominal compression of
    the layers ``indices``)."""
    if not claimed.any():
        return
    sets = strength_sets([graph.layer(i).matrix for i in indices], compressed,
                         compression.kind, compression.level)
    bound = joint_margin_bounds(graph, values, predicted, dict(zip(indices, sets)))
    confirmed = np.zeros(len(claimed), dtype=bool) if bound is None else (bound > 0).all(axis=1)
    bad = np.nonzero(claimed & ~confirmed)[0]
    report.claim(bad.size == 0, f"{where}inputs {_first(bad)} are claimed safe against every "
                 "compression of this strength, but the joint bound of section 10 does not "
                 "confirm it")


def _claimed(entry: dict, key: str, n: int) -> np.ndarray:
    """A per-input list of booleans of the entry (all ``False`` where absent or null:
    certificates before the joint bound, or a model without remainder rules)."""
    value = entry.get(key)
    if value is None:
        return np.zeros(n, dtype=bool)
    if len(value) != n:
        raise CertificateFormatError(f"compression_checks: {key} must hold one boolean per "
                                     f"input ({n}), got {len(value)}")
    return np.array(value, dtype=bool)


def _jointly_certified(graph, values, y, indices, errors, scale: float) -> np.ndarray:
    """Inputs the section-5 bound certifies, in either norm, with budgets ``scale`` times the
    compressed layers' ``||E_k||_F`` (``fro``) or ``||E_k||_max`` (``max``), 0 elsewhere."""
    logits = values[-1]
    n = len(y)
    margins = logits[np.arange(n), y][:, None] - logits
    margins[np.arange(n), y] = np.inf
    certified = np.zeros(n, dtype=bool)
    for norm in ("fro", "max"):
        e = np.array([errors[graph.nodes[i].name][0][norm] if i in indices else 0.0
                      for i in graph.affine_indices])
        bound = multilayer_bound(graph, values, y, np.repeat(scale * e[:, None], n, axis=1),
                                 norm, bias=False)
        certified |= (bound < margins).all(axis=1)
    return certified


# -- whole_model: every layer at once (THEORY.md section 10) -------------------------------

def check_whole_model(report, whole: dict, graph, values, predicted) -> None:
    """Each input's claimed mildest level: every compression of that strength of all the
    affine layers at once is certified by the numpy twin of the joint bound
    (``certify.check.joint``), on the sets of ``certify.check.compressions``: the cells of
    that many bits, the pruning box of the ``ratio N`` smallest magnitudes (ties included),
    the balls ``t ||W_k||_F`` (or, for these, the section-5 bound); and each threshold is
    the strictest level claimed."""
    indices = list(graph.affine_indices)
    matrices = [graph.layer(i).matrix for i in indices]
    magnitudes = np.sort(np.concatenate([np.abs(W).ravel() for W in matrices]))
    for kind in ("bits", "bits_per_channel", "prune_global", "relative"):
        claimed = whole[kind]
        rows = np.array([i for i, v in enumerate(claimed) if v is not None and
                         (kind.startswith("bits") or v > 0)], dtype=np.int64)
        expected = None
        if rows.size:
            level = np.array([claimed[i] for i in rows], dtype=np.float64)
            expected = level.max() if kind.startswith("bits") else level.min()
            if kind.startswith("bits"):
                sets = [("box", cells(W, level, kind == "bits_per_channel")) for W in matrices]
            elif kind == "prune_global":
                k = np.rint(level * magnitudes.size).astype(np.int64)
                top = magnitudes[np.clip(k - 1, 0, None)][:, None, None]
                sets = [("box", np.where(np.abs(W) <= top, np.abs(W), 0.0)) for W in matrices]
            else:
                sets = [("ball", level * np.linalg.norm(W)) for W in matrices]
            bound = joint_margin_bounds(graph, [v[rows] for v in values], predicted[rows],
                                        dict(zip(indices, sets)))
            confirmed = np.zeros(rows.size, dtype=bool) if bound is None else \
                (bound > 0).all(axis=1)
            if kind == "relative":  # or by section 5 (the multilayer uniform budget)
                confirmed |= _section5(graph, [v[rows] for v in values], predicted[rows],
                                       level, matrices)
            bad = rows[~confirmed]
            report.claim(bad.size == 0, f"whole_model/{kind}: inputs {_first(bad)} are not "
                         "certified at their claimed level by the joint bound of section 10")
        report.claim(whole["threshold"][kind] == expected,
                     f"whole_model/threshold/{kind} is not the strictest level claimed")


def _section5(graph, values, y, level: np.ndarray, matrices) -> np.ndarray:
    """Inputs whose balls ``||E_k||_F <= level ||W_k||_F`` the section-5 bound certifies."""
    logits = values[-1]
    n = len(y)
    margins = logits[np.arange(n), y][:, None] - logits
    margins[np.arange(n), y] = np.inf
    e = np.array([np.linalg.norm(W) for W in matrices])[:, None] * level[None, :]
    bound = multilayer_bound(graph, values, y, e * (1 - JOINT_SLACK), "fro", bias=False)
    return (bound < margins).all(axis=1)
