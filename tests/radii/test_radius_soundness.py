"""Soundness of the per-layer radii: attacks inside ``lower`` never change a class,
witnesses at ``upper`` always do, and the last dense layer is exact (THEORY.md 3 to 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from networks import Dag, certification_problem, cnns, dags, mlps, residual_cnns, residual_mlps
from torch import nn
from weight_attacks import assert_attacks_inside_fail, perturbed_classes, pgd_attack

from certify.capture.export import UnsupportedModelError, capture
from certify.graph.operators import Add
from certify.radii.radius import layer_radii

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
        assert_attacks_inside_fail(net, x, y, index, r, norm, bias)


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
    """An LSTM with projections (``proj_size``), which capture does not unroll."""

    def __init__(self):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(3, 4, batch_first=True, proj_size=2), nn.Linear(2, 2)

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
    """Attention with a mask that differs from input to input, or nn.MultiheadAttention with
    a learned extra key and value (add_bias_kv)."""

    def __init__(self, varying: bool):
        super().__init__()
        self.varying, self.q, self.head = varying, nn.Linear(4, 4), nn.Linear(4, 2)
        if not varying:
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True, add_bias_kv=True)

    def forward(self, x):
        if self.varying:
            q = self.q(x)
            mask = torch.arange(len(x))[:, None, None] >= torch.arange(x.shape[1])
            y = F.scaled_dot_product_attention(q, q, q, attn_mask=mask | mask.mT)
        else:
            y = self.mha(x, x, x, need_weights=False)[0]
        return self.head(y.mean(1))


@pytest.mark.parametrize("module,shape,match", [
    (nn.Sequential(nn.Linear(3, 3), nn.LogSoftmax(dim=-1), nn.Linear(3, 2)), (3,),
     "log-softmax is only supported at the output"),
    (_Recurrent(), (5, 3), r"an LSTM with proj_size \(module 'lstm' \(LSTM\)"),
    (_TwoBranches(lambda a, b: a / b), (3,), "division by a computed tensor"),
    (_TwoBranches(lambda a, b: a / b.norm(dim=-1, keepdim=True)), (3,),
     "division by the norm of another tensor"),
    (nn.Sequential(nn.Linear(3, 6), nn.Flatten(0)), (3,), "merges the batch axis"),
    (_Attention(varying=True), (3, 4), "varies along the batch axis"),
    (_Attention(varying=False), (3, 4), r"module 'mha' \(MultiheadAttention\) has add_bias_kv"),
    (nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)), (3,),
     r"module '0' \(Embedding\) looks up integer tokens"),
    (nn.Sequential(nn.Conv3d(1, 2, 2), nn.Flatten(), nn.Linear(16, 2)), (1, 3, 3, 3),
     "conv3d.default is not supported"),
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
    for model in (Dag("logits_added", nn.ReLU, 3, 2), Dag("crossing", nn.ReLU, 3, 2)):
        net = capture(model.double().eval(), (6,))
        z = torch.randn(4, 6, dtype=torch.float64)
        assert torch.allclose(net(z), model(z), atol=1e-12)
    crossing = capture(Dag("crossing", nn.ReLU, 3, 2).double().eval(), (6,))
    a, b = (crossing.affine_indices[crossing.layer_names.index(n)] for n in ("a", "b"))
    # q = act(b(...)) feeds the addition inside the block and the one after it.
    (q,) = crossing.consumers[b]
    assert [type(crossing.nodes[k].op) for k in crossing.consumers[q]] == [Add, Add]
    assert set(crossing.consumers[q]) <= set(crossing.downstream(a))


@settings(max_examples=15, deadline=None)
@given(dags(), st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_forms_a_chain_refused_now_certify(model_and_shape, norm, bias, seed):
    """Every form of ``Dag`` certifies: sound radii, witnesses that change the class."""
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
