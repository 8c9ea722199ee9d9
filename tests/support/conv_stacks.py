"""Random convolution stacks with a residual block, and a weight region on one of their
layers: the problems of the enclosure and ball-offset tests (``bounds/``).

* ``ACTIVATIONS``: the activations drawn (those of ``networks`` and ELU).
* ``stack``: ``Conv-BN-act``, a residual block, act, pooling, ``Linear-act-Linear`` on
  ``1 x 6 x 6``.
* ``problems``: a hypothesis strategy of ``(net, x, index, norm, fraction)``: a captured
  stack, three inputs, a layer with enclosed downstream nodes, a norm and a radius fraction.
* ``region_and_radius``: every node's value, the layer's columns and region, and a radius of
  that fraction of the layer's weight norm.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from networks import Residual
from torch import nn

from certify.bounds.linear import enclosed
from certify.capture.export import capture
from certify.radii.local_search import region
from certify.radii.radius import _columns

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, lambda: nn.LeakyReLU(0.1), nn.ELU]


def stack(seed: int, act, c: int, pool: nn.Module, stride: int) -> nn.Module:
    """``Conv-BN-act``, a residual block ``[Conv-BN-act-Conv] + skip``, act, pooling,
    ``Linear-act-Linear`` on ``1 x 6 x 6``."""
    torch.manual_seed(seed)
    shortcut = nn.Conv2d(c, c, 1, stride=stride) if stride == 2 else nn.Identity()
    main = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, stride=stride), nn.BatchNorm2d(c),
                         act(), nn.Conv2d(c, c, 3, padding=1))
    model = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), act(),
                          Residual(main, shortcut), act(), pool, nn.Flatten())
    features = model(torch.zeros(1, 1, 6, 6)).shape[1]
    model.extend([nn.Linear(features, 5), act(), nn.Linear(5, 3)])
    for bn in (model[1], main[1]):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


@st.composite
def problems(draw):
    model = stack(draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(ACTIVATIONS)),
                  draw(st.integers(1, 3)), draw(st.sampled_from([nn.AvgPool2d(2),
                                                                 nn.MaxPool2d(2), nn.Identity()])),
                  draw(st.sampled_from([1, 2])))
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))))
    net = capture(model, x)
    index = draw(st.sampled_from([i for i in net.affine_indices if enclosed(net, i)]))
    return net, x, index, draw(st.sampled_from(["fro", "max"])), draw(st.floats(0.01, 1.0))


def region_and_radius(net, x, index, norm, fraction):
    """Every node's value, the layer's columns ``P~`` and region, and a radius ``fraction``
    of its weight's norm."""
    values = net.values(x)
    layer = net.layer(index)
    P = _columns(layer, values[net.input_of(index)], False)
    where = region(layer, values[index], P, norm)
    size = torch.linalg.matrix_norm(layer.matrix) if norm == "fro" else layer.matrix.abs().max()
    return values, P, where, torch.full((len(x),), fraction * float(size), dtype=torch.float64)
