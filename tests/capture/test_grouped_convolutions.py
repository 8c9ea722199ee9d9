"""Grouped, depthwise and transposed convolutions (issue 28) end to end: captured from ``nn``
modules bit for bit, certified as layers whose weight is the whole kernel, attacked in
weight space and confirmed by ``certify check``.

The attacks here run the perturbed layer through torch's own convolution
(``Affine.with_weight``: ``F.conv*`` with the groups, or ``F.conv_transpose*`` with the
module's kernel layout), not through the patches the bounds use, so a wrong layout of
``P~`` for a group or a transposed kernel would show as a change inside ``lower``.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from weight_attacks import (assert_attacks_inside_fail, assert_witness_flips, layer_weight,
                            perturbed_classes)

from certify.capture import capture
from certify.certificate import certify_network
from certify.check import check
from certify.graph.operators import Affine
from certify.graph.operators.affine import swap_kernel
from certify.closed_forms import parse_compression
from certify.radii import compress, compression_check, layer_radii, predictions


def layer_module(two: bool, transposed: bool, groups: int, c_in: int, c_out: int, k: int,
                 stride: int, padding: int, dilation: int, extra: int) -> nn.Module:
    """One convolution module; ``extra`` is a transposed convolution's output padding."""
    if transposed:
        cls = nn.ConvTranspose2d if two else nn.ConvTranspose1d
        return cls(c_in, c_out, k, stride, padding, extra, groups, dilation=dilation)
    cls = nn.Conv2d if two else nn.Conv1d
    return cls(c_in, c_out, k, stride, padding, dilation, groups)


@st.composite
def conv_layers(draw):
    two, transposed = draw(st.booleans()), draw(st.booleans())
    groups = draw(st.integers(1, 3))
    c_in = groups * (1 if draw(st.booleans()) else draw(st.integers(1, 2)))  # depthwise or not
    c_out = groups * draw(st.integers(1, 2))
    k, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    extra = draw(st.integers(0, max(stride, dilation) - 1)) if transposed else 0
    return layer_module(two, transposed, groups, c_in, c_out, k, stride, padding, dilation,
                        extra), (c_in, *([5, 6] if two else [7]))


@settings(deadline=None)
@given(conv_layers(), st.booleans(), st.integers(0, 2**16))
def test_grouped_and_transposed_convolutions_are_captured_exactly(layer, bias, seed):
    module, shape = layer
    torch.manual_seed(seed)
    if not bias:
        module.bias = None
    model = nn.Sequential(module, nn.BatchNorm2d(module.out_channels) if len(shape) == 3
                          else nn.BatchNorm1d(module.out_channels), nn.Flatten()).double().eval()
    with torch.no_grad():  # running statistics that are not the identity
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(3, *shape, dtype=torch.float64)
    try:
        expected = model(x)
    except RuntimeError:  # torch rejects the geometry (an empty output)
        return
    network = capture(model, x)
    node = network.nodes[1]  # the batch norm is folded into the convolution
    assert isinstance(node.op, Affine)
    transposed = isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d)
    assert (node.op.groups, node.op.transposed) == (module.groups, transposed)
    torch.testing.assert_close(network(x), expected, rtol=1e-12, atol=1e-12)
    # The weight certified is the module's kernel, folded with the batch norm's scale per
    # output channel, in the equivalent convolution's layout (the same entries).
    scale = model[1].weight / torch.sqrt(model[1].running_var + model[1].eps)
    W, g = module.weight, module.groups
    if node.op.transposed:  # (c_in, c_out / g, *k): output channels are axis 1, per group
        folded = (W.reshape(g, -1, *W.shape[1:]) * scale.reshape(
            g, 1, -1, *[1] * (W.ndim - 2))).reshape(W.shape)
        kernel = swap_kernel(node.op.weight, g)
    else:
        folded, kernel = W * scale.reshape(-1, *[1] * (W.ndim - 1)), node.op.weight
    torch.testing.assert_close(kernel, folded, rtol=1e-13, atol=1e-13)


