"""Independent check of a certificate, in numpy float64 (not the torch path that made it).

Every claim is recomputed from the model's weights and the data:

* predictions: a numpy forward pass;
* ``upper``: the stored witness ``D`` is applied in a numpy forward pass with the weights
  ``W + D``; the class must change, and ``||D||`` must equal the claim;
* ``lower``, last dense layer: the exact class-pair formula (THEORY.md section 3);
* ``lower``, other layers: confirmed if the numpy global Lipschitz bound (section 5) reaches
  it, or if the local bound of ``certify.linear_bounds`` (interval propagation, backward
  refinement when the certificate says ``refined``, CROWN and the interval Jacobian),
  re-implemented here in numpy, certifies the section-4 region of that radius;
* ``lower <= upper``; thresholds: the numpy compression error at the claimed level must be
  below the layer's smallest ``lower``;
* ``multilayer`` uniform budgets: the section-5 recursion for all layers at once, evaluated
  in numpy at the claimed ``t`` (budgets ``t ||W~_k||``), must certify every input.

Residual blocks (``Save``/``Swap``/``Add`` steps) run on a stack here too (``_move``): every
pass from a layer continues with the values saved on the stack after it (constants), the
Lipschitz constants and the multi-layer deviations of the branches add up, and the backward
passes carry a stack of rows whose leftovers multiply the saved constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf

from certify.lipschitz import patch_overlap
from certify.network import (GELU_ARGMIN, GELU_DERIVATIVE, GELU_FLOOR, Activation, Add, Affine,
                             Flatten, Network, Pool, Save, Swap)

SLACK = 1e-9  # relative tolerance for equalities between two float64 computations
# Relative inflation of the multi-layer margin bound for its own rounding; the producer
# (certify.multilayer) uses the same and leaves this much slack in the t it claims.
MULTILAYER_SAFETY = 1e-9


@dataclass
class Report:
    """Confirmed and refuted claims; ``ok`` when nothing is refuted."""

    confirmed: int = 0
    refuted: list[str] = field(default_factory=list)

    def claim(self, holds: bool, what: str) -> None:
        if holds:
            self.confirmed += 1
        else:
            self.refuted.append(what)

    @property
    def ok(self) -> bool:
        return not self.refuted


# -- numpy forward pass -------------------------------------------------------------------

def _unfold(x: np.ndarray, layer: Affine) -> np.ndarray:
    """im2col: ``(B, C, H, W) -> (B, C k_h k_w, L)`` in torch's ``unfold`` order."""
    k_h, k_w = layer.weight.shape[-2:]
    (p_h, p_w), (s_h, s_w), (d_h, d_w) = layer.padding, layer.stride, layer.dilation
    x = np.pad(x, ((0, 0), (0, 0), (p_h, p_h), (p_w, p_w)))
    span = ((k_h - 1) * d_h + 1, (k_w - 1) * d_w + 1)
    windows = sliding_window_view(x, span, axis=(2, 3))[:, :, ::s_h, ::s_w, ::d_h, ::d_w]
    B, C, H, W = windows.shape[:4]
    return windows.transpose(0, 1, 4, 5, 2, 3).reshape(B, C * k_h * k_w, H * W), (H, W)


def columns(layer: Affine, h: np.ndarray, bias: bool) -> tuple[np.ndarray, tuple]:
    """``P~`` as ``(B, n, L)`` and the output's spatial shape."""
    if layer.is_conv:
        P, spatial = _unfold(h, layer)
    else:
        P, spatial = h[:, :, None], ()
    if bias:
        P = np.concatenate([P, np.ones_like(P[:, :1])], axis=1)
    return P, spatial


def affine(layer: Affine, P: np.ndarray, spatial, weight: np.ndarray, bias: bool) -> np.ndarray:
    """``Z = weight P~`` (+ the fixed bias), reshaped like the layer's output."""
    Z = np.matmul(weight, P)
    if not bias:
        Z = Z + layer.bias.numpy()[:, None]
    return Z.reshape(P.shape[0], Z.shape[-2], *spatial) if spatial else Z[..., 0]


def _activation(step: Activation, x: np.ndarray) -> np.ndarray:
    if step.kind == "relu":
        return np.maximum(x, 0)
    if step.kind == "leaky_relu":
        return np.where(x >= 0, x, step.slope * x)
    if step.kind == "tanh":
        return np.tanh(x)
    if step.kind == "sigmoid":
        return 1 / (1 + np.exp(-x))
    return x * (1 + erf(x / math.sqrt(2))) / 2


