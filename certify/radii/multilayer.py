"""All affine layers perturbed at once: THEORY.md section 5, "All layers at once".

Every affine layer ``k`` (in ``graph.affine_indices`` order) gets its own weight change
``D_k`` with ``||D_k|| <= e_k``. With ``h_k`` the unperturbed input of a step and ``dh_k``
its change (``dh = 0`` at the network input), ``v = h + dh``, and ``~`` appending the bias
(``W~ = [W, b]``, ``h~ = [h; 1]``, only with ``bias=True``), an affine step changes its output
by ``W dh + D v~``, so

    ||dz|| <= ||W||_op ||dh|| + e ||v~||,   ||v~|| <= ||h~|| + growth ||dh||,

every other operator bounds its output's change by its Lipschitz constants and its inputs'
(``Operator.combine``: a sum's bound is the sum of its operands', a concatenation's the l2
sum or the max of its parts'), and the margin ``m_j = c_j^T o`` (``c_j = e_y - e_j``) of a
dense logits layer ``L`` moves by at most

    |Delta m_j| <= ||W_L^T c_j||_dual ||dh_{L-1}|| + ||c_j||_dual e_L ||v~_{L-1}||.

The geometry follows the norm of ``D``:

* ``"fro"`` (Frobenius budgets, which also bound the spectral norm): ``dh`` in l2.
  ``||W||_op`` is the rigorous l2 operator norm (a convolution's includes the patch overlap);
  ``||D v~||_2 <= ||D||_F ||v~||_2`` for a dense layer, and ``||D P~(v)||_F <= ||D||_F
  sigma_max(P~(v))`` for a convolution with ``sigma_max(P~(h + dh)) <= sigma_max(P~(h)) +
  ||P(dh)||_F <= sigma_max(P~(h)) + sqrt(overlap) ||dh||_2``, so growth is ``sqrt(overlap)``
  (1 when dense). Last layer: ``||c_j||_2 = sqrt(2)``, ``||W_L^T c_j||_2``.
* ``"max"`` (entrywise-max budgets): ``dh`` in l_inf. ``||W||_op`` is the largest row l1
  norm; ``||D v||_inf <= ||D||_max ||v||_1`` column by column of ``P~`` with
  ``||p_j(h + dh)||_1 <= ||p_j(h)||_1 + n ||dh||_inf``, ``n`` the patch length (the input
  length when dense), so ``||v~||`` is ``max_j ||P~(h)_:j||_1`` and growth ``n``.
  Last layer: ``||c_j||_1 = 2``, ``||W_L^T c_j||_1``.

When the output is not a dense layer (an operator after the logits), ``|Delta m_j| <=
||c_j||_dual ||Delta o||`` with ``||c_j||_dual`` ``sqrt 2`` or 2.

The class is certified when ``(1 + SAFETY) |Delta m_j|``-bound ``< m_j`` for every
``j != y``: operator norms, ``sigma_max`` and row norms are rigorous float64 upper bounds
(``certify.bounds.lipschitz``, ``certify.radii.local_search.region_scale``) and ``SAFETY`` (relative 1e-9)
absorbs the rounding of this short recursion. With one nonzero budget the recursion is the
single-layer global Lipschitz bound of ``certify.radii.radius``; every term is attained by
width-one chains, so it cannot be tightened without looking inside the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.bounds import lipschitz
from certify.graph.graph import Graph
from certify.graph.inputs import InputError, check_network, inputs_for
from certify.graph.operators import Affine
from certify.radii.radius import NORMS, SAFETY, _columns, class_margins, region_scale
from certify.radii.witness import augmented_weight

# Bracket search for the uniform budget: octaves of t = 2^k tried around t = 1 (a change as
# large as the weights), then bisection to this relative width.
OCTAVES = 200
PRECISION = 1e-6


@dataclass(frozen=True)
class MultilayerBound:
    """Margin bounds under simultaneous budgets; tensors have one row per input.

    ``bound[b, j]`` bounds ``|Delta m_j|`` (safety included, 0 at ``j = y``) over every
    perturbation with ``||D_k|| <= budgets[k]`` for all affine layers ``k`` at once;
    ``certified[b]``: ``bound < m_j`` for every ``j != y``, the class cannot change.
    """

    norm: str
    budgets: tuple[float, ...]
    predictions: torch.Tensor  # (B,)
    margins: torch.Tensor  # (B, C), m_j = o_y - o_j, inf at j = y
    bound: torch.Tensor  # (B, C)
    certified: torch.Tensor  # (B,) bool


@dataclass(frozen=True)
class _Layer:
    """One affine layer's constants in the recursion (the norm's geometry)."""

    operator: float  # ||W||_op: how far dh moves the output
    scale: torch.Tensor  # (B,) ||h~||: sigma_max(P~) or max_j ||P~_:j||_1
    growth: float  # how much ||v~|| grows per unit ||dh||
    size: float  # ||W~|| in the budget's own norm (Frobenius or entrywise max)


@dataclass(frozen=True)
class _Chain:
    """The graph reduced to the recursion's constants for a batch of inputs."""

    graph: Graph
    norm: str
    layers: dict  # node -> _Layer, every affine layer
    constants: dict  # node -> the operator's own Lipschitz constants (other nodes)
    last: _Layer | None  # the dense logits layer, or None (then ||c_j|| ||Delta o||)
    rows: torch.Tensor  # (B, C) ||W_L^T c_j||_dual (||c_j||_dual without a dense logits
    # layer), 0 at j = y
    dual: float  # ||c_j||_dual: sqrt(2) or 2
    predictions: torch.Tensor
    margins: torch.Tensor

    @property
    def sizes(self) -> torch.Tensor:
        """``||W~_k||`` of every affine layer, in order, ``(K,)``."""
        return torch.tensor([self.layers[i].size for i in self.graph.affine_indices],
                            dtype=torch.float64, device=self.margins.device)


