"""CROWN-style linear bounds on the network downstream of a layer (THEORY.md section 4).

Section 4 reduces a layer's weight robustness to the input robustness of the downstream
network at the layer's output ``z``: the weight ball of radius ``rho`` becomes the region
``z + rho U`` with ``U`` the l2 ball of radius ``sigma_max(P~)`` (Frobenius) or the box
``|dz| <= ||P~_:j||_1`` (entrywise max). This module bounds every margin
``m_j = (e_y - e_j)^T o`` from below over that region.

Both passes walk linear functions ``A x + d`` backwards through the steps, replacing each
step by linear functions that bound it on known intervals of its input:

* affine steps, flattening and average pooling are substituted exactly;
* ReLU / LeakyReLU with input interval ``[l, u]`` are relaxed. For intermediate bounds one
  line serves both directions: ``phi(x) = lam x + mu +- nu`` with ``lam`` the chord slope
  and ``mu +- nu`` the range of ``phi(x) - lam x`` on ``[l, u]`` (its extremes lie at ``l``,
  ``0`` and ``u``, so the range is exact for the rounded ``lam``). For the margins, CROWN's
  adaptive lines: below ``s x`` (``s`` = 1 or the negative slope), above the chord (for a
  negative slope outside ``[0, 1]`` the function is not convex: the symmetric relaxation);
* any other step (tanh, sigmoid, GELU, max pooling) ends the walk: its output interval
  enters as a constant;
* residual blocks (``Save``, ``Swap``, ``Add``; ``certify.network``): the rows carry a stack
  like the values. Backwards, ``Add`` pushes a copy of the rows for its popped operand,
  ``Swap`` exchanges the rows with the top of that stack and ``Save`` adds the popped rows
  to them. Rows left on the stack at ``z`` belong to values saved before the layer (``z``
  inside a branch): constants, ``Region.stack``, that enter ``d``. Interval propagation
  carries a stack of intervals (the saved constants are points) and the l2 reach a stack
  of reaches (``Add`` sums them).

Intermediate bounds. The input of every activation is bounded by interval propagation,
then, for the entries whose interval contains 0 (or every entry of a smooth activation), by
a backward pass to ``z`` concretised over the region: ``A z + d +- (e + rho ||A||_U*)`` with
``||A||_U* = sigma ||A||_2`` (ball) or ``|A| . box`` (box). The two intervals are intersected.

Margins. The final pass gives ``m_j >= A_j z + d_j - rho' ||A_j||_U*`` for every
``rho' <= rho`` (the relaxations, made on the larger region, stay valid on a smaller one):
one pass yields the whole line, and the radius where it reaches zero.

Floating point: every interval and bound is widened by ``ROUND`` times the magnitudes that
entered it, far above float64 rounding of these sums (relative 1e-16 per operation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.lipschitz import step_lipschitz
from certify.network import (GELU_DERIVATIVE, STACK_STEPS, Activation, Affine, Flatten,
                             Network, Pool)

ROUND = 1e-10


@dataclass(frozen=True)
class Region:
    """``z + rho U`` in a layer's output space, per input.

    ``norm == "fro"``: ``U`` is the l2 ball of radius ``unit`` ``(B,)``;
    ``norm == "max"``: ``U`` is the box ``|dz| <= unit`` (``unit`` shaped like ``z``).
    ``stack``: the values on the stack at ``z`` (inside a residual block), which the
    perturbation does not move.
    """

    z: torch.Tensor
    norm: str
    unit: torch.Tensor
    stack: tuple = ()

    def box(self, rho: torch.Tensor) -> torch.Tensor:
        """Per-entry radius of the smallest box around ``rho U`` (shaped like ``z``)."""
        if self.norm == "fro":
            return (rho * self.unit).reshape(-1, *[1] * (self.z.ndim - 1)).expand_as(self.z)
        return rho.reshape(-1, *[1] * (self.z.ndim - 1)) * self.unit

    def dual(self, A: torch.Tensor) -> torch.Tensor:
        """``sup_{u in U} A u`` for rows ``A`` ``(B, R, *z)``: ``(B, R)``."""
        flat = A.reshape(*A.shape[:2], -1)
        if self.norm == "fro":
            return torch.linalg.vector_norm(flat, dim=-1) * self.unit[:, None]
        return torch.einsum("brn,bn->br", flat.abs(), self.unit.reshape(len(flat), -1))

    def value(self, A: torch.Tensor) -> torch.Tensor:
        """``A z`` and ``|A| |z|`` (the magnitude for rounding), ``(B, R)`` each."""
        flat, z = A.reshape(*A.shape[:2], -1), self.z.reshape(len(A), -1)
        return torch.einsum("brn,bn->br", flat, z), torch.einsum("brn,bn->br", flat.abs(), z.abs())


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape[:2], -1).sum(-1)


def _adjoint(linear, A: torch.Tensor, in_shape) -> torch.Tensor:
    """``A L`` for a linear map ``L``, with ``A`` of shape ``(B, R, *out)``."""
    B, R = A.shape[:2]
    x = torch.zeros(B * R, *in_shape, dtype=A.dtype, requires_grad=True)
    out = linear(x)
    (grad,) = torch.autograd.grad(out, x, grad_outputs=A.reshape(B * R, *out.shape[1:]))
    return grad.reshape(B, R, *in_shape)


def _piecewise_linear(step: Activation) -> bool:
    return step.kind in ("relu", "leaky_relu")


def symmetric_relaxation(step: Activation, lo: torch.Tensor, hi: torch.Tensor):
    """``phi(x) in lam x + mu +- nu`` on ``[lo, hi]`` for a ReLU or LeakyReLU.

    ``lam`` is the chord slope (exact slope where the interval is one-sided). For any
    float ``lam``, ``g(x) = phi(x) - lam x`` is piecewise linear with its kink at 0, so its
    range on ``[lo, hi]`` is spanned by ``g(lo)``, ``g(hi)`` and ``g(0) = 0`` (when inside).
    """
    f_lo, f_hi = step(lo), step(hi)
    width = hi - lo
    unstable = (lo < 0) & (hi > 0)
    stable = torch.where(lo >= 0, torch.ones_like(lo), torch.full_like(lo, step.slope))
    lam = torch.where(unstable, (f_hi - f_lo) / torch.where(unstable, width, 1.0), stable)
    g_lo, g_hi = f_lo - lam * lo, f_hi - lam * hi
    zero = torch.where(unstable, 0.0, g_lo)
    low = torch.minimum(torch.minimum(g_lo, g_hi), zero)
    high = torch.maximum(torch.maximum(g_lo, g_hi), zero)
    slack = ROUND * (lo.abs() + hi.abs())
    return lam, (high + low) / 2, (high - low) / 2 + slack


def adaptive_relaxation(step: Activation, lo: torch.Tensor, hi: torch.Tensor):
    """CROWN's lines: ``phi(x) >= s_l x`` and ``phi(x) <= s_u x + b_u`` on ``[lo, hi]``."""
    negative = step.slope
    unstable = (lo < 0) & (hi > 0)
    f_lo, f_hi = step(lo), step(hi)
    chord = torch.where(unstable, (f_hi - f_lo) / torch.where(unstable, hi - lo, 1.0), 0.0)
    stable = torch.where(lo >= 0, torch.ones_like(lo), torch.full_like(lo, negative))
    s_upper = torch.where(unstable, chord, stable)
    # The chord through (lo, f_lo) with the rounded slope: check both ends and lift by the
    # larger miss, so that the line is above phi on the whole interval.
    b_upper = f_lo - s_upper * lo
    miss = torch.clamp(f_hi - (s_upper * hi + b_upper), min=0)
    b_upper = torch.where(unstable, b_upper + miss + ROUND * (f_lo.abs() + f_hi.abs()), 0.0)
    s_lower = torch.where(unstable, torch.where(hi >= -lo, 1.0, negative), stable)
    return s_lower, s_upper, b_upper


