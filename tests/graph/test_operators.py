"""Soundness of every operator's rules (certify/operators, THEORY.md section 8), with an
attack as the oracle.

For every operator family (tests/support/operator_cases.py draws the parameters, shapes, boxes and
rows) each rule is attacked:

1. ``interval``: containment of ``op(x)`` at corners, uniform points and by projected
   (sign-)gradient ascent on the violation of each output bound inside the boxes;
2. ``backward`` (``lower=False`` and ``lower=True``): the same attack on the violation of
   ``A . op(x) in sum_i rows_i . x_i + d +- e`` (or ``>= ... - e``);
3. ``jacobian``: for points ``x`` (sampled and attacked) the exact Jacobian by autograd and
   the worst ``A`` in the interval rows for every entry (``A_c J +- A_r |J|``, a corner of
   ``[lo, hi]``), against the returned interval rows;
4. ``lipschitz``: gradient ascent on ``||op(x) - op(x')|| / ||x - x'||`` (l2 for "fro",
   l_inf for "max") from random pairs, one input moving; ``combine`` likewise on
   ``z -> op(M_1 z, M_2 z)``;
5. ``local_reach``: the attack of 1. on ``||op(x) - op(x0)||_2`` over the boxes, each
   point pulled radially into the ball ``||x_i - x0_i|| <= r_i`` around the nominal one.

The attack has teeth: on hand-picked cases where the rule's bound is attained, the same
attack against a deliberately tightened bound (the interval shrunk by 10% of its width on
each side, ``e`` halved and ``d`` moved by 1e-6, the lower line lifted by half the largest
sampled slack plus 1e-6, the interval rows shrunk by 10%, the constant and the local reach
halved) must find a violation. Only float64 rounding is tolerated (``TOL`` absolute,
``LIP_TOL`` relative).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from operator_cases import (
    DT,
    FAMILIES,
    ROW_STYLES,
    TEETH,
    boxes_for,
    cases,
    interval_rows_for,
    randn,
    reaches_for,
    rows_for,
)
from torch.func import jacrev, vmap

from certify.capture.export import UnsupportedModelError, capture
from certify.graph.operators import Activation, Add, Affine, Cat, MaxPool, Operator

TOL = 1e-12  # absolute: float64 rounding of O(1) quantities only
LIP_TOL = 1e-9  # relative, on a ratio of differences
SHIFT = 1e-6  # how far teeth move an exact bound

# A fraction of the profile's budget: every family is its own test (ci: 10 examples).
EXAMPLES = max(6, settings().max_examples // 4)
FAST = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (two threads only wait on each other, and on a
    loaded machine a waiting thread costs orders of magnitude); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------- attacks


def _flat(x):
    """``(N, B, *s)`` -> ``(N B, *s)``."""
    return x.reshape(-1, *x.shape[2:])


def maximise(violation, boxes, gen, *, targets=12, steps=30, samples=16):
    """Largest value of ``violation`` found on the boxes.

    ``violation(xs)``: inputs ``(N, B, *in_i)`` (N independent points per batch entry) ->
    ``(N, B, K)``. Starts: uniform points and random corners (``samples`` of each, evaluated
    and kept as starts); the ascent runs, with sign-gradient steps of a decreasing fraction of
    the box width and projection onto the box, on up to ``targets`` single entries ``k``
    (all of them when ``K`` is small) and on two random positive mixtures of all entries.
    """
    los = [lo for lo, _ in boxes]
    widths = [hi - lo for lo, hi in boxes]
    with torch.no_grad():
        K = violation([((lo + hi) / 2)[None] for lo, hi in boxes]).shape[-1]
    chosen = torch.randperm(K, generator=gen)[:targets]
    weights = torch.cat([torch.eye(K, dtype=DT)[chosen], rand_mix(gen, 2, K)])
    per_target = 2  # one uniform start, one corner start
    weights = weights.repeat_interleave(per_target, 0)
    N = max(len(weights), 2 * samples)
    if len(weights) < N:
        weights = torch.cat([weights, rand_mix(gen, N - len(weights), K)])

    def start(lo, w):
        u = torch.rand(N, *lo.shape, generator=gen, dtype=DT)
        corner = (torch.rand(N, *lo.shape, generator=gen, dtype=DT) < 0.5).to(DT)
        pick = (torch.arange(N) % 2 == 0).reshape(N, *[1] * lo.ndim)
        return lo + w * torch.where(pick, u, corner)

    xs = [start(lo, w) for lo, w in zip(los, widths)]
    best = -math.inf
    for t in range(steps + 1):
        xs = [x.detach().requires_grad_(True) for x in xs]
        v = violation(xs)
        # A NaN bound is no bound: it counts as an infinite violation.
        best = max(best, float(torch.nan_to_num(v.detach(), nan=math.inf).max()))
        if t == steps or not v.requires_grad:  # a piecewise-constant violation: samples decide
            break
        objective = (v * weights[:, None, :]).sum()
        grads = torch.autograd.grad(objective, xs, allow_unused=True)
        size = 0.5 * 0.02 ** (t / max(steps - 1, 1))  # 0.5 -> 0.01 of the width
        with torch.no_grad():
            xs = [x if g is None else torch.minimum(torch.maximum(x + size * w * g.sign(), lo),
                                                       lo + w)
                  for x, g, lo, w in zip(xs, grads, los, widths)]
    return best


def rand_mix(gen, n, K):
    w = torch.rand(n, K, generator=gen, dtype=DT)
    return w / w.sum(-1, keepdim=True)


def apply(op, xs):
    """``op`` on ``(N, B, *in_i)`` inputs: ``(N, B, *out)``."""
    N, B = xs[0].shape[:2]
    out = op(*[_flat(x) for x in xs])
    return out.reshape(N, B, *out.shape[1:])


# ----------------------------------------------------------------------- rule violations


def interval_violation(op, boxes, gen, tighten=False, **kw):
    lo, hi = op.interval(*boxes)
    B = len(lo)
    assert lo.shape == hi.shape
    if tighten:
        w = hi - lo
        lo, hi = lo + 0.1 * w, hi - 0.1 * w
    lo, hi = lo.reshape(B, -1), hi.reshape(B, -1)

    def violation(xs):
        f = apply(op, xs)
        f = f.reshape(*f.shape[:2], -1)
        return torch.cat([f - hi, lo - f], -1)

    return maximise(violation, boxes, gen, **kw)


def backward_violation(op, boxes, A, lower, gen, tighten=False, **kw):
    rows, d, e = op.backward(A, boxes, lower)
    B, R = A.shape[:2]
    assert len(rows) == len(boxes)
    for r, (lo, _) in zip(rows, boxes):
        assert r is None or r.shape == (B, R, *lo.shape[1:])
    d = torch.zeros(B, R, dtype=DT) if d is None else d
    e = torch.zeros(B, R, dtype=DT) if e is None else e
    assert d.shape == e.shape == (B, R)
    assert bool((e >= 0).all())

    def gap(xs):
        """``A . op(x) - sum_i rows_i . x_i - d``: ``(N, B, R)``."""
        f = apply(op, xs)
        s = (A[None] * f[:, :, None]).reshape(*f.shape[:2], R, -1).sum(-1)
        for r, x in zip(rows, xs):
            if r is not None:
                s = s - (r[None] * x[:, :, None]).reshape(*x.shape[:2], R, -1).sum(-1)
        return s - d

    if lower:
        if tighten:  # lift the line by half its largest sampled slack
            pts = [lo + (hi - lo) * torch.rand(64, *lo.shape, generator=gen, dtype=DT)
                   for lo, hi in boxes]
            with torch.no_grad():
                slack = (gap(pts) + e).amax(0)
            e = e - 0.5 * slack - SHIFT
        return maximise(lambda xs: -gap(xs) - e, boxes, gen, **kw)
    shift, scale = (SHIFT, 0.5) if tighten else (0.0, 1.0)
    return maximise(lambda xs: torch.cat([gap(xs) - shift - scale * e,
                                          shift - gap(xs) - scale * e], -1), boxes, gen, **kw)


def per_sample_jacobians(op, xs, index):
    """``J`` of output w.r.t. input ``index`` at every point: ``(N B, out, in)`` (flat)."""
    flat = [_flat(x) for x in xs]

    def f(*point):
        return op(*(x[None] for x in point))[0].reshape(-1)

    return vmap(jacrev(f, argnums=index))(*flat).reshape(len(flat[index]), -1,
                                                         flat[index][0].numel())


def jacobian_violation(op, boxes, rows, gen, tighten=False, **kw):
    """``None`` when the operator has no interval Jacobian."""
    out = op.jacobian(rows, boxes)
    if out is None:
        return None
    a_lo, a_hi = rows
    B, R = a_lo.shape[:2]
    a_c, a_r = ((a_hi + a_lo) / 2).reshape(B, R, -1), ((a_hi - a_lo) / 2).reshape(B, R, -1)
    assert len(out) == len(boxes)
    worst = -math.inf
    for i, ((j_lo, j_hi), (lo, _)) in enumerate(zip(out, boxes)):
        assert j_lo.shape == j_hi.shape == (B, R, *lo.shape[1:])
        if tighten:
            w = j_hi - j_lo
            j_lo, j_hi = j_lo + 0.1 * w, j_hi - 0.1 * w
        j_lo, j_hi = j_lo.reshape(B, -1), j_hi.reshape(B, -1)

        n_in = lo[0].numel()

        def violation(xs, i=i, j_lo=j_lo, j_hi=j_hi, n_in=n_in):
            N = xs[0].shape[0]
            J = per_sample_jacobians(op, xs, i).reshape(N, B, -1, n_in)
            center = torch.einsum("brm,nbmk->nbrk", a_c, J)
            radius = torch.einsum("brm,nbmk->nbrk", a_r, J.abs())
            top, bottom = (center + radius).reshape(N, B, -1), (center - radius).reshape(N, B, -1)
            return torch.cat([top - j_hi, j_lo - bottom], -1)

        if not op.nonlinear:  # a constant Jacobian: one point decides
            kw_i = dict(kw, steps=0, samples=1)
        else:
            kw_i = kw
        worst = max(worst, maximise(violation, boxes, gen, **kw_i))
    return worst


def lipschitz_violation(op, in_shapes, norm, gen, tighten=False, steps=40, N=48):
    """Largest ``ratio / c - 1`` found over the inputs (each moving alone, the others fixed
    at a random point)."""
    constants = op.lipschitz(norm, in_shapes)
    assert len(constants) == len(in_shapes)
    worst = -math.inf
    for i, c in enumerate(constants):
        fixed = [randn(gen, 1, *s).expand(N, *s) for s in in_shapes]

        def f(x, i=i, fixed=fixed):
            return op(*[x if j == i else other for j, other in enumerate(fixed)])

        q = _ratio(f, in_shapes[i], norm, gen, steps, N)
        c = float(c) * (0.5 if tighten else 1.0)
        worst = max(worst, q / c - 1 if c > 0 else (math.inf if q > 0 else -1.0))
    return worst


def local_reach_violation(op, boxes, reaches, nominals, gen, tighten=False, **kw):
    """Largest ``||op(x) - op(x0)||_2 - bound`` found (``bound`` halved by ``tighten``),
    ``None`` where the operator has no ``local_reach``. A point ``x`` of the boxes enters as
    ``x0 + (x - x0) min(1, r / ||x - x0||)``: in the ball and, as the box holds ``x0``, in
    the box."""
    bound = op.local_reach(boxes, reaches, nominals)
    if bound is None:
        return None
    assert bound.shape == (len(nominals[0]),)
    bound = bound * (0.5 if tighten else 1.0)
    center = op(*nominals)

    def violation(xs):
        pulled = []
        for x, x0, r in zip(xs, nominals, reaches):
            d = x - x0
            if r is not None:
                length = d.flatten(2).norm(dim=-1).clamp(min=1e-300)
                d = d * (r / length).clamp(max=1.0).reshape(*length.shape, *[1] * (d.ndim - 2))
            pulled.append(x0 + d)
        change = apply(op, pulled) - center
        return (change.flatten(2).norm(dim=-1) - bound)[..., None]

    return maximise(violation, boxes, gen, **kw)


def _ratio(f, shape, norm, gen, steps, N):
    """Largest ``||f(x + d) - f(x)|| / ||d||`` found (per point of a batch of ``N``)."""
    scales = torch.tensor([0.3, 1.0, 3.0, 10.0], dtype=DT).repeat(N)[:N]
    radii = torch.tensor([1e-3, 1e-1, 1.0], dtype=DT).repeat(N)[torch.randperm(N, generator=gen)]
    view = (N, *[1] * len(shape))
    x = torch.randn(N, *shape, generator=gen, dtype=DT) * scales.reshape(view)
    u = torch.randn(N, *shape, generator=gen, dtype=DT)
    if norm == "max":
        u = u.sign()
    r = (radii * scales).reshape(view)  # relative to |x|: rounding of f(x+d)-f(x) ~ eps/1e-3

    def norms(t):
        t = t.reshape(len(t), -1)
        if t.shape[1] == 0:
            return torch.zeros(len(t), dtype=DT)
        return t.norm(dim=1) if norm == "fro" else t.abs().amax(1)

    def ratio(x, u):
        d = r * (u / norms(u).clamp(min=1e-300).reshape(view) if norm == "fro" else u)
        num, den = norms(f(x + d) - f(x)), norms(d)
        return torch.where(den > 0, num / den.clamp(min=1e-300), 0.0)

    best = 0.0
    for t in range(steps + 1):
        x, u = x.detach().requires_grad_(True), u.detach().requires_grad_(True)
        q = ratio(x, u)
        best = max(best, float(torch.nan_to_num(q.detach(), nan=math.inf).max()))
        if t == steps:
            break
        gx, gu = torch.autograd.grad(q.sum(), [x, u], allow_unused=True)
        size = 0.3 * 0.03 ** (t / max(steps - 1, 1))
        with torch.no_grad():
            if gx is not None:
                x = x + size * scales.reshape(view) * gx / norms(gx).clamp(min=1e-300) \
                    .reshape(view)
            if gu is not None and norm == "max":  # a sign step, back onto ||u||_inf = 1
                u = (u + size * gu.sign()).clamp(-1, 1)
                u = u / norms(u).clamp(min=1e-300).reshape(view)
            elif gu is not None:
                u = u + size * norms(u).reshape(view) * gu / norms(gu).clamp(min=1e-300) \
                    .reshape(view)
    return best


# -------------------------------------------------------------------- soundness (drawn)


# Cases per example: the activations' and max pooling's rules have the most branches (kinks,
# slopes, ties, padding), and their checks are cheap.
WEIGHT = {"relu": 3, "leaky_relu": 4, "elu": 3, "tanh": 2, "sigmoid": 2, "gelu": 2,
          "gelu_tanh": 2, "softplus": 3, "max_pool1d": 2, "max_pool2d": 2}


def drawn(data, family, rule):
    """The cases of one example (``WEIGHT``), less the known bugs of ``rule``."""
    drawn = [data.draw(cases(family)) for _ in range(WEIGHT.get(family, 1))]
    return list(drawn)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@FAST
@given(data=st.data())
def test_interval_sound(family, data):
    for case in drawn(data, family, "interval"):
        v = interval_violation(case.op, boxes_for(case), case.generator(10))
        assert v <= TOL, f"interval of {case} missed op(x) by {v:.3e}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("lower", [False, True], ids=["two_sided", "lower"])
@FAST
@given(data=st.data())
def test_backward_sound(family, lower, data):
    for case in drawn(data, family, "backward_lower" if lower else "backward"):
        R, style = data.draw(st.integers(1, 3)), data.draw(st.sampled_from(ROW_STYLES))
        A = rows_for(case, R, style)
        v = backward_violation(case.op, boxes_for(case), A, lower, case.generator(11))
        assert v <= TOL, f"linear rule (lower={lower}, rows {style}) of {case} off by {v:.3e}"


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if not f.startswith("max_pool")])
# (max pooling has no interval Jacobian: test_max_pool_has_no_jacobian)
@FAST
@given(data=st.data())
def test_jacobian_sound(family, data):
    for case in drawn(data, family, "jacobian"):
        R, degenerate = data.draw(st.integers(1, 2)), data.draw(st.booleans())
        v = jacobian_violation(case.op, boxes_for(case),
                               interval_rows_for(case, R, degenerate), case.generator(12))
        if v is None:  # softplus: no mean value theorem across its jump
            assert case.op.kind == "softplus" and case.op.jump > 0
            continue
        assert v <= TOL, f"interval Jacobian of {case} missed A J by {v:.3e}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("norm", ["fro", "max"])
@FAST
@given(data=st.data())
def test_lipschitz_sound(family, norm, data):
    for case in drawn(data, family, "lipschitz"):
        v = lipschitz_violation(case.op, case.in_shapes, norm, case.generator(13))
        assert v <= LIP_TOL, f"{norm} Lipschitz constant of {case} exceeded by a factor {1 + v}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
@FAST
@given(data=st.data())
def test_local_reach_sound(family, data):
    for case in drawn(data, family, "local_reach"):
        boxes, reaches, nominals = reaches_for(case)
        v = local_reach_violation(case.op, boxes, reaches, nominals, case.generator(15))
        assert (v is None) == (type(case.op).local_reach is Operator.local_reach)
        assert v is None or v <= TOL, f"local reach of {case} exceeded by {v:.3e}"


# ------------------------------------------------------------------ teeth (hand-picked)

TEETH_IDS = [name for name, _ in TEETH]


def _teeth(rule):
    """The teeth cases whose bound for ``rule`` is attained."""
    return [pytest.param(case, id=name) for name, case in TEETH if rule in case.attained]


@pytest.mark.parametrize("case", _teeth("interval"))
def test_interval_teeth(case):
    boxes = boxes_for(case)
    assert interval_violation(case.op, boxes, case.generator(10)) <= TOL
    assert interval_violation(case.op, boxes, case.generator(10), tighten=True) > TOL


@pytest.mark.parametrize("case", _teeth("backward"))
def test_backward_teeth(case):
    boxes, A = boxes_for(case), rows_for(case, 3, "mixed")
    assert backward_violation(case.op, boxes, A, False, case.generator(11)) <= TOL
    assert backward_violation(case.op, boxes, A, False, case.generator(11), tighten=True) > TOL


@pytest.mark.parametrize("style", ["mixed", "positive", "negative"])
@pytest.mark.parametrize("case", _teeth("backward_lower"))
def test_backward_lower_teeth(case, style):
    boxes, A = boxes_for(case), rows_for(case, 3, style)
    assert backward_violation(case.op, boxes, A, True, case.generator(11)) <= TOL
    assert backward_violation(case.op, boxes, A, True, case.generator(11), tighten=True) > TOL


@pytest.mark.parametrize("case", _teeth("jacobian"))
def test_jacobian_teeth(case):
    boxes, rows = boxes_for(case), interval_rows_for(case, 2, False)
    assert jacobian_violation(case.op, boxes, rows, case.generator(12)) <= TOL
    assert jacobian_violation(case.op, boxes, rows, case.generator(12), tighten=True) > TOL


@pytest.mark.parametrize("case,norm", [pytest.param(c, norm, id=f"{n}-{norm}")
                                       for n, c in TEETH for norm in ("fro", "max")
                                       if norm in c.attained])
def test_lipschitz_teeth(case, norm):
    """Only the cases whose constant is attained: there halving it must be refuted."""
    assert lipschitz_violation(case.op, case.in_shapes, norm, case.generator(13)) <= LIP_TOL
    assert lipschitz_violation(case.op, case.in_shapes, norm, case.generator(13),
                               tighten=True) > LIP_TOL


@pytest.mark.parametrize("case", _teeth("local_reach"))
def test_local_reach_teeth(case):
    """Around the centre of every box, as far as its least radius (a ball inside the box)."""
    boxes = boxes_for(case)
    nominals = [(lo + hi) / 2 for lo, hi in boxes]
    reaches = [((hi - lo) / 2).flatten(1).amin(-1) for lo, hi in boxes]
    assert local_reach_violation(case.op, boxes, reaches, nominals, case.generator(15)) <= TOL
    assert local_reach_violation(case.op, boxes, reaches, nominals, case.generator(15),
                                 tighten=True) > TOL


# ------------------------------------------------------------------------------ combine


def _exact_norm(M, norm):
    """``||M||`` of a matrix, l2 (SVD) or l_inf (largest row sum), rounded up."""
    value = torch.linalg.matrix_norm(M, 2) if norm == "fro" else M.abs().sum(1).max()
    return float(value) * (1 + 1e-12)


def combine_violation(op, in_shapes, maps, norm, gen, tighten=False, steps=40, N=48):
    """``z -> op(M_1 z, ...)`` (``M_i`` ``None``: input ``i`` constant) against
    ``op.combine(norm, op.lipschitz(norm, shapes), [||M_i||])``."""
    moving = [None if M is None else _exact_norm(M, norm) for M in maps]
    c = op.combine(norm, op.lipschitz(norm, in_shapes), moving) * (0.5 if tighten else 1.0)
    n = next(M.shape[1] for M in maps if M is not None)
    fixed = [randn(gen, 1, *s).expand(N, *s) for s in in_shapes]

    def f(z):
        return op(*[other if M is None else (z @ M.T).reshape(len(z), *s)
                    for M, s, other in zip(maps, in_shapes, fixed)])

    return _ratio(f, (n,), norm, gen, steps, N) / c - 1


COMBINED = ["cat", "add"]


@pytest.mark.parametrize("family", COMBINED)
@pytest.mark.parametrize("norm", ["fro", "max"])
@FAST
@given(data=st.data())
def test_combine_sound(family, norm, data):
    case = data.draw(cases(family))
    gen = case.generator(14)
    n = data.draw(st.integers(1, 4))
    constant = data.draw(st.lists(st.booleans(), min_size=len(case.in_shapes),
                                  max_size=len(case.in_shapes)))
    constant[0] = False  # at least one input moves
    maps = [None if const else randn(gen, math.prod(s), n) for s, const in
            zip(case.in_shapes, constant)]
    v = combine_violation(case.op, case.in_shapes, maps, norm, gen)
    assert v <= LIP_TOL, f"combine ({norm}) of {case} exceeded by a factor {1 + v}"


@pytest.mark.parametrize("norm", ["fro", "max"])
@pytest.mark.parametrize("op,sign", [(Cat(0, 2), 1), (Cat(0, 2, stack=True), -1),
                                     (Add(1.0), 1), (Add(-0.5), -1)],
                         ids=["cat", "stack", "add", "sub"])
def test_combine_teeth(op, sign, norm):
    """Inputs ``z`` and ``sign z`` (no cancellation): the combined constant is attained."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(3,), (3,)]
    maps = [torch.eye(3, dtype=DT), sign * torch.eye(3, dtype=DT)]
    assert combine_violation(op, shapes, maps, norm, gen) <= LIP_TOL
    assert combine_violation(op, shapes, maps, norm, gen, tighten=True) > LIP_TOL


