"""SDP-CROWN's offsets (``Activation.ball_offset``): ReLU and LeakyReLU offsets over the box
intersected with an l2 ball, and the margin bounds that use them.

* Soundness: ``sum_i A_i phi(x_i) - G_i x_i`` never falls below the offset at points of the
  box and the ball (random points pulled into the ball, and projected gradient descent on
  each row), for random boxes with stable and unstable entries, any ``G`` (CROWN's rows or
  random ones) and slopes of either sign.
* Teeth: the same attack finds the offset too high once the dual is broken (the sign of
  its multiplier term, that term dropped, the sides of the kink swapped).
* Oracle: where the objective is convex (ReLU, ``A >= 0``, every entry unstable) the dual is
  exact (strong duality), and the offset matches cvxpy's minimum over box and ball.
* Derivation: ``ball_minima`` computes proofs/ball_offset.py's minimiser and minimum.
* Bounds: margin lines with the offsets are never below those without on random networks;
  on a trained digits MLP they raise the first layer's Frobenius radii, and ``certify
  check`` confirms the certificate that names ``ball``.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from conv_stacks import problems, region_and_radius
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from training import trained

from certify.capture.export import capture
from certify.bounds.linear import margin_lines
from certify.graph.operators import activation as activation_module
from certify.graph.operators.activation import Activation
from certify.radii.radius import layer_radii
from proofs import ball_offset as derivation


def instance(seed: int, kind: str, slope: float, n: int, share: float, rows: str,
             reach: float, B: int = 2, R: int = 3):
    """A box (a fraction ``share`` of entries unstable), a centre inside it, a ball of
    radius ``reach`` times the box's half diagonal, rows ``A`` and ``G``."""
    g = torch.Generator().manual_seed(seed)
    mid = torch.randn(B, n, generator=g, dtype=torch.float64)
    half = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.05
    unstable = torch.rand(B, n, generator=g) < share
    mid = torch.where(unstable, mid.clamp(-0.9, 0.9) * half, mid.sign() * (half + mid.abs()))
    lo, hi = mid - half, mid + half
    c = lo + (hi - lo) * torch.rand(B, n, generator=g, dtype=torch.float64)
    r = reach * torch.linalg.vector_norm(half, dim=-1)
    op = Activation(kind, slope)
    A = torch.randn(B, R, n, generator=g, dtype=torch.float64)
    if rows == "convex":
        A = A.abs()
    if rows == "random":
        G = torch.randn(B, R, n, generator=g, dtype=torch.float64)
    else:
        G = op.backward(A, [(lo, hi)], True)[0][0]
    return op, A, G, (lo, hi), c, r


def objective(op, A, G, x):
    """``sum_i A_i phi(x_i) - G_i x_i`` per row, ``x``: ``(B, R, n)``."""
    return (A * op(x) - G * x).sum(-1)


def into_ball(x, box, c, r):
    """``x`` clipped to the box, then pulled towards ``c`` into the ball (the box is convex
    and holds ``c``, so the point stays in it)."""
    lo, hi = (t[:, None] for t in box)
    x = torch.maximum(torch.minimum(x, hi), lo)
    gap = x - c[:, None]
    norm = torch.linalg.vector_norm(gap, dim=-1, keepdim=True)
    return c[:, None] + gap * torch.clamp(r[:, None, None] / norm.clamp(min=1e-300), max=1.0)


