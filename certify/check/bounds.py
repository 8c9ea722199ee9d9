"""The numpy twin of the single-layer bounds: global Lipschitz, local (interval, CROWN and
the interval Jacobian on the section-4 region) and the exact last layer (THEORY.md
sections 3 to 5, 8).

An independent re-implementation, in float64 numpy on a ``NumpyGraph``, of what
``certify.radii.radius``, ``certify.bounds.lipschitz`` and ``certify.bounds.linear`` compute in torch,
with the same relaxations so that it confirms the radii they claim: ``certify.check.claims``
evaluates these at a certificate's claimed radius. Every node that does not depend on the
perturbed layer is a constant of the map (its unperturbed value in ``values``).

Floating point: every interval and bound is widened by ``ROUND`` times the magnitudes that
entered it (relative 1e-10, far above float64 rounding); operator norms and region scales
are upper bounds (``spectral_upper``: LAPACK's sigma_1 plus ``8 max(m, n) eps sigma_1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from certify.check.forward import NumpyGraph
from certify.check.operators import ROUND, AffineTwin
from certify.check.operators.base import row_sum, spectral_upper
from certify.check.operators.enclosure import Enclosure
from certify.check.regions import Region, WeightRegion

# -- global (section 5) --------------------------------------------------------------------

def node_constants(graph: NumpyGraph, start: int, norm: str) -> dict[int, tuple]:
    return {i: graph.nodes[i].twin.lipschitz(norm) for i in graph.downstream(start)[1:]}


def lipschitz_downstream(graph: NumpyGraph, start: int, norm: str, constants=None) -> list:
    """Every node's Lipschitz constant as a function of node ``start``'s value (``None``:
    it does not depend on it; ``inf`` after a softplus, which jumps)."""
    constants = node_constants(graph, start, norm) if constants is None else constants
    L = [None] * len(graph.nodes)
    L[start] = 1.0
    for i in graph.downstream(start)[1:]:
        node = graph.nodes[i]
        L[i] = node.twin.combine(norm, constants[i], [L[j] for j in node.inputs])
    return L


def class_rows(graph: NumpyGraph, y: np.ndarray, norm: str) -> tuple[np.ndarray, int]:
    """``||W_L^T (e_y - e_j)||`` (l2 for fro, l1 for max) ``(B, C)``, ``inf`` at ``y``, and
    the node whose constant multiplies them (the logits layer's input when it is dense);
    ``||e_y - e_j||`` and the output itself otherwise."""
    out = graph.nodes[graph.output].twin
    if isinstance(out, AffineTwin) and not out.is_conv:
        W = out.matrix
        ord = 2 if norm == "fro" else 1
        rows = np.linalg.norm(W[y][:, None, :] - W[None], ord=ord, axis=-1) * \
            (1 + W.shape[1] * 1e-15)
        node = graph.input_of(graph.output)
    else:
        C = graph.nodes[graph.output].shape[0]
        rows = np.full((len(y), C), math.sqrt(2) * (1 + 1e-15) if norm == "fro" else 2.0)
        node = graph.output
    rows[np.arange(len(y)), y] = np.inf
    return rows, node


def columns(layer: AffineTwin, h: np.ndarray, bias: bool) -> np.ndarray:
    """``P~`` ``(B, n, L)``: the layer input as columns, a row of ones for the bias."""
    P = layer.patches(h)
    return np.concatenate([P, np.ones_like(P[:, :1])], axis=1) if bias else P


def region_scale(P: np.ndarray, norm: str) -> np.ndarray:
    """``fro``: ``sigma_max(P~)`` per input (an upper bound); ``max``: ``||P~_:j||_1``
    ``(B, L)``."""
    if norm == "fro":
        if P.shape[-1] == 1:
            return np.linalg.norm(P[..., 0], axis=-1) * (1 + P.shape[1] * 1e-15)
        return np.array([spectral_upper(p) for p in P])
    return np.abs(P).sum(axis=1) * (1 + P.shape[1] * 1e-15)


def section4_region(layer: AffineTwin, z, P, norm: str) -> Region:
    """``certify.radii.local_search.region`` in numpy: the Z-space ball or box for one column, the
    reachable set ``{D P~}`` (``WeightRegion``) for several."""
    scale = region_scale(P, norm)
    if norm == "fro":
        unit = scale
    else:
        B, L = scale.shape
        unit = layer.uncolumns(np.ascontiguousarray(
            np.broadcast_to(scale[:, None, :], (B, layer.weight.shape[0], L))))
    if P.shape[-1] == 1:
        return Region(z, norm, unit)
    return WeightRegion(z, norm, unit, P, layer)


def global_lower(graph: NumpyGraph, index: int, P, y, margins, norm: str) -> np.ndarray:
    """``min_j m_j / (||W_L^T c_j|| L scale(P~))`` (section 5)."""
    rows, node = class_rows(graph, y, norm)
    lip = lipschitz_downstream(graph, index, norm)[node]
    scale = region_scale(P, norm)
    if norm == "max":
        scale = scale.max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(np.isfinite(margins), margins / (rows * lip), np.inf)
        return bound.min(axis=-1) / scale


# -- local (sections 4, 8) -----------------------------------------------------------------

@dataclass
class Linear:
    """Rows ``A z + d +- e``; ``size`` the magnitude rounding is measured against."""

    A: np.ndarray | None
    d: np.ndarray
    e: np.ndarray
    size: np.ndarray


def backward(graph: NumpyGraph, start: int, seeds: dict, d, boxes, values, lower,
             balls: dict | None = None, alphas: dict | None = None) -> Linear:
    """Rows ``seeds`` (node -> ``(B, R, *shape)``) walked back to node ``start`` through
    every operator's linear rule; rows on constants enter ``d``. ``balls`` (node ->
    ``(center, radius)``), with ``lower``: an activation's offset is the larger of its
    lines' and SDP-CROWN's over box and ball (``ActivationTwin.ball_offset``). ``alphas``
    (node -> rows like its ``A``): an activation's lower slopes (``ActivationTwin.backward``)."""
    e, size = np.zeros_like(d), np.abs(d)
    rows = dict(seeds)
    moving = set(graph.downstream(start))

    def constant(j, R):
        nonlocal d, size
        d = d + row_sum(R * values[j][:, None])
        size = size + row_sum(np.abs(R) * np.abs(values[j])[:, None])

    for i in sorted(rows, reverse=True):
        if i not in moving:
            constant(i, rows.pop(i))
    for i in reversed(graph.downstream(start)):
        if i == start or i not in rows:
            continue
        node = graph.nodes[i]
        A = rows.pop(i)
        box = [boxes[j] for j in node.inputs]
        if alphas and i in alphas:
            inputs, d_add, e_add = node.twin.backward(A, box, lower, alpha=alphas[i])
        else:
            inputs, d_add, e_add = node.twin.backward(A, box, lower)
        source = node.inputs[0]
        if lower and balls and source in balls and getattr(node.twin, "piecewise_linear", False):
            offset = node.twin.ball_offset(A, inputs[0], boxes[source], *balls[source])
            d_add = np.maximum(d_add - (0 if e_add is None else e_add), offset)
            e_add = None
        if d_add is not None:
            d, size = d + d_add, size + np.abs(d_add)
        if e_add is not None:
            e, size = e + e_add, size + e_add
        for j, R in zip(node.inputs, inputs):
            if R is None:
                continue
            if j in moving:
                rows[j] = rows[j] + R if j in rows else R
            else:
                constant(j, R)
    return Linear(rows.get(start), d, e, size)


