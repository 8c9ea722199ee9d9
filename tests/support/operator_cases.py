"""Cases for tests/graph/test_operators.py: one hypothesis strategy per operator family drawing the
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

from certify.graph.operators import (
    Activation,
    Add,
    Affine,
    AvgPool,
    Cat,
    Expand,
    FixedAffine,
    Interpolate,
    LayerNorm,
    MaxPool,
    Normalize,
    Pad,
    Permute,
    PReLU,
    Product,
    Reduce,
    Reshape,
    ScaleShift,
    Slice,
    Softmax,
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
    box_scale: float = 1.0  # drawn boxes scaled, to reach the kinks of the operator

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7919 + salt)

    def out_shape(self) -> tuple[int, ...]:
        xs = [torch.zeros(self.B, *s, dtype=DT) for s in self.in_shapes]
        return tuple(self.op(*xs).shape[1:])

    def __repr__(self):  # what hypothesis prints for a failing example
        scale = f", box_scale={self.box_scale}" if self.box_scale != 1 else ""
        return (f"Case({self.op!r}, in_shapes={self.in_shapes}, seed={self.seed}, B={self.B}, "
                f"box_style={self.box_style!r}{scale})")


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
    return [tuple(end * case.box_scale for end in make_box(gen, case.B, s, case.box_style))
            for s in case.in_shapes]


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


def reaches_for(case: Case, salt: int = 4):
    """Boxes, l2 reaches ``(B,)`` and nominal points for ``local_reach``: each nominal point
    uniform in its box, each reach up to the length of its box's diagonal (the ball or the
    box binds); one input of two is sometimes a constant (reach ``None``, its box the
    nominal point)."""
    gen = case.generator(salt)
    boxes = boxes_for(case)
    moving = [True] * len(boxes)
    if len(boxes) == 2:
        moving[int(torch.randint(0, 2, (), generator=gen))] = bool(rand(gen) < 0.5)
    out, reaches, nominals = [], [], []
    for (lo, hi), moves in zip(boxes, moving):
        x0 = lo + (hi - lo) * rand(gen, *lo.shape)
        nominals.append(x0)
        out.append((lo, hi) if moves else (x0, x0))
        reaches.append(rand(gen, len(lo)) * (hi - lo).flatten(1).norm(dim=-1) if moves else None)
    return out, reaches, nominals


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
def fixed_affines(draw):
    """A recurrent weight's map: ``Affine``'s dense rules, not a layer."""
    op, shapes = draw(affine_dense())
    return FixedAffine(op.weight, op.bias), shapes


@st.composite
def affine_conv(draw, two: bool, grouped: bool = False, transposed: bool = False):
    """Convolutions; ``grouped``: 2 or 3 groups, or depthwise (one input channel per group);
    ``transposed``: the kernel drawn in the equivalent convolution's layout."""
    groups = draw(st.integers(2, 3)) if grouped else 1
    c_in, c_out = groups * draw(small), groups * draw(small)
    if grouped and draw(st.booleans()):  # depthwise, with a channel multiplier
        c_in = groups
    axes = 2 if two else 1
    k = tuple(draw(st.integers(1, 3)) for _ in range(axes))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(axes))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(axes))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(axes))
    extra = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)) \
        if transposed else ()
    spatial = tuple(draw(st.integers(1, 5 if two else 8)) for _ in range(axes))
    gen = torch.Generator().manual_seed(draw(seeds))
    fan_in = c_in // groups * math.prod(k)
    weight = randn(gen, c_out, c_in // groups, *k, scale=1 / math.sqrt(fan_in))
    op = Affine(weight, randn(gen, c_out), stride, padding, dilation, groups, transposed, extra)
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
    elif kind == "hardtanh":  # min, max: hardtanh, ReLU6, one-sided and degenerate clamps
        op = Activation(kind, *draw(st.sampled_from([(-1.0, 1.0), (0.0, 6.0), (-0.5, 0.25),
                                                     (0.0, math.inf), (-math.inf, 0.5),
                                                     (0.3, 0.3)])))
    else:
        op = Activation(kind)
    shape = draw(st.sampled_from([(3,), (5,), (2, 3)]))
    return op, [shape]


@st.composite
def prelus(draw):
    """One slope, or one per channel (the first axis), of any sign (trained PReLUs hold
    slopes from about -1.3 to 1.3)."""
    shape = draw(st.sampled_from([(3,), (5,), (2, 3), (3, 2, 2)]))
    count = draw(st.sampled_from([1, shape[0]]))
    values = st.sampled_from([-1.28, -0.3, 0.0, 0.1, 0.25, 1.0, 1.3, 2.0])
    slopes = torch.tensor(draw(st.lists(values, min_size=count, max_size=count)), dtype=DT)
    return PReLU(slopes.reshape(-1, *[1] * (len(shape) - 1))), [shape]


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
def broadcast_pair(draw):
    """Two shapes that broadcast: either side has size one along some axes (both carry the
    batch axis, so torch aligns them only at equal rank)."""
    shape = draw(in_shape())
    def side():
        return tuple(1 if draw(st.integers(0, 3)) == 0 else d for d in shape)
    return [side(), side()]


@st.composite
def adds(draw):
    op, shapes = Add(draw(st.sampled_from([1.0, -1.0, 0.5, -2.5]))), draw(broadcast_pair())
    assume(valid(op, shapes))
    return op, shapes


@st.composite
def products(draw, matmul: bool):
    """``x * y`` with broadcasting (``(3, 4) * (3, 1)``, ...) or ``(h, T, k) @ (h, k, S)``
    (``h`` absent or a head axis)."""
    if not matmul:
        return Product(), draw(broadcast_pair())
    heads = draw(st.sampled_from([(), (1,), (2,)]))
    T, k, S = draw(small), draw(small), draw(small)
    return Product(matmul=True), [(*heads, T, k), (*heads, k, S)]


@st.composite
def softmaxes(draw):
    return Softmax(), [draw(st.sampled_from([(1,), (2,), (5,), (2, 3, 4), (1, 2, 3)]))]


@st.composite
def masked_softmaxes(draw):
    """A softmax with a constant mask (True keeps), broadcast against its input along some
    axes (fewer of them, or size one): every row keeps one entry at least."""
    shape = draw(st.sampled_from([(1,), (3,), (2, 3), (3, 3), (2, 3, 4)]))
    lead = draw(st.integers(0, len(shape) - 1))
    mask_shape = tuple(1 if draw(st.booleans()) else d for d in shape[lead:])
    gen = torch.Generator().manual_seed(draw(seeds))
    keep = rand(gen, *mask_shape) < draw(st.sampled_from([0.2, 0.5, 0.8]))
    one = rand(gen, *mask_shape)
    keep = keep | (one == one.amax(-1, keepdim=True))
    return Softmax(keep), [shape]


@st.composite
def sequence_shapes(draw):
    """``(n,)`` or ``(T, n)``: one vector or a sequence of tokens, normalised over ``n``."""
    n = draw(st.integers(1, 5))
    return draw(st.sampled_from([(n,), (2, n), (3, n)]))


@st.composite
def layer_norms(draw):
    shape = draw(sequence_shapes())
    gen = torch.Generator().manual_seed(draw(seeds))
    weight, bias = randn(gen, shape[-1]), randn(gen, shape[-1])  # some weights negative
    if draw(st.booleans()):
        weight = torch.where(rand(gen, shape[-1]) < 0.3, 0.0, weight)
    return LayerNorm(weight, bias, draw(st.sampled_from([1e-5, 1e-2]))), [shape]


@st.composite
def normalizes(draw):
    """``F.normalize``'s default floor 1e-12 and floors the boxes reach (``||x|| < eps``:
    the map is ``x / eps``); "straddle" and "grid" boxes contain 0."""
    return Normalize(draw(st.sampled_from([1e-12, 0.5, 1.0]))), [draw(sequence_shapes())]


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
def edge_pads(draw):
    """Reflect, replicate or circular padding of the last one to three axes; negative
    amounts crop (torch's circular padding refuses them or reads memory it never wrote)."""
    mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
    shape = draw(in_shape(max_size=4))
    axes = draw(st.integers(1, len(shape)))
    pad = tuple(draw(st.integers(0 if mode == "circular" else -1, 3)) for _ in range(2 * axes))
    op = Pad(pad, mode)
    assume(valid(op, [shape]))
    return op, [shape]


# Scale factors: fractions and their inverses, and those whose output size hits torch's CPU
# copies (m = n: 1.1 on up to 9 entries; m = 2 n: 2.1) with the factor still given.
SCALES = [0.5, 0.7, 1.0, 1.1, 1.5, 1.7, 2.0, 2.1, 3.0]


@st.composite
def interpolates(draw):
    """``F.interpolate`` of the last one or two axes (after none, one or two others) to a
    drawn size or by drawn scale factors, any mode; ``align_corners`` for (bi)linear."""
    axes = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["nearest", "nearest-exact", "linear" if axes == 1 else
                                 "bilinear"]))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(axes))
    shape = (*draw(st.sampled_from([(), (1,), (2,), (2, 1)])), *spatial)
    if draw(st.booleans()):
        scales = tuple(draw(st.sampled_from(SCALES)) for _ in range(axes))
        size = tuple(math.floor(n * s) for n, s in zip(spatial, scales))
        assume(min(size) >= 1)
    else:
        size, scales = tuple(draw(st.integers(1, 7)) for _ in range(axes)), ()
    align = draw(st.booleans()) and "linear" in mode
    return Interpolate(size, mode, align, scales), [shape]


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
    "affine_conv1d_grouped": affine_conv(False, grouped=True),
    "affine_conv2d_grouped": affine_conv(True, grouped=True),
    "affine_conv1d_transposed": affine_conv(False, transposed=True),
    "affine_conv2d_transposed": affine_conv(True, grouped=True, transposed=True),
    "fixed_affine": fixed_affines(),
    "relu": activations("relu"),
    "leaky_relu": activations("leaky_relu"),
    "elu": activations("elu"),
    "tanh": activations("tanh"),
    "sigmoid": activations("sigmoid"),
    "gelu": activations("gelu"),
    "gelu_tanh": activations("gelu_tanh"),
    "softplus": activations("softplus"),
    "silu": activations("silu"),
    "mish": activations("mish"),
    "hardswish": activations("hardswish"),
    "hardsigmoid": activations("hardsigmoid"),
    "hardtanh": activations("hardtanh"),
    "prelu": prelus(),
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
    "edge_pad": edge_pads(),
    "interpolate": interpolates(),
    "scale_shift": scale_shifts(),
    "max_pool1d": max_pools(False),
    "max_pool2d": max_pools(True),
    "mul": products(False),
    "matmul": products(True),
    "softmax": softmaxes(),
    "softmax_masked": masked_softmaxes(),
    "layer_norm": layer_norms(),
    "normalize": normalizes(),
}


