"""The numpy twin of the bounds: global Lipschitz, local (interval, CROWN, interval
Jacobian), the exact last layer and the all-layers recursion (THEORY.md sections 3 to 5).

An independent re-implementation, in float64 numpy, of what ``certify.radius``,
``certify.linear_bounds`` and ``certify.multilayer`` compute in torch; ``certify.check``
evaluates these at a certificate's claimed radii. Residual blocks run on a stack here too
(``move``): every pass from a layer continues with the values saved on the stack after it
(constants), the Lipschitz constants and the multi-layer deviations of the branches add up,
and the backward passes carry a stack of rows whose leftovers multiply the saved constants.
"""

from __future__ import annotations

import math

import numpy as np

from certify.lipschitz import patch_overlap
from certify.network import (GELU_ARGMIN, GELU_DERIVATIVE, GELU_FLOOR, Activation, Affine, Flatten,
                             Network, Pool, Save)
from certify.numpy_forward import (STACK, activation, affine, avg_adjoint, columns, forward, move,
                                   times_weight)

# Relative inflation of the multi-layer margin bound for its own rounding; the producer
# (certify.multilayer) uses the same and leaves this much slack in the t it claims.
MULTILAYER_SAFETY = 1e-9


def spectral_upper(W: np.ndarray) -> float:
    s = np.linalg.svd(W, compute_uv=False)
    return float(s[0] * (1 + 8 * max(W.shape) * np.finfo(float).eps))


def lipschitz(step, norm: str) -> float:
    if isinstance(step, Affine):
        W = step.matrix.numpy()
        if norm == "fro":
            return math.sqrt(patch_overlap(step)) * spectral_upper(W)
        return float(np.abs(W).sum(axis=1).max()) * (1 + W.shape[1] * 1e-15)
    if isinstance(step, Activation):
        return step.lipschitz
    return step.lipschitz_l2 if norm == "fro" else step.lipschitz_linf


def region_scale(P: np.ndarray, norm: str) -> np.ndarray:
    if norm == "fro":
        return np.array([spectral_upper(p) for p in P])
    return np.abs(P).sum(axis=1) * (1 + P.shape[1] * 1e-15)


def _downstream(steps, norm: str) -> float:
    """Lipschitz constant of ``steps`` (values saved before them fixed): products along a
    chain, a residual block's branches summed (the constants ride the stack, saved ones 0)."""
    current, saved = 1.0, ()
    for step in steps:
        if isinstance(step, STACK):
            if not saved and not isinstance(step, Save):
                saved = (0.0,)  # the top was saved before these steps: a constant
            current, saved = move(step, current, saved, add=lambda a, b: a + b)
        else:
            current = current * lipschitz(step, norm)
    return current


def global_lower(network: Network, index: int, P, y, margins, norm: str) -> np.ndarray:
    W = network.steps[-1].weight.numpy()
    ord = 2 if norm == "fro" else 1
    rows = np.linalg.norm(W[y][:, None, :] - W[None], ord=ord, axis=-1) * (1 + W.shape[1] * 1e-15)
    lip = _downstream(network.steps[index + 1:-1], norm)
    scale = region_scale(P, norm)
    if norm == "max":
        scale = scale.max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(np.isfinite(margins), margins / (rows * lip), np.inf)
    return bound.min(axis=-1) / scale


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
        a, b = activation(step, lo), activation(step, hi)
        inside = (lo <= GELU_ARGMIN) & (hi >= GELU_ARGMIN)
        return np.where(inside, GELU_FLOOR, np.minimum(a, b)), np.maximum(a, b)
    one = Network((step,))
    return forward(one, lo), forward(one, hi)


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
            A = times_weight(A, step, step.matrix.numpy(), lo.shape[1:])
            d, size = d + add, size + np.abs(add)
        elif isinstance(step, Activation) and step.kind in ("relu", "leaky_relu"):
            f_lo, f_hi = activation(step, lo), activation(step, hi)
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
            A = avg_adjoint(step, A, lo.shape[1:])
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
            interval, saved_box = move(step, intervals[-1], saved_box, add=_interval_add)
            intervals.append(interval)
            if reach is not None:  # the nominal value only serves the l2 reach (fro)
                nominal, saved_nominal = move(step, nominal, saved_nominal)
                reach, saved_reach = move(step, reach, saved_reach,
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
            reach = np.minimum(reach * lipschitz(step, "fro"),
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
            center = times_weight(center, step, W, x_lo.shape[1:])
            radius = times_weight(radius, step, np.abs(W), x_lo.shape[1:])
        elif isinstance(step, Flatten):
            center = center.reshape(*center.shape[:2], *x_lo.shape[1:])
            radius = radius.reshape(*radius.shape[:2], *x_lo.shape[1:])
        else:
            center = avg_adjoint(step, center, x_lo.shape[1:])
            radius = avg_adjoint(step, radius, x_lo.shape[1:])
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
    scale = region_scale(P, norm)
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
            delta, saved = move(step, delta, saved)
            continue
        if not isinstance(step, Affine):
            delta = lipschitz(step, norm) * delta
            continue
        P, _ = columns(step, values[i], bias)
        scale = region_scale(P, norm)
        if norm == "max":
            scale = scale.max(axis=-1)
        growth = math.sqrt(patch_overlap(step)) if norm == "fro" else P.shape[1] - bias
        e = budgets[k]
        k += 1
        if i < len(network.steps) - 1:
            delta = (lipschitz(step, norm) + e * growth) * delta + e * scale
            continue
        W = step.weight.numpy()
        ord, dual = (2, math.sqrt(2)) if norm == "fro" else (1, 2.0)
        rows = np.linalg.norm(W[y][:, None, :] - W[None], ord=ord, axis=-1)
        rows = rows * (1 + W.shape[1] * 1e-15)
        bound = rows * delta[:, None] + (dual * e * (scale + growth * delta))[:, None]
        return bound * (1 + MULTILAYER_SAFETY)
    raise ValueError("the last step of the network must be a Linear layer (the logits)")
