"""Soundness of the per-layer radii: attacks inside ``lower`` never change a class,
witnesses at ``upper`` always do, and the last dense layer is exact (THEORY.md 3 to 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

from certify.capture import UnsupportedModelError, capture
from certify.graph import Graph
from certify.operators import Add, Affine
from certify.radius import layer_radii, predictions

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, lambda: nn.LeakyReLU(0.1)]


@st.composite
def mlps(draw):
    widths = draw(st.lists(st.integers(2, 12), min_size=1, max_size=3))
    classes = draw(st.integers(2, 5))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    layers, n = [nn.Flatten()], 6
    for w in widths:
        layers += [nn.Linear(n, w), draw(st.sampled_from(ACTIVATIONS))()]
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


class _Dag(nn.Module):
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
    model = _Dag(draw(st.sampled_from(_Dag.KINDS)), draw(st.sampled_from(ACTIVATIONS)),
                 draw(st.integers(2, 6)), draw(st.integers(2, 4)))
    return model.double().eval(), (6,)


def _weight(layer: Affine, bias: bool) -> torch.Tensor:
    """The weight matrix, with the bias as its last column when the bias moves too."""
    return torch.cat([layer.matrix, layer.bias[:, None]], dim=1) if bias else layer.matrix


def _columns(layer: Affine, h: torch.Tensor, bias: bool) -> torch.Tensor:
    """The layer input as columns ``(B, n, L)``, with a row of ones when the bias moves."""
    P = layer.patches(h)
    return torch.cat([P, torch.ones_like(P[:, :1])], dim=1) if bias else P


def _apply(layer: Affine, weight, P, bias: bool, out_shape) -> torch.Tensor:
    """The layer's output with a per-input weight ``(B, m, n)`` (the fixed bias added)."""
    Z = torch.matmul(weight, P)
    if not bias:
        Z = Z + layer.bias[:, None]
    return layer.uncolumns(Z, out_shape)


def perturbed_classes(net: Graph, x, index, D, bias) -> torch.Tensor:
    """Forward pass with layer ``index``'s weight replaced by ``W + D`` (per input)."""
    layer = net.layer(index)
    values = net.values(x)
    P = _columns(layer, values[net.input_of(index)], bias)
    Z = _apply(layer, _weight(layer, bias) + D, P, bias, values[index].shape[1:])
    return net.run(index, Z, values).argmax(-1)


def pgd_attack(net, x, index, radius, norm, bias, steps=40) -> torch.Tensor:
    """Projected gradient descent on the smallest margin over ``||D|| <= radius``."""
    layer = net.layer(index)
    W = _weight(layer, bias)
    y, _ = predictions(net, x)
    values = net.values(x)
    P = _columns(layer, values[net.input_of(index)], bias)
    out_shape = values[index].shape[1:]
    D = (torch.rand(len(x), *W.shape, dtype=W.dtype) - 0.5) * 1e-3
    for _ in range(steps):
        D.requires_grad_(True)
        logits = net.run(index, _apply(layer, W + D, P, bias, out_shape), values)
        other = logits.scatter(-1, y[:, None], -torch.inf).amax(-1)
        margin = logits.gather(-1, y[:, None])[:, 0] - other
        (grad,) = torch.autograd.grad(margin.sum(), D)
        with torch.no_grad():
            if norm == "fro":
                step = grad / torch.linalg.matrix_norm(grad).clamp_min(1e-300)[:, None, None]
                D = D - 0.25 * radius[:, None, None] * step
                scale = (radius / torch.linalg.matrix_norm(D).clamp_min(1e-300)).clamp(max=1.0)
                D = D * scale[:, None, None]
            else:
                D = D - 0.25 * radius[:, None, None] * torch.sign(grad)
                D = torch.maximum(torch.minimum(D, radius[:, None, None]), -radius[:, None, None])
    return D.detach()


def random_ball(shape, radius, norm) -> torch.Tensor:
    D = torch.randn(*shape, dtype=torch.float64)
    if norm == "fro":
        return D * (radius / torch.linalg.matrix_norm(D))[:, None, None]
    return torch.sign(D) * radius[:, None, None]  # a vertex of the max-norm ball


def certification_problem(model_and_shape, seed: int):
    """The captured graph, six random inputs and their predicted classes."""
    model, shape = model_and_shape
    torch.manual_seed(seed)
    x = torch.randn(6, *shape, dtype=torch.float64)
    net = capture(model, x)
    return net, x, predictions(net, x)[0]


PROBLEMS = (st.one_of(mlps(), cnns(), residual_mlps(), residual_cnns(), dags()),
            st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None)
