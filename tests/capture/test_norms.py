"""Group norm, instance norm and layer norm over several trailing axes (eval mode) are
captured as the ``LayerNorm`` operator over a reshaped last axis (and, for the per-channel
weight and bias of group and instance norm, a ``ScaleShift``): the graph computes what the
module does to 1e-10, after dense layers and 1-d and 2-d convolutions, affine or not; an
instance norm with running statistics is a per-channel ``ScaleShift`` (folded into the
convolution before it). A model with a group norm is certified layer by layer: attacks
inside the radius never change a class, the witness at the upper radius does, and
``certify check`` confirms its certificate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from weight_attacks import assert_attacks_inside_fail, assert_witness_flips

from certify.capture import capture
from certify.certificate import certify_network
from certify.check import check
from certify.graph.operators import LayerNorm
from certify.radii import layer_radii, predictions

BODIES = {  # a layer with 6 output channels and the input shape it takes
    "dense": (lambda: nn.Linear(5, 6), (5,)),
    "conv1d": (lambda: nn.Conv1d(2, 6, 3), (2, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 6, 3), (2, 4, 5)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def norm(kind: str, affine: bool, groups: int, shape) -> nn.Module:
    """The norm of ``kind`` for the 6-channel output of a body of input ``shape``."""
    if kind == "group":
        return nn.GroupNorm(groups, 6, affine=affine)
    if kind == "layer":  # over every axis after the batch
        return nn.LayerNorm(shape, elementwise_affine=affine)
    instance = nn.InstanceNorm1d if len(shape) == 2 else nn.InstanceNorm2d
    return instance(6, affine=affine, track_running_stats=kind == "instance_running")


def randomised(module: nn.Module, gen) -> nn.Module:
    """Learned-looking weights, biases and running statistics."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if "var" in name or
                        name.endswith("weight") else torch.randn(t.shape, generator=gen))
    return module


@settings(max_examples=16, deadline=None)
@given(st.sampled_from(sorted(BODIES)), st.sampled_from(["group", "layer", "instance",
                                                         "instance_running"]),
       st.booleans(), st.sampled_from([1, 2, 3, 6]), st.integers(0, 2**16))
def test_norms_are_captured_exactly(body, kind, affine, groups, seed):
    make, shape = BODIES[body]
    if kind.startswith("instance") and body == "dense":
        kind = "group"  # instance norm needs positions
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = make()
    out_shape = layer(torch.zeros(1, *shape)).shape[1:]
    model = nn.Sequential(layer, randomised(norm(kind, affine, groups, tuple(out_shape)), gen),
                          nn.Tanh(), nn.Flatten(), nn.Linear(out_shape.numel(), 3))
    model = model.double().eval()
    x = torch.randn(5, *shape, dtype=torch.float64, generator=gen)
    network = capture(model, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(network(x), model(x), rtol=1e-10, atol=1e-10)
    norms = [n.op for n in network.nodes if isinstance(n.op, LayerNorm)]
    assert len(norms) == (kind != "instance_running")
    if kind == "instance_running":  # a per-channel map, folded into the layer before it
        assert network.layer_names[0] == "0+1"


def grouped(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A 2 x 5 x 5 image through a 3 x 3 convolution to 4 channels, a group norm in 2
    groups with learned weight and bias, GELU, and a dense head."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), randomised(nn.GroupNorm(2, 4), gen), nn.GELU(),
                          nn.Flatten(), nn.Linear(36, 3)).double().eval()
    return model, torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=gen)


@settings(max_examples=4, deadline=None)
@given(st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_a_group_norm_model_certifies_and_certify_check_confirms(norm_, bias, seed):
    model, x = grouped(seed)
    network = capture(model, x)
    torch.testing.assert_close(network(x), model(x), rtol=1e-10, atol=1e-10)
    y = predictions(network, x)[0]
    for index in network.affine_indices:
        r = layer_radii(network, x, index, norm_, bias)
        assert torch.all((0 <= r.lower) & (r.lower <= r.upper))
        assert_attacks_inside_fail(network, x, y, index, r, norm_, bias)
        assert_witness_flips(network, x, y, index, r, bias)
    result = certify_network(network, x, model_sha256="0" * 64, bias=bias, progress=False)
    assert check(result.document, result.witnesses, network, x.numpy()).ok
