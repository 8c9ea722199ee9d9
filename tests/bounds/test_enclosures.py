"""Forward enclosures in weight space (``certify.graph.operators.enclosure``): every rule is sound
against attacks, the attack catches broken rules, enclosures only tighten the boxes, and
they raise the certified radii of convolution stacks.

Soundness: on random convolution stacks with residual blocks, batch norms, pooling and every
activation, for a weight change ``D`` of one layer drawn inside the ball (random points,
vertices of the max ball, and PGD pushing node values up and down), every node's value lies
between the enclosure's two affine functions evaluated at ``vec D`` and inside the box
``intermediate_bounds`` returns. The same check with a rule broken on purpose (the radius
dropped, a line applied to the wrong end, the wrong dual norm) finds a violation.
"""

from __future__ import annotations

import pytest
import torch
from conv_stacks import problems, region_and_radius, stack
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from training import trained

from certify.capture.export import capture
from certify.bounds.linear import enclosed, intermediate_bounds
from certify.graph.operators import enclosure as enclosure_module
from certify.graph.operators.enclosure import Enclosure
from certify.radii.radius import layer_radii


def setting(net, x, index, norm, fraction):
    """``region_and_radius``, the boxes of ``intermediate_bounds`` with enclosures, and
    every enclosed node's enclosure."""
    values, P, where, rho = region_and_radius(net, x, index, norm, fraction)
    boxes = intermediate_bounds(net, index, where, rho, values, refine=False, enclose=True)
    enclosures = {index: Enclosure(where.z, torch.zeros_like(where.z), where.coefficients(), None,
                                   where.z.abs())}
    moving = set(net.downstream(index))
    for i in enclosed(net, index):
        node = net.nodes[i]
        parts = [enclosures[j] if j in moving else Enclosure.point(values[j]) for j in node.inputs]
        found = node.op.enclose(parts, [boxes[j] for j in node.inputs])
        enclosures[i] = found if found is not None else Enclosure.box(*boxes[i])
    return values, P, rho, boxes, enclosures


def node_values(net, index, values, P, D):
    """Every node's value with the layer's weight changed by ``D`` ``(B, m, n)``."""
    layer = net.layer(index)
    Z = values[index] + layer.uncolumns(D @ P, values[index].shape[1:])
    return net.rerun(index, Z, values)


def attack_points(net, index, values, P, rho, norm, enclosures, seed: int):
    """Weight changes in the ball: random points, max-ball vertices, and PGD steps that push
    a random signed sum of the enclosed nodes' values up (and down)."""
    generator = torch.Generator().manual_seed(seed)
    B, m, n = len(P), net.layer(index).weight.shape[0], P.shape[1]

    def project(D):
        if norm == "fro":
            return D * (rho / torch.linalg.matrix_norm(D).clamp_min(rho)).reshape(B, 1, 1)
        return D.clamp(-rho.reshape(B, 1, 1), rho.reshape(B, 1, 1))

    points = []
    for _ in range(6):
        D = torch.randn(B, m, n, dtype=torch.float64, generator=generator)
        points.append(project(D * 1e3) if norm == "fro" else torch.sign(D) * rho.reshape(B, 1, 1))
    weights = {i: torch.randn(values[i].shape, dtype=torch.float64, generator=generator)
               for i in enclosures if i != index}
    for sign in (1.0, -1.0):
        D = torch.zeros(B, m, n, dtype=torch.float64)
        for _ in range(15):
            D.requires_grad_(True)
            out = node_values(net, index, values, P, D)
            objective = sum((w * out[i]).sum() for i, w in weights.items())
            (grad,) = torch.autograd.grad(sign * objective, D)
            with torch.no_grad():
                step = grad / torch.linalg.matrix_norm(grad).clamp_min(1e-300).reshape(B, 1, 1) \
                    if norm == "fro" else torch.sign(grad)
                D = project(D + 0.3 * rho.reshape(B, 1, 1) * step)
            points.append(D.detach())
    return points


def violations(net, index, norm, fraction, values, P, rho, boxes, enclosures, seed=0) -> int:
    """Entries outside their enclosure or box, over every attack point."""
    count = 0
    for D in attack_points(net, index, values, P, rho, norm, enclosures, seed):
        out = node_values(net, index, values, P, D)
        v = D.reshape(len(D), -1)
        for i, e in enclosures.items():
            if i == index:
                continue
            C = e.c + (torch.einsum("bp...,bp->b...", e.Ac, v) if e.Ac is not None else 0)
            R = e.r + (torch.einsum("bp...,bp->b...", e.Ar, v) if e.Ar is not None else 0)
            tol = 1e-9 * (1 + out[i].abs() + e.size)
            lo, hi = boxes[i]
            count += int(((out[i] < C - R - tol) | (out[i] > C + R + tol)).sum())
            count += int(((out[i] < lo - tol) | (out[i] > hi + tol)).sum())
    return count


