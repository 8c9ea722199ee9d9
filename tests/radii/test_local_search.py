"""The local bound's radius search (``local_search.local_lower``) and the cached operator norms.

Oracle for the search: plain bisection on "is ``rho`` certified by its own evaluation?"
(``margin_lines(...).certified``), 60 halvings of the log-bracket between 0 (or the global
bound) and the witness. The secant search must end at least as high, up to its tolerance
``CONVERGED``, and every radius it returns must be certified by its own evaluation.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import cnns, mlps, residual_cnns
from torch import nn

from certify.bounds import lipschitz
from certify.capture.export import capture
from certify.bounds import slopes
from certify.bounds.linear import boxes_and_reach, lines_on, margin_lines
from certify.graph.operators import Affine
from certify.radii.local_search import CONVERGED, local_lower, region, region_scale
from certify.radii.radius import _columns, global_lower
from certify.radii.witness import witness

MODELS = st.one_of(mlps(), cnns(), residual_cnns())


def _problems(model_and_shape, seed: int, norm: str):
    """Per hidden affine layer: everything ``local_lower`` takes, the witness as the cap."""
    model, shape = model_and_shape
    x = torch.randn(3, *shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    net = capture(model, x)
    values = net.values(x)
    y = values[-1].argmax(-1)
    margins = (values[-1].gather(-1, y[:, None]) - values[-1]).scatter(-1, y[:, None], math.inf)
    for index in net.affine_indices[:-1]:
        layer = net.layer(index)
        P = _columns(layer, values[net.input_of(index)], bias=False)
        scale = region_scale(P, norm)
        constants = lipschitz.node_constants(net, index, norm)
        floor = global_lower(net, index, scale, constants, y, margins, norm)
        cap = witness(net, index, P, y, norm, False, values[index].shape[1:],
                      values=values)[0]
        keep = torch.isfinite(cap)
        if keep.any():
            yield (net, index, [v[keep] for v in values], y[keep], P[keep], scale[keep],
                   cap[keep], constants, floor[keep])


def _certified(net, index, values, y, P, scale, rho, norm, constants) -> torch.Tensor:
    where = region(net.layer(index), values[index], P, norm, scale)
    return margin_lines(net, index, where, rho, y, values,
                        constants if norm == "fro" else None).certified(rho, y)


def _bisection(net, index, values, y, P, scale, cap, norm, constants, floor) -> torch.Tensor:
    """The largest ``rho`` that 60 log-bisections certify, from ``[floor, cap]``."""
    lo, hi = floor.clone(), cap.clone()
    tiny = cap * 1e-12  # a lower end for the geometric middle when nothing is certified yet
    for _ in range(60):
        rho = torch.sqrt(torch.maximum(lo, tiny) * hi)
        ok = _certified(net, index, values, y, P, scale, rho, norm, constants)
        lo, hi = torch.where(ok, rho, lo), torch.where(ok, hi, rho)
    return lo


@given(MODELS, st.integers(0, 2**16), st.sampled_from(["fro", "max"]), st.booleans())
def test_the_search_reaches_what_bisection_certifies(model_and_shape, seed, norm, keep_lines):
    """With or without the lines kept across evaluations (``KeptLines``)."""
    for net, index, values, y, P, scale, cap, constants, floor in _problems(
            model_and_shape, seed, norm):
        ours = local_lower(net, index, values, y, norm, P, scale, cap, constants,
                           evaluations=40, floor=floor, keep_lines=keep_lines)
        best = _bisection(net, index, values, y, P, scale, cap, norm, constants, floor)
        assert (ours >= best / (1 + 2 * CONVERGED)).all(), (ours, best)
        found = ours > floor  # the floor is the global bound's, certified without lines
        if found.any():  # each radius certified by its own evaluation, as the checker needs
            assert _certified(net, index, [v[found] for v in values], y[found], P[found],
                              scale[found], ours[found], norm, constants).all()


@settings(max_examples=8)
@given(mlps(), st.integers(0, 2**16), st.sampled_from(["fro", "max"]))
def test_the_optimised_search_certifies_each_radius_with_its_codes(model_and_shape, seed, norm):
    """From the plain search's radius, the search on optimised slopes never ends lower, and
    each radius it raises is certified by one evaluation with the codes it recorded (what
    ``certify check`` repeats)."""
    for net, index, values, y, P, scale, cap, constants, floor in _problems(
            model_and_shape, seed, norm):
        plain = local_lower(net, index, values, y, norm, P, scale, cap, constants, floor=floor)
        codes = {}
        ours = local_lower(net, index, values, y, norm, P, scale, cap, constants, floor=plain,
                           optimise=5, codes=codes, evaluations=4)
        assert (ours >= plain).all()
        found = ours > plain
        if not found.any():
            continue
        part = [v[found] for v in values]
        where = region(net.layer(index), part[index], P[found], norm, scale[found])
        boxes, reach = boxes_and_reach(net, index, where, ours[found], part,
                                       constants if norm == "fro" else None, adaptive=True)
        alphas = {i: slopes.decode(c[found]) for i, c in codes.items()}
        lines = lines_on(net, index, where, y[found], part, boxes, reach, False, alphas=alphas)
        assert lines.certified(ours[found], y[found]).all()


@pytest.mark.parametrize("norm", ["fro", "max"])
def test_bisection_has_teeth(norm):
    """One evaluation does not reach the bisection radius: the tolerance above is not so
    loose that any search passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 4)).double().eval()
    short = 0
    for net, index, values, y, P, scale, cap, constants, floor in _problems((model, (6,)), 0,
                                                                            norm):
        zero = torch.zeros_like(floor)
        best = _bisection(net, index, values, y, P, scale, cap, norm, constants, zero)
        few = local_lower(net, index, values, y, norm, P, scale, cap, constants,
                          evaluations=1, floor=zero)
        short += int((few < best / (1 + 2 * CONVERGED)).sum())
    assert short > 0


def test_operator_norms_are_cached_per_weight_version():
    """The l2 norm needs an SVD; it is computed once, and again after an in-place change."""
    W = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = Affine(W.clone(), torch.zeros(6, dtype=torch.float64))
    for norm, exact in (("fro", lambda M: float(torch.linalg.matrix_norm(M, 2))),
                        ("max", lambda M: float(M.abs().sum(1).max()))):
        first = layer.operator_norm(norm)
        assert first == pytest.approx(exact(layer.weight), rel=1e-12)
        assert layer.operator_norm(norm) == first
        with torch.no_grad():
            layer.weight.mul_(3)
        assert layer.operator_norm(norm) == pytest.approx(3 * first, rel=1e-12)
