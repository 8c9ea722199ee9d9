"""The numpy checker (``certify check``) is a second implementation of the graph: its twins
of the operators (``certify.check.operators``) and its bounds (``certify.check.bounds``)
agree with the torch ones, and it accepts fresh certificates and refutes tampered ones.

* per operator (the strategies of ``tests/support/operator_cases.py``: every parameter family,
  boxes across kinks, on grids with ties, thin, degenerate): forward, interval, both
  linear rules, interval Jacobian, Lipschitz constants, and rows through the exact Jacobian
  at a point (autograd's vector-Jacobian product; for the linear maps that is the adjoint)
  and local reaches equal the torch operator's to 1e-12;
* random small graphs with every operator (images, sequences, vectors and a tiny
  transformer: LayerNorm, attention, MLP, F.normalize), built as ``nn.Module`` and
  captured: every node's numpy value and adjoint at that value equal torch's to 1e-12, the
  margin gradients through the whole graph equal autograd's, the numpy global, local
  (CROWN, interval Jacobian, interval, refined or not, with forward enclosures or not)
  and multi-layer bounds equal the torch ones, and ``certify.check.claims`` confirms every claim of a certificate made by
  ``certify.certificate.document.certify_network`` and refutes it once tampered with.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from operator_cases import FAMILIES, boxes_for, cases, interval_rows_for, reaches_for, rows_for
from scipy.optimize import brentq
from scipy.special import erf
from torch import nn

from certify.bounds import lipschitz

from certify.radii import multilayer
from certify.capture.export import capture
from certify.certificate.document import certify_network
from certify.check.claims import check
from certify.bounds.linear import margin_lines
from certify.check.bounds import (
    columns,
    global_lower,
    local_lower_bounds,
    multilayer_bound,
)
from certify.check.forward import NumpyGraph, margin_gradients
from certify.check.operators import activation as numpy_activation
from certify.check.operators import twin
from certify.graph.operators import Activation, AvgPool, Interpolate, Pad
from certify.graph.operators import activation_shapes as torch_activation
from certify.radii.local_search import region, region_scale
from certify.radii.radius import _columns, predictions
from certify.radii.radius import global_lower as torch_global_lower

RTOL = 1e-12
# Fractions of the profile's budget (tests/conftest.py; ci: 40): every operator family is its
# own test, and a certificate costs a certify_network run.
PER_FAMILY = settings(max_examples=max(10, settings().max_examples // 2), deadline=None)
PER_GRAPH = settings(max_examples=max(10, settings().max_examples // 2), deadline=None)
PER_CERTIFICATE = settings(max_examples=max(8, settings().max_examples // 4), deadline=None)


def close(actual, expected, rtol=RTOL, what=""):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else \
        np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape, what
    finite = np.isfinite(expected)
    assert (np.isfinite(actual) == finite).all(), what
    assert np.array_equal(actual[~finite], expected[~finite], equal_nan=True), what
    scale = max(1.0, float(np.abs(expected[finite]).max(initial=0.0)))
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=rtol * scale,
                               err_msg=what)


def vjp(f, xs, A):
    """``A J_i`` of ``f`` at the point ``xs`` (``(B, *in_i)``) for rows ``A``
    ``(B, R, *out)``: autograd's vector-Jacobian product, row by row."""
    B, R = A.shape[:2]
    xs = [x.detach().repeat_interleave(R, 0).requires_grad_(True) for x in xs]
    out = f(*xs)
    grads = torch.autograd.grad(out, xs, grad_outputs=A.reshape(B * R, *out.shape[1:]),
                                allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]


