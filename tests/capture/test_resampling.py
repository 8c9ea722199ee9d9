"""Padding by the input's own entries and interpolation, as ``torch.export`` writes them
(``aten.pad`` with a mode, ``aten.upsample_*``): small CNNs drawn by hypothesis (convolution,
reflect / replicate / circular padding, as a module, ``F.pad`` or a convolution's
``padding_mode``, convolution, ``nn.Upsample`` or ``F.interpolate`` in every mode, by a size
or scale factors, convolution, flatten, dense head) are captured as graphs with one ``Pad``
and one ``Interpolate`` node that compute what the module does (as do the ATen operators
called directly, with their arguments in either overload); a weight change inside a
certified layer's radius never changes a class; ``certify check`` confirms every claim of
their certificates; and what capture cannot read is refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from weight_attacks import assert_attacks_inside_fail

from certify.capture import UnsupportedModelError, capture
from certify.certificate import certify_network
from certify.check import check
from certify.graph.operators import Interpolate, Pad
from certify.radii import layer_radii, predictions


class Resize(nn.Module):
    """``F.interpolate`` with its arguments (``recompute_scale_factor``: the export then
    holds the output size instead of the factors)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x):
        return F.interpolate(x, **self.kwargs)


class FPad(nn.Module):
    def __init__(self, pad, mode):
        super().__init__()
        self.pad, self.mode = pad, mode

    def forward(self, x):
        return F.pad(x, self.pad, mode=self.mode)


@st.composite
def paddings(draw, axes: int, c: int):
    """A padding module and the convolution after it (3 x 3 or 3 wide, ``c`` channels)."""
    mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
    conv = nn.Conv2d if axes == 2 else nn.Conv1d
    if draw(st.integers(0, 3)) == 0:  # the convolution's own padding_mode
        return nn.Identity(), conv(c, c, 3, padding=draw(st.integers(1, 2)), padding_mode=mode)
    pad = draw(st.lists(st.integers(0, 2), min_size=2 * axes, max_size=2 * axes))
    modules = {"reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d),
               "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d),
               "circular": (nn.CircularPad1d, nn.CircularPad2d)}
    module = modules[mode][axes - 1](tuple(pad)) if draw(st.booleans()) else FPad(pad, mode)
    return module, conv(c, c, 3)


@st.composite
def resizes(draw, axes: int):
    """An upsampling (or downsampling) module in any mode, by a size or scale factors."""
    mode = draw(st.sampled_from(["nearest", "nearest-exact",
                                 "linear" if axes == 1 else "bilinear"]))
    align = draw(st.booleans()) if "linear" in mode else None
    if draw(st.booleans()):
        how = {"size": tuple(draw(st.integers(2, 9)) for _ in range(axes))}
    else:
        how = {"scale_factor": tuple(draw(st.sampled_from([0.7, 1.0, 1.1, 1.5, 1.7, 2.0, 2.5]))
                                     for _ in range(axes))}
    if draw(st.booleans()):
        return nn.Upsample(**how, mode=mode, align_corners=align)
    return Resize(**how, mode=mode, align_corners=align,
                  recompute_scale_factor=draw(st.sampled_from([None, True]))
                  if "scale_factor" in how else None)


@st.composite
def models(draw, c: int = 4, n: int = 6, batch: int = 4):
    """conv - act - pad - conv - act - resize - conv - flatten - linear on ``2 x n (x n)``
    inputs, ``c`` channels."""
    axes = draw(st.integers(1, 2))
    conv = nn.Conv2d if axes == 2 else nn.Conv1d
    pad, padded_conv = draw(paddings(axes, c))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    model = nn.Sequential(conv(2, c, 3, padding=1), nn.Tanh(), pad, padded_conv, nn.ReLU(),
                          draw(resizes(axes)), conv(c, 2, 2), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(batch, 2, *[n] * axes)
    model(x)  # materialise the head
    return model.double().eval(), x.double()


@settings(max_examples=20, deadline=None)
@given(models())
def test_resampling_is_captured_exactly(problem):
    model, x = problem
    network = capture(model, x)
    kinds = [type(n.op) for n in network.nodes]
    assert kinds.count(Pad) == 1 and kinds.count(Interpolate) == 1
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)
    y = torch.randn(7, *x.shape[1:], dtype=torch.float64)  # any batch, not only the example
    torch.testing.assert_close(network(y), model(y), rtol=1e-12, atol=1e-12)


