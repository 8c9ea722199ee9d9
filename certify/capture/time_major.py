"""Tensors whose first axis is not the batch (``certify.capture.build.Leading``): the
output ``(T, B, features)`` of a recurrent layer with ``batch_first=False``, the final states
``(layers x directions, B, H)`` of every recurrent layer (``certify.capture.recurrent``).
Each is held as its slices along the first axis, nodes ``(B, *shape)``. (A batch-first
tensor transposed to ``(T, B, ...)`` by the model itself, the input of a layer with
``batch_first=False``, is a node whose batch axis moved: ``Ref.axis``.)

What classifiers do with them is read here: index or slice the first axis (``out[-1]``,
``h_n[-1]``, ``h_n[-2:]``), transpose or permute the first two axes back (the slices
stacked: one ``Cat`` node, or the batch-first tensor they were cut from), squeeze or reshape
a first axis of length one, unbind, concatenate, and sum or average over the first axis;
indexing, slicing, concatenating and reducing along later axes act on every slice. Any
other operation on them is refused by name (``certify.capture.export``). ``TIME_MAJOR``
maps each ATen operator to a rule made from its batch-first rule.
"""

from __future__ import annotations

import math

import torch

from certify.capture.build import Build, Leading, Ref, UnsupportedModelError
from certify.graph.operators import Cat, Permute, Reduce, Reshape, Slice

aten = torch.ops.aten

SUPPORTED = ("indexing and slicing the first axis (out[-1], h_n[-1], h_n[-2:]), "
             "transpose(0, 1)/permute(1, 0, ...), squeeze/reshape of a first axis of length "
             "one, unbind, cat, sum/mean over the first axis")