def _concretise(f: Linear, region: Region, rho):
    center, size, spread = f.d, f.size, f.e
    if f.A is not None:
        value, magnitude = region.value(f.A)
        center, size = center + value, size + magnitude
        spread = spread + rho[:, None] * region.dual(f.A)
    return center, spread, ROUND * (size + spread)


def _refine(graph, start, i, wanted, boxes, values, region, rho, adaptive=False):
    """Backward-pass bounds of node ``i``'s ``wanted`` entries, intersected with its box:
    the two-sided pass, and with ``adaptive`` the lower bounds of the rows and of their
    negatives under CROWN's adaptive lines too."""
    lo, hi = boxes[i]
    B = len(lo)
    flat_lo, flat_hi = lo.reshape(B, -1).copy(), hi.reshape(B, -1).copy()
    wanted = wanted.reshape(B, -1)
    k = int(wanted.sum(-1).max())
    if k == 0:
        return lo, hi
    order = np.argsort(~wanted, axis=-1, kind="stable")[:, :k]
    twin = graph.nodes[i].twin

    def bounds(sign, lower):
        if i != start and isinstance(twin, AffineTwin) and graph.is_dense(i):
            f = backward(graph, start, {graph.input_of(i): sign * twin.matrix[order]},
                         sign * twin.bias[order], boxes, values, lower=lower)
        else:
            A = np.zeros((B, k, flat_lo.shape[1]))
            np.put_along_axis(A, order[..., None], sign, axis=-1)
            f = backward(graph, start, {i: A.reshape(B, k, *lo.shape[1:])}, np.zeros((B, k)),
                         boxes, values, lower=lower)
        center, spread, slack = _concretise(f, region, rho)
        return center - spread - slack, center + spread + slack

    below, above = bounds(1.0, False)
    if adaptive:
        below = np.maximum(below, bounds(1.0, True)[0])
        above = np.minimum(above, -bounds(-1.0, True)[0])
    # Only the wanted entries (the padding would make the bound depend on the batch).
    hit = np.take_along_axis(wanted, order, -1)
    old_lo = np.take_along_axis(flat_lo, order, -1)
    old_hi = np.take_along_axis(flat_hi, order, -1)
    new_lo = np.where(hit, np.maximum(old_lo, below), old_lo)
    new_hi = np.where(hit, np.minimum(old_hi, above), old_hi)
    np.put_along_axis(flat_lo, order, new_lo, -1)
    np.put_along_axis(flat_hi, order, new_hi, -1)
    return flat_lo.reshape(lo.shape), flat_hi.reshape(hi.shape)


