"""certify's entrywise-max radii against the exact MILP answer on tiny ReLU MLPs.

``tests/support/milp_oracle.py`` computes the exact minimal ``||D||_max`` of one dense layer that
changes the class (THEORY.md section 4 reduction + a mixed-integer program). Checked here:

* the certificate is sound and the witness real: ``lower <= exact <= upper`` (1e-6 rel);
* last layer: ``lower == upper == exact ==`` the closed form ``min_j m_j / (2 ||h~||_1)``;
* the oracle itself, in torch and independently of its encoding: the logits tie at its
  optimal ``z'``; its strictly class-changing point, turned into a weight perturbation ``D``,
  changes the class in a forward pass of the whole network with ``W + D``; and no attack in
  ``z``-space inside ``0.999`` times its box changes the class.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from milp_oracle import exact_max_radius, perturbation, tiny_mlp
from torch import nn

from certify.capture.export import capture
from certify.graph.graph import Graph
from certify.radii.radius import layer_radii

RTOL = 1e-6


@st.composite
def problems(draw):
    """A tiny MLP (random or briefly trained), three inputs and whether the bias moves."""
    inputs = draw(st.integers(2, 4))
    widths = draw(st.lists(st.integers(2, 6), min_size=1, max_size=2))
    seed = draw(st.integers(0, 2**31 - 1))
    model = tiny_mlp(inputs, widths, draw(st.integers(2, 3)), seed,
                     slope=draw(st.sampled_from([0.0, 0.0, 0.1])), trained=draw(st.booleans()))
    x = torch.randn(3, inputs, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    return capture(model, x), x, draw(st.booleans())


@settings(max_examples=20, deadline=None)
@given(problems())
def test_certificate_and_witness_bracket_the_exact_radius(problem):
    net, x, bias = problem
    for index in net.affine_indices:
        r = layer_radii(net, x, index, "max", bias)
        lower, upper = r.lower.numpy(), r.upper.numpy()
        exact = exact_max_radius(net, x, index, bias, cap=r.upper)
        # A class-changing perturbation of norm upper exists, so the search must succeed.
        assert np.all(exact.exact[np.isfinite(upper)])
        assert np.all(lower <= exact.rho * (1 + RTOL)), (
            f"layer {r.layer}: certificate {lower} above the exact radius {exact.rho}")
        assert np.all(exact.rho <= upper * (1 + RTOL)), (
            f"layer {r.layer}: witness norm {upper} below the exact radius {exact.rho}")
        if index == net.affine_indices[-1]:
            logits = net(x).numpy()
            top = logits.max(axis=1, keepdims=True)
            runner_up = np.sort(logits, axis=1)[:, -2]
            with np.errstate(divide="ignore"):  # h~ = 0: radius inf, as certify says
                closed = (top[:, 0] - runner_up) / (2 * exact.scale)
            for value in (exact.rho, lower, upper):
                np.testing.assert_allclose(value, closed, rtol=RTOL)


def test_bracket_on_a_found_counterexample():
    """A trained 2-2-2-3 ReLU net on which a working-tree CROWN change once certified
    ``lower = 14.29 > exact = 13.81`` at layer 1 (the MILP's perturbation flips the class)."""
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(112899910), dtype=torch.float64)
    net = capture(tiny_mlp(2, [2, 2], 3, 112899909, trained=True), x)
    first = net.affine_indices[0]
    r = layer_radii(net, x, first, "max", False)
    exact = exact_max_radius(net, x, first, cap=r.upper)
    assert np.all(r.lower.numpy() <= exact.rho * (1 + RTOL))
    assert np.all(exact.rho <= r.upper.numpy() * (1 + RTOL))


def _margins(net: Graph, index: int, z: torch.Tensor, y: torch.Tensor,
             values: list[torch.Tensor]) -> torch.Tensor:
    """``o_y - max_{j != y} o_j`` of the graph downstream of layer ``index`` at ``z``, the
    other nodes holding ``values`` (one row per row of ``z``)."""
    logits = net.run(index, z, values)
    other = logits.scatter(-1, y[:, None], -torch.inf).amax(-1)
    return logits.gather(-1, y[:, None])[:, 0] - other


