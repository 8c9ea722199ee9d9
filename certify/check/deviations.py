"""The numpy twin of ``certify.bounds.deviations``: lower bounds of every margin over the
weight ball from the clean trace, its exact first order and bounded remainders (THEORY.md
section 9), for ``certify check``.

Perturbing layer ``k`` by ``D`` moves its output by ``dZ = D P~`` and every node ``i``
downstream by ``delta_i``. With ``f_i(u + delta) = f_i(u) + J_i delta + R_i`` (``J_i`` the
clean Jacobian, the twins' ``gradient``; ``R_i = 0`` for linear maps), exactly,

    Delta m_j = <G_Z, dZ> + sum_i <G_i, R_i>,

``G_Z``, ``G_i`` the gradients of ``m_j = o_y - o_j`` at the clean point with respect to
``Z`` and to an additive change of node ``i``'s output. So over ``||D|| <= rho``

    m_j(D) >= m_j - rho g_j - sum_i <|G_i|, |R_i|>,   g_j = ||G_Z P~^T||_dual

(Frobenius: ``||.||_F``; max: the entrywise l1 norm).

First order (``trace``), by backward passes: the rows of the identity over a node's
entries walked back to ``Z`` (``certify.check.forward.pull_back``) give each entry's
coefficients ``A_a`` (``delta_a = <A_a, dZ> + (the remainders' part)``) and its exact
support per unit ``rho``, ``s_a = ||A_a P~^T||_dual`` (``certify.check.regions``: ``dual``;
for one column the ball or box of section 4, exact too). Rows (Frobenius, the inputs of
the row-wise operators, ``deviation_rules.row_norm``): the first-order part of a row ``t``
(last axis) is ``D -> (<A_a P~^T, D>)_a`` on ``||D||_F <= rho``, so its l2 norm is at most
``rho sqrt(lambda_max(G))`` with the Gram matrix ``G_ab = <A_a P~^T, A_b P~^T>_F``, exactly
(``C G C`` for centred rows, ``C = I - 1 1^T / n``), raised by ``1e-10`` of the trace; each
consumer reads the kind it asks for (a node read by F.normalize and by softmax has both).

Remainders (``bounds``, per ``rho``): the part of each deviation the remainders caused,
``e_i = J_i e_in + R_i``, is bounded entrywise by ``f_i`` (``f_out = |J| f_in + |R|``,
``deviation_rules.spread``) and in l2 by ``F_i = sum_in ||J_i,in||_2 F_in + ||R_i||``
(``||J||_2``: ``local_reach`` at the clean point where an operator has one, else its
``lipschitz``); the input deviations ``d = rho s + min(f, F)`` (and row bounds
``rho row + min(||f_row||, ||e_row||, F)``, ``||e_row||`` carried through the operators
that keep rows: ``deviation_rules.row_stretch``) bound the remainders
(``deviation_rules.remainder``), which meet ``|G_i|`` in the margins: entrywise, or per row as ``||G_row scale||_2 ||r_row||_2``.

Floating point, as the torch bound: supports, gradients and remainders are raised by
``ROUND`` relative, every box by ``ROUND`` times the spread of the whole input deviation,
and each margin loses ``ROUND (|o_y| + |o_j|)`` for the clean logits' rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from certify.check.bounds import class_vectors, section4_region
from certify.check.forward import NumpyGraph, pull_back
from certify.check.operators import ROUND
from certify.check.operators.deviation_rules import remainder, row_norm, row_stretch, spread

ROW_ENTRIES = 2**24  # entries of the identity rows walked back at once (128 MiB in float64)


def unsupported(graph: NumpyGraph, index: int) -> str | None:
    """The first node downstream of layer ``index`` without the rules of section 9 (a
    nonlinear twin's ``spread`` and ``remainder``, a linear one's forward enclosure), named
    for a message; ``None`` when every node has them."""
    for i in graph.downstream(index)[1:]:
        node = graph.nodes[i]
        zeros = [np.zeros((1, *graph.nodes[j].shape)) for j in node.inputs]
        ok = spread(node.twin, zeros, zeros) is not None and \
            (not node.twin.nonlinear or remainder(node.twin, zeros, zeros) is not None)
        if not ok:
            return f"node {node.name!r} ({type(node.twin).__name__})"
    return None


@dataclass(frozen=True)
class Trace:
    """What the bounds need for every ``rho`` (module docstring): the clean ``values``;
    ``support[i]`` per unit ``rho`` for the layer and every input of a nonlinear node;
    ``rows[(i, centred)]`` ``(B, ..., 1)`` per unit ``rho``; ``stretch[i]`` per input the
    l2 constant of node ``i``'s clean Jacobian (``(B,)``, ``None`` for a constant input);
    ``g`` ``(B, C)``; ``gradients[i]`` ``|G_i|`` ``(B, C, *shape)`` at the layer and every
    nonlinear node; ``margins`` ``(B, C)`` less the logits' rounding, ``inf`` at ``y``."""

    index: int
    values: list
    support: dict
    rows: dict
    stretch: dict
    g: np.ndarray
    gradients: dict
    margins: np.ndarray