def _feeds_nonlinear(graph: NumpyGraph, i: int) -> bool:
    return any(graph.nodes[c].twin.nonlinear for c in graph.consumers[i])


def enclosed(graph: NumpyGraph, start: int) -> list[int]:
    """The nodes that carry forward enclosures: up to the last one that feeds a nonlinear
    operator and lies behind a nonlinear or affine node after ``start``."""
    nodes = list(graph.downstream(start)[1:])
    behind, last = set(), -1
    for k, i in enumerate(nodes):
        node = graph.nodes[i]
        if node.twin.nonlinear or isinstance(node.twin, AffineTwin) or \
                any(j in behind for j in node.inputs):
            behind.add(i)
        if i in behind and i != graph.output and _feeds_nonlinear(graph, i):
            last = k
    return nodes[:last + 1]


def intermediate_bounds(graph: NumpyGraph, start: int, region: Region, rho, values,
                        refine: bool, enclose: bool = False,
                        adaptive: bool = False) -> tuple[dict, dict]:
    """Boxes of every downstream node over ``z + rho U`` (and points for the constants
    they read), and for the l2 ball the reaches (node -> ``r >= ||x_i - nominal_i||_2``):
    interval propagation, for the l2 ball intersected with the reach bounds of
    affine layers (``r_i >= ||x_i - nominal_i||_2``: the operators' l2 constants or the
    box's farthest corner); with ``enclose``, intersected with the bounds of forward
    enclosures (``certify.check.operators.enclosure``) on the nodes of ``enclosed``; for
    nodes feeding a nonlinear operator, refined by backward passes (``refine``; with
    CROWN's adaptive lines too when ``adaptive``) on the entries their consumers mark
    unstable."""
    forward = set(enclosed(graph, start)) if enclose else set()
    enclosures = {start: Enclosure(region.z, np.zeros_like(region.z), region.coefficients(),
                                   None, np.abs(region.z))} if forward else {}
    pending = {j: len(graph.consumers[j]) for j in forward | {start}} if forward else {}
    box = region.box(rho)
    boxes = {start: (region.z - box, region.z + box)}
    ball = region.norm == "fro"
    reach = {start: rho * region.unit} if ball else {}
    constants = node_constants(graph, start, "fro") if ball else {}
    moving = set(graph.downstream(start))
    for i in graph.downstream(start)[1:]:
        node = graph.nodes[i]
        for j in node.inputs:
            if j not in moving and j not in boxes:
                boxes[j] = (values[j], values[j])
        lo, hi = node.twin.interval(*[boxes[j] for j in node.inputs])
        if ball:
            if isinstance(node.twin, AffineTwin):
                j = node.inputs[0]
                r_lo, r_hi = node.twin.reach_interval(boxes[j], values[j], reach[j])
                lo, hi = np.maximum(lo, r_lo), np.minimum(hi, r_hi)
            corner = np.maximum(hi - values[i], values[i] - lo).reshape(len(lo), -1)
            reaches = [reach.get(j) for j in node.inputs]
            with np.errstate(invalid="ignore"):  # inf (softplus) times a zero reach
                combined = node.twin.combine("fro", constants[i], reaches)
            local = node.twin.local_reach([boxes[j] for j in node.inputs], reaches,
                                          [values[j] for j in node.inputs])
            if local is not None:
                combined = np.minimum(combined, local)
            reach[i] = np.minimum(combined, np.linalg.norm(corner, axis=-1) * (1 + ROUND))
        if i in forward:
            enclosure = node.twin.enclose([enclosures[j] if j in moving else
                                           Enclosure.point(values[j]) for j in node.inputs],
                                          [boxes[j] for j in node.inputs])
            if enclosure is not None:
                e_lo, e_hi = enclosure.bounds(rho, region.norm)
                lo, hi = np.maximum(lo, e_lo), np.minimum(hi, e_hi)
            enclosures[i] = enclosure
            for j in node.inputs:  # free the coefficients no later node reads
                if j in pending:
                    pending[j] -= 1
                    if not pending[j]:
                        del enclosures[j]
        boxes[i] = (lo, hi)
        consumers = [graph.nodes[c].twin for c in graph.consumers[i]
                     if graph.nodes[c].twin.nonlinear] if refine and i != graph.output else []
        if consumers:
            wanted = np.zeros(lo.shape, dtype=bool)
            for twin in consumers:
                wanted |= twin.unstable(lo, hi)
            boxes[i] = _refine(graph, start, i, wanted, boxes, values, region, rho, adaptive)
        if i in forward and enclosures[i] is None:
            enclosures[i] = Enclosure.box(*boxes[i])
    return boxes, reach