# Certification runs every layer's radius search: small models keep it to seconds.
SMALL = models(c=2, n=5, batch=3)


@settings(max_examples=4, deadline=None)
@given(SMALL, st.sampled_from(["fro", "max"]))
def test_attacks_inside_a_certified_radius_never_change_the_class(problem, norm):
    """Every layer's lower radius, from the first (the change passes through the padding
    and the interpolation) to the head: projected gradient descent and random points at
    0.999 of it never change a class."""
    model, x = problem
    network = capture(model, x)
    y = predictions(network, x)[0]
    for index in network.affine_indices:
        r = layer_radii(network, x, index, norm)
        assert torch.all((0 <= r.lower) & (r.lower <= r.upper))
        assert_attacks_inside_fail(network, x, y, index, r, norm, False)


@settings(max_examples=3, deadline=None)
@given(SMALL)
def test_certify_check_confirms_their_certificates(problem):
    model, x = problem
    network = capture(model, x)
    result = certify_network(network, x, model_sha256="0" * 64, progress=False)
    report = check(result.document, result.witnesses, network, x.numpy())
    assert report.ok, report


aten = torch.ops.aten
SPELLINGS = {  # the ATen operators themselves (either overload), on a 2 x 4 x 4 map
    "reflection_pad2d": (lambda t: aten.reflection_pad2d(t, [1, 1, 2, 0]),
                         Pad((1, 1, 2, 0), "reflect")),
    "replication_pad1d": (lambda t: aten.replication_pad1d(t.flatten(2), [1, 2]),
                          Pad((1, 2), "replicate")),
    "_pad_circular": (lambda t: aten._pad_circular(t, [1, 1, 0, 2]),
                      Pad((1, 1, 0, 2), "circular")),
    "upsample_bilinear2d": (lambda t: aten.upsample_bilinear2d(t, [7, 9], False, 1.5, None),
                            Interpolate((7, 9), "bilinear", False, (1.5, None))),
    "upsample_nearest2d": (lambda t: aten.upsample_nearest2d(t, [7, 9], 1.1, 2.1),
                           Interpolate((7, 9), "nearest", False, (1.1, 2.1))),
    "upsample_nearest1d": (lambda t: aten.upsample_nearest1d(t.flatten(2), [20], scales=1.45),
                           Interpolate((20,), "nearest", False, (1.45,))),
    "upsample_linear1d.vec": (lambda t: aten.upsample_linear1d.vec(t.flatten(2), None, True,
                                                                   [1.5]),
                              Interpolate((24,), "linear", True)),
}


class Spelled(nn.Module):
    def __init__(self, resample):
        super().__init__()
        self.conv, self.resample, self.head = nn.Conv2d(1, 2, 3), resample, nn.LazyLinear(3)

    def forward(self, x):
        return self.head(self.resample(self.conv(x)).flatten(1))


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_aten_spellings_are_read_with_their_arguments(name):
    resample, expected = SPELLINGS[name]
    torch.manual_seed(1)
    model, x = Spelled(resample), torch.randn(3, 1, 6, 6)
    model(x)
    model, x = model.double().eval(), x.double()
    network = capture(model, x)
    assert [n.op for n in network.nodes if isinstance(n.op, (Pad, Interpolate))] == [expected]
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)


# What the model asked for, and what the message offers instead (the supported list).
REFUSED = [
    (nn.Upsample(scale_factor=2, mode="bicubic"), r"upsample_bicubic2d",
     "nearest, nearest-exact, linear and bilinear interpolation (nn.Upsample, F.interpolate"),
    (Resize(scale_factor=0.5, mode="bilinear", antialias=True), r"_upsample_bilinear2d_aa",
     "reflect/replicate/circular padding"),
    (FPad([-1, 2, 0, 0], "circular"), r"circular padding with a negative amount",
     "supported: amounts >= 0"),
]


@pytest.mark.parametrize("resample, message, offered", REFUSED)
def test_what_capture_cannot_read_is_refused_by_name(resample, message, offered):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), resample, nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(2, 1, 8, 8)
    model(x)
    with pytest.raises(UnsupportedModelError, match=message) as refused:
        capture(model.double().eval(), x.double())
    assert offered in str(refused.value)
