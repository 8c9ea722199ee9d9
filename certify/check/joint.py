"""The numpy twin of ``certify.bounds.joint``: lower bounds of every margin when several
layers change at once, each within a set (THEORY.md section 10), for ``certify check``.

Layers ``k`` change by ``E_k`` in a box ``|E_ij| <= A_ij`` or a Frobenius ball
``||E||_F <= e``. With ``G`` the margin gradients at the clean point (rows ``e_y - e_j``
walked back by the twins' ``gradient``, ``certify.check.forward.pull_back``) and ``P_k`` the
layer's clean columns, exactly

    Delta m_j = sum_k <G_k P_k^T, E_k> + sum_n <G_n, R_n> + sum_k <G_k, E_k Delta P_k>,

so ``m_j`` loses at most ``sum A |G_k P_k^T|`` (``e ||G_k P_k^T||_F``), the remainders
``<|G_n|, |R_n|>`` (``deviation_rules.remainder``, read on a box ``d`` of every deviation:
``|W| d`` through the layers and ``|J| d`` through the rest, ``deviation_rules.spread``,
plus ``A |P|`` (``e ||P_:l||``) at each changed layer, plus the product ``A |Delta P|``
(``e ||Delta P_:l||``)), and the products ``<|G_k|, A |Delta P_k|>`` (``e sum_l ||G_k,:l||
||Delta P_:l||``).

Rows (last axis) of the part outside ``first`` are also bounded in l2 through the twins that
keep rows (``deviation_rules.row_stretch``), which bounds every entry and the row-wise
remainders (LayerNorm, softmax).

The one change a compression made needs no twin: ``certify.check.compression_claims``
confirms its claims on the compressed model itself. Rounding as in the torch bound:
``ROUND`` relative on every term and box, ``ROUND (|o_y| + |o_j|)`` off every margin.
"""

from __future__ import annotations

import math

import numpy as np

from certify.check.bounds import class_vectors
from certify.check.deviations import ROW_ENTRIES, entry_rows
from certify.check.forward import NumpyGraph, pull_back
from certify.check.operators import ROUND
from certify.check.operators.deviation_rules import remainder, row_stretch, spread