@given(*PROBLEMS)
def test_attacks_inside_lower_never_change_the_class(model_and_shape, norm, bias, seed):
    net, x, y = certification_problem(model_and_shape, seed)
    for index in net.affine_indices:
        r = layer_radii(net, x, index, norm, bias)
        assert torch.all(r.lower <= r.upper)
        assert torch.all(r.lower >= 0)
        # lower = inf (the layer's input is 0: no weight change moves anything): attack big.
        inside = torch.where(torch.isfinite(r.lower), 0.999 * r.lower, torch.full_like(r.lower, 1e6))
        W = _weight(net.layer(index), bias)
        for D in (pgd_attack(net, x, index, inside, norm, bias),
                  random_ball((len(x), *W.shape), inside, norm)):
            assert torch.equal(perturbed_classes(net, x, index, D, bias), y), (
                f"layer {r.layer}, {norm}: an attack inside 0.999 * lower changed a class"
            )


@settings(max_examples=25, deadline=None)
@given(*PROBLEMS)
def test_witnesses_change_the_class_and_match_upper(model_and_shape, norm, bias, seed):
    net, x, y = certification_problem(model_and_shape, seed)
    for index in net.affine_indices:
        r = layer_radii(net, x, index, norm, bias)
        upper, D = r.upper, r.witness.matrix()
        found = torch.isfinite(upper)
        changed = perturbed_classes(net, x, index, D, bias) != y
        assert torch.all(changed[found])
        measured = torch.linalg.matrix_norm(D) if norm == "fro" else D.abs().amax(dim=(-2, -1))
        assert torch.allclose(measured[found], upper[found], rtol=1e-12)


@given(mlps(), st.sampled_from(["fro", "max"]), st.booleans())
@settings(max_examples=20, deadline=None)
def test_last_layer_lower_equals_upper(model_and_shape, norm, bias):
    model, shape = model_and_shape
    x = torch.randn(5, *shape, dtype=torch.float64)
    net = capture(model, x)
    assert net.is_last_dense(net.affine_indices[-1])
    r = layer_radii(net, x, net.affine_indices[-1], norm, bias)
    assert r.method == "exact"
    np.testing.assert_allclose(r.lower.numpy(), r.upper.numpy(), rtol=1e-8)


@settings(max_examples=10, deadline=None)
@given(cnns())
def test_batchnorm_is_folded_and_outputs_agree(model_and_shape):
    model, shape = model_and_shape
    x = torch.randn(4, *shape, dtype=torch.float64)
    net = capture(model, x)
    assert torch.allclose(net(x), model(x), atol=1e-12)
    assert net.layer_names == ["0+1", "5"]  # the convolution carries its batch norm


class _TwoBranches(nn.Module):
    """``combine(relu(a(x)), tanh(b(x)))`` followed by a Linear layer."""

    def __init__(self, combine):
        super().__init__()
        self.a, self.b, self.out, self.combine = nn.Linear(3, 3), nn.Linear(3, 3), \
            nn.Linear(3, 2), combine

    def forward(self, x):
        return self.out(self.combine(torch.relu(self.a(x)), torch.tanh(self.b(x))))


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class _Shared(nn.Module):
    """One Linear module called twice: its weight is in two layers."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.a(torch.relu(self.a(x))))


class _Attention(nn.Module):
    """Attention with a causal mask, or nn.MultiheadAttention (it moves the batch axis)."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal, self.q, self.head = causal, nn.Linear(4, 4), nn.Linear(4, 2)
        if not causal:
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        if self.causal:
            q = self.q(x)
            y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        else:
            y = self.mha(x, x, x, need_weights=False)[0]
        return self.head(y.mean(1))


@pytest.mark.parametrize("module,shape,match", [
    (nn.Sequential(nn.Linear(3, 3), nn.LogSoftmax(dim=-1), nn.Linear(3, 2)), (3,),
     "log-softmax is only supported at the output"),
    (_Recurrent(), (5, 3), r"lstm\.\w+ is not supported \(module 'lstm' \(LSTM\)"),
    (_TwoBranches(lambda a, b: a / b), (3,), "division by a computed tensor"),
    (_TwoBranches(lambda a, b: a / b.norm(dim=-1, keepdim=True)), (3,),
     "division by the norm of another tensor"),
    (nn.Sequential(nn.Linear(3, 3), nn.Unflatten(1, (1, 3)), nn.LayerNorm((1, 3)),
                   nn.Flatten(), nn.Linear(3, 2)), (3,), "layer norm over 2 axes"),
    (_Attention(causal=True), (3, 4), "scaled_dot_product_attention with a mask, is_causal"),
    (_Attention(causal=False), (3, 4), r"module 'mha' \(MultiheadAttention\) moves the batch"),
    (nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)), (3,),
     r"module '0' \(Embedding\) looks up integer tokens"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 2)), (2, 4, 4),
     "groups=2"),
    (nn.Sequential(nn.ReLU()), (3,), "no layer with a weight parameter"),
    (_Shared(), (3,),
     "'a.weight' is used by two layers"),
])
def test_unsupported_models_are_named(module, shape, match):
    with pytest.raises(UnsupportedModelError, match=match):
        capture(module.double(), shape)


