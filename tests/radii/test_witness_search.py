"""The witness search (``certify.radii.witness``): DeepFool, then random restarts where it found
nothing and a fast-minimum-norm attack from what it found.

Oracles: a forward pass (every witness really changes the class), the MILP on tiny ReLU
MLPs (``tests/support/milp_oracle.py``: a witness wherever it finds a class change; that none lies
below its exact radius is ``tests/radii/test_milp_exact.py``'s bracket), and DeepFool alone
(``minimum_norm_steps=0``: the full search is never worse). The teeth: on a trained CNN the
attack shrinks DeepFool's witnesses, and on tiny nets the restarts witness inputs that
DeepFool cannot.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from milp_oracle import exact_max_radius, tiny_mlp
from networks import cnns, mlps
from torch import nn

from certify.capture.export import capture
from certify.radii.radius import _columns, class_margins
from certify.models.small import load
from certify.radii.witness import _flips, _unperturbed, candidates, first_order, witness


def both_searches(net, x, index, norm):
    """``(upper, D)`` of the full search and ``upper`` of DeepFool alone, hidden layer
    ``index``, and whether each input's full witness changes its class."""
    values = net.values(x)
    y, _ = class_margins(values[-1])
    layer = net.layer(index)
    P = _columns(layer, values[net.input_of(index)], False)
    shape = values[index].shape[1:]
    upper, D = witness(net, index, P, y, norm, False, shape, values=values)
    deepfool, _ = witness(net, index, P, y, norm, False, shape, values=values,
                          minimum_norm_steps=0)
    Z0 = _unperturbed(layer, layer.matrix, P, False)
    return upper, D, deepfool, _flips(net, index, Z0, D, P, y, shape, values)


@settings(max_examples=20, deadline=None)
@given(st.one_of(mlps(), cnns()), st.sampled_from(["fro", "max"]))
def test_the_search_is_never_worse_than_deepfool_and_its_witnesses_flip(model_and_shape, norm):
    model, shape = model_and_shape
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    net = capture(model, x)
    for index in net.affine_indices[:-1]:
        upper, D, deepfool, flips = both_searches(net, x, index, norm)
        assert torch.all(flips[torch.isfinite(upper)])
        assert torch.all(upper <= deepfool), f"{upper} above DeepFool's {deepfool}"
        assert torch.allclose(D.norm(norm)[torch.isfinite(upper)], upper[torch.isfinite(upper)])


def test_restarts_witness_what_deepfool_cannot():
    """Tiny ReLU nets, where dead units stop DeepFool: the restarts witness at least 90% of
    the inputs on which the MILP finds a class change, and more than DeepFool alone."""
    full = alone = changes = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        inputs, depth = int(rng.integers(2, 5)), int(rng.integers(1, 3))
        widths = [int(w) for w in rng.integers(2, 7, size=depth)]
        model = tiny_mlp(inputs, widths, int(rng.integers(2, 4)), seed, trained=bool(seed % 2))
        x = torch.randn(3, inputs, generator=torch.Generator().manual_seed(seed + 1),
                        dtype=torch.float64)
        net = capture(model, x)
        for index in net.affine_indices[:-1]:
            upper, _, deepfool, _ = both_searches(net, x, index, "max")
            exact = exact_max_radius(net, x, index, False, cap=torch.full_like(upper, 1e3))
            full += int(torch.isfinite(upper).sum())
            alone += int(torch.isfinite(deepfool).sum())
            changes += int(np.sum(exact.exact))
    assert full >= 0.9 * changes, f"{full} witnesses for {changes} class changes"
    assert full > alone, f"restarts found {full} witnesses, DeepFool {alone}"


def test_the_attack_shrinks_deepfool_witnesses_on_a_trained_cnn():
    split = load("digits")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32, 10))
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(split.x_train), split.y_train).backward()
        optimiser.step()
    x = split.x_test[:40].double()
    net = capture(model.double(), x)
    for norm in ("fro", "max"):
        upper, _, deepfool, flips = both_searches(net, x, net.affine_indices[0], norm)
        assert torch.all(torch.isfinite(upper) & flips)
        ratio = upper / deepfool
        assert float(ratio.median()) < 0.995 and float(ratio.min()) < 0.9, (
            f"{norm}: median {float(ratio.median()):.3f}, min {float(ratio.min()):.3f}")
        assert float(ratio.max()) <= 1


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 3), st.sampled_from(["fro", "max"]))
def test_witnesses_steered_toward_few_classes_flip(seed, count, norm):
    """Forty classes, DeepFool steered toward the ``count`` of smallest first-order ratio
    (``candidates``): every witness changes the class in a module of torch's own with the
    perturbed weight (oracle independent of the graph's forward), and steering toward every
    class finds at least as many."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 40)).double().eval()
    x = torch.randn(6, 8, dtype=torch.float64)
    net = capture(model, x)
    index = net.affine_indices[0]
    values = net.values(x)
    y, _ = class_margins(values[-1])
    P = _columns(net.layer(index), x, False)
    ratio = first_order(net, index, P, values[index], y, norm, values)[3]
    upper, D = witness(net, index, P, y, norm, False, values[index].shape[1:], values=values,
                       classes=candidates(ratio, count))
    every, _ = witness(net, index, P, y, norm, False, values[index].shape[1:], values=values)
    found = torch.isfinite(upper)
    assert int(found.sum()) >= int(torch.isfinite(every).sum()) - 1
    for b in torch.nonzero(found)[:, 0].tolist():
        perturbed = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 40)).double()
        perturbed.load_state_dict(model.state_dict())
        with torch.no_grad():
            perturbed[0].weight += D.matrix()[b]
            assert perturbed(x[b:b + 1]).argmax(-1).item() != y[b].item()
