"""CROWN-style linear bounds on the margins of the network downstream of a layer.

THEORY.md section 4 reduces a layer's weight robustness to the input robustness of the
downstream network at ``z``; this module bounds that network's margins
``m_j = (e_y - e_j)^T o`` from below over a region around ``z``.

Backward pass. Start from the linear function ``m_j = c_j^T W_L a + c_j^T b_L`` of the
last activations and walk back: an affine step is substituted exactly
(``A a_out = A W a_in + A b``); a ReLU or LeakyReLU with pre-activation interval ``[l, u]``
is replaced by a line below it (slope ``1`` or the negative slope, for positive
coefficients) and the chord above it (for negative coefficients); average pooling and
flattening are linear; any other step (tanh, sigmoid, GELU, max pooling) contributes its
interval bounds as constants. The result is ``m_j >= A_j z' + d_j`` for every ``z'`` in the
region, minimised in closed form over the l2 ball (``A_j z - ||A_j||_2 rho``) and over the
box (``A_j z - |A_j| r``).
"""

from __future__ import annotations

import torch

from certify.network import Activation, Affine, Flatten, Network, Pool

ROUND = 1e-12  # relative slack added to the chord's intercept for rounding


def _adjoint(linear, A: torch.Tensor, in_shape) -> torch.Tensor:
    """``A L`` for a linear map ``L``, with ``A`` of shape ``(B, C, *out)``."""
    B, C = A.shape[:2]
    x = torch.zeros(B * C, *in_shape, dtype=A.dtype, requires_grad=True)
    out = linear(x)
    (grad,) = torch.autograd.grad(out, x, grad_outputs=A.reshape(B * C, *out.shape[1:]))
    return grad.reshape(B, C, *in_shape)


def _relu_lines(step: Activation, lo: torch.Tensor, hi: torch.Tensor):
    """Slopes and intercepts of lines below (``s_l x``) and above (``s_u x + b_u``) phi."""
    negative = step.slope if step.kind == "leaky_relu" else 0.0
    unstable = (lo < 0) & (hi > 0)
    f_lo, f_hi = step(lo), step(hi)
    width = torch.where(unstable, hi - lo, torch.ones_like(lo))
    chord = torch.where(unstable, (f_hi - f_lo) / width, torch.zeros_like(lo))
    stable_slope = torch.where(lo >= 0, torch.ones_like(lo), torch.full_like(lo, negative))
    s_upper = torch.where(unstable, chord, stable_slope)
    b_upper = torch.where(unstable, f_lo - chord * lo + ROUND * (f_lo.abs() + f_hi.abs()),
                          torch.zeros_like(lo))
    s_lower = torch.where(unstable, torch.where(hi >= -lo, torch.ones_like(lo),
                                                torch.full_like(lo, negative)), stable_slope)
    return s_lower, s_upper, b_upper


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape[:2], -1).sum(-1)


def margin_lower_bounds(network: Network, start: int, z: torch.Tensor,
                        inputs: list[tuple[torch.Tensor, torch.Tensor]], y: torch.Tensor,
                        radius: torch.Tensor, ball: torch.Tensor | None) -> torch.Tensor:
    """Lower bounds ``(B, C)`` of every margin over the region around ``z``.

    ``inputs[i]`` is an interval ``(lo, hi)`` containing the input of step ``start + i``
    over the region (from interval propagation); ``radius`` the box and ``ball`` (optional)
    the l2 radius of the region in ``z``.
    """
    last = network.steps[-1]
    W, b = last.weight, last.bias
    A = W[y][:, None, :] - W[None, :, :]  # (B, C, n)
    d = b[y][:, None] - b[None, :]
    steps = network.steps[start:-1]
    for step, (lo, hi) in zip(reversed(steps), reversed(inputs)):
        if isinstance(step, Affine):
            bias = step.bias.reshape(-1, *[1] * (A.ndim - 3)) if step.is_conv else step.bias
            d = d + _sum(A * bias)
            if step.is_conv:
                conv = Affine(step.name, step.weight, torch.zeros_like(step.bias), step.stride,
                              step.padding, step.dilation)
                A = _adjoint(conv, A, lo.shape[1:])
            else:
                A = A @ step.weight
        elif isinstance(step, Activation) and step.kind in ("relu", "leaky_relu"):
            s_lower, s_upper, b_upper = _relu_lines(step, lo, hi)
            positive, negative = A.clamp(min=0), A.clamp(max=0)
            d = d + _sum(negative * b_upper[:, None])
            A = positive * s_lower[:, None] + negative * s_upper[:, None]
        elif isinstance(step, Flatten):
            A = A.reshape(*A.shape[:2], *lo.shape[1:])
        elif isinstance(step, Pool) and step.kind == "avg":
            A = _adjoint(step, A, lo.shape[1:])
        else:  # no linear relaxation here: the step's output interval as a constant
            low, high = step.interval(lo, hi)
            return d + _sum(A.clamp(min=0) * low[:, None] + A.clamp(max=0) * high[:, None])
    flat = A.reshape(*A.shape[:2], -1)
    value = torch.einsum("bcn,bn->bc", flat, z.reshape(len(z), -1)) + d
    box = value - torch.einsum("bcn,bn->bc", flat.abs(), radius.reshape(len(z), -1))
    if ball is None:
        return box
    return torch.maximum(box, value - torch.linalg.vector_norm(flat, dim=-1) * ball[:, None])