@settings(max_examples=10, deadline=None)
@given(st.one_of(residual_mlps(), residual_cnns()))
def test_residual_models_capture_to_graphs_that_compute_the_model(model_and_shape):
    model, shape = model_and_shape
    x = torch.randn(4, *shape, dtype=torch.float64)
    net = capture(model, x)
    assert torch.allclose(net(x), model(x), atol=1e-12)
    assert sum(isinstance(node.op, Add) for node in net.nodes) >= 1
    # Every affine module appears once (BatchNorm folded), under its module path.
    modules = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert [name.split("+")[0] for name in net.layer_names] == modules
    # A run from any node with the other nodes' values gives the same logits, and a changed
    # node changes only the nodes downstream of it.
    values = net.values(x)
    for i in range(len(net.nodes)):
        assert torch.allclose(net.run(i, values[i], values), values[-1], atol=1e-12)
        moved = net.rerun(i, values[i] + 1.0, values)
        for k in set(range(len(net.nodes))) - set(net.downstream(i)):
            assert moved[k] is values[k]


def test_residual_forms_and_what_a_graph_adds():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    # Additions in every spelling, and forms the chain of steps refused: a concatenation
    # sliced, an addition of a constant, an addition with alpha.
    for combine, kind in ((lambda a, b: a + b, Add), (torch.add, Add),
                          (lambda a, b: a.add(b), Add), (lambda a, b: a + a, Add),
                          (lambda a, b: torch.cat([a, b], 1)[:, :3], None),
                          (lambda a, b: a + 1, None),
                          (lambda a, b: torch.add(a, b, alpha=2), Add)):
        model = _TwoBranches(combine).double()
        net = capture(model, x)
        assert torch.allclose(net(x), model(x), atol=1e-12)
        if kind is not None:
            assert any(isinstance(node.op, kind) for node in net.nodes)
    alpha = capture(_TwoBranches(lambda a, b: torch.add(a, b, alpha=2)).double(), x)
    assert [node.op.alpha for node in alpha.nodes if isinstance(node.op, Add)] == [2]
    # Logits out of an addition, and a value used inside a residual block and after it.
    for model in (_Dag("logits_added", nn.ReLU, 3, 2), _Dag("crossing", nn.ReLU, 3, 2)):
        net = capture(model.double().eval(), (6,))
        z = torch.randn(4, 6, dtype=torch.float64)
        assert torch.allclose(net(z), model(z), atol=1e-12)
    crossing = capture(_Dag("crossing", nn.ReLU, 3, 2).double().eval(), (6,))
    a, b = (crossing.affine_indices[crossing.layer_names.index(n)] for n in ("a", "b"))
    # q = act(b(...)) feeds the addition inside the block and the one after it.
    (q,) = crossing.consumers[b]
    assert [type(crossing.nodes[k].op) for k in crossing.consumers[q]] == [Add, Add]
    assert set(crossing.consumers[q]) <= set(crossing.downstream(a))


@settings(max_examples=15, deadline=None)
@given(dags(), st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_forms_a_chain_refused_now_certify(model_and_shape, norm, bias, seed):
    """Every form of ``_Dag`` certifies: sound radii, witnesses that change the class."""
    net, x, y = certification_problem(model_and_shape, seed)
    model, _ = model_and_shape
    assert torch.equal(net(x).argmax(-1), model(x).argmax(-1))
    for index in net.affine_indices:
        r = layer_radii(net, x, index, norm, bias)
        assert torch.all((0 <= r.lower) & (r.lower <= r.upper))
        found = torch.isfinite(r.upper)
        assert torch.all((perturbed_classes(net, x, index, r.witness.matrix(), bias) != y)[found])
        inside = torch.where(torch.isfinite(r.lower), 0.999 * r.lower,
                             torch.full_like(r.lower, 1e6))
        D = pgd_attack(net, x, index, inside, norm, bias)
        assert torch.equal(perturbed_classes(net, x, index, D, bias), y)


@settings(max_examples=15, deadline=None)
@given(*PROBLEMS)
def test_local_bound_is_never_below_the_global_bound(model_and_shape, norm, bias, seed):
    net, x, _ = certification_problem(model_and_shape, seed)
    for index in net.affine_indices[:-1]:
        r = layer_radii(net, x, index, norm, bias)
        assert torch.all(r.lower_local >= r.lower_global)
