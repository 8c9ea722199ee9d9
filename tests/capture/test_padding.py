"""Padding as ``torch.export`` writes it (``aten.pad``, ``aten.constant_pad_nd``): zero
padding is captured exactly, however the model spells it, and padding by a nonzero constant
is refused with a message that names what the model asked for (reflect, replicate and
circular padding: ``tests/capture/test_resampling.py``).

Regression: ``aten.pad(self, pad, mode, value)`` was read as ``(self, pad, value, mode)``, so
``F.pad(x, p, value=0.0)`` and ``nn.ZeroPad2d`` were refused as "mode=0.0, value=constant"
and reflect padding was reported as "mode='constant', value=reflect"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from certify.capture import UnsupportedModelError, capture


class Padded(nn.Module):
    """``pad`` of a 1 x 4 x 4 image, then a convolution and a dense head."""

    def __init__(self, pad):
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(self.pad(x))).flatten(1))


def padded(pad, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = Padded(pad)
    x = torch.randn(3, 1, 4, 4)
    model(x)  # materialise the lazy head
    return model.double().eval(), x.double()


SPELLINGS = {
    "F.pad": lambda p: (lambda x: F.pad(x, p)),
    "F.pad, constant": lambda p: (lambda x: F.pad(x, p, "constant")),
    "F.pad, value=0.0": lambda p: (lambda x: F.pad(x, p, mode="constant", value=0.0)),
    "F.pad, value=-0.0": lambda p: (lambda x: F.pad(x, p, value=-0.0)),
    "ZeroPad2d": lambda p: nn.ZeroPad2d(p),
    "ConstantPad2d(0)": lambda p: nn.ConstantPad2d(p, 0.0),
    "constant_pad_nd": lambda p: (lambda x: torch.constant_pad_nd(x, p, 0.0)),
}


@given(st.sampled_from(sorted(SPELLINGS)), st.tuples(*[st.integers(0, 2)] * 4),
       st.integers(0, 2**16))
def test_zero_padding_is_captured_exactly(spelling, amounts, seed):
    model, x = padded(SPELLINGS[spelling](list(amounts)), seed)
    network = capture(model, x)
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad, message", [
    (nn.ConstantPad2d(1, 0.5), r"the constant 0\.5"),
    (lambda x: F.pad(x, (1, 1, 1, 1), value=-1.0), r"the constant -1\.0"),
])
def test_constant_padding_is_refused_by_name(pad, message):
    model, x = padded(pad)
    with pytest.raises(UnsupportedModelError, match=message) as refused:
        capture(model, x)
    assert "supported: zero padding" in str(refused.value)
