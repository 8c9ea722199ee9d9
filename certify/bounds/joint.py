"""Several layers changed at once: the joint certificate of THEORY.md section 10.

Layers ``k`` (``Affine`` nodes, biases untouched) change by ``E_k`` within a set each
(``WeightSet``): a box ``|E_ij| <= A_ij`` (a quantiser's cells, ``A = s / 2``; a pruning box,
``A = |W|`` on the prunable weights; ``t max|W|``), a Frobenius ball ``||E||_F <= e``, or one
known change (``point``, inside its box ``A = |E|``). With ``h_k`` the clean input of layer
``k`` as columns ``P_k`` and ``Delta h_k`` its deviation, the layer's output moves by
``E_k P_k + W_k Delta P_k + E_k Delta P_k``, and the decomposition of section 9 gives, for
every margin, exactly,

    Delta m_j = sum_k <G_k P_k^T, E_k> + sum_n <G_n, R_n> + sum_k <G_k, E_k Delta P_k>,

with ``G`` the margin gradients at the clean point (``certify.bounds.deviations.gradients``,
one backward pass per class serves every layer). The first-order term is exact for a point
and its exact worst case over a set: ``sum_ij A_ij |(G_k P_k^T)_ij|`` for a box,
``e_k ||G_k P_k^T||_F`` for a ball. The remainders ``R_n`` of the nonlinear nodes
(``Operator.remainder``) and the product terms read a box ``|Delta| <= d`` on every node's
deviation, carried forward from the layers' sources: ``|E P| <= A |P|`` (box; ``e ||P_:l||_2``
per column for a ball), ``|W| d`` through the layer (``Operator.spread``), ``A |Delta P|``
(``e ||Delta P_:l||_2``) for the product; the product meets ``|G_k|`` as
``<|G_k|, A |Delta P|>`` (``e sum_l ||G_k,:l||_2 ||Delta P_:l||_2``).

This replaces the norm product of section 5 (``certify.radii.multilayer``), which grows with
every layer whether or not anything changes; here the loss is the exact first order plus
terms of second order in the changes.

Floating point: ``G_k P_k^T`` carries a relative rounding of at most ``ROUND`` of
``|G_k| |P_k|^T``, so the first-order term is charged ``ROUND <|G_k|, A |P_k|>`` and
``ROUND`` of itself; deviation boxes and remainders grow by ``ROUND`` like those of section 9,
and every margin loses ``ROUND (|o_y| + |o_j|)`` for the clean logits' rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from certify.bounds.deviations import CHECK_SLACK, gradients, row_norms, row_stretch, spread
from certify.bounds.first_order import jvp, layer_supports
from certify.graph.graph import Graph
from certify.graph.operators import Affine, Product
from certify.graph.operators.base import ROUND

KINDS = ("box", "ball")


@dataclass(frozen=True)
class WeightSet:
    """The changes ``E`` of one layer's weight matrix ``(m, n)`` (``Affine.matrix``) allowed.

    ``kind="box"``: ``|E_ij| <= radius_ij``, ``radius`` broadcastable to ``(B, m, n)`` (one
    box per input where it has a batch axis). ``kind="ball"``: ``||E||_F <= radius``, a number
    or ``(B,)``. ``point``: the one change ``(m, n)`` that was made, when only it matters; its
    first-order term is then exact (``kind`` must be ``box`` with ``radius = |point|``,
    ``WeightSet.exact``)."""

    kind: str
    radius: torch.Tensor
    point: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def exact(cls, change: torch.Tensor) -> "WeightSet":
        """The one change ``E = W - g(W)``."""
        return cls("box", change.abs(), change)


@dataclass(frozen=True)
class JointTrace:
    """What every set of changes of ``layers`` needs, for one batch of inputs: the clean
    ``values``; ``columns[k]`` ``P_k`` ``(B, n, L)``; ``products[k]`` ``G_k P_k^T``
    ``(B, C, m, n)``; ``gradients[k]`` ``|G_k|`` at the layers and the nonlinear nodes
    downstream, raised by ``ROUND``; ``margins`` ``(B, C)`` less the clean logits' rounding
    (``inf`` at the predicted class); ``supports[k]``: layer ``k``'s
    ``certify.bounds.first_order.LayerSupports`` at the nodes whose deviations the
    remainders and products read (only with ``joint_trace(..., supports=True)``);
    ``signed[n]``: the signed ``G_n`` at the products of two moving factors."""

    layers: tuple[int, ...]
    nodes: tuple[int, ...]
    values: list
    columns: dict
    products: dict
    gradients: dict
    margins: torch.Tensor
    supports: dict | None = None
    signed: dict | None = None


def joint_trace(network: Graph, layers, values, y: torch.Tensor,
                supports: bool = False) -> JointTrace:
    """The ``JointTrace`` of ``layers`` (affine node indices) for inputs with clean
    ``values`` and predictions ``y``; ``supports``: with the layers' first-order supports
    (forward-mode forms: what sets, not points, need to be tight on deep networks)."""
    layers = tuple(sorted(layers))
    nodes = tuple(sorted({i for k in layers for i in network.downstream(k)}))
    keys = list(layers) + [i for i in nodes if network.nodes[i].op.nonlinear]
    G = gradients(network, keys, values, y)
    columns, products = {}, {}
    for k in layers:
        layer = network.layer(k)
        P = layer.patches(values[network.input_of(k)])
        B, C = G[k].shape[:2]
        rows = layer.columns(G[k].flatten(0, 1)).unflatten(0, (B, C))  # (B, C, m, L)
        columns[k], products[k] = P, rows @ P.transpose(1, 2)[:, None]
    logits = values[-1]
    margins = logits.gather(-1, y[:, None]) - logits
    margins = margins - ROUND * (logits.gather(-1, y[:, None]).abs() + logits.abs())
    read = {j for i in nodes if network.nodes[i].op.nonlinear or i in layers
            for j in network.nodes[i].inputs if j in nodes}
    return JointTrace(layers, nodes, values, columns, products,
                      {k: g.abs() * (1 + ROUND) for k, g in G.items()},
                      margins.scatter(-1, y[:, None], math.inf),
                      {k: layer_supports(network, k, values, read, columns[k]) for k in layers}
                      if supports else None,
                      {i: G[i] for i in nodes if isinstance(network.nodes[i].op, Product)})


def _first_order(t: JointTrace, sets) -> dict:
    """Per node the supports read, ``s_a``: how far the first-order change of every layer
    changed within a set (not a point) moves each entry, summed over the layers (section
    10: the rows of ``E`` are independent; a box's rows are bounded by their largest entry
    where the layer has several columns)."""
    out = {}
    for k, support in (t.supports or {}).items():
        S = sets[k]
        if S.point is not None:
            continue
        P = t.columns[k]
        B, n = P.shape[:2]
        if S.kind == "box":
            A = S.radius.to(P).expand(B, -1, n)
            r = torch.matmul(A, P.abs())[..., 0] * (1 + ROUND) if support.one_column \
                else A.amax(-1)
        else:
            e = torch.as_tensor(S.radius, dtype=P.dtype, device=P.device).expand(B)
            scale = e * torch.linalg.vector_norm(P[..., 0], dim=-1) * (1 + ROUND) \
                if support.one_column else e
        for a in support.rows:
            value = torch.einsum("bem,bm->be", support.rows[a], r) if S.kind == "box" \
                else scale[:, None] * support.l2[a]
            value = value.reshape(t.values[a].shape) * (1 + ROUND)
            out[a] = out[a] + value if a in out else value
    return out


def _apply(layer: Affine, A: torch.Tensor, P: torch.Tensor, shape) -> torch.Tensor:
    """``A P`` ``(B, *shape)`` for a (batched) matrix ``A`` on columns ``P``."""
    return layer.uncolumns(torch.matmul(A, P), shape)


def _column_norms(layer: Affine, e: torch.Tensor, P: torch.Tensor, shape) -> torch.Tensor:
    """``e ||P_:l||_2`` at every output entry of column ``l`` (``|(E P)_il|`` for
    ``||E||_F <= e``)."""
    norms = torch.linalg.vector_norm(P, dim=1, keepdim=True) * (1 + ROUND)  # (B, 1, L)
    m = layer.weight.shape[0]
    return layer.uncolumns(e.reshape(-1, 1, 1) * norms.expand(-1, m, -1), shape)


def joint_margin_bounds(network: Graph, t: JointTrace,
                        sets: Mapping[int, WeightSet]) -> torch.Tensor:
    """Lower bounds ``(B, C)`` of every margin over all changes of the layers within their
    ``sets`` at once (module docstring): ``m_j + first order - remainders - products``.

    Each deviation is ``known + e``: ``known`` the exact first-order deviation of the
    layers given as points (their ``E P`` carried through the clean Jacobians, one tangent,
    ``certify.bounds.first_order.jvp``), ``|e| <= full`` the rest (the sets' sources, the
    remainders and the products, through ``|J|``). With the trace's supports, also
    ``|e| <= first + rest``: ``first`` the exact first-order reach of the sets
    (``_first_order``) and ``rest`` the remainders and products alone through ``|J|``. The
    remainders and products read ``d = |known| + min(full, first + rest)``. The rows (last
    axis) of ``e`` are also bounded in l2 (``lines``: through the operators that keep rows,
    ``certify.bounds.deviations.row_stretch``, plus what each node adds), which bounds every
    entry and, with ``||known_row||``, the row-wise remainders (LayerNorm, softmax)."""
    if set(sets) != set(t.layers):
        raise ValueError(f"sets must be given for the layers {t.layers}, got {sorted(sets)}")
    values = t.values
    view = lambda a, ref: a.reshape(-1, *[1] * (ref.ndim - 1))  # noqa: E731
    change = torch.zeros_like(t.margins)  # the points' first-order change, signed
    lost = torch.zeros_like(t.margins)
    first = _first_order(t, sets)
    known, full, rest, lines = {}, {}, {}, {}

    def deviation(j):
        d = torch.minimum(full[j], first[j] + rest[j]) if j in first else full[j]
        return d + known[j].abs() if j in known else d

    for i in t.nodes:
        node, op = network.nodes[i], network.nodes[i].op
        inputs = [values[j] for j in node.inputs]
        zeros = [torch.zeros_like(values[j]) for j in node.inputs]
        d_in = [deviation(j) if j in full else z for j, z in zip(node.inputs, zeros)]
        rows_in = [lines[j] + (row_norms(known[j]) if j in known else 0) if j in lines else None
                   for j in node.inputs]
        rounding = ROUND * spread(op, inputs, d_in)
        moved = spread(op, inputs, [full.get(j, z) for j, z in zip(node.inputs, zeros)])
        out = moved + rounding
        out_rest = spread(op, inputs, [rest.get(j, z) for j, z in zip(node.inputs, zeros)]) \
            + rounding
        if any(j in known for j in node.inputs):
            known[i] = jvp(op, inputs, [known[j][:, None] if j in known else None
                                        for j in node.inputs])[:, 0]
        if i in sets:
            layer, S, P = network.layer(i), sets[i], t.columns[i]
            shape, X, G = values[i].shape[1:], t.products[i], t.gradients[i]
            dP = layer.patches(d_in[0])
            counted = t.supports is not None and i in t.supports  # in first, not in rest
            if S.kind == "box":
                A = S.radius.to(P).expand(len(P), *X.shape[2:])
                source, product = _apply(layer, A, P.abs(), shape), _apply(layer, A, dP, shape)
                worst = torch.einsum("bcmn,bmn->bc", X.abs(), A)
                if S.point is not None:
                    E = S.point.to(P)
                    change = change + torch.einsum("bcmn,mn->bc", X, E)
                    lost = lost + ROUND * worst
                    exact = _apply(layer, E.expand_as(A), P, shape)
                    known[i] = known[i] + exact if i in known else exact
                    out, out_rest = out + ROUND * source, out_rest + ROUND * source
                else:
                    lost = lost + worst * (1 + ROUND)
                    out = out + source * (1 + ROUND)
                    out_rest = out_rest if counted else out_rest + source * (1 + ROUND)
                lost = lost + torch.einsum("bc...,b...->bc", G, product)
            else:
                e = torch.as_tensor(S.radius, dtype=P.dtype, device=P.device).expand(len(P))
                source, product = _column_norms(layer, e, P, shape), \
                    _column_norms(layer, e, dP, shape)
                X_fro = torch.linalg.vector_norm(X.flatten(2), dim=-1)
                lost = lost + view(e, X_fro) * X_fro * (1 + ROUND)
                G_cols = torch.linalg.vector_norm(
                    layer.columns(G.flatten(0, 1)).unflatten(0, G.shape[:2]), dim=2)
                dP_cols = torch.linalg.vector_norm(dP, dim=1)
                lost = lost + view(e, X_fro) * torch.einsum("bcl,bl->bc", G_cols, dP_cols) \
                    * (1 + ROUND)
                out = out + source * (1 + ROUND)
                out_rest = out_rest if counted else out_rest + source * (1 + ROUND)
            lost = lost + ROUND * torch.einsum("bc...,b...->bc", G, source)
            out, out_rest = out + product * (1 + ROUND), out_rest + product * (1 + ROUND)
        elif isinstance(op, Product) and all(j in known for j in node.inputs):
            # dx dy with dx = kx + ex: the known kx ky exactly (it joins known and the
            # margins' change), the rest |kx| ey + ex |ky| + ex ey.
            kx, ky = (known[j] for j in node.inputs)
            ex, ey = (deviation(j) - known[j].abs() for j in node.inputs)
            exact = op(kx, ky)
            known[i] = known[i] + exact
            change = change + torch.einsum("bc...,b...->bc", t.signed[i], exact)
            R = (op(kx.abs(), ey) + op(ex, ky.abs()) + op(ex, ey) +
                 ROUND * op(kx.abs(), ky.abs())) * (1 + ROUND)
            lost = lost + torch.einsum("bc...,b...->bc", t.gradients[i], R)
            out, out_rest = out + R, out_rest + R
        elif op.nonlinear:
            R = op.remainder(inputs, d_in, rows_in)
            if isinstance(R, tuple):  # scale * r, r bounded in l2 per row
                scale, bound = R
                bound = bound * (1 + ROUND)
                G = t.gradients[i] * scale.expand_as(values[i])[:, None]
                lost = lost + (torch.linalg.vector_norm(G, dim=-1, keepdim=True) *
                               bound[:, None]).flatten(2).sum(-1)
                R = scale.abs() * bound
            else:
                R = R.expand_as(values[i]) * (1 + ROUND)
                lost = lost + torch.einsum("bc...,b...->bc", t.gradients[i], R)
            out, out_rest = out + R, out_rest + R
        # Each row's l2 norm: through the operators that keep rows (plus what was added
        # here), and the box's own; every entry lies within its row's.
        line = row_norms(out)
        kept = row_stretch(op, inputs, [lines.get(j, row_norms(z)) for j, z in
                                        zip(node.inputs, zeros)])
        if kept is not None:
            line = torch.minimum(line, kept * (1 + ROUND) + row_norms(out - moved))
        lines[i] = line
        full[i], rest[i] = torch.minimum(out, line), out_rest
    bound = t.margins + change - lost
    # An unbounded remainder times a zero gradient is NaN: it bounds nothing (-inf), and
    # the predicted class keeps its inf.
    bound = torch.where(torch.isnan(bound), -math.inf, bound)
    return torch.where(torch.isposinf(t.margins), math.inf, bound)


def joint_certified(network: Graph, t: JointTrace,
                    sets: Mapping[int, WeightSet]) -> torch.Tensor:
    """Can no change within ``sets`` alter the class (per input)? Every margin's lower
    bound must exceed ``CHECK_SLACK`` of the margin, so that an independent recomputation
    (``certify.check.joint``), whose rounding differs, confirms it."""
    margins = t.margins.nan_to_num(posinf=0.0).abs()
    return (joint_margin_bounds(network, t, sets) > CHECK_SLACK * margins).all(-1)
