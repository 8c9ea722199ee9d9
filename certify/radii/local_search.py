"""The local bound's radius search (THEORY.md section 4): the region of a layer's weight
ball in its output space, and the largest radius the linear bounds certify there.

Within one search the margin lines are kept: a line made at ``rho_k`` holds for every
``rho <= rho_k`` (``certify.bounds.linear.margin_lines``), so an evaluation at ``rho`` takes
new backward passes (one row per class) only for the classes that neither a kept line nor
interval arithmetic certifies there (``KeptLines``). On a network with many classes most
cannot overtake the predicted one near the certified radius, and their rows are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.bounds import slopes
from certify.bounds.linear import MarginLines, boxes_and_reach, enclosed, lines_on, margin_lines
from certify.bounds.regions import Region, WeightRegion
from certify.closed_forms.thresholds import singular_values_upper
from certify.graph.graph import Graph
from certify.graph.operators import Affine

CONVERGED = 1e-3  # the local search stops for an input once its bracket is this narrow
METHODS = 2  # margin lines per evaluation: CROWN's and the interval Jacobian's
ENCLOSURE_ENTRIES = 2**25  # coefficients of one enclosure held at once (256 MiB in float64)


@dataclass
class KeptLines:
    """The margin lines of a search's evaluations so far, per input and class: the newest
    ``value - rho' slope`` of each method (``(K, B, C)``), made at ``made`` ``(B, C)`` and so
    valid for every ``rho' <= made`` (``-inf`` where none was made). The search's working
    state, updated in place (``put``)."""

    value: torch.Tensor
    slope: torch.Tensor
    made: torch.Tensor

    @classmethod
    def empty(cls, batch: int, classes: int, like: torch.Tensor) -> "KeptLines":
        value = like.new_full((METHODS, batch, classes), -math.inf)
        return cls(value, torch.zeros_like(value), like.new_full((batch, classes), -math.inf))

    def lower(self, rho: torch.Tensor) -> torch.Tensor:
        """The kept lines' bound of every margin at ``rho`` ``(B, C)``, ``-inf`` where no
        kept line holds there."""
        bound = (self.value - rho[:, None] * self.slope).amax(0)
        return torch.where(self.made >= rho[:, None], bound, -math.inf)

    def updated(self, lines: MarginLines, rho: torch.Tensor) -> "KeptLines":
        """These lines with those of the classes ``lines`` computed (at ``rho``)."""
        new = (lines.value > -math.inf).any(0)
        return KeptLines(torch.where(new, lines.value, self.value),
                         torch.where(new, lines.slope, self.slope),
                         torch.where(new, rho[:, None], self.made))

    def rows(self, index: torch.Tensor) -> "KeptLines":
        """The lines of the inputs ``index``."""
        return KeptLines(self.value[:, index], self.slope[:, index], self.made[index])

    def put(self, index: torch.Tensor, part: "KeptLines") -> None:
        """Store ``part`` as the lines of the inputs ``index`` (in place)."""
        self.value[:, index], self.slope[:, index], self.made[index] = \
            part.value, part.slope, part.made

    def view(self, rho: torch.Tensor, interval: torch.Tensor) -> MarginLines:
        """The lines that hold at ``rho``, with an evaluation's interval bound there."""
        hold = self.made >= rho[:, None]
        return MarginLines(torch.where(hold, self.value, -math.inf),
                           torch.where(hold, self.slope, 0.0), interval)


def region_scale(P: torch.Tensor, norm: str) -> torch.Tensor:
    """How far ``Z`` can move per unit ``||D||`` (section 4), per input.

    ``fro``: ``sigma_max(P~)`` (an upper bound), the l2 radius in ``Z``.
    ``max``: ``||P~_:j||_1`` per column ``j`` (the same for every output channel).
    """
    if norm == "fro":
        if P.shape[-1] == 1:
            return torch.linalg.vector_norm(P[..., 0], dim=-1) * (1 + P.shape[1] * 1e-15)
        return torch.stack([singular_values_upper(p)[0] for p in P])
    return P.abs().sum(dim=1) * (1 + P.shape[1] * 1e-15)  # (B, L)


def region(layer: Affine, Z: torch.Tensor, P: torch.Tensor, norm: str,
           scale: torch.Tensor | None = None, concretise: str = "weight") -> Region:
    """The section-4 region ``Z + rho U`` of a weight ball of radius ``rho``
    (``certify.bounds.regions``): for one column ``P~ = h`` the l2 ball of radius ``||h||_2``
    (``fro``) or the box ``|dZ_c| <= ||h||_1``, exact; for several columns the reachable set
    ``{D P~}`` (``WeightRegion``), with ``unit`` the Z-space ball of radius
    ``sigma_max(P~)`` or the box ``|dZ_cj| <= ||P~_:j||_1``. ``scale``:
    ``region_scale(P~, norm)`` when already computed. ``concretise="output"``: the Z-space
    ball or box for several columns too (looser; the bound of earlier releases)."""
    scale = region_scale(P, norm) if scale is None else scale
    if norm == "fro":
        unit = scale
    else:
        B, L = scale.shape
        unit = layer.uncolumns(scale[:, None, :].expand(B, layer.weight.shape[0], L),
                               Z.shape[1:])
    if P.shape[-1] == 1 or concretise == "output":
        return Region(Z, norm, unit)
    return WeightRegion(Z, norm, unit, P, layer)


