"""The joint bound of THEORY.md section 10 (``certify.bounds.joint``), attacked.

* Soundness: with every affine layer changed at once inside its box or Frobenius ball, at
  each input's largest certified scale, a joint projected-gradient attack (and random corners)
  never pushes a margin below its lower bound, so never flips a certified input.
* Teeth: on a fixed trained model the same attack flips certified inputs at 5 times the sets
  and uncertified ones within them.
* A point (``WeightSet.exact``) bounds the compressed network's true margins from below, with a
  gap of second order: first order is exact.
* The numpy twin (``certify.check.joint``) agrees with the torch bound.
* ``mildest`` is consistent with ``joint_certified`` on ``strength_sets``, monotone, and the
  real compression at its level keeps every class.
* The joint bound certifies more than the norm products of section 5 on int8 cell boxes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from networks import certification_problem, cnns, mlps, residual_mlps
from tiny_transformers import transformers
from torch import nn
from weight_attacks import joint_attack, joint_margins

from certify.bounds import deviations
from certify.bounds.joint import WeightSet, joint_certified, joint_margin_bounds, joint_trace
from certify.capture.export import capture
from certify.check import joint as numpy_joint
from certify.check.forward import NumpyGraph
from certify.closed_forms.compressions import Compression, compress_matrices
from certify.radii.multilayer import multilayer_bound
from certify.radii.whole_model import MAX_SEARCH_BITS, mildest, strength_sets

DT = torch.float64
SHAPES = ("cells", "relative", "random", "ball")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _base(net, shape: str, seed: int) -> dict:
    """Per layer, the set at scale 1: ``("box", A)`` with ``A`` ``max|W|`` everywhere
    (``cells``, a quantiser's), ``|W|`` (``relative``, a pruning box) or random in
    ``[0, max|W|]``; or ``("ball", ||W||_F)``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in net.affine_indices:
        W = net.layer(k).matrix
        if shape == "ball":
            out[k] = ("ball", torch.linalg.matrix_norm(W))
        elif shape == "cells":
            out[k] = ("box", W.abs().max().expand_as(W))
        elif shape == "relative":
            out[k] = ("box", W.abs())
        else:
            out[k] = ("box", torch.rand(W.shape, generator=g, dtype=DT) * W.abs().max())
    return out


def _scaled(base: dict, t: torch.Tensor) -> dict:
    """``base`` at per-input scales ``t`` ``(B,)``: boxes ``(B, m, n)``, balls ``(B,)``."""
    return {k: (kind, t.reshape(-1, 1, 1) * r if kind == "box" else t * r)
            for k, (kind, r) in base.items()}


def _weight_sets(sets: dict) -> dict:
    return {k: WeightSet(kind, r) for k, (kind, r) in sets.items()}


def _largest_certified(net, trace, base: dict, B: int) -> torch.Tensor:
    """Per input, a scale near the largest certified one (bisection on a log scale in
    ``[1e-9, 10]``); 0 where none is."""
    lo, hi = torch.full((B,), math.log(1e-9), dtype=DT), torch.full((B,), math.log(10.0), dtype=DT)
    ok_lo = joint_certified(net, trace, _weight_sets(_scaled(base, lo.exp())))
    for _ in range(24):
        mid = (lo + hi) / 2
        ok = joint_certified(net, trace, _weight_sets(_scaled(base, mid.exp())))
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(ok_lo, lo.exp(), torch.zeros_like(lo))


def _joint_problem(model_and_shape, seed: int):
    """The drawn network on six inputs, its classes and the trace of every affine layer;
    ``None`` when a node downstream has no deviation rules (no joint bound)."""
    net, x, y = certification_problem(model_and_shape, seed)
    if not all(deviations.supported(net, k) for k in net.affine_indices):
        return None
    return net, x, y, joint_trace(net, net.affine_indices, net.values(x), y, supports=True)


def _assert_attack_fails(net, x, y, trace, sets, what: str):
    """The joint attack within ``sets`` keeps every margin above its lower bound, and
    every certified input's class."""
    bounds = joint_margin_bounds(net, trace, _weight_sets(sets))
    certified = joint_certified(net, trace, _weight_sets(sets))
    lowest = joint_attack(net, x, y, sets)
    others = torch.ones_like(bounds, dtype=torch.bool).scatter(-1, y[:, None], False)
    slack = 1e-12 * (1 + lowest.abs())
    below = others & torch.isfinite(bounds) & (lowest < bounds - slack)
    assert not below.any(), f"{what}: margins {lowest[below]} below bounds {bounds[below]}"
    flipped = (lowest.masked_fill(~others, math.inf) <= 0).any(-1)
    assert not (certified & flipped).any(), \
        f"{what}: certified inputs {torch.nonzero(certified & flipped)[:, 0].tolist()} flipped"
    return certified


# -- soundness against a joint attack ----------------------------------------------------------

FAMILIES = {
    "relu_mlp": mlps(activations=[nn.ReLU]),
    "smooth_mlp": mlps(activations=[nn.Tanh, nn.GELU]),
    "residual_mlp": residual_mlps(),
    "cnn": cnns(),
    "transformer": transformers(),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=8, deadline=None)
@given(data=st.data(), shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_no_joint_attack_beats_the_bound(family, data, shape, seed):
    """Every affine layer changed at once inside its box (a quantiser's cells, a pruning box,
    a random box) or Frobenius ball, each input at its own largest certified scale: no
    random corner or projected-gradient step on all the layers jointly pushes a margin below
    its lower bound, so no certified input changes class."""
    problem = _joint_problem(data.draw(FAMILIES[family], label="model_and_shape"), seed)
    assume(problem is not None)  # an operator without deviation rules
    net, x, y, trace = problem
    base = _base(net, shape, seed)
    t = _largest_certified(net, trace, base, len(x))
    certified = _assert_attack_fails(net, x, y, trace, _scaled(base, t),
                                     f"{shape} at scales {t.tolist()}")
    assert certified[t > 0].all()


# -- teeth ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_mlp():
    """A 64-32-16-10 MLP (tanh, then ReLU) after 40 Adam steps on the digits, with its first
    200 test digits (98% right on the first 48)."""
    from training import trained

    from certify.models import small

    digits = small.load("digits", seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16),
                          nn.ReLU(), nn.Linear(16, 10))
    model = trained(model, digits, 40)
    x = digits.x_test[:200].double()
    return capture(model, x), x


def _sets_of(weight_sets: dict) -> dict:
    return {k: (s.kind, s.radius) for k, s in weight_sets.items()}


def test_the_certificate_and_the_joint_attack_have_teeth(digits_mlp):
    """On the trained MLP, 6-bit cells on every layer and Frobenius balls of 0.4% of every
    layer's norm: the attack within the sets flips no certified input but flips uncertified
    ones (the certificate is not vacuous), and at 5 times the sets it flips certified ones
    (the attack is not toothless)."""
    net, x = digits_mlp
    x = x[:48]
    values = net.values(x)
    y = values[-1].argmax(-1)
    trace = joint_trace(net, net.affine_indices, values, y, supports=True)
    cells = _sets_of(strength_sets(net, net.affine_indices, Compression("bits", 6), None))
    balls = {k: ("ball", 0.004 * torch.linalg.matrix_norm(net.layer(k).matrix))
             for k in net.affine_indices}
    # Seen: 6-bit cells certify 14 of 48, the attack flips 16 uncertified within the sets and
    # all 14 certified at 5x; balls certify 40, flip 1 uncertified within and 21 at 5x.
    for name, sets in (("cells", cells), ("balls", balls)):
        certified = _assert_attack_fails(net, x, y, trace, sets, name)
        within = _flipped(joint_attack(net, x, y, sets), y)
        beyond = _flipped(joint_attack(net, x, y, {k: (kind, 5 * r)
                                                   for k, (kind, r) in sets.items()}), y)
        assert 0 < int(certified.sum()) < len(x), name
        assert (within & ~certified).any(), f"{name}: the attack flips nothing uncertified"
        assert (beyond & certified).any(), f"{name}: 5 times the sets flip nothing certified"


def _flipped(lowest: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Inputs with a nonpositive margin (``lowest`` from ``joint_attack``)."""
    return (lowest.scatter(-1, y[:, None], math.inf) <= 0).any(-1)


# -- points: the compressed network's true margins ---------------------------------------------

@settings(max_examples=24, deadline=None)
@given(model_and_shape=st.one_of(mlps(), residual_mlps(), cnns(), transformers()),
       seed=st.integers(0, 2**16), changed=st.lists(st.booleans(), min_size=16, max_size=16),
       bits=st.integers(2, 12))
def test_a_point_bounds_the_true_margins_with_an_exact_first_order(model_and_shape, seed,
                                                                   changed, bits):
    """``WeightSet.exact(E)`` on every layer (``E = 0`` on some): the bound never exceeds
    the margins of the network with weights ``W + E``, for ``E = t D`` (a random direction
    ``D``, ``t`` from 1 to 1e-6) and for ``E`` a real quantisation; and the gap is of second
    order, ``(true - bound) / t -> 0``: at some small ``t`` it is below 1% of the first
    order's scale ``sum_k <|G_k P_k^T|, |D_k|>``."""
    problem = _joint_problem(model_and_shape, seed)
    assume(problem is not None)
    net, x, y, trace = problem
    g = torch.Generator().manual_seed(seed)
    changed = changed[:len(net.affine_indices)]
    changed[seed % len(changed)] = True
    D = {k: torch.randn(net.layer(k).matrix.shape, generator=g, dtype=DT) *
         net.layer(k).matrix.abs().max() * on for k, on in zip(net.affine_indices, changed)}
    others = torch.ones_like(trace.margins, dtype=torch.bool).scatter(-1, y[:, None], False)

    def gap(E):
        bound = joint_margin_bounds(net, trace, {k: WeightSet.exact(e) for k, e in E.items()})
        true = joint_margins(net, x, y, E)
        gap = (true - bound)[others]
        assert (gap >= 0).all(), f"bound above the true margin by {-gap.min()}"
        return gap

    matrices = [net.layer(k).matrix for k in net.affine_indices]
    quantised = compress_matrices(matrices, Compression("bits", bits))
    gap({k: G - W for k, W, G in zip(net.affine_indices, matrices, quantised)})
    scale = sum(torch.einsum("bcmn,mn->bc", trace.products[k].abs(), d.abs())
                for k, d in D.items())[others]
    logits = trace.values[-1]
    rounding = 1e-7 * (logits.gather(-1, y[:, None]).abs() + logits.abs())[others]
    relative = [gap({k: t * d for k, d in D.items()}) / (t * scale + rounding)
                for t in (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)]
    best = torch.stack(relative).amin(0)
    assert (best <= 1e-2).all(), f"first order not exact: relative gaps {best.max()}"


# -- the numpy twin ----------------------------------------------------------------------------

@settings(max_examples=16, deadline=None)
@given(model_and_shape=st.one_of(mlps(), residual_mlps(), cnns(), transformers()),
       shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16),
       factor=st.floats(0.1, 3.0), per_input=st.booleans())
def test_the_numpy_twin_agrees(model_and_shape, shape, seed, factor, per_input):
    """``certify.check.joint.joint_margin_bounds`` equals the torch bound to 1e-9 of the
    margins' scale (of the bound itself where it is far below), for boxes (one for all
    inputs, or one per input with a batch axis) and balls (a number, or one per input), at
    scales around each input's largest certified one; the same entries are infinite (NaN in
    torch is no bound, -inf in numpy)."""
    problem = _joint_problem(model_and_shape, seed)
    assume(problem is not None)
    net, x, y, trace = problem
    base = _base(net, shape, seed)
    t = _largest_certified(net, trace, base, len(x)) * factor
    if not per_input:  # one set for all inputs: (m, n) boxes, scalar balls
        t = t.amin().expand(len(x))
    sets = _scaled(base, t)
    if not per_input:
        sets = {k: (kind, r[0]) for k, (kind, r) in sets.items()}
    torch_bound = joint_margin_bounds(net, trace, _weight_sets(sets))
    graph = NumpyGraph.of(net)
    numpy_bound = numpy_joint.joint_margin_bounds(
        graph, graph.values(x.numpy()), y.numpy(), {k: (kind, r.numpy())
                                                    for k, (kind, r) in sets.items()})
    assert numpy_bound is not None
    numpy_bound = torch.from_numpy(numpy_bound)
    others = torch.ones_like(torch_bound, dtype=torch.bool).scatter(-1, y[:, None], False)
    assert not torch.isnan(torch_bound).any()  # an unbounded remainder reads -inf
    assert torch.equal(torch.isinf(torch_bound) & others, torch.isinf(numpy_bound) & others)
    finite = others & torch.isfinite(torch_bound)
    # 1e-9 of the margins' scale where it matters (bounds near 0); a vacuous bound far below
    # (-1.5e4 on margins of 0.5 in a tiny transformer) agrees to 1e-9 of itself.
    margins = trace.margins.masked_fill(~others, 0).abs().amax(-1, keepdim=True)
    tolerance = 1e-9 * torch.maximum(margins.expand_as(finite), torch_bound.abs())[finite]
    difference = (torch_bound - numpy_bound)[finite].abs()
    assert (difference <= tolerance).all(), f"differ by {(difference / tolerance).max()} x 1e-9"


# -- mildest -------------------------------------------------------------------------------------

def _strength_certified(net, trace, kind: str, level) -> torch.Tensor:
    """``joint_certified`` on every compression of ``kind`` at ``level`` of every layer."""
    indices = net.affine_indices
    compression = Compression(kind, level)
    compressed = compress_matrices([net.layer(k).matrix for k in indices], compression)
    return joint_certified(net, trace, strength_sets(net, indices, compression, compressed))


def _compressed_margins(net, x, y, kind: str, level) -> torch.Tensor:
    """The smallest margin of each input on the network really compressed at ``level``."""
    indices = net.affine_indices
    matrices = [net.layer(k).matrix for k in indices]
    compressed = compress_matrices(matrices, Compression(kind, level))
    margins = joint_margins(net, x, y, {k: G - W for k, W, G in zip(indices, matrices,
                                                                    compressed)})
    return margins.scatter(-1, y[:, None], math.inf).amin(-1)


@settings(max_examples=10, deadline=None)
@given(model_and_shape=st.one_of(mlps(), residual_mlps()), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["bits", "bits_per_channel"]))
def test_mildest_bits_is_the_fewest_certified(model_and_shape, seed, kind):
    """Per input, ``mildest`` bits are certified by ``joint_certified`` on ``strength_sets``
    and so is every larger width (monotone); one bit fewer is not (``nan``: not even 32
    bits); the model really quantised at those bits keeps the class."""
    problem = _joint_problem(model_and_shape, seed)
    assume(problem is not None)
    net, x, y, trace = problem
    bits = mildest(net, x, kind)
    found = ~torch.isnan(bits)
    assert not _strength_certified(net, trace, kind, MAX_SEARCH_BITS)[~found].any()
    for b in sorted({int(v) for v in bits[found].tolist()}):
        at = bits == b
        for wider in {min(w, MAX_SEARCH_BITS) for w in (b, b + 1, b + 3, MAX_SEARCH_BITS)}:
            assert _strength_certified(net, trace, kind, wider)[at].all(), (b, wider)
        if b > 2:
            assert not _strength_certified(net, trace, kind, b - 1)[at].any(), b
        assert (_compressed_margins(net, x, y, kind, b)[at] > 0).all(), b