def attack(op, A, G, box, c, r, seed: int = 0) -> torch.Tensor:
    """The smallest objective found per row: random points and PGD in box and ball."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = box
    B, R, n = A.shape
    best = objective(op, A, G, c[:, None].expand(B, R, n))
    for _ in range(40):
        u = torch.rand(B, R, n, generator=g, dtype=torch.float64)
        x = into_ball(lo[:, None] + (hi - lo)[:, None] * u, box, c, r)
        best = torch.minimum(best, objective(op, A, G, x))
    width = (hi - lo).amax(-1)[:, None, None]
    for step in (0.3, 0.05):
        for start in range(4):
            u = torch.rand(B, R, n, generator=g, dtype=torch.float64)
            x = into_ball(lo[:, None] + (hi - lo)[:, None] * u, box, c, r)
            for _ in range(40):
                x = x.detach().requires_grad_(True)
                value = objective(op, A, G, x)
                (grad,) = torch.autograd.grad(value.sum(), x)
                x = into_ball(x - step * width * grad / grad.abs().amax(-1, keepdim=True).clamp(
                    min=1e-300), box, c, r)
                best = torch.minimum(best, objective(op, A, G, x.detach()))
    return best


def violations(op, A, G, box, c, r) -> int:
    offset = op.ball_offset(A, G, box, c, r)
    found = attack(op, A, G, box, c, r)
    tolerance = 1e-12 * (1 + found.abs())
    return int((found < offset - tolerance).sum())


KINDS = st.sampled_from([("relu", 0.0), ("leaky_relu", 0.01), ("leaky_relu", 0.3),
                         ("leaky_relu", -0.5), ("leaky_relu", 2.0)])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), KINDS, st.integers(1, 12), st.floats(0.0, 1.0),
       st.sampled_from(["crown", "random", "convex"]), st.floats(0.02, 1.5))
def test_no_attack_goes_below_the_offset(seed, kind, n, share, rows, reach):
    op, A, G, box, c, r = instance(seed, *kind, n, share, rows, reach)
    assert violations(op, A, G, box, c, r) == 0


def _sign_flipped(minima, lam, r2):
    """Broken: ``+ lam r^2 / 2``, the multiplier's term with the wrong sign."""
    return minima.sum(-1) + lam * r2 / 2


def _term_dropped(minima, lam, r2):
    """Broken: the ball's term ``- lam r^2 / 2`` dropped."""
    return minima.sum(-1)


def _sides_swapped(sides, c, lam):
    """Broken: each side's coefficient on the other side of the kink."""
    (left, a, zero), (right, _, b) = sides
    return _minima(((right, a, zero), (left, zero, b)), c, lam)


_minima = activation_module.ball_minima


@pytest.mark.parametrize("name,mutant", [("ball_dual", _sign_flipped),
                                         ("ball_dual", _term_dropped),
                                         ("ball_minima", _sides_swapped)])
def test_the_attack_catches_a_broken_dual(monkeypatch, name, mutant):
    """Teeth: on ReLU boxes with most entries unstable and a ball that cuts the box, the
    attack of the soundness test finds the broken offsets too high."""
    cases = [instance(seed, "relu", 0.0, 8, 0.8, "crown", 0.3) for seed in range(5)]
    assert sum(violations(*case) for case in cases) == 0
    monkeypatch.setattr(activation_module, name, mutant)
    assert sum(violations(*case) for case in cases) > 0


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 10), st.floats(0.05, 0.8))
def test_the_offset_is_the_exact_minimum_where_the_objective_is_convex(seed, n, reach):
    """ReLU with ``A >= 0``: the objective is convex, the ball has an interior point in the
    box (its centre), so the dual's maximum is the minimum over box and ball (Slater); the
    bisection on ``lam`` reaches it to 1e-3 of the objective's scale, and never exceeds it."""
    op, A, G, (lo, hi), c, r = instance(seed, "relu", 0.0, n, 1.0, "convex", reach, B=1, R=2)
    offset = op.ball_offset(A, G, (lo, hi), c, r)
    for row in range(A.shape[1]):
        a, g = A[0, row].numpy(), G[0, row].numpy()
        x = cp.Variable(n)
        problem = cp.Problem(cp.Minimize(a @ cp.pos(x) - g @ x),
                             [x >= lo[0].numpy(), x <= hi[0].numpy(),
                              cp.norm(x - c[0].numpy(), 2) <= float(r[0])])
        exact = problem.solve(solver=cp.CLARABEL)
        scale = float(r[0]) * (np.linalg.norm(a) + np.linalg.norm(g)) + abs(exact)
        assert float(offset[0, row]) <= exact + 1e-7 * scale
        assert float(offset[0, row]) >= exact - 1e-3 * scale


