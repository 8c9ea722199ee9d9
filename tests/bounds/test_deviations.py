"""The second-order bound of THEORY.md section 9 (``certify.bounds.deviations``), attacked.

* Containment: for random weight changes on the ball (the Frobenius sphere, vertices of the
  max ball) and the projected-gradient attack, every real margin is at least the bound's
  lower bound at that radius; attacks at ``0.999 x deviation_lower`` never change a class.
* An oracle where the bound is exact: a network without nonlinear nodes is linear in the
  weight change, so the bound must reach the first-order radius ``min_j m_j / g_j`` (the
  true radius there, which the verified witness attains).
* Teeth: the same attack changes classes when a rule's remainder is dropped.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import certification_problem, cnns, mlps, residual_mlps
from tiny_transformers import transformers
from torch import nn
from weight_attacks import (layer_columns, layer_weight, perturbed_classes, pgd_attack,
                            random_ball)

from certify.bounds import deviations
from certify.capture.export import capture
from certify.graph.inputs import InputError
from certify.graph.operators import Activation
from certify.radii.radius import class_margins, layer_radii

DT = torch.float64
NETWORKS = st.one_of(mlps(), cnns(), residual_mlps(), transformers())


def _setup(net, x, index, norm):
    values = net.values(x)
    y, _ = class_margins(values[-1])
    P = layer_columns(net.layer(index), values[net.input_of(index)], False)
    return values, y, P


def _real_margins(net, x, index, D):
    """Margins ``o_y - o_j`` with layer ``index``'s weight ``W + D``."""
    layer, values = net.layer(index), net.values(x)
    P = layer_columns(layer, values[net.input_of(index)], False)
    Z = layer.uncolumns(torch.matmul(layer_weight(layer, False) + D, P) +
                        layer.bias[:, None], values[index].shape[1:])
    logits = net.run(index, Z, values)
    y = values[-1].argmax(-1)
    return logits.gather(-1, y[:, None]) - logits


def _drawn_layer(model_and_shape, seed: int, pick: int, norm: str):
    """The drawn network on its six inputs, one of its hidden layers the bound supports
    (``pick``), the clean values, classes and the layer's columns; ``None`` without one."""
    net, x, _ = certification_problem(model_and_shape, seed)
    layers = [i for i in net.affine_indices if not net.is_last_dense(i) and
              deviations.supported(net, i)]
    if not layers:
        return None
    index = layers[pick % len(layers)]
    return (net, x, index, *_setup(net, x, index, norm))


@settings(max_examples=12, deadline=None)
@given(model_and_shape=NETWORKS, norm=st.sampled_from(["fro", "max"]),
       seed=st.integers(0, 2**16), pick=st.integers(0, 7), fraction=st.floats(0.05, 2.0))
def test_margins_stay_above_their_bounds(model_and_shape, norm, seed, pick, fraction):
    drawn = _drawn_layer(model_and_shape, seed, pick, norm)
    if drawn is None:
        return
    net, x, index, values, y, P = drawn
    t = deviations.trace(net, index, values, y, P, norm)
    rho = (t.margins / t.g).amin(-1).clamp(max=1e3) * fraction
    bounds = deviations.margin_bounds(net, t, rho)
    shape = layer_weight(net.layer(index), False).shape
    for D in [random_ball((len(x), *shape), rho, norm) for _ in range(4)] + \
            [pgd_attack(net, x, index, rho, norm, False, steps=20)]:
        real = _real_margins(net, x, index, D)
        finite = torch.isfinite(bounds)
        assert bool((real[finite] >= bounds[finite] - 1e-9 * (1 + real[finite].abs())).all())


@settings(max_examples=10, deadline=None)
@given(model_and_shape=NETWORKS, norm=st.sampled_from(["fro", "max"]),
       seed=st.integers(0, 2**16), pick=st.integers(0, 7))
def test_attacks_inside_the_radius_never_change_the_class(model_and_shape, norm, seed, pick):
    drawn = _drawn_layer(model_and_shape, seed, pick, norm)
    if drawn is None:
        return
    net, x, index, values, y, P = drawn
    lower = deviations.deviation_lower(net, index, values, y, P, norm,
                                       torch.full((len(x),), 1e3, dtype=DT))
    inside = 0.999 * lower
    shape = layer_weight(net.layer(index), False).shape
    for D in [random_ball((len(x), *shape), inside, norm),
              pgd_attack(net, x, index, inside, norm, False)]:
        assert bool((perturbed_classes(net, x, index, D, False) == y).all())


