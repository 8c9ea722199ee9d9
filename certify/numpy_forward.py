"""The numpy twin of a network's forward pass, and the adjoints of its linear maps.

``certify.check`` recomputes every claim of a certificate from these (float64 numpy, not
the torch code that made the certificate): im2col ``columns`` and ``affine`` for
``Z = W P~ + b``, the activations and poolings, the residual stack moves (``move``: push a
copy, exchange with the top, add the top), and for the backward passes ``fold`` (the
adjoint of im2col), ``times_weight`` (rows composed with a layer's linear map), the
poolings' adjoints, and ``margin_gradients``, the exact gradient of the margins at a point.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf

from certify.network import Activation, Add, Affine, Flatten, Network, Pool, Save, Swap


def unfold(x: np.ndarray, layer: Affine) -> np.ndarray:
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
        P, spatial = unfold(h, layer)
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


def activation(step: Activation, x: np.ndarray) -> np.ndarray:
    if step.kind == "relu":
        return np.maximum(x, 0)
    if step.kind == "leaky_relu":
        return np.where(x >= 0, x, step.slope * x)
    if step.kind == "tanh":
        return np.tanh(x)
    if step.kind == "sigmoid":
        return 1 / (1 + np.exp(-x))
    return x * (1 + erf(x / math.sqrt(2))) / 2


def pool(step: Pool, x: np.ndarray) -> np.ndarray:
    p = step.padding
    fill = 0.0 if step.kind == "avg" else -np.inf
    x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=fill)
    windows = sliding_window_view(x, (step.kernel, step.kernel), axis=(2, 3))
    windows = windows[:, :, ::step.stride, ::step.stride]
    return windows.mean(axis=(-2, -1)) if step.kind == "avg" else windows.max(axis=(-2, -1))


def move(step, value, stack: tuple, add=np.add):
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
            x, stack = move(step, x, stack)
        elif isinstance(step, Affine):
            P, spatial = columns(step, x, False)
            x = affine(step, P, spatial, step.matrix.numpy(), False)
        elif isinstance(step, Activation):
            x = activation(step, x)
        elif isinstance(step, Flatten):
            x = x.reshape(len(x), -1)
        else:
            x = pool(step, x)
    return x


def layer_states(network: Network, x: np.ndarray) -> list[tuple[np.ndarray, tuple]]:
    """``(current value, stack)`` before every step, then after the last one."""
    states = [(x, ())]
    for step in network.steps:
        value, stack = states[-1]
        if isinstance(step, STACK):
            states.append(move(step, value, stack))
        else:
            states.append((forward(Network((step,)), value), stack))
    return states


def layer_inputs(network: Network, x: np.ndarray) -> list[np.ndarray]:
    return [value for value, _ in layer_states(network, x)]


def fold(cols: np.ndarray, out_shape, layer) -> np.ndarray:
    """Adjoint of ``unfold``: ``(N, C k_h k_w, L) -> (N, C, H, W)``, summing overlaps."""
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


def times_weight(A: np.ndarray, step: Affine, weight: np.ndarray, in_shape) -> np.ndarray:
    """Rows ``A`` ``(B, R, *out)`` composed with the linear map of ``weight``."""
    B, R = A.shape[:2]
    if not step.is_conv:
        return A @ weight
    cols = np.einsum("km,brkl->brml", weight, A.reshape(B, R, A.shape[2], -1))
    return fold(cols.reshape(B * R, cols.shape[2], -1), in_shape, step).reshape(B, R, *in_shape)


def avg_adjoint(step: Pool, A: np.ndarray, in_shape) -> np.ndarray:
    B, R = A.shape[:2]
    k, s, p = step.kernel, step.stride, step.padding
    pool = SimpleNamespace(weight=np.zeros((1, 1, k, k)), padding=(p, p), stride=(s, s),
                           dilation=(1, 1))
    cols = np.repeat(A.reshape(B * R * A.shape[2], 1, -1), k * k, axis=1) / (k * k)
    return fold(cols, (1, *in_shape[1:]), pool).reshape(B, R, *in_shape)



def max_adjoint(step: Pool, A: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Rows ``A`` ``(B, R, *out)`` through max pooling at the point ``x``: each output's row
    goes to the first maximum of its window (the entry torch's gradient picks)."""
    k, s, p = step.kernel, step.stride, step.padding
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
    windows = sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    B, C, H_out, W_out = windows.shape[:4]
    first = windows.reshape(B, C, H_out, W_out, k * k).argmax(-1)
    rows = np.arange(H_out)[:, None] * s + first // k
    cols = np.arange(W_out)[None, :] * s + first % k
    b, c = np.meshgrid(np.arange(B), np.arange(C), indexing="ij")
    b, c = b[:, :, None, None] + 0 * rows, c[:, :, None, None] + 0 * rows
    out = np.zeros((B, A.shape[1], *padded.shape[1:]))
    for r in range(A.shape[1]):
        np.add.at(out[:, r], (b, c, rows, cols), A[:, r])
    return out[..., p: p + x.shape[2], p: p + x.shape[3]]


def derivative(step: Activation, x: np.ndarray) -> np.ndarray:
    """``phi'(x)`` entrywise, with torch's choice at the kinks (ReLU: 0 at 0)."""
    if step.kind == "relu":
        return (x > 0).astype(float)
    if step.kind == "leaky_relu":
        return np.where(x > 0, 1.0, step.slope)
    if step.kind == "tanh":
        return 1 - np.tanh(x) ** 2
    if step.kind == "sigmoid":
        s = 1 / (1 + np.exp(-x))
        return s * (1 - s)
    return (1 + erf(x / math.sqrt(2))) / 2 + x * np.exp(-x**2 / 2) / math.sqrt(2 * math.pi)


def margin_gradients(network: Network, start: int, states, C: np.ndarray) -> np.ndarray:
    """``C d o / d v`` at the point: rows ``C`` ``(B, R, classes)`` on the logits walked back
    to the value ``v`` entering step ``start``, through every step at its value in
    ``states`` (``layer_states``); values saved on the stack before ``start`` are
    constants, so their rows are dropped. ``(B, R, *v.shape[1:])``."""
    rows, saved = C, ()
    for step, (value, _) in zip(reversed(network.steps[start:]), reversed(states[start:-1])):
        if isinstance(step, STACK):
            rows, saved = step.move_back(rows, saved)
        elif rows is None:
            continue
        elif isinstance(step, Affine):
            rows = times_weight(rows, step, step.matrix.numpy(), value.shape[1:])
        elif isinstance(step, Activation):
            rows = rows * derivative(step, value)[:, None]
        elif isinstance(step, Flatten):
            rows = rows.reshape(*rows.shape[:2], *value.shape[1:])
        elif step.kind == "avg":
            rows = avg_adjoint(step, rows, value.shape[1:])
        else:
            rows = max_adjoint(step, rows, value)
    value = states[start][0]
    return np.zeros((*C.shape[:2], *value.shape[1:])) if rows is None else rows
