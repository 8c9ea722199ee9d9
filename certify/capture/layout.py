"""The rules of ``certify.capture.aten``'s ``BUILDERS`` that move, cut and join tensors:
reshapes, permutations and transposes, slices and selections, the pieces of ``split``,
``chunk``, ``tensor_split`` and ``unbind``, zero padding, and ``cat``/``stack``, with
constants among the joined tensors.

They follow the batch axis (``Ref.axis``): a transpose that swaps it with another axis
changes no value per input, only where the export's tensor holds it (``batch_first=False``
sequences, ``(T, B, E)``), and a reshape may move it as long as it keeps it whole.

A constant joined to computed tensors (a class token before the patch tokens) is exact with
the nodes there are: each computed tensor zero-padded (``ZeroPad``) over the constants that
follow it, the padded tensors concatenated (``Cat``), and the constants added
(``ScaleShift``): the constant entries have point boxes and no rows go back through them.
"""

from __future__ import annotations

import math

import torch

from certify.capture.build import Build, Const, Ref, UnsupportedModelError
from certify.capture.operands import _per_input
from certify.capture.resampling import _edge_pad
from certify.graph.operators import Cat, Permute, Reshape, ScaleShift, Slice, ZeroPad


def export_shape(b: Build, x: Ref) -> tuple[int, ...]:
    """The shape of ``x`` in the export: its node's shape with the batch axis put back."""
    shape = b.nodes[x.index].shape
    return shape[:x.axis] + (b.batch,) + shape[x.axis:]


def _reshape(b: Build, fx, where, x, *args, **kwargs):
    """A row-major reshape that keeps the batch axis whole: as many entries before it as
    before, so that per input it is a row-major reshape too (the batch axis may land at
    another position: ``(T, B, E)`` viewed as ``(T, B, H, d)`` or ``(1, B, E)``)."""
    before = math.prod(export_shape(b, x)[:x.axis])
    out = tuple(fx.meta["val"].shape)
    axis = next((p for p in range(len(out))
                 if out[p] == b.batch and math.prod(out[:p]) == before), None)
    if axis is None:
        raise UnsupportedModelError(
            f"{fx.name}: a reshape from {export_shape(b, x)} to {out} merges the batch axis "
            f"with another ({where}); certify needs every operation to act on each input "
            "separately")
    shape = out[:axis] + out[axis + 1:]
    if shape == b.nodes[x.index].shape:
        return Ref(x.index, axis)
    return b.node(Reshape(shape), [x], fx, axis=axis)


def _moved(b: Build, fx, x: Ref, dims) -> Ref:
    """``x`` with its export axes permuted by ``dims``: the other axes permuted per input,
    and the batch axis where ``dims`` puts it."""
    axis = dims.index(x.axis)
    per = tuple(d - (d > x.axis) for d in dims if d != x.axis)
    if per == tuple(range(len(per))):
        return Ref(x.index, axis)
    return b.node(Permute(per), [x], fx, axis=axis)


def _permute(b: Build, fx, where, x, dims):
    n = b.ndim(x)
    return _moved(b, fx, x, [d % n for d in dims])


def _transpose(b: Build, fx, where, x, d0, d1):
    n = b.ndim(x)
    dims = list(range(n))
    dims[d0 % n], dims[d1 % n] = dims[d1 % n], dims[d0 % n]
    return _moved(b, fx, x, dims)


def _slice(b: Build, fx, where, x, dim=0, start=None, end=None, step=1):
    n = b.ndim(x)
    if dim % n == x.axis and start in (None, 0) and (end is None or end >= b.batch) \
            and step == 1:
        return x
    return b.node(Slice(b.dim(dim, n, fx, "slice"), start or 0, end, step), [x], fx)


def _select(b: Build, fx, where, x, dim, index):
    n = b.ndim(x)
    axis = x.axis - (dim % n < x.axis)
    return b.node(Slice(b.dim(dim, n, fx, "select"), index=index), [x], fx, axis=axis)


def _pieces(b: Build, fx, x, dim, bounds):
    """``x`` cut along ``dim`` into the pieces ``[start, end)`` of ``bounds``: one ``Slice``
    node each, named ``<node>/<i>`` (``split``, ``chunk``, ``tensor_split``)."""
    axis = b.dim(dim, b.ndim(x), fx, fx.target.__name__)
    shape = b.nodes[x.index].shape
    return tuple(b.node(Slice(axis, start, end), [x], fx, f"{fx.name}/{i}",
                        shape[:axis] + (end - start,) + shape[axis + 1:])
                 for i, (start, end) in enumerate(bounds))


def _length(b: Build, x, dim, fx) -> int:
    return b.nodes[x.index].shape[b.dim(dim, b.ndim(x), fx, fx.target.__name__)]


def _split(b: Build, fx, where, x, size, dim=0):
    """``split(x, size)``, or ``split_with_sizes`` when ``size`` is a list of sizes."""
    n = _length(b, x, dim, fx)
    sizes = list(size) if isinstance(size, (list, tuple)) else \
        [min(size, n - start) for start in range(0, n, size)]
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    return _pieces(b, fx, x, dim, list(zip([0, *ends[:-1]], ends)))