def entry_rows(graph: NumpyGraph, index: int, node: int, values, chunk: int):
    """The coefficients over ``Z`` of node ``node``'s entries, ``chunk`` at a time: the
    identity rows walked back to ``Z``, ``(B, k, *Z)`` each."""
    value = values[node]
    B, N = len(value), value[0].size
    for start in range(0, N, chunk):
        k = min(chunk, N - start)
        eye = np.zeros((B, k, N))
        eye[:, np.arange(k), start + np.arange(k)] = 1.0
        seeds = {node: eye.reshape(B, k, *value.shape[1:])}
        yield pull_back(graph, index, seeds, values, {index})[index]


def _largest_eigenvalue(G: np.ndarray) -> np.ndarray:
    """``lambda_max`` of symmetric positive semidefinite ``G`` ``(..., n, n)``, raised by
    ``1e-10`` of its trace for the rounding of the Gram sums and of ``eigvalsh``."""
    trace = np.trace(G, axis1=-2, axis2=-1)
    return np.maximum(np.linalg.eigvalsh(G)[..., -1], 0.0) + 1e-10 * trace


def _first_order(graph, index, values, P, region, wanted):
    """``support`` and ``rows`` of ``Trace``: the exact supports of the entries of every
    node ``read`` and the row bounds of the ``wanted`` ``(node, centred)`` pairs."""
    nodes = graph.downstream(index)
    read = {index} | {j for i in nodes[1:] if graph.nodes[i].twin.nonlinear
                      for j in graph.nodes[i].inputs if j in nodes}
    layer, B = graph.layer(index), len(P)
    K = np.matmul(P.transpose(0, 2, 1), P)  # P~^T P~: <A P~^T, A' P~^T> = <A K, A'>
    widest = max([math.prod(graph.nodes[i].shape) for i in nodes] +
                 [layer.weight.shape[0] * P.shape[1]])
    support, rows = {}, {}
    for j in sorted(read | {j for j, _ in wanted}):
        shape, n = values[j].shape[1:], values[j].shape[-1]
        chunk = max(1, ROW_ENTRIES // (B * widest * n)) * n  # whole rows of the last axis
        parts, grams = [], []
        for A in entry_rows(graph, index, j, values, chunk):
            if j in read:
                parts.append(region.dual(A))
            if (j, False) in wanted or (j, True) in wanted:
                k = A.shape[1]
                cols = layer.columns(A.reshape(B * k, *A.shape[2:]))
                cols = cols.reshape(B, k // n, n, -1)
                weighted = np.matmul(cols.reshape(B, k, -1, K.shape[-1]), K[:, None])
                grams.append(np.einsum("btiq,btjq->btij", weighted.reshape(cols.shape), cols))
        if parts:
            support[j] = np.concatenate(parts, axis=1).reshape(B, *shape) * (1 + ROUND)
        if grams:
            G = np.concatenate(grams, axis=1).reshape(B, *shape[:-1], n, n)
            for centred in (False, True):
                if (j, centred) in wanted:
                    H = G
                    if centred:  # C G C
                        H = H - H.mean(-1, keepdims=True)
                        H = H - H.mean(-2, keepdims=True)
                    rows[(j, centred)] = np.sqrt(_largest_eigenvalue(H))[..., None] * \
                        (1 + ROUND)
    return support, rows


def _stretches(graph: NumpyGraph, index: int, values) -> dict:
    """Per downstream node and input, an l2 bound of the clean Jacobian ``(B,)``:
    ``local_reach`` on the clean point (a box of width 0, unit reach on that input) where
    the twin has one, else its ``lipschitz("fro")``; ``None`` for a constant input."""
    moving = set(graph.downstream(index))
    out = {}
    for i in graph.downstream(index)[1:]:
        node = graph.nodes[i]
        u = [values[j] for j in node.inputs]
        B = len(u[0])
        constants = node.twin.lipschitz("fro")
        per = []
        for k, j in enumerate(node.inputs):
            if j not in moving:
                per.append(None)
                continue
            reach = node.twin.local_reach([(v, v) for v in u], [
                np.ones(B) if q == k else None for q in range(len(u))], u) \
                if node.twin.nonlinear else None
            per.append(reach if reach is not None else np.full(B, float(constants[k])))
        out[i] = per
    return out


def trace(graph: NumpyGraph, index: int, values, P: np.ndarray, y: np.ndarray,
          norm: str) -> Trace:
    """The ``Trace`` of layer ``index`` for the inputs with clean ``values``, predictions
    ``y`` and columns ``P~`` ``(B, n, L)`` (``certify.check.bounds.columns``)."""
    nodes = graph.downstream(index)
    region = section4_region(graph.layer(index), values[index], P, norm)
    wanted = set()
    if norm == "fro":
        for i in nodes[1:]:
            kind = row_norm(graph.nodes[i].twin)
            if kind is not None:
                wanted |= {(j, kind == "centred") for j in graph.nodes[i].inputs if j in nodes}
    support, rows = _first_order(graph, index, values, P, region, wanted)
    keys = {index} | {i for i in nodes[1:] if graph.nodes[i].twin.nonlinear}
    C = class_vectors(graph, y)  # e_y - e_j
    gradients = pull_back(graph, index, {graph.output: C}, values, keys)
    g = region.dual(gradients[index]) * (1 + ROUND)
    logits = values[-1]
    top = logits[np.arange(len(y)), y][:, None]
    margins = top - logits - ROUND * (np.abs(top) + np.abs(logits))
    margins[np.arange(len(y)), y] = np.inf
    return Trace(index, values, support, rows, _stretches(graph, index, values), g,
                 {k: np.abs(G) * (1 + ROUND) for k, G in gradients.items()}, margins)


def _row_norms(f: np.ndarray) -> np.ndarray:
    return np.linalg.norm(f, axis=-1, keepdims=True)


def _whole(f: np.ndarray) -> np.ndarray:
    return np.linalg.norm(f.reshape(len(f), -1), axis=-1)


def bounds(graph: NumpyGraph, t: Trace, rho: np.ndarray) -> np.ndarray:
    """Lower bounds ``(B, C)`` of every margin over the weight ball of radius ``rho``
    (per input): ``m_j - rho g_j - sum_i <|G_i|, |R_i|>`` (module docstring)."""
    def per(a, ref):  # (B,) against (B, *shape)
        return a.reshape(-1, *[1] * (ref.ndim - 1))

    index, values = t.index, t.values
    lost = t.g * rho[:, None]
    fresh = {index: np.zeros_like(values[index])}  # the sources are exact: no residual
    whole = {index: np.zeros(len(rho))}
    deviation = {index: per(rho, values[index]) * t.support[index]}
    lines = {index: np.zeros_like(values[index][..., :1])}
    for i in graph.downstream(index)[1:]:
        node, twin = graph.nodes[i], graph.nodes[i].twin
        u = [values[j] for j in node.inputs]
        f_in = [fresh.get(j, np.zeros_like(values[j])) for j in node.inputs]
        l_in = [lines.get(j, np.zeros_like(values[j][..., :1])) for j in node.inputs]
        d_in = [deviation.get(j, np.zeros_like(values[j])) for j in node.inputs]
        moved = spread(twin, u, d_in)  # |J| of the whole deviation, for the rounding
        out = spread(twin, u, f_in) + ROUND * moved
        F = np.zeros(len(rho))
        for c, j in zip(t.stretch[i], node.inputs):
            if c is not None:
                F = F + c * whole[j]
        F = F * (1 + ROUND) + ROUND * _whole(out)
        R, R_rows = 0.0, None
        if twin.nonlinear:
            centred = row_norm(twin) == "centred"
            rows = [per(rho, values[j]) * t.rows[(j, centred)] + np.minimum(
                        np.minimum(_row_norms(f), line), per(whole[j], values[j]))
                    if (j, centred) in t.rows else None
                    for j, f, line in zip(node.inputs, f_in, l_in)]
            R = remainder(twin, u, d_in, rows)
            if isinstance(R, tuple):  # R = scale * r, ||r_row||_2 <= bound
                scale, bound = R
                bound = bound * (1 + ROUND)
                G = t.gradients[i] * np.broadcast_to(scale, values[i].shape)[:, None]
                lost = lost + (_row_norms(G) * bound[:, None]).reshape(*lost.shape, -1).sum(-1)
                R = np.abs(scale) * bound
                R_rows = np.abs(scale).max(-1, keepdims=True) * bound
            else:
                R = np.broadcast_to(R, values[i].shape) * (1 + ROUND)
                lost = lost + np.einsum("bcn,bn->bc", t.gradients[i].reshape(*lost.shape, -1),
                                        R.reshape(len(R), -1))
            out = out + R
            F = F + _whole(R)
        # Rows in l2: through the twins that keep rows (plus the remainder's rows), the
        # box's own, the whole node's.
        line = _row_norms(out)
        kept = row_stretch(twin, u, l_in)
        if kept is not None:
            if twin.nonlinear:
                kept = kept + (_row_norms(R) if R_rows is None else R_rows)
            line = np.minimum(line, kept * (1 + ROUND) + ROUND * line)
        lines[i] = np.minimum(line, per(F, line))
        fresh[i] = np.minimum(np.minimum(out, per(F, out)), lines[i])
        whole[i] = F
        # First order within rho s_i where a remainder reads it, else |J| of the inputs'
        # whole deviations plus the remainder.
        deviation[i] = per(rho, values[i]) * t.support[i] + fresh[i] if i in t.support \
            else moved * (1 + 2 * ROUND) + R
    return t.margins - lost


def margin_bounds(graph: NumpyGraph, index: int, values, P: np.ndarray, rho: np.ndarray,
                  y: np.ndarray, norm: str) -> np.ndarray | None:
    """Lower bounds ``(B, C)`` of every margin ``o_y - o_j`` over the weight ball of radius
    ``rho`` ``(B,)`` around layer ``index`` (``inf`` at ``y``; ``-inf`` where a remainder
    is unbounded); ``None`` where a node downstream has no deviation rules
    (``unsupported``)."""
    if unsupported(graph, index) is not None:
        return None
    with np.errstate(invalid="ignore", over="ignore"):  # an unbounded remainder meets 0
        out = bounds(graph, trace(graph, index, values, P, y, norm), rho)
    out = np.where(np.isnan(out), -np.inf, out)
    out[np.arange(len(y)), y] = np.inf
    return out
