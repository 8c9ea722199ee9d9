"""Radii certified with optimised ReLU slopes (``layer_radii(optimise=)``): attacks inside
``lower`` never change a class and the witnesses at ``upper`` do (the teeth), and no radius
falls below the defaults'."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import certification_problem, cnns, mlps, residual_mlps
from torch import nn
from weight_attacks import assert_attacks_inside_fail, assert_witness_flips

from certify.capture.export import capture
from certify.graph.inputs import InputError
from certify.radii.radius import layer_radii

RELUS = [nn.ReLU, lambda: nn.LeakyReLU(0.2)]


@settings(max_examples=8, deadline=None)
@given(st.one_of(mlps(activations=RELUS), cnns(), residual_mlps()),
       st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_optimised_radii_are_sound_and_never_below_the_defaults(model_and_shape, norm, bias,
                                                                seed):
    net, x, y = certification_problem(model_and_shape, seed)
    for index in net.affine_indices[:-1]:
        r = layer_radii(net, x, index, norm, bias, optimise=5)
        default = layer_radii(net, x, index, norm, bias)
        assert torch.all(r.lower >= default.lower)
        assert torch.all(r.lower <= r.upper)
        assert ("optimised" in r.method) == bool(r.slopes)
        assert_attacks_inside_fail(net, x, y, index, r, norm, bias, from_witness=True)
        assert_witness_flips(net, x, y, index, r, bias)


@pytest.mark.parametrize("steps", [-1, 2.5, True, "20"])
def test_a_bad_step_count_is_refused(steps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    net = capture(model, x)
    with pytest.raises(InputError, match="optimise must be a number of steps"):
        layer_radii(net, x, net.affine_indices[0], "fro", optimise=steps)
