"""All affine layers perturbed at once: THEORY.md section 5, "All layers at once".

Every affine layer ``k`` (in ``network.affine_indices`` order) gets its own weight change
``D_k`` with ``||D_k|| <= e_k``. With ``h_k`` the unperturbed input of a step and ``dh_k``
its change (``dh = 0`` at the network input), ``v = h + dh``, and ``~`` appending the bias
(``W~ = [W, b]``, ``h~ = [h; 1]``, only with ``bias=True``), an affine step changes its output
by ``W dh + D v~``, so

    ||dz|| <= ||W||_op ||dh|| + e ||v~||,   ||v~|| <= ||h~|| + growth ||dh||,

an activation or pooling step multiplies ``||dh||`` by its Lipschitz constant, and the
margin ``m_j = c_j^T o`` (``c_j = e_y - e_j``) of the logits layer ``L`` moves by at most

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

Residual blocks (``Save``/``Swap``/``Add`` steps, ``certify.network``): the change of
``f(h) + g(h)`` is at most the sum of the branches' changes, so the bounds on ``||dh||`` run
through the stack machine of the values (``Save`` pushes the bound, ``Swap`` exchanges it
with the top, ``Add`` adds the popped one).

The class is certified when ``(1 + SAFETY) |Delta m_j|``-bound ``< m_j`` for every
``j != y``: operator norms, ``sigma_max`` and row norms are rigorous float64 upper bounds
(``certify.lipschitz``, ``certify.radius.region_scale``) and ``SAFETY`` (relative 1e-9)
absorbs the rounding of this short recursion. With one nonzero budget the recursion is the
single-layer global Lipschitz bound of ``certify.radius``; every term is attained by
width-one chains, so it cannot be tightened without looking inside the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify import lipschitz
from certify.inputs import InputError, check_network, inputs_for
from certify.network import STACK_STEPS, Activation, Affine, Network
from certify.radius import NORMS, SAFETY, _class_rows, _columns, _weight, predictions, \
    region_scale

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
    """The network reduced to the recursion's constants for a batch of inputs."""

    steps: tuple  # every step before the logits layer: a _Layer, a Lipschitz constant or
    # a stack step (Save, Swap, Add)
    last: _Layer
    rows: torch.Tensor  # (B, C) ||W_L^T c_j||_dual, 0 at j = y
    dual: float  # ||c_j||_dual: sqrt(2) or 2
    predictions: torch.Tensor
    margins: torch.Tensor

    @property
    def sizes(self) -> torch.Tensor:
        """``||W~_k||`` of every affine layer, in order, ``(K,)``."""
        layers = [s for s in self.steps if isinstance(s, _Layer)] + [self.last]
        return torch.tensor([layer.size for layer in layers], dtype=torch.float64)


def _layer(step: Affine, h: torch.Tensor, norm: str, bias: bool) -> _Layer:
    P = _columns(step, h, bias)
    W = _weight(step, bias)
    if norm == "fro":
        return _Layer(lipschitz.operator_norm_l2(step), region_scale(P, norm),
                      math.sqrt(lipschitz.patch_overlap(step)), float(torch.linalg.matrix_norm(W)))
    return _Layer(lipschitz.operator_norm_linf(step), region_scale(P, norm).amax(dim=-1),
                  float(P.shape[1] - bias), float(W.abs().max()))


def _chain(network: Network, x: torch.Tensor, norm: str, bias: bool) -> _Chain:
    if norm not in NORMS:
        raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
    x = inputs_for(network, x)
    last = network.steps[-1]
    if not isinstance(last, Affine) or last.is_conv:
        raise InputError(f"the last step ({last.name}) must be a Linear layer producing the "
                         "logits: the margin bound needs the class rows of its weight")
    values = network.trace(x)
    y, margins = predictions(network, x)
    steps = []
    for step, h in zip(network.steps[:-1], values):
        if isinstance(step, Affine):
            steps.append(_layer(step, h, norm, bias))
        elif isinstance(step, STACK_STEPS):
            steps.append(step)
        elif isinstance(step, Activation):
            steps.append(step.lipschitz)
        else:  # Flatten, Pool
            steps.append(step.lipschitz_l2 if norm == "fro" else step.lipschitz_linf)
    rows = _class_rows(network, y, norm).scatter(-1, y[:, None], 0.0)
    dual = math.sqrt(2) if norm == "fro" else 2.0
    return _Chain(tuple(steps), _layer(last, values[-2], norm, bias), rows, dual, y, margins)


