"""The MNIST vision transformer of ``certify.models.small`` (issue 11).

* Its layers are named by module path, as certificates name them, and the backdoor's
  default layer for it is one of them.
* ``torch.export`` captures its float64 copy (the first step of ``certify.capture.export``) and the
  exported program computes what the module does.
* The factory is seeded and the forward pass deterministic, so a saved state dict reloads
  into the same function.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from certify.models import small as small_models
from certify.cli import main
from certify.cli.attacks import DEFAULT_LAYERS

BLOCK = ("attn.q", "attn.k", "attn.v", "attn.out", "fc1", "fc2")
LAYERS = ["patch", *(f"blocks.{i}.{name}" for i in range(2) for name in BLOCK), "head"]


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_layers_are_named_by_module_path():
    model = small_models.build("mnist", "vit")
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers == LAYERS
    assert DEFAULT_LAYERS["vit"] in layers
    assert model(images()).shape == (2, small_models.CLASSES)


def test_export_of_the_float64_copy_computes_the_module():
    model = copy.deepcopy(small_models.mnist_vit()).double().eval()
    x = images().double()
    program = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-12)


def test_factory_is_seeded_and_forward_deterministic():
    a, b = small_models.mnist_vit().eval(), small_models.mnist_vit().eval()
    x = images(8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a(x), a(x))
        torch.testing.assert_close(a(x[:2]), a(x)[:2])  # no mixing across the batch


def test_backdoor_command_accepts_the_vit():
    assert main(["backdoor", "--model", "vit", "--help"]) == 0
