"""Soundness of the per-layer radii: attacks inside ``lower`` never change a class,
witnesses at ``upper`` always do, and the last dense layer is exact (THEORY.md 3 to 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.network import Add, Affine, Network, Save, Swap, UnsupportedModelError
from certify.radius import _columns, _weight, layer_radii, predictions, witness

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, lambda: nn.LeakyReLU(0.1)]


@st.composite
def mlps(draw):
    widths = draw(st.lists(st.integers(2, 12), min_size=1, max_size=3))
    classes = draw(st.integers(2, 5))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    layers, n = [nn.Flatten()], 6
    for w in widths:
        layers += [nn.Linear(n, w), draw(st.sampled_from(ACTIVATIONS))()]
        n = w
    layers.append(nn.Linear(n, classes))
    return nn.Sequential(*layers).double().eval(), (6,)


@st.composite
def cnns(draw):
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    c = draw(st.integers(1, 3))
    pool = draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Identity()]))
    model = nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, stride=draw(st.sampled_from([1, 2]))),
        nn.BatchNorm2d(c), draw(st.sampled_from(ACTIVATIONS))(), pool, nn.Flatten(),
    )
    features = model(torch.zeros(1, 1, 6, 6)).shape[1]
    model.append(nn.Linear(features, draw(st.integers(2, 4))))
    bn = model[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    return model.double().eval(), (1, 6, 6)


class Residual(nn.Module):
    """``main(x) + shortcut(x)``: a residual block (``nn.Identity()`` as the skip)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x):
        return self.main(x) + self.shortcut(x)


@st.composite
def residual_mlps(draw):
    """Linear, activation, then one or two blocks ``[Linear, act, Linear] + skip`` (identity
    or Linear shortcut, the first one possibly nested in an outer identity block), each
    followed by an activation, and the logits layer."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = draw(st.integers(2, 8))
    act = draw(st.sampled_from(ACTIVATIONS))
    layers = [nn.Flatten(), nn.Linear(6, w), act()]
    for _ in range(draw(st.integers(1, 2))):
        shortcut = nn.Linear(w, w) if draw(st.booleans()) else nn.Identity()
        block = Residual(nn.Sequential(nn.Linear(w, w), act(), nn.Linear(w, w)), shortcut)
        if draw(st.booleans()):  # nested: (block(x) + x)
            block = Residual(nn.Sequential(block, act()), nn.Identity())
        layers += [block, act()]
    layers.append(nn.Linear(w, draw(st.integers(2, 4))))
    return nn.Sequential(*layers).double().eval(), (6,)


@st.composite
def residual_cnns(draw):
    """Conv-BN-act, a block ``[Conv-BN-act-Conv] + skip`` (identity, or a 1x1 convolution,
    with stride 2 in both branches when it is drawn), act, pooling, Linear on 1x6x6."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    c = draw(st.integers(1, 3))
    act = draw(st.sampled_from(ACTIVATIONS))
    stride = draw(st.sampled_from([1, 2]))
    shortcut = nn.Conv2d(c, c, 1, stride=stride) if stride == 2 or draw(st.booleans()) \
        else nn.Identity()
    main = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, stride=stride), nn.BatchNorm2d(c), act(),
                         nn.Conv2d(c, c, 3, padding=1))
    model = nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), act(), Residual(main, shortcut), act(),
        draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Identity()])), nn.Flatten(),
    )
    model.append(nn.Linear(model(torch.zeros(1, 1, 6, 6)).shape[1], draw(st.integers(2, 4))))
    for bn in (model[1], main[1]):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return model.double().eval(), (1, 6, 6)


def _apply(layer: Affine, weight, P, bias: bool, out_shape) -> torch.Tensor:
    """The layer's output with a per-input weight ``(B, m, n)`` (the fixed bias added)."""
    Z = torch.matmul(weight, P)
    if not bias:
        Z = Z + layer.bias[:, None]
    return Z.reshape(P.shape[0], *out_shape)


def perturbed_classes(net: Network, x, index, D, bias) -> torch.Tensor:
    """Forward pass with layer ``index``'s weight replaced by ``W + D`` (per input)."""
    layer = net.steps[index]
    states = net.trace_states(x)
    P = _columns(layer, states[index][0], bias)
    Z = _apply(layer, _weight(layer, bias) + D, P, bias, states[index + 1][0].shape[1:])
    return net.run(Z, index + 1, states[index + 1][1]).argmax(-1)


