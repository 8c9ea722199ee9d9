"""The local bounds of ``certify.bounds.linear`` hold at points sampled in the region (the
intermediate intervals contain every sampled intermediate value, every margin line lies
below every sampled margin at every smaller radius), and the numpy checker recomputes the
same bounds."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import (ACTIVATIONS, Residual, cnns, dags, deep_cnns, mlps, residual_cnns,
                      residual_mlps)
from sampled_bounds import copies, margins, tolerance, upto
from torch import nn

from certify.capture.export import capture
from certify.bounds.linear import Region, intermediate_bounds, margin_lines
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


def regions(model_and_shape, norm: str, size: float, seed: int, count: int = 3):
    """For each affine layer but the last: the graph, the layer's node index, the region,
    the classes and every node's value."""
    model, shape = model_and_shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, *shape, dtype=torch.float64, generator=generator)
    net = capture(model, x)
    y = net(x).argmax(-1)
    values = net.values(x)
    for index in net.affine_indices[:-1]:
        z = values[index]
        if norm == "fro":
            unit = size * (0.5 + torch.rand(count, dtype=z.dtype, generator=generator))
        else:
            unit = size * torch.rand(z.shape, dtype=z.dtype, generator=generator)
        yield net, index, Region(z, norm, unit), y, values


def samples(region: Region, rho: torch.Tensor, generator, count: int = 16):
    """Points of ``z + rho U``: on the sphere (``fro``) or at box corners and inside (``max``)."""
    z = region.z
    for k in range(count):
        noise = torch.randn(z.shape, dtype=z.dtype, generator=generator)
        if region.norm == "fro":
            flat = noise.reshape(len(z), -1)
            radius = (rho * region.unit)[:, None] * (1 if k % 2 else torch.rand(
                len(z), 1, dtype=z.dtype, generator=generator))
            yield z + (flat / flat.norm(dim=-1, keepdim=True) * radius).reshape(z.shape)
        else:
            direction = torch.sign(noise) if k % 2 else 2 * torch.rand(
                z.shape, dtype=z.dtype, generator=generator) - 1
            yield z + direction * rho.reshape(-1, *[1] * (z.ndim - 1)) * region.unit


def _project(region: Region, rho: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """The nearest point of ``z + rho U`` (``point`` has a leading axis of copies)."""
    delta = point - region.z
    if region.norm == "fro":
        flat = delta.reshape(*delta.shape[:2], -1)
        radius = (rho * region.unit)[None, :]
        shrink = torch.clamp(radius / flat.norm(dim=-1).clamp(min=1e-300), max=1.0)
        flat = flat * shrink[..., None]
        return region.z + flat.reshape(delta.shape)
    bound = rho.reshape(-1, *[1] * (region.z.ndim - 1)) * region.unit
    return region.z + torch.maximum(torch.minimum(delta, bound), -bound)


def minimised(f, region: Region, rho: torch.Tensor, generator, steps: int = 40):
    """The smallest value of every output entry of ``f`` over ``z + rho U`` found by
    projected gradient descent, one descent per entry (an attack on the bounds)."""
    K = f(region.z).reshape(len(region.z), -1).shape[1]
    start = torch.randn((K, *region.z.shape), dtype=region.z.dtype, generator=generator)
    point = _project(region, rho, region.z + 1e-3 * start)
    entries = torch.arange(K)
    best = None
    size = (rho * (region.unit if region.norm == "fro" else region.unit.flatten(1).amax(-1)))
    for t in range(steps):
        point = point.detach().requires_grad_(True)
        values = f(point.reshape(-1, *region.z.shape[1:])).reshape(K, len(region.z), K)
        own = values[entries, :, entries]  # (K, B): entry k of copy k
        best = own.detach() if best is None else torch.minimum(best, own.detach())
        (grad,) = torch.autograd.grad(own.sum(), point)
        if region.norm == "fro":
            g = grad.reshape(K, len(region.z), -1)
            step = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-300)
            step = step.reshape(grad.shape) * size.reshape(1, -1, *[1] * (grad.ndim - 2))
        else:
            step = torch.sign(grad) * rho.reshape(1, -1, *[1] * (grad.ndim - 2)) * region.unit
        point = _project(region, rho, point - step * 0.5 * 0.9**t)
    return best.T  # (B, K)


@settings(max_examples=40, deadline=None)
@given(*PROBLEMS)
def test_intervals_contain_sampled_values(model_and_shape, norm, refine, size, seed):
    generator = torch.Generator().manual_seed(seed)
    for net, index, region, y, values in regions(model_and_shape, norm, size, seed):
        rho = torch.ones(len(region.z), dtype=torch.float64)
        boxes = intermediate_bounds(net, index, region, rho, values, refine=refine)
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
            attacked = minimised(lambda p: margins(net, index, p, y.repeat(
                len(p) // len(y)), values), region, smaller, generator)
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