def refuse(fx, where, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{fx.name}: {what} of a tensor whose first axis is not the batch (a recurrent "
        f"layer's time-major output or final states) ({where}); supported on it: {SUPPORTED}")


def whole(b: Build, x: Leading, fx, name: str) -> Ref:
    """The batch-first node ``(B, K, *shape)`` of ``x``: the one its slices were cut from,
    else their stack."""
    if x.whole is not None:
        return x.whole
    shape = b.nodes[x.parts[0].index].shape
    return b.node(Cat(0, len(x.parts), stack=True), list(x.parts), fx, name,
                  (len(x.parts), *shape))


def cut(b: Build, fx, x: Ref) -> Leading:
    """The batch-first node ``x`` ``(B, K, *shape)`` as ``K`` slices."""
    K, *shape = b.nodes[x.index].shape
    return Leading(tuple(b.node(Slice(0, index=k), [x], fx, f"{fx.name}/{k}", tuple(shape))
                         for k in range(K)), x)


def _each(b: Build, fx, x: Leading, op) -> Leading:
    """``op`` on every slice; the shape of one is that of the result without its first two
    axes."""
    shape = tuple(fx.meta["val"].shape[2:])
    return Leading(tuple(b.node(op, [p], fx, f"{fx.name}/{k}", shape)
                         for k, p in enumerate(x.parts)))


def _axis(d: int, fx, arg: int = 0) -> int:
    n = fx.args[arg].meta["val"].ndim
    return d + n if d < 0 else d


def _transpose(batch):
    def rule(b: Build, fx, where, x, d0, d1):
        pair = sorted((_axis(d0, fx), _axis(d1, fx)))
        if isinstance(x, Leading):
            if pair != [0, 1]:
                raise refuse(fx, where, f"transpose({d0}, {d1})")
            return whole(b, x, fx, fx.name)
        return batch(b, fx, where, x, d0, d1)
    return rule


def _permute(batch):
    def rule(b: Build, fx, where, x, dims):
        if not isinstance(x, Leading):
            return batch(b, fx, where, x, dims)
        dims = [_axis(d, fx) for d in dims]
        if dims[:2] != [1, 0]:
            raise refuse(fx, where, f"permute({dims})")
        stacked = whole(b, x, fx, f"{fx.name}/stack")  # (K, *s) per input, later axes permuted
        rest = tuple(d - 1 for d in dims[2:])
        if rest == tuple(range(1, len(dims) - 1)):
            return stacked
        return b.node(Permute((0, *rest)), [stacked], fx)
    return rule


def _select(batch):
    def rule(b: Build, fx, where, x, dim, index):
        if not isinstance(x, Leading):
            return batch(b, fx, where, x, dim, index)
        d = _axis(dim, fx)
        if d == 0:
            return x.parts[index]
        if d == 1:
            raise refuse(fx, where, "select along the batch axis")
        return _each(b, fx, x, Slice(d - 2, index=index))
    return rule


def _slice(batch):
    def rule(b: Build, fx, where, x, dim=0, start=None, end=None, step=1):
        if not isinstance(x, Leading):
            return batch(b, fx, where, x, dim, start, end, step)
        d = _axis(dim, fx)
        if d == 0:
            parts = x.parts[start:end:step]
            return Leading(parts, x.whole if parts == x.parts else None)
        if d == 1:
            if (start in (None, 0)) and (end is None or end >= b.batch) and step == 1:
                return x
            raise refuse(fx, where, "a slice of the batch axis")
        return _each(b, fx, x, Slice(d - 2, start or 0, end, step))
    return rule


def _reshape(batch):
    """A reshape of a first axis of length one: ``(1, B, *s)`` lies in memory as
    ``(B, *s)``, so any batch-first shape of the same size is that of the one slice."""
    def rule(b: Build, fx, where, x, *args, **kwargs):
        if not isinstance(x, Leading):
            return batch(b, fx, where, x, *args, **kwargs)
        val = fx.meta["val"]
        (part,) = x.parts if len(x.parts) == 1 else (None,)
        if part is None or val.ndim == 0 or val.shape[0] != b.batch or \
                math.prod(val.shape[1:]) != math.prod(b.nodes[part.index].shape):
            raise refuse(fx, where, f"a reshape to {tuple(val.shape)}")
        shape = tuple(val.shape[1:])
        return part if shape == b.nodes[part.index].shape else \
            b.node(Reshape(shape), [part], fx)
    return rule


def _unbind(batch):
    def rule(b: Build, fx, where, x, dim=0):
        if not isinstance(x, Leading):
            return batch(b, fx, where, x, dim)
        if _axis(dim, fx) != 0:
            raise refuse(fx, where, f"unbind(dim={dim})")
        return x.parts
    return rule


def _cat(batch):
    def rule(b: Build, fx, where, tensors, dim=0):
        leading = [isinstance(t, Leading) for t in tensors]
        if not any(leading):
            return batch(b, fx, where, tensors, dim)
        n = fx.meta["val"].ndim
        d = dim + n if dim < 0 else dim
        if not all(leading) or d == 1:
            raise refuse(fx, where, "cat with batch-first tensors or along the batch axis")
        if d == 0:
            return Leading(sum((t.parts for t in tensors), ()))
        shape = tuple(fx.meta["val"].shape[2:])
        return Leading(tuple(
            b.node(Cat(d - 2, len(tensors)), list(parts), fx, f"{fx.name}/{k}", shape)
            for k, parts in enumerate(zip(*(t.parts for t in tensors)))))
    return rule


def _reduce(batch, mean: bool):
    def rule(b: Build, fx, where, x, dim=None, keepdim=False, dtype=None):
        if not isinstance(x, Leading):
            return batch(b, fx, where, x, dim, keepdim, dtype)
        dims = [_axis(d, fx) for d in (dim if isinstance(dim, (list, tuple)) else [dim])] \
            if dim is not None and dim != [] else [None]
        if None in dims or 1 in dims or (0 in dims and keepdim):
            raise refuse(fx, where, f"{'mean' if mean else 'sum'}(dim={dim}, "
                                    f"keepdim={keepdim})")
        if 0 in dims:  # over the slices: their stack (K, *s), reduced over its axis 0
            stacked = whole(b, x, fx, f"{fx.name}/stack")
            return b.node(Reduce(tuple(d - 1 if d else 0 for d in dims), False, mean),
                          [stacked], fx)
        return _each(b, fx, x, Reduce(tuple(d - 2 for d in dims), keepdim, mean))
    return rule


TIME_MAJOR = {
    aten.transpose: _transpose, aten.permute: _permute, aten.select: _select,
    aten.slice: _slice, aten.unbind: _unbind, aten.cat: _cat,
    **{op: _reshape for op in (aten.view, aten.reshape, aten._unsafe_view, aten.squeeze,
                               aten.flatten)},
    aten.mean: lambda batch: _reduce(batch, True), aten.sum: lambda batch: _reduce(batch, False),
}