@dataclass
class _Linear:
    """Rows ``A x + d +- e`` (``A``: ``(B, R, *x)``; ``d``, ``e``: ``(B, R)``); ``A`` is
    ``None`` once the function no longer depends on ``x``. ``size`` accumulates
    ``|A| |x| + |d|`` along the way, the magnitude that rounding is measured against."""

    A: torch.Tensor | None
    d: torch.Tensor
    e: torch.Tensor
    size: torch.Tensor


def _times_weight(A: torch.Tensor, step: Affine, weight: torch.Tensor, in_shape) -> torch.Tensor:
    """Rows ``A`` composed with the linear part of an affine step whose weight is ``weight``."""
    if not step.is_conv:
        return A @ weight
    conv = Affine(step.name, weight, torch.zeros_like(step.bias), step.stride, step.padding,
                  step.dilation)
    return _adjoint(conv, A, in_shape)


def _through_affine(f: _Linear, step: Affine, in_shape) -> _Linear:
    bias = step.bias.reshape(-1, 1, 1) if step.is_conv else step.bias
    d_add = _sum(f.A * bias)
    return _Linear(_times_weight(f.A, step, step.weight, in_shape), f.d + d_add, f.e,
                   f.size + d_add.abs())


def _constant(f: _Linear, step, lo, hi) -> _Linear:
    """End the walk: the step's output interval enters as a constant."""
    low, high = step.interval(lo, hi)
    center, radius = (high + low) / 2, (high - low) / 2
    d_add = _sum(f.A * center[:, None])
    e_add = _sum(f.A.abs() * radius[:, None])
    return _Linear(None, f.d + d_add, f.e + e_add, f.size + d_add.abs() + e_add)


