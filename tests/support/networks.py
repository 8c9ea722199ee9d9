"""Random small networks for the soundness tests, as hypothesis strategies of
``(model, input_shape)`` pairs (float64, eval mode), and the problem built on one of them.

* ``ACTIVATIONS``: the activation modules the strategies draw from.
* ``mlps``, ``cnns`` (one convolution with batch norm and pooling), ``deep_cnns`` (two
  convolutions), ``residual_mlps``, ``residual_cnns`` and ``dags`` (the forms of ``Dag`` that
  need a graph); ``Residual`` is the residual block they use.
* ``certification_problem``: a drawn network captured on six seeded random inputs, with
  their predicted classes.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

from certify.capture.export import capture
from certify.radii.radius import predictions

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, lambda: nn.LeakyReLU(0.1)]


@st.composite
def mlps(draw, activations=ACTIVATIONS):
    """One to three hidden layers, each with an activation drawn from ``activations``."""
    widths = draw(st.lists(st.integers(2, 12), min_size=1, max_size=3))
    classes = draw(st.integers(2, 5))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    layers, n = [nn.Flatten()], 6
    for w in widths:
        layers += [nn.Linear(n, w), draw(st.sampled_from(activations))()]
        n = w
    layers.append(nn.Linear(n, classes))
    return nn.Sequential(*layers).double().eval(), (6,)


@st.composite
def cnns(draw):
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    c = draw(st.integers(1, 3))
    pool = draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Identity()]))
    model = nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, stride=draw(st.sampled_from([1, 2]))),
        nn.BatchNorm2d(c), draw(st.sampled_from(ACTIVATIONS))(), pool, nn.Flatten(),
    )
    features = model(torch.zeros(1, 1, 6, 6)).shape[1]
    model.append(nn.Linear(features, draw(st.integers(2, 4))))
    bn = model[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    return model.double().eval(), (1, 6, 6)


@st.composite
def grouped_cnns(draw):
    """A stem, then a depthwise or grouped convolution and a transposed one (stride 2), as in
    MobileNets and decoders, before a dense head."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    groups = draw(st.integers(2, 3))
    c = groups * draw(st.integers(1, 2))
    act = draw(st.sampled_from(ACTIVATIONS))
    model = nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), act(),
        nn.Conv2d(c, c * draw(st.integers(1, 2)), 3, padding=1, stride=2, groups=groups), act(),
    )
    width = model(torch.zeros(1, 1, 6, 6)).shape[1]
    model.append(nn.ConvTranspose2d(width, 2, 2, stride=2, groups=draw(st.sampled_from([1, 2]))
                                    if width % 2 == 0 else 1))
    model.extend([act(), nn.Flatten(), nn.Linear(72, draw(st.integers(2, 4)))])
    return model.double().eval(), (1, 6, 6)


class Residual(nn.Module):
    """``main(x) + shortcut(x)``: a residual block (``nn.Identity()`` as the skip)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x):
        return self.main(x) + self.shortcut(x)


@st.composite
def residual_mlps(draw):
    """Linear, activation, then one or two blocks ``[Linear, act, Linear] + skip`` (identity
    or Linear shortcut, the first one possibly nested in an outer identity block), each
    followed by an activation, and the logits layer."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = draw(st.integers(2, 8))
    act = draw(st.sampled_from(ACTIVATIONS))
    layers = [nn.Flatten(), nn.Linear(6, w), act()]
    for _ in range(draw(st.integers(1, 2))):
        shortcut = nn.Linear(w, w) if draw(st.booleans()) else nn.Identity()
        block = Residual(nn.Sequential(nn.Linear(w, w), act(), nn.Linear(w, w)), shortcut)
        if draw(st.booleans()):  # nested: (block(x) + x)
            block = Residual(nn.Sequential(block, act()), nn.Identity())
        layers += [block, act()]
    layers.append(nn.Linear(w, draw(st.integers(2, 4))))
    return nn.Sequential(*layers).double().eval(), (6,)


