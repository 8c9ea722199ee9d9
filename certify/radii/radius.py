"""Per-input, per-layer weight radii of a network: THEORY.md sections 3 to 5.

For an affine layer ``Z = W P + b`` (``P`` the layer input as columns: one column for a
dense layer, the im2col patches for a convolution; ``P~ = [P; 1]`` when the bias is
perturbed too) and a norm of ``D`` (``"fro"``: Frobenius, which for one dense input equals
the spectral radius; ``"max"``: entrywise max), three numbers per input:

* ``lower``: a sound certificate, no ``||D|| < lower`` changes the predicted class.
  Last dense layer: the exact class-pair formula (section 3). Other layers: section 4 turns
  the weight ball into a region of ``Z`` (``||D P~||_F <= rho sigma_max(P~)``;
  ``|(D P~)_ij| <= rho ||P~_:j||_1``; for several columns the set ``{D P~}`` itself,
  ``certify.bounds.regions``), and the best of the input-space bounds on the
  downstream network certifies it: the global Lipschitz bound (section 5) and CROWN-style
  linear bounds over that region (``certify.bounds.linear``), whose margin lines guide a
  secant search for the largest radius they certify (``local_lower``); beside them the
  second-order bound of section 9 on deviations from the clean trace
  (``certify.bounds.deviations``), and the largest radius certifies.
* ``upper``: the norm of a verified witness (``certify.radii.witness``): a weight-space DeepFool
  iteration (the first-order step of section 3, re-linearised) until a forward pass with the
  perturbed weights really changes the class, shrunk by bisection while it still does, then
  made smaller by a fast-minimum-norm attack (not on the last dense layer, whose witness
  is the exact minimiser).
* ``estimate``: the first-order back-propagated-margin value ``min_j m_j / ||g_j P~^T||_dual``
  (section 3, ``certify.radii.witness.first_order``); an estimate, not a bound.

Graphs (section 8): every node that does not depend on the layer (other branches, values
saved before it) is a constant of the downstream map from ``Z``; every forward pass from the
layer recomputes only the downstream nodes (``Graph.run``), and the global Lipschitz constant
is combined along the graph (``certify.bounds.lipschitz``: a sum's constant is the sum of its
operands').

Floating point: everything is float64, operator norms are rigorous upper bounds
(``certify.bounds.lipschitz``), and every lower bound is multiplied by ``1 - SAFETY`` to absorb
rounding in its own evaluation (relative errors there are below 1e-12).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from certify.bounds import deviations, lipschitz
from certify.bounds.linear import (ENCLOSE_WORK, REFINE_BELOW, REFINE_GAIN, REFINE_LIMIT,
                                   REFINE_PROBE, REFINE_WORK, enclosed, enclosure_work,
                                   margin_lines, refine_work)
from certify.bounds.regions import Region, WeightRegion
from certify.closed_forms.perturbation import class_pair_radius
from certify.closed_forms.thresholds import singular_values_upper
from certify.graph.graph import Graph
from certify.graph.inputs import InputError, affine_index, inputs_for
from certify.graph.operators import Affine
from certify.radii.methods import check_switch, method_options
from certify.radii.witness import WITNESS_GAP, Witness, first_order, weight_norm, witness

SAFETY = 1e-9
CONVERGED = 1e-3  # the local search stops for an input once its bracket is this narrow
NORMS = ("fro", "max")
CONCRETISE = ("weight", "output")  # the local bound's region for layers with several columns
ENCLOSURE_ENTRIES = 2**25  # coefficients of one enclosure held at once (256 MiB in float64)


@dataclass(frozen=True)
class LayerRadii:
    """Radii of one affine layer for one norm; tensors have one entry per input."""

    layer: str
    shape: tuple[int, ...]
    norm: str
    lower: torch.Tensor
    upper: torch.Tensor
    estimate: torch.Tensor
    lower_global: torch.Tensor
    lower_local: torch.Tensor
    method: str  # "exact" (last dense layer), else "lipschitz+crown" (or "crown") and
    # method_options: "(forward)", "(refined)", "(ball)", "(forward,refined,ball)", ...
    witness: "Witness"  # attains ``upper`` where it is finite


def predictions(network: Graph, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and margins ``m_j = o_y - o_j`` (``+inf`` at ``j = y``)."""
    return class_margins(network(x))


