"""Optimised ReLU slopes (``certify.bounds.slopes``): the lines they give hold at attacked
points of the region, never fall below CROWN's on the same boxes, the codes round-trip, and
the numpy checker recomputes the same bounds from the codes. The teeth: a lower slope outside
``[s, 1]`` is caught by the same sampling the rule passes (the rule clips it back)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import cnns, deep_cnns, mlps, residual_mlps
from sampled_bounds import attacked_margins, regions, tolerance
from torch import nn

from certify.bounds import slopes
from certify.bounds.linear import boxes_and_reach, class_rows, crown_line, lines_on
from certify.check.bounds import local_lower_bounds
from certify.check.forward import NumpyGraph
from certify.graph.operators.activation import Activation
from certify.radii.local_search import region as section4_region

RELUS = [nn.ReLU, lambda: nn.LeakyReLU(0.2)]
PROBLEMS = (st.one_of(mlps(activations=RELUS), cnns(), deep_cnns(), residual_mlps()),
            st.sampled_from(["fro", "max"]), st.booleans(), st.floats(1e-2, 2.0),
            st.integers(0, 2**31 - 1))


def optimised(net, index, region, rho, y, values, refine, ball, steps=8):
    """Boxes at ``rho`` (refined with CROWN's adaptive lines too, when ``refine``), the
    codes of ``steps`` optimisation steps, and the lines on them."""
    boxes, reach = boxes_and_reach(net, index, region, rho, values, refine=refine,
                                   adaptive=refine)
    balls = {i: (values[i], r) for i, r in reach.items()} if ball else None
    codes = slopes.optimise(net, index, region, rho, y, values, boxes, balls, steps)
    alphas = {i: slopes.decode(c) for i, c in codes.items()}
    return boxes, reach, codes, lines_on(net, index, region, y, values, boxes, reach, ball,
                                         alphas=alphas)


@settings(max_examples=20, deadline=None)
@given(*PROBLEMS)
def test_optimised_lines_hold_at_attacked_points(model_and_shape, norm, refine, size, seed):
    generator = torch.Generator().manual_seed(seed)
    for net, index, region, y, values in regions(model_and_shape, norm, size, seed):
        rho = torch.ones(len(region.z), dtype=torch.float64)
        *_, lines = optimised(net, index, region, rho, y, values, refine, norm == "fro")
        for smaller in (rho, rho * 0.3):
            bound = lines.lower(smaller)
            attacked = attacked_margins(net, index, region, smaller, y, values, generator)
            assert torch.all(bound <= attacked + tolerance(attacked)), (
                f"layer {index}: an optimised margin bound exceeds an attacked margin")


@settings(max_examples=20, deadline=None)
@given(*PROBLEMS)
def test_optimised_bound_never_below_crowns(model_and_shape, norm, refine, size, seed):
    for net, index, region, y, values in regions(model_and_shape, norm, size, seed):
        rho = torch.full((len(region.z),), 0.5, dtype=torch.float64)
        ball = norm == "fro"
        boxes, reach, codes, _ = optimised(net, index, region, rho, y, values, refine, ball)
        C = class_rows(net, y)
        balls = {i: (values[i], r) for i, r in reach.items()} if ball else None
        plain = crown_line(net, index, region, C, values, boxes, balls)
        ours = crown_line(net, index, region, C, values, boxes, balls,
                          {i: slopes.decode(c) for i, c in codes.items()})
        at = [v - rho[:, None] * s for v, s in (plain, ours)]
        assert torch.all(at[1] >= at[0]), "the rounded optimised slopes loosened a row"
        for i, c in codes.items():  # stable entries keep CROWN's code
            lo, hi = boxes[net.nodes[i].inputs[0]]
            stable = ~((lo < 0) & (hi > 0))[:, None].expand_as(c)
            assert torch.all(c[stable] == slopes.ADAPTIVE)


def test_optimisation_raises_the_bound_of_a_deep_relu_net():
    """On a deep ReLU MLP, where CROWN's fixed slopes compound, the optimised bound at the
    same radius is higher for most rows (the optimiser is not a no-op)."""
    torch.manual_seed(3)
    layers = [nn.Linear(8, 16), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(16, 5)).double().eval()
    for net, index, region, y, values in regions((model, (8,)), "max", 0.3, 0, count=4):
        if index != net.affine_indices[0]:
            continue
        rho = torch.ones(len(y), dtype=torch.float64)
        boxes, reach = boxes_and_reach(net, index, region, rho, values, refine=True)
        C = class_rows(net, y)
        codes = slopes.optimise(net, index, region, rho, y, values, boxes, None, 20)
        plain = crown_line(net, index, region, C, values, boxes, None)
        ours = crown_line(net, index, region, C, values, boxes, None,
                          {i: slopes.decode(c) for i, c in codes.items()})
        gain = (ours[0] - rho[:, None] * ours[1]) - (plain[0] - rho[:, None] * plain[1])
        assert (gain > 1e-6).float().mean() > 0.5


def test_codes_round_trip():
    alpha = torch.linspace(0, 1, 255, dtype=torch.float64)
    unstable = torch.ones_like(alpha, dtype=torch.bool)
    codes = slopes.encode(alpha, unstable)
    assert codes.dtype == torch.uint8 and int(codes.max()) == slopes.CODE_STEPS
    assert torch.all((slopes.decode(codes) - alpha).abs() <= 0.5 / slopes.CODE_STEPS + 1e-15)
    assert torch.all(slopes.decode(slopes.encode(alpha, ~unstable)) == -1)


@settings(max_examples=15, deadline=None)
@given(*PROBLEMS)
def test_numpy_checker_recomputes_the_optimised_bounds(model_and_shape, norm, refine, size,
                                                      seed):
    model, shape = model_and_shape
    x = torch.randn(3, *shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    for net, index, _, y, values in regions(model_and_shape, norm, size, seed):
        values = net.values(x)
        y = values[-1].argmax(-1)
        layer = net.layer(index)
        P = layer.patches(values[net.input_of(index)])
        where = section4_region(layer, values[index], P, norm)
        rho = torch.full((len(y),), 0.7, dtype=torch.float64)
        *_, codes, lines = optimised(net, index, where, rho, y, values, refine, norm == "fro")
        ours = lines.lower(rho)
        alphas = {i: np.where(c.numpy() == 255, -1.0, c.numpy() / 254) for i, c in codes.items()}
        theirs = local_lower_bounds(NumpyGraph.of(net), index, [v.numpy() for v in values],
                                    P.numpy(), rho.numpy(), y.numpy(), norm, refine,
                                    ball=norm == "fro", alphas=alphas, adaptive=refine)
        mask = np.ones(theirs.shape, dtype=bool)
        mask[np.arange(len(y)), y.numpy()] = False
        np.testing.assert_allclose(ours.numpy()[mask], theirs[mask], rtol=1e-7,
                                   atol=1e-9 * np.abs(theirs[mask]).max())


@given(st.floats(-3, -0.01), st.floats(0.01, 3), st.sampled_from([0.0, 0.2]),
       st.floats(-0.5, 1.5))
def test_any_alpha_gives_a_line_below_the_activation(lo, hi, negative, alpha):
    """Sampled on the box, ``phi(x) >= a x`` for the rule's slope ``a`` whatever ``alpha``
    (clipped into ``[s, 1]``); the unclipped slope ``s + (1 - s) alpha`` outside ``[s, 1]``
    fails the same sampling (the teeth)."""
    op = Activation("leaky_relu", negative) if negative else Activation("relu")
    box = (torch.tensor([[lo]], dtype=torch.float64), torch.tensor([[hi]], dtype=torch.float64))
    A = torch.ones(1, 1, 1, dtype=torch.float64)
    (rows,), _, _ = op.backward(A, [box], True, alpha=torch.full_like(A, alpha))
    x = torch.linspace(lo, hi, 201, dtype=torch.float64)
    assert torch.all(op(x) >= rows[0, 0, 0] * x - 1e-12)
    raw = negative + (1 - negative) * alpha
    if raw > 1 + 1e-9 or raw < negative - 1e-9:
        assert not torch.all(op(x) >= raw * x - 1e-12)
