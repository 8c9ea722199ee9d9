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
from dataclasses import dataclass, field

import torch

from certify.bounds import deviations, lipschitz, slopes
from certify.bounds.linear import (ENCLOSE_WORK, REFINE_BELOW, REFINE_GAIN, REFINE_LIMIT,
                                   REFINE_PROBE, REFINE_WORK, enclosed, enclosure_work,
                                   refine_work)
from certify.bounds.regions import WeightRegion
from certify.closed_forms.perturbation import class_pair_radius
from certify.graph.graph import Graph
from certify.graph.inputs import InputError, affine_index, inputs_for
from certify.graph.operators import Affine
from certify.radii.local_search import local_lower, region, region_scale
from certify.radii.methods import check_steps, check_switch, method_options
from certify.radii.witness import (WITNESS_GAP, Witness, candidates, first_order, weight_norm,
                                   witness)

SAFETY = 1e-9
NORMS = ("fro", "max")
KEEP_LINES_FROM = 32  # classes from which the local search keeps its lines by default
CONCRETISE = ("weight", "output")  # the local bound's region for layers with several columns
# ``optimise``: the inputs below OPTIMISE_BELOW times their witness get a second search, of at
# most OPTIMISE_EVALUATIONS evaluations, on optimised slopes.
OPTIMISE_BELOW = 0.95
OPTIMISE_EVALUATIONS = 10


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
    # ``optimise``: node name -> the slope codes ``(B, C, *x)`` the certificate's lower
    # bound used (``certify.bounds.slopes``; ``ADAPTIVE``: CROWN's own); empty without.
    slopes: dict = field(default_factory=dict)


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


def layer_radii(network: Graph, x: torch.Tensor, index: int, norm: str,
                bias: bool = False, refine: bool | str = "auto", concretise: str = "weight",
                enclose: bool | str = "auto", ball: bool | str = "auto",
                deviation: bool | str = "auto", keep_lines: bool | str = "auto",
                optimise: int = 0, clock=lambda phase: nullcontext()) -> LayerRadii:
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
    lacks them (``method`` names ``deviation`` where it is used). ``keep_lines``: the local
    search keeps its margin lines across evaluations and computes new ones only for the
    classes they do not certify (``local_search.local_lower``; the same radii up to the
    search's path, one confirming evaluation more); ``"auto"``: with at least
    ``KEEP_LINES_FROM`` classes, where the rows of the classes dominate the work.
    ``optimise``: a number of steps; the inputs whose radius stays below ``OPTIMISE_BELOW``
    times their witness get a second local search from it, refined (with CROWN's adaptive
    lines as well as the two-sided ones), whose CROWN lines take lower ReLU slopes
    optimised by that many steps at each evaluation (``certify.bounds.slopes``,
    alpha-CROWN); where it certifies more, ``slopes`` holds the codes that ``certify check``
    repeats (``method`` then names ``optimised``). 0 (the default): CROWN's slopes.
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
                        ("deviation", deviation), ("keep_lines", keep_lines)):
        check_switch(name, value)
    check_steps(optimise)
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
        estimate, _, _, ratio = first_order(network, index, P, Z, y, norm, values)
        steer = candidates(ratio)
    codes = {}  # optimised slopes: node -> codes (B, C, *x), where they certified
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
                               values=values, minimum_norm_steps=0,  # it is minimal
                               classes=steer)
        lower = lower_global = lower_local = pair.value * (1 - SAFETY)
        method = "exact"
    else:
        with clock("witness"):
            upper, D = witness(network, index, P, y, norm, bias, Z.shape[1:], values=values,
                               classes=steer)
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
            if keep_lines == "auto":
                keep_lines = values[-1].shape[-1] >= KEEP_LINES_FROM

            def search(part, refined: bool, floor: torch.Tensor, steps: int = 0,
                       codes: dict | None = None) -> torch.Tensor:
                """The local search for the inputs ``part`` (an index or a slice)."""
                return local_lower(
                    network, index, [v[part] for v in values], y[part], norm, P[part],
                    scale[part], cap[part], constants, refine=refined, shrink=shrink[part],
                    floor=floor, concretise=concretise, enclose=enclose, ball=ball,
                    evaluations=OPTIMISE_EVALUATIONS if steps else 16 if exists else 24,
                    keep_lines=bool(keep_lines) and not steps, optimise=steps,
                    codes=codes) * (1 - SAFETY)

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
            weak = torch.isfinite(upper) & (local < OPTIMISE_BELOW * upper)
            if optimise and slopes.optimisable(network, index) and weak.any():
                chosen = torch.nonzero(weak)[:, 0]
                again = search(chosen, True, local[chosen], optimise, codes)
                better = again > local[chosen]
                local = local.clone()
                local[chosen] = torch.maximum(local[chosen], again)
                for i, part in codes.items():  # the slopes that certified each radius
                    full = torch.full((len(x), *part.shape[1:]), slopes.ADAPTIVE,
                                      dtype=part.dtype, device=part.device)
                    full[chosen[better]] = part[better]
                    codes[i] = full
                if not better.any():
                    codes = {}
            lower_local = torch.maximum(torch.maximum(lower_global, local), second)
            if codes and not bool(((local > lower_global) & (local > second)).any()):
                codes = {}  # another bound certifies every radius
        lower = lower_local
        method = ("lipschitz+crown" if exists else "crown") + method_options(
            enclose, refine, ball, deviation and bool((second > 0).any()), bool(codes))
    if (lower > upper).any():
        bad = torch.nonzero(lower > upper)[:5, 0].tolist()
        raise AssertionError(f"soundness violated at inputs {bad}: lower > verified upper")
    return LayerRadii(network.nodes[index].name, tuple(layer.weight.shape), norm, lower, upper,
                      estimate, lower_global, lower_local, method, D,
                      {network.nodes[i].name: c for i, c in codes.items()})
