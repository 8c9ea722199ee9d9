"""The deviation rules of THEORY.md section 9 (``Operator.spread``, ``Operator.remainder``),
attacked operator by operator.

For each family of ``tests/support/operator_cases.py`` with the rules: a clean input ``u``,
deviation radii ``d`` and deviations ``delta`` with ``|delta| <= d`` (random points, the
box's vertices, and a projected ascent on the remainder), the real remainder ``f(u + delta)
- f(u) - J delta`` (``J`` the clean Jacobian by forward-mode autograd, the one the first-order
forms use) must lie within ``remainder`` (entrywise, or per row in l2), and ``|J delta|``
within ``spread``. The same attack refutes a mutant of every rule (its bound halved), so the
attack has teeth; and ``CURVATURE`` is checked against ``phi''`` on a fine grid.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from operator_cases import FAMILIES

from certify.graph.operators import (Activation, LayerNorm, MaxPool, Normalize, PReLU, Product,
                                     Softmax)
from certify.graph.operators.activation_shapes import CURVATURE

DT = torch.float64
RULED = ["relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu", "mish",
         "hardsigmoid", "hardtanh", "prelu", "mul", "matmul", "softmax", "softmax_masked",
         "layer_norm", "normalize", "max_pool1d", "max_pool2d"]

# One hand-made case per family for the teeth (clean values and deviations of order one).
TEETH = {
    **{kind: (Activation(kind), [(4,)]) for kind in
       ("relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu", "mish", "hardsigmoid")},
    "leaky_relu": (Activation("leaky_relu", 0.1), [(4,)]),
    "hardtanh": (Activation("hardtanh", -1.0, 1.0), [(4,)]),
    "prelu": (PReLU(torch.tensor([-0.3, 0.5], dtype=DT).reshape(2, 1)), [(2, 3)]),
    "mul": (Product(False), [(3,), (3,)]),
    "matmul": (Product(True), [(2, 3), (3, 2)]),
    "softmax": (Softmax(), [(4,)]),
    "softmax_masked": (Softmax(torch.tensor([True, False, True, True])), [(4,)]),
    "layer_norm": (LayerNorm(torch.tensor([1.0, -0.5, 2.0], dtype=DT),
                             torch.zeros(3, dtype=DT), 1e-5), [(2, 3)]),
    "normalize": (Normalize(1e-12), [(2, 3)]),
    "max_pool1d": (MaxPool((2,), (2,), (0,), (1,)), [(2, 6)]),
    "max_pool2d": (MaxPool((2, 2), (1, 1), (1, 1), (1, 1)), [(1, 3, 3)]),
}
UNRULED = [Activation("elu", 1.0, 1.0, 1.0), Activation("softplus", 1.0, 20.0),
           Activation("hardswish")]


def _jvp(op, u, delta):
    return torch.func.jvp(op, tuple(u), tuple(delta))[1]


def _bound(op, u, d, rows=None):
    """The remainder rule as an entrywise box, and its row-l2 form where it has one."""
    R = op.remainder(u, d, rows)
    if isinstance(R, tuple):
        scale, bound = R
        return (scale.abs() * bound).expand_as(op(*u)), (scale, bound)
    return R.expand_as(op(*u)), None


def _excess(op, u, d, delta, shrink=1.0):
    """How far the real remainder at ``delta`` exceeds the rule (times ``shrink``): > 0 is a
    violation (entrywise, or of a row's l2 bound)."""
    real = op(*(a + b for a, b in zip(u, delta))) - op(*u) - _jvp(op, u, delta)
    box, rows = _bound(op, u, d)
    if shrink == 0:  # the mutant without a remainder (0 inf is 0 here)
        box = torch.zeros_like(box)
        rows = None if rows is None else (rows[0], torch.zeros_like(rows[1]))
    if rows is None:
        return float((real.abs() - shrink * box).max())
    scale, bound = rows
    safe = torch.where(scale.abs() > 0, scale, torch.ones_like(scale))
    r = torch.where(scale.abs() > 0, real / safe, torch.zeros_like(real))
    return float((torch.linalg.vector_norm(r, dim=-1, keepdim=True) - shrink * bound).max())


def _deviations(u, d, gen, count=24):
    """Random deviations within ``|delta| <= d``: interior points and vertices."""
    for k in range(count):
        out = []
        for a, r in zip(u, d):
            t = torch.rand(a.shape, generator=gen, dtype=DT) * 2 - 1
            out.append(r * (t.sign() if k % 2 else t))
        yield out


def _ascent(op, u, d, shrink, steps=30):
    """Projected sign-gradient ascent on the largest excess of the real remainder over the
    rule: the strongest deviation found."""
    delta = [torch.zeros_like(a, requires_grad=True) for a in u]
    with torch.no_grad():
        for x, r in zip(delta, d):
            x.copy_(r * 0.9)
    for _ in range(steps):
        real = op(*(a + b for a, b in zip(u, delta))) - op(*u) - _jvp(op, u, delta)
        box, _ = _bound(op, u, d)
        loss = (real.abs() - (shrink * box if shrink else 0)).max()
        grads = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            for x, g, r in zip(delta, grads, d):
                x.add_(0.2 * r * g.sign()).clamp_(-r, r)
    return [x.detach() for x in delta]


def _inputs(case_op, shapes, seed, spread_scale):
    gen = torch.Generator().manual_seed(seed)
    u = [torch.randn(2, *s, generator=gen, dtype=DT) * 1.5 for s in shapes]
    d = [torch.rand(2, *s, generator=gen, dtype=DT) * spread_scale for s in shapes]
    return u, d, gen


@pytest.mark.parametrize("family", RULED)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 0.1, 0.5, 2.0]))
def test_remainders_and_spreads_contain_the_real_ones(family, data, seed, scale):
    op, shapes = data.draw(FAMILIES[family])
    u, d, gen = _inputs(op, shapes, seed, scale)
    tolerance = 1e-9 * (1 + max(float(a.abs().max()) for a in u + d))
    for delta in [*_deviations(u, d, gen), _ascent(op, u, d, 1.0)]:
        assert _excess(op, u, d, delta) <= tolerance, delta
        moved = _jvp(op, u, delta).abs()
        assert bool((moved <= op.spread(u, d) * (1 + 1e-9) + tolerance).all())