def _backward(f: _Linear, steps, intervals, lower_only: bool, stack: tuple = ()) -> _Linear:
    """Walk ``f`` back through ``steps``; ``intervals[i]`` bounds the input of ``steps[i]``
    and ``stack`` holds the constant values on the stack before ``steps[0]``.

    ``lower_only``: CROWN's adaptive lines (a lower bound of ``A x + d``; ``e`` stays 0);
    otherwise the symmetric relaxation (``A x + d +- e`` bounds both ways).
    """
    saved = ()  # rows on the topmost stack values (top last); None: rows of zeros
    for step, (lo, hi) in zip(reversed(steps), reversed(intervals)):
        if isinstance(step, STACK_STEPS):
            A, saved = step.move_back(f.A, saved)
            f = _Linear(A, f.d, f.e, f.size)
            continue
        if f.A is None:
            if all(rows is None for rows in saved):
                break
            continue
        if isinstance(step, Affine):
            f = _through_affine(f, step, lo.shape[1:])
        elif isinstance(step, Activation) and _piecewise_linear(step):
            if lower_only and 0 <= step.slope <= 1:  # convex: the chord lies above
                s_lower, s_upper, b_upper = adaptive_relaxation(step, lo, hi)
                positive, negative = f.A.clamp(min=0), f.A.clamp(max=0)
                d_add = _sum(negative * b_upper[:, None])
                f = _Linear(positive * s_lower[:, None] + negative * s_upper[:, None],
                            f.d + d_add, f.e, f.size + d_add.abs())
            else:
                lam, mu, nu = symmetric_relaxation(step, lo, hi)
                d_add, e_add = _sum(f.A * mu[:, None]), _sum(f.A.abs() * nu[:, None])
                f = _Linear(f.A * lam[:, None], f.d + d_add, f.e + e_add,
                            f.size + d_add.abs() + e_add)
        elif isinstance(step, Flatten):
            f = _Linear(f.A.reshape(*f.A.shape[:2], *lo.shape[1:]), f.d, f.e, f.size)
        elif isinstance(step, Pool) and step.kind == "avg":
            f = _Linear(_adjoint(step, f.A, lo.shape[1:]), f.d, f.e, f.size)
        else:
            f = _constant(f, step, lo, hi)
    # Rows left on the stack multiply the values saved before the walk's start: constants.
    if any(rows is not None for rows in saved[:max(len(saved) - len(stack), 0)]):
        raise ValueError("the bounds start inside a residual block: give the values saved on "
                         "the stack there (Region.stack)")
    for rows, value in zip(reversed(saved), reversed(stack)):
        if rows is not None:
            d_add = _sum(rows * value[:, None])
            f = _Linear(f.A, f.d + d_add, f.e, f.size + _sum(rows.abs() * value.abs()[:, None]))
    return f