def _interval_add(a, b):
    (a_lo, a_hi), (b_lo, b_hi) = a, b
    return (a_lo + b_lo - ROUND * (np.abs(a_lo) + np.abs(b_lo)),
            a_hi + b_hi + ROUND * (np.abs(a_hi) + np.abs(b_hi)))


def class_vectors(graph: NumpyGraph, y: np.ndarray) -> np.ndarray:
    """``e_y - e_j`` for every class ``j``, ``(B, C, C)``."""
    eye = np.eye(graph.nodes[graph.output].shape[0])
    return eye[y][:, None, :] - eye[None]


def jacobian_slope(graph: NumpyGraph, start: int, region: Region, boxes, y):
    """``|m_j(z + dz) - m_j(z)| <= rho' slope_j`` on the region (mean value theorem): the
    interval Jacobian of the margins walked back by the operators' ``jacobian`` rules, its
    largest magnitudes ``J`` bounding ``<J, |dz|>`` (``dual_of_magnitude``); ``None`` where an
    operator has none (max pooling)."""
    C = class_vectors(graph, y)
    rows = {graph.output: (C, C)}
    moving = set(graph.downstream(start))
    for i in reversed(graph.downstream(start)):
        if i == start or i not in rows:
            continue
        node = graph.nodes[i]
        out = node.twin.jacobian(rows.pop(i), [boxes[j] for j in node.inputs])
        if out is None:
            return None
        for j, R in zip(node.inputs, out):
            if j in moving:
                rows[j] = _interval_add(rows[j], R) if j in rows else R
    if start not in rows:
        return np.zeros(C.shape[:2])
    lo, hi = rows[start]
    return region.dual_of_magnitude(np.maximum(np.abs(lo), np.abs(hi))) * (1 + ROUND)


