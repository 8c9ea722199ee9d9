"""Rigorous Lipschitz constants of the map from one node to the logits: THEORY.md section 5.

A certificate may only use UPPER bounds of operator norms; power iteration approaches the
spectral norm from below and is never used here. Each operator states its own constants
(``certify.graph.operators``: an affine layer's rigorous operator norm, ``sup |phi'|`` of an
activation, Schur's test for linear maps, ``sqrt(overlap)`` for max pooling), in the l2
(``"fro"``) or l_inf (``"max"``) geometry. Along the graph, the constant of a node with
respect to ``Z_k`` (the output of layer ``k``) is combined from its inputs' by the operator
(``Operator.combine``: the triangle inequality ``||f + g||_Lip <= ||f||_Lip + ||g||_Lip``
for sums, the disjoint parts of a concatenation); nodes that do not depend on ``Z_k`` are
constants of the map (constant 0, ``None`` here).
"""

from __future__ import annotations

import math

import torch

from certify.closed_forms.thresholds import singular_values_upper
from certify.graph.graph import Graph
from certify.graph.operators import Affine


def spectral_norm_upper(weight: torch.Tensor) -> float:
    """Rigorous upper bound of ``||W||_2`` for a matrix ``W`` (section 5)."""
    return float(singular_values_upper(weight)[0])


def node_constants(graph: Graph, start: int, norm: str) -> dict[int, tuple[float, ...]]:
    """Each downstream node's own constants (one per input), computed once per layer: the
    l2 operator norms of affine layers need an SVD."""
    shapes = [node.shape for node in graph.nodes]
    return {i: graph.nodes[i].op.lipschitz(norm, [shapes[j] for j in graph.nodes[i].inputs])
            for i in graph.downstream(start)[1:]}


def downstream(graph: Graph, start: int, norm: str, constants=None) -> list[float | None]:
    """``L_i``: the Lipschitz constant of every node's value as a function of node
    ``start``'s (1 there), ``None`` for nodes that do not depend on it."""
    constants = node_constants(graph, start, norm) if constants is None else constants
    L: list[float | None] = [None] * len(graph.nodes)
    L[start] = 1.0
    for i in graph.downstream(start)[1:]:
        node = graph.nodes[i]
        own = constants[i]
        L[i] = node.op.combine(norm, own, [L[j] for j in node.inputs])
    return L


def margin_node(graph: Graph) -> int:
    """The node whose constant multiplies ``class_rows``: the logits layer's input when the
    output is a dense layer, else the output itself."""
    out = graph.nodes[graph.output]
    dense = isinstance(out.op, Affine) and not out.op.is_conv
    return graph.input_of(graph.output) if dense else graph.output


def class_rows(graph: Graph, y: torch.Tensor, norm: str) -> tuple[torch.Tensor, int]:
    """``||W_L^T (e_y - e_j)||`` (l2 for fro, l1 for max), ``(B, C)``, ``inf`` at ``j = y``,
    and the node whose constant multiplies them: the logits layer's input when the output
    is a dense layer, else ``||e_y - e_j||`` (``sqrt 2``, 2) and the output itself."""
    out = graph.nodes[graph.output]
    if isinstance(out.op, Affine) and not out.op.is_conv:
        W = out.op.weight
        diff = W[y][:, None, :] - W[None, :, :]  # (B, C, n)
        ord = 2 if norm == "fro" else 1
        rows = torch.linalg.vector_norm(diff, ord=ord, dim=-1) * (1 + W.shape[1] * 1e-15)
    else:
        C = out.shape[0]
        rows = torch.full((len(y), C), math.sqrt(2) * (1 + 1e-15) if norm == "fro" else 2.0,
                          dtype=torch.float64, device=y.device)
    return rows.scatter(-1, y[:, None], math.inf), margin_node(graph)