def _needs_bounds(step) -> bool:
    return isinstance(step, Activation)


REFINE_WORK = 1e6  # per input: on the MNIST models refinement costs much and gains little


def refine_work(network: Network, start: int, shape, stack: tuple = ()) -> float:
    """Multiply-adds per input of the backward-pass refinement of the steps after ``start``
    (``shape``: one output of step ``start - 1``; ``stack``: the values saved on the stack
    there, for their shapes): for each activation, its input entries
    times the work of walking back (an affine step costs its multiply-adds; a dense one
    right before the activation costs nothing, its rows are taken as they are).
    ``refine="auto"`` refines when this is at most ``REFINE_WORK``."""
    work, walked, last = 0.0, 0.0, 0.0
    x = torch.zeros(1, *shape, dtype=torch.float64)
    stack = tuple(torch.zeros_like(value[:1]) for value in stack)
    for step in network.steps[start:-1]:
        if isinstance(step, STACK_STEPS):
            x, stack = step.move(x, stack)
            continue
        if _needs_bounds(step):
            work += x.numel() * (walked - last)
        out = step(x)
        last = out.numel() * step.matrix.shape[1] if isinstance(step, Affine) else 0.0
        if isinstance(step, Affine) and step.is_conv:
            last = 0.0  # the rows of a convolution are walked back as one-hot vectors
        walked += x.numel() + (out.numel() * step.matrix.shape[1] if isinstance(step, Affine)
                               else 0.0)
        x = out
    return work


def _refine(steps, intervals, i: int, region: Region, rho: torch.Tensor):
    """Backward-pass bounds on the input of ``steps[i]`` for the entries that need them."""
    lo, hi = intervals[i]
    B, shape = lo.shape[0], lo.shape[1:]
    flat_lo, flat_hi = lo.reshape(B, -1), hi.reshape(B, -1)
    if _piecewise_linear(steps[i]):
        wanted = (flat_lo < 0) & (flat_hi > 0)
    else:
        wanted = torch.ones_like(flat_lo, dtype=torch.bool)
    k = int(wanted.sum(-1).max())
    if k == 0:
        return lo, hi
    # The wanted entries of every input, padded with repeats of a wanted (or any) entry.
    order = torch.argsort(wanted.to(torch.int8), dim=-1, descending=True, stable=True)[:, :k]
    previous = steps[i - 1]
    if isinstance(previous, Affine) and not previous.is_conv:
        A, d = previous.weight[order], previous.bias[order]
        f = _Linear(A, d, torch.zeros_like(d), d.abs())
        f = _backward(f, steps[:i - 1], intervals[:i - 1], lower_only=False,
                      stack=region.stack)
    else:
        A = torch.zeros(B, k, math.prod(shape), dtype=lo.dtype)
        A.scatter_(-1, order[..., None], 1.0)
        d = torch.zeros(B, k, dtype=lo.dtype)
        f = _Linear(A.reshape(B, k, *shape), d, d, d)
        f = _backward(f, steps[:i], intervals[:i], lower_only=False, stack=region.stack)
    center, size, spread = f.d, f.size, f.e
    if f.A is not None:
        value, magnitude = region.value(f.A)
        center, size = center + value, size + magnitude
        spread = spread + rho[:, None] * region.dual(f.A)
    slack = ROUND * (size + spread)
    new_lo = torch.maximum(flat_lo.gather(-1, order), center - spread - slack)
    new_hi = torch.minimum(flat_hi.gather(-1, order), center + spread + slack)
    return (flat_lo.scatter(-1, order, new_lo).reshape(lo.shape),
            flat_hi.scatter(-1, order, new_hi).reshape(hi.shape))