# ------------------------------------------------------------------ affine layers


@st.composite
def affine_layers(draw):
    """An Affine layer (dense, conv1d or conv2d) and an input batch."""
    family = draw(st.sampled_from(["affine_dense", "affine_conv1d", "affine_conv2d"]))
    op, shapes = draw(FAMILIES[family])
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return op, randn(gen, draw(st.integers(1, 3)), *shapes[0])


@settings(max_examples=max(20, settings().max_examples), deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much])
@given(affine_layers())
def test_affine_forward_matches_torch(layer):
    op, x = layer
    if not op.is_conv:
        expected = F.linear(x, op.weight, op.bias)
    elif op.weight.ndim == 3:
        expected = F.conv1d(x, op.weight, op.bias, op.stride, op.padding, op.dilation)
    else:
        expected = F.conv2d(x, op.weight, op.bias, op.stride, op.padding, op.dilation)
    torch.testing.assert_close(op(x), expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(op.linear(x) + op._bias_rows(expected.shape[1:]), expected,
                               rtol=0, atol=1e-13)
    doubled = op.linear(x, 2 * op.weight)
    torch.testing.assert_close(doubled, 2 * op.linear(x), rtol=0, atol=1e-12)


@settings(max_examples=max(20, settings().max_examples), deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much])
@given(affine_layers())
def test_affine_patches_columns(layer):
    """``Z = uncolumns(W patches(x) + b)`` and ``columns(Z) = W patches(x) + b``."""
    op, x = layer
    Z = op(x)
    P = op.patches(x)
    assert P.shape[:2] == (len(x), op.matrix.shape[1])
    WP = op.matrix @ P + op.bias[:, None]
    torch.testing.assert_close(op.uncolumns(WP, Z.shape[1:]), Z, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.columns(Z), WP, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.uncolumns(op.columns(Z), Z.shape[1:]), Z, rtol=0, atol=0)
    # Every input entry lies in at most `overlap` patches (the l2 constant's factor).
    counts = op.patches(torch.ones_like(x[:1]))
    hits = torch.zeros_like(x[:1]).reshape(-1)
    index = op.patches(torch.arange(1, x[0].numel() + 1, dtype=DT).reshape(1, *x.shape[1:]))
    for i in index.reshape(-1).long():
        if i > 0:
            hits[i - 1] += 1
    assert counts.sum() == hits.sum()
    assert int(hits.max()) <= op.overlap