def _margin_bound(chain: _Chain, budgets: torch.Tensor) -> torch.Tensor:
    """The section-5 recursion, ``(B, C)``; ``budgets`` is ``(K, B)`` (one row per layer).

    ``||dz|| <= (||W||_op + e growth) ||dh|| + e ||h~||``, Lipschitz steps scale ``||dh||``,
    residual blocks add the bounds of their branches (stack steps move them like values);
    at the logits ``||W_L^T c_j|| ||dh|| + ||c_j|| e_L (||h~|| + growth ||dh||)``, times
    ``1 + SAFETY``.
    """
    delta = torch.zeros_like(chain.last.scale)
    saved = ()
    k = 0
    for step in chain.steps:
        if isinstance(step, STACK_STEPS):
            delta, saved = step.move(delta, saved)
        elif isinstance(step, _Layer):
            e = budgets[k]
            delta = (step.operator + e * step.growth) * delta + e * step.scale
            k += 1
        else:
            delta = step * delta
    last = chain.last
    reach = chain.dual * budgets[k] * (last.scale + last.growth * delta)
    bound = chain.rows * delta[:, None] + reach[:, None]
    return (bound * (1 + SAFETY)).scatter(-1, chain.predictions[:, None], 0.0)


def _certified(chain: _Chain, budgets: torch.Tensor) -> torch.Tensor:
    # NaN (inf * 0 at absurd budgets) compares False: not certified, the safe side.
    return (_margin_bound(chain, budgets) < chain.margins).all(dim=-1)


def _validated(network: Network, budgets) -> torch.Tensor:
    check_network(network)
    layers = [network.steps[i].name for i in network.affine_indices]
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
    return torch.tensor(values, dtype=torch.float64)


def multilayer_bound(network: Network, x: torch.Tensor, budgets, norm: str,
                     bias: bool = False) -> MultilayerBound:
    """Bounds on every margin change when all affine layers move at once (section 5).

    ``budgets``: one ``e_k >= 0`` per affine layer (``network.affine_indices`` order), a bound
    on ``||D_k||_F`` (``norm="fro"``) or ``||D_k||_max`` (``norm="max"``); with ``bias=True``
    ``D_k`` also perturbs the bias (``[W_k, b_k] + D_k``). The bound is the recursion
    ``||dh_k|| <= (||W_k||_op + e_k growth_k) ||dh_{k-1}|| + e_k ||h~_{k-1}||`` carried to
    ``|Delta m_j| <= ||W_L^T c_j|| ||dh_{L-1}|| + ||c_j|| e_L ||h~_{L-1} + dh_{L-1}||``
    (module docstring for each norm's constants).

    Raises ``certify.inputs.InputTypeError`` (a ``TypeError``) for inputs that are not floats
    or a non-``Network``, and ``certify.inputs.InputError`` (a ``ValueError``) for NaN/Inf
    inputs or weights, an empty batch, a shape the network cannot take, budgets that are not
    one finite ``e_k >= 0`` per affine layer, an unknown norm, or a network whose last step
    is not a Linear layer.
    """
    e = _validated(network, budgets)
    chain = _chain(network, x, norm, bias)
    bound = _margin_bound(chain, e[:, None].expand(-1, len(chain.predictions)))
    certified = (bound < chain.margins).all(dim=-1)
    return MultilayerBound(norm, tuple(e.tolist()), chain.predictions, chain.margins, bound,
                           certified)


def uniform_budget(network: Network, x: torch.Tensor, norm: str,
                   bias: bool = False) -> torch.Tensor:
    """Per input, the largest ``t`` with budgets ``e_k = t ||W~_k||`` certified, ``(B,)``.

    ``||W~_k||`` is in the budget's own norm (Frobenius or entrywise max, the bias column
    included with ``bias=True``). The bound grows with every ``e_k``, so ``certified(t)`` is
    monotone: octaves ``2^k`` bracket ``t``, bisection narrows the bracket to relative width
    ``PRECISION``, and the certified end times ``1 - SAFETY`` is returned (the recursion has
    no constant term, so this leaves a relative slack of ``SAFETY`` in the margin bound for
    an independent recomputation, ``certify.check``). 0 where no ``t >= 2^-OCTAVES`` is
    certified (for instance a tied, zero margin); ``2^OCTAVES`` is the largest value tried.

    Raises the exceptions of ``multilayer_bound`` (budgets aside).
    """
    chain = _chain(network, x, norm, bias)
    sizes = chain.sizes[:, None]

    def certified(t: torch.Tensor) -> torch.Tensor:
        return _certified(chain, sizes * t[None, :])

    lo = torch.zeros_like(chain.last.scale)
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
