"""Weight-space concretisation (``certify.bounds.regions.WeightRegion``, THEORY.md section 4) for
layers with several columns: convolutions and a dense layer over a sequence.

* Exactness: ``dual`` and ``box`` are the suprema over the weight ball, attained by the
  closed-form maximisers (so they are neither too small, which would be unsound, nor loose).
* Soundness against attacks in WEIGHT space: the intermediate boxes contain, and every margin
  line lies below, the values at sampled and at PGD-attacked weight changes ``D`` with
  ``||D|| <= rho`` (``Z + D P~``), at ``rho`` and at a smaller radius.
* Teeth: the same attack refutes a region whose ``dual`` or ``box`` is a tenth too
  small.
* The numpy twin (``certify.check.regions``, used by ``certify check``) gives the same bounds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import ACTIVATIONS, cnns, deep_cnns, grouped_cnns, residual_cnns
from sampled_bounds import copies, margins, tolerance, upto
from torch import nn

from certify.capture.export import capture
from certify.bounds.linear import intermediate_bounds, margin_lines
from certify.check.bounds import local_lower_bounds
from certify.check.forward import NumpyGraph
from certify.radii.methods import merged_method
from certify.radii.local_search import region
from certify.bounds.regions import WeightRegion


@st.composite
def sequence_mlps(draw):
    """Dense layers applied to each of ``T`` tokens, then flattened into a Linear head."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    T, d, w = draw(st.integers(2, 4)), draw(st.integers(2, 4)), draw(st.integers(2, 5))
    act = draw(st.sampled_from(ACTIVATIONS))
    model = nn.Sequential(nn.Linear(d, w), act(), nn.Linear(w, w), act(), nn.Flatten(),
                          nn.Linear(T * w, draw(st.integers(2, 4))))
    return model.double().eval(), (T, d)


MODELS = st.one_of(cnns(), deep_cnns(), residual_cnns(), sequence_mlps(), grouped_cnns())


def weight_regions(model_and_shape, norm: str, seed: int, count: int = 3):
    """For each affine layer with several columns (not the last): the graph, the layer's
    node index, its ``WeightRegion``, the classes and every node's value."""
    model, shape = model_and_shape
    x = torch.randn(count, *shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    net = capture(model, x)
    values = net.values(x)
    y = values[-1].argmax(-1)
    for index in net.affine_indices[:-1]:
        layer = net.layer(index)
        P = layer.patches(values[net.input_of(index)])
        if P.shape[-1] > 1:
            where = region(layer, values[index], P, norm)
            assert isinstance(where, WeightRegion)
            yield net, index, where, y, values


def _unit(D: torch.Tensor, norm: str) -> torch.Tensor:
    """``D`` ``(K, B, m, n)`` scaled onto the unit sphere of its norm, per ``(K, B)``."""
    if norm == "fro":
        return D / torch.linalg.matrix_norm(D)[..., None, None].clamp(min=1e-300)
    return D / D.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-300)


def _project(D: torch.Tensor, rho: torch.Tensor, norm: str) -> torch.Tensor:
    """The nearest ``D`` with ``||D|| <= rho`` (``rho`` ``(B,)``)."""
    if norm == "fro":
        scale = torch.clamp(rho[:, None, None] / torch.linalg.matrix_norm(D)[..., None, None]
                            .clamp(min=1e-300), max=1.0)
        return D * scale
    bound = rho[:, None, None].expand_as(D)
    return torch.maximum(torch.minimum(D, bound), -bound)


def moved(where: WeightRegion, D: torch.Tensor) -> torch.Tensor:
    """``z + D P~`` for weight changes ``D`` ``(K, B, m, n)``, as ``(K * B, *z)``."""
    dZ = torch.matmul(D, where.P[None])  # (K, B, m, L)
    K, B = D.shape[:2]
    change = where.layer.uncolumns(dZ.reshape(K * B, *dZ.shape[2:]), where.z.shape[1:])
    return where.z.repeat(K, *[1] * (where.z.ndim - 1)) + change


def sampled_changes(where: WeightRegion, rho: torch.Tensor, generator, count: int = 12):
    """Weight changes on the sphere, inside, and at corners of the max box."""
    m, n = where.layer.weight.shape[0], where.P.shape[1]
    B = len(where.z)
    noise = torch.randn(count, B, m, n, dtype=torch.float64, generator=generator)
    if where.norm == "max":
        noise[::2] = torch.sign(noise[::2])
    D = _unit(noise, where.norm) * rho[None, :, None, None]
    D[1::3] *= torch.rand(len(D[1::3]), B, 1, 1, dtype=torch.float64, generator=generator)
    return D