@pytest.mark.parametrize("family", RULED)
def test_the_attack_refutes_a_dropped_remainder(family):
    """Teeth: with a rule's remainder dropped (the mutant of a linearisation taken as exact),
    the attack finds a violation (deviations near the clean values' scale)."""
    op, shapes = TEETH[family]
    for seed in range(20):
        u, d, gen = _inputs(op, shapes, seed, 0.5)
        worst = max(_excess(op, u, d, delta, shrink=0.0)
                    for delta in [*_deviations(u, d, gen), _ascent(op, u, d, 0.0)])
        if worst > 1e-6:
            return
    pytest.fail(f"{family}: a dropped remainder was never refuted")


@pytest.mark.parametrize("kind", ["gelu", "tanh", "silu"])
def test_the_attack_refutes_a_halved_curvature(kind):
    """Teeth for the constants: where the curvature peaks (``u`` at the peak, small ``d``)
    the remainder bound is nearly attained, so half of it is refuted."""
    op = Activation(kind)
    peak = {"gelu": 0.0, "silu": 0.0, "tanh": math.atanh(1 / math.sqrt(3))}[kind]
    u = [torch.full((1, 3), peak, dtype=DT)]
    d = [torch.full((1, 3), 1e-3, dtype=DT)]
    assert _excess(op, u, d, [d[0].clone()], shrink=0.5) > 0


@pytest.mark.parametrize("op", UNRULED, ids=lambda op: op.describe())
def test_operators_without_rules_say_so(op):
    u = [torch.zeros(1, 2, 4, dtype=DT)]
    assert op.remainder(u, u) is None


@pytest.mark.parametrize("kind", sorted(CURVATURE))
def test_curvature_bounds_the_second_derivative_and_is_attained(kind):
    """``CURVATURE`` is at least ``max |phi''|`` on a grid of step ``1e-4`` over [-40, 40]
    (beyond it ``phi''`` decays; near a smooth peak the grid misses about ``h^2 / 8`` times
    the fourth derivative, some 1e-9, below the constants' raise) and exceeds it by less
    than 1e-5 relative: the closed forms are the peaks."""
    x = torch.linspace(-40, 40, 800_001, dtype=DT, requires_grad=True)
    act = Activation(kind)
    (first,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    top = float(second.abs().max())
    assert top <= CURVATURE[kind] <= top * (1 + 1e-5)


def test_gelu_curvature_is_twice_the_normal_density_at_zero():
    assert math.isclose(CURVATURE["gelu"], 2 / math.sqrt(2 * math.pi), rel_tol=1e-8)
    x = torch.zeros(1, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(F.gelu(x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert math.isclose(float(h), CURVATURE["gelu"], rel_tol=1e-8)


@pytest.mark.parametrize("family", [f for f in RULED if hasattr(TEETH[f][0], "tangent")])
@settings(max_examples=10, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1), constant=st.booleans())
def test_closed_form_tangents_are_forward_mode_derivatives(family, data, seed, constant):
    """An operator's ``tangent`` (its clean Jacobian on a batch of forms) is what
    forward-mode autograd computes, also with a constant second input (``None``)."""
    op, shapes = data.draw(FAMILIES[family])
    u, _, gen = _inputs(op, shapes, seed, 1.0)
    forms = [torch.randn(2, 3, *s, generator=gen, dtype=DT) for s in shapes]
    if constant and len(forms) == 2:
        forms[1] = None
    expected = torch.stack([_jvp(op, u, [t[:, k] if t is not None else torch.zeros_like(a)
                                         for t, a in zip(forms, u)]) for k in range(3)], 1)
    assert torch.allclose(op.tangent(u, forms), expected, rtol=1e-12, atol=1e-12)
