"""Deviations from the clean trace: the second-order certificate of THEORY.md section 9.

Perturbing layer ``k`` by ``D`` moves its output by ``dZ = D P~`` and every node downstream
of it by a deviation ``delta_i`` from its clean value ``u_i``. Writing each node as
``f(u + delta) = f(u) + J delta + R`` with ``J`` the clean Jacobian (autograd's) and ``R`` its
remainder (0 for linear maps), the deviations are linear in the sources ``(dZ, R_1, R_2,
...)``, so for every margin, exactly,

    Delta m_j = <G_Z, dZ> + sum_k <G_k, R_k>,

with ``G_Z``, ``G_k`` the gradients of ``m_j`` at the clean point with respect to ``Z`` and to
an additive change of node ``k``'s output. Hence ``m_j(D) >= m_j - rho ||G_Z P~^T||_dual -
sum_k <|G_k|, |R_k|>``, and ``rho`` is certified when this is positive for every ``j``.

* First order (``certify.bounds.first_order``): ``dZ = <M, v>`` over ``||v|| <= rho``
  (the SVD's ``v = vec(D U)``, ``m r`` symbols) carried through the clean Jacobians; kept
  as each entry's dual norm ``s_i`` (``|first-order part of delta_i| <= rho s_i``), the rows'
  l2 bounds of the row-wise operators' inputs, and the margins' ``g_j = ||G_Z P~^T||_dual``.
* Remainders (``margin_bounds``, per ``rho``): a forward pass over boxes. Each node's
  deviation lies in ``rho s_i + f_i`` where ``f_i`` bounds the part the remainders caused:
  ``f_out = |J| f_in + |R|`` (``Operator.spread``, ``Operator.remainder`` on the input
  deviations ``d = rho s + f``), also bounded per row and per node in l2; ``|R_k|`` meets
  ``|G_k|`` in the margin.

As ``rho -> 0`` the certified radius tends to the first-order radius ``min_j m_j / g_j``
(section 3's estimate), the scale of the witness: what the box bounds lose with depth is
confined to the second-order terms.

Floating point: the first-order terms and the remainders are raised by ``ROUND`` relative,
every node's box by ``ROUND`` times the spread of its input deviations (rounding relative to
the deviations, so nothing independent of ``rho`` limits small radii), and each margin loses
``ROUND (|o_y| + |o_j|)`` for the clean logits' own rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.bounds.first_order import first_order, sources
from certify.graph.gradients import output_gradients
from certify.graph.graph import Graph
from certify.graph.operators import Activation, Add, Affine, LayerNorm, ScaleShift
from certify.graph.operators.base import ROUND
from certify.graph.operators.enclosure import Enclosure

# The search's radius is lowered by this fraction, so that an independent recomputation
# (certify check's numpy twin), whose rounding differs, confirms it.
CHECK_SLACK = 1e-6
GRADIENT_BYTES = 2**30  # the margin gradients of one piece of inputs (1 GiB)


def unsupported(network: Graph, index: int) -> str | None:
    """The first node downstream of layer ``index`` without the rules of section 9 (a
    linear map's forward enclosure, or ``spread`` and ``remainder``), described for a
    message; ``None`` when every node has them."""
    for i in network.downstream(index)[1:]:
        node = network.nodes[i]
        zeros = [torch.zeros(1, *network.nodes[j].shape, dtype=torch.float64,
                             device=network.device) for j in node.inputs]
        if node.op.nonlinear:
            ok = node.op.spread(zeros, zeros) is not None and \
                node.op.remainder(zeros, zeros) is not None
        else:
            ok = _linear_spread(node.op, zeros) is not None
        if not ok:
            return f"node {node.name!r} ({node.op.describe()})"
    return None


def supported(network: Graph, index: int) -> bool:
    """Does every node downstream of layer ``index`` have the rules of section 9?"""
    return unsupported(network, index) is None


def _linear_spread(op, radii):
    """``|J| r`` of a linear map: the radius of its forward enclosure of the boxes
    ``0 +- r`` (``Enclosure.through``: the map with the absolute values of its coefficients);
    ``None`` for an operator without one."""
    out = op.enclose([Enclosure(torch.zeros_like(r), r, None, None, r) for r in radii], None)
    return None if out is None else out.r


def spread(op, inputs, radii):
    """``|J| r`` for any operator of the graph (``Operator.spread`` or ``_linear_spread``)."""
    return op.spread(inputs, radii) if op.nonlinear else _linear_spread(op, radii)


@dataclass(frozen=True)
class Trace:
    """What one set of inputs needs for every ``rho`` (module docstring): the clean
    ``values``; ``support[i]`` = ``s_i`` per unit ``rho`` for every node downstream of layer
    ``index``; ``rows[i, centred]`` an l2 bound per unit ``rho`` of each row (last axis) of
    the first-order deviation, centred or not as the consumer's ``row_norm`` asks, for the
    inputs of the row-wise operators (Frobenius only); ``stretch[i]`` the l2 constants of
    node ``i``'s clean Jacobian per input (``(B,)`` each); ``g`` ``(B, C)`` the margins' first-order terms
    per unit ``rho``; ``gradients[k]`` ``(B, C, *shape)`` the absolute margin gradients at
    each nonlinear node and at the layer; ``margins`` ``(B, C)`` less the clean logits'
    rounding (``inf`` at the predicted class)."""

    index: int
    values: list
    support: dict
    rows: dict
    stretch: dict
    residual: torch.Tensor
    g: torch.Tensor
    gradients: dict
    margins: torch.Tensor


def stretches(network: Graph, index: int, values) -> dict:
    """Per downstream node, an l2 bound of its clean Jacobian per input, ``(B,)`` each:
    ``local_reach`` at the clean point (a box of width 0, unit reach) where the operator has
    one, else its global constant (``lipschitz``: exact for linear maps, ``sup |phi'|`` for
    the activations, 1 for softmax)."""
    out = {}
    for i in network.downstream(index)[1:]:
        node = network.nodes[i]
        u = [values[j] for j in node.inputs]
        B = len(u[0])
        moving = [j in network.downstream(index) for j in node.inputs]
        constants = node.op.lipschitz("fro", [network.nodes[j].shape for j in node.inputs])
        per = []
        for k, move in enumerate(moving):
            if not move:
                per.append(None)
                continue
            reach = node.op.local_reach([(v, v) for v in u],
                                        [u[0].new_ones(B) if q == k else None
                                         for q in range(len(u))], u) if node.op.nonlinear \
                else None
            per.append(reach if reach is not None else
                       u[0].new_full((B,), float(constants[k])))
        out[i] = per
    return out
def gradients(network: Graph, keys, values, y: torch.Tensor) -> dict:
    """``G_k`` ``(B, C, *shape)``: the gradients of every margin ``o_y - o_j`` at the clean
    point with respect to an additive change of each node ``k`` of ``keys``' output (section
    9), signed, by batched backward passes (``output_gradients``)."""
    keys = sorted(keys)
    nodes = sorted({i for k in keys for i in network.downstream(k)})
    with torch.enable_grad():
        shifts = {k: torch.zeros_like(values[k], requires_grad=True) for k in keys}
        run = list(values)
        for i in nodes:
            node = network.nodes[i]
            out = values[i] if i == keys[0] else node.op(*(run[j] for j in node.inputs))
            run[i] = out + shifts[i] if i in shifts else out
        logits = run[-1]
        margins = logits.gather(-1, y[:, None]) - logits
        return dict(zip(keys, output_gradients(margins, [shifts[k] for k in keys])))


def margin_gradients(network: Graph, index: int, values, y: torch.Tensor) -> dict:
    """``|G_k|`` ``(B, C, *shape)`` (``gradients``, raised by ``ROUND``) at each nonlinear
    node downstream of layer ``index`` and at the layer's own output."""
    nodes = network.downstream(index)
    keys = [index] + [i for i in nodes[1:] if network.nodes[i].op.nonlinear]
    return {k: G.abs() * (1 + ROUND)
            for k, G in gradients(network, keys, values, y).items()}