@pytest.mark.parametrize("positions", [(), (1,), (4,), (2, 3)])
def test_affine_dense_sequence_columns(positions):
    """A dense layer over ``(B, *positions, n)``: one column per position, in order."""
    gen = torch.Generator().manual_seed(1)
    op = Affine(randn(gen, 3, 5), randn(gen, 3))
    x = randn(gen, 2, *positions, 5)
    P = op.patches(x)
    L = math.prod(positions)
    assert P.shape == (2, 5, L)
    torch.testing.assert_close(P[:, :, -1], x.reshape(2, L, 5)[:, -1], rtol=0, atol=0)
    Z = op.uncolumns(op.matrix @ P + op.bias[:, None], (*positions, 3))
    torch.testing.assert_close(Z, op(x), rtol=0, atol=1e-12)


# -------------------------------------------------------------- rules not implemented


def test_max_pool_has_no_jacobian():
    op = MaxPool((2,), (2,), (0,), (1,))
    lo = torch.zeros(1, 1, 4, dtype=DT)
    rows = (torch.zeros(1, 1, 1, 2, dtype=DT), torch.ones(1, 1, 1, 2, dtype=DT))
    assert op.jacobian(rows, [(lo, lo + 1)]) is None


# ------------------------------------------------------------------------- regressions
# Minimal reproducers of the soundness bugs these attacks found, now fixed.