def pgd_attack(net, x, index, radius, norm, bias, steps=40) -> torch.Tensor:
    """Projected gradient descent on the smallest margin over ``||D|| <= radius``."""
    layer = net.steps[index]
    W = _weight(layer, bias)
    y, _ = predictions(net, x)
    states = net.trace_states(x)
    P = _columns(layer, states[index][0], bias)
    out_shape, stack = states[index + 1][0].shape[1:], states[index + 1][1]
    D = (torch.rand(len(x), *W.shape, dtype=W.dtype) - 0.5) * 1e-3
    for _ in range(steps):
        D.requires_grad_(True)
        logits = net.run(_apply(layer, W + D, P, bias, out_shape), index + 1, stack)
        other = logits.scatter(-1, y[:, None], -torch.inf).amax(-1)
        margin = logits.gather(-1, y[:, None])[:, 0] - other
        (grad,) = torch.autograd.grad(margin.sum(), D)
        with torch.no_grad():
            if norm == "fro":
                step = grad / torch.linalg.matrix_norm(grad).clamp_min(1e-300)[:, None, None]
                D = D - 0.25 * radius[:, None, None] * step
                scale = (radius / torch.linalg.matrix_norm(D).clamp_min(1e-300)).clamp(max=1.0)
                D = D * scale[:, None, None]
            else:
                D = D - 0.25 * radius[:, None, None] * torch.sign(grad)
                D = torch.maximum(torch.minimum(D, radius[:, None, None]), -radius[:, None, None])
    return D.detach()


def random_ball(shape, radius, norm) -> torch.Tensor:
    D = torch.randn(*shape, dtype=torch.float64)
    if norm == "fro":
        return D * (radius / torch.linalg.matrix_norm(D))[:, None, None]
    return torch.sign(D) * radius[:, None, None]  # a vertex of the max-norm ball


def certification_problem(model_and_shape, seed: int):
    """The traced network, six random inputs and their predicted classes."""
    model, shape = model_and_shape
    torch.manual_seed(seed)
    net = Network.from_module(model)
    x = torch.randn(6, *shape, dtype=torch.float64)
    return net, x, predictions(net, x)[0]


PROBLEMS = (st.one_of(mlps(), cnns(), residual_mlps(), residual_cnns()),
            st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None)
@given(*PROBLEMS)
def test_attacks_inside_lower_never_change_the_class(model_and_shape, norm, bias, seed):
    net, x, y = certification_problem(model_and_shape, seed)
    for index in net.affine_indices:
        r = layer_radii(net, x, index, norm, bias)
        assert torch.all(r.lower <= r.upper)
        assert torch.all(r.lower >= 0)
        # lower = inf (the layer's input is 0: no weight change moves anything): attack big.
        inside = torch.where(torch.isfinite(r.lower), 0.999 * r.lower, torch.full_like(r.lower, 1e6))
        W = _weight(net.steps[index], bias)
        for D in (pgd_attack(net, x, index, inside, norm, bias),
                  random_ball((len(x), *W.shape), inside, norm)):
            assert torch.equal(perturbed_classes(net, x, index, D, bias), y), (
                f"layer {r.layer}, {norm}: an attack inside 0.999 * lower changed a class"
            )


@settings(max_examples=25, deadline=None)
@given(*PROBLEMS)
def test_witnesses_change_the_class_and_match_upper(model_and_shape, norm, bias, seed):
    net, x, y = certification_problem(model_and_shape, seed)
    for index in net.affine_indices:
        layer = net.steps[index]
        states = net.trace_states(x)
        P = _columns(layer, states[index][0], bias)
        upper, found_witness = witness(net, index, P, y, norm, bias, states[index + 1][0].shape[1:],
                                       stack=states[index + 1][1])
        D = found_witness.matrix()
        found = torch.isfinite(upper)
        changed = perturbed_classes(net, x, index, D, bias) != y
        assert torch.all(changed[found])
        measured = torch.linalg.matrix_norm(D) if norm == "fro" else D.abs().amax(dim=(-2, -1))
        assert torch.allclose(measured[found], upper[found], rtol=1e-12)


