"""Training a small model in the tests themselves: ``trained`` runs full-batch Adam on the
digits of ``certify.models.small.load("digits")``."""

from __future__ import annotations

import torch
from torch import nn


def trained(model: nn.Module, digits, steps: int) -> nn.Module:
    """``model`` after ``steps`` full-batch Adam steps (lr 1e-2) on the digits, in float64."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(digits.x_train), digits.y_train).backward()
        optimiser.step()
    return model.double().eval()
