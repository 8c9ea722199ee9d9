"""CROWN-style linear bounds on the graph downstream of a layer (THEORY.md sections 4, 8).

Section 4 reduces a layer's weight robustness to the input robustness of the downstream
graph at the layer's output ``z``: the weight ball of radius ``rho`` becomes the region
``z + rho U`` of ``certify.bounds.regions`` (for a dense layer on a vector the l2 ball of radius
``sigma_max(P~)`` or the box ``|dz| <= ||P~_:j||_1``; for a layer with several columns the
reachable set ``{D P~}`` itself, concretised in weight space). This module bounds every
margin ``m_j = (e_y - e_j)^T o`` from below over that region.

Every node that does not depend on ``z`` is a constant of this map (its unperturbed value,
``values``). The passes walk the downstream nodes:

* forward, interval propagation: each operator's ``interval`` rule on its inputs' boxes
  (constants are points); for the l2 ball also the reach ``r_i >= ||x_i - nominal_i||_2``
  (the operators' l2 constants, or the box's farthest corner, whichever is smaller), which
  tightens affine layers (``Affine.reach_interval``);
* backward, linear functions ``A x + d``: rows on a node go through its operator's linear rule
  (``Operator.backward``) onto its inputs, rows from several consumers add up, rows on
  constants enter ``d``.

Intermediate bounds. The box of every node that feeds a nonlinear operator is tightened, for
the entries its consumers mark ``unstable``, by a backward pass to ``z`` concretised over the
region: ``A z + d +- (e + rho ||A||_U*)`` with ``||A||_U* = sup_{u in U} A u``
(``Region.dual``: ``sigma ||A||_2`` on the ball, ``|A| . box`` on the box, ``||A P~^T||``
in weight space). The two boxes are intersected. With ``enclose`` (layers with several
columns), every box is first intersected with the bounds of the node's forward enclosure,
two affine functions of ``vec D`` carried forward from ``Z + D P~`` by the operators'
``enclose`` rules (``certify.graph.operators.enclosure``): one pass of ``p`` directions bounds every
entry, where a backward pass bounds one.

Margins. The final pass gives ``m_j >= A_j z + d_j - rho' ||A_j||_U*`` for every
``rho' <= rho`` (the relaxations, made on the larger region, stay valid on a smaller one):
one pass yields the whole line, and the radius where it reaches zero. A second line comes
from the interval Jacobian (``jacobian_line``), a third bound from interval arithmetic. In
the l2 ball, the final pass may also bound each ReLU's offset over its box and the ball of
its input's reach together (``ball``: SDP-CROWN's offsets, ``Activation.ball_offset``):
the box alone lets every unstable neuron sit at its worst end at once, the ball does not.

Floating point: every interval and bound is widened by ``ROUND`` times the magnitudes that
entered it, far above float64 rounding of these sums (relative 1e-16 per operation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.bounds.lipschitz import node_constants
from certify.bounds.regions import Region
from certify.graph.graph import Graph
from certify.graph.operators import Affine
from certify.graph.operators.base import ROUND, interval_sum, row_sum
from certify.graph.operators.enclosure import Enclosure


@dataclass
class Linear:
    """Rows ``A z + d +- e`` (``A``: ``(B, R, *z)``; ``d``, ``e``: ``(B, R)``); ``A`` is
    ``None`` when the function does not depend on ``z``. ``size`` accumulates
    ``|A| |x| + |d|`` along the way, the magnitude that rounding is measured against."""

    A: torch.Tensor | None
    d: torch.Tensor
    e: torch.Tensor
    size: torch.Tensor


def backward(graph: Graph, start: int, seeds: dict, d: torch.Tensor, boxes: dict, values,
             lower: bool, balls: dict | None = None, alphas: dict | None = None) -> Linear:
    """Walk the rows ``seeds`` (node -> ``(B, R, *shape)``) back to node ``start``.

    ``boxes[i]`` bounds node ``i`` (every downstream node the walk meets); ``values`` are the
    unperturbed values (constants off the downstream sub-graph). ``lower``: CROWN's adaptive
    lines (a lower bound of ``A x + d``); otherwise ``A x + d +- e`` bounds both ways.
    ``balls[i]``: ``(center, radius)`` of an l2 ball containing node ``i``'s values as well;
    with ``lower``, an activation reading node ``i`` takes the larger of its lines' offset
    and the offset over box and ball together (``Activation.ball_offset``, SDP-CROWN's).
    ``alphas[i]``: the lower slopes of activation node ``i``'s unstable entries, per row
    (``Activation.backward``'s ``alpha``; ``certify.bounds.slopes``).
    """
    e = torch.zeros_like(d)
    size = d.abs()
    rows = dict(seeds)
    moving = set(graph.downstream(start))
    for i in sorted(rows, reverse=True):  # constants seeded directly
        if i not in moving:
            A = rows.pop(i)
            d = d + row_sum(A * values[i][:, None])
            size = size + row_sum(A.abs() * values[i].abs()[:, None])
    top = max(rows, default=start)
    for i in reversed(graph.downstream(start)):
        if i > top or i == start or i not in rows:
            continue
        node = graph.nodes[i]
        A = rows.pop(i)
        box = [boxes[j] for j in node.inputs]
        if alphas and i in alphas:
            inputs, d_add, e_add = node.op.backward(A, box, lower, alpha=alphas[i])
        else:
            inputs, d_add, e_add = node.op.backward(A, box, lower)
        j = node.inputs[0]
        if lower and balls and j in balls and node.op.nonlinear and d_add is not None:
            offset = node.op.ball_offset(A, inputs[0], boxes[j], *balls[j])
            if offset is not None:
                low = d_add if e_add is None else d_add - e_add
                d_add, e_add = torch.maximum(low, offset), None
        if d_add is not None:
            d, size = d + d_add, size + d_add.abs()
        if e_add is not None:
            e, size = e + e_add, size + e_add
        for j, R in zip(node.inputs, inputs):
            if R is None:
                continue
            if j in moving:
                rows[j] = rows[j] + R if j in rows else R
            else:  # a constant of the map: its value enters d
                d = d + row_sum(R * values[j][:, None])
                size = size + row_sum(R.abs() * values[j].abs()[:, None])
    return Linear(rows.get(start), d, e, size)


def _concretise(f: Linear, region: Region, rho: torch.Tensor):
    """Centre, spread and rounding slack of ``f`` over ``z + rho U``, ``(B, R)`` each."""
    center, size, spread = f.d, f.size, f.e
    if f.A is not None:
        value, magnitude = region.value(f.A)
        center, size = center + value, size + magnitude
        spread = spread + rho[:, None] * region.dual(f.A)
    return center, spread, ROUND * (size + spread)


def _refine(graph: Graph, start: int, i: int, wanted: torch.Tensor, boxes: dict, values,
            region: Region, rho: torch.Tensor, adaptive: bool = False):
    """Backward-pass bounds on node ``i``'s value for the ``wanted`` entries: the two-sided
    pass (``backward``'s ``lower=False``: one line per activation, for both ends); with
    ``adaptive`` intersected with the lower bounds of the rows and of their negatives under
    CROWN's adaptive lines (``lower=True``, a tighter line on each side, two more passes)."""
    lo, hi = boxes[i]
    B, shape = lo.shape[0], lo.shape[1:]
    flat_lo, flat_hi = lo.reshape(B, -1), hi.reshape(B, -1)
    wanted = wanted.reshape(B, -1)
    k = int(wanted.sum(-1).max())
    if k == 0:
        return lo, hi
    # The wanted entries of every input, padded with repeats of a wanted (or any) entry.
    order = torch.argsort(wanted.to(torch.int8), dim=-1, descending=True, stable=True)[:, :k]
    op = graph.nodes[i].op
    # Each row's bound is its own: the rows go in pieces of at most REFINE_ENTRIES entries
    # on the widest node they cross, so memory stays bounded where every entry is wanted.
    widest = max(math.prod(graph.nodes[j].shape) for j in graph.downstream(start) if j <= i)
    piece = max(1, REFINE_ENTRIES // (B * widest))
    dense = i != start and isinstance(op, Affine) and not op.is_conv and len(shape) == 1

    def low(rows, sign: float, lower: bool):
        """``sign x_rows`` bounded below (and above, two-sided) by one backward pass."""
        if dense:  # a dense layer's rows are its weight rows: no one-hot pass through it
            f = backward(graph, start, {graph.input_of(i): sign * op.weight[rows]},
                         sign * op.bias[rows], boxes, values, lower=lower)
        else:
            A = lo.new_zeros(B, rows.shape[1], math.prod(shape))
            A.scatter_(-1, rows[..., None], sign)
            f = backward(graph, start, {i: A.reshape(B, rows.shape[1], *shape)},
                         lo.new_zeros(B, rows.shape[1]), boxes, values, lower=lower)
        center, spread, slack = _concretise(f, region, rho)
        return center - spread - slack, center + spread + slack

    bounds = []
    for rows in order.split(piece, dim=1):
        below, above = low(rows, 1.0, False)
        if adaptive:
            below = torch.maximum(below, low(rows, 1.0, True)[0])
            above = torch.minimum(above, -low(rows, -1.0, True)[0])
        bounds.append((below, above))
    below, above = (torch.cat(part, dim=1) for part in zip(*bounds))
    # Only the wanted entries: the padding must not tighten an input's boxes, or its bound
    # would depend on the other inputs of the batch (and the checker's batch is another).
    hit = wanted.gather(-1, order)
    old_lo, old_hi = flat_lo.gather(-1, order), flat_hi.gather(-1, order)
    new_lo = torch.where(hit, torch.maximum(old_lo, below), old_lo)
    new_hi = torch.where(hit, torch.minimum(old_hi, above), old_hi)
    return (flat_lo.scatter(-1, order, new_lo).reshape(lo.shape),
            flat_hi.scatter(-1, order, new_hi).reshape(hi.shape))


def _feeds_nonlinear(graph: Graph, i: int) -> list:
    return [graph.nodes[c].op for c in graph.consumers[i] if graph.nodes[c].op.nonlinear]


def enclosed(graph: Graph, start: int) -> list[int]:
    """The downstream nodes whose forward enclosures can tighten a box that a relaxation
    reads: up to the last node that feeds a nonlinear operator and lies behind a nonlinear
    or affine node after ``start`` (before that, boxes are exact per entry); ``[]``: none."""
    nodes = graph.downstream(start)[1:]
    behind, last = set(), -1
    for k, i in enumerate(nodes):
        node = graph.nodes[i]
        if any(j in behind for j in node.inputs) or node.op.nonlinear or \
                isinstance(node.op, Affine):
            behind.add(i)
        if i in behind and i != graph.output and _feeds_nonlinear(graph, i):
            last = k
    return list(nodes[:last + 1])


def enclosure_work(graph: Graph, start: int, dimension: int) -> float:
    """Multiply-adds per input of one pass of forward enclosures (``intermediate_bounds``):
    ``dimension`` (the region's ``p``) times the work of every node in ``enclosed``."""
    work = 0.0
    for i in enclosed(graph, start):
        node = graph.nodes[i]
        per_entry = node.op.matrix.shape[1] if isinstance(node.op, Affine) else 1
        work += math.prod(node.shape) * per_entry
    return dimension * work


def intermediate_bounds(graph: Graph, start: int, region: Region, rho: torch.Tensor, values,
                        constants: dict | None = None, refine: bool = True,
                        enclose: bool = False, adaptive: bool = False) -> dict:
    """Boxes containing every downstream node's value over ``z + rho U`` (node -> (lo, hi)),
    and points for the constants they read (``boxes_and_reach``'s boxes)."""
    return boxes_and_reach(graph, start, region, rho, values, constants, refine, enclose,
                           adaptive)[0]


def boxes_and_reach(graph: Graph, start: int, region: Region, rho: torch.Tensor, values,
                    constants: dict | None = None, refine: bool = True,
                    enclose: bool = False, adaptive: bool = False) -> tuple[dict, dict]:
    """Boxes containing every downstream node's value over ``z + rho U`` (node -> (lo, hi)),
    and points for the constants they read; for the l2 ball also the reaches (node -> ``r``,
    ``(B,)``, ``||x_i - values[i]||_2 <= r``; empty for the box).

    Interval propagation; for the l2 ball intersected with the reach bounds of affine layers
    (``constants``: ``lipschitz.node_constants(graph, start, "fro")``); with ``enclose``,
    intersected with the bounds of forward enclosures (``certify.graph.operators.enclosure``,
    from ``region.coefficients``) on the nodes of ``enclosed``; then, for the nodes that
    feed a nonlinear operator, refined by backward passes (``refine``; ``adaptive``: with
    CROWN's adaptive lines as well, ``_refine``).
    """
    forward = enclosed(graph, start) if enclose else []
    if forward:
        enclosures = {start: Enclosure(region.z, torch.zeros_like(region.z),
                                       region.coefficients(), None, region.z.abs())}
        pending = {j: len(graph.consumers[j]) for j in forward + [start]}
        forward = set(forward)
    box = region.box(rho)
    boxes = {start: (region.z - box, region.z + box)}
    ball = region.norm == "fro"
    reach = {start: rho * region.unit} if ball else {}
    if ball and constants is None:
        constants = node_constants(graph, start, "fro")
    moving = set(graph.downstream(start))
    for i in graph.downstream(start)[1:]:
        node = graph.nodes[i]
        for j in node.inputs:
            if j not in moving and j not in boxes:
                boxes[j] = (values[j], values[j])
        inputs = [boxes[j] for j in node.inputs]
        lo, hi = node.op.interval(*inputs)
        if ball:
            if isinstance(node.op, Affine):
                j = node.inputs[0]
                r_lo, r_hi = node.op.reach_interval(boxes[j], values[j], reach[j])
                lo, hi = torch.maximum(lo, r_lo), torch.minimum(hi, r_hi)
            nominal = values[i]
            corner = torch.maximum(hi - nominal, nominal - lo).flatten(1)
            reaches = [reach.get(j) for j in node.inputs]
            combined = node.op.combine("fro", constants[i], reaches)
            local = node.op.local_reach(inputs, reaches, [values[j] for j in node.inputs])
            if local is not None:
                combined = torch.minimum(torch.as_tensor(combined, dtype=local.dtype,
                                                         device=local.device), local)
            reach[i] = torch.minimum(combined, torch.linalg.vector_norm(corner, dim=-1) *
                                     (1 + ROUND))
        if i in forward:
            parts = [enclosures[j] if j in moving else Enclosure.point(values[j])
                     for j in node.inputs]
            enclosures[i] = node.op.enclose(parts, inputs)
            if enclosures[i] is not None:
                e_lo, e_hi = enclosures[i].bounds(rho, region.norm)
                lo, hi = torch.maximum(lo, e_lo), torch.minimum(hi, e_hi)
            for j in node.inputs:  # free the coefficients no later node reads
                if j in pending:
                    pending[j] -= 1
                    if not pending[j]:
                        del enclosures[j]
        boxes[i] = (lo, hi)
        consumers = _feeds_nonlinear(graph, i) if refine and i != graph.output else []
        if consumers:
            wanted = consumers[0].unstable(lo, hi)
            for op in consumers[1:]:
                wanted = wanted | op.unstable(lo, hi)
            boxes[i] = _refine(graph, start, i, wanted, boxes, values, region, rho, adaptive)
        if i in forward and enclosures[i] is None:  # no forward rule: its box
            enclosures[i] = Enclosure.box(*boxes[i])
    return boxes, reach


# ``refine="auto"`` (``radius.layer_radii``): every input is refined when the work per input
# is at most REFINE_WORK; otherwise, when it is at most REFINE_LIMIT, the inputs whose
# certified radius stays below REFINE_BELOW times their verified upper bound: a probe of
# REFINE_PROBE of them, and the rest where the probe's median radius grew by REFINE_GAIN
# (on the 1024-wide MLP refinement gains nothing, on convolutions it gains a lot). The limit
# takes in the first layers of a nine-layer 200-wide MLP (1.7e8 and 1.2e8), where refinement
# lifts the first layer from 0.05 to 0.4 of the witness; the 1024-wide MLP's first layer and a
# ResNet stem (about 1.1e9) stay out.
# ``enclose="auto"``: forward enclosures where ``enclosure_work`` is positive and at most
# ENCLOSE_WORK multiply-adds per input and evaluation.
ENCLOSE_WORK = 1e9
REFINE_ENTRIES = 2**25  # entries of one refinement pass's rows on its widest node (256 MiB)
REFINE_WORK = 1e6
REFINE_LIMIT = 2e8
REFINE_BELOW = 0.5
REFINE_PROBE = 4
REFINE_GAIN = 1.05


def refine_work(graph: Graph, start: int) -> float:
    """Multiply-adds per input of the backward-pass refinement of the nodes after ``start``:
    for each node feeding a nonlinear operator, its entries times the work of walking back
    (an affine layer costs its multiply-adds; a dense one whose rows are taken as they are
    costs nothing); ``REFINE_WORK`` and ``REFINE_LIMIT`` are compared with it."""
    work, walked, last = 0.0, 0.0, {}
    for i in graph.downstream(start)[1:]:
        node = graph.nodes[i]
        if i == graph.output:
            break
        size_in = math.prod(graph.nodes[node.inputs[0]].shape)
        if node.op.nonlinear:
            work += size_in * (walked - last.get(node.inputs[0], 0.0))
        size_out = math.prod(node.shape)
        cost = 0.0
        if isinstance(node.op, Affine):
            cost = size_out * node.op.matrix.shape[1]
            # The rows of a dense layer are taken as they are; a convolution's are one-hot.
            last[i] = 0.0 if node.op.is_conv else cost
        walked += size_in + cost
    return work


def jacobian_line(graph: Graph, start: int, region: Region, boxes: dict, y: torch.Tensor,
                  C: torch.Tensor | None = None):
    """Slope of ``|m_j(z + dz) - m_j(z)| <= rho' slope_j`` on the region (mean value theorem).

    Every Jacobian of the margins along a segment in the region lies in the interval
    Jacobian, computed backwards from the rows ``e_y - e_j`` by the operators' ``jacobian``
    rules (interval rows from several consumers add up; constants have none). With ``J`` the
    entrywise largest magnitude, ``|J(z') dz| <= <J, |dz|>``, bounded over the region by
    ``Region.dual_of_magnitude``. ``None`` where an operator has no interval Jacobian (max
    pooling). ``C``: the rows ``(B, R, classes)`` when not every class's (``class_rows``).
    """
    C = class_rows(graph, y) if C is None else C
    rows = {graph.output: (C, C)}
    moving = set(graph.downstream(start))
    for i in reversed(graph.downstream(start)):
        if i == start or i not in rows:
            continue
        node = graph.nodes[i]
        out = node.op.jacobian(rows.pop(i), [boxes[j] for j in node.inputs])
        if out is None:
            return None
        for j, R in zip(node.inputs, out):
            if j in moving:  # constants have no slope
                rows[j] = interval_sum(rows[j], R) if j in rows else R
    if start not in rows:
        return C.new_zeros(C.shape[:2])
    lo, hi = rows[start]
    return region.dual_of_magnitude(torch.maximum(lo.abs(), hi.abs())) * (1 + ROUND)


def class_rows(graph: Graph, y: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """``e_y - e_j`` for every class ``j``, ``(B, C, C)``, or for the classes ``(B, K)``
    only, ``(B, K, C)``."""
    n = graph.nodes[graph.output].shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=y.device)
    return eye[y][:, None, :] - (eye[None, :, :] if classes is None else eye[classes])


@dataclass(frozen=True)
class MarginLines:
    """``m_j >= value_j - rho' slope_j`` for every ``rho' <= rho``, one line per method
    (stacked on the first axis, ``(K, B, C)``; ``-inf`` for a class whose lines were not
    computed), and the interval-arithmetic lower bound at ``rho`` itself (``(B, C)``; it holds
    for every ``rho' <= rho`` too, the boxes of a smaller region being inside)."""

    value: torch.Tensor
    slope: torch.Tensor
    interval: torch.Tensor

    def lower(self, rho: torch.Tensor) -> torch.Tensor:
        """The best lower bound of every margin at ``rho`` (``(B, C)``)."""
        lines = (self.value - rho[:, None] * self.slope).amax(0)
        return torch.maximum(lines, self.interval)

    def certified(self, rho: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Every margin positive at ``rho``? ``(B,)``"""
        return (self.lower(rho) > 0).scatter(-1, y[:, None], True).all(-1)

    def root(self, y: torch.Tensor) -> torch.Tensor:
        """The largest ``rho'`` where, for every class, some line is still positive (a
        class interval arithmetic certifies does not limit it)."""
        root = torch.where(self.value > 0, self.value / self.slope, torch.zeros_like(self.value))
        root = torch.where(self.interval > 0, math.inf, root.amax(0))
        return root.scatter(-1, y[:, None], math.inf).amin(-1)


def _interval_margins(graph: Graph, boxes: dict, y: torch.Tensor) -> torch.Tensor:
    """Interval lower bound of every margin: through the logits layer's class rows when it
    is dense (``(W_y - W_j) x + b_y - b_j`` on its input box), else ``lo_y - hi_j``."""
    out = graph.nodes[graph.output]
    if isinstance(out.op, Affine) and not out.op.is_conv and graph.input_of(graph.output) in boxes:
        W, b = out.op.weight, out.op.bias
        C = W[y][:, None, :] - W[None, :, :]
        c = b[y][:, None] - b[None, :]
        lo, hi = boxes[graph.input_of(graph.output)]
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        value = torch.einsum("bcn,bn->bc", C, center)
        size = torch.einsum("bcn,bn->bc", C.abs(), center.abs() + radius) + c.abs()
        return value + c - torch.einsum("bcn,bn->bc", C.abs(), radius) - ROUND * size
    lo, hi = boxes[graph.output]
    low = lo.gather(-1, y[:, None]) - hi
    return low - ROUND * (lo.gather(-1, y[:, None]).abs() + hi.abs())


def margin_lines(graph: Graph, start: int, region: Region, rho: torch.Tensor, y: torch.Tensor,
                 values, constants: dict | None = None, refine: bool = True,
                 enclose: bool = False, ball: bool = False,
                 known: torch.Tensor | None = None) -> MarginLines:
    """Lower bounds of every margin over ``z + rho' U``, ``rho' <= rho`` (section 4): the
    CROWN line and the interval-Jacobian line (``jacobian_line``), and interval arithmetic.
    ``ball`` (the l2 ball): the CROWN line's activation offsets also use the ball of every
    activation input's reach (``backward``'s ``balls``; offsets made on the larger region
    stay valid on a smaller one, so the line does too). ``known`` ``(B, C)``: lower bounds of
    the margins at ``rho`` proven already; the lines (one backward row per class) are then
    computed only for the classes that neither they nor interval arithmetic certify, the
    others' lines read ``-inf``."""
    boxes, reach = boxes_and_reach(graph, start, region, rho, values, constants, refine, enclose)
    return lines_on(graph, start, region, y, values, boxes, reach, ball, known)


def crown_line(graph: Graph, start: int, region: Region, C: torch.Tensor, values, boxes: dict,
               balls: dict | None, alphas: dict | None = None):
    """CROWN's line ``value - rho' slope`` of the rows ``C`` ``(B, R, classes)`` on the
    boxes (``backward`` from the logits, concretised over the region's unit set): ``value``
    and ``slope``, ``(B, R)`` each, rounding slack taken off ``value``."""
    f = backward(graph, start, {graph.output: C}, C.new_zeros(C.shape[:2]), boxes, values,
                 lower=True, balls=balls, alphas=alphas)
    value, size = f.d - f.e, f.size + f.e
    if f.A is None:
        return value - ROUND * size, torch.zeros_like(value)
    at_z, magnitude = region.value(f.A)
    return value + at_z - ROUND * (size + magnitude), region.dual(f.A) * (1 + ROUND)


def lines_on(graph: Graph, start: int, region: Region, y: torch.Tensor, values, boxes: dict,
             reach: dict, ball: bool, known: torch.Tensor | None = None,
             alphas: dict | None = None) -> MarginLines:
    """``margin_lines`` on boxes and reaches already computed (``boxes_and_reach`` at the
    radius); ``alphas``: CROWN's lower slopes (``backward``), every class's rows."""
    interval = _interval_margins(graph, boxes, y)
    classes = None
    if known is not None:
        needed = ~((known > 0) | (interval > 0)).scatter(-1, y[:, None], True)
        count = int(needed.sum(-1).max())
        classes = needed.to(interval.dtype).topk(max(count, 1), dim=-1).indices
    C = class_rows(graph, y, classes)
    balls = {i: (values[i], r) for i, r in reach.items()} if ball else None
    value, slope = crown_line(graph, start, region, C, values, boxes, balls, alphas)
    values_, slopes = [value], [slope]
    jacobian = jacobian_line(graph, start, region, boxes, y, C)
    if jacobian is not None:  # anchored at the unperturbed margins
        logits = values[graph.output]
        m = logits.gather(-1, y[:, None]) - logits
        m = m if classes is None else m.gather(-1, classes)
        values_.append(m - ROUND * (logits.abs().amax(-1, keepdim=True) + m.abs()))
        slopes.append(jacobian)
    else:  # a line that says nothing, so that every evaluation has the same methods
        values_.append(torch.full_like(value, -math.inf))
        slopes.append(torch.zeros_like(slope))
    value, slope = torch.stack(values_), torch.stack(slopes)
    if classes is not None:
        index = classes.expand(len(value), *classes.shape)
        value = value.new_full((len(value), *interval.shape), -math.inf).scatter(-1, index,
                                                                                  value)
        slope = slope.new_zeros(value.shape).scatter(-1, index, slope)
    return MarginLines(value, slope, interval)
