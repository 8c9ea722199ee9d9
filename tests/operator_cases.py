"""Cases for tests/test_operators.py: one hypothesis strategy per operator family drawing the
operator's parameters and its input shapes, the input boxes, rows ``A`` and interval rows;
and the hand-picked "teeth" cases, where every bound a rule states is attained.

Hypothesis draws the structure (shapes, kinds, strides, ...), which shrinks well; the
entries of weights, boxes and rows come from a ``torch.Generator`` seeded by a drawn
integer (fast, and reproducible from the printed example).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from hypothesis import assume
from hypothesis import strategies as st

from certify.operators import (
    Activation,
    Add,
    Affine,
    AvgPool,
    Cat,
    Expand,
    MaxPool,
    Permute,
    Reduce,
    Reshape,
    ScaleShift,
    Slice,
    ZeroPad,
)

DT = torch.float64


@dataclass
class Case:
    """An operator with the per-input shapes (batch axis excluded) it is applied to."""

    op: object
    in_shapes: list[tuple[int, ...]]
    seed: int
    B: int = 2
    box_style: str = "generic"
    # Rules whose stated bound is attained on this case (teeth cases only).
    attained: frozenset = field(default_factory=frozenset)
    boxes: list | None = None  # fixed input boxes instead of drawn ones

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7919 + salt)

    def out_shape(self) -> tuple[int, ...]:
        xs = [torch.zeros(self.B, *s, dtype=DT) for s in self.in_shapes]
        return tuple(self.op(*xs).shape[1:])

    def __repr__(self):  # what hypothesis prints for a failing example
        return (f"Case({self.op!r}, in_shapes={self.in_shapes}, seed={self.seed}, B={self.B}, "
                f"box_style={self.box_style!r})")


def randn(gen, *shape, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=DT) * scale


def rand(gen, *shape):
    return torch.rand(shape, generator=gen, dtype=DT)


BOX_STYLES = ("generic", "straddle", "grid", "thin", "mixed_point")


def make_box(gen, B, shape, style):
    """One input box ``(lo, hi)``, ``(B, *shape)``.

    generic: centres N(0, 1), radii U(0, 1); straddle: centres small against the radii (boxes
    across the kinks at 0); grid: endpoints on the grid 0.5 Z (kinks at the ends, ties of the
    bounds); thin: radii ~1e-4; mixed_point: a third of the entries degenerate (lo == hi)."""
    if style == "grid":
        a = torch.randint(-4, 5, (B, *shape), generator=gen).to(DT) / 2
        b = torch.randint(-4, 5, (B, *shape), generator=gen).to(DT) / 2
        return torch.minimum(a, b), torch.maximum(a, b)
    if style == "straddle":
        c, r = randn(gen, B, *shape, scale=0.3), 0.5 + 2 * rand(gen, B, *shape)
    elif style == "thin":
        c, r = randn(gen, B, *shape, scale=1.5), 1e-4 * rand(gen, B, *shape)
    else:
        c, r = randn(gen, B, *shape, scale=1.0), rand(gen, B, *shape)
        if style == "mixed_point":
            r = torch.where(rand(gen, B, *shape) < 1 / 3, 0.0, r)
    return c - r, c + r


def boxes_for(case: Case, salt: int = 1):
    if case.boxes is not None:
        return case.boxes
    gen = case.generator(salt)
    return [make_box(gen, case.B, s, case.box_style) for s in case.in_shapes]


ROW_STYLES = ("mixed", "positive", "negative", "sparse")


def rows_for(case: Case, R: int, style: str, salt: int = 2) -> torch.Tensor:
    """Rows ``A`` ``(B, R, *out)`` on the output."""
    gen = case.generator(salt)
    A = randn(gen, case.B, R, *case.out_shape())
    if style == "positive":
        A = A.abs()
    elif style == "negative":
        A = -A.abs()
    elif style == "sparse":
        A = torch.where(rand(gen, *A.shape) < 0.7, 0.0, A)
    return A


def interval_rows_for(case: Case, R: int, degenerate: bool, salt: int = 3):
    """Interval rows ``(lo, hi)`` ``(B, R, *out)``; ``degenerate``: some rows points."""
    gen = case.generator(salt)
    shape = (case.B, R, *case.out_shape())
    c, r = randn(gen, *shape), rand(gen, *shape)
    if degenerate:
        r = torch.where(rand(gen, *shape) < 0.5, 0.0, r)
    return c - r, c + r


def valid(op, in_shapes, B=2) -> bool:
    """Whether torch accepts the parameters (every output axis nonempty, outputs finite)."""
    try:
        out = op(*[torch.randn(B, *s, dtype=DT) for s in in_shapes])
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False
    # Max pooling with a dilated window that lies wholly in the padding outputs -inf (torch
    # does so): no finite rule applies; such layers are left out.
    return out.numel() > 0 and bool(out.isfinite().all())


# ----------------------------------------------------------------------------- strategies

seeds = st.integers(0, 2**31 - 1)
small = st.integers(1, 3)


@st.composite
def affine_dense(draw):
    n, m = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    positions = draw(st.sampled_from([(), (2,), (3,), (2, 2)]))
    gen = torch.Generator().manual_seed(draw(seeds))
    op = Affine(randn(gen, m, n, scale=1 / math.sqrt(n)), randn(gen, m))
    return op, [(*positions, n)]


@st.composite
def affine_conv(draw, two: bool):
    c_in, c_out = draw(small), draw(small)
    axes = 2 if two else 1
    k = tuple(draw(st.integers(1, 3)) for _ in range(axes))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(axes))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(axes))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(axes))
    spatial = tuple(draw(st.integers(1, 5 if two else 8)) for _ in range(axes))
    gen = torch.Generator().manual_seed(draw(seeds))
    weight = randn(gen, c_out, c_in, *k, scale=1 / math.sqrt(c_in * math.prod(k)))
    op = Affine(weight, randn(gen, c_out), stride, padding, dilation)
    shapes = [(c_in, *spatial)]
    assume(valid(op, shapes))
    return op, shapes


@st.composite
def activations(draw, kind):
    if kind == "leaky_relu":  # torch allows any slope; a negative one is a separate test
        op = Activation(kind, draw(st.sampled_from([0.01, 0.2, 0.0, 1.0, 2.5, 0.25])))
    elif kind == "elu":  # aten.elu(alpha, scale, input_scale); capture needs all >= 0 / > 0
        op = Activation(kind, draw(st.sampled_from([1.0, 0.0, 0.5, 1.6732632423543772, 3.0])),
                        draw(st.sampled_from([1.0, 1.0507009873554805, 0.5, 2.0])),
                        draw(st.sampled_from([1.0, 0.5, 2.0])))
    elif kind == "softplus":  # beta, threshold (a low one: a large jump at threshold / beta)
        op = Activation(kind, draw(st.sampled_from([1.0, 0.5, 2.0])),
                        draw(st.sampled_from([20.0, 1.0, 2.0, 30.0])))
    else:
        op = Activation(kind)
    shape = draw(st.sampled_from([(3,), (5,), (2, 3)]))
    return op, [shape]


@st.composite
def in_shape(draw, max_rank=3, max_size=3):
    return tuple(draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_rank)))


@st.composite
def reshapes(draw):
    shape = draw(in_shape())
    n = math.prod(shape)
    targets = [(n,), tuple(reversed(shape)), (1, n), (*shape, 1)]
    if n % 2 == 0:
        targets.append((2, n // 2))
    return Reshape(draw(st.sampled_from(targets))), [shape]


@st.composite
def permutes(draw):
    shape = draw(in_shape())
    return Permute(tuple(draw(st.permutations(range(len(shape)))))), [shape]


@st.composite
def expands(draw):
    shape = draw(in_shape())
    ones = draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape)))
    source = tuple(1 if o else s for o, s in zip(ones, shape))
    target = tuple(draw(st.integers(1, 3)) if o else s for o, s in zip(ones, shape))
    return Expand(target), [source]


@st.composite
def slices(draw):
    shape = draw(in_shape(max_size=5))
    dim = draw(st.integers(0, len(shape) - 1))
    n = shape[dim]
    if draw(st.booleans()):
        op = Slice(dim, index=draw(st.integers(-n, n - 1)))
    else:
        start = draw(st.integers(-n, n - 1))
        end = draw(st.one_of(st.none(), st.integers(-n, n + 2)))
        op = Slice(dim, start, end, draw(st.integers(1, 3)))
    assume(valid(op, [shape]))
    return op, [shape]


@st.composite
def cats(draw):
    shape = draw(in_shape())
    stack = draw(st.booleans())
    arity = draw(st.integers(2, 3))
    dim = draw(st.integers(0, len(shape) - (not stack)))
    shapes = []
    for _ in range(arity):
        s = list(shape)
        if not stack:
            s[dim] = draw(st.integers(1, 3))
        shapes.append(tuple(s))
    return Cat(dim, arity, stack), shapes


@st.composite
def adds(draw):
    shape = draw(in_shape())
    alpha = draw(st.sampled_from([1.0, -1.0, 0.5, -2.5]))
    # Either side may broadcast along size-one axes (both carry the batch axis, so torch
    # aligns them only at equal rank).
    def side():
        return tuple(1 if draw(st.integers(0, 3)) == 0 else d for d in shape)
    a, b = side(), side()
    op = Add(alpha)
    assume(valid(op, [a, b]))
    return op, [a, b]


@st.composite
def reduces(draw):
    shape = draw(in_shape())
    dims = draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True))
    op = Reduce(tuple(dims), draw(st.booleans()), draw(st.booleans()))
    return op, [shape]


@st.composite
def avg_pools(draw, two: bool):
    axes = 2 if two else 1
    c = draw(st.integers(1, 2))
    spatial = tuple(draw(st.integers(1, 6)) for _ in range(axes))
    if draw(st.integers(0, 3)) == 0:
        out = tuple(draw(st.integers(1, 4)) for _ in range(axes))
        op = AvgPool(out, adaptive=True)
    else:
        k = tuple(draw(st.integers(1, 3)) for _ in range(axes))
        stride = tuple(draw(st.integers(1, 3)) for _ in range(axes))
        padding = tuple(draw(st.integers(0, kk // 2)) for kk in k)
        divisor = draw(st.sampled_from([None, None, 1, 3])) if two else None
        op = AvgPool(k, stride, padding, draw(st.booleans()), draw(st.booleans()), divisor)
    shapes = [(c, *spatial)]
    assume(valid(op, shapes))
    return op, shapes


@st.composite
def zero_pads(draw):
    shape = draw(in_shape(max_size=4))
    axes = draw(st.integers(1, min(2, len(shape))))
    pad = tuple(draw(st.integers(-1, 2)) for _ in range(2 * axes))
    op = ZeroPad(pad)
    assume(valid(op, [shape]))
    return op, [shape]


@st.composite
def scale_shifts(draw):
    shape = draw(in_shape())
    gen = torch.Generator().manual_seed(draw(seeds))
    def constant():
        kind = draw(st.sampled_from(["scalar", "full", "broadcast"]))
        if kind == "scalar":
            return randn(gen)
        if kind == "full":
            return randn(gen, *shape)
        return randn(gen, *(1 if draw(st.booleans()) else d for d in shape))
    scale = constant()
    if draw(st.integers(0, 3)) == 0:
        scale = torch.where(rand(gen, *scale.shape) < 0.5, 0.0, scale)
    return ScaleShift(scale, constant()), [shape]


@st.composite
def max_pools(draw, two: bool):
    axes = 2 if two else 1
    c = draw(st.integers(1, 2))
    spatial = tuple(draw(st.integers(1, 6)) for _ in range(axes))
    k = tuple(draw(st.integers(1, 3)) for _ in range(axes))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(axes))
    padding = tuple(draw(st.integers(0, kk // 2)) for kk in k)
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(axes))
    op = MaxPool(k, stride, padding, dilation, draw(st.booleans()))
    shapes = [(c, *spatial)]
    assume(valid(op, shapes))
    return op, shapes


FAMILIES = {
    "affine_dense": affine_dense(),
    "affine_conv1d": affine_conv(False),
    "affine_conv2d": affine_conv(True),
    "relu": activations("relu"),
    "leaky_relu": activations("leaky_relu"),
    "elu": activations("elu"),
    "tanh": activations("tanh"),
    "sigmoid": activations("sigmoid"),
    "gelu": activations("gelu"),
    "softplus": activations("softplus"),
    "reshape": reshapes(),
    "permute": permutes(),
    "expand": expands(),
    "slice": slices(),
    "cat": cats(),
    "add": adds(),
    "reduce": reduces(),
    "avg_pool1d": avg_pools(False),
    "avg_pool2d": avg_pools(True),
    "zero_pad": zero_pads(),
    "scale_shift": scale_shifts(),
    "max_pool1d": max_pools(False),
    "max_pool2d": max_pools(True),
}


@st.composite
def cases(draw, family: str):
    op, shapes = draw(FAMILIES[family])
    return Case(op, shapes, draw(seeds), draw(st.integers(1, 2)), draw(st.sampled_from(BOX_STYLES)))


# ------------------------------------------------------------------------------ teeth cases

ALL = frozenset({"interval", "backward", "backward_lower", "jacobian", "fro", "max"})
EXACT_RULES = ALL  # linear maps: every rule is exact or its constant attained


def _teeth_cases() -> list[tuple[str, Case]]:
    g = torch.Generator().manual_seed(0)
    out = []

    def add(name, op, shapes, attained=ALL, style="generic", B=2):
        out.append((name, Case(op, shapes, len(out) + 1, B, style, frozenset(attained))))

    add("affine_dense", Affine(randn(g, 3, 4), randn(g, 3)), [(4,)])
    add("affine_sequence", Affine(randn(g, 3, 4), randn(g, 3)), [(2, 4)])
    # A convolution's l2 constant sqrt(overlap) sigma_max is not attained in general.
    add("affine_conv1d", Affine(randn(g, 2, 2, 3), randn(g, 2), (2,), (1,), (1,)), [(2, 6)],
        ALL - {"fro"})
    add("affine_conv2d", Affine(randn(g, 2, 1, 2, 2), randn(g, 2), (1, 2), (1, 0), (2, 1)),
        [(1, 4, 5)], ALL - {"fro"})
    # Piecewise linear activations: the chord rule and CROWN's lines are attained at the
    # ends of boxes straddling the kink; smooth ones: interval, jacobian, constant only (the
    # mean value bound of the linear rule is not attained).
    smooth = frozenset({"interval", "jacobian", "fro", "max"})
    add("relu", Activation("relu"), [(6,)], style="straddle")
    add("leaky_relu", Activation("leaky_relu", 0.1), [(6,)], style="straddle")
    add("leaky_relu_steep", Activation("leaky_relu", 2.5), [(6,)], style="straddle")
    add("elu", Activation("elu", 1.5, 1.0, 1.0), [(6,)], smooth, style="straddle")
    add("tanh", Activation("tanh"), [(6,)], smooth, style="straddle")
    add("sigmoid", Activation("sigmoid"), [(6,)], smooth, style="straddle")
    # softplus: no jacobian and no finite constant (it jumps at its threshold).
    add("softplus", Activation("softplus", 1.0, 20.0), [(6,)], smooth - {"jacobian", "fro", "max"})
    # GELU: one box across both extremes of GELU' (-+sqrt 2) and its minimiser, another
    # across the minimiser only (the floor -0.17 is attained to 3e-5).
    out.append(("gelu", Case(Activation("gelu"), [(2,)], 99, 1, "generic", smooth,
                             [(torch.tensor([[-2.0, -1.0]], dtype=DT),
                               torch.tensor([[2.0, 0.5]], dtype=DT))])))
    add("reshape", Reshape((6,)), [(2, 3)])
    add("permute", Permute((1, 0)), [(2, 3)])
    add("expand", Expand((2, 3)), [(1, 3)])
    add("slice", Slice(1, 0, 5, 2), [(2, 5)])
    add("select", Slice(0, index=-1), [(3, 2)])
    add("cat", Cat(1, 2), [(2, 2), (2, 3)])
    add("stack", Cat(0, 3, stack=True), [(3,), (3,), (3,)])
    add("add", Add(1.0), [(2, 3), (2, 3)])
    add("sub_broadcast", Add(-2.0), [(2, 3), (1, 3)])
    add("reduce_sum", Reduce((0, 1)), [(2, 3)])
    add("reduce_mean", Reduce((1,), True, True), [(2, 3)])
    add("avg_pool1d", AvgPool((2,), (2,), (0,)), [(2, 6)])
    add("avg_pool2d", AvgPool((2, 2), (2, 2), (1, 1), True, False), [(1, 4, 5)],
        ALL - {"fro"})
    add("adaptive_avg_pool2d", AvgPool((2, 2), adaptive=True), [(1, 4, 4)])
    add("zero_pad", ZeroPad((1, 2, 0, 1)), [(2, 3)])
    add("scale_shift", ScaleShift(randn(g, 2, 1), randn(g, 3)), [(2, 3)])
    # Max pooling: disjoint windows, so the gap of the linear rule is attained in every
    # window at once.
    add("max_pool1d", MaxPool((3,), (3,), (0,), (1,)), [(2, 6)], ALL - {"jacobian"})
    add("max_pool2d", MaxPool((2, 2), (2, 2), (0, 0), (1, 1)), [(1, 4, 4)], ALL - {"jacobian"})
    add("max_pool1d_overlap", MaxPool((2,), (1,), (0,), (1,)), [(1, 5)],
        {"interval", "fro", "max"})
    return out


TEETH = _teeth_cases()