@st.composite
def cases(draw, family: str):
    op, shapes = draw(FAMILIES[family])
    return Case(op, shapes, draw(seeds), draw(st.integers(1, 2)),
                draw(st.sampled_from(BOX_STYLES)), box_scale=BOX_SCALES.get(family, 1.0))


# Families whose kinks or extremes lie beyond the drawn boxes' reach (about -+3: hard-swish
# and hard-sigmoid bend at -+3, SiLU's and Mish's derivatives peak near -+2.4, -2.3 and 1.5).
BOX_SCALES = {"hardswish": 3.0, "hardsigmoid": 3.0, "silu": 2.0, "mish": 2.0}


# ------------------------------------------------------------------------------ teeth cases

ALL = frozenset({"interval", "backward", "backward_lower", "jacobian", "fro", "max"})
EXACT_RULES = ALL  # linear maps: every rule is exact or its constant attained


def _teeth_cases() -> list[tuple[str, Case]]:
    g = torch.Generator().manual_seed(0)
    out = []

    def add(name, op, shapes, attained=ALL, style="generic", B=2, boxes=None):
        out.append((name, Case(op, shapes, len(out) + 1, B, style, frozenset(attained), boxes)))

    add("affine_dense", Affine(randn(g, 3, 4), randn(g, 3)), [(4,)])
    add("affine_sequence", Affine(randn(g, 3, 4), randn(g, 3)), [(2, 4)])
    # A convolution's l2 constant sqrt(overlap) sigma_max is not attained in general.
    add("affine_conv1d", Affine(randn(g, 2, 2, 3), randn(g, 2), (2,), (1,), (1,)), [(2, 6)],
        ALL - {"fro"})
    add("affine_conv2d", Affine(randn(g, 2, 1, 2, 2), randn(g, 2), (1, 2), (1, 0), (2, 1)),
        [(1, 4, 5)], ALL - {"fro"})
    add("affine_depthwise", Affine(randn(g, 4, 1, 3, 3), randn(g, 4), (1, 1), (1, 1), (1, 1), 2),
        [(2, 4, 4)], ALL - {"fro"})
    # A transposed convolution's output sees every other kernel row (stride 2): the largest
    # row sum of the whole kernel, its l_inf constant, is not attained either.
    add("affine_transposed", Affine(randn(g, 3, 2, 2, 3), randn(g, 3), (2, 1), (1, 0), (1, 2),
                                    1, True, (1, 0)), [(2, 3, 3)], ALL - {"fro", "max"})
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
    # GELU, exact and tanh form: one box across both extremes of GELU' (-+sqrt 2, -+1.4185)
    # and its minimiser, another across the minimiser only (the floor is attained to 3e-5,
    # 5e-8 for the tanh form).
    box = (torch.tensor([[-2.0, -1.0]], dtype=DT), torch.tensor([[2.0, 0.5]], dtype=DT))
    for kind in ("gelu", "gelu_tanh"):
        add(kind, Activation(kind), [(2,)], smooth, B=1, boxes=[box])
    # SiLU, Mish, hard-swish: the same, with boxes across the extremes of phi' (-+2.3994;
    # -2.2564 and 1.4906; -+3) and, in the second entry, the minimiser only.
    box = (torch.tensor([[-3.5, -2.0]], dtype=DT), torch.tensor([[3.5, 0.5]], dtype=DT))
    for kind in ("silu", "mish", "hardswish"):
        add(kind, Activation(kind), [(2,)], smooth, B=1, boxes=[box])
    # Clipped lines: boxes across either kink, inside both, and outside.
    add("hardtanh", Activation("hardtanh", -0.5, 0.5), [(6,)], smooth, style="straddle")
    kinks = lambda lo, hi: [(torch.tensor([lo], dtype=DT), torch.tensor([hi], dtype=DT))]  # noqa: E731
    add("relu6", Activation("hardtanh", 0.0, 6.0), [(3,)], smooth, B=1,
        boxes=kinks([-1.0, 5.0, -2.0], [7.0, 8.0, 4.0]))
    add("hardsigmoid", Activation("hardsigmoid"), [(3,)], smooth, B=1,
        boxes=kinks([-4.0, -1.0, 2.0], [4.0, 1.0, 5.0]))
    # PReLU: a convex, a falling and a steep channel; attained as LeakyReLU's rules are.
    add("prelu", PReLU(torch.tensor([[0.25], [-0.5], [1.5]], dtype=DT)), [(3, 2)],
        style="straddle")
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
    # Gathers: the l2 constant sqrt(most reads of one entry) is attained at that entry
    # (here 9 = 3 x 3 reads of one reflected entry, 4 of the replicated first entry, 4 of
    # a circular corner); (bi)linear interpolation attains only its l_inf constant 1.
    add("reflect_pad", Pad((2, 1, 1, 2), "reflect"), [(2, 3, 4)])
    add("replicate_pad", Pad((3, -1), "replicate"), [(2, 5)])
    add("circular_pad", Pad((1, 2, 3, 0), "circular"), [(1, 3, 3)])
    add("nearest", Interpolate((5, 7), "nearest", scales=(1.7, 2.5)), [(2, 3, 3)])
    add("nearest_exact", Interpolate((2,), "nearest-exact"), [(2, 5)])
    add("bilinear", Interpolate((5, 7), "bilinear"), [(1, 3, 4)], ALL - {"fro"})
    add("linear_align_corners", Interpolate((7,), "linear", True), [(2, 4)], ALL - {"fro"})
    add("scale_shift", ScaleShift(randn(g, 2, 1), randn(g, 3)), [(2, 3)])
    # Max pooling: disjoint windows, so the gap of the linear rule is attained in every
    # window at once.
    add("max_pool1d", MaxPool((3,), (3,), (0,), (1,)), [(2, 6)], ALL - {"jacobian"})
    add("max_pool2d", MaxPool((2, 2), (2, 2), (0, 0), (1, 1)), [(1, 4, 4)], ALL - {"jacobian"})
    add("max_pool1d_overlap", MaxPool((2,), (1,), (0,), (1,)), [(1, 5)],
        {"interval", "fro", "max"})
    # Products (no finite constant): with both factors moving, each entry of x * y is one
    # x entry times one y entry ((3, 1) shares y along a row, never x), so the corners attain
    # the interval and dx . dy attains +-x_r . y_r in the linear rule. A matrix product
    # shares its factors between entries; with one factor a point (a projection perturbed
    # inside its own attention block) it is linear and every rule exact.
    bilinear = ALL - {"fro", "max"}
    add("mul", Product(), [(3, 4), (3, 1)], bilinear)
    # ... and |x y - x0 y0| = |x0 dy + y0 dx + dx dy| reaches |x0| r_y + |y0| r_x + r_x r_y.
    add("mul_scalar", Product(), [(1,), (1,)], bilinear | {"local_reach"})
    keys = randn(g, 2, 2, 3, 2)
    add("matmul_point", Product(matmul=True), [(2, 2, 3), (2, 3, 2)], bilinear,
        boxes=[make_box(g, 2, (2, 2, 3), "generic"), (keys, keys)])
    # Softmax: p_i is least at x_i = l_i, x_j = u_j (an exact interval); its row sums
    # 2 p_k (1 - p_k) of |J| reach 1/2 at p_k = 1/2 (and ||J||_2 <= 1/2: the l2 constant
    # 1 is not attained).
    add("softmax", Softmax(), [(2, 3)], {"interval", "max"})
    # ... with a mask: the hidden weights are 0 exactly, the kept ones the softmax of the kept
    # entries (its interval exact again; a row of two kept entries reaches 1/2).
    add("softmax_masked", Softmax(torch.tensor([[True, False, True], [True, True, False]])),
        [(2, 3)], {"interval", "max"})
    # l2 normalisation on boxes across 0: x_k / max(||x||, eps) is largest at x = u_k e_k
    # (an exact interval); inside the ball ||x|| < eps = 1 it is x itself (constant 1 / eps,
    # and the reach around a point there).
    across = [(-0.1 - rand(g, 2, 3), 0.1 + rand(g, 2, 3))]
    add("normalize", Normalize(1e-12), [(3,)], {"interval"}, boxes=across)
    add("normalize_floor", Normalize(1.0), [(3,)], {"interval", "fro", "local_reach"},
        boxes=across)
    # LayerNorm: ||J||_2 <= max |g| / sqrt(eps), approached at constant vectors (c^ -> 0,
    # J -> diag(g) P / sqrt(eps)) when |g| is constant (diag(g) P is then |g| P, norm |g|).
    add("layer_norm", LayerNorm(torch.tensor([2.0, -2.0, 2.0], dtype=DT), randn(g, 3), 1e-2),
        [(3,)], {"fro"})
    # A recurrent weight's map: a dense layer's rules, every one exact or attained.
    add("fixed_affine", FixedAffine(randn(g, 3, 4), randn(g, 3)), [(2, 4)])
    return out


TEETH = _teeth_cases()