def _layer(step: Affine, h: torch.Tensor, norm: str, bias: bool) -> _Layer:
    P = _columns(step, h, bias)
    W = augmented_weight(step, bias)
    if norm == "fro":
        return _Layer(step.operator_norm(norm), region_scale(P, norm),
                      math.sqrt(step.overlap), float(torch.linalg.matrix_norm(W)))
    return _Layer(step.operator_norm(norm), region_scale(P, norm).amax(dim=-1),
                  float(P.shape[1] - bias), float(W.abs().max()))


def _chain(network: Graph, x: torch.Tensor, norm: str, bias: bool) -> _Chain:
    if norm not in NORMS:
        raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
    x = inputs_for(network, x)
    values = network.values(x)
    y, margins = class_margins(values[-1])
    shapes = [node.shape for node in network.nodes]
    layers, constants = {}, {}
    for i, node in enumerate(network.nodes[1:], start=1):
        if isinstance(node.op, Affine):
            layers[i] = _layer(node.op, values[node.inputs[0]], norm, bias)
        else:
            constants[i] = node.op.lipschitz(norm, [shapes[j] for j in node.inputs])
    rows, through = lipschitz.class_rows(network, y, norm)
    last = layers[network.output] if through != network.output else None
    dual = math.sqrt(2) if norm == "fro" else 2.0
    return _Chain(network, norm, layers, constants, last, rows.scatter(-1, y[:, None], 0.0),
                  dual, y, margins)


def _margin_bound(chain: _Chain, budgets: torch.Tensor) -> torch.Tensor:
    """The section-5 recursion, ``(B, C)``; ``budgets`` is ``(K, B)`` (one row per layer).

    ``||dz|| <= (||W||_op + e growth) ||dh|| + e ||h~||``, other operators combine their
    inputs' bounds (``Operator.combine``); at a dense logits layer
    ``||W_L^T c_j|| ||dh|| + ||c_j|| e_L (||h~|| + growth ||dh||)``, else
    ``||c_j|| ||Delta o||``; times ``1 + SAFETY``.
    """
    graph = chain.graph
    budget = dict(zip(graph.affine_indices, budgets))
    delta = [torch.zeros_like(chain.margins[:, 0])]
    for i, node in enumerate(graph.nodes[1:], start=1):
        if i == graph.output and chain.last is not None:
            break
        if i in chain.layers:
            layer, e = chain.layers[i], budget[i]
            delta.append((layer.operator + e * layer.growth) * delta[node.inputs[0]] +
                         e * layer.scale)
        else:
            delta.append(node.op.combine(chain.norm, chain.constants[i],
                                         [delta[j] for j in node.inputs]))
    if chain.last is None:
        bound = chain.rows * delta[graph.output][:, None]
    else:
        last, h = chain.last, delta[graph.input_of(graph.output)]
        reach = chain.dual * budget[graph.output] * (last.scale + last.growth * h)
        bound = chain.rows * h[:, None] + reach[:, None]
    return (bound * (1 + SAFETY)).scatter(-1, chain.predictions[:, None], 0.0)


def _certified(chain: _Chain, budgets: torch.Tensor) -> torch.Tensor:
    # NaN (inf * 0 at absurd budgets) compares False: not certified, the safe side.
    return (_margin_bound(chain, budgets) < chain.margins).all(dim=-1)