def _interval_margins(graph: NumpyGraph, boxes, y) -> np.ndarray:
    """Interval lower bound of the margins: through the dense logits layer's class rows on
    its input box, else ``lo_y - hi_j``."""
    out = graph.nodes[graph.output].twin
    if isinstance(out, AffineTwin) and not out.is_conv and graph.input_of(graph.output) in boxes:
        W, b = out.matrix, out.bias
        C, c = W[y][:, None, :] - W[None], b[y][:, None] - b[None]
        lo, hi = boxes[graph.input_of(graph.output)]
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        size = np.einsum("bcn,bn->bc", np.abs(C), np.abs(center) + radius) + np.abs(c)
        return np.einsum("bcn,bn->bc", C, center) + c - \
            np.einsum("bcn,bn->bc", np.abs(C), radius) - ROUND * size
    lo, hi = boxes[graph.output]
    top = np.take_along_axis(lo, y[:, None], -1)
    return top - hi - ROUND * (np.abs(top) + np.abs(hi))


# Coefficients of one enclosure held at once (256 MiB in float64).
ENCLOSURE_ENTRIES = 2**25


def local_lower_bounds(graph: NumpyGraph, index: int, values, P, rho, y, norm: str,
                       refine: bool, enclose: bool = False, ball: bool = False,
                       alphas: dict | None = None, adaptive: bool = False) -> np.ndarray:
    """Lower bounds ``(B, C)`` of every margin over the section-4 region of radius ``rho``
    around layer ``index``'s output: the best of the CROWN line, the interval-Jacobian line
    and interval arithmetic (``certify.bounds.linear.margin_lines``, recomputed in numpy);
    ``enclose``: with forward enclosures, for at most ``ENCLOSURE_ENTRIES`` coefficients at
    a time; ``ball`` (``fro``): the activations' offsets over the balls of their inputs'
    reaches too; ``alphas`` (node -> ``(B, C, *x)``): the CROWN line's lower ReLU slopes
    (``certify.bounds.slopes``); ``adaptive``: the refinement with CROWN's adaptive lines
    too. ``P``: the layer's ``P~`` (``columns``)."""
    region = section4_region(graph.layer(index), values[index], P, norm)
    if enclose:
        widest = max([int(np.prod(graph.nodes[i].shape)) for i in enclosed(graph, index)],
                     default=1)
        chunk = max(1, ENCLOSURE_ENTRIES // (region.dimension * widest))
        if len(y) > chunk:
            return np.concatenate([local_lower_bounds(
                graph, index, [v[k:k + chunk] for v in values], P[k:k + chunk],
                rho[k:k + chunk], y[k:k + chunk], norm, refine, True, ball,
                None if alphas is None else {i: a[k:k + chunk] for i, a in alphas.items()},
                adaptive)
                for k in range(0, len(y), chunk)])
    boxes, reach = intermediate_bounds(graph, index, region, rho, values, refine, enclose,
                                       adaptive)
    C = class_vectors(graph, y)
    balls = {i: (values[i], r) for i, r in reach.items()} if ball else None
    f = backward(graph, index, {graph.output: C}, np.zeros(C.shape[:2]), boxes, values, True,
                 balls, alphas)
    value, size = f.d - f.e, f.size + f.e
    if f.A is not None:
        at_z, magnitude = region.value(f.A)
        value = value + at_z - rho[:, None] * region.dual(f.A) * (1 + ROUND)
        size = size + magnitude
    best = np.maximum(value - ROUND * size, _interval_margins(graph, boxes, y))
    slope = jacobian_slope(graph, index, region, boxes, y)
    if slope is not None:  # anchored at the unperturbed margins
        logits = values[graph.output]
        m = np.take_along_axis(logits, y[:, None], -1) - logits
        tolerance = ROUND * (np.abs(logits).max(-1, keepdims=True) + np.abs(m))
        best = np.maximum(best, m - tolerance - rho[:, None] * slope)
    return best


# -- the last dense layer (section 3) -------------------------------------------------------

def exact_last_layer(h: np.ndarray, logits: np.ndarray, y: np.ndarray, norm: str,
                     bias: bool) -> np.ndarray:
    """``min_j m_j / (sqrt(2) ||h~||_2)`` or ``min_j m_j / (2 ||h~||_1)``."""
    if bias:
        h = np.concatenate([h, np.ones_like(h[:, :1])], axis=1)
    m = logits[np.arange(len(y)), y][:, None] - logits
    m[np.arange(len(y)), y] = np.inf
    denominator = math.sqrt(2) * np.linalg.norm(h, axis=1) if norm == "fro" else \
        2 * np.abs(h).sum(axis=1)
    with np.errstate(divide="ignore"):
        return m.min(axis=1) / denominator


# -- all layers at once (section 5) ---------------------------------------------------------

# Relative inflation of the multi-layer margin bound for its own rounding; the producer
# (certify.radii.multilayer) uses the same and leaves this much slack in the t it claims.
MULTILAYER_SAFETY = 1e-9


def multilayer_bound(graph: NumpyGraph, values, y: np.ndarray, budgets: np.ndarray, norm: str,
                     bias: bool) -> np.ndarray:
    """The section-5 recursion for every affine layer at once, ``(B, C)`` (0 at ``y``);
    ``budgets`` is ``(K, B)`` in ``graph.affine_indices`` order.

    Affine node: ``||dz|| <= (||W||_op + e g) ||dh|| + e s`` with ``s = sigma_max(P~)`` and
    ``g = sqrt(overlap)`` (fro, l2), or ``s = max_j ||P~_:j||_1`` and ``g`` the patch
    length (max, l_inf); other nodes combine their inputs' deviations with their Lipschitz
    constants; a dense logits layer: ``||W_L^T c_j|| ||dh|| + ||c_j|| e (s + g ||dh||)``,
    else ``||c_j|| ||Delta o||``.
    """
    with np.errstate(invalid="ignore"):  # inf (softplus) times a zero change: NaN, uncertified
        return _multilayer(graph, values, y, budgets, norm, bias)


def _multilayer(graph, values, y, budgets, norm, bias):
    budget = dict(zip(graph.affine_indices, budgets))
    rows, through = class_rows(graph, y, norm)
    rows[np.arange(len(y)), y] = 0.0
    dual = math.sqrt(2) if norm == "fro" else 2.0
    delta = [np.zeros(len(y))]
    for i, node in enumerate(graph.nodes[1:], start=1):
        twin = node.twin
        if not isinstance(twin, AffineTwin):
            delta.append(twin.combine(norm, twin.lipschitz(norm), [delta[j] for j in node.inputs]))
            continue
        P = columns(twin, values[node.inputs[0]], bias)
        scale = region_scale(P, norm)
        if norm == "max":
            scale = scale.max(axis=-1)
        growth = math.sqrt(twin.overlap) if norm == "fro" else P.shape[1] - bias
        e, h = budget[i], delta[node.inputs[0]]
        if i == graph.output and through != graph.output:
            bound = rows * h[:, None] + (dual * e * (scale + growth * h))[:, None]
            break
        delta.append((twin.operator_norm(norm) + e * growth) * h + e * scale)
    else:
        bound = rows * delta[graph.output][:, None]
    bound = bound * (1 + MULTILAYER_SAFETY)
    bound[np.arange(len(y)), y] = 0.0
    return bound