def _pool(step: Pool, x: np.ndarray) -> np.ndarray:
    p = step.padding
    fill = 0.0 if step.kind == "avg" else -np.inf
    x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=fill)
    windows = sliding_window_view(x, (step.kernel, step.kernel), axis=(2, 3))
    windows = windows[:, :, ::step.stride, ::step.stride]
    return windows.mean(axis=(-2, -1)) if step.kind == "avg" else windows.max(axis=(-2, -1))


def _move(step, value, stack: tuple, add=np.add):
    """A stack step on ``(value, stack)``: push a copy, exchange with the top, add the top."""
    if isinstance(step, Save):
        return value, stack + (value,)
    if not stack:
        raise ValueError(f"{step.name}: nothing saved on the stack to pop")
    if isinstance(step, Swap):
        return stack[-1], stack[:-1] + (value,)
    return add(value, stack[-1]), stack[:-1]


STACK = (Save, Swap, Add)


def forward(network: Network, x: np.ndarray, start: int = 0, stack: tuple = ()) -> np.ndarray:
    """The network from step ``start`` on, ``stack`` the values saved on the stack there."""
    for step in network.steps[start:]:
        if isinstance(step, STACK):
            x, stack = _move(step, x, stack)
        elif isinstance(step, Affine):
            P, spatial = columns(step, x, False)
            x = affine(step, P, spatial, step.matrix.numpy(), False)
        elif isinstance(step, Activation):
            x = _activation(step, x)
        elif isinstance(step, Flatten):
            x = x.reshape(len(x), -1)
        else:
            x = _pool(step, x)
    return x


def layer_states(network: Network, x: np.ndarray) -> list[tuple[np.ndarray, tuple]]:
    """``(current value, stack)`` before every step, then after the last one."""
    states = [(x, ())]
    for step in network.steps:
        value, stack = states[-1]
        if isinstance(step, STACK):
            states.append(_move(step, value, stack))
        else:
            states.append((forward(Network((step,)), value), stack))
    return states


def layer_inputs(network: Network, x: np.ndarray) -> list[np.ndarray]:
    return [value for value, _ in layer_states(network, x)]


# -- bounds in numpy ----------------------------------------------------------------------

def _spectral_upper(W: np.ndarray) -> float:
    s = np.linalg.svd(W, compute_uv=False)
    return float(s[0] * (1 + 8 * max(W.shape) * np.finfo(float).eps))


def _lipschitz(step, norm: str) -> float:
    if isinstance(step, Affine):
        W = step.matrix.numpy()
        if norm == "fro":
            return math.sqrt(patch_overlap(step)) * _spectral_upper(W)
        return float(np.abs(W).sum(axis=1).max()) * (1 + W.shape[1] * 1e-15)
    if isinstance(step, Activation):
        return step.lipschitz
    return step.lipschitz_l2 if norm == "fro" else step.lipschitz_linf


def _region_scale(P: np.ndarray, norm: str) -> np.ndarray:
    if norm == "fro":
        return np.array([_spectral_upper(p) for p in P])
    return np.abs(P).sum(axis=1) * (1 + P.shape[1] * 1e-15)


def _downstream(steps, norm: str) -> float:
    """Lipschitz constant of ``steps`` (values saved before them fixed): products along a
    chain, a residual block's branches summed (the constants ride the stack, saved ones 0)."""
    current, saved = 1.0, ()
    for step in steps:
        if isinstance(step, STACK):
            if not saved and not isinstance(step, Save):
                saved = (0.0,)  # the top was saved before these steps: a constant
            current, saved = _move(step, current, saved, add=lambda a, b: a + b)
        else:
            current = current * _lipschitz(step, norm)
    return current


def global_lower(network: Network, index: int, P, y, margins, norm: str) -> np.ndarray:
    W = network.steps[-1].weight.numpy()
    ord = 2 if norm == "fro" else 1
    rows = np.linalg.norm(W[y][:, None, :] - W[None], ord=ord, axis=-1) * (1 + W.shape[1] * 1e-15)
    lip = _downstream(network.steps[index + 1:-1], norm)
    scale = _region_scale(P, norm)
    if norm == "max":
        scale = scale.max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(np.isfinite(margins), margins / (rows * lip), np.inf)
    return bound.min(axis=-1) / scale


