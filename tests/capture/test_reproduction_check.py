"""Capture compares its graph with the module on the example batch: up to float64 rounding,
which scales with the size of each input's logits, and no further (``export._reproduces``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certify.capture import UnsupportedModelError, capture
from certify.capture import aten as aten_rules
from certify.capture.export import _reproduces
from certify.graph.operators import Activation


def test_rounding_is_measured_against_each_inputs_logits():
    # EfficientNet-B7 with calibrated batch norms, one thread: logits up to 9.6e6 and an
    # error of 0.056 (float64 rounding through 800 operators), in an entry near 3 too, which
    # an entrywise relative tolerance refused; an error of 1e-5 of the logits' size is not
    # rounding, nor is one of 1e-5 where the logits are small.
    expected = torch.tensor([[9.6e6, 3.0, -2.0e5], [1.0, 2.0, 3.0]], dtype=torch.float64)
    rounding = torch.tensor([[0.0, 0.056, 0.0], [0.0, 0.0, 1e-9]], dtype=torch.float64)
    assert _reproduces(expected + rounding, expected)
    assert not torch.allclose(expected + rounding, expected, rtol=1e-9, atol=1e-9)
    assert not _reproduces(expected + torch.tensor([[0.0, 96.0, 0.0], [0.0, 0.0, 0.0]],
                                                   dtype=torch.float64), expected)
    assert not _reproduces(expected + torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1e-5]],
                                                   dtype=torch.float64), expected)


def test_a_misread_operator_is_refused(monkeypatch):
    # Teeth: ReLU planted as LeakyReLU(0.01) changes the logits by far more than rounding.
    def misread(b, fx, where, x, *args):
        return b.node(Activation("leaky_relu", 0.01), [x], fx)

    monkeypatch.setitem(aten_rules.BUILDERS, torch.ops.aten.relu, misread)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double().eval()
    with pytest.raises(UnsupportedModelError, match="does not reproduce the module"):
        capture(model, torch.randn(4, 3, dtype=torch.float64))