def _rows(values: list[torch.Tensor], rows) -> list[torch.Tensor]:
    return [v[rows] for v in values]


def _box_attack(net, index, z, y, radius, values, steps=60) -> torch.Tensor:
    """Smallest margin found in ``|dz|_inf <= radius``: signed PGD from random starts, plus
    every vertex when the box is small enough to enumerate; ``values``: every node's value
    on the inputs."""
    m = z.shape[1]
    worst = torch.full((len(z),), torch.inf, dtype=z.dtype)
    if m <= 6:  # a ReLU net's margin is not concave: vertices catch what PGD misses
        vertices = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=z.dtype)] * m)
        vertices = vertices.reshape(-1, m)
        for b in range(len(z)):
            points = z[b] + radius[b] * vertices
            worst[b] = _margins(net, index, points, y[b].expand(len(points)),
                                _rows(values, torch.full((len(points),), b))).min()
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        dz = (2 * torch.rand(z.shape, generator=generator, dtype=z.dtype) - 1) * radius[:, None]
        for _ in range(steps):
            dz.requires_grad_(True)
            (grad,) = torch.autograd.grad(_margins(net, index, z + dz, y, values).sum(), dz)
            with torch.no_grad():
                dz = dz - 0.1 * radius[:, None] * torch.sign(grad)
                dz = torch.maximum(torch.minimum(dz, radius[:, None]), -radius[:, None])
        with torch.no_grad():
            worst = torch.minimum(worst, _margins(net, index, z + dz, y, values))
    return worst


@settings(max_examples=12, deadline=None)
@given(problems())
def test_oracle_optimum_is_a_real_class_change(problem):
    net, x, bias = problem
    y = net(x).argmax(-1)
    values = net.values(x)
    for index in net.affine_indices:
        exact = exact_max_radius(net, x, index, bias)
        ok = torch.from_numpy(exact.exact & np.isfinite(exact.rho))
        z, h = values[index], values[net.input_of(index)]
        # The optimum lies on the decision boundary of the torch forward pass: o_y = o_j.
        boundary = torch.from_numpy(exact.boundary)
        logits = net.run(index, boundary, values)
        j = torch.from_numpy(exact.target).clamp(min=0)
        tie = logits.gather(-1, y[:, None])[:, 0] - logits.gather(-1, j[:, None])[:, 0]
        tolerance = 1e-7 * (1 + net(x).abs().amax(-1))
        assert torch.all(tie.abs()[ok] <= tolerance[ok])
        box = (boundary - z).abs().amax(-1)
        np.testing.assert_allclose(box[ok].numpy(), exact.box[ok.numpy()], rtol=1e-7, atol=1e-9)
        # Beyond it: a weight perturbation of the whole network that really changes the class.
        assert np.all(np.isfinite(exact.beyond_box[ok.numpy()]))
        D = perturbation(h, torch.from_numpy(exact.beyond) - z, bias)
        layer = net.layer(index)
        W = torch.cat([layer.weight, layer.bias[:, None]], 1) if bias else layer.weight
        h1 = torch.cat([h, torch.ones_like(h[:, :1])], 1) if bias else h
        Z = torch.einsum("bmn,bn->bm", W + D, h1) + (0 if bias else layer.bias)
        assert torch.all(net.run(index, Z, values).argmax(-1)[ok] != y[ok])
        norm = D.abs().amax(dim=(1, 2)).numpy()
        np.testing.assert_allclose(norm[ok], (exact.beyond_box / exact.scale)[ok], rtol=1e-9)
        assert np.all(exact.rho[ok] <= norm[ok] * (1 + 1e-9))
        # And nothing strictly inside the exact box changes the class.
        inside = torch.from_numpy(0.999 * exact.box).where(ok, torch.zeros(len(x)).double())
        assert torch.all(_box_attack(net, index, z, y, inside, values) > 0)


