"""Per-input, per-layer weight radii of a network: THEORY.md sections 3 to 5.

For an affine layer ``Z = W P + b`` (``P`` the layer input as columns: one column for a
dense layer, the im2col patches for a convolution; ``P~ = [P; 1]`` when the bias is
perturbed too) and a norm of ``D`` (``"fro"``: Frobenius, which for one dense input equals
the spectral radius; ``"max"``: entrywise max), three numbers per input:

* ``lower``: a sound certificate, no ``||D|| < lower`` changes the predicted class.
  Last dense layer: the exact class-pair formula (section 3). Other layers: section 4 turns
  the weight ball into a region of ``Z`` (``||D P~||_F <= rho sigma_max(P~)``;
  ``|(D P~)_ij| <= rho ||P~_:j||_1``), and the best of two input-space bounds on the
  downstream network certifies it: the global Lipschitz bound (section 5) and CROWN-style
  linear bounds over that region (``certify.linear_bounds``), whose margin lines give the
  next radius to try (a few evaluations, no bisection).
* ``upper``: the norm of a verified witness: a weight-space DeepFool iteration (the
  first-order rank-one step of section 3, re-linearised) until a forward pass with the
  perturbed weights really changes the class, then shrunk by bisection while it still does.
* ``estimate``: the first-order back-propagated-margin value ``min_j m_j / ||g_j P~^T||_dual``
  (section 3); an estimate, not a bound.

Graphs (section 8): every node that does not depend on the layer (other branches, values
saved before it) is a constant of the downstream map from ``Z``; every forward pass from the
layer recomputes only the downstream nodes (``Graph.run``), and the global Lipschitz constant
is combined along the graph (``certify.lipschitz``: a sum's constant is the sum of its
operands').

Floating point: everything is float64, operator norms are rigorous upper bounds
(``certify.lipschitz``), and every lower bound is multiplied by ``1 - SAFETY`` to absorb
rounding in its own evaluation (relative errors there are below 1e-12).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from certify import lipschitz
from certify.compression import singular_values_upper
from certify.graph import Graph
from certify.inputs import InputError, affine_index, inputs_for
from certify.linear_bounds import REFINE_WORK, Region, margin_lines, refine_work
from certify.operators import Affine
from certify.perturbation import class_pair_radius

SAFETY = 1e-9
WITNESS_GAP = 1e-12  # relative: how far another logit must pass the predicted one
NORMS = ("fro", "max")


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
    method: str  # "exact" (last dense layer), "lipschitz+crown" or "lipschitz+crown(refined)"
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


def _weight(layer: Affine, bias: bool) -> torch.Tensor:
    W = layer.matrix
    return torch.cat([W, layer.bias[:, None]], dim=1) if bias else W


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


WIDE = 1e3  # a witness this many times the global bound: search between them geometrically


def global_exists(network: Graph, index: int, norm: str, constants: dict) -> bool:
    """Is the Lipschitz constant from the layer's output to the logits finite (section 5)?"""
    lip = lipschitz.downstream(network, index, norm, constants)[lipschitz.margin_node(network)]
    return bool(torch.isfinite(torch.as_tensor(lip, device=network.device)).all())


def region(layer: Affine, Z: torch.Tensor, scale: torch.Tensor, norm: str) -> Region:
    """The section-4 region ``Z + rho U`` of a weight ball of radius ``rho``: ``U`` is the
    l2 ball of radius ``sigma_max(P~)`` (``fro``) or the box ``|dZ_cj| <= ||P~_:j||_1``."""
    if norm == "fro":
        return Region(Z, norm, scale)
    B, L = scale.shape
    unit = scale[:, None, :].expand(B, layer.weight.shape[0], L)
    return Region(Z, norm, layer.uncolumns(unit, Z.shape[1:]))


