"""All layers perturbed at once (THEORY.md section 5): attacks on every affine layer inside
the certified budgets never change a class, the recursion is attained on width-one chains,
it reduces to the single-layer global Lipschitz bound, and the numpy checker agrees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import (ACTIVATIONS, certification_problem, cnns, dags, mlps, residual_cnns,
                      residual_mlps)
from torch import nn
from weight_attacks import attacks, layer_weight, perturbed_logits

from certify.check import claims as check
from certify.capture.export import capture
from certify.graph.graph import Graph
from certify.radii.multilayer import PRECISION, multilayer_bound, uniform_budget
from certify.check.forward import NumpyGraph
from certify.radii.radius import layer_radii, predictions


@st.composite
def two_conv_cnns(draw):
    """Conv, activation, Conv (its input perturbed: the patch growth terms matter), pooling,
    Linear on 1x6x6 inputs."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    c1, c2 = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    model = nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), draw(st.sampled_from(ACTIVATIONS))(),
        nn.Conv2d(c1, c2, draw(st.sampled_from([2, 3])), stride=draw(st.sampled_from([1, 2]))),
        draw(st.sampled_from(ACTIVATIONS))(), nn.Flatten(),
    )
    model.append(nn.Linear(model(torch.zeros(1, 1, 6, 6)).shape[1], draw(st.integers(2, 4))))
    return model.double().eval(), (1, 6, 6)


MODELS = st.one_of(mlps(), cnns(), two_conv_cnns(), residual_mlps(), residual_cnns(), dags())
PROBLEMS = (MODELS, st.sampled_from(["fro", "max"]),
            st.booleans(), st.integers(0, 2**31 - 1))


def weight_sizes(net: Graph, norm: str, bias: bool) -> list[float]:
    """``||W~_k||`` in the budget's own norm, per affine layer."""
    return [float(torch.linalg.matrix_norm(layer_weight(net.layer(i), bias)) if norm == "fro"
                  else layer_weight(net.layer(i), bias).abs().max()) for i in net.affine_indices]


@settings(max_examples=40, deadline=None)
@given(*PROBLEMS)
def test_attacks_on_all_layers_inside_the_uniform_budget_never_change_the_class(
        model_and_shape, norm, bias, seed):
    net, x, y = certification_problem(model_and_shape, seed)
    t = uniform_budget(net, x, norm, bias)
    assert torch.all(t >= 0) and torch.all(torch.isfinite(t))
    radii = [0.999 * t * size for size in weight_sizes(net, norm, bias)]
    for Ds in attacks(net, x, y, radii, norm, bias):
        changed = perturbed_logits(net, x, Ds, bias).argmax(-1) != y
        assert not changed.any(), f"{norm}: an attack inside 0.999 t changed inputs " \
            f"{torch.nonzero(changed)[:, 0].tolist()}"


@settings(max_examples=25, deadline=None)
@given(*PROBLEMS)
def test_uniform_budget_is_the_certified_end_of_a_tight_bracket(model_and_shape, norm, bias,
                                                                seed):
    net, x, _ = certification_problem(model_and_shape, seed)
    t = uniform_budget(net, x, norm, bias)
    sizes = torch.tensor(weight_sizes(net, norm, bias), dtype=torch.float64)
    for i in range(len(x)):
        at = multilayer_bound(net, x[i:i + 1], (t[i] * sizes).tolist(), norm, bias)
        beyond = multilayer_bound(net, x[i:i + 1], (t[i] * (1 + 2 * PRECISION) * sizes).tolist(),
                                  norm, bias)
        if t[i] > 0:  # 0: not even the smallest budget tried is certified
            assert at.certified[0] and not beyond.certified[0]


