"""The numpy twin of the deviation bound (``certify.check.deviations``, THEORY.md section 9)
against the torch one (``certify.bounds.deviations``) and against attacks, and ``certify
check`` on the certificates it confirms.

* agreement: on random MLPs (ReLU, GELU, tanh, sigmoid, LeakyReLU, and the mobile
  activations with PReLU), CNNs (batch norm, pooling, grouped and transposed convolutions,
  residual blocks) and tiny transformers (LayerNorm, softmax attention with or without a
  causal mask, GELU, F.normalize), every layer's margin bounds equal torch's to 1e-9 of what
  the bound loses where torch's is positive, at torch's certified radius and around it, and
  are never looser than torch's by more than 1e-11 (the twin's first-order terms are the exact supports; torch's
  go through an SVD with a 1e-12 inflation); both refuse the same layers (max pooling);
* soundness: attacks (projected gradient descent, random points) at those radii never push a
  margin below the twin's bound; a node read by both F.normalize and a softmax needs the
  plain row bound for the first (the centred one is smaller);
* ``certify check`` confirms every claim of certificates whose ``method`` names
  ``deviation``, and has teeth: without ``deviation`` in the method, or with the claim raised
  1.5 times, an input the deviation bound alone certified is refuted; zeroing a twin rule
  (a remainder, a spread, the curvature) changes the bound;
* the curvatures ``sup |phi''|`` hold on a grid of the twins' own derivatives.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import cnns, grouped_cnns, mlps, residual_cnns
from torch import nn
from weight_attacks import (layer_columns, layer_weight, perturbed_classes, pgd_attack,
                            random_ball)

from certify.bounds import deviations as torch_deviations
from certify.capture.export import capture
from certify.certificate.document import certify_network
from certify.check import deviations
from certify.check.bounds import columns
from certify.check.claims import check
from certify.check.forward import NumpyGraph
from certify.check.operators import ActivationTwin, deviation_rules
from certify.check.operators.transformer import LayerNormTwin, SoftmaxTwin
from certify.radii.radius import layer_radii, predictions

AGREE = 1e-9  # relative to what the bound loses
LOOSER = 1e-11  # the twin's supports are exact: never looser than torch's beyond rounding


class Tiny(nn.Module):
    """Every row-wise operator of section 9 on four tokens of width 4: a patch convolution
    (images ``(1, 4, 4)``) or the tokens themselves (``(4, 4)``), LayerNorm, softmax
    attention with two heads (causal or not), a GELU MLP, mean pooling, F.normalize, a
    head."""

    def __init__(self, image: bool, causal: bool, act: str, classes: int):
        super().__init__()
        self.image, self.causal, self.act = image, causal, act
        self.patch = nn.Conv2d(1, 4, 2, stride=2)
        self.ln1, self.ln2 = nn.LayerNorm(4), nn.LayerNorm(4)
        self.q, self.k, self.v, self.out = (nn.Linear(4, 4) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) if self.image else x
        B, T, _ = t.shape
        h = self.ln1(t)
        q, k, v = (f(h).view(B, T, 2, 2).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        t = t + self.out(a.transpose(1, 2).reshape(B, T, 4))
        t = t + self.fc2(F.gelu(self.fc1(self.ln2(t)), approximate=self.act))
        return self.head(F.normalize(t.mean(1), dim=-1))


@st.composite
def transformers(draw):
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    image = draw(st.booleans())
    model = Tiny(image, draw(st.booleans()), draw(st.sampled_from(["none", "tanh"])),
                 draw(st.integers(2, 3)))
    return model.double().eval(), (1, 4, 4) if image else (4, 4)


def _prelu():
    module = nn.PReLU(6)
    with torch.no_grad():
        module.weight.uniform_(-1.3, 1.3)
    return module


MOBILE = [nn.SiLU, nn.Mish, nn.Hardsigmoid, lambda: nn.Hardtanh(-0.5, 0.5), nn.ReLU6, _prelu,
          lambda: nn.GELU(approximate="tanh")]


@st.composite
def mobile_mlps(draw):
    """6-6-6-c MLPs with the mobile activations (the second layer steeper, so that the hard
    ones reach their kinks)."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    act = draw(st.sampled_from(MOBILE))
    model = nn.Sequential(nn.Linear(6, 6), act(), nn.Linear(6, 6), act(),
                          nn.Linear(6, draw(st.integers(2, 4)))).double().eval()
    with torch.no_grad():
        model[2].weight *= 3.0
    return model, (6,)