@given(mlps(), st.sampled_from(["fro", "max"]), st.booleans())
@settings(max_examples=20, deadline=None)
def test_last_layer_lower_equals_upper(model_and_shape, norm, bias):
    model, shape = model_and_shape
    net = Network.from_module(model)
    x = torch.randn(5, *shape, dtype=torch.float64)
    r = layer_radii(net, x, net.affine_indices[-1], norm, bias)
    assert r.method == "exact"
    np.testing.assert_allclose(r.lower.numpy(), r.upper.numpy(), rtol=1e-8)


@settings(max_examples=10, deadline=None)
@given(cnns())
def test_batchnorm_is_folded_and_outputs_agree(model_and_shape):
    model, shape = model_and_shape
    net = Network.from_module(model)
    x = torch.randn(4, *shape, dtype=torch.float64)
    assert torch.allclose(net(x), model(x), atol=1e-12)
    assert sum(isinstance(s, Affine) for s in net.steps) == 2


@pytest.mark.parametrize("module,match", [
    (nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=-1)), "Softmax is not supported"),
    (nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)), "must follow a Linear or Conv2d"),
    (nn.Sequential(nn.ReLU()), "no Linear or Conv2d"),
])
def test_unsupported_models_are_named(module, match):
    with pytest.raises(UnsupportedModelError, match=match):
        Network.from_module(module)


class _TwoBranches(nn.Module):
    """``combine(relu(a(x)), tanh(b(x)))`` followed by a Linear layer."""

    def __init__(self, combine):
        super().__init__()
        self.a, self.b, self.out, self.combine = nn.Linear(3, 3), nn.Linear(3, 3), \
            nn.Linear(3, 2), combine

    def forward(self, x):
        return self.out(self.combine(torch.relu(self.a(x)), torch.tanh(self.b(x))))


@settings(max_examples=10, deadline=None)
@given(st.one_of(residual_mlps(), residual_cnns()))
def test_residual_models_trace_to_stack_steps_that_compute_the_model(model_and_shape):
    model, shape = model_and_shape
    net = Network.from_module(model)
    x = torch.randn(4, *shape, dtype=torch.float64)
    assert torch.allclose(net(x), model(x), atol=1e-12)
    kinds = [type(s) for s in net.steps]
    assert kinds.count(Save) == kinds.count(Swap) == kinds.count(Add) >= 1
    # Every affine module appears once (BatchNorm folded), and a run from the middle of a
    # block with the saved stack gives the same logits.
    modules = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(net.affine_indices) == len(modules)
    states = net.trace_states(x)
    for i, (value, stack) in enumerate(states):
        assert torch.allclose(net.run(value, i, stack), states[-1][0], atol=1e-12)


def test_residual_forms_and_their_limits():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    for combine in (lambda a, b: a + b, torch.add, lambda a, b: a.add(b), lambda a, b: a + a):
        model = _TwoBranches(combine).double()
        assert torch.allclose(Network.from_module(model)(x), model(x), atol=1e-12)
    for combine, match in ((lambda a, b: torch.cat([a, b], 1)[:, :3], r"cat takes 2 tensors"),
                           (lambda a, b: a * b, r"mul takes 2 tensors"),
                           (lambda a, b: a + 1, r"only additions of two tensors"),
                           (lambda a, b: torch.add(a, b, alpha=2), r"only additions of two")):
        with pytest.raises(UnsupportedModelError, match=match) as error:
            Network.from_module(_TwoBranches(combine))
        assert "not supported yet" not in str(error.value)

    class LogitsAdded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.raises(UnsupportedModelError, match="logits come out of a residual addition"):
        Network.from_module(LogitsAdded())

    class Crossing(nn.Module):  # q is used inside the block r and after it: no nesting
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            p = self.a(x)
            q = self.b(p)
            return self.c((q + p) + q)

    with pytest.raises(UnsupportedModelError, match="used both inside and after"):
        Network.from_module(Crossing())


@settings(max_examples=15, deadline=None)
@given(*PROBLEMS)
def test_local_bound_is_never_below_the_global_bound(model_and_shape, norm, bias, seed):
    net, x, _ = certification_problem(model_and_shape, seed)
    for index in net.affine_indices[:-1]:
        r = layer_radii(net, x, index, norm, bias)
        assert torch.all(r.lower_local >= r.lower_global)