@settings(max_examples=10, deadline=None)
@given(model_and_shape=st.one_of(mlps(), residual_mlps()), seed=st.integers(0, 2**16))
def test_mildest_prune_global_is_the_largest_certified(model_and_shape, seed):
    """Per input, ``mildest`` ``prune_global`` ratio ``k / N`` is certified on
    ``strength_sets`` (every pruning of that threshold, ties included), and so is every
    smaller ratio tried; ``(k + 1) / N`` is not; the model really pruned at ``k / N`` keeps
    the class."""
    problem = _joint_problem(model_and_shape, seed)
    assume(problem is not None)
    net, x, y, trace = problem
    N = sum(net.layer(k).matrix.numel() for k in net.affine_indices)
    ratios = mildest(net, x, "prune_global")
    counts = torch.round(ratios * N).long()
    assert torch.equal(counts / N, ratios)
    for k in sorted(set(counts.tolist())):
        at = counts == k
        for fewer in {k, k // 2, 0}:
            assert _strength_certified(net, trace, "prune_global", fewer / N)[at].all(), k
        if k < N:
            assert not _strength_certified(net, trace, "prune_global", (k + 1) / N)[at].any(), k
        assert (_compressed_margins(net, x, y, "prune_global", k / N)[at] > 0).all(), k


def test_mildest_relative_is_the_largest_certified_ball(digits_mlp):
    """On the trained MLP: ``relative`` Frobenius balls ``t ||W_k||_F`` on every layer are
    certified at the returned ``t`` and not at ``1.01 t``; and for every width from 2 to 32
    bits, ``joint_certified`` on ``strength_sets`` holds exactly where ``mildest`` bits are
    at most that width (consistent and monotone)."""
    net, x = digits_mlp
    x = x[:16]
    values = net.values(x)
    trace = joint_trace(net, net.affine_indices, values, values[-1].argmax(-1), supports=True)
    t = mildest(net, x, "relative")
    norms = {k: torch.linalg.matrix_norm(net.layer(k).matrix) for k in net.affine_indices}
    assert (t > 0).all()
    for factor, expected in ((1.0, True), (1.01, False)):
        sets = {k: WeightSet("ball", factor * t * n) for k, n in norms.items()}
        assert (joint_certified(net, trace, sets) == expected).all(), factor
    bits = mildest(net, x, "bits")
    for b in range(2, MAX_SEARCH_BITS + 1):
        certified = _strength_certified(net, trace, "bits", b)
        assert torch.equal(certified, bits <= b), b


# -- versus the norm products of section 5 ------------------------------------------------------

def test_the_joint_bound_certifies_more_than_section_5(digits_mlp):
    """int8 cell boxes on every layer of the trained 3-layer MLP, 200 test digits: every
    input certified by ``multilayer_bound`` with the boxes' matching budgets (the largest
    cell, ``norm="max"``, or the boxes' Frobenius norms, ``"fro"``: both balls contain the
    box) is certified by the joint bound, and the joint bound certifies more."""
    net, x = digits_mlp
    values = net.values(x)
    trace = joint_trace(net, net.affine_indices, values, values[-1].argmax(-1), supports=True)
    sets = strength_sets(net, net.affine_indices, Compression("bits", 8), None)
    joint = joint_certified(net, trace, sets)
    largest = multilayer_bound(net, x, [float(s.radius.max()) for s in sets.values()],
                               "max").certified
    frobenius = multilayer_bound(net, x, [float(torch.linalg.matrix_norm(s.radius))
                                          for s in sets.values()], "fro").certified
    # Seen: joint 178 of 200, section 5 125 (max budgets) and 121 (Frobenius budgets).
    assert not (largest & ~joint).any() and not (frobenius & ~joint).any()
    assert int(joint.sum()) > int((largest | frobenius).sum()) + 20


@settings(max_examples=12, deadline=None)
@given(data=st.data(), shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.1, 1.0, 3.0]))
def test_first_order_supports_never_loosen_the_bound(data, shape, seed, scale):
    """With the layers' first-order supports (``supports=True``) every deviation box is the
    smaller of two sound ones, so no margin's bound falls below the plain one's."""
    family = data.draw(st.sampled_from(["relu_mlp", "residual_mlp", "cnn"]))
    problem = _joint_problem(data.draw(FAMILIES[family], label="model_and_shape"), seed)
    assume(problem is not None)
    net, x, y, trace = problem
    plain = joint_trace(net, net.affine_indices, net.values(x), y)
    base = _base(net, shape, seed)
    t = _largest_certified(net, trace, base, len(x)).clamp(min=1e-6) * scale
    sets = _weight_sets(_scaled(base, t))
    tight, loose = joint_margin_bounds(net, trace, sets), joint_margin_bounds(net, plain, sets)
    finite = torch.isfinite(loose)
    assert (tight[finite] >= loose[finite] - 1e-9 * (1 + loose[finite].abs())).all()