def local_lower(network: Graph, index: int, values, y: torch.Tensor, norm: str,
                P: torch.Tensor, scale: torch.Tensor, cap: torch.Tensor, constants: dict | None,
                evaluations: int = 16, refine: bool = True,
                shrink: torch.Tensor | float = 2.0,
                floor: torch.Tensor | None = None,
                concretise: str = "weight", enclose: bool = False,
                ball: bool = False, keep_lines: bool = False, optimise: int = 0,
                codes: dict | None = None) -> torch.Tensor:
    """The largest ``rho`` found whose region is certified by the linear bounds (section 4).

    Each evaluation at ``rho`` makes the relaxations on ``Z + rho U`` and yields, for every
    margin, a line ``value - rho' slope`` valid for all ``rho' <= rho``: ``rho`` is certified
    when every line is positive there, and the lines' common root ``g(rho)`` is the largest
    radius they certify. The best radius these bounds reach is the fixed point
    ``g(rho*) = rho*``: the search looks for it by the secant method on
    ``log g(rho) - log rho`` over ``log rho`` (from one evaluation, at ``g(rho)``), kept
    inside the bracket ``[lo, hi]`` of the largest certified and smallest failed radius,
    and geometric bisection where the secant cannot guide (no line positive, a certificate
    beyond the lines' root, two steps that did not halve the bracket); while nothing is
    certified it falls by ``shrink``, or to the failure's root if that is higher. An input
    leaves the search once ``hi <= lo (1 + CONVERGED)``. Only radii certified by their own
    evaluation are returned, so that ``certify check`` can confirm each by one evaluation at
    the claimed radius.
    ``values``: every node's unperturbed value; ``P``: the layer input as columns ``P~``,
    ``scale`` its ``region_scale``; ``constants``: ``lipschitz.node_constants(network,
    index, "fro")`` for ``fro``. ``shrink``: per input (larger where no global bound
    brackets the radius from below). ``floor``: radii already certified otherwise (the global
    bound), where positive the bracket's lower end, and the search starts in the geometric
    middle. ``concretise``: as in ``region``. ``enclose``: forward enclosures tighten the
    intermediate boxes (``linear_bounds.intermediate_bounds``), evaluated on at most
    ``ENCLOSURE_ENTRIES`` coefficients at a time. ``ball`` (``fro``): the margins' backward
    pass takes SDP-CROWN's offsets over the l2 balls of the reaches (``linear_bounds.
    margin_lines``). ``evaluations``: at most this many per input. ``keep_lines``: each
    evaluation computes lines only for the classes the lines kept from earlier ones
    (``KeptLines``) or interval arithmetic do not certify; a radius certified with kept lines
    is then confirmed by an evaluation of its own at the end (else the largest radius so
    confirmed is returned), so that every radius returned is certified by one evaluation.
    ``optimise``: each evaluation's CROWN line takes lower slopes optimised by that many
    steps (``certify.bounds.slopes``), and its refinement CROWN's adaptive lines as well
    (``linear.boxes_and_reach``'s ``adaptive``); ``codes`` (a dict, filled in place): the
    slopes' codes of the evaluation that certified each returned radius (node ->
    ``(B, C, *x)`` bytes,
    ``slopes.ADAPTIVE`` for inputs whose radius no optimised evaluation certified), which
    ``certify check`` needs to repeat it.
    """
    layer = network.layer(index)
    chunk = len(cap)
    if enclose:
        widest = max((math.prod(network.nodes[i].shape) for i in enclosed(network, index)),
                     default=1)
        dimension = region(layer, values[index][:1], P[:1], norm, scale[:1],
                           concretise).dimension
        chunk = max(1, int(ENCLOSURE_ENTRIES // (dimension * widest)))
    lo, hi = torch.zeros_like(cap), cap.clone()
    if floor is not None:
        lo = torch.where(floor > 0, torch.minimum(floor, cap), lo)
    rho = torch.where(lo > 0, torch.sqrt(lo * hi), cap / shrink)
    shrink = torch.as_tensor(shrink, dtype=cap.dtype, device=cap.device).expand_as(cap)
    # The secant's points: log rho and log(g / rho) of the last two evaluations; the widths
    # log(hi / lo) after the two before.
    t0, h0 = torch.full_like(cap, math.nan), torch.full_like(cap, math.nan)
    t1, h1 = t0.clone(), h0.clone()
    w0, w1 = torch.full_like(cap, math.inf), torch.full_like(cap, math.inf)
    # Each input's radius depends on that input alone, so the inputs whose bracket has
    # closed leave the batch and the evaluations go to the others.
    def evaluate(piece: torch.Tensor, at: torch.Tensor, known: torch.Tensor | None):
        """``margin_lines`` of the inputs ``piece`` at the radii ``at``; with ``optimise``,
        on optimised slopes, whose codes stay in ``found`` until ``record`` keeps those of
        the inputs certified."""
        part = [v[piece] for v in values]
        where = region(layer, part[index], P[piece], norm, scale[piece], concretise)
        fro = constants if norm == "fro" else None
        if not optimise:
            return margin_lines(network, index, where, at, y[piece], part, fro, refine,
                                enclose, ball, known)
        boxes, reach = boxes_and_reach(network, index, where, at, part, fro, refine, enclose,
                                       adaptive=True)
        balls = {i: (part[i], r) for i, r in reach.items()} if ball else None
        found.clear()
        found.update(slopes.optimise(network, index, where, at, y[piece], part, boxes, balls,
                                     optimise))
        alphas = {i: slopes.decode(c) for i, c in found.items()}
        return lines_on(network, index, where, y[piece], part, boxes, reach, ball, alphas=alphas)

    def record(piece: torch.Tensor, certified: torch.Tensor) -> None:
        """The codes of the last evaluation become those of the inputs ``piece[certified]``."""
        for i, c in found.items():
            codes[i][piece[certified]] = c[certified]

    found: dict = {}
    if optimise:
        if codes is None:
            raise ValueError("local_lower(optimise=...) needs a codes dict to fill")
        classes = values[-1].shape[-1]
        for i in slopes.optimisable(network, index):
            codes[i] = torch.full((len(cap), classes, *network.nodes[i].shape), slopes.ADAPTIVE,
                                  dtype=torch.uint8, device=cap.device)

    kept = KeptLines.empty(len(cap), values[-1].shape[-1], cap) if keep_lines else None
    fresh = lo.clone()  # the floor, or the largest radius certified without kept lines
    todo = torch.nonzero(hi > lo * (1 + CONVERGED))[:, 0]
    for _ in range(evaluations):
        if not len(todo):
            break
        r, a, b = rho[todo], lo[todo], hi[todo]
        ok, g = [], []
        for piece in todo.split(chunk):  # bounded memory for the enclosures
            mine = None if kept is None else kept.rows(piece)
            lines = evaluate(piece, rho[piece],
                             None if mine is None else mine.lower(rho[piece]))
            alone = lines.certified(rho[piece], y[piece])
            if mine is None:
                record(piece, alone)  # lo becomes rho there
            else:
                record(piece, alone & (rho[piece] > fresh[piece]))
                fresh[piece] = torch.where(alone, torch.maximum(fresh[piece], rho[piece]),
                                           fresh[piece])
                mine = mine.updated(lines, rho[piece])
                kept.put(piece, mine)
                lines = mine.view(rho[piece], lines.interval)
            ok.append(lines.certified(rho[piece], y[piece]))
            g.append(lines.root(y[piece]))
        ok, g = torch.cat(ok), torch.cat(g)
        a, b = torch.where(ok, torch.maximum(a, r), a), torch.where(ok, b, torch.minimum(b, r))
        lo[todo], hi[todo] = a, b
        t0[todo], h0[todo] = t1[todo], h1[todo]
        t1[todo], h1[todo] = r.log(), (g / r).log()
        # The secant's zero of h(t) = log(g / rho) at t = log rho; from one point, g itself.
        dt, dh = t1[todo] - t0[todo], h1[todo] - h0[todo]
        secant = torch.where(torch.isfinite(h0[todo]), t1[todo] - h1[todo] * dt / dh,
                             g.log()).exp()
        # Geometric bisection instead where the secant cannot guide: no line positive, a
        # certificate beyond the lines' root (interval arithmetic), or two steps that did
        # not halve the bracket.
        now = (b / a).log()
        blind = ~torch.isfinite(secant) | ~torch.isfinite(h1[todo]) | \
            (ok & (g <= r * (1 + CONVERGED))) | (now > w0[todo] / 2)
        w0[todo], w1[todo] = w1[todo], now
        low, high = a * (1 + CONVERGED / 2), b / (1 + CONVERGED / 2)
        inside = torch.where((low < high) & ~blind, secant.clamp(min=low).minimum(high),
                             torch.sqrt(a * b))
        fall = torch.maximum(g * (1 - 1e-7), b / shrink[todo]).minimum(b / (1 + CONVERGED))
        rho[todo] = torch.where(a > 0, inside, fall)
        todo = todo[b > a * (1 + CONVERGED)]
    if kept is None:
        return lo
    # A radius certified with kept lines is confirmed by an evaluation of its own (what
    # certify check repeats), or the largest radius so confirmed is returned.
    unconfirmed = torch.nonzero(lo > fresh)[:, 0]
    for piece in unconfirmed.split(chunk) if len(unconfirmed) else ():
        lines = evaluate(piece, lo[piece], torch.full_like(values[-1][piece], -math.inf))
        certified = lines.certified(lo[piece], y[piece])
        record(piece, certified)
        fresh[piece] = torch.where(certified, lo[piece], fresh[piece])
    return fresh
