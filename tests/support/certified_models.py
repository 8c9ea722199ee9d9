"""Small real models certified through the command line, for the checker's tests.

``--factory certified_models:<name>`` targets (pytest puts ``tests/support/`` on ``sys.path``):
an MLP, a CNN with max pooling, a ResNet block with a projection shortcut, and a deep ReLU
MLP (for the optimised slopes), each with
data that carries labels ``y``. ``certify(tmp, name)`` writes the model's state dict and
data, runs ``certify model`` with compression checks, and returns the command-line
arguments that ``certify check`` needs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from certify.cli import main


class Block(nn.Module):
    """``conv(relu(conv(x))) + proj(x)``: a residual block whose shortcut is a 1x1 conv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.proj = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x))) + self.proj(x)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12),
                         nn.Tanh(), nn.Linear(12, 4))


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12, 3))


def resnet() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), Block(2, 4), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(36, 3))


def deep_mlp() -> nn.Module:
    """Six ReLU layers, where CROWN's fixed slopes compound (``--optimise`` pays)."""
    torch.manual_seed(3)
    layers = [nn.Flatten(), nn.Linear(16, 16), nn.ReLU()]
    for _ in range(5):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 4))


INPUTS = {"mlp": (4, 4), "cnn": (1, 10, 10), "resnet": (1, 6, 6), "deep_mlp": (4, 4)}
COMPRESSIONS = {"mlp": ["rank=2@3", "bits=3@1", "prune=0.4@5", "bits_per_channel=4"],
                "cnn": ["rank=1@0", "prune=0.5"],
                "resnet": ["bits=4@2.proj", "prune_global=0.1@2.proj,6"]}


def certify(tmp, name: str, inputs: int = 12, options: tuple[str, ...] = ()) -> list[str]:
    """Certify model ``name`` into ``tmp/cert.json`` (with more ``certify model``
    ``options``); the arguments of ``certify check``."""
    model = globals()[name]()
    torch.save(model.state_dict(), tmp / "model.pt")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(inputs, *INPUTS[name]))
    classes = model(torch.from_numpy(x[:1]).float()).shape[-1]
    np.savez(tmp / "data.npz", x=x, y=rng.integers(0, classes, inputs))
    args = [str(tmp / "model.pt"), "--factory", f"certified_models:{name}",
            "--data", str(tmp / "data.npz")]
    compress = [a for c in COMPRESSIONS.get(name, ()) for a in ("--compress", c)]
    assert main(["model", *args, "--out", str(tmp / "cert.json"), *compress, *options]) == 0
    return args