# -- every operator, rule by rule ---------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
@PER_FAMILY
@given(data=st.data())
def test_every_rule_of_every_operator_has_an_equal_numpy_twin(family, data):
    case = data.draw(cases(family))
    op, shapes = case.op, case.in_shapes
    t = twin(op, shapes, case.out_shape())
    boxes = boxes_for(case)
    nboxes = [(lo.numpy(), hi.numpy()) for lo, hi in boxes]
    # The chord slope of a smooth activation on a thin box cancels digits: (f(u) - f(l)) /
    # (u - l) carries eps / (u - l) of relative error, 1e-11 at CHORD_WIDTH (narrower boxes
    # take phi' at the middle).
    loose = 1e-9 if isinstance(op, Activation) and not op.piecewise_linear else RTOL
    for which in (0, 1):
        xs = [b[which] for b in boxes]
        close(t(*[x.numpy() for x in xs]), op(*xs), what="forward")
    for got, want in zip(t.interval(*nboxes), op.interval(*boxes)):
        close(got, want, what="interval")
    for style in ("mixed", "positive", "negative", "sparse"):
        A = rows_for(case, 3, style)
        for lower in (True, False):
            rows, d, e = op.backward(A, boxes, lower)
            n_rows, n_d, n_e = t.backward(A.numpy(), nboxes, lower)
            for R, nR in zip(rows, n_rows):
                assert (R is None) == (nR is None)
                if R is not None:
                    close(nR, R, loose, f"backward rows, lower={lower}")
            for v, nv in ((d, n_d), (e, n_e)):
                assert (v is None) == (nv is None)
                if v is not None:
                    close(nv, v, loose, f"backward constants, lower={lower}")
        point = [lo + (hi - lo) * 0.37 for lo, hi in boxes]
        for got, want in zip(t.gradient(A.numpy(), [x.numpy() for x in point]),
                             vjp(op, point, A)):
            close(got, want.reshape(got.shape), what="gradient at a point")
        if hasattr(t, "adjoint"):  # the linear maps: the adjoint is that gradient
            for got, want in zip(t.adjoint(A.numpy()), vjp(op, point, A)):
                close(got, want.reshape(got.shape), what="adjoint")
    for degenerate in (False, True):
        rows = interval_rows_for(case, 3, degenerate)
        want = op.jacobian(rows, boxes)
        got = t.jacobian(tuple(r.numpy() for r in rows), nboxes)
        assert (want is None) == (got is None)
        for (g_lo, g_hi), (w_lo, w_hi) in zip(got or (), want or ()):
            close(g_lo, w_lo, loose, "jacobian")
            close(g_hi, w_hi, loose, "jacobian")
    for norm in ("fro", "max"):
        close(t.lipschitz(norm), op.lipschitz(norm, shapes), what=f"lipschitz {norm}")
    if op.ball_aware:  # SDP-CROWN's offset on a ball around a point of the box
        (lo, hi), = boxes
        center = lo + (hi - lo) * 0.37
        radius = torch.linalg.vector_norm((hi - lo).flatten(1), dim=-1) * 0.3
        A = rows_for(case, 3, "mixed")
        G = op.backward(A, boxes, True)[0][0]
        close(t.ball_offset(A.numpy(), G.numpy(), nboxes[0], center.numpy(), radius.numpy()),
              op.ball_offset(A, G, boxes[0], center, radius), 1e-9, "ball offset")
    reach_boxes, reaches, nominals = reaches_for(case)
    want = op.local_reach(reach_boxes, reaches, nominals)
    got = t.local_reach([(lo.numpy(), hi.numpy()) for lo, hi in reach_boxes],
                        [None if r is None else r.numpy() for r in reaches],
                        [x.numpy() for x in nominals])
    assert (want is None) == (got is None)
    if want is not None:
        close(got, want, what="local reach")