@settings(max_examples=25, deadline=None)
@given(*PROBLEMS, st.data())
def test_one_budget_is_the_single_layer_global_lipschitz_bound(model_and_shape, norm, bias,
                                                               seed, data):
    """With one nonzero budget the recursion is the global bound of ``certify.radii.radius`` (the
    exact class-pair radius for the last layer): certified exactly below it."""
    net, x, _ = certification_problem(model_and_shape, seed)
    k = data.draw(st.integers(0, len(net.affine_indices) - 1))
    lower = layer_radii(net, x, net.affine_indices[k], norm, bias).lower_global
    for i in torch.nonzero(torch.isfinite(lower) & (lower > 0))[:, 0].tolist():
        budgets = [0.0] * len(net.affine_indices)
        for factor, expected in ((1 - 1e-7, True), (1 + 1e-7, False)):
            budgets[k] = float(lower[i]) * factor
            got = multilayer_bound(net, x[i:i + 1], budgets, norm, bias).certified[0]
            assert bool(got) == expected, f"layer {k}, budget {factor} * lower_global"


@settings(max_examples=25, deadline=None)
@given(*PROBLEMS, st.data())
def test_bigger_budgets_never_certify_more(model_and_shape, norm, bias, seed, data):
    net, x, _ = certification_problem(model_and_shape, seed)
    K = len(net.affine_indices)
    scale = float(uniform_budget(net, x, norm, bias).median()) * 3
    small = data.draw(st.lists(st.floats(0, 1), min_size=K, max_size=K))
    extra = data.draw(st.lists(st.floats(0, 1), min_size=K, max_size=K))
    sizes = weight_sizes(net, norm, bias)
    a = multilayer_bound(net, x, [scale * s * w for s, w in zip(small, sizes)], norm, bias)
    b = multilayer_bound(net, x, [scale * (s + d) * w for s, d, w in zip(small, extra, sizes)],
                         norm, bias)
    assert torch.all(b.bound >= a.bound)
    assert torch.all(a.certified | ~b.certified)


@st.composite
def width_one_chains(draw):
    """``x -> w_1 x -> ... -> [u_0, u_1] h + b`` with positive ``x, w_k`` and ``u_0 < u_1``:
    the largest margin drop is attained, every inequality of the recursion being tight."""
    depth = draw(st.integers(0, 3))
    w = [draw(st.floats(0.2, 3.0)) for _ in range(depth)]
    u0 = draw(st.floats(-2.0, 2.0))
    u1 = u0 + draw(st.floats(0.1, 2.0))
    h = draw(st.floats(0.2, 2.0)) * math.prod(w)  # the logits layer's input
    margin = draw(st.floats(0.05, 3.0))
    layers = [nn.Linear(1, 1, bias=False) for _ in w] + [nn.Linear(1, 2)]
    with torch.no_grad():
        for layer, wk in zip(layers, w):
            layer.weight.fill_(wk)
        layers[-1].weight.copy_(torch.tensor([[u0], [u1]]))
        layers[-1].bias.copy_(torch.tensor([margin + (u1 - u0) * h, 0.0]))  # class 0 wins
    x = torch.tensor([[h / math.prod(w)]], dtype=torch.float64)
    return nn.Sequential(*layers).double(), x


def worst_perturbation(net: Graph, x, t: float, norm: str) -> list[torch.Tensor]:
    """``d_k = +e_k`` on the hidden chain (``dh > 0`` adds to ``h > 0`` and passes through
    ``w > 0``), and the last layer's rank-one ``D = -e c sign(v)^T`` (max) or ``-e c v^T /
    (||c|| ||v||)`` (fro) with ``c = e_0 - e_1``: every term of the bound is attained."""
    Ds = []
    for i in net.affine_indices[:-1]:
        Ds.append(torch.full((1, 1, 1), t * abs(float(net.layer(i).weight)), dtype=torch.float64))
    last = net.layer(net.affine_indices[-1]).weight
    e = t * float(torch.linalg.matrix_norm(last) if norm == "fro" else last.abs().max())
    c = torch.tensor([1.0, -1.0], dtype=torch.float64)
    direction = c / math.sqrt(2) if norm == "fro" else c  # v > 0: sign(v) = v / |v| = 1
    Ds.append(-e * direction.reshape(1, 2, 1))
    return Ds


