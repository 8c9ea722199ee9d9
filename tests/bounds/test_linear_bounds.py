"""The local bounds of ``certify.bounds.linear`` hold at points sampled in the region (the
intermediate intervals contain every sampled intermediate value, every margin line lies
below every sampled margin at every smaller radius), and the numpy checker recomputes the
same bounds."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import (
    ACTIVATIONS,
    Residual,
    cnns,
    dags,
    deep_cnns,
    mlps,
    residual_cnns,
    residual_mlps,
)
from sampled_bounds import (attacked_margins, copies, margins, minimised, regions, samples,
                            tolerance, upto)
from torch import nn

from certify.bounds.linear import intermediate_bounds, margin_lines
from certify.check.bounds import local_lower_bounds
from certify.check.forward import NumpyGraph
from certify.radii.local_search import region as section4_region


@st.composite
def residual_tails(draw):
    """A layer whose downstream graph is a block and starts inside another: Linear, act,
    ``[[Linear, act] + Linear shortcut, act, Linear] + identity``, act, Linear. For the inner
    layers the skip inputs are constants of the downstream map."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = draw(st.integers(2, 6))
    act = draw(st.sampled_from(ACTIVATIONS))
    inner = Residual(nn.Sequential(nn.Linear(w, w), act()), nn.Linear(w, w))
    model = nn.Sequential(nn.Linear(6, w), act(),
                          Residual(nn.Sequential(inner, act(), nn.Linear(w, w)), nn.Identity()),
                          act(), nn.Linear(w, draw(st.integers(2, 4))))
    return model.double().eval(), (6,)


PROBLEMS = (st.one_of(mlps(), cnns(), deep_cnns(), residual_mlps(), residual_cnns(),
                      residual_tails(), dags()), st.sampled_from(["fro", "max"]),
            st.booleans(), st.floats(1e-3, 2.0), st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(*PROBLEMS, st.booleans())
def test_intervals_contain_sampled_values(model_and_shape, norm, refine, size, seed, adaptive):
    """``adaptive``: the refinement with CROWN's adaptive lines as well."""
    generator = torch.Generator().manual_seed(seed)
    for net, index, region, y, values in regions(model_and_shape, norm, size, seed):
        rho = torch.ones(len(region.z), dtype=torch.float64)
        boxes = intermediate_bounds(net, index, region, rho, values, refine=refine,
                                    adaptive=adaptive)
        assert set(net.downstream(index)) <= set(boxes)
        for point in samples(region, rho, generator):
            sampled = net.rerun(index, point, values)
            for i, (lo, hi) in boxes.items():
                v = sampled[i]
                assert torch.all(lo - tolerance(lo) <= v) and torch.all(v <= hi + tolerance(hi))
        for i in net.downstream(index)[1:]:  # attack every entry of every downstream node
            lo, hi = boxes[i]

            def current(p, sign, i=i):
                return sign * upto(net, index, p, copies(values, len(p)), i).flatten(1)

            low = minimised(lambda p: current(p, 1), region, rho, generator)
            high = -minimised(lambda p: current(p, -1), region, rho, generator)
            assert torch.all(lo.flatten(1) <= low + tolerance(low))
            assert torch.all(high <= hi.flatten(1) + tolerance(high))


@settings(max_examples=40, deadline=None)
@given(*PROBLEMS)
def test_margin_lines_hold_at_sampled_points(model_and_shape, norm, refine, size, seed):
    generator = torch.Generator().manual_seed(seed)
    for net, index, region, y, values in regions(model_and_shape, norm, size, seed):
        rho = torch.ones(len(region.z), dtype=torch.float64)
        lines = margin_lines(net, index, region, rho, y, values, refine=refine)
        for smaller in (rho, rho * 0.3):  # the lines hold for every radius up to rho
            bound = lines.lower(smaller)
            for point in samples(region, smaller, generator):
                sampled = margins(net, index, point, y, values)
                assert torch.all(bound <= sampled + tolerance(sampled)), (
                    f"layer {index}: a margin bound exceeds a sampled margin")
            attacked = attacked_margins(net, index, region, smaller, y, values, generator)
            assert torch.all(bound <= attacked + tolerance(attacked)), (
                f"layer {index}: a margin bound exceeds an attacked margin")


@settings(max_examples=25, deadline=None)
@given(*PROBLEMS)
def test_numpy_checker_recomputes_the_same_bounds(model_and_shape, norm, refine, size, seed):
    for net, index, region, y, _ in regions(model_and_shape, norm, size, seed):
        rho = torch.full((len(region.z),), 0.7, dtype=torch.float64)
        layer = net.layer(index)
        # The checker derives U from the layer's input columns: rebuild the region from them.
        values = net.values(torch.randn(len(y), *model_and_shape[1], dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(seed)))
        z = values[index]
        P = layer.patches(values[net.input_of(index)])
        y = values[-1].argmax(-1)
        ours_region = section4_region(layer, z, P, norm)
        ours = margin_lines(net, index, ours_region, rho, y, values, refine=refine).lower(rho)
        theirs = local_lower_bounds(NumpyGraph.of(net), index, [v.numpy() for v in values],
                                    P.numpy(), rho.numpy(), y.numpy(), norm, refine)
        mask = np.ones(theirs.shape, dtype=bool)
        mask[np.arange(len(y)), y.numpy()] = False
        np.testing.assert_allclose(ours.numpy()[mask], theirs[mask], rtol=1e-7,
                                   atol=1e-9 * np.abs(theirs[mask]).max())


@settings(max_examples=15, deadline=None)
@given(*PROBLEMS)
def test_refinement_in_pieces_gives_the_same_boxes(model_and_shape, norm, refine, size, seed):
    """The refinement's rows in pieces of one (``REFINE_ENTRIES`` below any node) bound every
    entry as all rows at once do: each row's bound is its own."""
    from certify.bounds import linear

    for net, index, region, y, values in regions(model_and_shape, norm, size, seed):
        rho = torch.ones(len(region.z), dtype=torch.float64)
        whole = intermediate_bounds(net, index, region, rho, values, refine=True)
        saved, linear.REFINE_ENTRIES = linear.REFINE_ENTRIES, 1
        try:
            pieces = intermediate_bounds(net, index, region, rho, values, refine=True)
        finally:
            linear.REFINE_ENTRIES = saved
        for i, (lo, hi) in whole.items():
            assert torch.allclose(lo, pieces[i][0], rtol=1e-12, atol=1e-300)
            assert torch.allclose(hi, pieces[i][1], rtol=1e-12, atol=1e-300)