def _fold(cols: np.ndarray, out_shape, layer) -> np.ndarray:
    """Adjoint of ``_unfold``: ``(N, C k_h k_w, L) -> (N, C, H, W)``, summing overlaps."""
    N, (C, H, W) = len(cols), out_shape
    k_h, k_w = layer.weight.shape[-2:]
    (p_h, p_w), (s_h, s_w), (d_h, d_w) = layer.padding, layer.stride, layer.dilation
    out = np.zeros((N, C, H + 2 * p_h, W + 2 * p_w))
    H_out = (H + 2 * p_h - (k_h - 1) * d_h - 1) // s_h + 1
    W_out = (W + 2 * p_w - (k_w - 1) * d_w - 1) // s_w + 1
    cols = cols.reshape(N, C, k_h, k_w, H_out, W_out)
    for i in range(k_h):
        for j in range(k_w):
            out[:, :, i * d_h: i * d_h + s_h * H_out: s_h, j * d_w: j * d_w + s_w * W_out: s_w] \
                += cols[:, :, i, j]
    return out[:, :, p_h: p_h + H, p_w: p_w + W]


# -- the local bound in numpy (the method of certify.linear_bounds) ----------------------

ROUND = 1e-10


def _interval(step, lo: np.ndarray, hi: np.ndarray):
    """Bounds of a step's output over the box ``[lo, hi]`` (interval arithmetic)."""
    if isinstance(step, Affine):
        center, rad = (lo + hi) / 2, (hi - lo) / 2
        Pc, spatial = columns(step, center, False)
        Pr, _ = columns(step, rad, False)
        c = affine(step, Pc, spatial, step.matrix.numpy(), False)
        zero_bias = Affine(step.name, step.weight, step.bias * 0)
        width = affine(zero_bias, Pr, spatial, np.abs(step.matrix.numpy()), False) * (1 + 1e-12)
        return c - width, c + width
    if isinstance(step, Activation) and step.kind == "gelu":
        a, b = _activation(step, lo), _activation(step, hi)
        inside = (lo <= GELU_ARGMIN) & (hi >= GELU_ARGMIN)
        return np.where(inside, GELU_FLOOR, np.minimum(a, b)), np.maximum(a, b)
    one = Network((step,))
    return forward(one, lo), forward(one, hi)


def _times_weight(A: np.ndarray, step: Affine, weight: np.ndarray, in_shape) -> np.ndarray:
    """Rows ``A`` ``(B, R, *out)`` composed with the linear map of ``weight``."""
    B, R = A.shape[:2]
    if not step.is_conv:
        return A @ weight
    cols = np.einsum("km,brkl->brml", weight, A.reshape(B, R, A.shape[2], -1))
    return _fold(cols.reshape(B * R, cols.shape[2], -1), in_shape, step).reshape(B, R, *in_shape)


def _avg_adjoint(step: Pool, A: np.ndarray, in_shape) -> np.ndarray:
    B, R = A.shape[:2]
    k, s, p = step.kernel, step.stride, step.padding
    pool = SimpleNamespace(weight=np.zeros((1, 1, k, k)), padding=(p, p), stride=(s, s),
                           dilation=(1, 1))
    cols = np.repeat(A.reshape(B * R * A.shape[2], 1, -1), k * k, axis=1) / (k * k)
    return _fold(cols, (1, *in_shape[1:]), pool).reshape(B, R, *in_shape)


def _rows_sum(t: np.ndarray) -> np.ndarray:
    return t.reshape(*t.shape[:2], -1).sum(-1)


