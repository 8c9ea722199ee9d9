"""Model factories for ``tests/formats/test_loading.py``: ``--factory model_factories:<name>``
targets.

pytest puts ``tests/support/`` on ``sys.path`` (``pythonpath`` in ``pyproject.toml``), so
``model_factories:build_mlp`` is importable from the tests exactly as a user's own
``mypackage.models:build`` would be from the command line.
"""

from __future__ import annotations

import torch
from torch import nn


def build_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def build_mlp_wide() -> nn.Module:
    """Same keys as ``build_mlp``, different hidden width: every weight has the wrong shape."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


def build_cnn() -> nn.Module:
    """Conv-BN-ReLU-MaxPool, Conv-BN-ReLU-AvgPool, Flatten, Linear on 1x28x28 inputs."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )
    # Non-trivial batch-norm statistics and affine parameters, as after training.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


class TinyNet(nn.Module):
    """A user-defined class: ``torch.save(TinyNet())`` pickles a reference to it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def needs_argument(hidden: int) -> nn.Module:
    return nn.Linear(hidden, 2)


def not_a_module() -> int:
    return 42


def raises() -> nn.Module:
    raise RuntimeError("out of coffee")


NOT_CALLABLE = 3