def attacked(f, where: WeightRegion, rho: torch.Tensor, generator, steps: int = 40):
    """The smallest value of every entry of ``f(z')`` ``(B, K)`` found by PGD over weight
    changes ``||D|| <= rho``, one descent per entry."""
    K = f(where.z).shape[1]
    m, n = where.layer.weight.shape[0], where.P.shape[1]
    D = 1e-3 * torch.randn(K, len(where.z), m, n, dtype=torch.float64, generator=generator)
    D = _project(D * rho[None, :, None, None], rho, where.norm)
    entries = torch.arange(K)
    best = None
    for t in range(steps):
        D = D.detach().requires_grad_(True)
        out = f(moved(where, D)).reshape(K, len(where.z), K)[entries, :, entries]  # (K, B)
        best = out.detach() if best is None else torch.minimum(best, out.detach())
        (grad,) = torch.autograd.grad(out.sum(), D)
        step = _unit(grad if where.norm == "fro" else torch.sign(grad), where.norm)
        D = _project(D - 0.5 * 0.9**t * step * rho[None, :, None, None], rho, where.norm)
    return best.T


@settings(max_examples=30, deadline=None)
@given(MODELS, st.sampled_from(["fro", "max"]), st.integers(0, 2**31 - 1))
def test_dual_and_box_are_attained_by_their_maximisers(model_and_shape, norm, seed):
    generator = torch.Generator().manual_seed(seed)
    for _, _, where, _, _ in weight_regions(model_and_shape, norm, seed):
        B, m = len(where.z), where.layer.weight.shape[0]
        A = torch.randn(B, 3, *where.z.shape[1:], dtype=torch.float64, generator=generator)
        rows = where.layer.columns(A.reshape(3 * B, *where.z.shape[1:])).reshape(B, 3, m, -1)
        G = torch.matmul(rows, where.P.transpose(1, 2)[:, None])  # A P~^T
        best = _unit(G if norm == "fro" else torch.sign(G), norm)  # the maximising D, rho = 1
        attained = (best * G).sum(dim=(-2, -1))
        dual = where.dual(A)
        assert torch.all(attained <= dual) and torch.all(dual <= attained * (1 + 1e-9) + 1e-300)
        # Box: entry (c, j) of dZ is maximal for D_c: along P~_:j (fro) or sign(P~_:j) (max).
        rho = torch.full((B,), 0.5, dtype=torch.float64)
        column = where.P.norm(dim=1) if norm == "fro" else where.P.abs().sum(dim=1)
        expected = where.layer.uncolumns(0.5 * column[:, None, :].expand(B, m, -1),
                                         where.z.shape[1:])  # a row's own group's columns
        torch.testing.assert_close(where.box(rho), expected, rtol=1e-12, atol=0)


@settings(max_examples=30, deadline=None)
@given(MODELS, st.sampled_from(["fro", "max"]), st.booleans(), st.floats(1e-3, 3.0),
       st.integers(0, 2**31 - 1))