class MobileBlock(nn.Module):
    """A MobileNet-style block and a decoder step: expand 1x1, depthwise 3x3 (stride 2),
    project 1x1 with a residual-free skip, a grouped 3x3 and a transposed 2x2 (stride 2)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 6, 1), nn.ReLU6(), nn.Conv2d(6, 6, 3, 2, 1, groups=6), nn.ReLU(),
            nn.Conv2d(6, 4, 3, padding=1, groups=2), nn.ReLU(),
            nn.ConvTranspose2d(4, 2, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))

    def forward(self, x):
        return self.body(x)


def problem(seed: int):
    torch.manual_seed(seed)
    model = MobileBlock().double().eval()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    network = capture(model, x)
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)
    return network, x, predictions(network, x)[0]


def classes_with(net, x, index, D, bias) -> torch.Tensor:
    """The classes with layer ``index``'s weight ``W + D_b`` for input ``b``, through
    torch's convolution for that layer (not the patches of the bounds)."""
    layer, values = net.layer(index), net.values(x)
    h = values[net.input_of(index)]
    outs = []
    for b in range(len(x)):
        W = layer_weight(layer, bias) + D[b]
        weight, shift = (W[:, :-1], W[:, -1]) if bias else (W, layer.bias)
        outs.append(layer.with_weight(weight, shift)(h[b:b + 1]))
    return net.run(index, torch.cat(outs), values).argmax(-1)


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_attacks_inside_lower_never_change_the_class(norm, bias, seed):
    net, x, y = problem(seed)
    for index in net.affine_indices:
        r = layer_radii(net, x, index, norm, bias)
        assert torch.all((0 <= r.lower) & (r.lower <= r.upper))
        assert_attacks_inside_fail(net, x, y, index, r, norm, bias, classes=classes_with)
        # Teeth: the witness changes the class through torch's own convolution too, and
        # the attack's forward pass (patches) agrees with it.
        assert_witness_flips(net, x, y, index, r, bias, classes=classes_with)
        D = r.witness.matrix()
        assert torch.equal(classes_with(net, x, index, D, bias),
                           perturbed_classes(net, x, index, D, bias))


@settings(max_examples=2, deadline=None)
@given(st.booleans(), st.integers(0, 2**31 - 1))
def test_certify_check_confirms_every_claim(bias, seed):
    net, x, _ = problem(seed)
    kinds = {(n.op.groups, n.op.transposed) for n in net.nodes if isinstance(n.op, Affine)}
    assert {(6, False), (2, False), (1, True)} <= kinds
    result = certify_network(net, x[:3], model_sha256="0" * 64, bias=bias, progress=False,
                             refine=False)
    report = check(result.document, result.witnesses, net, x[:3].numpy())
    assert report.ok, report


@settings(max_examples=4, deadline=None)
@given(st.sampled_from(["bits=3", "prune=0.5", "rank=1"]), st.integers(0, 2**31 - 1))
def test_compressing_grouped_layers_reports_the_real_output_change(spec, seed):
    """The change of a grouped or transposed layer's output under compression is that of
    torch's convolution with the compressed kernel (no term from another group's patches),
    and the numpy checker computes the same."""
    net, x, _ = problem(seed)
    for index in net.affine_indices[1:4]:
        layer = net.layer(index)
        name = net.nodes[index].name
        result = compression_check(net, x, parse_compression(f"{spec}@{name}"))
        (entry,) = result.layers
        small = compress(net, parse_compression(f"{spec}@{name}")).layer(index)
        h = net.values(x)[net.input_of(index)]
        change = layer.linear(h, layer.weight - small.weight).flatten(1)
        torch.testing.assert_close(entry.change_fro, torch.linalg.vector_norm(change, dim=-1),
                                   rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(entry.change_max, change.abs().amax(-1), rtol=1e-12,
                                   atol=1e-14)