def test_bug_max_pool1d_linear_rule():
    op = MaxPool((2,), (2,), (0,), (1,))
    lo = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]], dtype=DT)
    A = torch.ones(1, 1, 1, 2, dtype=DT)
    for lower in (False, True):
        (rows,), d, e = op.backward(A, [(lo, lo + 0.5)], lower)
        assert bool(d.isfinite().all()) and (e is None or bool(e.isfinite().all()))
        # max(x0, x1) + max(x2, x3) with x1, x3 the larger entries: exactly x1 + x3.
        torch.testing.assert_close(rows, torch.tensor([[[[0.0, 1.0, 0.0, 1.0]]]], dtype=DT))


def test_bug_leaky_relu_jacobian_float32_slope():
    op = Activation("leaky_relu", 0.1)
    box = (torch.tensor([[-2.0]], dtype=DT), torch.tensor([[-1.0]], dtype=DT))
    A = torch.tensor([[[-1.0]]], dtype=DT)  # J = 0.1 on the box: A J = -0.1 exactly
    ((lo, hi),) = op.jacobian((A, A), [box])
    assert float(lo) <= -0.1 <= float(hi)


def test_bug_leaky_relu_lower_line_float32_slope():
    op = Activation("leaky_relu", 0.01)
    box = (torch.tensor([[-1.0]], dtype=DT), torch.tensor([[0.5]], dtype=DT))  # hi < -lo
    A = torch.ones(1, 1, 1, dtype=DT)
    (rows,), d, e = op.backward(A, [box], True)
    x = torch.tensor([[-1.0]], dtype=DT)
    bound = float((rows * x[:, None]).sum()) + (0.0 if d is None else float(d.sum())) - \
        (0.0 if e is None else float(e.sum()))
    assert float(op(x)) >= bound  # f(-1) = -0.01; the bound is -0.0099999998


def test_bug_leaky_relu_negative_slope_is_refused():
    """Not monotone, so the interval rule would not hold: capture refuses it."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LeakyReLU(-0.5),
                                torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="not monotone"):
        capture(model, (2,))


@pytest.mark.parametrize("threshold", [1.0, 20.0])
def test_bug_softplus_lipschitz_jump(threshold):
    op = Activation("softplus", 1.0, threshold)
    (c,) = op.lipschitz("fro", [(1,)])
    x = torch.tensor([[threshold - 1e-12], [threshold + 1e-12]], dtype=DT)
    f = op(x)
    assert float((f[0] - f[1]).abs()) <= c * 2e-12 * (1 + 1e-9)


def test_bug_avg_pool_negative_divisor_is_refused():
    """A negative divisor makes the pooling decreasing: capture refuses it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.AvgPool2d(2, divisor_override=-2),
                                torch.nn.Flatten(), torch.nn.Linear(1, 2))
    with pytest.raises(UnsupportedModelError, match="divisor_override"):
        capture(model, (1, 2, 2))
