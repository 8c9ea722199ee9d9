"""The architecture matrix (issue 28): torchvision's classifiers, with random weights and
batch norms calibrated on random inputs (``tests/support/torchvision_models.py``), at the
smallest input each accepts, are captured, and the captured graph equals the module on a
batch; the families capture refuses are refused with the operator named and the supported
list. One of each family that fits the suite's budget runs here;
``benchmarks/architectures.py`` runs all 80 and certifies whole networks.

torchvision is imported without its package ``__init__`` (its compiled operators do not load
beside the CPU torch certify pins), so these tests run on every machine that has the wheel.
"""

from __future__ import annotations

import pytest
import torch
from torchvision_models import architectures, build, expected_refusal
from weight_attacks import layer_weight, perturbed_classes, pgd_attack

from certify.capture import UnsupportedModelError, capture
from certify.graph.operators import Affine
from certify.radii import layer_radii, predictions

# The cheapest of the families, and what their capture exercises (the others, ResNeXt,
# RegNet, DenseNet, ConvNeXt, MNASNet, Inception, VGG, AlexNet, ViT, Swin, MaxViT, in the benchmark;
# MobileNetV2 below).
FAMILIES = {
    "resnet18": "residual additions, max pooling, adaptive average pooling",
    "mobilenet_v3_small": "depthwise convolutions, hard-swish, squeeze-and-excitation "
                          "products, hard-sigmoid, in-place dropout",
    "shufflenet_v2_x0_5": "channel shuffle (reshape, transpose), chunk, concatenation",
    "squeezenet1_1": "fire modules: concatenated branches, ceil-mode pooling",
    "googlenet": "inception branches, input transform",
}
KNOWN_FAMILIES = {"alexnet", "convnext", "densenet", "efficientnet", "googlenet", "inception",
                  "maxvit", "mnasnet", "mobilenet", "regnet", "resnet", "resnext", "shufflenet",
                  "squeezenet", "swin", "vgg", "vit", "wide"}


def test_the_matrix_knows_every_torchvision_classifier():
    """Every architecture torchvision defines belongs to a family the benchmark has run and
    the docs report: a torchvision release that adds a family fails this until it is run."""
    names = set(architectures())
    assert len(names) >= 80
    assert {name.split("_")[0].rstrip("0123456789") for name in names} == KNOWN_FAMILIES


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_architecture_is_captured_exactly_or_refused_by_name(name):
    model, side = build(name)
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    reason = expected_refusal(name)
    if reason is not None:
        with pytest.raises(UnsupportedModelError, match="batch axis|supported"):
            capture(model, x)
        print(f"{name}: refused ({reason})")
        return
    network = capture(model, x)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(network(x), expected, rtol=1e-9,
                               atol=1e-12 * float(expected.abs().max()))
    print(f"{name} at {side}x{side}: captured, {len(network.affine_indices)} certified layers")


# A layer near the head of each (the certified weight: a 3x3 convolution of 512 channels, a
# 1x1 convolution of 320 -> 1280 channels after the depthwise stages).
LAYERS = {"resnet18": "layer4.1.conv2+layer4.1.bn2", "mobilenet_v2": "features.18.0+features.18.1"}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_layer_of_a_deployed_architecture_certifies_soundly(name):
    model, side = build(name)
    torch.manual_seed(1)
    x = torch.randn(1, 3, side, side, dtype=torch.float64)
    network = capture(model, x)
    with torch.no_grad():
        torch.testing.assert_close(network(x), model(x), rtol=1e-9, atol=1e-12)
    index = network.affine_indices[network.layer_names.index(LAYERS[name])]
    assert isinstance(network.layer(index), Affine)
    r = layer_radii(network, x, index, "fro", refine=False)
    y = predictions(network, x)[0]
    assert torch.all((0 < r.lower) & (r.lower <= r.upper))
    assert torch.all(perturbed_classes(network, x, index, r.witness.matrix(), False) != y)
    D = pgd_attack(network, x, index, 0.999 * r.lower, "fro", False, steps=10)
    assert torch.equal(perturbed_classes(network, x, index, D, False), y)
    assert layer_weight(network.layer(index), False).shape == r.witness.matrix().shape[1:]
