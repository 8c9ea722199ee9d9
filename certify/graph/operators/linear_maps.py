"""Linear maps without a weight parameter: reshapes, permutations, slices, concatenation,
sums of computed tensors, reductions, average pooling, zero padding; and ``ScaleShift``,
``x * scale + shift`` with constant tensors (input normalisation, a batch norm that follows
no affine layer). None of them is certified; they carry bounds exactly (THEORY.md section 8).

Shapes and dimensions are per input (the batch axis excluded): ``dim=0`` is the first axis
after the batch. Every rule comes from the map itself: ``backward`` and ``jacobian`` use its
adjoint (by autograd), ``interval`` its nonnegativity or the map with absolute coefficients,
``lipschitz`` Schur's test on those coefficients (``base.schur_norms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certify.graph.operators.base import ROUND, Operator, adjoints, row_sum, schur_norms, times
from certify.graph.operators.enclosure import Enclosure


class LinearMap(Operator):
    """``f(x_1, ..., x_k)``, linear in all inputs. ``absolute`` is the map with the absolute
    values of the coefficients (the map itself when they are nonnegative)."""

    nonnegative = True

    def absolute(self, *xs: torch.Tensor) -> torch.Tensor:
        return self(*xs)

    def interval(self, *boxes):
        if self.nonnegative:  # monotone, also in floating point (rounding is monotone)
            return self(*(lo for lo, _ in boxes)), self(*(hi for _, hi in boxes))
        center = self(*((lo + hi) / 2 for lo, hi in boxes))
        radius = self.absolute(*((hi - lo) / 2 for lo, hi in boxes))
        spread = radius * (1 + ROUND) + ROUND * center.abs()
        return center - spread, center + spread

    def backward(self, A, boxes, lower):
        return adjoints(self, A, [lo.shape[1:] for lo, _ in boxes]), None, None

    def enclose(self, inputs, boxes):
        return Enclosure.through(self, self.absolute, inputs)

    def jacobian(self, rows, boxes):
        shapes = [lo.shape[1:] for lo, _ in boxes]
        lo, hi = rows
        if self.nonnegative:
            return tuple(zip(adjoints(self, lo, shapes), adjoints(self, hi, shapes)))
        center = adjoints(self, (lo + hi) / 2, shapes)
        radius = adjoints(self.absolute, (hi - lo) / 2, shapes)
        out = []
        for c, r in zip(center, radius):
            r = r * (1 + ROUND) + ROUND * c.abs()
            out.append((c - r, c + r))
        return tuple(out)

    def lipschitz(self, norm, in_shapes):
        pick = 0 if norm == "fro" else 1
        # A map without coefficients has its constants on the CPU, wherever the graph is.
        return tuple(schur_norms(self.absolute, in_shapes, i, "cpu")[pick]
                     for i in range(self.arity))


@dataclass(frozen=True)
class Reshape(LinearMap):
    """``view``, ``reshape``, ``flatten``, ``squeeze``, ``unsqueeze``: row-major reshape."""

    shape: tuple[int, ...]

    def __call__(self, x):
        return x.reshape(len(x), *self.shape)

    def lipschitz(self, norm, in_shapes):
        return (1.0,)


@dataclass(frozen=True)
class Permute(LinearMap):
    """``permute``, ``transpose`` of the axes after the batch."""

    dims: tuple[int, ...]

    def __call__(self, x):
        return x.permute(0, *(d + 1 for d in self.dims))

    def lipschitz(self, norm, in_shapes):
        return (1.0,)


@dataclass(frozen=True)
class Expand(LinearMap):
    """``expand``: broadcast size-one axes (each entry copied; l2 constant from Schur)."""

    shape: tuple[int, ...]

    def __call__(self, x):
        return x.expand(len(x), *self.shape)


@dataclass(frozen=True)
class Slice(LinearMap):
    """``x[..., start:end:step, ...]`` along ``dim``; ``select``: ``index`` (axis dropped)."""

    dim: int
    start: int = 0
    end: int | None = None
    step: int = 1
    index: int | None = None

    def __call__(self, x):
        if self.index is not None:
            return x.select(self.dim + 1, self.index)
        where = [slice(None)] * x.ndim
        where[self.dim + 1] = slice(self.start, self.end, self.step)
        return x[tuple(where)]

    def lipschitz(self, norm, in_shapes):
        return (1.0,)


@dataclass(frozen=True)
class Cat(LinearMap):
    """``cat`` (``stack=False``) or ``stack`` of ``arity`` computed tensors along ``dim``."""

    dim: int
    arity: int = 2
    stack: bool = False

    def __call__(self, *xs):
        return (torch.stack if self.stack else torch.cat)(xs, self.dim + 1)

    def lipschitz(self, norm, in_shapes):
        return (1.0,) * self.arity

    def combine(self, norm, own, moving):
        """The parts are disjoint: ``sqrt(sum L_i^2)`` in l2, ``max L_i`` in l_inf."""
        parts = [times(c, L) for c, L in zip(own, moving) if L is not None]
        if not parts:
            return 0.0
        if norm == "fro":  # constants, or per-input reaches (tensors)
            return sum(p * p for p in parts) ** 0.5 * (1 + 4 * len(parts) * 1e-16)
        if isinstance(parts[0], torch.Tensor):
            return torch.stack(parts).amax(0)
        return max(parts)


@dataclass(frozen=True)
class Add(LinearMap):
    """``a + alpha b`` of two computed tensors (residual connections; ``sub``: ``alpha=-1``),
    broadcasting as torch does."""

    alpha: float = 1.0
    arity = 2

    @property
    def nonnegative(self):
        return self.alpha >= 0

    def __call__(self, a, b):
        return a + self.alpha * b if self.alpha != 1 else a + b

    def absolute(self, a, b):
        return a + abs(self.alpha) * b


@dataclass(frozen=True)
class Reduce(LinearMap):
    """``sum`` or ``mean`` over ``dims``."""

    dims: tuple[int, ...]
    keepdim: bool = False
    mean: bool = False

    def __call__(self, x):
        dims = tuple(d + 1 for d in self.dims)
        return (x.mean if self.mean else x.sum)(dims, keepdim=self.keepdim)


@dataclass(frozen=True)
class AvgPool(LinearMap):
    """``avg_pool1d/2d`` (any window, stride, padding, ``ceil_mode``, ``count_include_pad``,
    ``divisor_override``) or, with ``adaptive`` set, ``adaptive_avg_pool1d/2d`` to
    ``kernel`` (the output size)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    adaptive: bool = False

    def __call__(self, x):
        two = len(self.kernel) == 2
        if self.adaptive:
            return (F.adaptive_avg_pool2d if two else F.adaptive_avg_pool1d)(x, self.kernel)
        if two:
            return F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode,
                                self.count_include_pad, self.divisor_override)
        return F.avg_pool1d(x, self.kernel, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad)


