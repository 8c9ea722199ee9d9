"""Optimised lower slopes of CROWN's ReLU relaxations (alpha-CROWN, Xu et al., ICLR 2021),
for the margins' backward pass of THEORY.md section 4.

On an unstable entry (``l < 0 < u``) of a convex piecewise-linear activation (ReLU,
LeakyReLU with slope ``s`` in ``[0, 1]``) every line ``phi(x) >= a x`` with ``a`` in
``[s, 1]`` holds on the box; CROWN fixes ``a`` (1 where ``u >= -l``, else ``s``). Here
``a = s + (1 - s) alpha`` is chosen per margin row and entry: the boxes are made once at the
radius ``rho``, then projected gradient ascent (Adam, alpha clipped to ``[0, 1]``) raises
each row's bound at ``rho``, ``value(alpha) - rho slope(alpha)`` (``linear.crown_line``). Any
``alpha`` in ``[0, 1]`` is sound, whatever the optimiser does; the bound stays a CROWN line
valid for every ``rho' <= rho``.

What a certificate stores (``codes``): ``alpha`` on the grid ``k / CODE_STEPS``, one byte per
row and entry (``ADAPTIVE`` where CROWN's choice stands, on stable entries and on rows the
optimiser did not improve), so that ``certify check`` recomputes the bound with the very
slopes that made it and without optimising. Rounding the optimum to the grid costs at most a
``1 / CODE_STEPS`` move of each slope; the line is recomputed with the rounded slopes.
"""

from __future__ import annotations

import torch

from certify.bounds.linear import class_rows, crown_line
from certify.bounds.regions import Region
from certify.graph.graph import Graph

CODE_STEPS = 254  # alpha = code / CODE_STEPS
ADAPTIVE = 255  # the code of CROWN's own slope
LEARNING_RATE = 0.1  # Adam's step on alpha, a slope in [0, 1]


def optimisable(graph: Graph, start: int) -> list[int]:
    """The activation nodes downstream of ``start`` whose lower slopes are free."""
    return [i for i in graph.downstream(start)[1:]
            if getattr(graph.nodes[i].op, "optimisable", False)]


def decode(codes: torch.Tensor) -> torch.Tensor:
    """``alpha`` of the bytes ``codes``: ``code / CODE_STEPS``, ``-1`` (CROWN's slope) for
    ``ADAPTIVE``."""
    alpha = codes.to(torch.float64) / CODE_STEPS
    return torch.where(codes == ADAPTIVE, -1.0, alpha)


def encode(alpha: torch.Tensor, unstable: torch.Tensor) -> torch.Tensor:
    """The nearest code of each ``alpha`` in ``[0, 1]`` on the ``unstable`` entries,
    ``ADAPTIVE`` elsewhere."""
    codes = (alpha.clamp(0, 1) * CODE_STEPS).round().to(torch.uint8)
    return torch.where(unstable, codes, ADAPTIVE)


def optimise(graph: Graph, start: int, region: Region, rho: torch.Tensor, y: torch.Tensor,
             values, boxes: dict, balls: dict | None, steps: int) -> dict[int, torch.Tensor]:
    """Codes ``(B, C, *x)`` per optimisable node (``optimisable``) for every class's row
    ``e_y - e_j``: ``steps`` projected Adam steps on each row's bound at ``rho`` over the
    ``boxes`` (and the ``balls`` of SDP-CROWN's offsets, when given), from CROWN's slopes,
    keeping each row's best; a row whose rounded slopes fall below CROWN's bound keeps
    CROWN's (``ADAPTIVE``), so the bound never loosens."""
    C = class_rows(graph, y)
    B, R = C.shape[:2]
    nodes = optimisable(graph, start)
    unstable, alphas = {}, {}
    for i in nodes:
        lo, hi = boxes[graph.nodes[i].inputs[0]]
        unstable[i] = ((lo < 0) & (hi > 0))[:, None].expand(B, R, *lo.shape[1:])
        crown = (hi >= -lo).to(lo.dtype)[:, None].expand(B, R, *lo.shape[1:])
        alphas[i] = crown.clone().requires_grad_(True)

    def bound(alpha: dict) -> torch.Tensor:
        value, slope = crown_line(graph, start, region, C, values, boxes, balls, alpha)
        return value - rho[:, None] * slope

    if not nodes:
        return {}
    best = {i: a.detach().clone() for i, a in alphas.items()}
    plain = None  # CROWN's bound: the first step's, whose slopes are CROWN's
    optimiser = torch.optim.Adam(list(alphas.values()), lr=LEARNING_RATE, maximize=True)
    for step in range(steps + 1):
        now = bound(alphas)
        if plain is None:
            plain = best_bound = now.detach()
        better = now.detach() > best_bound
        best_bound = torch.where(better, now.detach(), best_bound)
        for i, a in alphas.items():
            mask = better.reshape(B, R, *[1] * (a.ndim - 2))
            best[i] = torch.where(mask, a.detach(), best[i])
        if step == steps or not now.requires_grad:  # done, or no slope reaches it
            break
        optimiser.zero_grad()
        now.sum().backward()
        optimiser.step()
        with torch.no_grad():
            for a in alphas.values():
                a.clamp_(0, 1)
    codes = {i: encode(best[i], unstable[i]) for i in nodes}
    rounded = bound({i: decode(c) for i, c in codes.items()}).detach()
    worse = rounded < plain
    for i, c in codes.items():
        codes[i] = torch.where(worse.reshape(B, R, *[1] * (c.ndim - 2)), ADAPTIVE, c)
    return codes