GRAPHS = st.one_of(mlps(), mobile_mlps(), cnns(), grouped_cnns(), residual_cnns(),
                   transformers())


def _problem(model_and_shape, seed: int, count: int = 3):
    model, shape = model_and_shape
    torch.manual_seed(seed)
    x = 2 * torch.randn(count, *shape, dtype=torch.float64)
    net = capture(model, x)
    return net, x, predictions(net, x)[0]


def _layers(net):
    """The affine layers the deviation bound serves (not the last dense one)."""
    return [i for i in net.affine_indices if not net.is_last_dense(i)]


def _both(net, x, y, index, norm, bias):
    """Torch's trace and certified radius, and the twin's inputs, for layer ``index``."""
    values = net.values(x)
    P = layer_columns(net.layer(index), values[net.input_of(index)], bias)
    t = torch_deviations.trace(net, index, values, y, P, norm)
    cap = torch.full((len(x),), torch.inf, dtype=torch.float64)
    lower = torch_deviations.deviation_lower(net, index, values, y, P, norm, cap)
    graph = NumpyGraph.of(net)
    numpy_values = graph.values(x.numpy())
    P_numpy = columns(graph.layer(index), numpy_values[graph.input_of(index)], bias)
    return t, lower, graph, numpy_values, P_numpy