def test_last_layer_program_is_the_closed_form_on_a_fixed_net():
    """One hand-checkable case: o = z' directly, margins (2, 3), ||h||_1 = 3 without bias."""
    model = nn.Sequential(nn.Linear(2, 3)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0], [-1.0, 0.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    index = capture(model, x).affine_indices[0]
    exact = exact_max_radius(model, x, index, cap=torch.tensor([10.0]))
    # logits (3, 1, 1): y = 0, smallest margin 2 (classes 1 and 2), radius 2 / (2 * 3).
    np.testing.assert_allclose(exact.rho, [1 / 3], rtol=1e-9)
    np.testing.assert_allclose(exact.boundary[0, 0], 2.0, rtol=1e-9)


@pytest.mark.parametrize("model,match", [
    (nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)), "ReLU"),
    (nn.Sequential(nn.Linear(2, 3), nn.LeakyReLU(2.0), nn.Linear(3, 2)), "slope"),
])
def test_unsupported_downstream_is_named(model, match):
    x = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        exact_max_radius(model, x, capture(model, x).affine_indices[0])


def test_non_affine_node_is_refused():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(2, 2, dtype=torch.float64)
    relu = capture(model, x).affine_indices[0] + 1
    with pytest.raises(ValueError, match="not an affine layer"):
        exact_max_radius(model, x, relu)


class _ResidualMLP(nn.Module):
    """``fc2(relu(fc1(g)) + g)`` with ``g = relu(fc0(x))``: a residual block whose skip input
    is a constant of the program when ``fc1`` is perturbed and not when ``fc0`` is."""

    def __init__(self, inputs: int, width: int, classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc0, self.fc1 = nn.Linear(inputs, width), nn.Linear(width, width)
        self.fc2 = nn.Linear(width, classes)

    def forward(self, x):
        g = torch.relu(self.fc0(x))
        return self.fc2(torch.relu(self.fc1(g)) + g)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), width=st.integers(2, 4), bias=st.booleans())
def test_bracket_and_real_class_change_through_a_residual_block(seed, width, bias):
    model = _ResidualMLP(3, width, 3, seed).double().eval()
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    net = capture(model, x)
    assert net.layer_names == ["fc0", "fc1", "fc2"]
    values, y = net.values(x), net(x).argmax(-1)
    for index in net.affine_indices:
        r = layer_radii(net, x, index, "max", bias)
        exact = exact_max_radius(net, x, index, bias, cap=r.upper)
        assert np.all(exact.exact[np.isfinite(r.upper.numpy())])
        assert np.all(r.lower.numpy() <= exact.rho * (1 + RTOL))
        assert np.all(exact.rho <= r.upper.numpy() * (1 + RTOL))
        # The oracle's strictly class-changing point is a real weight perturbation.
        ok = torch.from_numpy(exact.exact & np.isfinite(exact.rho)
                              & np.isfinite(exact.beyond_box))
        z, h = values[index], values[net.input_of(index)]
        D = perturbation(h, torch.from_numpy(exact.beyond) - z, bias)
        layer = net.layer(index)
        W = torch.cat([layer.weight, layer.bias[:, None]], 1) if bias else layer.weight
        h1 = torch.cat([h, torch.ones_like(h[:, :1])], 1) if bias else h
        Z = torch.einsum("bmn,bn->bm", W + D, h1) + (0 if bias else layer.bias)
        assert torch.all(net.run(index, Z, values).argmax(-1)[ok] != y[ok])
        # ... and, in the module itself: the weight changed input by input.
        for b in torch.nonzero(ok)[:, 0].tolist():
            changed = _ResidualMLP(3, width, 3, seed).double().eval()
            name = net.nodes[index].name
            with torch.no_grad():
                part = getattr(changed, name)
                part.weight += D[b, :, :part.weight.shape[1]]
                if bias:
                    part.bias += D[b, :, -1]
            assert int(changed(x[b:b + 1]).argmax(-1)) != int(y[b])