@settings(max_examples=30, deadline=None)
@given(problems(), st.integers(0, 2**31 - 1))
def test_attacks_stay_inside_every_enclosure_and_box(problem, seed):
    net, x, index, norm, fraction = problem
    found = setting(net, x, index, norm, fraction)
    assert violations(net, index, norm, fraction, *found, seed=seed) == 0


def _dropped_radius(self, s_lower, b_lower, s_upper, b_upper):
    """Broken: the activation's two lines averaged onto the centre, the radius dropped."""
    c = (s_lower * self.c + b_lower + s_upper * self.c + b_upper) / 2
    Ac = None if self.Ac is None else self.Ac * ((s_lower + s_upper) / 2)[:, None]
    return Enclosure(c, torch.zeros_like(c), Ac, None, self.size)


def _wrong_end(self, s_lower, b_lower, s_upper, b_upper):
    """Broken: the lower line applied to the upper end ``U`` and the upper line to ``L``."""
    swapped = Enclosure(self.c, -self.r, self.Ac, None if self.Ar is None else -self.Ar,
                        self.size)
    return _lines(swapped, s_lower, b_lower, s_upper, b_upper)


def _wrong_dual(self, rho, norm):
    """Broken: the l2 norm for the max ball (its dual is l1)."""
    return _bounds(self, rho, "fro")


_lines, _bounds = Enclosure.lines, Enclosure.bounds


@pytest.mark.parametrize("rule,mutant", [("lines", _dropped_radius), ("lines", _wrong_end),
                                         ("bounds", _wrong_dual)])
def test_the_attack_catches_a_broken_rule(monkeypatch, rule, mutant):
    """Teeth: the attack of the soundness test finds violations once a rule is broken, on a
    ReLU stack at a radius where most ReLUs are unstable."""
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    net = capture(stack(1, nn.ReLU, 3, nn.Identity(), 1), x)
    index = net.affine_indices[0]
    assert violations(net, index, "max", 0.3, *setting(net, x, index, "max", 0.3)) == 0
    monkeypatch.setattr(enclosure_module.Enclosure, rule, mutant)
    assert violations(net, index, "max", 0.3, *setting(net, x, index, "max", 0.3)) > 0


@settings(max_examples=20, deadline=None)
@given(problems())
def test_enclosures_only_tighten_the_boxes(problem):
    """Interval propagation is monotone in its input boxes (to rounding), so intersecting
    with the enclosures' bounds can only shrink every box. (Backward refinement is not monotone:
    CROWN's adaptive slopes change with the boxes, so this holds without it.)"""
    net, x, index, norm, fraction = problem
    values, _, where, rho = region_and_radius(net, x, index, norm, fraction)
    plain = intermediate_bounds(net, index, where, rho, values, refine=False)
    tight = intermediate_bounds(net, index, where, rho, values, refine=False, enclose=True)
    for i, (lo, hi) in tight.items():
        p_lo, p_hi = plain[i]
        rounding = 1e-12 * (1 + p_lo.abs() + p_hi.abs())  # the rules round differently
        assert torch.all(lo >= p_lo - rounding) and torch.all(hi <= p_hi + rounding), i


def test_enclosures_raise_the_radii_of_a_trained_convolution_stack():
    """On a trained digits CNN (two ReLU convolutions), the first convolution's certified
    radii with enclosures are never below those without, and their median is higher by a
    fifth in both norms; the method says ``forward`` and ``certify check`` confirms it."""
    from certify.models import small as small_models
    from certify.certificate.document import certify_network
    from certify.check.claims import check

    digits = small_models.load("digits", seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(288, 10))
    model = trained(model, digits, 60)
    x = digits.x_test[:16].double()
    net = capture(model, x)
    index = net.affine_indices[0]
    for norm in ("fro", "max"):
        plain = layer_radii(net, x, index, norm, refine=False, enclose=False, ball=False,
                            deviation=False)
        tight = layer_radii(net, x, index, norm, refine=False, ball=False, deviation=False)
        assert tight.method == "lipschitz+crown(forward)"
        assert torch.all(tight.lower >= plain.lower)
        assert float((tight.lower / plain.lower).median()) > 1.2, norm
    result = certify_network(net, x, model_sha256="0" * 64, progress=False)
    report = check(result.document, result.witnesses, net, x.numpy())
    assert report.ok and report.confirmed > 0, report.refuted[:3]