def _derivative_range(step: Activation, lo: torch.Tensor, hi: torch.Tensor):
    """An interval containing every (generalised) derivative of ``phi`` on ``[lo, hi]``."""
    if _piecewise_linear(step):
        a, b = min(step.slope, 1.0), max(step.slope, 1.0)
        low = torch.where(hi < 0, step.slope, torch.where(lo > 0, 1.0, a))
        high = torch.where(hi < 0, step.slope, torch.where(lo > 0, 1.0, b))
        return low.to(lo.dtype), high.to(lo.dtype)
    if step.kind in ("tanh", "sigmoid"):  # phi' is even about 0 and falls with |x|
        d_lo, d_hi = step.derivative(lo), step.derivative(hi)
        inside = (lo <= 0) & (hi >= 0)
        top = torch.where(inside, step.derivative(torch.zeros_like(lo)),
                          torch.maximum(d_lo, d_hi))
        return torch.minimum(d_lo, d_hi) * (1 - ROUND), top * (1 + ROUND)
    return torch.full_like(lo, GELU_DERIVATIVE[0]), torch.full_like(lo, GELU_DERIVATIVE[1])


def _reach_rows(step: Affine, varies: torch.Tensor) -> torch.Tensor:
    """``||W_i restricted to the inputs that vary||_2`` per output entry (masked rows)."""
    square = Affine(step.name, step.weight**2, torch.zeros_like(step.bias), step.stride,
                    step.padding, step.dilation)
    return torch.sqrt(square(varies.to(step.weight.dtype))) * (1 + ROUND)


def _next_interval(step, interval, nominal, reach):
    """Interval propagation through one step; for an affine step and the l2 ball also
    ``nominal +- ||W_i restricted to the inputs that vary||_2 reach``, intersected."""
    lo, hi = step.interval(*interval)
    if reach is not None and isinstance(step, Affine):
        before_lo, before_hi = interval
        rows = _reach_rows(step, before_hi > before_lo)
        nominal_out = step(nominal)
        spread = rows * reach.reshape(-1, *[1] * (lo.ndim - 1))
        lo = torch.maximum(lo, nominal_out - spread * (1 + ROUND))
        hi = torch.minimum(hi, nominal_out + spread * (1 + ROUND))
    return lo, hi