def local_lower(network: Graph, index: int, values, y: torch.Tensor, norm: str,
                scale: torch.Tensor, cap: torch.Tensor, constants: dict | None,
                evaluations: int = 8, refine: bool = True,
                shrink: torch.Tensor | float = 2.0,
                floor: torch.Tensor | None = None) -> torch.Tensor:
    """The largest ``rho`` found whose region is certified by the linear bounds (section 4).

    Each evaluation at ``rho`` makes the relaxations on ``Z + rho U`` and yields, for every
    margin, a line ``value - rho' slope`` valid for all ``rho' <= rho``: ``rho`` is certified
    when every line is positive there, and the lines' common root is where to look next
    (the fixed point ``root(rho) = rho`` is the best radius these bounds can reach). Only
    radii certified by their own evaluation are returned, so that ``certify check`` can
    confirm each by one evaluation at the claimed radius. ``values``: every node's unperturbed
    value; ``constants``: ``lipschitz.node_constants(network, index, "fro")`` for ``fro``.
    ``shrink``: the factor by which the search falls while nothing is certified (per input;
    larger where no global bound brackets the radius from below). ``floor``: radii already
    certified otherwise (the global bound), where positive the bracket's lower end, and the
    search is geometric from the start.
    """
    where = region(network.layer(index), values[index], scale, norm)
    lo, hi, rho = torch.zeros_like(cap), cap.clone(), cap / shrink
    if floor is not None:
        lo = torch.where(floor > 0, torch.minimum(floor, cap), lo)
        rho = torch.where(lo > 0, torch.sqrt(lo * hi), rho)
    for _ in range(evaluations):
        lines = margin_lines(network, index, where, rho, y, values,
                             constants if norm == "fro" else None, refine)
        ok = lines.certified(rho, y)
        lo = torch.where(ok, torch.maximum(lo, rho), lo)
        hi = torch.where(ok, hi, torch.minimum(hi, rho))
        # Next: the lines' root (the relaxations only tighten as rho shrinks), but at least
        # the middle of the bracket (geometric once it has a positive lower end).
        middle = torch.where(lo > 0, torch.sqrt(lo * hi), hi / shrink)
        step = torch.maximum(lines.root(y) * (1 - 1e-7), middle)
        rho = torch.where(step < hi, step, middle)
        if (hi <= lo * (1 + 1e-3)).all():
            break
    return lo


def _margin_gradients(network, index, Z, y, values):
    """``g_j = d m_j / d Z`` for every class ``j`` as columns ``(B, C, m, L)``, and the
    logits (every node that does not depend on the layer held at its value in ``values``)."""
    Z = Z.detach().requires_grad_(True)
    logits = network.run(index, Z, values)
    layer = network.layer(index)
    grads = []
    for j in range(logits.shape[-1]):
        m = logits.gather(-1, y[:, None])[:, 0] - logits[:, j]
        (g,) = torch.autograd.grad(m.sum(), Z, retain_graph=True, allow_unused=True)
        g = torch.zeros_like(Z) if g is None else g
        grads.append(layer.columns(g))
    return torch.stack(grads, dim=1), logits.detach()