def _validated(network: Graph, budgets) -> torch.Tensor:
    check_network(network)
    layers = network.layer_names
    try:
        values = [float(b) for b in budgets]
    except (TypeError, ValueError):
        raise InputError(f"budgets must be a sequence of numbers, one per affine layer "
                         f"({', '.join(layers)}), got {budgets!r}") from None
    if len(values) != len(layers):
        raise InputError(f"got {len(values)} budgets but the network has {len(layers)} affine "
                         f"layers ({', '.join(layers)}): give one budget per layer, in this "
                         "order (0 for a layer that is not perturbed)")
    bad = [f"{name}={v}" for name, v in zip(layers, values) if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise InputError(f"budgets must be finite and >= 0; got {', '.join(bad)}")
    return torch.tensor(values, dtype=torch.float64, device=network.device)


def multilayer_bound(network: Graph, x: torch.Tensor, budgets, norm: str,
                     bias: bool = False) -> MultilayerBound:
    """Bounds on every margin change when all affine layers move at once (section 5).

    ``budgets``: one ``e_k >= 0`` per affine layer (``network.affine_indices`` order), a bound
    on ``||D_k||_F`` (``norm="fro"``) or ``||D_k||_max`` (``norm="max"``); with ``bias=True``
    ``D_k`` also perturbs the bias (``[W_k, b_k] + D_k``). The bound is the recursion
    ``||dh_k|| <= (||W_k||_op + e_k growth_k) ||dh_{k-1}|| + e_k ||h~_{k-1}||`` carried to
    ``|Delta m_j| <= ||W_L^T c_j|| ||dh_{L-1}|| + ||c_j|| e_L ||h~_{L-1} + dh_{L-1}||``
    (module docstring for each norm's constants).

    Raises ``certify.graph.inputs.InputTypeError`` (a ``TypeError``) for inputs that are not floats
    or a non-``Graph``, and ``certify.graph.inputs.InputError`` (a ``ValueError``) for NaN/Inf
    inputs or weights, an empty batch, a shape the network cannot take, budgets that are not
    one finite ``e_k >= 0`` per affine layer, or an unknown norm.
    """
    e = _validated(network, budgets)
    chain = _chain(network, x, norm, bias)
    bound = _margin_bound(chain, e[:, None].expand(-1, len(chain.predictions)))
    certified = (bound < chain.margins).all(dim=-1)
    return MultilayerBound(norm, tuple(e.tolist()), chain.predictions, chain.margins, bound,
                           certified)


def uniform_budget(network: Graph, x: torch.Tensor, norm: str,
                   bias: bool = False) -> torch.Tensor:
    """Per input, the largest ``t`` with budgets ``e_k = t ||W~_k||`` certified, ``(B,)``.

    ``||W~_k||`` is in the budget's own norm (Frobenius or entrywise max, the bias column
    included with ``bias=True``). The bound grows with every ``e_k``, so ``certified(t)`` is
    monotone: octaves ``2^k`` bracket ``t``, bisection narrows the bracket to relative width
    ``PRECISION``, and the certified end times ``1 - SAFETY`` is returned (the recursion has
    no constant term, so this leaves a relative slack of ``SAFETY`` in the margin bound for
    an independent recomputation, ``certify.check.claims``). 0 where no ``t >= 2^-OCTAVES`` is
    certified (for instance a tied, zero margin); ``2^OCTAVES`` is the largest value tried.

    Raises the exceptions of ``multilayer_bound`` (budgets aside).
    """
    chain = _chain(network, x, norm, bias)
    sizes = chain.sizes[:, None]

    def certified(t: torch.Tensor) -> torch.Tensor:
        return _certified(chain, sizes * t[None, :])

    lo = torch.zeros_like(chain.margins[:, 0])
    hi = torch.full_like(lo, math.inf)
    t = torch.ones_like(lo)
    for _ in range(OCTAVES):  # double above a certified t, halve below a failed one
        ok = certified(t)
        lo, hi = torch.where(ok, t, lo), torch.where(ok, hi, t)
        searching = (lo == 0) | torch.isinf(hi)
        if not searching.any():
            break
        t = torch.where(torch.isinf(hi), 2 * lo, hi / 2)
        t = torch.where(searching, t, lo)
    while True:
        open_ = (lo > 0) & torch.isfinite(hi) & (hi - lo > PRECISION * hi)
        if not open_.any():
            break
        mid = (lo + hi) / 2
        ok = certified(mid)
        lo = torch.where(open_ & ok, mid, lo)
        hi = torch.where(open_ & ~ok, mid, hi)
    return lo * (1 - SAFETY)