def _backward(A, d, e, size, steps, intervals, lower_only: bool, stack: tuple = ()):
    """Rows ``A x + d +- e`` walked back through ``steps`` (``A`` None: constant); ``stack``
    holds the (constant) values saved on the stack before ``steps[0]``."""
    saved = ()  # rows on the top stack values; None: zero rows
    for step, (lo, hi) in zip(reversed(steps), reversed(intervals)):
        if isinstance(step, STACK):
            A, saved = step.move_back(A, saved)
            continue
        if A is None:
            continue
        if isinstance(step, Affine):
            bias = step.bias.numpy()
            add = _rows_sum(A * (bias[:, None, None] if step.is_conv else bias))
            A = _times_weight(A, step, step.matrix.numpy(), lo.shape[1:])
            d, size = d + add, size + np.abs(add)
        elif isinstance(step, Activation) and step.kind in ("relu", "leaky_relu"):
            f_lo, f_hi = _activation(step, lo), _activation(step, hi)
            unstable = (lo < 0) & (hi > 0)
            stable = np.where(lo >= 0, 1.0, step.slope)
            chord = np.where(unstable, (f_hi - f_lo) / np.where(unstable, hi - lo, 1.0), stable)
            if lower_only and 0 <= step.slope <= 1:
                b_up = f_lo - chord * lo
                b_up = np.where(unstable, b_up + np.maximum(f_hi - (chord * hi + b_up), 0)
                                + ROUND * (np.abs(f_lo) + np.abs(f_hi)), 0.0)
                s_low = np.where(unstable, np.where(hi >= -lo, 1.0, step.slope), stable)
                pos, neg = np.clip(A, 0, None), np.clip(A, None, 0)
                add = _rows_sum(neg * b_up[:, None])
                A, d, size = pos * s_low[:, None] + neg * chord[:, None], d + add, size + np.abs(add)
            else:
                g_lo, g_hi = f_lo - chord * lo, f_hi - chord * hi
                zero = np.where(unstable, 0.0, g_lo)
                low = np.minimum(np.minimum(g_lo, g_hi), zero)
                high = np.maximum(np.maximum(g_lo, g_hi), zero)
                mu = (high + low) / 2
                nu = (high - low) / 2 + ROUND * (np.abs(lo) + np.abs(hi))
                add, err = _rows_sum(A * mu[:, None]), _rows_sum(np.abs(A) * nu[:, None])
                A, d, e, size = A * chord[:, None], d + add, e + err, size + np.abs(add) + err
        elif isinstance(step, Flatten):
            A = A.reshape(*A.shape[:2], *lo.shape[1:])
        elif isinstance(step, Pool) and step.kind == "avg":
            A = _avg_adjoint(step, A, lo.shape[1:])
        else:
            low, high = _interval(step, lo, hi)
            add = _rows_sum(A * ((high + low) / 2)[:, None])
            err = _rows_sum(np.abs(A) * ((high - low) / 2)[:, None])
            A, d, e, size = None, d + add, e + err, size + np.abs(add) + err
    if any(rows is not None for rows in saved[:max(len(saved) - len(stack), 0)]):
        raise ValueError("rows left for values saved before the start, but no stack given")
    for rows, value in zip(reversed(saved), reversed(stack)):
        if rows is not None:
            add = _rows_sum(rows * value[:, None])
            d, size = d + add, size + _rows_sum(np.abs(rows) * np.abs(value)[:, None])
    return A, d, e, size


def _concretise(A, z, norm: str, unit):
    """``A z``, ``|A| |z|`` and ``sup_{u in U} A u`` for rows ``A``."""
    flat, zf = A.reshape(*A.shape[:2], -1), z.reshape(len(z), -1)
    at_z = np.einsum("brn,bn->br", flat, zf)
    magnitude = np.einsum("brn,bn->br", np.abs(flat), np.abs(zf))
    if norm == "fro":
        dual = np.linalg.norm(flat, axis=-1) * unit[:, None]
    else:
        dual = np.einsum("brn,bn->br", np.abs(flat), unit.reshape(len(z), -1))
    return at_z, magnitude, dual


def _refined(steps, intervals, i, z, norm, unit, rho, stack):
    lo, hi = intervals[i]
    B, shape = len(lo), lo.shape[1:]
    flat_lo, flat_hi = lo.reshape(B, -1), hi.reshape(B, -1)
    if steps[i].kind in ("relu", "leaky_relu"):
        wanted = (flat_lo < 0) & (flat_hi > 0)
    else:
        wanted = np.ones_like(flat_lo, dtype=bool)
    k = int(wanted.sum(-1).max())
    if k == 0:
        return lo, hi
    order = np.argsort(~wanted, axis=-1, kind="stable")[:, :k]
    previous = steps[i - 1]
    if isinstance(previous, Affine) and not previous.is_conv:
        A, d = previous.weight.numpy()[order], previous.bias.numpy()[order]
        walked = i - 1
    else:
        A = np.zeros((B, k, flat_lo.shape[1]))
        np.put_along_axis(A, order[..., None], 1.0, axis=-1)
        A, d, walked = A.reshape(B, k, *shape), np.zeros((B, k)), i
    A, center, spread, size = _backward(A, d, np.zeros_like(d), np.abs(d), steps[:walked],
                                        intervals[:walked], lower_only=False, stack=stack)
    if A is not None:
        at_z, magnitude, dual = _concretise(A, z, norm, unit)
        center, size, spread = center + at_z, size + magnitude, spread + rho[:, None] * dual
    slack = ROUND * (size + spread)
    new_lo = np.maximum(np.take_along_axis(flat_lo, order, -1), center - spread - slack)
    new_hi = np.minimum(np.take_along_axis(flat_hi, order, -1), center + spread + slack)
    np.put_along_axis(flat_lo, order, new_lo, -1)
    np.put_along_axis(flat_hi, order, new_hi, -1)
    return flat_lo.reshape(lo.shape), flat_hi.reshape(hi.shape)