def intermediate_bounds(network: Network, start: int, region: Region, rho: torch.Tensor,
                        operator_norms: list[float] | None = None, refine: bool = True):
    """Intervals containing the input of every step ``start, ..., L-1`` (the logits layer
    excluded) over ``z + rho U``.

    Interval propagation, intersected for the l2 ball with ``nominal +- ||W_i||_2 r``
    (``r`` bounds ``||x - nominal||_2``: a product of l2 Lipschitz constants, or the norm
    of the interval's farthest corner, whichever is smaller; ``W_i`` keeps only the inputs
    that can move, as a ReLU that is off on the whole region is constant), then refined by
    backward passes. ``operator_norms[i]`` is the l2 Lipschitz constant of step ``start+i``.
    Residual blocks: the intervals, nominal values and reaches before every step are the
    current ones; each has its stack (the region's saved values: points, reach 0), and
    ``Add`` adds intervals (widened for rounding) and reaches.
    """
    steps = network.steps[start:-1]
    box = region.box(rho)
    intervals = [(region.z - box, region.z + box)]
    nominal = region.z
    reach = rho * region.unit if region.norm == "fro" else None
    if reach is not None and operator_norms is None:
        operator_norms = [step_lipschitz(step, "fro") for step in steps]
    saved_intervals = tuple((value, value) for value in region.stack)
    saved_nominal = region.stack
    saved_reach = tuple(torch.zeros_like(reach) for _ in region.stack) if reach is not None \
        else ()
    for i in range(1, len(steps) + 1):
        step = steps[i - 1]
        if isinstance(step, STACK_STEPS):
            interval, saved_intervals = step.move(intervals[-1], saved_intervals, _interval_sum)
            intervals.append(interval)
            if reach is not None:
                nominal, saved_nominal = step.move(nominal, saved_nominal)
                reach, saved_reach = step.move(reach, saved_reach,
                                               lambda a, b: (a + b) * (1 + ROUND))
        else:
            intervals.append(_next_interval(step, intervals[-1], nominal, reach))
            if reach is not None:
                lo, hi = intervals[-1]
                nominal_out = step(nominal)
                corner = torch.maximum(hi - nominal_out, nominal_out - lo).flatten(1)
                reach = torch.minimum(reach * operator_norms[i - 1],
                                      torch.linalg.vector_norm(corner, dim=-1) * (1 + ROUND))
                nominal = nominal_out
        if refine and i < len(steps) and _needs_bounds(steps[i]):
            intervals[i] = _refine(steps, intervals, i, region, rho)
    return intervals


def _interval_sum(a, b):
    """``[a_lo + b_lo, a_hi + b_hi]``, widened for the rounding of the two sums."""
    (a_lo, a_hi), (b_lo, b_hi) = a, b
    lo, hi = a_lo + b_lo, a_hi + b_hi
    return (lo - ROUND * (a_lo.abs() + b_lo.abs()), hi + ROUND * (a_hi.abs() + b_hi.abs()))


def jacobian_line(network: Network, start: int, region: Region, intervals, y: torch.Tensor):
    """Slope of ``|m_j(z + dz) - m_j(z)| <= rho' slope_j`` on the region (mean value theorem).

    Every Jacobian of the margins along a segment in the region lies in the interval
    Jacobian, computed backwards: ``c_j^T W_L``, then each activation multiplies by its
    derivative range on the step's input interval, each linear step by its matrix (in
    interval arithmetic); residual blocks as in ``_backward``, with interval rows (``Save``
    adds them). The bound is the region's dual norm of the entrywise largest magnitude.
    ``None`` where a step (max pooling) has no interval derivative here.
    """
    last = network.steps[-1]
    C = last.weight[y][:, None, :] - last.weight[None, :, :]
    rows, saved = (C, C), ()  # interval rows (lo, hi); None: zero rows (constants)
    for step, (x_lo, x_hi) in zip(reversed(network.steps[start:-1]), reversed(intervals)):
        if isinstance(step, STACK_STEPS):
            rows, saved = step.move_back(rows, saved, _interval_sum)
            continue
        if rows is None:
            continue
        lo, hi = rows
        if isinstance(step, Activation):
            d_lo, d_hi = (t[:, None] for t in _derivative_range(step, x_lo, x_hi))
            products = (lo * d_lo, lo * d_hi, hi * d_lo, hi * d_hi)
            lo = torch.minimum(torch.minimum(products[0], products[1]),
                               torch.minimum(products[2], products[3]))
            hi = torch.maximum(torch.maximum(products[0], products[1]),
                               torch.maximum(products[2], products[3]))
            rows = lo, hi
            continue
        if isinstance(step, Pool) and step.kind == "max":
            return None
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        if isinstance(step, Affine):
            center = _times_weight(center, step, step.weight, x_lo.shape[1:])
            radius = _times_weight(radius, step, step.weight.abs(), x_lo.shape[1:])
        elif isinstance(step, Flatten):
            center = center.reshape(*center.shape[:2], *x_lo.shape[1:])
            radius = radius.reshape(*radius.shape[:2], *x_lo.shape[1:])
        else:  # average pooling: a nonnegative linear map
            center = _adjoint(step, center, x_lo.shape[1:])
            radius = _adjoint(step, radius, x_lo.shape[1:])
        radius = radius * (1 + ROUND) + ROUND * center.abs()
        rows = center - radius, center + radius
    # Rows left on the stack belong to values saved before z: constants, no slope.
    if rows is None:
        return torch.zeros(C.shape[:2], dtype=C.dtype)
    lo, hi = rows
    return region.dual(torch.maximum(lo.abs(), hi.abs())) * (1 + ROUND)


