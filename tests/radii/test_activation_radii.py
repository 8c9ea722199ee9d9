"""The activations of mobile models (SiLU, Mish, hard-swish, hard-sigmoid, ReLU6, hardtanh,
a clamp between constants and PReLU with slopes of either sign) end to end: captured from ``nn`` modules, certified layer by
layer, attacked in weight space, and checked by ``certify check``'s numpy twins.

Soundness: projected gradient descent (from a tiny change, and from the witness scaled
into the ball: gradients vanish where the hard activations saturate) and random points at
0.999 x ``lower`` never change a class. Teeth: the witness at ``upper`` does, and the same
attack, started from half the witness (which changes nothing), finds a change within 1.01 x
``upper`` (on most inputs and layers; the test asks for one), so it can catch a ``lower``
above the radius.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from weight_attacks import assert_attacks_inside_fail, perturbed_classes, pgd_attack

from certify.capture import capture
from certify.certificate import certify_network
from certify.check import check
from certify.radii import layer_radii, predictions


class Clamp(nn.Module):
    def forward(self, x):
        return torch.clamp(x, -1.0, 2.0)


def prelu() -> nn.PReLU:
    """Eight learned slopes from -1.3 to 1.3, as trained face-recognition models hold."""
    module = nn.PReLU(8)
    with torch.no_grad():
        module.weight.uniform_(-1.3, 1.3)
    return module


ACTIVATIONS = {"silu": nn.SiLU, "mish": nn.Mish, "hardswish": nn.Hardswish,
               "hardsigmoid": nn.Hardsigmoid, "relu6": nn.ReLU6,
               "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5), "clamp": Clamp, "prelu": prelu}
KIND = {"relu6": "hardtanh", "clamp": "hardtanh"}  # the operator that each becomes
GAIN = {"hardsigmoid": 4.0, "hardtanh": 2.0}


def problem(name: str, seed: int):
    """A 6-8-8-3 MLP with the activation after both hidden layers, on six inputs scaled so
    that its pre-activations reach the kinks (-+3 for hard-swish and hard-sigmoid), with
    steeper weights where the activation is flat or small (so that classes can change)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), ACTIVATIONS[name](), nn.Linear(8, 8),
                          ACTIVATIONS[name](), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():  # steeper layers where the activation is flat or bounded
        for layer in model[2::2]:
            layer.weight *= GAIN.get(name, 1.0)
    x = 2 * torch.randn(6, 6, dtype=torch.float64)
    network = capture(model, x)
    kinds = {getattr(n.op, "kind", type(n.op).__name__.lower()) for n in network.nodes[1:]}
    kinds.discard("affine")
    assert kinds == {KIND.get(name, name)}
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)
    return network, x, predictions(network, x)[0]


PROBLEMS = (st.sampled_from(sorted(ACTIVATIONS)), st.sampled_from(["fro", "max"]),
            st.booleans(), st.integers(0, 2**31 - 1))


@settings(max_examples=20, deadline=None)
@given(*PROBLEMS)
def test_attacks_inside_lower_never_change_the_class(name, norm, bias, seed):
    net, x, y = problem(name, seed)
    for index in net.affine_indices:
        r = layer_radii(net, x, index, norm, bias)
        assert torch.all((0 <= r.lower) & (r.lower <= r.upper))
        # Also from the witness: where the hard activations saturate, a start at 0 may see
        # no gradient.
        assert_attacks_inside_fail(net, x, y, index, r, norm, bias, from_witness=True)


@settings(max_examples=10, deadline=None)
@given(*PROBLEMS)
def test_witnesses_flip_and_the_attack_finds_flips_beyond_upper(name, norm, bias, seed):
    net, x, y = problem(name, seed)
    checked, caught = False, False
    for index in net.affine_indices:
        r = layer_radii(net, x, index, norm, bias)
        found = torch.isfinite(r.upper)
        if not found.any():  # no witness in the search bracket: nothing to aim at
            continue
        assert torch.all(perturbed_classes(net, x, index, r.witness.matrix(), bias)[found]
                         != y[found])
        # From half the witness, which changes no class, out to 1.01 upper.
        half = r.witness.matrix() * torch.where(found, 0.5, 0.0)[:, None, None]
        assert torch.equal(perturbed_classes(net, x, index, half, bias), y)
        beyond = torch.where(found, 1.01 * r.upper, torch.zeros_like(r.upper))
        D = pgd_attack(net, x, index, beyond, norm, bias, start=half)
        caught |= bool((perturbed_classes(net, x, index, D, bias) != y)[found].any())
        checked = True
    assume(checked)
    assert caught, f"{name}, {norm}: the attack found no change within 1.01 upper"


@settings(max_examples=7, deadline=None)
@given(st.sampled_from(sorted(ACTIVATIONS)), st.booleans(), st.integers(0, 2**31 - 1))
def test_certify_check_confirms_every_claim(name, bias, seed):
    net, x, _ = problem(name, seed)
    result = certify_network(net, x, model_sha256="0" * 64, bias=bias, progress=False)
    report = check(result.document, result.witnesses, net, x.numpy())
    assert report.ok, report