@settings(max_examples=30, deadline=None)
@given(st.floats(-5, 5), st.floats(-3, 3), st.floats(1e-3, 1e3), st.floats(0.0, 1.0))
def test_ball_minima_computes_the_derived_forms(q, c, lam, where):
    """``ball_minima`` on one side ``[a, b]`` of the kink against proofs/ball_offset.py's
    ``FORMS``: where the derived minimiser lies inside, it and the derived minimum; where it
    is clipped, ``psi`` at the nearer end."""
    forms = derivation.FORMS
    at = dict(zip((derivation.q, derivation.c, derivation.lam), (q, c, lam)))
    star, minimum = float(forms.minimiser.subs(at)), float(forms.minimum.subs(at))
    # One side around (``where`` in [0, 1] places it) or beside the derived minimiser.
    a = star - 2 * where - 1e-3 if where < 0.5 else star + where
    b = a + 2.0
    t = lambda v: torch.tensor([[[v]]], dtype=torch.float64)  # noqa: E731
    value, point = activation_module.ball_minima([(t(q), t(a), t(b))], t(c),
                                                 torch.tensor([[lam]], dtype=torch.float64))
    if a <= star <= b:
        assert float(point) == pytest.approx(star, rel=1e-12, abs=1e-12)
        assert float(value) == pytest.approx(minimum, rel=1e-9, abs=1e-9 * (1 + abs(q * c)))
    else:
        end = a if star < a else b
        assert float(point) == end
        assert float(value) == pytest.approx(q * end + lam / 2 * (end - c) ** 2, rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(problems())
def test_the_offsets_never_lower_a_margin_line(problem):
    """At the same radius, the margin lines with the offsets are at least those without
    (the offset is the larger of the two), on convolution stacks with every activation."""
    net, x, index, _, fraction = problem
    values, _, where, rho = region_and_radius(net, x, index, "fro", fraction)
    y = values[-1].argmax(-1)
    plain = margin_lines(net, index, where, rho, y, values, refine=False)
    ball = margin_lines(net, index, where, rho, y, values, refine=False, ball=True)
    assert torch.equal(plain.slope, ball.slope)
    assert torch.all(ball.value >= plain.value)


def test_the_offsets_raise_the_radii_of_a_trained_mlp():
    """A digits MLP 64-64-64-10 trained here: the first layer's Frobenius radii with the
    offsets are higher by 2% at the median (4% here; 60% on the 1024-wide MNIST MLP of
    ``benchmarks/tightness.py``), the method says ``ball``, and ``certify
    check`` confirms the certificate; in the max norm (no ball) nothing changes."""
    from certify.models import small as small_models
    from certify.certificate.document import certify_network
    from certify.check.claims import check

    digits = small_models.load("digits", seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
                          nn.ReLU(), nn.Linear(64, 10))
    model = trained(model, digits, 100)
    x = digits.x_test[:24].double()
    net = capture(model, x)
    index = net.affine_indices[0]
    plain = layer_radii(net, x, index, "fro", ball=False, deviation=False)
    ball = layer_radii(net, x, index, "fro", deviation=False)
    assert ball.method.endswith(",ball)") or ball.method.endswith("(ball)")
    assert float((ball.lower / plain.lower).median()) > 1.02
    assert layer_radii(net, x, index, "max").method == layer_radii(
        net, x, index, "max", ball=False).method
    result = certify_network(net, x, model_sha256="0" * 64, progress=False)
    report = check(result.document, result.witnesses, net, x.numpy())
    assert report.ok and report.confirmed > 0, report.refuted[:3]