@dataclass(frozen=True)
class MarginLines:
    """``m_j >= value_j - rho' slope_j`` for every ``rho' <= rho``, one line per method
    (stacked on the first axis, ``(K, B, C)``), and the interval-arithmetic lower bound
    at ``rho`` itself (``(B, C)``)."""

    value: torch.Tensor
    slope: torch.Tensor
    interval: torch.Tensor

    def lower(self, rho: torch.Tensor) -> torch.Tensor:
        """The best lower bound of every margin at ``rho`` (``(B, C)``)."""
        lines = (self.value - rho[:, None] * self.slope).amax(0)
        return torch.maximum(lines, self.interval)

    def certified(self, rho: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Every margin positive at ``rho``? ``(B,)``"""
        return (self.lower(rho) > 0).scatter(-1, y[:, None], True).all(-1)

    def root(self, y: torch.Tensor) -> torch.Tensor:
        """The largest ``rho'`` where, for every class, some line is still positive."""
        root = torch.where(self.value > 0, self.value / self.slope, torch.zeros_like(self.value))
        return root.amax(0).scatter(-1, y[:, None], math.inf).amin(-1)


def margin_lines(network: Network, start: int, region: Region, rho: torch.Tensor,
                 y: torch.Tensor, operator_norms: list[float] | None = None,
                 refine: bool = True) -> MarginLines:
    """Lower bounds of every margin over ``z + rho' U``, ``rho' <= rho`` (section 4): the
    CROWN line and the interval-Jacobian line (``jacobian_line``)."""
    intervals = intermediate_bounds(network, start, region, rho, operator_norms, refine)
    last = network.steps[-1]
    C = last.weight[y][:, None, :] - last.weight[None, :, :]  # c_j^T W_L, (B, C, n)
    c = last.bias[y][:, None] - last.bias[None, :]
    lo, hi = intervals[-1]
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    ibp_value = torch.einsum("bcn,bn->bc", C, center)
    ibp_size = torch.einsum("bcn,bn->bc", C.abs(), center.abs() + radius) + c.abs()
    ibp = ibp_value + c - torch.einsum("bcn,bn->bc", C.abs(), radius) - ROUND * ibp_size
    f = _backward(_Linear(C, c, torch.zeros_like(c), c.abs()), network.steps[start:-1],
                  intervals[:-1], lower_only=True, stack=region.stack)
    value, size = f.d - f.e, f.size + f.e
    if f.A is None:
        slope = torch.zeros_like(value)
    else:
        at_z, magnitude = region.value(f.A)
        value, size = value + at_z, size + magnitude
        slope = region.dual(f.A) * (1 + ROUND)
    values, slopes = [value - ROUND * size], [slope]
    jacobian = jacobian_line(network, start, region, intervals[:-1], y)
    if jacobian is not None:  # anchored at the unperturbed margins
        margins = network.run(region.z, start, region.stack)
        m = margins.gather(-1, y[:, None]) - margins
        values.append(m - ROUND * (margins.abs().amax(-1, keepdim=True) + m.abs()))
        slopes.append(jacobian)
    return MarginLines(torch.stack(values), torch.stack(slopes), ibp)