def _chunk(b: Build, fx, where, x, chunks, dim=0):
    n = _length(b, x, dim, fx)
    return _split(b, fx, where, x, -(-n // chunks), dim)


def _tensor_split(b: Build, fx, where, x, sections, dim=0):
    """``tensor_split`` into ``sections`` pieces (the first ``n % sections`` one longer), or
    at the given indices."""
    n = _length(b, x, dim, fx)
    if isinstance(sections, (list, tuple)):
        cuts = [min(max(i + n if i < 0 else i, 0), n) for i in sections]
    else:
        size, extra = divmod(n, sections)
        cuts = [sum(size + (i < extra) for i in range(k)) for k in range(1, sections)]
    ends = [*cuts, n]
    starts = [0, *cuts]
    return _pieces(b, fx, x, dim, [(s, max(s, e)) for s, e in zip(starts, ends)])


def _unbind(b: Build, fx, where, x, dim=0):
    n = b.ndim(x)
    axis = b.dim(dim, n, fx, "unbind")
    shape = b.nodes[x.index].shape
    return tuple(b.node(Slice(axis, index=i), [x], fx, f"{fx.name}/{i}",
                        shape[:axis] + shape[axis + 1:], x.axis - (dim % n < x.axis))
                 for i in range(shape[axis]))


def _pad(b: Build, fx, where, x, pad, mode="constant", value=None):
    # aten::pad(Tensor self, SymInt[] pad, str mode="constant", float? value=None)
    if mode != "constant":
        return _edge_pad(b, fx, where, x, pad, mode)
    if (value or 0.0) != 0.0:
        raise UnsupportedModelError(f"padding with the constant {value} ({where}); supported: "
                                    "zero padding (mode='constant', value 0) and modes "
                                    "'reflect', 'replicate', 'circular'")
    return b.node(ZeroPad(tuple(pad)), [x], fx)


def _pad_nd(b: Build, fx, where, x, pad, value=0.0):
    # aten::constant_pad_nd(Tensor self, SymInt[] pad, Scalar value=0)
    return _pad(b, fx, where, x, pad, "constant", value)


def _cat(stack):
    def rule(b: Build, fx, where, tensors, dim=0):
        what = "stack" if stack else "cat"
        tensors = list(tensors)
        first = next(t for t in tensors if isinstance(t, Ref))
        n = b.ndim(first) + stack
        axis = b.dim(dim, n, fx, what)
        if all(isinstance(t, Ref) for t in tensors):
            return b.node(Cat(axis, len(tensors), stack), tensors, fx)
        if stack:  # stack = cat of the tensors with a new axis of size one
            shape = b.nodes[first.index].shape
            shape = shape[:axis] + (1,) + shape[axis:]
            tensors = [b.node(Reshape(shape), [t], fx, f"{fx.name}/unsqueeze", shape)
                       if isinstance(t, Ref) else Const(t.value.unsqueeze(dim % n), t.source)
                       for t in tensors]
        parts = [t if isinstance(t, Ref) else _per_input(t, fx, what, n, b.at) for t in tensors]
        if not all(isinstance(p, Ref) or bool(torch.isfinite(p).all()) for p in parts):
            raise UnsupportedModelError(f"{fx.name}: {what} of a computed tensor with a "
                                        f"constant that is not finite ({where})")
        return _joined(b, fx, parts, axis)
    return rule


def _joined(b: Build, fx, parts, axis: int) -> Ref:
    """``cat(parts, axis)`` per input, with constant tensors among the computed ``Ref`` s:
    every computed part zero-padded over the constants up to the next computed one (the
    first also over those before it), the padded parts concatenated, the constants added."""
    shapes = [b.nodes[p.index].shape if isinstance(p, Ref) else tuple(p.shape) for p in parts]
    computed = [i for i, p in enumerate(parts) if isinstance(p, Ref)]
    padded = []
    for k, i in enumerate(computed):
        start = 0 if k == 0 else i
        end = computed[k + 1] if k + 1 < len(computed) else len(parts)
        before = sum(s[axis] for s in shapes[start:i])
        after = sum(s[axis] for s in shapes[i + 1:end])
        x, shape = parts[i], list(shapes[i])
        if before or after:
            shape[axis] += before + after
            pad = (0, 0) * (len(shape) - 1 - axis) + (before, after)
            x = b.node(ZeroPad(pad), [x], fx, f"{fx.name}/pad", shape)
        padded.append(x)
    shape = b.shape(fx)
    joined = padded[0] if len(padded) == 1 else \
        b.node(Cat(axis, len(padded)), padded, fx, f"{fx.name}/cat", shape)
    shift = torch.cat([torch.zeros(s, dtype=torch.float64) if isinstance(p, Ref)
                       else p.to(torch.float64) for p, s in zip(parts, shapes)], axis)
    if not bool(shift.any()):
        return joined
    return b.node(ScaleShift(torch.ones((), dtype=torch.float64), shift), [joined], fx)
