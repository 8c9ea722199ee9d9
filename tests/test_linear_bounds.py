"""Interval and CROWN-style margin bounds never exceed margins sampled inside the region,
and the numpy checker recomputes the same bounds."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.linear_bounds import margin_lower_bounds
from certify.network import Network
from test_radius_soundness import cnns, mlps

PROBLEMS = (st.one_of(mlps(), cnns()), st.booleans(), st.floats(1e-3, 2.0),
            st.integers(0, 2**31 - 1))


def regions(model_and_shape, use_ball: bool, size: float, seed: int, count: int = 4):
    """For each hidden affine layer: the network, ``z``, classes, box, ball and the interval
    of every downstream step's input over the region."""
    model, shape = model_and_shape
    torch.manual_seed(seed)
    net = Network.from_module(model)
    x = torch.randn(count, *shape, dtype=torch.float64)
    y = net(x).argmax(-1)
    values = net.trace(x)
    for index in net.affine_indices[:-1]:
        z = values[index + 1]
        radius = torch.full_like(z, size)
        ball = torch.full((len(z),), size, dtype=z.dtype) if use_ball else None
        lo, hi, inputs = z - radius, z + radius, []
        for step in net.steps[index + 1:-1]:
            inputs.append((lo, hi))
            lo, hi = step.interval(lo, hi)
        yield net, index, z, y, radius, ball, inputs


def margins(net: Network, start: int, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    o = net.run(z, start)
    return o.gather(-1, y[:, None]) - o


@settings(max_examples=30, deadline=None)
@given(*PROBLEMS)
def test_crown_bounds_hold_at_sampled_points(model_and_shape, use_ball, size, seed):
    for net, index, z, y, radius, ball, inputs in regions(model_and_shape, use_ball, size, seed):
        bound = margin_lower_bounds(net, index + 1, z, inputs, y, radius, ball)
        for _ in range(20):
            delta = (2 * torch.rand_like(z) - 1) * radius
            if use_ball:  # a point of the ball (which lies inside the box)
                flat = delta.reshape(len(z), -1)
                delta = (flat / flat.norm(dim=-1, keepdim=True) * size *
                         torch.rand(len(z), 1, dtype=z.dtype) ** 0.1).reshape(z.shape)
            sampled = margins(net, index + 1, z + delta, y)
            assert torch.all(bound <= sampled + 1e-9 * (1 + sampled.abs())), (
                f"layer {index}: a margin bound exceeds a sampled margin"
            )


@settings(max_examples=20, deadline=None)
@given(*PROBLEMS)
def test_numpy_checker_recomputes_the_same_bounds(model_and_shape, use_ball, size, seed):
    from certify.check import linear_lower

    for net, index, z, y, radius, ball, inputs in regions(model_and_shape, use_ball, size,
                                                           seed, count=3):
        ours = margin_lower_bounds(net, index + 1, z, inputs, y, radius, ball)
        theirs = linear_lower(net, index + 1, z.numpy(),
                              [(a.numpy(), b.numpy()) for a, b in inputs], y.numpy(),
                              radius.numpy(), None if ball is None else ball.numpy())
        finite = torch.isfinite(ours)
        assert torch.allclose(ours[finite], torch.from_numpy(theirs)[finite], rtol=1e-9, atol=1e-9)