def _interval_add(a, b):
    (a_lo, a_hi), (b_lo, b_hi) = a, b
    return (a_lo + b_lo - ROUND * (np.abs(a_lo) + np.abs(b_lo)),
            a_hi + b_hi + ROUND * (np.abs(a_hi) + np.abs(b_hi)))


def _intermediate(network, start, z, norm, unit, rho, refine: bool, stack: tuple = ()):
    steps = network.steps[start:-1]
    box = np.broadcast_to((rho * unit).reshape(-1, *[1] * (z.ndim - 1)), z.shape) \
        if norm == "fro" else rho.reshape(-1, *[1] * (z.ndim - 1)) * unit
    intervals = [(z - box, z + box)]
    nominal, reach = z, (rho * unit if norm == "fro" else None)
    # The stacks of intervals, nominal values and l2 reaches (saved constants: reach 0).
    saved_box, saved_nominal = tuple((v, v) for v in stack), stack
    saved_reach = tuple(np.zeros(len(z)) for _ in stack)
    for i in range(1, len(steps) + 1):
        step = steps[i - 1]
        if isinstance(step, STACK):
            interval, saved_box = _move(step, intervals[-1], saved_box, add=_interval_add)
            intervals.append(interval)
            nominal, saved_nominal = _move(step, nominal, saved_nominal)
            if reach is not None:
                reach, saved_reach = _move(step, reach, saved_reach,
                                           add=lambda a, b: (a + b) * (1 + ROUND))
            if refine and i < len(steps) and isinstance(steps[i], Activation):
                intervals[i] = _refined(steps, intervals, i, z, norm, unit, rho, stack)
            continue
        lo, hi = _interval(step, *intervals[-1])
        if reach is not None:
            nominal_out = forward(Network((step,)), nominal)
            if isinstance(step, Affine):
                before_lo, before_hi = intervals[-1]
                varies = (before_hi > before_lo).astype(float)
                Pv, spatial = columns(step, varies, False)
                zero_bias = Affine(step.name, step.weight, step.bias * 0)
                rows = np.sqrt(affine(zero_bias, Pv, spatial, step.matrix.numpy() ** 2, False))
                spread = rows * (1 + ROUND) * reach.reshape(-1, *[1] * (lo.ndim - 1))
                lo = np.maximum(lo, nominal_out - spread * (1 + ROUND))
                hi = np.minimum(hi, nominal_out + spread * (1 + ROUND))
            corner = np.maximum(hi - nominal_out, nominal_out - lo).reshape(len(lo), -1)
            reach = np.minimum(reach * _lipschitz(step, "fro"),
                               np.linalg.norm(corner, axis=-1) * (1 + ROUND))
            nominal = nominal_out
        intervals.append((lo, hi))
        if refine and i < len(steps) and isinstance(steps[i], Activation):
            intervals[i] = _refined(steps, intervals, i, z, norm, unit, rho, stack)
    return intervals


def _derivatives(step: Activation, lo, hi):
    if step.kind in ("relu", "leaky_relu"):
        a, b = min(step.slope, 1.0), max(step.slope, 1.0)
        low = np.where(hi < 0, step.slope, np.where(lo > 0, 1.0, a))
        high = np.where(hi < 0, step.slope, np.where(lo > 0, 1.0, b))
        return low, high
    if step.kind in ("tanh", "sigmoid"):
        def derivative(x):
            if step.kind == "tanh":
                return 1 - np.tanh(x) ** 2
            s = 1 / (1 + np.exp(-x))
            return s * (1 - s)
        d_lo, d_hi = derivative(lo), derivative(hi)
        top = np.where((lo <= 0) & (hi >= 0), derivative(0.0), np.maximum(d_lo, d_hi))
        return np.minimum(d_lo, d_hi) * (1 - ROUND), top * (1 + ROUND)
    return np.full_like(lo, GELU_DERIVATIVE[0]), np.full_like(lo, GELU_DERIVATIVE[1])