@settings(max_examples=40, deadline=None)
@given(width_one_chains(), st.sampled_from(["fro", "max"]))
def test_recursion_is_attained_on_width_one_chains(chain, norm):
    """Just beyond the uniform budget the worst perturbation changes the class: no term of
    the recursion (cross terms included) may be dropped or shrunk."""
    model, x = chain
    net = capture(model, x)
    y, _ = predictions(net, x)
    assert y.item() == 0
    t = float(uniform_budget(net, x, norm)[0])
    inside = perturbed_logits(net, x, worst_perturbation(net, x, 0.999 * t, norm), False)
    beyond = perturbed_logits(net, x, worst_perturbation(net, x, 1.001 * t, norm), False)
    assert inside.argmax(-1).item() == 0
    assert beyond.argmax(-1).item() == 1


@pytest.mark.parametrize("norm", ["fro", "max"])  # both norms on every kind of network
@settings(max_examples=15, deadline=None)
@given(MODELS, st.booleans(), st.integers(0, 2**31 - 1))
def test_numpy_checker_confirms_the_budget_and_refutes_an_inflated_one(norm, model_and_shape,
                                                                       bias, seed):
    net, x, _ = certification_problem(model_and_shape, seed)
    t = uniform_budget(net, x, norm, bias).numpy()
    graph = NumpyGraph.of(net)
    values = graph.values(x.numpy())
    logits = values[-1]
    y = logits.argmax(axis=1)
    margins = logits[np.arange(len(y)), y][:, None] - logits
    margins[np.arange(len(y)), y] = np.inf

    def report(claimed, smallest=None):
        r = check.Report()
        other = {"uniform_budget": [0.0] * len(y), "min": 0.0}
        smallest = float(claimed.min()) if smallest is None else smallest
        claims = {"uniform_budget": claimed.tolist(), "min": smallest}
        check._check_multilayer(r, {norm: claims, ("max" if norm == "fro" else "fro"): other},
                                graph, values, y, margins, bias)
        return r

    assert report(t).ok
    tampered = t.copy()
    tampered[0] = t[0] * (1 + 1e-4) if t[0] > 0 else 1.0
    assert not report(tampered).ok
    assert not report(np.where(np.arange(len(t)) == 0, -1.0, t)).ok
    assert not report(t, smallest=2 * float(t.min()) + 1e-3).ok


def test_bad_budgets_are_refused_with_the_layer_names():
    x = torch.randn(2, 3, dtype=torch.float64)
    net = capture(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), x)
    with pytest.raises(ValueError, match=r"got 1 budgets .* 2 affine layers \(0, 2\)"):
        multilayer_bound(net, x, [0.1], "fro")
    with pytest.raises(ValueError, match=r"finite and >= 0; got 0=-0.1"):
        multilayer_bound(net, x, [-0.1, 0.0], "fro")
    with pytest.raises(ValueError, match=r"finite and >= 0; got 2=nan"):
        multilayer_bound(net, x, [0.0, math.nan], "max")
    with pytest.raises(ValueError, match="one per affine layer"):
        multilayer_bound(net, x, ["a", 0.0], "max")
    with pytest.raises(ValueError, match="norm must be one of"):
        multilayer_bound(net, x, [0.0, 0.0], "spectral")


@pytest.mark.parametrize("norm", ["fro", "max"])
def test_logits_after_an_activation_are_certified_through_the_output(norm):
    """Logits that are not a dense layer's output (a ReLU after it): the chain refused
    them; the graph bounds ``|Delta m_j| <= ||c_j||_dual ||Delta o||``, and attacks inside
    the uniform budget change no class."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.ReLU()).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    net = capture(model, x)
    assert not net.is_last_dense(net.affine_indices[-1])
    y, _ = predictions(net, x)
    t = uniform_budget(net, x, norm)
    assert torch.all(t >= 0) and torch.all(torch.isfinite(t)) and bool((t > 0).any())
    radii = [0.999 * t * size for size in weight_sizes(net, norm, False)]
    for Ds in attacks(net, x, y, radii, norm, False):
        assert torch.equal(perturbed_logits(net, x, Ds, False).argmax(-1), y)