def _first_order(graph: NumpyGraph, values, sets: dict, read: set) -> dict:
    """Per entry read, the exact first-order reach of every set (module docstring)."""
    out = {}
    for k, (kind, size) in sets.items():
        layer = graph.layer(k)
        P = layer.patches(values[graph.nodes[k].inputs[0]])
        B, n, L = P.shape
        m = layer.matrix.shape[0]
        if kind == "box":
            A = np.broadcast_to(size, (B, m, n))
            r = (A @ np.abs(P))[..., 0] * (1 + ROUND) if L == 1 else A.max(-1)
        else:
            e = np.broadcast_to(np.asarray(size, dtype=np.float64), (B,))
            scale = e * np.linalg.norm(P[..., 0], axis=-1) * (1 + ROUND) if L == 1 else e
        nodes = graph.downstream(k)
        widest = max(math.prod(graph.nodes[i].shape) for i in nodes)
        for a in sorted(read & set(nodes)):
            parts = []
            for J in entry_rows(graph, k, a, values, max(1, ROW_ENTRIES // (B * widest))):
                c = J.shape[1]
                cols = layer.columns(J.reshape(B * c, *J.shape[2:])).reshape(B, c, m, -1)
                X = cols[..., 0] if L == 1 else cols @ P.transpose(0, 2, 1)[:, None]
                if kind == "box":
                    rows = np.abs(X) if L == 1 else np.abs(X).sum(-1)
                    parts.append(np.einsum("bcm,bm->bc", rows, r))
                else:
                    parts.append(scale[:, None] * np.linalg.norm(X.reshape(B, c, -1), axis=-1))
            value = np.concatenate(parts, axis=1).reshape(values[a].shape) * (1 + ROUND) ** 2
            out[a] = out[a] + value if a in out else value
    return out


def joint_margin_bounds(graph: NumpyGraph, values, y: np.ndarray, sets: dict) -> np.ndarray:
    """Lower bounds ``(B, C)`` of every margin (``inf`` at ``y``) over all changes of the
    layers of ``sets`` (index -> ``("box", A)`` with ``A`` broadcastable to ``(B, m, n)``,
    or ``("ball", e)``) at once; ``None`` where a node has no deviation rules."""
    layers = sorted(sets)
    nodes = sorted({i for k in layers for i in graph.downstream(k)})
    keys = set(layers) | {i for i in nodes if graph.nodes[i].twin.nonlinear}
    signed = pull_back(graph, 0, {graph.output: class_vectors(graph, y)}, values, keys)
    G = {k: np.abs(g) * (1 + ROUND) for k, g in signed.items()}
    B = len(y)
    logits = values[-1]
    top = logits[np.arange(B), y][:, None]
    margins = top - logits - ROUND * (np.abs(top) + np.abs(logits))
    lost = np.zeros_like(margins)
    read = {j for i in nodes if graph.nodes[i].twin.nonlinear or i in sets
            for j in graph.nodes[i].inputs if j in nodes}
    first = _first_order(graph, values, sets, read)
    full, rest, lines = {}, {}, {}

    def row_norms(f):
        return np.linalg.norm(f, axis=-1, keepdims=True)

    for i in nodes:
        node, twin = graph.nodes[i], graph.nodes[i].twin
        u = [values[j] for j in node.inputs]
        zeros = [np.zeros_like(values[j]) for j in node.inputs]
        d_in = [(np.minimum(full[j], first[j] + rest[j]) if j in first else full[j])
                if j in full else z for j, z in zip(node.inputs, zeros)]
        moved = spread(twin, u, d_in)
        if moved is None:
            return None
        through = spread(twin, u, [full.get(j, z) for j, z in zip(node.inputs, zeros)])
        out = through + ROUND * moved
        out_rest = spread(twin, u, [rest.get(j, z) for j, z in zip(node.inputs, zeros)]) + \
            ROUND * moved
        if i in sets:
            kind, size = sets[i]
            P = twin.patches(values[node.inputs[0]])
            dP = twin.patches(d_in[0])
            C = signed[i].shape[1]
            rows = twin.columns(signed[i].reshape(B * C, *values[i].shape[1:]))
            X = np.matmul(rows.reshape(B, C, *rows.shape[1:]), P.transpose(0, 2, 1)[:, None])
            g_abs = G[i].reshape(B, C, -1)
            if kind == "box":
                A = np.broadcast_to(size, (B, *X.shape[2:]))
                source, product = twin.uncolumns(A @ np.abs(P)), twin.uncolumns(A @ dP)
                lost = lost + np.einsum("bcmn,bmn->bc", np.abs(X), A) * (1 + ROUND)
                lost = lost + np.einsum("bcn,bn->bc", g_abs, product.reshape(B, -1))
            else:
                e = np.broadcast_to(np.asarray(size, dtype=np.float64), (B,))
                m = twin.matrix.shape[0]
                source = twin.uncolumns(e[:, None, None] * np.repeat(
                    np.linalg.norm(P, axis=1, keepdims=True) * (1 + ROUND), m, axis=1))
                product = twin.uncolumns(e[:, None, None] * np.repeat(
                    np.linalg.norm(dP, axis=1, keepdims=True) * (1 + ROUND), m, axis=1))
                lost = lost + e[:, None] * np.linalg.norm(X.reshape(B, C, -1), axis=-1) * \
                    (1 + ROUND)
                G_cols = np.linalg.norm(twin.columns(G[i].reshape(B * C, *values[i].shape[1:]))
                                        .reshape(B, C, *rows.shape[1:]), axis=2)
                lost = lost + e[:, None] * np.einsum("bcl,bl->bc", G_cols,
                                                     np.linalg.norm(dP, axis=1)) * (1 + ROUND)
            lost = lost + ROUND * np.einsum("bcn,bn->bc", g_abs, source.reshape(B, -1))
            out = out + (source + product) * (1 + ROUND)
            out_rest = out_rest + product * (1 + ROUND)  # the source: in first
        elif twin.nonlinear:
            R = remainder(twin, u, d_in, [lines.get(j) for j in node.inputs])
            if R is None:
                return None
            if isinstance(R, tuple):  # scale * r, ||r_row||_2 <= bound
                scale, bound = R
                bound = bound * (1 + ROUND)
                Gs = G[i] * np.broadcast_to(scale, values[i].shape)[:, None]
                lost = lost + (np.linalg.norm(Gs, axis=-1, keepdims=True) *
                               bound[:, None]).reshape(B, len(lost[0]), -1).sum(-1)
                R = np.abs(scale) * bound
            else:
                R = np.broadcast_to(R, values[i].shape) * (1 + ROUND)
                lost = lost + np.einsum("bcn,bn->bc", G[i].reshape(B, len(lost[0]), -1),
                                        R.reshape(B, -1))
            out, out_rest = out + R, out_rest + R
        # Rows in l2: through the twins that keep rows, plus what this node added; every
        # entry lies within its row's norm.
        line = row_norms(out)
        kept = row_stretch(twin, u, [lines.get(j, row_norms(z)) for j, z in
                                     zip(node.inputs, zeros)])
        if kept is not None:
            line = np.minimum(line, kept * (1 + ROUND) + row_norms(out - through))
        lines[i] = line
        full[i], rest[i] = np.minimum(out, line), out_rest
    with np.errstate(invalid="ignore"):
        bound = margins - lost
    bound = np.where(np.isnan(bound), -np.inf, bound)
    bound[np.arange(B), y] = np.inf
    return bound