def _gradient(g: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``d m_j / d D = g_j P~^T`` for one class per input: ``(B, m, L) x (B, n, L)``."""
    return torch.matmul(g, P.transpose(1, 2))


def _dual_norms(g: torch.Tensor, P: torch.Tensor, norm: str) -> torch.Tensor:
    """``||g_j P~^T||_dual`` for every class, ``(B, C)``; rank one for dense layers."""
    if P.shape[-1] == 1:  # ||g h^T||_F = ||g||_2 ||h||_2, ||g h^T||_sum = ||g||_1 ||h||_1
        ord = 2 if norm == "fro" else 1
        return torch.linalg.vector_norm(g[..., 0], ord=ord, dim=-1) * \
            torch.linalg.vector_norm(P[:, None, :, 0], ord=ord, dim=-1)
    return _dual(torch.matmul(g, P.transpose(1, 2)[:, None]), norm)


def _dual(G: torch.Tensor, norm: str) -> torch.Tensor:
    """Dual norm of a gradient w.r.t. ``D`` (last two axes): Frobenius or entrywise sum."""
    return torch.linalg.matrix_norm(G) if norm == "fro" else G.abs().sum(dim=(-2, -1))


def first_order(network, index, P, Z, y, norm, values):
    """Section 3 estimate ``min_j m_j / ||g_j P~^T||_dual``; also ``g``, the margins and ratios."""
    g, logits = _margin_gradients(network, index, Z, y, values)
    m = logits.gather(-1, y[:, None]) - logits
    ratio = (m / _dual_norms(g, P, norm)).scatter(-1, y[:, None], math.inf)
    return ratio.amin(dim=-1), g, m, ratio


def _step(G: torch.Tensor, m: torch.Tensor, norm: str) -> torch.Tensor:
    """The minimal-norm ``D`` with ``<D, G> = -m`` (section 3, any ``G``)."""
    if norm == "fro":
        return -m[:, None, None] * G / torch.linalg.matrix_norm(G)[:, None, None] ** 2
    return -m[:, None, None] * torch.sign(G) / G.abs().sum(dim=(-2, -1))[:, None, None]


@dataclass(frozen=True)
class Witness:
    """Per-input weight perturbations that change the class.

    Dense layers: every DeepFool step is rank one with the same right factor
    (``h~`` for Frobenius, ``sign(h~)`` for entrywise max), so ``D = left right^T`` is stored
    as its two factors (``(B, m)`` and ``(B, n)``). Convolutions: ``full`` is ``(B, m, n)``.
    """

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    full: torch.Tensor | None = None

    def matrix(self) -> torch.Tensor:
        return self.full if self.full is not None else self.left[:, :, None] * self.right[:, None, :]

    def norm(self, norm: str) -> torch.Tensor:
        if self.full is not None:
            return _norm(self.full, norm)
        ord = 2 if norm == "fro" else math.inf
        return torch.linalg.vector_norm(self.left, ord=ord, dim=-1) * \
            torch.linalg.vector_norm(self.right, ord=ord, dim=-1)

    def scaled(self, t: torch.Tensor) -> "Witness":
        if self.full is not None:
            return Witness(full=t[:, None, None] * self.full)
        return Witness(left=t[:, None] * self.left, right=self.right)

    def change(self, P: torch.Tensor) -> torch.Tensor:
        """``D P~`` as ``(B, m, L)``."""
        if self.full is not None:
            return torch.matmul(self.full, P)
        return self.left[:, :, None] * (self.right[:, :, None] * P).sum(dim=1, keepdim=True)


def _norm(D: torch.Tensor, norm: str) -> torch.Tensor:
    return torch.linalg.matrix_norm(D) if norm == "fro" else D.abs().amax(dim=(-2, -1))


def _unperturbed(layer, W, P, bias) -> torch.Tensor:
    """``W P~`` (+ the fixed bias) as ``(B, m, L)``: one matrix product for dense layers."""
    if P.shape[-1] == 1:
        Z = (P[..., 0] @ W.T)[..., None]
    else:
        Z = torch.matmul(W, P)
    return Z if bias else Z + layer.bias[:, None]


def _perturbed(layer: Affine, Z0: torch.Tensor, D: Witness, P, out_shape) -> torch.Tensor:
    """``Z = (W + D) P~ (+ b) = Z0 + D P~``, shaped like the layer's output."""
    return layer.uncolumns(Z0 + D.change(P), out_shape)


def _flips(network, index, Z0, D: Witness, P, y, out_shape, values) -> torch.Tensor:
    """Forward pass with the perturbed weights ``W + D``: did the class change?"""
    Z = _perturbed(network.layer(index), Z0, D, P, out_shape)
    logits = network.run(index, Z, values)
    # Another class must win by more than rounding: a tie decided by the last bit is no
    # witness (certify check accepts it only beyond the same relative gap).
    gap = logits.scatter(-1, y[:, None], -math.inf).amax(-1) - logits.gather(-1, y[:, None])[:, 0]
    return gap > WITNESS_GAP * logits.abs().amax(-1)


def _start(W, P, norm, start) -> Witness:
    if start is not None:
        return start
    if P.shape[-1] > 1:
        return Witness(full=W.new_zeros(P.shape[0], *W.shape))
    h = P[..., 0]
    right = h if norm == "fro" else torch.sign(h)
    return Witness(left=W.new_zeros(P.shape[0], W.shape[0]), right=right)


def _dense_step(g: torch.Tensor, m: torch.Tensor, h: torch.Tensor, norm: str) -> torch.Tensor:
    """Left factor of the section-3 step for ``G = g h^T`` (the right factor is fixed)."""
    if norm == "fro":
        scale = (g**2).sum(-1) * (h**2).sum(-1)
        return -m[:, None] * g / scale[:, None]
    scale = g.abs().sum(-1) * h.abs().sum(-1)
    return -m[:, None] * torch.sign(g) / scale[:, None]


def witness(network, index, P, y, norm, bias, out_shape, start: Witness | None = None,
            iterations: int = 50, overshoot: float = 1.02,
            values=()) -> tuple[torch.Tensor, Witness]:
    """A verified ``D`` that changes the class, per input; ``(upper, D)``.

    Weight-space DeepFool from ``start`` (zero by default): step to the minimal-norm ``D``
    that zeroes the linearised smallest margin (section 3), overshot by ``overshoot`` and
    by ``2 WITNESS_GAP max|o|`` (so that a step from a near-tie still passes it), re-linearise,
    repeat until a forward pass with ``W + D`` changes the class by more than rounding
    (``_flips``); then shrink ``t D`` by bisection while it
    still does. ``upper`` is ``inf`` where no witness was found. ``values``: every node's
    unperturbed value (``network.values(x)``).
    """
    layer = network.layer(index)
    W = _weight(layer, bias)
    B = P.shape[0]
    D = _start(W, P, norm, start)
    Z0 = _unperturbed(layer, W, P, bias)  # computed once: every step only adds D P~
    rows = torch.arange(B, device=P.device)
    push = 2 * WITNESS_GAP * values[-1].abs().amax(-1)
    for _ in range(iterations):
        done = _flips(network, index, Z0, D, P, y, out_shape, values)
        if done.all():
            break
        Z = _perturbed(layer, Z0, D, P, out_shape)
        _, g, m, ratio = first_order(network, index, P, Z, y, norm, values)
        j = ratio.argmin(dim=-1)
        # No first-order direction (every margin gradient is zero, e.g. dead ReLUs): stuck.
        stuck = ~torch.isfinite(ratio[rows, j])
        keep = (done | stuck)
        if D.full is not None:
            step = _step(_gradient(g[rows, j], P), m[rows, j] * overshoot + push, norm)
            D = Witness(full=torch.where(keep[:, None, None], D.full, D.full + step))
        else:
            step = _dense_step(g[rows, j][..., 0], m[rows, j] * overshoot + push, P[..., 0],
                               norm)
            D = Witness(left=torch.where(keep[:, None], D.left, D.left + step), right=D.right)
        if keep.all():
            break
    found = _flips(network, index, Z0, D, P, y, out_shape, values)
    lo, hi = W.new_zeros(B), W.new_ones(B)
    for _ in range(30):
        mid = (lo + hi) / 2
        flip = _flips(network, index, Z0, D.scaled(mid), P, y, out_shape, values)
        hi = torch.where(flip & found, mid, hi)
        lo = torch.where(flip & found, lo, mid)
    D = D.scaled(hi)
    upper = torch.where(found, D.norm(norm), torch.full_like(hi, math.inf))
    return upper, D


def layer_radii(network: Graph, x: torch.Tensor, index: int, norm: str,
                bias: bool = False, refine: bool | str = "auto",
                clock=lambda phase: nullcontext()) -> LayerRadii:
    """All three radii of affine step ``index`` for every input in ``x`` (one norm).

    ``x``: a batch of finite floating-point inputs (any precision, computed in float64);
    ``index``: the node index of an affine layer (``network.affine_indices``).
    ``refine``: backward-pass intermediate bounds in the local bound (tighter, costlier);
    ``"auto"`` uses them when ``linear_bounds.refine_work`` is at most ``REFINE_WORK``.
    ``clock(phase)`` is entered around each phase (for timing breakdowns).

    Raises ``certify.inputs.InputTypeError`` (a ``TypeError``) for inputs that are not floats,
    a non-integer index or a non-``Graph``, and ``certify.inputs.InputError`` (a
    ``ValueError``) for NaN/Inf inputs or weights, an empty batch, a shape the network cannot
    take, an index that is not an affine layer, or an unknown ``norm`` or ``refine``.
    """
    if norm not in NORMS:
        raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
    if refine not in (True, False, "auto"):
        raise InputError(f"refine must be True, False or 'auto', got {refine!r}")
    x = inputs_for(network, x)
    index = affine_index(network, index)
    layer = network.layer(index)
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
                               values=values)
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
            if refine == "auto":
                refine = refine_work(network, index) <= REFINE_WORK
            # The search needs a finite upper end; without a witness, beyond the estimate,
            # else far beyond the global bound, else ten times the weight itself.
            fallback = torch.where(torch.isfinite(estimate), 2 * estimate, 1e3 * lower_global)
            fallback = torch.where(fallback > 0, fallback, 10 * float(_norm(
                layer.matrix[None], norm)[0]))
            cap = torch.where(torch.isfinite(upper), upper, fallback + lower_global)
            # Without a global bound (through attention) the radius may lie orders of
            # magnitude below the witness: the search falls faster until it certifies; where
            # the global bound lies orders of magnitude below the witness (LayerNorm's
            # 1/sqrt(eps)), it is the search's lower end and the search geometric.
            shrink = torch.where(lower_global > 0, 2.0, 16.0).to(cap.dtype)
            wide = torch.where(cap > WIDE * lower_global, lower_global, 0.0)
            # Through attention (products of computed tensors) the global constant is
            # infinite and the section-5 bound does not exist: the linear bounds alone
            # certify, with more evaluations.
            exists = global_exists(network, index, norm, constants)
            local = local_lower(network, index, values, y, norm, scale, cap, constants,
                                refine=refine, shrink=shrink, floor=wide,
                                evaluations=8 if exists else 12) * (1 - SAFETY)
            lower_local = torch.maximum(lower_global, local)
        lower = lower_local
        method = ("lipschitz+crown" if exists else "crown") + ("(refined)" if refine else "")
    if (lower > upper).any():
        bad = torch.nonzero(lower > upper)[:5, 0].tolist()
        raise AssertionError(f"soundness violated at inputs {bad}: lower > verified upper")
    return LayerRadii(network.nodes[index].name, tuple(layer.weight.shape), norm, lower, upper,
                      estimate,
                      lower_global, lower_local, method, D)