def test_bounds_hold_against_sampled_and_attacked_weight_changes(model_and_shape, norm, refine,
                                                                 size, seed):
    generator = torch.Generator().manual_seed(seed)
    for net, index, where, y, values in weight_regions(model_and_shape, norm, seed):
        rho = size * torch.ones(len(where.z), dtype=torch.float64)
        boxes = intermediate_bounds(net, index, where, rho, values, refine=refine)
        lines = margin_lines(net, index, where, rho, y, values, refine=refine)
        D = sampled_changes(where, rho, generator)
        sampled = net.rerun(index, moved(where, D), copies(values, len(D) * len(y)))
        for i, (lo, hi) in boxes.items():
            lo, hi = (t.repeat(len(D), *[1] * (t.ndim - 1)) for t in (lo, hi))
            assert torch.all(lo - tolerance(lo) <= sampled[i])
            assert torch.all(sampled[i] <= hi + tolerance(hi))
        for smaller in (rho, 0.3 * rho):
            bound = lines.lower(smaller)
            found = attacked(lambda z: margins(net, index, z, y.repeat(len(z) // len(y)),
                                               values), where, smaller, generator)
            assert torch.all(bound <= found + tolerance(found)), (
                f"layer {index}: a margin bound exceeds a margin under an attacked weight change")
        for i in net.downstream(index)[1:2]:  # every entry of the first downstream box
            lo, hi = boxes[i]

            def entry(z, sign, i=i):
                return sign * upto(net, index, z, copies(values, len(z)), i).flatten(1)

            low = attacked(lambda z: entry(z, 1), where, rho, generator, steps=20)
            high = -attacked(lambda z: entry(z, -1), where, rho, generator, steps=20)
            assert torch.all(lo.flatten(1) <= low + tolerance(low))
            assert torch.all(high <= hi.flatten(1) + tolerance(high))


class _DualTooSmall(WeightRegion):
    """A wrong region: its support function a tenth too small."""

    def dual(self, A):
        return 0.9 * super().dual(A)


class _BoxTooSmall(WeightRegion):
    """A wrong region: its box a tenth too small."""

    def box(self, rho):
        return 0.9 * super().box(rho)


def _first_layer_of_a_cnn(norm: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(72, 3))
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net = capture(model.double().eval(), x)
    values = net.values(x)
    index = net.affine_indices[0]
    layer = net.layer(index)
    where = region(layer, values[index], layer.patches(values[net.input_of(index)]), norm)
    return net, index, where, values[-1].argmax(-1), values


@pytest.mark.parametrize("norm", ["fro", "max"])
def test_the_attack_refutes_a_region_whose_dual_or_box_is_too_small(norm):
    """Teeth: the weight-space attack drives margins below lines computed with a dual 10%
    too small, and an entry of the layer's output beyond a box 10% too small, while the
    true region's bounds hold."""
    net, index, where, y, values = _first_layer_of_a_cnn(norm)
    fields = {f.name: getattr(where, f.name) for f in dataclasses.fields(where)}
    rho = torch.full((len(y),), 0.5, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    found = attacked(lambda z: margins(net, index, z, y.repeat(len(z) // len(y)), values), where,
                     rho, generator)
    right = margin_lines(net, index, where, rho, y, values).lower(rho)
    assert torch.all(right <= found + tolerance(found))
    too_high = margin_lines(net, index, _DualTooSmall(**fields), rho, y, values).lower(rho)
    others = torch.ones_like(found, dtype=torch.bool).scatter(-1, y[:, None], False)
    assert torch.any((too_high > found + tolerance(found))[others])
    after = net.downstream(index)[1]  # the flattened output: its box is the region's box
    high = -attacked(lambda z: -upto(net, index, z, copies(values, len(z)), after).flatten(1),
                     where, rho, generator)
    for shape, holds in ((where, True), (_BoxTooSmall(**fields), False)):
        _, hi = intermediate_bounds(net, index, shape, rho, values)[after]
        assert bool(torch.all(high <= hi.flatten(1) + tolerance(high))) == holds


@settings(max_examples=25, deadline=None)
@given(MODELS, st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_the_numpy_twin_gives_the_same_bounds(model_and_shape, norm, refine, seed):
    for net, index, where, y, values in weight_regions(model_and_shape, norm, seed):
        rho = torch.full((len(y),), 0.7, dtype=torch.float64)
        ours = margin_lines(net, index, where, rho, y, values, refine=refine).lower(rho)
        theirs = local_lower_bounds(NumpyGraph.of(net), index, [v.numpy() for v in values],
                                    where.P.numpy(), rho.numpy(), y.numpy(), norm, refine)
        mask = np.ones(theirs.shape, dtype=bool)
        mask[np.arange(len(y)), y.numpy()] = False
        np.testing.assert_allclose(ours.numpy()[mask], theirs[mask], rtol=1e-7,
                                   atol=1e-9 * np.abs(theirs[mask]).max())


def _magnitude_attack(where: WeightRegion, A: torch.Tensor, generator, steps: int = 200):
    """The largest ``<A, |D P~|>`` found by projected gradient ascent over ``||D||_F <= 1``,
    ``(B, R)``."""
    B, R = A.shape[:2]
    m, n = where.layer.weight.shape[0], where.P.shape[1]
    rows = where.layer.columns(A.reshape(B * R, *where.z.shape[1:])).reshape(B, R, m, -1)
    D = _unit(torch.randn(R, B, m, n, dtype=torch.float64, generator=generator), "fro")
    one = torch.ones(B, dtype=torch.float64)
    best = None
    for t in range(steps):
        D = D.detach().requires_grad_(True)
        dZ = torch.matmul(D, where.P[None])  # (R, B, m, L)
        value = (rows.transpose(0, 1) * dZ.abs()).sum(dim=(-2, -1))  # (R, B)
        best = value.detach() if best is None else torch.maximum(best, value.detach())
        (grad,) = torch.autograd.grad(value.sum(), D)
        D = _project(D + 0.3 * 0.98**t * _unit(grad, "fro"), one, "fro")
    return best.T


def test_the_magnitude_bound_holds_and_the_plain_dual_would_not():
    """``dual_of_magnitude`` bounds ``sup <A, |D P~|>`` (attacked), where ``dual`` (the
    support function of ``{D P~}``) does not: the set is not symmetric in each entry, so the
    interval Jacobian's mean-value line must not use it."""
    net, index, where, _, _ = _first_layer_of_a_cnn("fro")
    generator = torch.Generator().manual_seed(3)
    A = torch.rand(len(where.z), 2, *where.z.shape[1:], dtype=torch.float64,
                   generator=generator)
    found = _magnitude_attack(where, A, generator)
    assert torch.all(found <= where.dual_of_magnitude(A) * (1 + 1e-9))
    assert torch.any(found > where.dual(A) * 1.01)


def _refinable_cnn():
    """A CNN with two ReLU convolutions before the head, real digits (8x8 scikit-learn)."""
    from certify.models import small as small_models

    digits = small_models.load("digits", seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(144, 10)).double().eval()
    x = digits.x_test[:12].double()
    return capture(model, x), x


def test_the_refinement_policy_refines_weak_inputs_and_the_checker_confirms(monkeypatch):
    """Forced onto a small CNN (``REFINE_WORK = 0``): ``refine="auto"`` refines a probe of
    the weak inputs, never lowers a radius below the unrefined one, says ``(refined)``, and
    the numpy checker confirms every radius (some with, some without refinement)."""
    from certify.bounds import linear as linear_bounds
    from certify.radii import radius
    from certify.certificate.document import certify_network
    from certify.check.claims import check

    network, x = _refinable_cnn()
    index = network.affine_indices[0]
    plain = radius.layer_radii(network, x, index, "fro", refine=False, enclose=False,
                               ball=False, deviation=False)
    monkeypatch.setattr(radius, "REFINE_WORK", 0.0)
    monkeypatch.setattr(radius, "REFINE_GAIN", 0.0)  # the probe always pays: refine them all
    assert linear_bounds.refine_work(network, index) <= radius.REFINE_LIMIT
    policy = radius.layer_radii(network, x, index, "fro", enclose=False, ball=False,
                                deviation=False)
    weak = plain.lower < radius.REFINE_BELOW * plain.upper
    assert weak.sum() > radius.REFINE_PROBE and policy.method.endswith("(refined)")
    assert torch.all(policy.lower >= plain.lower)
    assert torch.all(policy.lower[~weak] == plain.lower[~weak])
    assert torch.any(policy.lower[weak] > 1.05 * plain.lower[weak])  # it does pay here
    result = certify_network(network, x, model_sha256="0" * 64, progress=False)
    report = check(result.document, result.witnesses, network, x.numpy())
    assert report.ok and report.confirmed > 0, report.refuted[:3]


def test_chunks_refined_or_not_give_one_method_the_checker_confirms(monkeypatch):
    """One input per chunk: the policy refines the weak inputs' chunks only, so the chunks'
    methods differ; the certificate names every option any chunk used (``merged_method``)
    and ``certify check`` confirms every claim."""
    from certify.radii import radius
    from certify.certificate.document import certify_network
    from certify.check.claims import check

    network, x = _refinable_cnn()
    x = x[4:8]  # the first of them is not refined: its method alone would not say "refined"
    monkeypatch.setattr(radius, "REFINE_WORK", 0.0)
    monkeypatch.setattr(radius, "REFINE_GAIN", 0.0)
    index = network.affine_indices[0]
    methods = {radius.layer_radii(network, x[k:k + 1], index, "fro").method
               for k in range(len(x))}
    assert len(methods) == 2  # some chunks refined, some not
    result = certify_network(network, x, model_sha256="0" * 64, progress=False, chunk=1)
    name = network.nodes[index].name
    entry = next(e for e in result.document["layers"] if e["name"] == name)
    assert entry["fro"]["method"] == merged_method(sorted(methods))
    assert "refined" in entry["fro"]["method"]
    report = check(result.document, result.witnesses, network, x.numpy())
    assert report.ok, report.refuted[:3]


def test_merged_method_unions_the_options():
    assert merged_method(["exact", "exact"]) == "exact"
    assert merged_method(["crown", "crown(refined)"]) == "crown(refined)"
    assert merged_method(["lipschitz+crown(forward)", "lipschitz+crown(forward,refined)"]) == \
        "lipschitz+crown(forward,refined)"
    with pytest.raises(ValueError, match="different bounds"):
        merged_method(["crown", "lipschitz+crown"])