@settings(max_examples=max(10, settings().max_examples // 2), deadline=None)
@given(GRAPHS, st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_the_twin_agrees_with_the_torch_bound(model_and_shape, norm, bias, seed):
    net, x, y = _problem(model_and_shape, seed)
    graph = NumpyGraph.of(net)
    for index in _layers(net):
        if not torch_deviations.supported(net, index):
            assert deviations.unsupported(graph, index) is not None
            continue
        assert deviations.unsupported(graph, index) is None
        t, lower, graph, values, P = _both(net, x, y, index, norm, bias)
        margins = t.margins.numpy()
        for scale in (0.5, 1.0, 2.0):
            rho = lower * scale
            ours = deviations.margin_bounds(graph, index, values, P, rho.numpy(), y.numpy(),
                                            norm)
            theirs = torch_deviations.margin_bounds(net, t, rho).numpy()
            kept = np.isfinite(margins)
            with np.errstate(invalid="ignore"):  # inf - inf where a remainder is unbounded
                mine, torch_lost = (margins - ours)[kept], (margins - theirs)[kept]
            # Where torch's remainders stay bounded, the twin's do too; where its bound is
            # positive (a verdict rests on it: beyond, the sphere's remainder amplifies
            # rounding as h nears ||y||), to the same value.
            assert np.isfinite(mine[np.isfinite(torch_lost)]).all()
            positive = torch_lost <= margins[kept]
            slack = 1e-15 * float(np.abs(margins[kept]).max(initial=0.0))  # their rounding
            np.testing.assert_allclose(mine[positive], torch_lost[positive], rtol=AGREE,
                                       atol=slack)
            assert (mine[positive] <= torch_lost[positive] * (1 + LOOSER) + slack).all()


def _margin_after(net, x, y, index, D, bias):
    """The smallest margin ``o_y - o_j`` with layer ``index``'s weight ``W + D``."""
    layer = net.layer(index)
    values = net.values(x)
    P = layer_columns(layer, values[net.input_of(index)], bias)
    Z = torch.matmul(layer_weight(layer, bias) + D, P)
    if not bias:
        Z = Z + layer.bias[:, None]
    logits = net.run(index, layer.uncolumns(Z, values[index].shape[1:]), values)
    others = logits.scatter(-1, y[:, None], -torch.inf).amax(-1)
    return (logits.gather(-1, y[:, None])[:, 0] - others).detach().numpy()


@settings(max_examples=max(10, settings().max_examples // 4), deadline=None)
@given(GRAPHS, st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_attacks_never_pass_below_the_twin_bound(model_and_shape, norm, bias, seed):
    """At torch's certified radius and at twice it, no attack pushes the smallest margin
    below the twin's bound of it (up to rounding)."""
    net, x, y = _problem(model_and_shape, seed)
    for index in _layers(net):
        if not torch_deviations.supported(net, index):
            continue
        _, lower, graph, values, P = _both(net, x, y, index, norm, bias)
        W = layer_weight(net.layer(index), bias)
        for rho in (lower, 2 * lower):
            bound = deviations.margin_bounds(graph, index, values, P, rho.numpy(), y.numpy(),
                                             norm).min(-1)
            for D in (pgd_attack(net, x, index, rho, norm, bias, steps=30),
                      random_ball((len(x), *W.shape), rho, norm)):
                found = _margin_after(net, x, y, index, D, bias)
                assert (found >= bound - 1e-9 * (1 + np.abs(found))).all(), (found, bound)


class Shared(nn.Module):
    """``head(cat(normalize(u), softmax(u)))`` with ``u = b(a(x))`` moving almost only
    along the constant direction (``b`` nearly ``1 w^T``): its rows' centred deviation (what
    softmax reads) is tiny, its plain deviation (what F.normalize reads) is not. The head
    reads ``u / ||u||`` along its clean direction, so the margin moves only to second
    order."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(8, 2)

    def forward(self, x):
        u = self.b(self.a(x))
        return self.head(torch.cat([F.normalize(u, dim=-1), torch.softmax(u, -1)], -1))


def _shared():
    torch.manual_seed(0)
    model = Shared().double()
    x = torch.randn(1, 3, dtype=torch.float64)
    u = torch.tensor([0.05, -0.03, 0.02, -0.04], dtype=torch.float64)
    with torch.no_grad():
        model.b.weight.copy_(torch.ones(4, 4, dtype=torch.float64) * torch.eye(4)[0] +
                             0.01 * torch.randn(4, 4, dtype=torch.float64))
        model.b.bias.copy_(u - model.b.weight @ model.a(x)[0])
        model.head.weight.zero_()
        model.head.weight[0, :4] = 3 * u / u.norm()
        model.head.bias.copy_(torch.tensor([0.0, 2.7]))
    return capture(model, x), x


def test_normalize_reads_plain_rows_where_softmax_reads_centred_ones():
    """A weight change of Frobenius norm 0.2 changes the class (found by an attack); the
    twin's bound at 0.2 is not positive, as it must be, and neither torch's: its radius (once
    0.37, when F.normalize read the centred rows softmax asks for) survives the attack."""
    net, x = _shared()
    r = layer_radii(net, x, net.affine_indices[0], "fro")
    assert float(r.lower[0]) < 0.2
    D = pgd_attack(net, x, net.affine_indices[0], 0.999 * r.lower, "fro", False, steps=200)
    assert torch.equal(perturbed_classes(net, x, net.affine_indices[0], D, False),
                       predictions(net, x)[0])
    y = predictions(net, x)[0]
    index = net.affine_indices[0]
    rho = torch.tensor([0.2], dtype=torch.float64)
    found = min(_margin_after(net, x, y, index, pgd_attack(net, x, index, rho, "fro", False,
                                                           steps=200), False)[0]
                for _ in range(3))
    assert found < 0
    graph = NumpyGraph.of(net)
    values = graph.values(x.numpy())
    P = columns(graph.layer(index), values[graph.input_of(index)], False)
    assert deviations.margin_bounds(graph, index, values, P, rho.numpy(), y.numpy(),
                                    "fro").min() <= found


# -- certify check --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certified():
    """A certificate of a tiny image transformer, where the deviation bound certifies."""
    torch.manual_seed(3)
    model = Tiny(True, False, "none", 3).double().eval()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    net = capture(model, x)
    result = certify_network(net, x, model_sha256="0" * 64, progress=False)
    return net, x, result


def test_certify_check_confirms_the_deviation_claims(certified):
    net, x, result = certified
    methods = [e[norm]["method"] for e in result.document["layers"] for norm in ("fro", "max")]
    assert sum("deviation" in m for m in methods) >= 4, methods
    report = check(result.document, result.witnesses, net, x.numpy())
    assert report.ok, report.refuted


def _without_deviation(method: str) -> str:
    kept = [o for o in method.partition("(")[2].rstrip(")").split(",")
            if o and o != "deviation"]
    return method.partition("(")[0] + (f"({','.join(kept)})" if kept else "")


def _refuted_lower(report, name, norm):
    return any(r.startswith(f"layer {name}, {norm}: lower of inputs") for r in report.refuted)


def test_claims_the_deviation_bound_alone_certifies_are_refuted_without_it(certified):
    """Teeth: some layer's claims need the deviation bound (without ``deviation`` in the
    method they are refuted), and one of them raised 1.5 times (still below ``upper``) is
    refuted with it."""
    net, x, result = certified
    graph = NumpyGraph.of(net)
    values = graph.values(x.numpy())
    y = np.array(result.document["predictions"])
    raised = 0
    for index, entry in zip(graph.affine_indices, result.document["layers"]):
        for norm in ("fro", "max"):
            if "deviation" not in entry[norm]["method"]:
                continue
            document = copy.deepcopy(result.document)
            claims = document["layers"][graph.affine_indices.index(index)][norm]
            claims["method"] = _without_deviation(claims["method"])
            if not _refuted_lower(check(document, result.witnesses, net, x.numpy()),
                                  entry["name"], norm):
                continue
            lower = np.array(entry[norm]["lower"], dtype=np.float64)
            upper = np.array([np.inf if u is None else u for u in entry[norm]["upper"]])
            P = columns(graph.layer(index), values[graph.input_of(index)], False)
            at = deviations.margin_bounds(graph, index, values, P, 1.5 * lower, y, norm)
            for i in np.nonzero((1.5 * lower <= upper) & ~(at > 0).all(-1))[0]:
                document = copy.deepcopy(result.document)
                document["layers"][graph.affine_indices.index(index)][norm]["lower"][i] *= 1.5
                report = check(document, result.witnesses, net, x.numpy())
                assert _refuted_lower(report, entry["name"], norm), report.refuted
                raised += 1
    assert raised > 0


MUTATIONS = {
    "no activation remainder": ("remainder", ActivationTwin, lambda out: 0 * out),
    "no LayerNorm remainder": ("remainder", LayerNormTwin, lambda out: (out[0], 0 * out[1])),
    "no softmax remainder": ("remainder", SoftmaxTwin, lambda out: 0 * out),
    "no softmax spread": ("spread", SoftmaxTwin, lambda out: 0 * out),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_every_twin_rule_matters(certified, mutation, monkeypatch):
    """Teeth: a mutated rule moves the bound (so the agreement above tests each)."""
    net, x, result = certified
    graph = NumpyGraph.of(net)
    values = graph.values(x.numpy())
    y = np.array(result.document["predictions"])
    index = graph.affine_indices[0]
    P = columns(graph.layer(index), values[graph.input_of(index)], False)
    rho = np.array(result.document["layers"][0]["fro"]["lower"], dtype=np.float64)
    before = deviations.margin_bounds(graph, index, values, P, rho, y, "fro")
    name, kind, change = MUTATIONS[mutation]
    rule = getattr(deviations, name)
    monkeypatch.setattr(deviations, name, lambda twin, *a, **k: change(rule(twin, *a, **k))
                        if isinstance(twin, kind) else rule(twin, *a, **k))
    after = deviations.margin_bounds(graph, index, values, P, rho, y, "fro")
    assert not np.allclose(before, after, rtol=1e-6, atol=0)


def test_the_curvatures_bound_the_second_derivatives():
    """``sup |phi''|`` of ``CURVATURE`` from central differences of the twins' exact
    ``phi'`` on a grid: never above the constant, and within 1e-6 of it (the maximiser is on
    the grid to that accuracy)."""
    x = np.linspace(-12, 12, 2_400_001)
    step = 1e-5
    for kind, constant in deviation_rules.CURVATURE.items():
        twin = ActivationTwin(type("Op", (), {"kind": kind, "slope": 0.0, "scale": 1.0,
                                              "input_scale": 1.0})(), [(1,)], (1,))
        second = np.abs(twin.derivative(x + step) - twin.derivative(x - step)) / (2 * step)
        assert second.max() <= constant, kind
        assert second.max() >= constant * (1 - 2e-6), kind