@pytest.mark.parametrize("op, shape", [
    (Activation("leaky_relu", -0.5), (4,)),  # not monotone
    (AvgPool((2, 2), (2, 2), (0, 0), divisor_override=-2), (1, 4, 4)),  # a nonpositive map
])
def test_twin_intervals_hold_for_operators_capture_refuses(op, shape):
    """``certify.capture.export`` refuses a negative leaky slope and a nonpositive divisor (the torch
    interval rules assume monotone maps); the twins' intervals hold for them anyway: they
    contain every value on the box (its corners, the kink and random points)."""
    rng = np.random.default_rng(0)
    out_shape = tuple(op(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    t = twin(op, [shape], out_shape)
    lo = rng.uniform(-2, 0, size=(3, *shape))
    hi = lo + rng.uniform(0, 3, size=lo.shape)
    low, high = t.interval((lo, hi))
    points = [lo, hi, np.clip(np.zeros_like(lo), lo, hi)] + \
        [lo + (hi - lo) * rng.uniform(size=lo.shape) for _ in range(200)]
    for x in points:
        f = op(torch.from_numpy(x)).numpy()
        assert (low <= f + 1e-12).all() and (f <= high + 1e-12).all()


def test_gelu_constants_are_derived_independently():
    gelu = lambda x: x * (1 + erf(x / math.sqrt(2))) / 2
    slope = lambda x: (1 + erf(x / math.sqrt(2))) / 2 + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    root = brentq(slope, -1.0, -0.5, xtol=1e-15)
    assert abs(root - numpy_activation.GELU_ARGMIN) < 1e-6
    assert numpy_activation.GELU_FLOOR <= gelu(root) < numpy_activation.GELU_FLOOR + 1e-3
    assert numpy_activation.GELU_LIPSCHITZ == pytest.approx(slope(math.sqrt(2)), rel=1e-15)
    for name in ("GELU_LIPSCHITZ", "GELU_DERIVATIVE", "GELU_ARGMIN", "GELU_FLOOR"):
        assert getattr(numpy_activation, name) == pytest.approx(getattr(torch_activation, name),
                                                                rel=1e-15)


def test_gelu_tanh_constants_are_derived_independently():
    """From ``phi = x (1 + tanh(u)) / 2``, ``u = k (x + a x^3)``: ``phi' = (1 + t) / 2 +
    x (1 - t^2) u' / 2`` and ``phi'' = (1 - t^2) (u' - x t u'^2 + x u'' / 2)``, roots by
    bisection; ``phi'`` peaks at the root of ``phi''`` and ``phi'(-x) = 1 - phi'(x)``."""
    k, a = math.sqrt(2 / math.pi), 0.044715
    u = lambda x: k * (x + a * x**3)
    du, ddu = lambda x: k * (1 + 3 * a * x * x), lambda x: 6 * k * a * x
    gelu = lambda x: x * (1 + math.tanh(u(x))) / 2
    slope = lambda x: (1 + math.tanh(u(x))) / 2 + x * (1 - math.tanh(u(x)) ** 2) * du(x) / 2
    bend = lambda x: (1 - math.tanh(u(x)) ** 2) * (du(x) - x * math.tanh(u(x)) * du(x) ** 2 +
                                                   x * ddu(x) / 2)
    peak = brentq(bend, 1.0, 2.0, xtol=1e-15)  # phi'' > 0 before it, < 0 after it
    assert bend(0.5) > 0 > bend(3.0)
    top = slope(peak)
    assert 1 - slope(-peak) == pytest.approx(top, rel=1e-15)
    assert top <= numpy_activation.GELU_TANH_LIPSCHITZ <= top * (1 + 1e-11)
    low, high = numpy_activation.GELU_TANH_DERIVATIVE
    assert low <= 1 - top and high >= top
    root = brentq(slope, -1.0, -0.5, xtol=1e-15)
    assert abs(root - numpy_activation.GELU_TANH_ARGMIN) < 1e-9
    assert numpy_activation.GELU_TANH_FLOOR <= gelu(root) < numpy_activation.GELU_TANH_FLOOR + 1e-6
    for name in ("GELU_TANH_LIPSCHITZ", "GELU_TANH_DERIVATIVE", "GELU_TANH_ARGMIN",
                 "GELU_TANH_FLOOR"):
        assert getattr(numpy_activation, name) == pytest.approx(getattr(torch_activation, name),
                                                                rel=1e-15)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


DIP_SLOPES = {  # phi and phi', written out by hand (not by the twin), and the roots of phi''
    "silu": (lambda x: x * _sigmoid(x),
             lambda x: _sigmoid(x) * (1 + x * (1 - _sigmoid(x))), [(-3, -1), (1, 3)]),
    "mish": (lambda x: x * math.tanh(math.log1p(math.exp(x))),
             lambda x: math.tanh(math.log1p(math.exp(x))) +
             x * _sigmoid(x) * (1 - math.tanh(math.log1p(math.exp(x))) ** 2),
             [(-3, -1.5), (1, 2)]),
}


@pytest.mark.parametrize("kind", sorted(DIP_SLOPES))
def test_dip_constants_are_derived_independently(kind):
    """SiLU and Mish fall to one minimum, then rise: the minimiser is the root of ``phi'``
    (bisection), the floor lies below the minimum by at most 1e-4, and the derivative range
    is spanned by ``phi'`` at the roots of ``phi''`` (bisection on a central difference of
    the hand-written ``phi'``); the twin's constants equal the torch operator's."""
    phi, slope, brackets = DIP_SLOPES[kind]
    argmin, floor, (low, high) = numpy_activation.DIPS[kind]
    root = brentq(slope, -2.0, -0.5, xtol=1e-15)
    assert abs(root - argmin) < 1e-12
    assert floor <= phi(root) < floor + 1e-4
    bend = lambda x: (slope(x + 1e-6) - slope(x - 1e-6)) / 2e-6  # noqa: E731
    extremes = [slope(brentq(bend, a, b, xtol=1e-13)) for a, b in brackets]
    assert low <= min(extremes) <= low * (1 - 1e-10)
    assert high * (1 - 1e-10) <= max(extremes) <= high
    assert numpy_activation.DIPS[kind] == torch_activation.DIPS[kind]


def test_hardswish_constants():
    """``x (x + 3) / 6`` between the kinks at -+3: minimum -3/8 at -3/2, ``phi'`` in
    ``[-1/2, 3/2]``; the twin's constants equal the torch operator's."""
    argmin, floor, (low, high) = numpy_activation.DIPS["hardswish"]
    assert argmin == -1.5 and floor <= argmin * (argmin + 3) / 6 < floor + 1e-4
    assert (low, high) == ((2 * -3 + 3) / 6, (2 * 3 + 3) / 6)
    assert numpy_activation.DIPS["hardswish"] == torch_activation.DIPS["hardswish"]


KERNELS = {  # torch's own kernels, (entries along one axis, size, align_corners, scale)
    ("nearest", 1): lambda x, m, a, s: torch.ops.aten.upsample_nearest1d(x, [m], s),
    ("nearest", 2): lambda x, m, a, s: torch.ops.aten.upsample_nearest2d(x, [1, m], None, s),
    ("nearest-exact", 1): lambda x, m, a, s: torch.ops.aten._upsample_nearest_exact1d(x, [m], s),
    ("nearest-exact", 2):
        lambda x, m, a, s: torch.ops.aten._upsample_nearest_exact2d(x, [1, m], None, s),
    ("linear", 1): lambda x, m, a, s: torch.ops.aten.upsample_linear1d(x, [m], a, s),
    ("bilinear", 2): lambda x, m, a, s: torch.ops.aten.upsample_bilinear2d(x, [1, m], a, None, s),
}


# Sizes and factors where a scale rounded to float32 (as torch's two-axis nearest kernels
# round it) and one kept in float64 (its one-axis kernels) pick different entries.
ROUNDING = [(26, 3.96), (27, 3.88), (16, 3.7), (17, 2.3), (18, 2.7)]


@pytest.mark.parametrize("mode, axes", sorted(KERNELS))
def test_interpolation_twin_reads_what_torch_kernels_read(mode, axes):
    """Every size up to 13 in and 30 out, by a size or by scale factors whose output sizes
    hit torch's special cases (the size kept or doubled with a factor of 1.1 or 2.1, factors
    with no exact binary form, ``ROUNDING``): the twin picks the entries torch's kernels
    pick (nearest modes) and weighs them as they do (to 1e-14: the kernels round
    differently)."""
    factors = (None, 0.3, 0.6, 1 / 3, 0.7, 1.0, 1.1, 1.3, 1.5, 1.7, 2.0, 2.1, 2.3, 2.5)
    sizes = [(n, int(n * f), f) for n in range(1, 14) for f in factors if f] + \
        [(n, m, None) for n in range(1, 14) for m in range(1, 31)] + \
        [(n, int(n * f), f) for n, f in ROUNDING]
    aligns = (False, True) if "linear" in mode else (False,)
    for (n, m, factor), align in itertools.product(sizes, aligns):
        if m < 1:
            continue
        shape, size = ((n,), (m,)) if axes == 1 else ((1, n), (1, m))
        op = Interpolate(size, mode, align, (factor,) if axes == 1 else (None, factor))
        x = np.random.default_rng(n).standard_normal((2, 1, *shape))
        got = twin(op, [(1, *shape)], (1, *size))(x)
        want = KERNELS[mode, axes](torch.from_numpy(x), m, align, factor).numpy()
        if "nearest" in mode:
            assert np.array_equal(got, want), (n, m, factor)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


def test_padding_twin_reads_what_torch_reads():
    """Every amount from -3 (a crop) to 7 on either side of 1 to 6 entries that torch pads
    (circular: amounts >= 0, the only ones capture reads): the entries of the twin are
    torch's."""
    for n in range(1, 7):
        for mode in ("reflect", "replicate", "circular"):
            for pad in itertools.product(range(-3 if mode != "circular" else 0, 8), repeat=2):
                x = torch.randn(2, 3, n, dtype=torch.float64)
                try:
                    want = F.pad(x, pad, mode=mode)
                except RuntimeError:  # reflect beyond the edge, circular wrapping twice
                    continue
                if want.numel():
                    got = twin(Pad(pad, mode), [(3, n)], tuple(want.shape[1:]))(x.numpy())
                    assert np.array_equal(got, want.numpy()), (n, mode, pad)


# -- random small graphs with every operator -------------------------------------------------

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, lambda: nn.GELU(approximate="tanh"),
               lambda: nn.LeakyReLU(0.1), lambda: nn.ELU(0.7), lambda: nn.Softplus(2.0),
               lambda: nn.Softplus(1.0, 1.5), nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
               nn.ReLU6, lambda: nn.Hardtanh(-0.5, 0.5)]


def _activation(draw, choices):
    return draw(st.sampled_from(choices))()


SHAPES = {"_Image": (2, 6, 6), "_Sequence": (3, 8), "_Vector": (6,), "_Transformer": (3, 4)}


class _Image(nn.Module):
    """conv2d, activation, pooling (max, average, adaptive) or upsampling (nearest,
    nearest-exact, bilinear), zero padding (or cropping) or padding by the map's own entries
    (reflect, replicate, circular), per-channel scale and shift, a residual 1x1 convolution
    ``h + alpha act(proj h)``, flatten, two dense layers."""

    def __init__(self, draw, acts):
        super().__init__()
        c = draw(st.integers(1, 3))
        self.conv = nn.Conv2d(2, c, draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)),
                              padding=draw(st.integers(0, 1)), dilation=draw(st.integers(1, 2)))
        self.act1, self.act2, self.act3 = (_activation(draw, acts) for _ in range(3))
        k = draw(st.integers(1, 3))
        pool = draw(st.sampled_from(["max", "avg", "adaptive", "upsample", "none"]))
        if pool == "max":
            self.pool = nn.MaxPool2d(k, draw(st.integers(1, 2)), draw(st.integers(0, k // 2)),
                                     draw(st.integers(1, 2)), ceil_mode=draw(st.booleans()))
        elif pool == "upsample":
            self.pool = nn.Upsample(scale_factor=draw(st.sampled_from([1.5, 2.0])),
                                    mode=draw(st.sampled_from(["nearest", "nearest-exact",
                                                               "bilinear"])))
        elif pool == "avg":
            self.pool = nn.AvgPool2d(k, draw(st.integers(1, 2)), draw(st.integers(0, k // 2)),
                                     draw(st.booleans()), draw(st.booleans()),
                                     draw(st.sampled_from([None, 3])))
        elif pool == "adaptive":
            self.pool = nn.AdaptiveAvgPool2d((draw(st.integers(1, 3)), draw(st.integers(1, 3))))
        else:
            self.pool = nn.Identity()
        # A map too small to reflect refuses to build (the strategy skips it).
        self.mode = draw(st.sampled_from(["constant", "reflect", "replicate", "circular"]))
        low = 0 if self.mode == "circular" else -1  # circular crops are refused
        self.pad = tuple(draw(st.integers(low, 1)) for _ in range(4))
        self.register_buffer("scale", torch.rand(c, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(c, 1, 1) * 0.1)
        self.proj = nn.Conv2d(c, c, 1)
        self.alpha = draw(st.sampled_from([1.0, -0.5, 2.0]))
        w = draw(st.integers(2, 6))
        self.fc = nn.Linear(self.features(torch.zeros(1, *SHAPES[type(self).__name__])).shape[1], w)
        self.out = nn.Linear(w, draw(st.integers(2, 4)))

    def features(self, x):
        h = self.pool(self.act1(self.conv(x)))
        h = F.pad(h, self.pad, mode=self.mode) * self.scale + self.shift
        return torch.add(h, self.act3(self.proj(h)), alpha=self.alpha).flatten(1)

    def forward(self, x):
        return self.out(self.act2(self.fc(self.features(x))))


class _Sequence(nn.Module):
    """conv1d, activation, 1-d pooling, transpose, a dense layer over the sequence (the
    certified layer with several columns), expand, cat or stack, a reduction or a slice
    or select, the logits as one dense layer or a sum of two."""

    def __init__(self, draw, acts):
        super().__init__()
        c, w = draw(st.integers(1, 3)), draw(st.integers(2, 4))
        self.conv = nn.Conv1d(3, c, draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)),
                              padding=draw(st.integers(0, 2)), dilation=draw(st.integers(1, 2)))
        self.act1, self.act2 = _activation(draw, acts), _activation(draw, acts)
        k = draw(st.integers(1, 3))
        pool = draw(st.sampled_from(["max", "avg", "adaptive", "none"]))
        if pool == "max":
            self.pool = nn.MaxPool1d(k, draw(st.integers(1, 2)), draw(st.integers(0, k // 2)),
                                     draw(st.integers(1, 2)), ceil_mode=draw(st.booleans()))
        elif pool == "avg":
            self.pool = nn.AvgPool1d(k, draw(st.integers(1, 2)), draw(st.integers(0, k // 2)),
                                     draw(st.booleans()), draw(st.booleans()))
        elif pool == "adaptive":
            self.pool = nn.AdaptiveAvgPool1d(draw(st.integers(1, 3)))
        else:
            self.pool = nn.Identity()
        self.lin = nn.Linear(c, w)
        self.join = draw(st.sampled_from(["cat", "stack"]))
        self.reduce = draw(st.sampled_from(["mean", "sum", "select", "slice"]))
        self.added = draw(st.booleans())
        classes = draw(st.integers(2, 4))
        n = self.features(torch.zeros(1, *SHAPES[type(self).__name__])).shape[1]
        self.out, self.out2 = nn.Linear(n, classes), nn.Linear(n, classes)

    def features(self, x):
        seq = self.pool(self.act1(self.conv(x))).transpose(1, 2)  # (positions, c)
        y = self.act2(self.lin(seq))  # (positions, w)
        if self.join == "cat":
            z = torch.cat([y, seq[:, :, :1].expand(-1, -1, 2)], dim=2)
        else:
            z = torch.stack([y, torch.tanh(y) * 0.5], dim=1)
        if self.reduce == "mean":
            r = z.mean(1)
        elif self.reduce == "sum":
            r = z.sum(dim=(1, -1), keepdim=True)
        elif self.reduce == "select":
            r = z[:, -1]
        else:
            r = z[:, ::2]
        return r.flatten(1)

    def forward(self, x):
        r = self.features(x)
        return self.out(r) + self.out2(r) if self.added else self.out(r)


class _Vector(nn.Module):
    """Dense layers on vectors: slices rearranged by cat, unsqueeze, expand, a broadcast
    constant scale, a sum over the copies, a subtraction of a broadcast slice of the input
    (``Add`` with ``alpha = -1`` and a constant operand), a permutation."""

    def __init__(self, draw, acts):
        super().__init__()
        w = draw(st.integers(2, 6))
        self.k = draw(st.integers(1, w - 1))
        self.lin1, self.lin2 = nn.Linear(6, w), nn.Linear(w, w)
        self.act1, self.act2 = _activation(draw, acts), _activation(draw, acts)
        self.register_buffer("scale", torch.randn(3, 1))
        self.out = nn.Linear(w, draw(st.integers(2, 4)))

    def forward(self, x):
        h = self.act1(self.lin1(x))
        u = torch.cat([h[:, self.k:], h[:, :self.k]], 1)
        v = (u.unsqueeze(1).expand(-1, 3, -1) * self.scale).permute(0, 2, 1).sum(-1)
        q = v - x[:, :1] * 0.5
        return self.out(self.act2(self.lin2(q)))


class _Transformer(nn.Module):
    """A tiny pre-LN transformer on 3 tokens of width 4: LayerNorm (random weight), query,
    key and value projections split into 1 or 2 heads, attention ``softmax(q k^T / sqrt(k))
    v`` written out or by ``F.scaled_dot_product_attention``, the output projection with a
    residual, an MLP with a residual, the mean over the tokens, ``F.normalize`` (its floor
    1e-12 or 0.5, which the mean may fall below) and the head."""

    def __init__(self, draw, acts):
        super().__init__()
        width = SHAPES[type(self).__name__][1]
        self.heads = draw(st.sampled_from([1, 2]))
        self.fused = draw(st.booleans())
        self.eps = draw(st.sampled_from([1e-12, 0.5]))
        self.ln = nn.LayerNorm(width, eps=draw(st.sampled_from([1e-5, 1e-2])))
        nn.init.normal_(self.ln.weight)
        nn.init.normal_(self.ln.bias, std=0.1)
        self.q, self.k, self.v, self.proj = (nn.Linear(width, width) for _ in range(4))
        hidden = draw(st.integers(2, 6))
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), _activation(draw, acts), \
            nn.Linear(hidden, width)
        self.head = nn.Linear(width, draw(st.integers(2, 4)))

    def split(self, t):  # (B, T, width) -> (B, heads, T, width / heads)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x):
        h = self.ln(x)
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).flatten(2))
        x = x + self.fc2(self.act(self.fc1(x)))
        return self.head(F.normalize(x.mean(1), dim=-1, eps=self.eps))


@st.composite
def graphs(draw):
    """A model with every operator (``_Image``, ``_Sequence``, ``_Vector``, ``_Transformer``),
    its graph and a batch of inputs."""
    kind = draw(st.sampled_from([_Image, _Sequence, _Vector, _Transformer]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = SHAPES[kind.__name__]
    x = torch.randn(draw(st.integers(2, 4)), *shape, dtype=torch.float64)
    try:
        model = kind(draw, ACTIVATIONS).double()
        with torch.no_grad():
            model(x)  # materialises the lazy layers; refuses impossible shapes
    except RuntimeError:
        assume(False)
    return model.eval(), capture(model, x), x


@PER_GRAPH
@given(graphs())
def test_numpy_forward_and_gradients_equal_torch(problem):
    model, graph, x = problem
    ng = NumpyGraph.of(graph)
    values, nvalues = graph.values(x), ng.values(x.numpy())
    for node, v, nv in zip(graph.nodes, values, nvalues):
        close(nv, v, what=f"node {node.name}")
    close(nvalues[-1], model(x), what="logits")
    for i, node in enumerate(graph.nodes[1:], start=1):  # every node's adjoint at its point
        xs = [values[j] for j in node.inputs]
        A = torch.randn(len(x), 2, *node.shape, dtype=torch.float64)
        for got, want in zip(ng.nodes[i].twin.gradient(A.numpy(), [v.numpy() for v in xs]),
                             vjp(node.op, xs, A)):
            close(got, want.reshape(got.shape), what=f"adjoint of node {node.name}")
    y = values[-1].argmax(-1)
    C = np.eye(values[-1].shape[1])[y.numpy()][:, None] - np.eye(values[-1].shape[1])[None]
    for index in graph.affine_indices:  # d (C o) / d Z: numpy against autograd
        Z = values[index].detach().requires_grad_(True)
        logits = graph.run(index, Z, values)
        want = torch.stack([torch.autograd.grad((torch.from_numpy(C[:, j]) * logits).sum(), Z,
                                                retain_graph=True)[0]
                            for j in range(C.shape[1])], dim=1)
        close(margin_gradients(ng, index, nvalues, C), want, what=f"gradient at {index}")


@PER_GRAPH
@given(graphs(), st.sampled_from(["fro", "max"]), st.booleans(), st.booleans(),
       st.floats(1e-3, 1.0), st.booleans(), st.booleans())
def test_numpy_bounds_equal_torch(problem, norm, refine, bias, fraction, enclose, ball):
    _, graph, x = problem
    ng = NumpyGraph.of(graph)
    values, nvalues = graph.values(x), ng.values(x.numpy())
    y, margins = predictions(graph, x)
    for index in graph.affine_indices:
        if graph.is_last_dense(index):
            continue
        layer = graph.layer(index)
        P = _columns(layer, values[graph.input_of(index)], bias)
        nP = columns(ng.layer(index), nvalues[ng.input_of(index)], bias)
        close(nP, P, what="columns")
        scale = region_scale(P, norm)
        constants = lipschitz.node_constants(graph, index, norm)
        close(global_lower(ng, index, nP, y.numpy(), margins.numpy(), norm),
              torch_global_lower(graph, index, scale, constants, y, margins, norm), 1e-12,
              "global")
        rho = 50 * torch_global_lower(graph, index, scale, constants, y, margins, norm)
        # Beyond the global radius where there is one (0 through a softplus, which jumps).
        rho = fraction * torch.where(torch.isfinite(rho) & (rho > 0), rho, torch.full_like(rho, 0.1))
        where = region(layer, values[index], P, norm, scale)
        lines = margin_lines(graph, index, where, rho, y, values,
                             constants if norm == "fro" else None, refine, enclose, ball)
        want = lines.lower(rho).scatter(-1, y[:, None], 0.0)
        got = local_lower_bounds(ng, index, nvalues, nP, rho.numpy(), y.numpy(), norm, refine,
                                 enclose, ball)
        got[np.arange(len(y)), y.numpy()] = 0.0
        close(got, want, 1e-7, f"local bound of {graph.nodes[index].name}")
    budgets = [0.01 * fraction] * len(graph.affine_indices)
    want = multilayer.multilayer_bound(graph, x, budgets, norm, bias).bound
    sizes = np.array(budgets)[:, None] * np.ones(len(x))[None]
    close(multilayer_bound(ng, nvalues, y.numpy(), sizes, norm, bias), want, 1e-12, "multilayer")


def _tampered(document, classes: int):
    """Copies of the certificate, each with one false claim."""
    import copy

    out = []
    for entry in document["layers"]:
        for norm in ("fro", "max"):
            claims = entry[norm]
            for i, (lo, up, est) in enumerate(zip(claims["lower"], claims["upper"],
                                                  claims["estimate"])):
                if up is not None and lo is not None and lo < 0.5 * up:
                    d = copy.deepcopy(document)
                    d["layers"][document["layers"].index(entry)][norm]["lower"][i] = 0.99 * up
                    out.append(("lower", d))
                if up is not None and up > 0:
                    d = copy.deepcopy(document)
                    d["layers"][document["layers"].index(entry)][norm]["upper"][i] = 0.5 * up
                    out.append(("upper", d))
                if est is not None and est > 0:
                    d = copy.deepcopy(document)
                    d["layers"][document["layers"].index(entry)][norm]["estimate"][i] = 1.5 * est
                    out.append(("estimate", d))
                break  # the first input of every layer and norm
    d = copy.deepcopy(document)
    d["multilayer"]["fro"]["uniform_budget"][0] += 1.0
    d["multilayer"]["fro"]["min"] = min(d["multilayer"]["fro"]["uniform_budget"])
    out.append(("multilayer", d))
    d = copy.deepcopy(document)
    d["predictions"][0] = (d["predictions"][0] + 1) % classes
    out.append(("prediction", d))
    return out


@PER_CERTIFICATE
@given(graphs(), st.booleans())
def test_checker_confirms_fresh_certificates_and_refutes_tampered_ones(problem, bias):
    _, graph, x = problem
    result = certify_network(graph, x, model_sha256="0" * 64, bias=bias, progress=False)
    report = check(result.document, result.witnesses, graph, x.numpy())
    assert report.ok, report.refuted
    assert report.confirmed > 0
    for what, document in _tampered(result.document, graph.nodes[-1].shape[0]):
        assert not check(document, result.witnesses, graph, x.numpy()).ok, what
