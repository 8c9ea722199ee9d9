"""The first-order forms of THEORY.md section 9: the perturbation's symbols and every
downstream node's exact linear dependence on them.

A weight change ``D`` of layer ``k`` moves its output by ``dZ = D P~``. ``sources`` writes the
reachable set as ``{<M, v> : ||v|| <= rho}`` over as few symbols as it exactly needs (the
SVD's ``D U``: ``m r`` of them, ``r = rank P~``), and ``first_order`` carries ``M`` through
the clean Jacobians of the downstream nodes (forward-mode derivatives, in chunks of
symbols), keeping only what the remainders of ``certify.bounds.deviations`` read: the dual
norm of each entry's coefficients (the exact sup of its first-order deviation per unit
``rho``), the l2 bound of each row of the row-wise operators' inputs (the largest eigenvalue
of its Gram matrix), and the margins' first-order terms ``||G_Z P~^T||_dual``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.bounds.regions import Region, WeightRegion
from certify.graph.graph import Graph
from certify.graph.operators.base import ROUND
from certify.graph.operators.enclosure import Enclosure

SYMBOL_ENTRIES = 2**24  # entries of the forms held at once per node (128 MiB in float64)


@dataclass(frozen=True)
class Sources:
    """``dZ = <basis, v> + residual``, ``basis`` ``(B, p, *Z)``. Frobenius: ``||v||_2 <=
    rho``. Max: ``v = vec(D U)`` with ``|D| <= rho`` entrywise, so the support of a form ``c``
    over ``v`` is ``rho ||c U^T||_1`` with ``c`` as an ``m x r`` matrix (``mix = U^T``
    ``(B, r, n)``), or, without ``mix``, ``v = vec D`` and ``rho ||c||_1``. ``residual``
    ``(B, *Z)`` per unit ``rho``, entrywise: what the SVD's rounding leaves."""

    basis: torch.Tensor
    l2: bool
    residual: torch.Tensor
    mix: torch.Tensor | None = None

    def support(self, forms: torch.Tensor) -> torch.Tensor:
        """Per entry, ``sum_v |c_v|^q`` of forms ``(B, p', *shape)`` over a run of whole
        rows of ``D`` (``q = 2`` for Frobenius, whose square root is the support; ``q = 1``
        for max, the support itself)."""
        if self.l2:
            return forms.square().sum(1)
        if self.mix is None:
            return forms.abs().sum(1)
        B, p, (r, n) = len(forms), forms.shape[1], self.mix.shape[1:]
        rows = forms.reshape(B, p // r, r, -1)
        # (B, m, n) products per entry: in pieces of entries within SYMBOL_ENTRIES
        piece = max(1, SYMBOL_ENTRIES // (B * (p // r) * n))
        return torch.cat([torch.einsum("bakN,bkt->batN", part, self.mix).abs().sum((1, 2))
                          for part in rows.split(piece, dim=-1)], dim=-1) \
            .reshape(forms.shape[:1] + forms.shape[2:])


def sources(layer, Z: torch.Tensor, P: torch.Tensor, norm: str) -> Sources:
    """The symbols of the module docstring for layer ``layer`` with output ``Z`` and columns
    ``P~`` ``(B, n, L)``. Several columns, one group, ``r = min(n, L) < n``: the thin SVD
    ``P~ = U S V^T`` and ``D P~ = (D U) S V^T + D (P~ - U S V^T)``; the symbols are ``D U``
    (``m r`` of them), with ``||D U||_F <= ||D||_F ||U||_2`` (``||U||_2 <= 1 + 1e-12``) for
    Frobenius, and the residual ``E`` charged per entry as ``|(D E)_cj| <= rho ||E_:j||``
    (l2 for Frobenius, l1 for max). One column: ``v = dZ / ||h||`` (``m`` symbols; the
    section-4 ball or box is the reachable set itself). Otherwise ``vec D``: exact."""
    B, n, L = P.shape
    m = layer.weight.shape[0]
    l2 = norm == "fro"
    if L == 1:  # dZ = D h: the l2 ball of radius rho ||h||_2 or the box rho ||h||_1 (exact)
        order = 2 if l2 else 1
        unit = torch.linalg.vector_norm(P[..., 0], ord=order, dim=-1) * (1 + n * 1e-15)
        if not l2:
            unit = unit.reshape(-1, *[1] * (Z.ndim - 1)).expand_as(Z)
        return Sources(Region(Z, norm, unit).coefficients(), l2, torch.zeros_like(Z))
    if L > 1 and getattr(layer, "groups", 1) == 1 and min(n, L) < n:
        U, S, Vh = torch.linalg.svd(P, full_matrices=False)  # (B, n, r), (B, r), (B, r, L)
        r = S.shape[-1]
        rows = (S[..., None] * Vh) * (1 + 1e-12)  # (B, r, L): the symbols' rows of dZ
        eye = torch.eye(m, dtype=P.dtype, device=P.device)
        M = (eye[None, :, None, :, None] * rows[:, None, :, None, :]).reshape(B * m * r, m, L)
        basis = layer.uncolumns(M, Z.shape[1:]).reshape(B, m * r, *Z.shape[1:])
        rest = P - U @ (S[..., None] * Vh)
        order = 2 if l2 else 1
        columns = torch.linalg.vector_norm(rest, ord=order, dim=1) + \
            1e-14 * torch.linalg.vector_norm(P, ord=order, dim=1)  # (B, L)
        residual = layer.uncolumns(columns[:, None, :].expand(B, m, L), Z.shape[1:])
        return Sources(basis, l2, residual, None if l2 else U.transpose(1, 2))
    return Sources(WeightRegion(Z, norm, None, P, layer).coefficients(), l2,
                   torch.zeros_like(Z))


def jvp(op, primals, tangents):
    """The clean Jacobian of ``op`` applied to forms ``(B, p, *shape)`` of its moving inputs
    (``None``: a constant input): a linear map's linear part (its forward enclosure's
    coefficients, ``Enclosure.through``), an operator's own ``tangent`` rule, else
    forward-mode autograd vectorised over ``p``."""
    if not op.nonlinear:
        enclosures = [Enclosure(u, torch.zeros_like(u), t, None, u.abs())
                      for u, t in zip(primals, tangents)]
        out = op.enclose(enclosures, None)
        if out is not None:
            return out.Ac
    if hasattr(op, "tangent"):
        return op.tangent(primals, tangents)
    moving = [k for k, t in enumerate(tangents) if t is not None]

    def one(*ts):
        def f(*xs):
            args = list(primals)
            for k, x in zip(moving, xs):
                args[k] = x
            return op(*args)
        return torch.func.jvp(f, tuple(primals[k] for k in moving), ts)[1]

    return torch.func.vmap(one, in_dims=1, out_dims=1)(*(tangents[k] for k in moving))


def row_inputs(network: Graph, index: int) -> set:
    """The ``(node, centred)`` pairs a row-wise remainder reads (``Operator.row_norm``): a
    node feeding both a softmax and ``F.normalize`` needs both kinds of row bound."""
    nodes = network.downstream(index)
    return {(j, network.nodes[i].op.row_norm == "centred") for i in nodes[1:]
            if network.nodes[i].op.row_norm is not None
            for j in network.nodes[i].inputs if j in nodes}


def _largest_eigenvalue(G: torch.Tensor) -> torch.Tensor:
    """An upper bound of ``lambda_max`` of symmetric positive semidefinite ``G`` (``(...,
    n, n)``): ``eigvalsh``'s, raised by ``1e-10`` of the trace for its rounding and that of
    the Gram sums (relative ``p eps`` of the trace)."""
    trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.linalg.eigvalsh(G)[..., -1].clamp(min=0) + 1e-10 * trace


def first_order(network: Graph, index: int, values, y: torch.Tensor, source: Sources):
    """``s_i`` for the downstream nodes a nonlinear node reads, the row bounds of
    ``row_inputs`` (Frobenius: ``sqrt(lambda_max)`` of each row's Gram matrix of
    coefficients, centred by ``C G C`` where asked: the exact sup over the ball) and ``g_j``
    per margin (module docstring), from the forward-mode forms over chunks of the
    symbols."""
    nodes = network.downstream(index)
    widest = max(math.prod(network.nodes[i].shape) for i in nodes)
    B, p = source.basis.shape[:2]
    whole = 1 if source.mix is None else source.mix.shape[1]  # chunks of whole rows of D
    chunk = max(1, SYMBOL_ENTRIES // (B * widest * whole)) * whole
    last_use = {}
    for i in nodes:
        for j in network.nodes[i].inputs:
            last_use[j] = i
    l2 = source.l2
    wanted = row_inputs(network, index) if l2 else set()
    # Supports are needed where a remainder reads them: the inputs of nonlinear nodes.
    read = {index} | {j for i in nodes[1:] if network.nodes[i].op.nonlinear
                      for j in network.nodes[i].inputs if j in nodes}
    totals = {i: torch.zeros_like(values[i]) for i in nodes if i in read}
    grams = {i: values[i].new_zeros(*values[i].shape, values[i].shape[-1])
             for i, _ in wanted}
    C = values[-1].shape[-1]
    g = values[-1].new_zeros(B, C)
    for start in range(0, p, chunk):
        forms = {index: source.basis[:, start:start + chunk]}
        for i in nodes:
            if i != index:
                node = network.nodes[i]
                forms[i] = jvp(node.op, [values[j] for j in node.inputs],
                                [forms.get(j) for j in node.inputs])
                for j in node.inputs:
                    if last_use.get(j) == i and j != network.output:
                        forms.pop(j, None)
            if i in totals:
                totals[i] += source.support(forms[i])
            if i in grams:
                grams[i] += torch.einsum("bp...i,bp...j->b...ij", forms[i], forms[i])
        logits = forms[network.output]  # (B, p, C)
        rows = logits.gather(-1, y[:, None, None].expand(B, logits.shape[1], 1)) - logits
        g += source.support(rows)
    root = torch.sqrt if l2 else (lambda t: t)
    widen = 1 + ROUND
    rows = {}
    for i, centred in wanted:
        G = grams[i]
        if centred:  # C G C
            G = G - G.mean(-1, keepdim=True)
            G = G - G.mean(-2, keepdim=True)
        rows[i, centred] = torch.sqrt(_largest_eigenvalue(G))[..., None] * widen
    return {i: root(t) * widen for i, t in totals.items()}, rows, root(g) * widen


@dataclass(frozen=True)
class LayerSupports:
    """How far the first-order change of layer ``k``'s output moves each entry of the
    ``targets`` downstream, per unit of the change (section 10), for every set of changes
    at once: ``rows[a]`` ``(B, entries, m)`` and ``l2[a]`` ``(B, entries)``.

    One column (a dense layer on a vector): ``dZ = E h`` and the symbols are ``dZ``'s own
    entries: ``rows[a][:, e, i] = |J_{a_e, i}|``, so a box ``|E| <= A`` moves ``a_e`` by at
    most ``rows @ (A |h|)`` and a ball ``||E||_F <= r`` by ``r ||h||_2 l2`` (exact, rows of
    ``E`` being independent). Several columns: the symbols are ``vec E``;
    ``rows[a][:, e, i] = sum_j |d a_e / d E_ij|`` (a box with rows bounded by ``a_i`` moves it
    by ``rows @ a``) and ``l2`` the l2 norm over all of ``vec E`` (a ball: ``r l2``)."""

    one_column: bool
    rows: dict
    l2: dict


def layer_supports(network: Graph, k: int, values, targets, P: torch.Tensor) -> LayerSupports:
    """The ``LayerSupports`` of layer ``k`` (columns ``P`` ``(B, n, L)``) at the nodes
    ``targets`` downstream of it (itself included), from forward-mode forms over chunks of
    whole rows of ``E``, raised by ``ROUND`` for their rounding."""
    layer, Z = network.layer(k), values[k]
    B, n, L = P.shape
    m = layer.weight.shape[0]
    nodes = network.downstream(k)
    targets = sorted(a for a in targets if a in nodes)
    if L == 1:
        per_row = 1
        eye = torch.eye(m, dtype=Z.dtype, device=Z.device)
        basis = layer.uncolumns(eye[:, :, None], Z.shape[1:])[None].expand(B, m, *Z.shape[1:])
    else:
        per_row = n
        basis = WeightRegion(Z, "max", None, P, layer).coefficients()
    rows = {a: Z.new_zeros(B, math.prod(values[a].shape[1:]), m) for a in targets}
    squares = {a: Z.new_zeros(B, math.prod(values[a].shape[1:])) for a in targets}
    if not targets:
        return LayerSupports(L == 1, rows, squares)
    last = targets[-1]
    walk = [i for i in nodes if i <= last]
    widest = max(math.prod(network.nodes[i].shape) for i in walk)
    chunk = max(1, SYMBOL_ENTRIES // (B * widest * per_row)) * per_row
    last_use = {j: i for i in walk for j in network.nodes[i].inputs}

    def accumulate(a, form, first):
        f = form.flatten(2)  # (B, p, entries)
        p = f.shape[1]
        rows[a][:, :, first:first + p // per_row] = \
            f.abs().reshape(B, p // per_row, per_row, -1).sum(2).transpose(1, 2)
        squares[a] += f.square().sum(1)

    for start in range(0, m * per_row, chunk):
        forms = {k: basis[:, start:start + chunk]}
        if k in rows:
            accumulate(k, forms[k], start // per_row)
        for i in walk[1:]:
            node = network.nodes[i]
            if any(j in forms for j in node.inputs):
                forms[i] = jvp(node.op, [values[j] for j in node.inputs],
                               [forms.get(j) for j in node.inputs])
                if i in rows:
                    accumulate(i, forms[i], start // per_row)
            for j in node.inputs:
                if last_use.get(j) == i:
                    forms.pop(j, None)
    widen = 1 + ROUND
    return LayerSupports(L == 1, {a: r * widen for a, r in rows.items()},
                         {a: torch.sqrt(s) * widen for a, s in squares.items()})