def trace(network: Graph, index: int, values, y: torch.Tensor, P: torch.Tensor,
          norm: str) -> Trace:
    """The ``Trace`` of layer ``index`` for the inputs whose clean ``values``, predictions
    ``y`` and columns ``P~`` are given."""
    source = sources(network.layer(index), values[index], P, norm)
    support, rows, g = first_order(network, index, values, y, source)
    logits = values[-1]
    margins = logits.gather(-1, y[:, None]) - logits
    margins = margins - ROUND * (logits.gather(-1, y[:, None]).abs() + logits.abs())
    margins = margins.scatter(-1, y[:, None], math.inf)
    return Trace(index, values, support, rows, stretches(network, index, values),
                 source.residual, g, margin_gradients(network, index, values, y), margins)


def row_norms(f: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(f, dim=-1, keepdim=True)


def margin_bounds(network: Graph, t: Trace, rho: torch.Tensor,
                  parts: dict | None = None) -> torch.Tensor:
    """Lower bounds ``(B, C)`` of every margin over the weight ball of radius ``rho``
    (per input): ``m_j - rho g_j - sum_k <|G_k|, |R_k|>`` (module docstring), a row-wise
    remainder ``R = scale * r`` meeting ``|G|`` as ``sum_rows ||G scale||_2 ||r||_2``.

    The part of each deviation the remainders caused is bounded three times: entrywise,
    ``f`` (``spread``), per row (last axis) in l2 where the operators keep rows
    (``row_stretch``), and as a whole in l2, ``F`` (the clean Jacobians' l2 constants,
    ``Trace.stretch``); each entry and each row takes the smallest.
    ``parts``: filled with each nonlinear node's share of the loss, ``(B, C)``, and the
    largest first-order and caused deviations of its inputs (to see what limits a radius)."""
    view = lambda a, ref: a.reshape(-1, *[1] * (ref.ndim - 1))  # noqa: E731
    index, values = t.index, t.values
    lost = t.g * rho[:, None]
    fresh = {index: view(rho, t.residual) * t.residual}
    whole = {index: torch.linalg.vector_norm(fresh[index].flatten(1), dim=-1)}
    deviation = {index: view(rho, t.residual) * t.support[index] + fresh[index]}
    if bool(t.residual.any()):
        lost = lost + torch.einsum("bc...,b...->bc", t.gradients[index], fresh[index])
    lines = {index: row_norms(fresh[index])}
    for i in network.downstream(index)[1:]:
        node, op = network.nodes[i], network.nodes[i].op
        inputs = [values[j] for j in node.inputs]
        f_in = [fresh.get(j, torch.zeros_like(values[j])) for j in node.inputs]
        l_in = [lines.get(j, torch.zeros_like(values[j][..., :1])) for j in node.inputs]
        d_in = [deviation.get(j, torch.zeros_like(values[j])) for j in node.inputs]
        moved = spread(op, inputs, d_in)  # |J| of the whole deviation, for the rounding
        out = spread(op, inputs, f_in) + ROUND * moved
        F = sum(c * whole[j] for c, j in zip(t.stretch[i], node.inputs)
                if c is not None and j in whole)
        F = F * (1 + ROUND) + ROUND * torch.linalg.vector_norm(out.flatten(1), dim=-1)
        R_rows = None
        if op.nonlinear:
            before = lost
            key = op.row_norm == "centred"
            rows = [view(rho, values[j]) * t.rows[j, key] + torch.minimum(
                        torch.minimum(row_norms(f), l), view(whole[j], values[j]))
                    if (j, key) in t.rows else None for j, f, l in zip(node.inputs, f_in, l_in)]
            R = op.remainder(inputs, d_in, rows)
            if isinstance(R, tuple):
                scale, bound = R
                bound = bound * (1 + ROUND)
                G = t.gradients[i] * scale.expand_as(values[i])[:, None]
                lost = lost + (row_norms(G) * bound[:, None]).flatten(2).sum(-1)
                R = scale.abs() * bound
                R_rows = scale.abs().amax(-1, keepdim=True) * bound
            else:
                R = R.expand_as(values[i]) * (1 + ROUND)
                lost = lost + torch.einsum("bc...,b...->bc", t.gradients[i], R)
            out = out + R
            F = F + torch.linalg.vector_norm(R.flatten(1), dim=-1)
            if parts is not None:
                parts[i] = (lost - before, max(float((d - f).max()) for d, f in zip(d_in, f_in)),
                            max(float(f.max()) for f in f_in),
                            max(float(whole[j].max()) for j in node.inputs if j in whole),
                            max(float(row_norms(f).max()) for f in f_in))
        # Each row's l2 bound: the clean Jacobian's on the inputs' rows where the operator
        # keeps rows (plus the remainder's rows), the box's, and the whole node's.
        line = row_norms(out)
        kept = row_stretch(op, inputs, l_in)
        if kept is not None:
            if op.nonlinear:
                kept = kept + (row_norms(R) if R_rows is None else R_rows)
            line = torch.minimum(line, kept * (1 + ROUND) + ROUND * line)
        lines[i] = torch.minimum(line, view(F, line))
        fresh[i] = torch.minimum(torch.minimum(out, view(F, out)), lines[i])
        whole[i] = F
        # The deviation: first order within rho s_i where computed, else within |J| of the
        # inputs' deviations (plus the remainder), and the remainders' part within fresh.
        deviation[i] = view(rho, values[i]) * t.support[i] + fresh[i] if i in t.support \
            else moved * (1 + 2 * ROUND) + (R if op.nonlinear else 0)
    return t.margins - lost


def row_stretch(op, inputs, lines):
    """An l2 bound per row (last axis) of ``J e`` from the inputs' row bounds of ``e``, for
    the operators that keep rows: a dense layer (``||W||_2``), a constant scale
    (``max |scale|``), a sum of equal shapes, an activation (the row's largest ``|phi'(u)|``),
    LayerNorm (``sqrt(n) max |g| / ||y||`` per row); ``None`` for the others."""
    if isinstance(op, Affine) and not op.is_conv:
        return op.operator_norm("fro") * lines[0]
    if isinstance(op, ScaleShift):
        return float(op.scale.abs().max()) * lines[0]
    if isinstance(op, Add) and inputs[0].shape == inputs[1].shape:
        return lines[0] + abs(op.alpha) * lines[1]
    if isinstance(op, Activation):
        return op.clean_slope(inputs[0]).abs().amax(-1, keepdim=True) * lines[0]
    if isinstance(op, LayerNorm):
        _, norm = op._sphere(inputs[0])
        return math.sqrt(inputs[0].shape[-1]) * float(op.weight.abs().max()) / norm * lines[0]
    return None


def certified(network: Graph, t: Trace, rho: torch.Tensor) -> torch.Tensor:
    """Is every margin's lower bound positive at ``rho`` (per input)?"""
    return (margin_bounds(network, t, rho) > 0).all(-1)


def deviation_lower(network: Graph, index: int, values, y: torch.Tensor, P: torch.Tensor,
                    norm: str, cap: torch.Tensor, evaluations: int = 48,
                    converged: float = 1e-3) -> torch.Tensor:
    """The largest ``rho <= cap`` found that ``certified`` confirms, per input: from the
    first-order radius ``min_j m_j / g_j`` (no larger radius can be certified) down by
    factors of 8 until one is certified, then geometric bisection to ``converged``. Each
    radius returned is certified by its own evaluation (``certify check`` confirms it by
    one), then lowered by ``CHECK_SLACK``. The inputs go in pieces whose margin gradients
    (one per class and entry of every nonlinear node) take at most ``GRADIENT_BYTES``."""
    nodes = network.downstream(index)
    entries = sum(math.prod(network.nodes[i].shape) for i in nodes
                  if i == index or network.nodes[i].op.nonlinear)
    piece = max(1, GRADIENT_BYTES // (8 * entries * values[-1].shape[-1]))
    if len(cap) > piece:
        return torch.cat([deviation_lower(network, index, [v[part] for v in values], y[part],
                                          P[part], norm, cap[part], evaluations, converged)
                          for part in torch.arange(len(cap), device=cap.device).split(piece)])
    t = trace(network, index, values, y, P, norm)
    first = (t.margins / t.g).amin(-1)
    hi = torch.minimum(cap, first).clamp(min=0)
    lo = torch.zeros_like(hi)
    rho = hi.clone()
    for _ in range(evaluations):
        todo = (hi > lo * (1 + converged)) & (hi > 0)
        if not todo.any():
            break
        ok = certified(network, t, rho)
        lo = torch.where(todo & ok, torch.maximum(lo, rho), lo)
        hi = torch.where(todo & ~ok, torch.minimum(hi, rho), hi)
        rho = torch.where(lo > 0, torch.sqrt(lo * hi), hi / 8)
    return lo * (1 - CHECK_SLACK)


def limiting(network: Graph, index: int, values, y: torch.Tensor, P: torch.Tensor, norm: str,
             rho: torch.Tensor) -> list[str]:
    """Per input, the node whose remainder takes the largest share of the binding margin's
    loss at ``rho`` (what limits the radius; ``"first order"`` where the first-order term
    is larger than every remainder), for reports."""
    t = trace(network, index, values, y, P, norm)
    parts = {}
    bound = margin_bounds(network, t, rho, parts)
    binding = bound.argmin(-1)
    names = []
    for b, j in enumerate(binding.tolist()):
        first = float(t.g[b, j] * rho[b])
        share = {i: float(lost[b, j]) for i, (lost, *_) in parts.items()}
        worst = max(share, key=share.get, default=None)
        names.append("first order" if worst is None or share[worst] <= first else
                     f"{network.nodes[worst].name} ({network.nodes[worst].op.describe()})")
    return names