@dataclass(frozen=True)
class ZeroPad(LinearMap):
    """``constant_pad_nd`` with value 0 (``pad`` in torch's order: last axis first)."""

    pad: tuple[int, ...]

    def __call__(self, x):
        return F.pad(x, self.pad)

    def lipschitz(self, norm, in_shapes):
        return (1.0,)


@dataclass(frozen=True, eq=False)
class ScaleShift(Operator):
    """``x * scale + shift`` with constant tensors broadcast against ``x`` (the batch axis
    excluded): ``mul``/``div``/``add``/``sub`` by constants, ``neg``, input normalisation,
    a batch norm in eval mode that follows no affine layer."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __call__(self, x):
        return x * self.scale + self.shift

    def _linear(self, x):
        return x * self.scale

    def _absolute(self, x):
        return x * self.scale.abs()

    def interval(self, box):
        lo, hi = box
        center = self((lo + hi) / 2)
        spread = self._absolute((hi - lo) / 2) * (1 + ROUND) + ROUND * center.abs()
        return center - spread, center + spread

    def backward(self, A, boxes, lower):
        (rows,) = adjoints(self._linear, A, [boxes[0][0].shape[1:]])
        shift = self.shift.expand(A.shape[2:])
        return (rows,), row_sum(A * shift), None

    def enclose(self, inputs, boxes):
        return Enclosure.through(self._linear, self._absolute, inputs, self.shift)

    def jacobian(self, rows, boxes):
        shapes = [boxes[0][0].shape[1:]]
        lo, hi = rows
        (c,) = adjoints(self._linear, (lo + hi) / 2, shapes)
        (r,) = adjoints(self._absolute, (hi - lo) / 2, shapes)
        r = r * (1 + ROUND) + ROUND * c.abs()
        return ((c - r, c + r),)

    def lipschitz(self, norm, in_shapes):
        l2, linf = schur_norms(self._absolute, in_shapes, 0, self.scale.device)
        return (l2 if norm == "fro" else linf,)