@st.composite
def residual_cnns(draw):
    """Conv-BN-act, a block ``[Conv-BN-act-Conv] + skip`` (identity, or a 1x1 convolution,
    with stride 2 in both branches when it is drawn), act, pooling, Linear on 1x6x6."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    c = draw(st.integers(1, 3))
    act = draw(st.sampled_from(ACTIVATIONS))
    stride = draw(st.sampled_from([1, 2]))
    shortcut = nn.Conv2d(c, c, 1, stride=stride) if stride == 2 or draw(st.booleans()) \
        else nn.Identity()
    main = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, stride=stride), nn.BatchNorm2d(c), act(),
                         nn.Conv2d(c, c, 3, padding=1))
    model = nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), act(), Residual(main, shortcut), act(),
        draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Identity()])), nn.Flatten(),
    )
    model.append(nn.Linear(model(torch.zeros(1, 1, 6, 6)).shape[1], draw(st.integers(2, 4))))
    for bn in (model[1], main[1]):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return model.double().eval(), (1, 6, 6)


class Dag(nn.Module):
    """Forms that need a graph (a chain of steps with a stack could not hold them), on
    inputs ``(6,)``: ``kind`` picks one, ``act`` the activation, ``w`` the width.

    ``crossing``: a value used inside a residual block and after it; ``cat``: two branches
    concatenated and sliced; ``logits_added``: the logits are a sum of two branches;
    ``batchnorm_first``: a batch norm that follows no affine layer (a ``ScaleShift``);
    ``softmax_output``: softmax at the output (dropped: it keeps the argmax); ``alpha``:
    ``a + 2 b`` and ``a - x`` (the input itself, a constant of every layer's downstream
    map); ``constant``: arithmetic with constants.
    """

    KINDS = ("crossing", "cat", "logits_added", "batchnorm_first", "softmax_output", "alpha",
             "constant")

    def __init__(self, kind: str, act, w: int, classes: int):
        super().__init__()
        self.kind, self.act, self.w = kind, act(), w
        self.a, self.b = nn.Linear(6, w), nn.Linear(w if kind == "crossing" else 6, w)
        self.c = nn.Linear(2 * w - 1 if kind == "cat" else w, classes)
        self.d = nn.Linear(6, classes)
        self.bn = nn.BatchNorm1d(6)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        act, kind = self.act, self.kind
        if kind == "crossing":
            p = self.a(x)
            q = act(self.b(act(p)))
            return self.c(act(q + p) + q)
        if kind == "cat":
            both = torch.cat([act(self.a(x)), torch.tanh(self.b(x))], 1)
            return self.c(both[:, 1:])
        if kind == "logits_added":
            return self.c(act(self.a(x))) + self.d(x)
        if kind == "batchnorm_first":
            return self.c(act(self.a(self.bn(x))))
        if kind == "softmax_output":
            return torch.softmax(self.c(act(self.a(x))), dim=-1)
        if kind == "alpha":
            both = torch.add(act(self.a(x)), act(self.b(x)), alpha=2)
            return self.c(both - x[:, 6 - self.w:])
        return self.c(act(self.a(x)) * 0.5 + 1.0)


@st.composite
def dags(draw):
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    model = Dag(draw(st.sampled_from(Dag.KINDS)), draw(st.sampled_from(ACTIVATIONS)),
                 draw(st.integers(2, 6)), draw(st.integers(2, 4)))
    return model.double().eval(), (6,)


@st.composite
def deep_cnns(draw):
    """Two convolutions, so that backward passes walk through a convolution."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    c1, c2 = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    act = draw(st.sampled_from(ACTIVATIONS))
    pool = draw(st.sampled_from([nn.AvgPool2d(2), nn.MaxPool2d(2), nn.Identity()]))
    model = nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=draw(st.integers(0, 1))), act(),
        nn.Conv2d(c1, c2, 3, stride=draw(st.sampled_from([1, 2])), padding=1), act(), pool,
        nn.Flatten(),
    ).double()
    features = model(torch.zeros(1, 1, 8, 8, dtype=torch.float64)).shape[1]
    model.append(nn.Linear(features, draw(st.integers(2, 4))).double())
    return model.eval(), (1, 8, 8)


def certification_problem(model_and_shape, seed: int):
    """The captured graph, six random inputs and their predicted classes."""
    model, shape = model_and_shape
    torch.manual_seed(seed)
    x = torch.randn(6, *shape, dtype=torch.float64)
    net = capture(model, x)
    return net, x, predictions(net, x)[0]