def _jacobian_dual(network, start, intervals, C, norm, unit):
    """The interval-Jacobian slope of ``certify.linear_bounds.jacobian_line``, or None."""
    rows, saved = (C, C), ()  # interval rows (lo, hi); None: zero rows
    for step, (x_lo, x_hi) in zip(reversed(network.steps[start:-1]), reversed(intervals)):
        if isinstance(step, STACK):
            rows, saved = step.move_back(rows, saved, _interval_add)
            continue
        if rows is None:
            continue
        lo, hi = rows
        if isinstance(step, Activation):
            d_lo, d_hi = (t[:, None] for t in _derivatives(step, x_lo, x_hi))
            products = np.stack([lo * d_lo, lo * d_hi, hi * d_lo, hi * d_hi])
            rows = products.min(0), products.max(0)
            continue
        if isinstance(step, Pool) and step.kind == "max":
            return None
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        if isinstance(step, Affine):
            W = step.matrix.numpy()
            center = _times_weight(center, step, W, x_lo.shape[1:])
            radius = _times_weight(radius, step, np.abs(W), x_lo.shape[1:])
        elif isinstance(step, Flatten):
            center = center.reshape(*center.shape[:2], *x_lo.shape[1:])
            radius = radius.reshape(*radius.shape[:2], *x_lo.shape[1:])
        else:
            center = _avg_adjoint(step, center, x_lo.shape[1:])
            radius = _avg_adjoint(step, radius, x_lo.shape[1:])
        radius = radius * (1 + ROUND) + ROUND * np.abs(center)
        rows = center - radius, center + radius
    if rows is None:  # the margins do not depend on z
        return np.zeros(C.shape[:2])
    lo, hi = rows
    magnitude = np.maximum(np.abs(lo), np.abs(hi))
    return _concretise(magnitude, np.zeros(magnitude.shape[:1] + magnitude.shape[2:]), norm,
                       unit)[2] * (1 + ROUND)


def local_lower_bounds(network: Network, index: int, z: np.ndarray, P, rho: np.ndarray,
                       y: np.ndarray, norm: str, refine: bool, stack: tuple = ()) -> np.ndarray:
    """Lower bounds ``(B, C)`` of the margins over the section-4 region of radius ``rho``:
    the best of interval arithmetic, CROWN and the interval Jacobian (as in
    ``certify.linear_bounds.margin_lines``, recomputed in numpy). ``stack``: the values saved
    on the stack after the layer (inside a residual block), constants."""
    scale = _region_scale(P, norm)
    if norm == "fro":
        unit = scale
    else:
        unit = np.broadcast_to(scale[:, None, :], (len(z), z.shape[1], scale.shape[1]))
        unit = unit.reshape(z.shape)
    start = index + 1
    intervals = _intermediate(network, start, z, norm, unit, rho, refine, stack)
    W, b = network.steps[-1].weight.numpy(), network.steps[-1].bias.numpy()
    C, c = W[y][:, None, :] - W[None], b[y][:, None] - b[None]
    lo, hi = intervals[-1]
    center, rad = (hi + lo) / 2, (hi - lo) / 2
    size = np.einsum("bcn,bn->bc", np.abs(C), np.abs(center) + rad) + np.abs(c)
    best = np.einsum("bcn,bn->bc", C, center) + c - np.einsum("bcn,bn->bc", np.abs(C), rad) \
        - ROUND * size
    A, d, e, size = _backward(C, c, np.zeros_like(c), np.abs(c), network.steps[start:-1],
                              intervals[:-1], lower_only=True, stack=stack)
    value, size = d - e, size + e
    if A is not None:
        at_z, magnitude, dual = _concretise(A, z, norm, unit)
        value, size = value + at_z - rho[:, None] * dual * (1 + ROUND), size + magnitude
    best = np.maximum(best, value - ROUND * size)
    dual = _jacobian_dual(network, start, intervals[:-1], C, norm, unit)
    if dual is not None:
        logits = forward(network, z, start, stack)
        m = logits[np.arange(len(y)), y][:, None] - logits
        tolerance = ROUND * (np.abs(logits).max(-1, keepdims=True) + np.abs(m))
        best = np.maximum(best, m - tolerance - rho[:, None] * dual)
    return best


def exact_last_layer(h: np.ndarray, logits: np.ndarray, y: np.ndarray, norm: str,
                     bias: bool) -> np.ndarray:
    """``min_j m_j / (sqrt(2) ||h~||_2)`` or ``min_j m_j / (2 ||h~||_1)`` (section 3)."""
    if bias:
        h = np.concatenate([h, np.ones_like(h[:, :1])], axis=1)
    m = logits[np.arange(len(y)), y][:, None] - logits
    m[np.arange(len(y)), y] = np.inf
    if norm == "fro":
        denominator = math.sqrt(2) * np.linalg.norm(h, axis=1)
    else:
        denominator = 2 * np.abs(h).sum(axis=1)
    with np.errstate(divide="ignore"):
        return m.min(axis=1) / denominator


