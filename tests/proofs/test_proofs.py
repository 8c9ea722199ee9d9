"""`certify prove` verifies every derivation, and a wrong closed form fails its derivation."""

import dataclasses
import subprocess
import sys

import pytest
import sympy as sp

import proofs
from proofs import ball_offset as ball
from proofs import closed_forms as cf
from proofs import lipschitz, margin, target_change
from proofs.derivation import DerivationError

EXPECTED_RESULTS = {
    "target change D h = r, fro", "target change D h = r, spectral", "target change D h = r, max",
    "target change D h = r, sum", "target change D h = r, lp",
    "batch D H = R, Frobenius (KKT)", "batch D H = R, spectral",
    "batch D H = R, feasibility R H^+ H = R",
    "margin functional <D, c h^T> = -m, fro", "margin functional <D, c h^T> = -m, max",
    "margin functional <D, c h^T> = -m, sum", "margin functional <D, c h^T> = -m, spectral",
    "margin functional <D, c h^T> = -m, lp",
    "last layer, class pair, fro", "last layer, class pair, max",
    "low rank: Eckart-Young-Mirsky error norms", "quantisation: error <= s/2, threshold bits",
    "magnitude pruning: error norms", "Lipschitz chain inequality",
    "multi-layer recursion identity",
    "ball offset (SDP-CROWN): weak duality, side minima, dual slope",
}


def test_certify_prove_verifies_everything():
    out = subprocess.run([sys.executable, "-m", "certify.cli.commands", "prove"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAILED" not in out.stdout
    for result in EXPECTED_RESULTS:
        assert result in out.stdout
    registered = {d.result for d in proofs.REGISTRY}
    assert EXPECTED_RESULTS <= registered
    assert f"{len(proofs.REGISTRY)} of {len(proofs.REGISTRY)} derivations verified" in out.stdout


def test_prove_exits_nonzero_on_unknown_filter():
    out = subprocess.run([sys.executable, "-m", "certify.cli.commands", "prove", "--match", "no such"],
                         capture_output=True, text=True)
    assert out.returncode == 2


def mutate(form, **fields):
    return dataclasses.replace(form, **fields)


TARGET_MUTATIONS = [
    ("fro", "value", lambda f: f.value * sp.sqrt(2)),  # a wrong constant
    ("fro", "col", lambda f: f.col * 2),
    ("max", "value", lambda f: cf.u_linf / cf.v_l2),  # a wrong norm of h
    ("max", "value", lambda f: cf.u_l1 / cf.v_l1),  # a wrong norm of r
    ("sum", "col", lambda f: sp.sign(cf.v) / cf.v_linf),  # every entry instead of the peak
    ("spectral", "value", lambda f: cf.u_l2 / cf.v_l1),
]


@pytest.mark.parametrize("norm,field,wrong", TARGET_MUTATIONS)
def test_wrong_target_change_form_fails(norm, field, wrong):
    form = cf.TARGET_CHANGE[norm]
    with pytest.raises(DerivationError):
        target_change.check(mutate(form, **{field: wrong(form)}), 2, 3)


@pytest.mark.parametrize("norm,wrong", [
    ("fro", lambda f: sp.Abs(cf.m) / (2 * cf.u_l2 * cf.v_l2)),
    ("max", lambda f: sp.Abs(cf.m) / (cf.u_l2 * cf.v_l1)),
    ("sum", lambda f: sp.Abs(cf.m) / (cf.u_l1 * cf.v_linf)),
])
def test_wrong_margin_form_fails(norm, wrong):
    form = cf.MARGIN_FUNCTIONAL[norm]
    with pytest.raises(DerivationError):
        margin.check(mutate(form, value=wrong(form)), 2, 3)


def test_wrong_class_pair_factor_fails(monkeypatch):
    monkeypatch.setitem(cf.CLASS_PAIR, "fro", cf.m / (2 * cf.v_l2))  # 2 where sqrt(2) belongs
    with pytest.raises(DerivationError):
        margin.check_class_pair("fro", 3)


@pytest.mark.parametrize("field,wrong", [
    ("dual_term", ball.lam * ball.r**2 / 2),  # the multiplier's sign flipped
    ("dual_term", sp.Integer(0)),  # the ball's term dropped
    ("minimiser", ball.c + ball.q / ball.lam),
    ("minimum", ball.q * ball.c + ball.q**2 / (2 * ball.lam)),
    ("slope", (ball.star - ball.c) ** 2),
])
def test_wrong_ball_offset_form_fails(field, wrong):
    forms = mutate(ball.FORMS, **{field: wrong})
    with pytest.raises(DerivationError):
        ball.check_weak_duality(forms, 2)
        ball.check_side_minimum(forms)


@pytest.mark.parametrize("kind,wrong", [
    ("silu", (-1.27846454276107, -0.2784, None)),  # a floor above the minimum
    ("silu", (-1.27846454276107, -0.27847, (-0.0998, 1.0998393201288670))),  # phi' below it
    ("mish", (-1.19243121451550, -0.30885, (-0.112526122389463, 1.0884))),  # and above it
    ("mish", (-1.1924, -0.30885, None)),  # the minimiser off by 3e-5
    ("hardswish", (-1.5, -0.37501, (-0.5, 1.4))),
])
def test_wrong_activation_constants_fail(monkeypatch, kind, wrong):
    from certify.graph.operators import activation_shapes

    argmin, floor, derivative = wrong
    monkeypatch.setitem(activation_shapes.DIPS, kind,
                        (argmin, floor, derivative or activation_shapes.DIPS[kind][2]))
    with pytest.raises(DerivationError):
        lipschitz.check_activations()