def class_margins(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``predictions`` from the logits already computed."""
    y = logits.argmax(-1)
    m = logits.gather(-1, y[:, None]) - logits
    return y, m.scatter(-1, y[:, None], math.inf)


def _columns(layer: Affine, h: torch.Tensor, bias: bool) -> torch.Tensor:
    """``P~``: the layer input as columns ``(B, n, L)``, with a row of ones for a bias."""
    P = layer.patches(h)
    return torch.cat([P, torch.ones_like(P[:, :1])], dim=1) if bias else P


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


def global_lower(network: Graph, index: int, scale: torch.Tensor, constants: dict, y, margins,
                 norm: str):
    """Section 5: ``min_j m_j / (||W_L^T c_j|| L * scale(P~))``, ``L`` the Lipschitz constant
    of the map from the layer's output to the logits layer's input (``prod ||W_k|| L_phi``
    along a chain, operands summed at additions: ``lipschitz.downstream``).

    ``scale`` is ``region_scale(P~, norm)``; ``constants`` are
    ``lipschitz.node_constants(network, index, norm)``.
    """
    rows, node = lipschitz.class_rows(network, y, norm)
    lip = lipschitz.downstream(network, index, norm, constants)[node]
    if norm == "max":
        scale = scale.amax(dim=-1)
    bound = (margins / (rows * lip)).scatter(-1, y[:, None], math.inf)
    return bound.amin(dim=-1) / scale


def global_exists(network: Graph, index: int, norm: str, constants: dict) -> bool:
    """Is the Lipschitz constant from the layer's output to the logits finite (section 5)?"""
    lip = lipschitz.downstream(network, index, norm, constants)[lipschitz.margin_node(network)]
    return bool(torch.isfinite(torch.as_tensor(lip, device=network.device)).all())


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
                ball: bool = False) -> torch.Tensor:
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
    margin_lines``). ``evaluations``: at most this many per input.
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
    todo = torch.nonzero(hi > lo * (1 + CONVERGED))[:, 0]
    for _ in range(evaluations):
        if not len(todo):
            break
        r, a, b = rho[todo], lo[todo], hi[todo]
        ok, g = [], []
        for piece in todo.split(chunk):  # bounded memory for the enclosures
            part = [v[piece] for v in values]
            where = region(layer, part[index], P[piece], norm, scale[piece], concretise)
            lines = margin_lines(network, index, where, rho[piece], y[piece], part,
                                 constants if norm == "fro" else None, refine, enclose,
                                 ball)
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
    return lo