def multilayer_bound(network: Network, values, y: np.ndarray, budgets: np.ndarray, norm: str,
                     bias: bool) -> np.ndarray:
    """Numpy section-5 recursion for all affine layers at once, ``(B, C)``.

    ``budgets`` is ``(K, B)``. Affine step: ``||dz|| <= (||W||_op + e g) ||dh|| + e s`` with
    ``s = sigma_max(P~)`` and ``g = sqrt(overlap)`` (``fro``, l2), or ``s = max_j ||P~_:j||_1``
    and ``g`` the patch length (``max``, l_inf); other steps scale ``||dh||`` by their
    Lipschitz constant; logits: ``||W_L^T c_j|| ||dh|| + ||c_j|| e (s + g ||dh||)``.
    """
    delta, saved = np.zeros(len(y)), ()
    k = 0
    for i, step in enumerate(network.steps):
        if isinstance(step, STACK):  # a residual block adds its branches' deviations
            delta, saved = _move(step, delta, saved)
            continue
        if not isinstance(step, Affine):
            delta = _lipschitz(step, norm) * delta
            continue
        P, _ = columns(step, values[i], bias)
        scale = _region_scale(P, norm)
        if norm == "max":
            scale = scale.max(axis=-1)
        growth = math.sqrt(patch_overlap(step)) if norm == "fro" else P.shape[1] - bias
        e = budgets[k]
        k += 1
        if i < len(network.steps) - 1:
            delta = (_lipschitz(step, norm) + e * growth) * delta + e * scale
            continue
        W = step.weight.numpy()
        ord, dual = (2, math.sqrt(2)) if norm == "fro" else (1, 2.0)
        rows = np.linalg.norm(W[y][:, None, :] - W[None], ord=ord, axis=-1)
        rows = rows * (1 + W.shape[1] * 1e-15)
        bound = rows * delta[:, None] + (dual * e * (scale + growth * delta))[:, None]
        return bound * (1 + MULTILAYER_SAFETY)
    raise ValueError("the last step of the network must be a Linear layer (the logits)")


def _check_multilayer(report: Report, claims: dict, network: Network, values, y, margins,
                      bias: bool) -> None:
    weights = [network.steps[i].matrix.numpy() for i in network.affine_indices]
    if bias:
        weights = [np.concatenate([W, network.steps[i].bias.numpy()[:, None]], axis=1)
                   for W, i in zip(weights, network.affine_indices)]
    sizes = {"fro": np.array([np.linalg.norm(W) for W in weights]),  # ||W~_k|| per norm
             "max": np.array([np.abs(W).max() for W in weights])}
    for norm in ("fro", "max"):
        t = _array(claims[norm]["uniform_budget"])
        where = f"multilayer, {norm}"
        valid = np.isfinite(t) & (t >= 0)
        budgets = sizes[norm][:, None] * np.where(valid, t, 0.0)[None, :]
        bound = multilayer_bound(network, values, y, budgets, norm, bias)
        certified = (bound < margins).all(axis=1) | (t == 0)  # t = 0 changes nothing
        bad = np.nonzero(~(valid & certified))[0]
        report.claim(bad.size == 0, f"{where}: uniform budget of inputs {bad[:5]} is not "
                     "certified by the all-layers recursion")
        report.claim(claims[norm]["min"] == float(t.min()), f"{where}: min is not the "
                     "smallest uniform budget")


# -- the check ----------------------------------------------------------------------------

def _witness_change(witnesses, key: str, P: np.ndarray) -> tuple[np.ndarray, callable]:
    """``D P~`` and a function giving ``||D||`` in a norm, from the stored factors."""
    if f"{key}/full" in witnesses:
        D = witnesses[f"{key}/full"]
        fro = np.linalg.norm(D, axis=(1, 2))
        return np.matmul(D, P), {"fro": fro, "max": np.abs(D).max(axis=(1, 2))}
    left, right = witnesses[f"{key}/left"], witnesses[f"{key}/right"]
    change = left[:, :, None] * np.einsum("bn,bnl->bl", right, P)[:, None, :]
    return change, {"fro": np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1),
                    "max": np.abs(left).max(axis=1) * np.abs(right).max(axis=1)}


def _array(values) -> np.ndarray:
    return np.array([np.inf if v is None else v for v in values], dtype=np.float64)