class Sequence(nn.Module):
    """Linear maps only over a sequence of 3 tokens: the margins are affine in the first
    layer's weight change, which is shared by the tokens (several columns)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(self.a(x).mean(1) * 2.0)


@pytest.mark.parametrize("norm", ["fro", "max"])
def test_a_linear_network_is_certified_at_its_exact_radius(norm):
    torch.manual_seed(0)
    net = capture(Sequence().double(), (3, 4))
    x = torch.randn(5, 3, 4, dtype=DT)
    r = layer_radii(net, x, net.affine_indices[0], norm)
    assert "deviation" in r.method
    # The witness is a verified flip; the bound reaches it (within the search's precision).
    assert bool((r.lower <= r.upper).all())
    assert bool((r.lower >= r.upper * 0.99).all()), (r.lower / r.upper)


def _gelu_mlp():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 3)).double()
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.mul_(3.0)  # strongly curved: the remainders carry the bound
    return model


def test_the_attack_beats_a_dropped_remainder(monkeypatch):
    """Teeth: with the activations' remainders taken as 0 (a linearisation claimed exact),
    the bound certifies radii that the same attacks break; with them it does not."""
    net = capture(_gelu_mlp(), (6,))
    x = torch.randn(12, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    index, norm = net.affine_indices[0], "fro"
    values, y, P = _setup(net, x, index, norm)
    cap = torch.full((len(x),), 1e3, dtype=DT)

    def flipped(lower):
        D = pgd_attack(net, x, index, 0.999 * lower, norm, False, steps=60)
        return int((perturbed_classes(net, x, index, D, False) != y).sum())

    assert flipped(deviations.deviation_lower(net, index, values, y, P, norm, cap)) == 0
    monkeypatch.setattr(Activation, "remainder",
                        lambda self, inputs, radii, rows=None: torch.zeros_like(inputs[0]))
    assert flipped(deviations.deviation_lower(net, index, values, y, P, norm, cap)) > 0


def test_deviation_true_names_an_operator_without_rules():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ELU(), nn.Flatten(),
                          nn.Linear(16, 2)).double()
    net = capture(model, (1, 10))
    x = torch.randn(2, 1, 10, dtype=DT)
    with pytest.raises(InputError, match="elu.*deviation='auto'"):
        layer_radii(net, x, net.affine_indices[0], "fro", deviation=True)
    assert "deviation" not in layer_radii(net, x, net.affine_indices[0], "fro").method


def test_limiting_names_what_takes_the_binding_margin():
    """``limiting``: the first-order term on a linear network (no remainders); on a strongly
    curved one at twice its certified radius, an activation's remainder for some inputs."""
    torch.manual_seed(0)
    net = capture(Sequence().double(), (3, 4))
    x = torch.randn(3, 3, 4, dtype=DT)
    index = net.affine_indices[0]
    values, y, P = _setup(net, x, index, "fro")
    rho = torch.full((3,), 1e-3, dtype=DT)
    assert deviations.limiting(net, index, values, y, P, "fro", rho) == ["first order"] * 3
    net = capture(_gelu_mlp(), (6,))
    x = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    index = net.affine_indices[0]
    values, y, P = _setup(net, x, index, "fro")
    lower = deviations.deviation_lower(net, index, values, y, P, "fro",
                                       torch.full((4,), 1e3, dtype=DT))
    names = deviations.limiting(net, index, values, y, P, "fro", 2 * lower)
    assert all(name == "first order" or "Activation" in name for name in names), names
    assert any("Activation" in name for name in names), names


@settings(max_examples=8, deadline=None)
@given(model_and_shape=st.one_of(mlps(), cnns()), norm=st.sampled_from(["fro", "max"]),
       seed=st.integers(0, 2**16), pick=st.integers(0, 3))
def test_pieces_of_inputs_give_the_radii_of_one_batch(model_and_shape, norm, seed, pick):
    """Under a memory bound for one input's gradients the inputs go one by one: each radius
    depends on its input alone, so the radii are those of the whole batch at once."""
    drawn = _drawn_layer(model_and_shape, seed, pick, norm)
    if drawn is None:
        return
    net, x, index, values, y, P = drawn
    cap = torch.full((len(x),), 10.0, dtype=DT)
    whole = deviations.deviation_lower(net, index, values, y, P, norm, cap)
    saved, deviations.GRADIENT_BYTES = deviations.GRADIENT_BYTES, 1
    try:
        one_by_one = deviations.deviation_lower(net, index, values, y, P, norm, cap)
    finally:
        deviations.GRADIENT_BYTES = saved
    assert torch.allclose(whole, one_by_one, rtol=1e-9, atol=0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_the_max_norm_support_in_pieces_equals_it_at_once(seed):
    """The max-norm support of forms over ``v = vec(D U)`` (``Sources.support``) per entry,
    in pieces of one entry (``SYMBOL_ENTRIES`` below one), equals it computed at once, and
    equals the definition ``||c U^T||_1`` computed here entry by entry. The second
    convolution has 4 positions for 54 patch entries: the SVD's symbols (``mix``)."""
    from certify.bounds import first_order

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16, 5)).double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=DT)
    net = capture(model, x)
    index = net.affine_indices[1]
    values, _, P = _setup(net, x, index, "max")
    source = first_order.sources(net.layer(index), values[index], P, "max")
    assert source.mix is not None
    forms = torch.randn(len(x), source.basis.shape[1], 5, dtype=DT)
    whole = source.support(forms)
    saved, first_order.SYMBOL_ENTRIES = first_order.SYMBOL_ENTRIES, 1
    try:
        pieces = source.support(forms)
    finally:
        first_order.SYMBOL_ENTRIES = saved
    assert torch.allclose(whole, pieces, rtol=1e-12, atol=0)
    r = source.mix.shape[1]
    for b in range(len(x)):
        for e in range(5):
            c = forms[b, :, e].reshape(-1, r)  # m x r
            assert torch.isclose(whole[b, e], (c @ source.mix[b]).abs().sum(), rtol=1e-12)