def layer_radii(network: Graph, x: torch.Tensor, index: int, norm: str,
                bias: bool = False, refine: bool | str = "auto", concretise: str = "weight",
                enclose: bool | str = "auto", ball: bool | str = "auto",
                deviation: bool | str = "auto",
                clock=lambda phase: nullcontext()) -> LayerRadii:
    """All three radii of affine step ``index`` for every input in ``x`` (one norm).

    ``x``: a batch of finite floating-point inputs (any precision, computed in float64);
    ``index``: the node index of an affine layer (``network.affine_indices``).
    ``refine``: backward-pass intermediate bounds in the local bound (tighter, costlier);
    ``"auto"`` spends them where they pay: on every input when ``linear_bounds.refine_work``
    is at most ``REFINE_WORK``, else, when it is at most ``REFINE_LIMIT``, a second search
    from the unrefined radius for the inputs still below ``REFINE_BELOW`` times their
    verified upper bound: first for ``REFINE_PROBE`` of them, then for the rest only if the
    probe's median radius grew by ``REFINE_GAIN`` (``method`` then ends in ``(refined)``:
    some inputs were).
    ``concretise``: ``"weight"`` concretises the local bound of a layer with several columns
    (a convolution, a dense layer over a sequence) over the reachable set ``{D P~}``
    (``certify.bounds.regions.WeightRegion``, tighter); ``"output"`` over the Z-space ball or box
    containing it (earlier releases; for comparison). ``enclose``: forward enclosures in
    weight space tighten the intermediate boxes (``certify.graph.operators.enclosure``); ``"auto"``
    uses them for layers with several columns concretised in weight space, where
    ``linear_bounds.enclosure_work`` is positive (some box can tighten) and at most
    ``ENCLOSE_WORK`` (``method`` then names ``forward``); on one column, the refinement's
    backward passes are tighter. ``ball``: in the Frobenius norm, the margins' ReLU and
    LeakyReLU offsets over the box and the l2 ball every activation input lies in (its
    reach: the region's ball carried by the operators' l2 constants), SDP-CROWN's
    (``certify.graph.operators.activation.Activation.ball_offset``); never looser than the box's
    offsets; ``"auto"`` is ``True`` (``method`` then names ``ball``); no effect in ``max``.
    ``deviation``: the second-order bound of section 9 (``certify.bounds.deviations``:
    the exact first-order term from forward-mode derivatives of the clean trace, bounded
    remainders), beside the linear bounds' search (unchanged, so that no radius falls
    below theirs), and the larger certifies; ``"auto"``: where every downstream operator
    has the rules (``deviations.supported``); ``True`` raises ``InputError`` where one
    lacks them (``method`` names ``deviation`` where it is used).
    ``clock(phase)`` is entered around
    each phase (for timing breakdowns).

    Raises ``certify.graph.inputs.InputTypeError`` (a ``TypeError``) for inputs that are not floats,
    a non-integer index or a non-``Graph``, and ``certify.graph.inputs.InputError`` (a
    ``ValueError``) for NaN/Inf inputs or weights, an empty batch, a shape the network cannot
    take, an index that is not an affine layer, or an unknown ``norm``, ``refine``,
    ``concretise``, ``enclose`` or ``ball``.
    """
    if norm not in NORMS:
        raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
    if concretise not in CONCRETISE:
        raise InputError(f"concretise must be one of {CONCRETISE}, got {concretise!r}")
    for name, value in (("refine", refine), ("enclose", enclose), ("ball", ball),
                        ("deviation", deviation)):
        check_switch(name, value)
    x = inputs_for(network, x)
    index = affine_index(network, index)
    layer = network.layer(index)
    if deviation is True and not network.is_last_dense(index):
        missing = deviations.unsupported(network, index)
        if missing is not None:
            raise InputError(f"deviation=True, but {missing} downstream of layer "
                             f"{network.nodes[index].name!r} has no deviation rules (THEORY.md "
                             "section 9); pass deviation='auto' to use them where they exist")
    with clock("prepare"):
        values = network.values(x)
        h, Z = values[network.input_of(index)], values[index]
        y, margins = class_margins(values[-1])
        P = _columns(layer, h, bias)
    with clock("estimate"):
        estimate = first_order(network, index, P, Z, y, norm, values)[0]
    if network.is_last_dense(index):
        with clock("exact"):
            pair = class_pair_radius(values[-1], h, norm, bias=bias)
        with clock("witness"):
            # The exact minimiser makes two logits tie; beyond it (the margin falls linearly
            # along it) another class wins by more than WITNESS_GAP (_flips).
            past = torch.clamp(4 * WITNESS_GAP * values[-1].abs().amax(-1) /
                               pair.value.clamp(min=1e-300) / torch.linalg.vector_norm(
                                   h, dim=-1).clamp(min=1e-300), min=1e-9, max=1.0)
            upper, D = witness(network, index, P, y, norm, bias, Z.shape[1:],
                               start=Witness(full=pair.minimiser * (1 + past[:, None, None])),
                               values=values, minimum_norm_steps=0)  # it is minimal
        lower = lower_global = lower_local = pair.value * (1 - SAFETY)
        method = "exact"
    else:
        with clock("witness"):
            upper, D = witness(network, index, P, y, norm, bias, Z.shape[1:], values=values)
        with clock("global"):
            scale = region_scale(P, norm)
            constants = lipschitz.node_constants(network, index, norm)
            lower_global = global_lower(network, index, scale, constants, y, margins, norm) * \
                (1 - SAFETY)
        with clock("local"):
            if enclose == "auto":  # where one D is shared by several columns
                where = region(layer, Z[:1], P[:1], norm, scale[:1], concretise)
                enclose = isinstance(where, WeightRegion) and \
                    0 < enclosure_work(network, index, where.dimension) <= ENCLOSE_WORK
            enclose = bool(enclose and enclosed(network, index))
            # SDP-CROWN's offsets need an l2 ball (the Frobenius norm) and an activation
            # with them downstream; "auto" is True: they cost a few evaluations of one
            # elementwise pass per activation and never loosen a bound.
            ball = bool(ball) and norm == "fro" and any(
                network.nodes[i].op.ball_aware for i in network.downstream(index))
            policy = refine == "auto"
            work = refine_work(network, index) if policy else None
            if policy:
                refine = work <= REFINE_WORK
            # The search needs a finite upper end; without a witness, beyond the estimate,
            # else far beyond the global bound, else ten times the weight itself.
            fallback = torch.where(torch.isfinite(estimate), 2 * estimate, 1e3 * lower_global)
            fallback = torch.where(fallback > 0, fallback, 10 * float(weight_norm(
                layer.matrix[None], norm)[0]))
            cap = torch.where(torch.isfinite(upper), upper, fallback + lower_global)
        with clock("deviation"):
            deviation = bool(deviation) and deviations.supported(network, index)
            second = deviations.deviation_lower(network, index, values, y, P, norm, cap) * \
                (1 - SAFETY) if deviation else torch.zeros_like(lower_global)
        with clock("local"):
            # Without a global bound (through attention) the radius may lie orders of
            # magnitude below the witness: the search falls faster until it certifies; else
            # the global bound is the search's lower end.
            shrink = torch.where(lower_global > 0, 2.0, 16.0).to(cap.dtype)
            # Through attention (products of computed tensors) the global constant is
            # infinite and the section-5 bound does not exist: the linear bounds alone
            # certify, with more evaluations.
            exists = global_exists(network, index, norm, constants)

            def search(part, refined: bool, floor: torch.Tensor) -> torch.Tensor:
                """The local search for the inputs ``part`` (an index or a slice)."""
                return local_lower(
                    network, index, [v[part] for v in values], y[part], norm, P[part],
                    scale[part], cap[part], constants, refine=refined, shrink=shrink[part],
                    floor=floor, concretise=concretise, enclose=enclose, ball=ball,
                    evaluations=16 if exists else 24) * (1 - SAFETY)

            local = search(slice(None), refine, lower_global)
            weak = torch.isfinite(upper) & (local < REFINE_BELOW * upper)
            if policy and not refine and work <= REFINE_LIMIT and weak.any():
                # The refined search starts from the unrefined radius (its bracket's lower
                # end), so it can only raise it. A probe of REFINE_PROBE weak inputs first:
                # the others only where it raised their radius by REFINE_GAIN.
                chosen = torch.nonzero(weak)[:, 0]
                probe, rest = chosen[:REFINE_PROBE], chosen[REFINE_PROBE:]
                local = local.clone()
                again = search(probe, True, local[probe])
                gain = float((again / local[probe]).median())
                local[probe] = torch.maximum(local[probe], again)
                if gain >= REFINE_GAIN and len(rest):
                    local[rest] = torch.maximum(local[rest], search(rest, True, local[rest]))
                refine = True
            lower_local = torch.maximum(torch.maximum(lower_global, local), second)
        lower = lower_local
        method = ("lipschitz+crown" if exists else "crown") + method_options(
            enclose, refine, ball, deviation and bool((second > 0).any()))
    if (lower > upper).any():
        bad = torch.nonzero(lower > upper)[:5, 0].tolist()
        raise AssertionError(f"soundness violated at inputs {bad}: lower > verified upper")
    return LayerRadii(network.nodes[index].name, tuple(layer.weight.shape), norm, lower, upper,
                      estimate,
                      lower_global, lower_local, method, D)