def check(document: dict, witnesses, network: Network, x: np.ndarray) -> Report:
    report = Report()
    bias = document["bias_perturbed"]
    states = layer_states(network, x)
    values = [value for value, _ in states]
    logits = values[-1]
    y = logits.argmax(axis=1)
    report.claim(list(y) == document["predictions"], "predictions differ from a numpy forward")
    margins = logits[np.arange(len(y)), y][:, None] - logits
    margins[np.arange(len(y)), y] = np.inf
    affine_steps = network.affine_indices
    if [network.steps[i].name for i in affine_steps] != [e["name"] for e in document["layers"]]:
        report.claim(False, "the certificate's layers do not match the model's")
        return report
    if "multilayer" in document:
        _check_multilayer(report, document["multilayer"], network, values, y, margins, bias)
    for index, entry in zip(affine_steps, document["layers"]):
        layer = network.steps[index]
        P, spatial = columns(layer, values[index], bias)
        W = layer.matrix.numpy()
        if bias:
            W = np.concatenate([W, layer.bias.numpy()[:, None]], axis=1)
        last = index == len(network.steps) - 1 and not layer.is_conv
        for norm in ("fro", "max"):
            claims = entry[norm]
            lower, upper = _array(claims["lower"]), _array(claims["upper"])
            where = f"layer {layer.name}, {norm}"
            report.claim(bool(np.all(lower <= upper)), f"{where}: lower > upper")
            # Upper: the stored witness changes the class, and has the claimed norm.
            found = np.isfinite(upper)
            if found.any():
                change, norms = _witness_change(witnesses, f"{layer.name}/{norm}", P)
                Z = np.matmul(W, P) + change
                if not bias:
                    Z = Z + layer.bias.numpy()[:, None]
                Z = Z.reshape(len(x), W.shape[0], *spatial) if spatial else Z[..., 0]
                flipped = forward(network, Z, index + 1, states[index + 1][1]).argmax(axis=1) != y
                bad = np.nonzero(found & ~flipped)[0]
                report.claim(bad.size == 0, f"{where}: witnesses of inputs {bad[:5]} do not "
                             "change the class")
                close = np.isclose(norms[norm], upper, rtol=SLACK, atol=0)
                bad = np.nonzero(found & ~close)[0]
                report.claim(bad.size == 0, f"{where}: upper of inputs {bad[:5]} is not the "
                             "witness's norm")
            # Lower: exact formula, global Lipschitz, or interval propagation.
            if last:
                exact = exact_last_layer(values[index], logits, y, norm, bias)
                bad = np.nonzero(lower > exact * (1 + 1e-12))[0]
            else:
                confirmed = lower <= global_lower(network, index, P, y, margins, norm) * (1 + 1e-12)
                rest = ~confirmed & (lower > 0)
                if rest.any():
                    stack = tuple(v[rest] for v in states[index + 1][1])
                    bounds = local_lower_bounds(network, index, values[index + 1][rest],
                                                P[rest], lower[rest], y[rest], norm,
                                                refine="refined" in claims["method"], stack=stack)
                    bounds[np.arange(len(bounds)), y[rest]] = np.inf
                    certified = (bounds > 0).all(-1)
                    confirmed[np.nonzero(rest)[0][certified]] = True
                bad = np.nonzero(~confirmed & (lower > 0))[0]
            report.claim(bad.size == 0, f"{where}: lower of inputs {bad[:5]} is not confirmed")
            _check_thresholds(report, where, layer.matrix.numpy(), claims["threshold"],
                              float(lower.min()), norm, layer.is_conv)
    return report


def _check_thresholds(report: Report, where: str, W: np.ndarray, t: dict, radius: float,
                      norm: str, conv: bool) -> None:
    s = np.linalg.svd(W, compute_uv=False)
    rank = t["rank"]
    if norm == "fro" and conv:
        error = math.sqrt(float((s[rank:] ** 2).sum()))
    else:
        error = float(s[rank]) if rank < len(s) else 0.0
    report.claim(error == 0 or error < radius, f"{where}: rank {rank} error {error} >= {radius}")
    per_entry = radius / math.sqrt(W.size) if norm == "fro" else radius
    for key, per_channel in (("bits", False), ("bits_per_channel", True)):
        bits = t[key]
        if bits is None:
            continue
        top = np.abs(W).max(axis=1) if per_channel else np.abs(W).max()
        step = float(np.max(top / (2 ** (bits - 1) - 1)))
        report.claim(step == 0 or step / 2 < per_entry, f"{where}: {bits} {key} not safe")
    k = round(t["prune_ratio"] * W.size)
    pruned = np.sort(np.abs(W), axis=None)[:k]
    error = float(np.linalg.norm(pruned)) if norm == "fro" else float(pruned.max(initial=0.0))
    report.claim(error == 0 or error < radius, f"{where}: prune ratio {t['prune_ratio']} not safe")
