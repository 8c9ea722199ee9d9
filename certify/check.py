"""Independent check of a certificate, in numpy float64 (not the torch path that made it).

Every claim is recomputed from the model's weights and the data:

* predictions: a numpy forward pass;
* ``upper``: the stored witness ``D`` is applied in a numpy forward pass with the weights
  ``W + D``; the class must change, and ``||D||`` must equal the claim;
* ``lower``, last dense layer: the exact class-pair formula (THEORY.md section 3);
* ``lower``, other layers: confirmed if the numpy global Lipschitz bound (section 5) reaches
  it, or if numpy interval propagation (intersected with an l2 ball) certifies the
  section-4 region of that radius;
* ``lower <= upper``; thresholds: the numpy compression error at the claimed level must be
  below the layer's smallest ``lower``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf

from certify.lipschitz import patch_overlap
from certify.network import GELU_ARGMIN, GELU_FLOOR, Activation, Affine, Flatten, Network, Pool

SLACK = 1e-9  # relative tolerance for equalities between two float64 computations


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


def forward(network: Network, x: np.ndarray, start: int = 0) -> np.ndarray:
    for step in network.steps[start:]:
        if isinstance(step, Affine):
            P, spatial = columns(step, x, False)
            x = affine(step, P, spatial, step.matrix.numpy(), False)
        elif isinstance(step, Activation):
            x = _activation(step, x)
        elif isinstance(step, Flatten):
            x = x.reshape(len(x), -1)
        else:
            x = _pool(step, x)
    return x


def layer_inputs(network: Network, x: np.ndarray) -> list[np.ndarray]:
    values = [x]
    for i in range(len(network.steps)):
        values.append(forward(Network(network.steps[i:i + 1]), values[-1]))
    return values


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


def global_lower(network: Network, index: int, P, y, margins, norm: str) -> np.ndarray:
    W = network.steps[-1].weight.numpy()
    ord = 2 if norm == "fro" else 1
    rows = np.linalg.norm(W[y][:, None, :] - W[None], ord=ord, axis=-1) * (1 + W.shape[1] * 1e-15)
    lip = math.prod(_lipschitz(s, norm) for s in network.steps[index + 1:-1])
    scale = _region_scale(P, norm)
    if norm == "max":
        scale = scale.max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(np.isfinite(margins), margins / (rows * lip), np.inf)
    return bound.min(axis=-1) / scale


def interval_certified(network: Network, index: int, z: np.ndarray, P, rho: np.ndarray,
                       y: np.ndarray, norm: str) -> np.ndarray:
    """Numpy IBP (with an l2 ball for Frobenius) over the section-4 region of radius ``rho``."""
    scale = _region_scale(P, norm)
    if norm == "fro":
        radius = np.broadcast_to((rho * scale).reshape(-1, *[1] * (z.ndim - 1)), z.shape)
        ball = rho * scale
    else:
        r = rho[:, None] * scale  # (B, L)
        radius = np.broadcast_to(r[:, None, :], (len(z), z.shape[1], r.shape[1])).reshape(z.shape)
        ball = None
    lo, hi = z - radius, z + radius
    nominal = z  # the l2 ball is centred on the unperturbed point
    inputs, region_ball = [], ball
    for step in network.steps[index + 1:-1]:
        inputs.append((lo, hi))
        if ball is not None:
            nominal = forward(Network((step,)), nominal)
        if isinstance(step, Affine):
            center, rad = (lo + hi) / 2, (hi - lo) / 2
            Pc, spatial = columns(step, center, False)
            Pr, _ = columns(step, rad, False)
            c = affine(step, Pc, spatial, step.matrix.numpy(), False)
            zero_bias = Affine(step.name, step.weight, step.bias * 0)
            width = affine(zero_bias, Pr, spatial, np.abs(step.matrix.numpy()), False) * (1 + 1e-12)
            lo, hi = c - width, c + width
            if ball is not None:
                rows = np.linalg.norm(step.matrix.numpy(), axis=1) * (1 + step.matrix.shape[1] * 1e-15)
                rows = rows[:, None, None] if step.is_conv else rows
                reach = rows * ball.reshape(-1, *[1] * (c.ndim - 1)) * (1 + 1e-12)
                lo, hi = np.maximum(lo, nominal - reach), np.minimum(hi, nominal + reach)
        elif isinstance(step, Activation) and step.kind == "gelu":
            a, b = _activation(step, lo), _activation(step, hi)
            inside = (lo <= GELU_ARGMIN) & (hi >= GELU_ARGMIN)
            lo, hi = np.where(inside, GELU_FLOOR, np.minimum(a, b)), np.maximum(a, b)
        elif isinstance(step, Activation):
            lo, hi = _activation(step, lo), _activation(step, hi)
        elif isinstance(step, Flatten):
            lo, hi = lo.reshape(len(lo), -1), hi.reshape(len(hi), -1)
        else:
            lo, hi = _pool(step, lo), _pool(step, hi)
        if ball is not None:
            ball = ball * _lipschitz(step, "fro")
    last = network.steps[-1]
    W, b = last.weight.numpy(), last.bias.numpy()
    C = W[y][:, None, :] - W[None]
    center, rad = (hi + lo) / 2, (hi - lo) / 2
    value = np.einsum("bcn,bn->bc", C, center) + (b[y][:, None] - b[None])
    lower = value - np.einsum("bcn,bn->bc", np.abs(C), rad)
    if ball is not None:  # Cauchy-Schwarz around the unperturbed point
        at_nominal = np.einsum("bcn,bn->bc", C, nominal) + (b[y][:, None] - b[None])
        lower = np.maximum(lower, at_nominal - np.linalg.norm(C, axis=-1) * ball[:, None]
                           * (1 + 1e-12))
    lower = np.maximum(lower, linear_lower(network, index + 1, z, inputs, y, radius, region_ball))
    tol = 1e-10 * (np.einsum("bcn,bn->bc", np.abs(C), np.abs(center) + rad) + np.abs(b).max())
    ok = lower > tol
    ok[np.arange(len(y)), y] = True
    return ok.all(axis=-1)


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


def linear_lower(network: Network, start: int, z: np.ndarray, inputs, y: np.ndarray,
                 radius: np.ndarray, ball) -> np.ndarray:
    """Numpy CROWN-style margin lower bounds (the method of ``certify.linear_bounds``)."""
    W, b = network.steps[-1].weight.numpy(), network.steps[-1].bias.numpy()
    A = W[y][:, None, :] - W[None]
    d = b[y][:, None] - b[None]
    B, C = A.shape[:2]
    for step, (lo, hi) in zip(reversed(network.steps[start:-1]), reversed(inputs)):
        if isinstance(step, Affine):
            bias = step.bias.numpy()
            if step.is_conv:
                d = d + (A * bias[:, None, None]).reshape(B, C, -1).sum(-1)
                cols = np.einsum("km,bcml->bckl", step.matrix.numpy(), A.reshape(B, C, A.shape[2], -1))
                A = _fold(cols.reshape(B * C, cols.shape[2], -1), lo.shape[1:], step)
                A = A.reshape(B, C, *lo.shape[1:])
            else:
                d = d + A @ bias
                A = A @ step.weight.numpy()
        elif isinstance(step, Activation) and step.kind in ("relu", "leaky_relu"):
            negative = step.slope if step.kind == "leaky_relu" else 0.0
            unstable = (lo < 0) & (hi > 0)
            f_lo, f_hi = _activation(step, lo), _activation(step, hi)
            chord = np.where(unstable, (f_hi - f_lo) / np.where(unstable, hi - lo, 1.0), 0.0)
            stable = np.where(lo >= 0, 1.0, negative)
            s_upper = np.where(unstable, chord, stable)
            b_upper = np.where(unstable, f_lo - chord * lo + 1e-12 * (abs(f_lo) + abs(f_hi)), 0.0)
            s_lower = np.where(unstable, np.where(hi >= -lo, 1.0, negative), stable)
            positive, negative_part = np.clip(A, 0, None), np.clip(A, None, 0)
            d = d + (negative_part * b_upper[:, None]).reshape(B, C, -1).sum(-1)
            A = positive * s_lower[:, None] + negative_part * s_upper[:, None]
        elif isinstance(step, Flatten):
            A = A.reshape(B, C, *lo.shape[1:])
        elif isinstance(step, Pool) and step.kind == "avg":
            k, s, p = step.kernel, step.stride, step.padding
            pool = SimpleNamespace(weight=np.zeros((1, 1, k, k)), padding=(p, p), stride=(s, s),
                                   dilation=(1, 1))
            cols = np.repeat(A.reshape(B * C * A.shape[2], 1, -1), k * k, axis=1) / (k * k)
            A = _fold(cols, (1, *lo.shape[2:]), pool).reshape(B, C, *lo.shape[1:])
        else:  # constant interval bounds, as in certify.linear_bounds
            f_lo, f_hi = forward(Network((step,)), lo), forward(Network((step,)), hi)
            low, high = np.minimum(f_lo, f_hi), np.maximum(f_lo, f_hi)
            if isinstance(step, Activation) and step.kind == "gelu":
                low = np.where((lo <= GELU_ARGMIN) & (hi >= GELU_ARGMIN), GELU_FLOOR, low)
            return d + (np.clip(A, 0, None) * low[:, None] + np.clip(A, None, 0)
                        * high[:, None]).reshape(B, C, -1).sum(-1)
    flat = A.reshape(B, C, -1)
    value = np.einsum("bcn,bn->bc", flat, z.reshape(B, -1)) + d
    box = value - np.einsum("bcn,bn->bc", np.abs(flat), radius.reshape(B, -1))
    if ball is None:
        return box
    return np.maximum(box, value - np.linalg.norm(flat, axis=-1) * ball[:, None])


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
    values = layer_inputs(network, x)
    logits = values[-1]
    y = logits.argmax(axis=1)
    report.claim(list(y) == document["predictions"], "predictions differ from a numpy forward")
    margins = logits[np.arange(len(y)), y][:, None] - logits
    margins[np.arange(len(y)), y] = np.inf
    affine_steps = network.affine_indices
    if [network.steps[i].name for i in affine_steps] != [e["name"] for e in document["layers"]]:
        report.claim(False, "the certificate's layers do not match the model's")
        return report
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
                flipped = forward(network, Z, index + 1).argmax(axis=1) != y
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
                    certified = interval_certified(network, index, values[index + 1][rest],
                                                   P[rest], lower[rest], y[rest], norm)
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
