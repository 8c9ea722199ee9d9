"""A captured graph's values when one node moves, for checking bounds against sampled and
attacked points (``bounds/``): ``upto`` (a node's value when node ``start`` takes ``z``),
``copies`` (every node's value for stacked copies of the batch), ``margins`` (``o_y - o_j``
when node ``start`` takes ``z``) and ``tolerance`` (the rounding allowed in the comparisons).
"""

from __future__ import annotations

import torch

from certify.graph.graph import Graph


def upto(net: Graph, start: int, z: torch.Tensor, values: list, last: int) -> torch.Tensor:
    """Node ``last``'s value when node ``start`` takes ``z`` (the others from ``values``):
    ``net.rerun`` stopped at ``last``."""
    values = list(values)
    values[start] = z
    for k in net.downstream(start)[1:]:
        if k > last:
            break
        node = net.nodes[k]
        values[k] = node.op(*(values[j] for j in node.inputs))
    return values[last]


def copies(values: list, n: int) -> list:
    """Every node's value for ``n`` stacked copies of the batch (``minimised``'s layout)."""
    return [v.repeat(n // len(v), *[1] * (v.ndim - 1)) for v in values]


def margins(net: Graph, start: int, z: torch.Tensor, y: torch.Tensor, values) -> torch.Tensor:
    """``o_y - o_j`` with node ``start`` at ``z`` and the others from ``values``."""
    o = net.run(start, z, copies(values, len(z)))
    return o.gather(-1, y[:, None]) - o


def tolerance(t: torch.Tensor) -> torch.Tensor:
    return 1e-9 * (1 + t.abs())
